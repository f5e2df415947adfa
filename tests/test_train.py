import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from icl_jax import checkpoints, cli, data, flops, scores, train, workdir
from icl_jax.model import make_model
from conftest import ROOT, tiny_config


def _setup(cfg, devices):
    model = make_model(cfg.model)
    tx = train.make_optimizer(cfg.train)
    mesh = train.make_mesh(devices)
    state = jax.device_put(train.init_state(model, tx, cfg.seed, cfg.train),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step = train.make_train_step(model, tx, mesh, cfg.train)
    source = data.make_source(cfg)
    batch = source.batch(0, cfg.train.batch_size, cfg.model.context + 1)
    return mesh, state, step, batch


def test_the_step_splits_the_batch_over_every_device_and_keeps_the_state_replicated():
    cfg = tiny_config()  # batch 8 on the 4 devices of conftest
    mesh, state, step, batch = _setup(cfg, jax.devices())
    b = train.global_array(batch, mesh, jax.sharding.PartitionSpec("data"))
    assert [s.data.shape[0] for s in b.addressable_shards] == [2, 2, 2, 2]
    state, _ = step(state, b)
    shards = [np.asarray(s.data) for s in state["params"]["W_E"].addressable_shards]
    assert len(shards) == 4
    for shard in shards[1:]:
        np.testing.assert_array_equal(shard, shards[0])


def test_data_parallel_step_on_4_devices_equals_1_device():
    cfg = tiny_config()
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh, state, step, batch = _setup(cfg, devices)
        for s in range(3):
            b = train.global_array(batch if s == 0 else batch[::-1].copy(), mesh,
                                   jax.sharding.PartitionSpec("data"))
            state, metrics = step(state, b)
        results.append((jax.device_get(state["params"]), float(metrics["train_loss"]),
                        float(metrics["grad_norm"])))
    (p1, l1, g1), (p4, l4, g4) = results
    assert l1 == pytest.approx(l4, rel=1e-5)
    # the gradient is the mean over all rows, not the sum over devices (Adam after clipping
    # hides a scale, so only the norm shows it)
    assert g1 == pytest.approx(g4, rel=1e-4)
    # b_K's gradient is zero in exact arithmetic (softmax ignores a bias shared by every key),
    # so Adam turns float noise into updates of up to a step's learning rate, of either
    # sign, whose values depend on the order of the sums: bounded by the three steps' rates
    lr, _ = train.make_schedules(cfg.train)
    noise_bound = sum(float(lr(s)) for s in range(4))
    for layer in [k for k in p1 if k.startswith("block_")]:
        b1, b4 = (p[layer]["attn"].pop("b_K") for p in (p1, p4))
        assert np.abs(b1 - b4).max() <= noise_bound
    # every other parameter moves by ~lr per step: a real mismatch would show at 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), p1, p4)


def test_train_step_compiles_once():
    cfg = tiny_config()
    mesh, state, step, batch = _setup(cfg, jax.devices())
    for s in range(4):
        b = train.global_array(batch, mesh, jax.sharding.PartitionSpec("data"))
        state, _ = step(state, b)
    assert step._cache_size() == 1


def test_paper_schedule_drops_weight_decay_at_the_given_step():
    cfg = tiny_config(**{"train.schedule": "paper", "train.weight_decay_drop_step": 6,
                         "train.weight_decay": 0.1, "train.weight_decay_after": 0.01,
                         "train.warmup_steps": 4})
    lr, wd = train.make_schedules(cfg.train)
    assert float(lr(0)) == 0 and float(lr(2)) == pytest.approx(cfg.train.lr / 2)
    assert float(lr(4)) == pytest.approx(cfg.train.lr)
    assert float(wd(5)) == pytest.approx(0.1) and float(wd(6)) == pytest.approx(0.01)


def test_cosine_schedule_decays():
    cfg = tiny_config(**{"train.schedule": "cosine", "train.warmup_steps": 2})
    lr, _ = train.make_schedules(cfg.train)
    assert float(lr(2)) == pytest.approx(cfg.train.lr)
    assert float(lr(12)) == pytest.approx(cfg.train.lr * 0.1, rel=1e-3)


def test_training_writes_metrics_snapshots_and_config(tmp_path):
    cfg = tiny_config()
    record = train.train_and_evaluate(cfg, str(tmp_path), progress=False)
    assert record["step"] == 12 and np.isfinite(record["train_loss"])
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["model"]["n_layers"] == 2
    metrics = workdir.read_metrics(str(tmp_path))
    steps = [r["step"] for r in metrics]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 12
    assert "mfu" not in metrics[0]  # step 0 trained nothing
    timed = [r for r in metrics[1:] if "mfu" in r]
    for r in metrics[1:]:
        assert {"step", "tokens", "train_loss"} <= set(r)
    # throughput is timed over at least MIN_TIMED_STEPS steps (fewer would time the dispatch)
    assert [r["step"] for r in timed] == [10]
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in timed)
    evals = [r for r in metrics if "icl_score" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert all(0 <= r["prefix_matching_max"] <= 1 for r in evals)
    assert np.array(evals[-1]["prefix_matching"]).shape == (2, 2)
    run = checkpoints.Run(str(tmp_path))
    assert run.steps == checkpoints.save_schedule(12, 4, 2)


def test_stopped_and_resumed_run_equals_straight_run(tmp_path):
    cfg = tiny_config()
    train.train_and_evaluate(cfg, str(tmp_path / "straight"), progress=False)
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"), progress=False, stop_after=5)
    assert checkpoints.Run(str(tmp_path / "resumed")).steps[-1] == 5
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"), progress=False)
    a = checkpoints.Run(str(tmp_path / "straight")).params(12)
    b = checkpoints.Run(str(tmp_path / "resumed")).params(12)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
    steps = [r["step"] for r in workdir.read_metrics(str(tmp_path / "resumed"))]
    assert len(steps) == len(set(steps)) and steps[-1] == 12


def test_workdir_of_another_config_is_refused(tmp_path):
    train.train_and_evaluate(tiny_config(), str(tmp_path), progress=False, stop_after=2)
    other = tiny_config(**{"train.lr": 3e-3})
    with pytest.raises(train.TrainingError, match="train.lr"):
        train.train_and_evaluate(other, str(tmp_path), progress=False)
    train.train_and_evaluate(other, str(tmp_path), progress=False, overwrite=True, stop_after=2)
    assert json.load(open(tmp_path / "config.json"))["train"]["lr"] == 3e-3


def _edit_saved_configs(work, edit):
    """Applies edit(dict) to config.json and to every snapshot's copy of the config (what a
    run saved by an older version holds)."""
    for path in [work / "config.json", *work.glob("snapshots/*/config/metadata")]:
        saved = json.loads(path.read_text())
        edit(saved)
        path.write_text(json.dumps(saved))


def test_a_run_saved_before_model_attention_existed_still_resumes(tmp_path):
    cfg = tiny_config()
    train.train_and_evaluate(cfg, str(tmp_path), progress=False, stop_after=4)
    # as the run was saved before the field existed
    _edit_saved_configs(tmp_path, lambda saved: saved["model"].pop("attention"))
    train.train_and_evaluate(cfg, str(tmp_path), progress=False)
    assert checkpoints.Run(str(tmp_path)).steps[-1] == cfg.train.steps
    # but a saved run that named another kernel is a different run
    _edit_saved_configs(tmp_path, lambda saved: saved["model"].update(
        attention="dot_product_attention"))
    with pytest.raises(train.TrainingError, match="model.attention"):
        train.train_and_evaluate(cfg, str(tmp_path), progress=False)


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "icl_jax", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_cli_trains_two_steps_end_to_end(tmp_path):
    out = _cli("train", "--config", "small:layers=1", "--workdir", str(tmp_path),
               "--config.train.steps=2", "--config.model.d_model=16", "--config.eval.n_examples=4",
               "--config.train.batch_size", "4")
    assert out.returncode == 0, out.stderr
    assert "final: step 2" in out.stdout
    assert (tmp_path / "snapshots" / "2").is_dir()


@pytest.mark.parametrize("args, field", [
    (["--config.train.steps=0"], "train.steps"),
    (["--config.train.stepz=5"], "train.stepz"),
    (["--config.model.n_heads=3"], "model.d_model"),
    (["--config.model.context=40"], "model.context"),
    (["--config.data.name=pystdlib"], "model.vocab_size"),
    (["--config.data.name=files", "--config.data.path=/nonexistent/x.txt",
      "--config.model.vocab_size=256"], "/nonexistent/x.txt"),
])
def test_cli_user_errors_are_one_line_without_traceback(tmp_path, args, field):
    out = _cli("train", "--workdir", str(tmp_path / "w"), *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error:") and field in out.stderr
    assert not (tmp_path / "w" / "snapshots").exists()


def test_ensemble_member_equals_the_same_config_trained_alone(tmp_path):
    cfgs = [tiny_config(seed=0), tiny_config(**{"seed": 1, "train.lr": 3e-3}),
            tiny_config(**{"seed": 2, "data.background": "markov"})]
    works = [str(tmp_path / f"m{k}") for k in range(3)]
    records = train.train_ensemble(cfgs, works, progress=False)
    assert [r["step"] for r in records] == [12, 12, 12]
    for k in (1, 2):
        alone = str(tmp_path / f"alone{k}")
        train.train_and_evaluate(cfgs[k], alone, progress=False)
        a = checkpoints.Run(alone)
        b = checkpoints.Run(works[k])
        assert a.steps == b.steps
        pa, pb = a.params(12), b.params(12)
        for path, x in jax.tree_util.tree_leaves_with_path(pa):
            y = pb
            for key in path:
                y = y[key.key]
            if path[-1].key == "b_K":
                # b_K's gradient is zero in exact arithmetic (softmax ignores a shift that
                # is equal over keys); Adam turns its float noise into steps of ~lr.
                assert np.abs(y).max() < 12 * 3e-3
                continue
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5, err_msg=str(path))
        la = [r["train_loss"] for r in a.metrics[1:]]
        lb = [r["train_loss"] for r in b.metrics[1:]]
        np.testing.assert_allclose(la, lb, rtol=1e-5)
        assert json.load(open(os.path.join(works[k], "config.json")))["seed"] == k


def test_ensemble_refuses_members_of_different_shapes(tmp_path):
    cfgs = [tiny_config("layers=1"), tiny_config("layers=2")]
    with pytest.raises(train.config_lib.ConfigError, match="model.n_layers"):
        train.train_ensemble(cfgs, [str(tmp_path / "a"), str(tmp_path / "b")], progress=False)


def test_train_flops_per_token_by_hand():
    m = types.SimpleNamespace(n_layers=1, d_model=4, n_heads=2, d_head=0, context=3,
                              vocab_size=5, mlp=False, d_mlp=8)  # d_head 0: d_model / n_heads
    # per token, forward: W_Q W_K W_V W_O 4 x [4 x 4] = 64 multiply-adds; per head q.k
    # and pattern.v over 3 keys of d_head 2: 2 x 2 x 6 = 24; W_U [4 x 5]: 20. 108 MACs,
    # 216 FLOPs; training is 3 forward passes.
    assert flops.train_flops_per_token(m) == 3 * 216
    m.mlp = True  # W_in [4 x 8] and W_out [8 x 4]: 64 MACs more
    assert flops.train_flops_per_token(m) == 3 * (216 + 128)


def test_peak_comes_from_the_table_on_a_known_accelerator_and_is_measured_on_cpu(monkeypatch):
    cpu = flops.peak("float32")
    assert 1e8 < cpu.flops_per_s < 1e14 and "measured" in cpu.label

    class H100:
        device_kind, platform = "NVIDIA H100 80GB HBM3", "gpu"
    monkeypatch.setattr(jax, "local_devices", lambda: [H100()])
    bf16 = flops.peak("bfloat16")
    assert bf16.flops_per_s == 989e12 * jax.device_count() and "H100 bf16" in bf16.label
    assert flops.peak("float32").flops_per_s == 67e12 * jax.device_count()
    assert bf16.mfu(flops_per_token=1e9, tokens_per_s=989e3) == pytest.approx(
        1 / jax.device_count())


def test_cli_train_on_a_file_is_one_line_naming_it(tmp_path, capsys):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("x")
    assert cli.main(["train", "--workdir", str(not_a_folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(not_a_folder) in err and "not a folder" in err
    assert err.count("\n") == 1


def test_cli_lets_a_bug_keep_its_traceback(monkeypatch, tmp_path):
    def buggy(args, overrides):
        return {}["missing"]
    monkeypatch.setitem(cli.COMMANDS, "train", buggy)
    with pytest.raises(KeyError, match="missing"):
        cli.main(["train", "--workdir", str(tmp_path)])


def test_cli_ablation_choices_are_the_scorers(capsys):
    parser = cli.build_parser()
    for kind in scores.ABLATIONS:
        assert parser.parse_args(["analyze", "--workdir", "w", "--ablation", kind]).ablation == kind
    with pytest.raises(SystemExit):
        parser.parse_args(["analyze", "--workdir", "w", "--ablation", "bogus"])
    assert "must be one of pattern, zero, mean" in capsys.readouterr().err


def test_a_run_is_trained_longer_from_its_workdir(tmp_path, capsys):
    """`icl-jax train --workdir W --config.train.steps=N` (no --config) continues the run in W
    with its own config to N steps: a seed run whose window was still open at step 6,000
    needs exactly this. The first steps are not retrained; a change to anything else, or more
    steps under a cosine schedule (which would have decayed differently), is refused."""
    from icl_jax import checkpoints, cli, config as config_lib, workdir as workdir_lib
    work = tmp_path / "run"
    train.train_and_evaluate(tiny_config("layers=1"), str(work), progress=False)
    before = checkpoints.Run(str(work))
    first = before.params(8)
    assert before.steps[-1] == 12
    assert cli.main(["train", "--workdir", str(work), "--config.train.steps=20", "--quiet"]) == 0
    after = checkpoints.Run(str(work))
    assert after.steps[-1] == 20 and set(before.steps) <= set(after.steps)
    jax.tree.map(np.testing.assert_array_equal, after.params(8), first)  # not retrained
    assert after.config.train.steps == 20 and after.config.model.n_layers == 1
    steps = [r["step"] for r in workdir_lib.read_metrics(str(work)) if "eval_loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # no step logged twice
    # anything else changed is another run
    capsys.readouterr()
    assert cli.main(["train", "--workdir", str(work), "--config.train.steps=24",
                     "--config.train.lr=0.01", "--quiet"]) != 0
    assert "train.lr: 0.002 -> 0.01" in capsys.readouterr().err
    cosine = tmp_path / "cosine"
    train.train_and_evaluate(tiny_config("layers=1", **{"train.schedule": "cosine"}),
                             str(cosine), progress=False)
    assert cli.main(["train", "--workdir", str(cosine), "--config.train.steps=20",
                     "--quiet"]) != 0
    assert "train.steps: 12 -> 20" in capsys.readouterr().err
    assert config_lib.from_dict(workdir_lib.read_config_dict(str(cosine))).train.steps == 12
