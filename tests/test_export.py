"""export: the .npz against an independent numpy forward pass, every layout (LayerNorm, MLP,
smeared keys), TransformerLens loading it, and the command line."""
import json

import jax
import numpy as np
import pytest

from icl_jax import cli, export
from icl_jax.model import init_params, make_model
from conftest import tiny_config


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


def test_export_matches_an_independent_numpy_forward(trained_2l, tmp_path):
    _, workdir = trained_2l
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


def test_hooked_transformer_loads_the_export(trained_2l, tmp_path):
    pytest.importorskip("transformer_lens")
    import torch
    from icl_jax import checkpoints
    from icl_jax import export as export_lib
    _, workdir = trained_2l
    path = export_lib.export_hooked_transformer(str(workdir), None, str(tmp_path / "m.pt"))
    model = export_lib.load_hooked_transformer(path)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 40))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).numpy()
    ours, _ = checkpoints.Run(str(workdir)).forward(tokens)
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)


def test_cli_export(trained_2l, tmp_path, capsys):
    _, workdir = trained_2l
    assert cli.main(["export", "--workdir", str(workdir), "--step", "10",
                     "--out", str(tmp_path / "m.npz")]) == 0
    with np.load(tmp_path / "m.npz") as f:
        assert json.loads(str(f["config"]))["step"] == 10
    assert cli.main(["export", "--workdir", str(workdir), "--step", "7",
                     "--out", str(tmp_path / "m.npz")]) == 2
    assert "no snapshot at step 7" in capsys.readouterr().err


def test_cli_export_user_mistakes(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.npz")]
    assert cli.main(["export", "--workdir", str(tmp_path)] + out) == 2
    assert "holds no run" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(tiny_config().to_json())  # a run not yet saved
    assert cli.main(["export", "--workdir", str(tmp_path)] + out) == 2
    assert "no snapshots" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_without_torch_the_transformer_lens_export_names_the_extra(trained_2l, tmp_path, capsys,
                                                                  monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch", None)  # as where torch is not installed
    _, workdir = trained_2l
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "m.npz"),
                     "--transformer-lens", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'icl_jax[tl]'" in err, err
    assert not (tmp_path / "m.pt").exists()
