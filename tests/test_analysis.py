"""analyze() and export() on a tiny trained run; the README's notebook example, executed."""
import json
import math
import os
import pathlib
import re

import jax
import numpy as np
import pytest

from icl_jax import analysis, cli, config as config_lib, export, train
from icl_jax.model import init_params, make_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    config = config_lib.load(str(ROOT / "configs" / "small.py") + ":layers=2")
    config.train.steps = 20
    config.model.d_model = 32
    config.eval.n_examples = 16
    config.checkpoint.every = 10
    config.checkpoint.log_spaced = 3
    config.train.eval_every = 10
    config_lib.validate(config)
    workdir = root / "runs" / "2l"
    train.train_and_evaluate(config, str(workdir), progress=False)
    return root, workdir


def test_analyze_writes_scores_figures_report(tiny_run, tmp_path):
    root, workdir = tiny_run
    result = analysis.analyze([str(workdir)], out=str(tmp_path), chunk=4, progress=False)
    saved = json.loads((tmp_path / "scores.json").read_text())
    run = result["runs"]["2l"]
    assert saved["steps"] == run["steps"] == sorted(run["steps"])
    n, L, H = len(run["steps"]), 2, 4
    assert n > 4 and n % 4  # several chunks, the last one padded
    assert np.asarray(saved["loss_by_position"]).shape == (n, 64)
    for key in ("prefix_matching", "previous_token", "copying", "copying_empirical",
                "ablation_icl"):
        assert np.asarray(saved[key]).shape == (n, L, H), key
    assert np.asarray(saved["composition"]["k"]).shape == (n, L, H, L, H)
    assert set(saved["phase_change"]) >= {"detected", "start_step", "end_step", "start_tokens",
                                          "end_tokens", "icl_before", "icl_after"}
    assert isinstance(saved["induction_heads"], list)
    # the trainer's own ICL scores, from the same eval set, agree with the analysis
    metrics = {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl"))
               if "icl_score" in r}
    for step, icl in zip(run["steps"], run["icl_score"]):
        if step in metrics:
            assert math.isclose(icl, metrics[step]["icl_score"], abs_tol=1e-3)
    for name in ("icl", "loss_heatmap", "head_scores", "copying_vs_prefix", "ablation",
                 "attention"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    page = (tmp_path / "report.html").read_text()
    assert "<table>" in page and page.count("data:image/png;base64") == 7
    assert (tmp_path / "pca.png").exists()


def test_notebook_example_in_docs_runs(tiny_run, monkeypatch):
    root, _ = tiny_run
    text = (ROOT / "README.md").read_text()
    code = re.search(r"### In a notebook.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(root)  # the example reads runs/2l
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"]["runs"]["2l"]["steps"][-1] == 20
    assert namespace["pm"].shape == (3, 2, 4)
    assert namespace["fig"].axes
    assert (root / "runs" / "2l" / "analysis" / "report.html").exists()


def test_analyze_several_runs_share_one_pca(tiny_run, tmp_path):
    _, workdir = tiny_run
    result = analysis.analyze([str(workdir), str(workdir)], out=str(tmp_path), chunk=4,
                              progress=False, figures=False)
    assert set(result["runs"]) == {"2l", "2l_2"}
    assert (tmp_path / "2l" / "scores.json").exists() and (tmp_path / "2l_2" / "scores.json").exists()
    traj = json.loads((tmp_path / "pca.json").read_text())["trajectories"]
    np.testing.assert_allclose(traj["2l"]["points"], traj["2l_2"]["points"], atol=1e-6)


def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * w + b


def _gelu(x):  # tanh approximation, as jax.nn.gelu
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def numpy_forward(a, cfg, tokens):
    """Logits from exported arrays alone: an independent implementation of the model."""
    T = tokens.shape[1]
    x = a["W_E"][tokens].astype(np.float64)
    pos = a["W_pos"][:T]
    if cfg["positions"] == "residual":
        x = x + pos
    for l in range(cfg["n_layers"]):
        h = _layer_norm(x, a["ln1_w"][l], a["ln1_b"][l]) if "ln1_w" in a else x
        qk_in = h + pos if cfg["positions"] == "shortformer" else h
        q = np.einsum("btd,hdk->bhtk", qk_in, a["W_Q"][l]) + a["b_Q"][l][:, None]
        k = np.einsum("btd,hdk->bhtk", qk_in, a["W_K"][l]) + a["b_K"][l][:, None]
        v = np.einsum("btd,hdk->bhtk", h, a["W_V"][l]) + a["b_V"][l][:, None]
        if "smear" in a:
            s = 1 / (1 + np.exp(-a["smear"][l]))[None, :, None, None]
            k_prev = np.concatenate([k[:, :, :1], k[:, :, :-1]], 2)
            k = np.concatenate([k[:, :, :1], (s * k + (1 - s) * k_prev)[:, :, 1:]], 2)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("bhtk,hkd->btd", att @ v, a["W_O"][l]) + a["b_O"][l]
        if "W_in" in a:
            m = _layer_norm(x, a["ln2_w"][l], a["ln2_b"][l]) if "ln2_w" in a else x
            x = x + _gelu(m @ a["W_in"][l] + a["b_in"][l]) @ a["W_out"][l] + a["b_out"][l]
    if "ln_final_w" in a:
        x = _layer_norm(x, a["ln_final_w"], a["ln_final_b"])
    return x @ a["W_U"] + a["b_U"]


def test_export_matches_an_independent_numpy_forward(tiny_run, tmp_path):
    _, workdir = tiny_run
    path = export.export(str(workdir), step=10, out=str(tmp_path / "m.npz"))
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    cfg = json.loads(str(arrays.pop("config")))
    assert cfg["step"] == 10 and arrays["W_Q"].shape == (2, 4, 32, 8)
    assert arrays["W_O"].shape == (2, 4, 8, 32) and arrays["b_O"].shape == (2, 32)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 64)).astype(np.int32)
    from icl_jax.checkpoints import Run
    want, _ = Run(str(workdir)).forward(tokens, step=10)
    np.testing.assert_allclose(numpy_forward(arrays, cfg["model"], tokens), want,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions", ["shortformer", "residual"])
def test_export_layout_with_layer_norm_mlp_and_smear(positions):
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, mlp=True, d_mlp=32, layer_norm=True,
               positions=positions, pos_init_std=1.0, smear_keys=True, smear_init=0.3,
               context=12, vocab_size=10, dtype="float32")
    model = make_model(cfg)
    params = init_params(model, jax.random.key(3))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape), params)
    arrays = export.params_to_arrays(params, cfg)
    assert arrays["smear"].shape == (2, 2) and arrays["W_in"].shape == (2, 16, 32)
    tokens = np.random.default_rng(1).integers(0, 10, (2, 12)).astype(np.int32)
    want, _ = jax.jit(model.apply)({"params": params}, tokens)
    np.testing.assert_allclose(numpy_forward(arrays, cfg, tokens), want, rtol=1e-3, atol=1e-3)


