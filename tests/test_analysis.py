"""analyze() on a tiny trained run: scores.json, the shared PCA, the kept last snapshot, the
figures and the page; the stackings of the scorer; the docs' notebook example, executed."""
import json
import math
import pathlib
import re

import jax
import numpy as np
import pytest

from icl_jax import analysis, checkpoints, cli, report, scores
from icl_jax.model import init_params, make_model
from conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _count_restores(monkeypatch):
    """{step: times restored} of every snapshot analyze restores, and a list of the runs opened."""
    restored, opened = {}, []
    params, init = checkpoints.Run.params, checkpoints.Run.__init__

    def counting_params(self, step=None):
        restored[step] = restored.get(step, 0) + 1
        return params(self, step)

    def counting_init(self, workdir):
        opened.append(workdir)
        init(self, workdir)

    monkeypatch.setattr(checkpoints.Run, "params", counting_params)
    monkeypatch.setattr(checkpoints.Run, "__init__", counting_init)
    return restored, opened


def test_analyze_writes_scores_figures_report(trained_2l, tmp_path, monkeypatch):
    root, workdir = trained_2l
    restored, opened = _count_restores(monkeypatch)
    result = analysis.analyze([str(workdir)], out=str(tmp_path), chunk=4, progress=False)
    report.write_report(result, progress=False)
    saved = json.loads((tmp_path / "scores.json").read_text())
    run = result["runs"]["2l"]
    assert saved["steps"] == run["steps"] == sorted(run["steps"])
    n, L, H = len(run["steps"]), 2, 4
    assert n > 4 and n % 4  # several chunks, the last one padded
    # the run is opened once and every snapshot restored once, the figures included
    assert opened == [str(workdir)] and restored == {s: 1 for s in run["steps"]}
    assert np.asarray(saved["loss_by_position"]).shape == (n, 64)
    for key in ("prefix_matching", "previous_token", "copying", "copying_empirical",
                "ablation_icl"):
        assert np.asarray(saved[key]).shape == (n, L, H), key
    assert np.asarray(saved["composition"]["k"]).shape == (n, L, H, L, H)
    assert set(saved["phase_change"]) >= {"detected", "start_step", "end_step", "start_tokens",
                                          "end_tokens", "icl_before", "icl_after"}
    t = saved["thresholds"]
    assert saved["induction_heads"] == analysis.induction_heads(
        saved["prefix_matching"][-1], saved["copying"][-1], t["prefix_matching"], t["copying"])
    # the trainer's own ICL scores, from the same eval set, agree with the analysis
    metrics = {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl"))
               if "icl_score" in r}
    assert set(metrics) & set(run["steps"])
    for step, icl in zip(run["steps"], run["icl_score"]):
        if step in metrics:
            assert math.isclose(icl, metrics[step]["icl_score"], abs_tol=1e-3)
    for name in ("icl", "loss_heatmap", "head_scores", "copying_vs_prefix", "ablation",
                 "attention"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    page = (tmp_path / "report.html").read_text()
    # one run: the loss curves, its seven figures and the PCA (report.py; tests/test_report.py)
    assert "<table" in page and page.count("data:image/png;base64") == 9
    assert (tmp_path / "pca.png").exists()


def test_the_kept_last_snapshot_is_the_runs_newest(trained_2l):
    """The attention the report draws and the params the claims ablate are those of the
    newest snapshot, as a fresh Run computes them."""
    _, workdir = trained_2l
    result = analysis.analyze([str(workdir)], out=None, chunk=16, progress=False)
    last = result["last"]["2l"]
    run = checkpoints.Run(str(workdir))
    assert last.step == run.steps[-1] == 20
    jax.tree.map(np.testing.assert_array_equal, last.params, run.params(20))
    _, attention_BLHTS = run.forward(last.inputs["probe_BT"][:1], step=20)
    np.testing.assert_allclose(last.probe_attention_LHTS, attention_BLHTS[0], atol=1e-6)


def test_analyze_reuses_scores_saved_under_the_same_settings(trained_2l, tmp_path, monkeypatch):
    """A second analyze of an unchanged run reads its scores.json back instead of scoring
    again, and gives what scoring gives; another ablation, other scoring code or --rescore
    score again."""
    _, workdir = trained_2l
    first = analysis.analyze([str(workdir)], out=str(tmp_path), chunk=4, progress=False)
    calls = []
    score_run = analysis.score_run
    monkeypatch.setattr(analysis, "score_run", lambda *a, **k: calls.append(1) or score_run(*a, **k))

    again = analysis.analyze([str(workdir)], out=str(tmp_path), chunk=4, progress=False)
    assert calls == []
    assert json.dumps(again["runs"]) == json.dumps(first["runs"])
    assert again["pca"] == first["pca"]
    a, b = first["last"]["2l"], again["last"]["2l"]
    assert a.step == b.step
    np.testing.assert_allclose(b.probe_attention_LHTS, a.probe_attention_LHTS, atol=1e-6)
    report.write_report(again, progress=False)  # the figures need nothing more

    analysis.analyze([str(workdir)], out=str(tmp_path), chunk=4, progress=False, ablation="zero")
    assert len(calls) == 1
    monkeypatch.setattr(analysis, "code_digest", lambda modules=None: "edited scores.py")
    analysis.analyze([str(workdir)], out=str(tmp_path), chunk=4, progress=False, ablation="zero")
    assert len(calls) == 2
    analysis.analyze([str(workdir)], out=str(tmp_path), chunk=4, progress=False, ablation="zero",
                     rescore=True)
    assert len(calls) == 3


def test_analyze_measures_with_overridden_eval_fields_only(trained_2l, tmp_path, capsys):
    """--config.eval.n_examples scores a finished run on more examples than it was trained
    with (its saved config untouched); a field that would change the run is refused first."""
    from icl_jax import config as config_lib, workdir as workdir_lib
    _, workdir = trained_2l
    saved = workdir_lib.read_config_dict(str(workdir))
    result = analysis.analyze([str(workdir)], out=str(tmp_path), chunk=8, progress=False,
                              measure={"eval.n_examples": 24})
    run = result["runs"]["2l"]
    assert saved["eval"]["n_examples"] != 24
    assert np.asarray(run["icl_by_example"]).shape == (len(run["steps"]), 24)
    assert workdir_lib.read_config_dict(str(workdir)) == saved
    with pytest.raises(config_lib.ConfigError, match="model.d_model.*another run"):
        analysis.analyze([str(workdir)], out=str(tmp_path), measure={"model.d_model": 16})
    assert cli.main(["analyze", "--workdir", str(workdir), "--out", str(tmp_path / "x"),
                     "--config.train.lr=1e-3"]) == 2
    assert "train.lr" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_notebook_example_in_docs_runs(trained_2l, monkeypatch):
    root, _ = trained_2l
    text = (ROOT / "docs" / "getting-started.md").read_text()
    code = re.search(r"### In a notebook.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(root)  # the example reads runs/2l
    namespace = {}
    exec(compile(code, "docs/getting-started.md", "exec"), namespace)
    assert namespace["result"]["runs"]["2l"]["steps"][-1] == 20
    assert namespace["pm"].shape == (3, 2, 4)
    assert namespace["fig"].axes
    assert (root / "runs" / "2l" / "analysis" / "report.html").exists()


def test_analyze_several_runs_share_one_pca(trained_2l, tmp_path):
    _, workdir = trained_2l
    result = analysis.analyze([str(workdir), str(workdir)], out=str(tmp_path), chunk=4,
                              progress=False)
    assert set(result["runs"]) == {"2l", "2l_2"}
    assert (tmp_path / "2l" / "scores.json").exists() and (tmp_path / "2l_2" / "scores.json").exists()
    assert not (tmp_path / "report.html").exists()
    traj = json.loads((tmp_path / "pca.json").read_text())["trajectories"]
    assert len(traj["2l"]["points"]) == len(result["runs"]["2l"]["steps"])
    np.testing.assert_allclose(traj["2l"]["points"], traj["2l_2"]["points"], atol=1e-6)


def test_induction_heads_are_the_heads_above_both_thresholds():
    pm = np.array([[0.1, 0.8, 0.5], [0.9, 0.3, 0.7]])
    cp = np.array([[0.9, 0.9, -0.2], [0.4, 0.9, 0.6]])
    assert analysis.induction_heads(pm, cp, 0.4, 0.5) == [[0, 1], [1, 2]]
    assert analysis.induction_heads(pm, cp, 0.95, 0.0) == []


def test_stackings_agree_with_one_snapshot_at_a_time():
    c = tiny_config("layers=2,mlp=true")
    model = make_model(c.model)
    trees = [init_params(model, jax.random.key(s)) for s in range(3)]
    stacked = jax.tree.map(lambda *a: np.stack(a), *trees)
    from icl_jax import data as data_lib
    inputs = scores.evaluation_inputs(c, data_lib.make_source(c))
    key = (c.eval.icl_early_index, c.eval.icl_late_index, c.eval.probe_tokens, "pattern")
    single = analysis.scorer(model, *key, None)
    stacks = {s: analysis.scorer(model, *key, s)(stacked, inputs) for s in scores.STACKING}
    for i, p in enumerate(trees):
        one = single(p, inputs)
        for s, out in stacks.items():
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, atol=1e-5,
                                                                 err_msg=s), out, one)
    assert not np.allclose(stacks["map"]["icl_score"][0], stacks["map"]["icl_score"][1])
    with pytest.raises(ValueError, match="stacking"):
        analysis.scorer(model, *key, "pmap")


