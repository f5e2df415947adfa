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
    family = sweep.load_sweep("paper_small:family")
    every = sweep.load_sweep("paper_small")
    assert list(family["members"]) == FAMILY
    assert all(family["members"][n] == every["members"][n] for n in FAMILY)
    quick = sweep.load_sweep(reproduce.sweep_file("quick"))
    assert quick["members"] == family["members"]
    assert quick["base"] == "small"


def test_cli_passes_every_reproduce_option_through(monkeypatch, tmp_path, capsys):
    calls = {}
    monkeypatch.setattr(reproduce, "reproduce", lambda *a, **k: calls.setdefault("run", (a, k)))
    work = str(tmp_path / "r")
    assert cli.main(["reproduce", "--profile", "text", "--seed", "3", "--workdir", work,
                     "--quiet", "--llc", "--jobs", "3", "--config.train.steps=50"]) == 0
    args, kwargs = calls["run"]
    assert args == ("text", work, 3, {"train.steps": "50"})
    assert kwargs == {"progress": False, "llc": True, "jobs": 3}
    assert f"{work}/results.md" in capsys.readouterr().out
    assert cli.main(["reproduce", "--workdir", work, "--jobs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --jobs must be at least 1, got 0"


def test_a_cpu_trains_one_member_per_core_and_an_accelerator_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert reproduce.training_jobs("cpu", 6) == 2
    assert reproduce.training_jobs("cpu", 1) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert reproduce.training_jobs("cpu", 6) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert reproduce.training_jobs("cpu", 6) == 6
    assert reproduce.training_jobs("gpu", 6) == reproduce.training_jobs("tpu", 6) == 1


def _launch_module(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_cpu_is_the_setting_the_cpu_search_found():
    """The text_cpu config must train what launch/text_search.py's b64 trial trained (the
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


def test_parse_seeds():
    assert reproduce.parse_seeds("0-9") == list(range(10))
    assert reproduce.parse_seeds("0-2,7,5") == [0, 1, 2, 5, 7]
    for bad in ("", "a", "3-1", "-2", "1-"):
        with pytest.raises(config_lib.ConfigError, match="--seeds"):
            reproduce.parse_seeds(bad)


def test_cli_reproduce_seeds(monkeypatch, tmp_path, capsys):
    calls = {}
    monkeypatch.setattr(reproduce, "reproduce_seeds",
                        lambda *a, **k: calls.setdefault("run", (a, k)))
    work = str(tmp_path / "s")
    assert cli.main(["reproduce", "--seeds", "0-2", "--workdir", work, "--quiet"]) == 0
    assert calls["run"][0] == ("quick", work, [0, 1, 2], {})
    assert cli.main(["reproduce", "--seeds", "x", "--workdir", work]) == 2
    assert "--seeds" in capsys.readouterr().err


@pytest.mark.slow
def test_the_quick_reproduction_of_two_seeds_says_what_holds_and_reruns_for_free(tmp_path):
    """The whole path, small: two seeds, each member's two seeds trained as one vmapped
    ensemble (what an accelerator does; vmapped on this CPU too), then each seed reproduced
    (training skipped: finished; analysis, claims, results.md, report) and the robustness
    table written: every claim counted on both seeds. Then one seed again: it trains
    nothing, reads the same numbers and draws no figure; and the docs' results page from it.
    (Members trained in processes of their own, as `reproduce` does on a CPU with two or
    more cores: tests/test_sweep.py.)"""
    overrides = {"model.d_model": "16", "model.n_heads": "2", "model.context": "32",
                 "model.vocab_size": "32", "train.steps": "4", "train.batch_size": "8",
                 "train.eval_every": "2", "eval.n_examples": "8", "eval.icl_early_index": "2",
                 "eval.icl_late_index": "20", "eval.probe_tokens": "7",
                 "eval.probe_sequences": "2", "data.segment_len_min": "3",
                 "data.segment_len_max": "8", "checkpoint.every": "2", "checkpoint.log_spaced": "0"}
    work = tmp_path / "seeds"
    out = reproduce.reproduce_seeds("quick", str(work), [3, 4], overrides, progress=False,
                                    ensemble=True)
    for seed in (3, 4):
        assert json.loads((work / f"s{seed}" / "2l" / "config.json").read_text())["seed"] == seed
        assert (work / f"s{seed}" / "report.html").exists()
        assert [c["claim"][:2] for c in out["claims"][seed]] == ["1.", "2.", "3.", "4."]
        assert not out["claims"][seed][0]["holds"]  # four steps show no phase change
    rob = out["robustness"]
    for table in rob["claims"].values():
        assert sorted(sum((table[k] for k in table), [])) == [3, 4]
    text = (work / "results.md").read_text()
    assert "| 1. Co-occurrence |" in text and "| 4 |" in text
    page = (work / "report.html").read_text()
    assert ("href='s3/report.html'" in page or 'href="s3/report.html"' in page) and "Co-occurrence" in page
    assert json.loads((work / "claims.json").read_text())["robustness"]["seeds"]["3"]

    # one seed's reproduction, as `icl-jax reproduce --seed 3` leaves it
    s3 = work / "s3"
    text = (s3 / "results.md").read_text()
    assert "| 2l-smear |" in text and "Co-perturbation" in text
    index = json.loads((s3 / "sweep.json").read_text())["members"]
    assert list(index) == FAMILY and all(m["status"] == "done" for m in index.values())
    assert (s3 / "family.png").stat().st_size > 1000
    page = (s3 / "report.html").read_text()
    assert page.count("id='claims-table'") == 1 and "Co-perturbation" in page
    # each member's six, the four multi-layer ones' composition; family, loss, PCA, smear pairs
    assert page.count("data:image/png;base64") == 6 * 6 + 4 + 4
    # again: trains nothing, reads the same numbers from the same snapshots, draws nothing
    mtime = (s3 / "2l" / "metrics.jsonl").stat().st_mtime
    pngs = {p: p.stat().st_mtime_ns for p in s3.rglob("*.png")}
    again = reproduce.reproduce("quick", str(s3), seed=3, overrides=overrides, progress=False)
    assert (s3 / "2l" / "metrics.jsonl").stat().st_mtime == mtime
    assert again["claims"] == out["claims"][3]
    assert {p: p.stat().st_mtime_ns for p in s3.rglob("*.png")} == pngs
    assert (s3 / "report.html").read_text().count("data:image/png;base64") == 6 * 6 + 4 + 4
    # the docs' results page, regenerated from the run by launch/publish_results.py
    publish = _launch_module("publish_results")
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# Results\n\nprose kept\n\n" + publish.START + "\nSTALE BLOCK\n" + publish.END + "\n")
    for _ in range(2):
        publish.publish(str(s3), str(page))
    text = page.read_text()
    assert text.count(publish.START) == 1 and "| 3l |" in text and "STALE BLOCK" not in text
    assert "prose kept" in text and "](results/family.png)" in text
    assert (tmp_path / "docs" / "results" / "pca.png").exists()