def test_hooked_transformer_loads_the_export(tiny_run, tmp_path):
    pytest.importorskip("transformer_lens")
    import torch
    from icl_jax import checkpoints
    from icl_jax import export as export_lib
    _, workdir = tiny_run
    path = export_lib.export_hooked_transformer(str(workdir), None, str(tmp_path / "m.pt"))
    model = export_lib.load_hooked_transformer(path)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 40))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).numpy()
    ours, _ = checkpoints.Run(str(workdir)).forward(tokens)
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)


def test_cli_user_mistakes(tmp_path, capsys):
    assert cli.main(["analyze", "--workdir", str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err
    (tmp_path / "config.json").write_text((ROOT / "configs" / "small.py").read_text() and "{}")
    assert cli.main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x.npz")]) == 2
    assert "no snapshots" in capsys.readouterr().err


def test_cli_export_and_analyze(tiny_run, tmp_path, capsys):
    _, workdir = tiny_run
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "m.npz")]) == 0
    assert (tmp_path / "m.npz").exists()
    assert cli.main(["export", "--workdir", str(workdir), "--step", "7",
                     "--out", str(tmp_path / "m.npz")]) == 2
    assert "no snapshot at step 7" in capsys.readouterr().err
    assert cli.main(["analyze", "--workdir", str(workdir), "--out", str(tmp_path / "a"),
                     "--chunk", "4", "--quiet"]) == 0
    assert "phase change" in capsys.readouterr().out


def test_scorer_stackings_agree_with_the_score_functions():
    """The analysis scorer shares one clean run between scores; each score must equal the
    stand-alone function in scores.py, and vmap, lax.map and one-at-a-time must agree."""
    from icl_jax import scores
    cfg = {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_head": 8, "mlp": True, "d_mlp": 32,
           "layer_norm": True, "positions": "shortformer", "pos_init_std": 1.0,
           "smear_keys": False, "smear_init": 0.0, "context": 12, "vocab_size": 10,
           "dtype": "float32"}
    model = make_model(cfg)
    trees = [init_params(model, jax.random.key(s)) for s in range(3)]
    stacked = jax.tree.map(lambda *a: np.stack(a), *trees)
    rng = np.random.default_rng(0)
    eval_BT1 = rng.integers(0, 10, (4, 13)).astype(np.int32)
    probe = np.concatenate([np.zeros((3, 1), np.int32),
                            np.tile(rng.integers(1, 10, (3, 3)), 3).astype(np.int32)], 1)
    idx = scores.pca_token_indices(4, 12, 0)
    key = (json.dumps(cfg, sort_keys=True), 2, 9, 3, "pattern")
    single = analysis._scorer(*key, None)
    stacks = {s: analysis._scorer(*key, s)(stacked, eval_BT1, probe, idx)
              for s in analysis.STACKING}
    for i, p in enumerate(trees):
        want = {
            "icl_score": scores.icl_score(model, p, eval_BT1, 2, 9),
            "per_token_loss": scores.per_token_losses(model, p, eval_BT1, idx),
            "prefix_matching": scores.prefix_matching(model, p, probe, 3),
            "previous_token": scores.previous_token(model, p, eval_BT1[:, :-1]),
            "copying_empirical": scores.copying_empirical(model, p, probe, 3),
            "ablation_icl": scores.head_ablation_icl(model, p, eval_BT1, 2, 9, "pattern"),
        }
        got_single = single(p, eval_BT1, probe, idx)
        for name, w in want.items():
            np.testing.assert_allclose(got_single[name], w, atol=1e-5, err_msg=name)
            for s, out in stacks.items():
                np.testing.assert_allclose(out[name][i], w, atol=1e-5, err_msg=f"{name} {s}")
    with pytest.raises(ValueError, match="stacking"):
        analysis._scorer(*key, "pmap")
