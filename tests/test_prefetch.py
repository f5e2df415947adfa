"""The background prefetch of host batches: same batches, same order, errors surface, no
thread outlives its run."""
import threading

import jax
import numpy as np
import pytest

from conftest import tiny_config
from icl_jax import checkpoints, corpus, data, prefetch, train


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == prefetch.THREAD_NAME]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    yield
    assert not _prefetch_threads()


def test_prefetcher_returns_each_step_batch_in_order():
    made = []

    def get_batch(step):
        made.append(step)
        return np.full(3, step)

    with prefetch.Prefetcher(get_batch, 5, 12, depth=2) as batches:
        got = [int(batches.get(s)[0]) for s in range(5, 12)]
        with pytest.raises(ValueError, match="step 12 is next"):
            batches.get(3)
    assert got == list(range(5, 12)) and made == list(range(5, 12))


def test_prefetcher_stays_depth_ahead_and_close_stops_it_early():
    ahead = threading.Event()

    def get_batch(step):
        if step == 4:  # made only if the producer ran more than depth + 1 steps ahead
            ahead.set()
        return step

    batches = prefetch.Prefetcher(get_batch, 0, 1000, depth=2)
    assert batches.get(0) == 0
    assert not ahead.wait(0.5)  # steps 1, 2 queued, 3 made and waiting for a slot
    batches.close()
    assert not _prefetch_threads()


def test_an_error_in_the_producer_is_raised_at_its_step_with_its_message():
    def get_batch(step):
        if step == 2:
            raise data.DataError("data.path corpus.bin went away")
        return step

    batches = prefetch.Prefetcher(get_batch, 0, 10)
    assert [batches.get(0), batches.get(1)] == [0, 1]
    with pytest.raises(data.DataError, match="corpus.bin went away"):
        batches.get(2)


def _text_config(tmp_path, **overrides):
    tokens = np.random.default_rng(0).integers(0, 32, 20_000).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    return tiny_config(**{"data.name": "files", "data.path": str(tmp_path / "tokens.npy"),
                          "data.holdout_fraction": 0.1, **overrides})


def test_training_with_prefetch_equals_training_without(tmp_path, monkeypatch):
    """A memory-mapped token file, the text path: the same params and losses either way."""
    cfg = _text_config(tmp_path)
    monkeypatch.setattr(train, "PREFETCH_BATCHES", 0)
    plain = train.train_and_evaluate(cfg, str(tmp_path / "plain"), progress=False)
    monkeypatch.setattr(train, "PREFETCH_BATCHES", 2)
    ahead = train.train_and_evaluate(cfg, str(tmp_path / "ahead"), progress=False)
    assert ahead["train_loss"] == plain["train_loss"]
    a = checkpoints.Run(str(tmp_path / "plain")).params(12)
    b = checkpoints.Run(str(tmp_path / "ahead")).params(12)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def test_resumed_prefetched_run_equals_a_straight_synchronous_one(tmp_path, monkeypatch):
    cfg = tiny_config()
    monkeypatch.setattr(train, "PREFETCH_BATCHES", 0)
    train.train_and_evaluate(cfg, str(tmp_path / "straight"), progress=False)
    monkeypatch.setattr(train, "PREFETCH_BATCHES", 2)
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"), progress=False, stop_after=5)
    assert not _prefetch_threads()  # stopped early: the batches made ahead are dropped
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"), progress=False)
    a = checkpoints.Run(str(tmp_path / "straight")).params(12)
    b = checkpoints.Run(str(tmp_path / "resumed")).params(12)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def test_an_error_in_the_source_during_training_surfaces_in_the_caller(tmp_path, monkeypatch):
    cfg = _text_config(tmp_path)
    read = corpus.TokenSource.batch

    def failing(self, step, *args, **kwargs):
        if step == 7:
            raise data.DataError("data.path tokens.npy: read error at step 7")
        return read(self, step, *args, **kwargs)

    monkeypatch.setattr(corpus.TokenSource, "batch", failing)
    with pytest.raises(data.DataError, match="read error at step 7"):
        train.train_and_evaluate(cfg, str(tmp_path / "run"), progress=False)
    # the steps before it ran and were saved as usual
    assert 4 in checkpoints.Run(str(tmp_path / "run")).steps
