"""icl-jax bench: its FLOP count, its PyTorch reference and its command line (no timings)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_jax import bench, bench_torch, cli, train
from icl_jax.model import init_params, make_model
from conftest import SMALL, tiny_config

TINY = ["--config.model.d_model=32", "--config.model.n_heads=2", "--config.model.context=64",
        "--config.model.vocab_size=32", "--config.train.batch_size=8"]


def test_analytic_flops_agree_with_xla_cost_analysis():
    cfg = tiny_config("layers=2", **{"model.d_model": 128, "model.n_heads": 4,
                                     "model.context": 160, "model.vocab_size": 64})
    model, t = make_model(cfg.model), cfg.train
    tx = train.make_optimizer(t)
    mesh = train.make_mesh(jax.devices()[:1])
    state = train.init_state(model, tx, 0, t)
    batch = jnp.zeros((t.batch_size, cfg.model.context + 1), jnp.int32)
    compiled = train.make_train_step(model, tx, mesh, t).lower(state, batch).compile()
    xla = bench.xla_flops(compiled)
    if xla is None:
        pytest.skip("this backend gives no cost analysis")
    analytic = bench.train_flops(cfg.model, t.batch_size, cfg.model.context, "executed")
    assert xla == pytest.approx(analytic, rel=0.05)
    # the full-attention count (the MFU convention) is larger: the masked blocks are skipped
    assert bench.train_flops(cfg.model, t.batch_size, cfg.model.context) > analytic


@pytest.mark.parametrize("arg", ["layers=2", "layers=1,mlp=true", "layers=2,positions=residual"])
def test_torch_reference_computes_our_logits_from_our_weights(arg):
    torch = pytest.importorskip("torch")
    cfg = tiny_config(arg, **{"model.context": 80})  # longer than one attention block
    model = make_model(cfg.model)
    params = init_params(model, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 80))
    ours, _ = model.apply({"params": params}, tokens)
    net = bench_torch.torch_reference(cfg.model, params)
    with torch.no_grad():
        theirs = net(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=2e-4, rtol=2e-4)


def test_transformer_lens_model_has_our_shapes():
    pytest.importorskip("transformer_lens")
    cfg = tiny_config("layers=2")
    tl = bench_torch.transformer_lens_model(cfg.model)
    from icl_jax import export
    assert tl.cfg.attn_only
    if export.transformer_lens_major() < 4:
        assert tl.cfg.positional_embedding_type == "shortformer"
    else:  # TransformerLens 4: shortformer positions held by hooks, none in the residual stream
        assert not tl.W_pos.abs().any()
    assert tuple(tl.blocks[1].attn.W_Q.shape) == (2, 32, 16)


def test_bench_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--suite", "train", "--config",
                   f"{SMALL}:layers=1", "--repeats", "1",
                   "--no-torch", "--json", str(out)] + TINY)
    assert rc == 0
    text = capsys.readouterr().out
    assert "| jax train" in text and "tok/s" in text and "load average" in text
    result = json.loads(out.read_text())
    metrics = {r["metric"] for r in result["rows"]}
    assert {"matmul peak", "jax train", "jax MFU"} <= metrics
    row = next(r for r in result["rows"] if r["metric"] == "jax train")
    assert row["median"] > 0 and row["min"] <= row["median"] <= row["max"]
    assert result["meta"]["loadavg_start"]


def test_bench_data_and_checkpoint_suites_run(tmp_path, capsys):
    for suite in ("data", "checkpoint"):
        assert cli.main(["bench", "--suite", suite, "--repeats", "1",
                         "--config.checkpoint.every=2", "--config.train.steps=20"] + TINY) == 0
    text = capsys.readouterr().out
    assert "data / train" in text and "snapshot overhead" in text


def test_peer_rows_share_the_faster_matmul_peak():
    pytest.importorskip("transformer_lens")
    config = bench.load_config(f"{SMALL}:layers=1",
                               {"model.d_model": 32, "model.n_heads": 2, "model.context": 64,
                                "train.batch_size": 4})
    rows = {r["metric"]: r for r in bench.bench_train(config, repeats=1)}
    assert {"torch matmul peak", "XLA / torch matmul", "torch eager MFU",
            "TransformerLens MFU", "attention fwd+bwd, jax", "attention fwd+bwd, torch",
            "attention share of gap", "batched matmul, jax",
            "batched matmul, torch.bmm"} <= set(rows)
    assert rows["attention fwd+bwd, jax"]["median"] > 0
    # one repeat: every MFU row has the same denominator, so two frameworks' MFUs are
    # in the ratio of their step times
    for peer in ("torch eager", "TransformerLens"):
        np.testing.assert_allclose(rows["jax MFU"]["median"] / rows[f"{peer} MFU"]["median"],
                                   rows[f"jax / {peer}"]["median"], rtol=1e-6)
    peak = max(rows["matmul peak"]["median"], rows["torch matmul peak"]["median"])
    flops = bench.train_flops(config.model, 4, 64)
    tokens_per_s = rows["jax train"]["median"]
    np.testing.assert_allclose(rows["jax MFU"]["median"] / 100,
                               flops * tokens_per_s / (4 * 64) / (peak * 1e9), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(bench.PRESETS))
def test_every_preset_validates_and_its_step_runs(name):
    # every model the bench can pick (the accelerator-only bf16 one among them) is a valid
    # config whose step compiles and trains, here at context 64 and batch 4
    config = bench.load_config(name, {"model.context": 64, "train.batch_size": 4,
                                      "eval.icl_late_index": 50})
    trainer = bench.JaxTrainer(config)
    before = jax.tree.leaves(trainer.state["params"])[0].copy()
    trainer()
    trainer()
    assert int(trainer.state["step"]) == 2 and int(trainer.state["first_bad_step"]) < 0
    assert not np.array_equal(jax.tree.leaves(trainer.state["params"])[0], before)


def test_score_suite_times_the_analysis_scorer():
    config = tiny_config("layers=1")
    rows = {r["metric"]: r for r in bench.bench_score(config, repeats=1, n_snapshots=2)}
    assert {"score vmapped", "score lax.map", "score loop", "loop / lax.map"} <= set(rows)
    assert all(rows[m]["median"] > 0 for m in ("score vmapped", "score lax.map", "score loop"))
