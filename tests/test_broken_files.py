"""Every file a user can break gives one line naming the file and what is wrong, exit 2, no
traceback: config.json (cut short, or a field of the wrong type), metrics.jsonl, scores.json,
a config or sweep file with a syntax error. (A damaged snapshot: test_robust.py.)"""
import json
import os
import shutil

import pytest

from icl_jax import cli
from conftest import tiny_config

FAMILY_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "early_family.json")


def _one_error_line(capsys, *names):
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in err, err
    return err


@pytest.fixture
def run_copy(trained_2l, tmp_path):
    """A copy of the shared trained run, to break."""
    _, workdir = trained_2l
    work = tmp_path / "2l"
    shutil.copytree(workdir, work, ignore=shutil.ignore_patterns("analysis"))
    return work


@pytest.mark.parametrize("command", ["train", "analyze", "export"])
def test_a_config_json_cut_short_is_named(run_copy, tmp_path, capsys, command):
    path = run_copy / "config.json"
    path.write_text(path.read_text()[:200])
    args = {"train": ["train", "--workdir", str(run_copy), "--quiet"],
            "analyze": ["analyze", "--workdir", str(run_copy), "--quiet"],
            "export": ["export", "--workdir", str(run_copy), "--out", str(tmp_path / "m.npz")]}
    assert cli.main(args[command]) == 2
    _one_error_line(capsys, str(path), "not valid JSON")


@pytest.mark.parametrize("command", ["analyze", "export"])
def test_a_config_json_field_of_the_wrong_type_is_named(run_copy, tmp_path, capsys, command):
    path = run_copy / "config.json"
    saved = json.loads(path.read_text())
    saved["model"]["n_layers"] = "two"
    path.write_text(json.dumps(saved))
    args = {"analyze": ["analyze", "--workdir", str(run_copy), "--quiet"],
            "export": ["export", "--workdir", str(run_copy), "--out", str(tmp_path / "m.npz")]}
    assert cli.main(args[command]) == 2
    _one_error_line(capsys, str(path), "'model.n_layers' must be int, got 'two'")


def test_a_config_json_edited_into_nonsense_stops_train(run_copy, capsys):
    path = run_copy / "config.json"
    path.write_text("[1, 2]")
    assert cli.main(["train", "--workdir", str(run_copy), "--quiet"]) == 2
    _one_error_line(capsys, str(path), "not an object")


def _saved_analysis(tmp_path, damage_metrics=False):
    """<tmp>/analysis/2l/scores.json and the run folder <tmp>/2l beside it, from the scores of
    a real run (tests/data/early_family.json). With damage_metrics the scores.json is one
    saved before it held the held-out loss, so claims reads the run folder's metrics.jsonl,
    whose third line is cut short."""
    with open(FAMILY_FIXTURE) as f:
        fixture = json.load(f)
    run = dict(fixture["runs"]["2l"], name="2l")
    eval_loss = run.pop("eval_loss") if damage_metrics else run["eval_loss"]
    scores = tmp_path / "analysis" / "2l" / "scores.json"
    scores.parent.mkdir(parents=True)
    scores.write_text(json.dumps(run))
    home = tmp_path / "2l"
    home.mkdir()
    (home / "config.json").write_text(tiny_config("layers=2").to_json())
    lines = [json.dumps({"step": s, "eval_loss": v}) + "\n"
             for s, v in zip(eval_loss["steps"], eval_loss["loss"])]
    if damage_metrics:
        lines.insert(2, '{"step": 100, "eval_lo\n')
    (home / "metrics.jsonl").write_text("".join(lines))
    return scores, home / "metrics.jsonl"


def test_claims_names_a_damaged_scores_json(tmp_path, capsys):
    scores, _ = _saved_analysis(tmp_path)
    scores.write_text(scores.read_text()[:-300])
    assert cli.main(["claims", "--scores", str(tmp_path / "analysis")]) == 2
    _one_error_line(capsys, str(scores), "not valid JSON")


def test_claims_names_a_damaged_metrics_line(tmp_path, capsys):
    _, metrics = _saved_analysis(tmp_path, damage_metrics=True)
    assert cli.main(["claims", "--scores", str(tmp_path / "analysis")]) == 2
    _one_error_line(capsys, str(metrics), "line 3 is not a metrics record")


def test_a_config_file_with_a_syntax_error_is_named(tmp_path, capsys):
    bad = tmp_path / "mine.py"
    bad.write_text("def get_config(arg=None):\n    return {\n")
    assert cli.main(["train", "--config", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    _one_error_line(capsys, str(bad), "failed to load")
    assert not (tmp_path / "w").exists()


def test_a_sweep_file_with_a_syntax_error_is_named(tmp_path, capsys):
    bad = tmp_path / "my_sweep.py"
    bad.write_text("def get_sweep(arg=None)\n    return {}\n")
    assert cli.main(["sweep", "--config", str(bad), "--workdir", str(tmp_path / "s")]) == 2
    _one_error_line(capsys, str(bad), "failed to load")


def test_a_damaged_sweep_json_is_written_again_from_the_members(tmp_path, capsys):
    """sweep.json is an index of the members' folders: a damaged one is said and rebuilt."""
    sweep_file = tmp_path / "my_sweep.py"
    base = "small:layers=1"
    sweep_file.write_text(f"def get_sweep(arg=None):\n    return {{'base': {base!r}, "
                          "'members': {'a': {'overrides': {'seed': 1}}}}\n")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text('{"members": {"a": {"sta')
    from icl_jax import sweep
    index = sweep.Index(str(tmp_path / "s"), str(sweep_file),
                        sweep.resolve(str(sweep_file), str(tmp_path / "s")))
    index.write()
    assert "sweep.json is damaged; written again" in capsys.readouterr().err
    saved = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert saved["members"]["a"]["status"] == "pending"
