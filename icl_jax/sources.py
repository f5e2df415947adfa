"""What every token source shares: the Source interface, DataError (a user's data mistake,
named), and the random streams every batch is a pure function of, (seed, step) or (seed,
a stream key that training steps never reach). icl_jax.data (the synthetic data) and
icl_jax.corpus (text) both build on it.
"""
import numpy as np

# rng stream keys that training steps (small non-negative ints) never reach
EVAL_KEY, TABLE_KEY, FREQ_KEY = 2**32 - 1, 2**32 - 2, 2**32 - 3


class DataError(ValueError):
    """A user's data mistake: message names the file or field."""


def need(ok, message):
    """DataError(message) unless ok."""
    if not ok:
        raise DataError(message)


def stream_rng(seed, key):
    """The random stream `key` of a seed (a step, or EVAL_KEY, TABLE_KEY, FREQ_KEY)."""
    return np.random.default_rng([seed, key])


def step_rng(seed, step):
    """The random stream of training step `step`; steps never reach the reserved keys."""
    need(0 <= step < FREQ_KEY, f"step must be in [0, {FREQ_KEY}), got {step}")
    return stream_rng(seed, step)


class Source:
    """A token distribution: training batches by step, a fixed held-out set, unigram counts."""
    vocab_size: int
    name: str

    def batch(self, step, batch_size, seq_len, rows=None):
        """int32 [n_rows, seq_len]: rows `rows` (all if None) of the global batch of `step`."""
        raise NotImplementedError

    def eval_set(self, n, seq_len):
        """int32 [n, seq_len], held out, fixed by the seed."""
        raise NotImplementedError

    def token_frequencies(self):
        """float64 [vocab_size] token counts over a sample of the training distribution."""
        raise NotImplementedError
