import json

import numpy as np
import pytest

from icl_jax import config as config_lib, reproduce



def test_every_profile_builds_the_paper_family():
    for profile in reproduce.PROFILES:
        configs = reproduce.member_configs(profile)
        assert set(configs) == set(reproduce.FAMILY)
        assert configs["3l"].model.n_layers == 3 and configs["2l-mlp"].model.mlp
        assert configs["1l-smear"].model.smear_keys and not configs["1l"].model.smear_keys
    assert reproduce.member_configs("paper")["2l"].model.d_model == 768
    with pytest.raises(config_lib.ConfigError, match="profile"):
        reproduce.member_configs("huge")
    with pytest.raises(config_lib.ConfigError, match="train.steps"):
        reproduce.member_configs("quick", overrides={"train.steps": "0"})


def _metrics(losses):
    return [{"step": s, "eval_loss": l} for s, l in enumerate(losses)]


def test_loss_bump_is_a_faster_fall_inside_the_window():
    window = {"detected": True, "start_step": 400, "end_step": 600}
    steps = np.arange(1000)
    straight = 3 - steps * 1e-3
    bumped = straight - 0.5 * np.clip((steps - 400) / 200, 0, 1)
    assert reproduce.loss_bump(_metrics(straight), window) == pytest.approx(1.0, abs=0.05)
    assert reproduce.loss_bump(_metrics(bumped), window) > 1.5
    assert reproduce.loss_bump(_metrics(bumped), {"detected": False}) is None


@pytest.mark.slow
def test_quick_reproduction_runs_end_to_end_and_says_what_holds(tmp_path):
    overrides = {"model.d_model": "16", "model.n_heads": "2", "model.context": "32",
                 "model.vocab_size": "32", "train.steps": "6", "train.batch_size": "8",
                 "train.eval_every": "3", "eval.n_examples": "8", "eval.icl_early_index": "2",
                 "eval.icl_late_index": "20", "eval.probe_tokens": "7",
                 "eval.probe_sequences": "2", "data.segment_len_min": "3",
                 "data.segment_len_max": "8", "checkpoint.every": "2", "checkpoint.log_spaced": "0"}
    out = reproduce.reproduce("quick", str(tmp_path / "r"), seed=1, overrides=overrides,
                              progress=False)
    assert [c["claim"][:2] for c in out["claims"]] == ["1.", "2.", "3.", "4."]
    assert not any(c["holds"] for c in out["claims"][:1])  # six steps show no phase change
    text = (tmp_path / "r" / "results.md").read_text()
    assert "| 2l-smear |" in text and "Co-perturbation" in text
    assert json.loads((tmp_path / "r" / "2l" / "config.json").read_text())["seed"] == 1
    assert (tmp_path / "r" / "family.png").stat().st_size > 1000
    assert "The paper" in (tmp_path / "r" / "report.html").read_text()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\nold\n")
    reproduce.update_readme(str(tmp_path / "r"), str(readme), str(tmp_path / "docs" / "results"))
    reproduce.update_readme(str(tmp_path / "r"), str(readme), str(tmp_path / "docs" / "results"))
    text = readme.read_text()
    assert text.count(reproduce.README_START) == 1 and "| 3l |" in text
    assert (tmp_path / "docs" / "results" / "pca.png").exists()


def test_cli_knows_the_reproduce_options():
    from icl_jax.cli import build_parser
    args = build_parser().parse_args(["reproduce", "--profile", "text", "--seed", "3",
                                      "--update-readme"])
    assert (args.profile, args.seed, args.update_readme) == ("text", 3, True)