def test_cli_user_mistakes(tmp_path, capsys):
    assert cli.main(["analyze", "--workdir", str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(tiny_config().to_json())
    assert cli.main(["analyze", "--workdir", str(tmp_path)]) == 2
    assert "no snapshots" in capsys.readouterr().err


def test_cli_analyze(trained_2l, tmp_path, capsys):
    _, workdir = trained_2l
    assert cli.main(["analyze", "--workdir", str(workdir), "--out", str(tmp_path / "a"),
                     "--chunk", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2l: ICL" in out and "phase change" in out
    assert (tmp_path / "a" / "report.html").exists()


def test_chunks_shrink_to_fit_device_memory(trained_2l, monkeypatch, capsys):
    """A GPU ran out of memory scoring 16 snapshots of Hoogland et al.'s text shape at once
    (156 GiB asked for). Where the device says how much it holds, a vmapped chunk is cut to
    fit; where the estimate is wrong and it still runs out, the chunk is halved and scored
    again. Either way every snapshot gets the same scores as in one big chunk."""
    _, workdir = trained_2l
    run = checkpoints.Run(str(workdir))
    assert len(run.steps) == 6
    whole, _ = analysis.score_run(run, chunk=8, progress=False, stacking="vmap")

    # the estimate: at the text shape a snapshot needs tens of GB, so 16 do not fit an H200
    text = tiny_config("layers=2")
    text.model.context, text.model.vocab_size, text.eval.n_examples = 1024, 5000, 512
    h200 = 143 * 2**30
    assert 20e9 < analysis.snapshot_bytes(text) < 80e9
    assert 1 <= analysis.fitting_chunk(16, text, "vmap", h200) <= 2
    assert analysis.fitting_chunk(16, text, "map", h200) == 16  # one at a time inside
    assert analysis.fitting_chunk(16, text, "vmap", None) == 16  # CPUs do not say
    per_snapshot = analysis.snapshot_bytes(run.config)
    monkeypatch.setattr(analysis, "device_memory", lambda: 2 * 2 * per_snapshot)
    fitted, _ = analysis.score_run(run, chunk=8, progress=True, stacking="vmap")
    assert "2 snapshots a call, not 8" in capsys.readouterr().err

    # the fallback: the device refuses any call of more than 2 snapshots
    monkeypatch.setattr(analysis, "device_memory", lambda: None)
    real, calls = analysis.scorer, []

    def refusing(*args, **kwargs):
        score = real(*args, **kwargs)

        def limited(params, inputs):
            calls.append(len(jax.tree.leaves(params)[0]))
            if calls[-1] > 2:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while "
                                                 "trying to allocate 156.27GiB")
            return score(params, inputs)
        return limited

    monkeypatch.setattr(analysis, "scorer", refusing)
    halved, _ = analysis.score_run(run, chunk=8, progress=False, stacking="vmap")
    assert calls == [8, 4, 2, 2, 2]
    assert "2 snapshots a call from now on" in capsys.readouterr().err
    for other in (fitted, halved):  # each snapshot scored once, in order
        np.testing.assert_array_equal(other["steps"], whole["steps"])
        for key in ("icl_score", "prefix_matching", "ablation_icl", "loss_by_position"):
            np.testing.assert_allclose(other[key], whole[key], atol=1e-5, err_msg=key)

    # an error that is not about memory is not swallowed
    def broken(params, inputs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")
    monkeypatch.setattr(analysis, "scorer", lambda *args, **kwargs: broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        analysis.score_run(run, chunk=8, progress=False, stacking="vmap")
