"""Snapshots: the schedule, the orbax Store, and Run, the one reader of a trained run."""
import jax
import numpy as np
import pytest

from icl_jax import checkpoints, train, workdir
from icl_jax.model import make_model
from conftest import tiny_config


def test_snapshot_schedule_is_dense_early_and_regular_after():
    steps = checkpoints.save_schedule(1000, every=100, log_spaced=5)
    assert steps[0] == 0 and steps[-1] == 1000
    assert {100, 200, 900}.issubset(steps)
    assert len([s for s in steps if 0 < s < 100]) >= 3


def test_save_restore_round_trip(tmp_path):
    cfg = tiny_config()
    model = make_model(cfg.model)
    tx = train.make_optimizer(cfg.train)
    state = train.init_state(model, tx, 3, cfg.train)
    store = checkpoints.Store(str(tmp_path))
    store.save(7, state, cfg.to_dict())
    store.close()
    store = checkpoints.Store(str(tmp_path))
    assert store.steps() == [7]
    restored = store.restore(7, jax.eval_shape(lambda: state))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 state, restored)
    store.close()


def test_run_api_forward_matches_the_model(tmp_path):
    cfg = tiny_config()
    train.train_and_evaluate(cfg, str(tmp_path), progress=False)
    run = checkpoints.Run(str(tmp_path))
    assert run.config.model.n_layers == 2 and run.metrics[-1]["step"] == 12
    tokens = np.arange(20) % 5
    logits, attention = run.forward(tokens)
    assert logits.shape == (1, 20, 32) and attention.shape == (1, 2, 2, 20, 20)
    expected, _ = run.model.apply({"params": run.params(12)}, tokens[None])
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no snapshot at step 3; saved steps: 0..12"):
        run.params(3)




def test_store_keeps_snapshots_where_workdir_says(tmp_path):
    cfg = tiny_config()
    state = train.init_state(make_model(cfg.model), train.make_optimizer(cfg.train), 0, cfg.train)
    store = checkpoints.Store(str(tmp_path))
    for step in (0, 3):
        store.save(step, state, cfg.to_dict())
    store.close()
    assert workdir.snapshot_steps(str(tmp_path)) == [0, 3]
    store = checkpoints.Store(str(tmp_path))
    moved = store.quarantine(3)
    assert moved == str(workdir.corrupt_dir(str(tmp_path)) / "3") and store.steps() == [0]
    store.close()


def test_run_names_a_workdir_without_a_run_or_snapshots(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        checkpoints.Run(str(tmp_path))
    workdir.write_config(str(tmp_path), tiny_config().to_json())
    with pytest.raises(FileNotFoundError, match="has no snapshots yet"):
        checkpoints.Run(str(tmp_path))


def test_run_restores_each_snapshot_and_keeps_only_the_last(tmp_path):
    cfg = tiny_config()
    train.train_and_evaluate(cfg, str(tmp_path), progress=False)
    run = checkpoints.Run(str(tmp_path))
    store = checkpoints.Store(str(tmp_path), read_only=True)
    for step in run.steps:
        expected = store.restore_params(step, run.abstract_params)
        jax.tree.map(np.testing.assert_array_equal, run.params(step), expected)
        assert run._last[0] == step  # one snapshot held, not all of them
    assert run.params() is run.params(12)  # the newest, restored once for repeated calls
