"""icl-jax reproduce: the profiles' sweep files, the command line, and (slow) the whole path."""
import json
import os

import pytest

from icl_jax import claims, cli, config as config_lib, reproduce, sweep
from conftest import ROOT

FAMILY = list(claims.FAMILY)  # the order results.md lists them in


def test_every_profile_builds_the_paper_family():
    for profile in reproduce.PROFILES:
        configs = reproduce.member_configs(profile, seed=4)
        assert list(configs) == FAMILY  # results.md lists them in this order
        assert configs["3l"].model.n_layers == 3 and configs["2l-mlp"].model.mlp
        assert configs["1l-smear"].model.smear_keys and not configs["1l"].model.smear_keys
        assert {c.seed for c in configs.values()} == {4}
    assert reproduce.member_configs("paper")["2l"].model.d_model == 768
    text = reproduce.member_configs("text")["2l"]  # Hoogland et al.'s shape on pycode
    assert (text.data.name, text.model.d_model, text.model.n_heads, text.model.d_head,
            text.model.context, text.model.vocab_size, text.train.batch_size) == (
        "pycode", 256, 8, 32, 1024, 5000, 100)
    assert text.model.layer_norm and reproduce.member_configs("text")["2l-mlp"].model.d_mlp == 1024
    cpu = reproduce.member_configs("text-cpu")["2l"]  # the CPU search's setting (text_search.py)
    assert (cpu.data.name, cpu.model.d_model, cpu.model.context, cpu.model.vocab_size,
            cpu.train.batch_size, cpu.train.lr) == ("pycode", 128, 128, 2048, 64, 5e-3)
    with pytest.raises(config_lib.ConfigError, match="profile"):
        reproduce.member_configs("huge")
    with pytest.raises(config_lib.ConfigError, match="train.steps"):
        reproduce.member_configs("quick", overrides={"train.steps": "0"})


def test_accelerator_sized_profiles_warn_on_a_cpu():
    text = reproduce.member_configs("text")
    warning = reproduce.scale_warning(text, "cpu")
    assert "2.05B tokens each" in warning and "12.3B in all" in warning
    assert reproduce.scale_warning(text, "gpu") is None
    assert reproduce.scale_warning(reproduce.member_configs("quick"), "cpu") is None
    short = reproduce.member_configs("text", overrides={"train.steps": "100"})
    assert reproduce.scale_warning(short, "cpu") is None  # shortened as the warning says


def test_profile_sweep_files_take_no_argument():
    for profile in reproduce.PROFILES:
        with pytest.raises(ValueError, match="takes no argument"):
            sweep.load_sweep(reproduce.sweep_file(profile) + ":steps=10")


def test_the_family_is_defined_once_in_paper_small():
    family = sweep.load_sweep(os.path.join(ROOT, "configs", "sweeps", "paper_small.py:family"))
    every = sweep.load_sweep(os.path.join(ROOT, "configs", "sweeps", "paper_small.py"))
    assert list(family["members"]) == FAMILY
    assert all(family["members"][n] == every["members"][n] for n in FAMILY)
    quick = sweep.load_sweep(reproduce.sweep_file("quick"))
    assert quick["members"] == family["members"]
    assert os.path.samefile(quick["base"], os.path.join(ROOT, "configs", "small.py"))


def test_cli_passes_every_reproduce_option_through(monkeypatch, tmp_path, capsys):
    calls = {}
    monkeypatch.setattr(reproduce, "reproduce", lambda *a, **k: calls.setdefault("run", (a, k)))
    monkeypatch.setattr(reproduce, "update_readme",
                        lambda *a: calls.setdefault("readme", a))
    work = str(tmp_path / "r")
    assert cli.main(["reproduce", "--profile", "text", "--seed", "3", "--workdir", work,
                     "--update-readme", "--quiet", "--llc", "--config.train.steps=50"]) == 0
    args, kwargs = calls["run"]
    assert args == ("text", work, 3, {"train.steps": "50"})
    assert kwargs == {"progress": False, "llc": True}
    assert calls["readme"] == (work, os.path.join(ROOT, "README.md"),
                               os.path.join(ROOT, "docs", "results"))
    assert f"{work}/results.md" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_reproduction_runs_end_to_end_and_says_what_holds(tmp_path):
    overrides = {"model.d_model": "16", "model.n_heads": "2", "model.context": "32",
                 "model.vocab_size": "32", "train.steps": "6", "train.batch_size": "8",
                 "train.eval_every": "3", "eval.n_examples": "8", "eval.icl_early_index": "2",
                 "eval.icl_late_index": "20", "eval.probe_tokens": "7",
                 "eval.probe_sequences": "2", "data.segment_len_min": "3",
                 "data.segment_len_max": "8", "checkpoint.every": "2", "checkpoint.log_spaced": "0"}
    work = tmp_path / "r"
    out = reproduce.reproduce("quick", str(work), seed=1, overrides=overrides, progress=False)
    assert [c["claim"][:2] for c in out["claims"]] == ["1.", "2.", "3.", "4."]
    assert not any(c["holds"] for c in out["claims"][:1])  # six steps show no phase change
    text = (work / "results.md").read_text()
    assert "| 2l-smear |" in text and "Co-perturbation" in text
    assert json.loads((work / "2l" / "config.json").read_text())["seed"] == 1
    index = json.loads((work / "sweep.json").read_text())["members"]
    assert list(index) == FAMILY and all(m["status"] == "done" and m["wall_s"] > 0
                                         for m in index.values())
    assert (work / "family.png").stat().st_size > 1000
    page = (work / "report.html").read_text()
    assert page.count("id='claims-table'") == 1 and "Co-perturbation" in page
    # each member's six, the four multi-layer ones' composition; family, loss, PCA, smear pairs
    assert page.count("data:image/png;base64") == 6 * 6 + 4 + 4
    # a second run trains nothing and reads the same numbers from the same snapshots
    mtime = (work / "2l" / "metrics.jsonl").stat().st_mtime
    again = reproduce.reproduce("quick", str(work), seed=1, overrides=overrides, progress=False)
    assert (work / "2l" / "metrics.jsonl").stat().st_mtime == mtime
    assert again["rows"] == out["rows"] and again["claims"] == out["claims"]
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\nold\n")
    reproduce.update_readme(str(work), str(readme), str(tmp_path / "docs" / "results"))
    reproduce.update_readme(str(work), str(readme), str(tmp_path / "docs" / "results"))
    text = readme.read_text()
    assert text.count(reproduce.README_START) == 1 and "| 3l |" in text
    assert (tmp_path / "docs" / "results" / "pca.png").exists()


def test_text_cpu_is_the_setting_the_cpu_search_found():
    """configs/text_cpu.py must train what launch/text_search.py's b64 trial trained (the
    trial whose 2L formed an induction head), but for its own number of steps."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "text_search", os.path.join(ROOT, "launch", "text_search.py"))
    search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search)
    trial = next(t for t in search.TRIALS if t["name"] == "d128-c128-v2048-lr5e-3-ln-b64")
    searched = config_lib.flatten(search.trial_config(trial).to_dict())
    profile = config_lib.flatten(reproduce.member_configs("text-cpu", seed=0)["2l"].to_dict())
    differ = {k for k in set(searched) | set(profile) if searched.get(k) != profile.get(k)}
    # the same corpus too; measured on more examples (eval is not the run: MEASUREMENT)
    assert differ <= {"train.steps", "eval.n_examples"}, differ
