"""Token streams for training and evaluation: the Source interface, the synthetic induction
data, and make_source, which builds the source a config names (the text corpora, pystdlib,
pycode and user files, live in icl_jax.corpus).

Every training batch is a pure function of (seed, step), so a restarted or multi-host run sees
exactly the data an uninterrupted single-host run would, and each host cuts its rows out of the
same global batch instead of coordinating.
"""
import numpy as np

from icl_jax import corpus
# DataError and Source: the names every caller of make_source meets, kept here too
from icl_jax.sources import (EVAL_KEY, FREQ_KEY, TABLE_KEY, DataError, Source,  # noqa: F401
                             need, step_rng, stream_rng)

NAMES = ("synthetic", "pystdlib", "pycode", "files")
# markov: token t depends on token t-1; lag2: on token t-2, which pays a head that
# attends to the previous token from the next position (the first half of induction);
# mixed: each sequence markov or lag2, half and half (placement "uniform" only);
# copy2: token t repeats token t-2 (probability COPY2_PROB) or else follows token t-1 as in
# markov (placement "uniform" only). Its previous-token reward is the token itself, which
# no MLP can precompute better than the embedding: a layer-0 previous-token head serves it
# as well as a layer-1 one in models with MLPs too (lag2's lookup goes to a layer-1 head
# reading the layer-0 MLP's output; docs/claims-notes.md)
BACKGROUNDS = ("uniform", "markov", "lag2", "mixed", "copy2")
COPY2_PROB = 0.5
ATTEMPTS = 8  # placements tried per segment before a row goes without it
# fields a config may omit; the values match the small config (icl_jax/configs/small.py)
_DEFAULTS = dict(name="synthetic", background="uniform", markov_branching=4, segments_min=1,
                 segments_max=3, segment_len_min=6, segment_len_max=19, path="", bin_dtype="uint16",
                 tokenizer="bytes", bpe_vocab_size=512, holdout_fraction=0.1, fresh_fraction=0.5,
                 placement="after", roots="")


def _markov_table(vocab, branching, seed):
    # argsort of random keys is a random permutation per row: distinct successors, no Python loop
    keys = stream_rng(seed, TABLE_KEY).random((vocab, vocab))
    return np.argsort(keys, axis=1)[:, :branching].astype(np.int32)


def synthetic_tokens(rng, n, seq_len, vocab, table, smin, smax, lmin, lmax, lag=1,
                     fresh_fraction=0.5):
    """(tokens int32 [n, seq_len], bool mask of positions written by segments)."""
    if table is None:
        x = rng.integers(0, vocab, (n, seq_len), dtype=np.int32)
    else:
        choice = rng.integers(0, table.shape[1], (n, seq_len))
        x = np.empty((n, seq_len), np.int32)
        x[:, :lag] = rng.integers(0, vocab, (n, lag))
        for t in range(lag, seq_len):
            x[:, t] = table[x[:, t - lag], choice[:, t]]
    pasted = np.zeros(x.shape, bool)  # written by a segment
    used = np.zeros(x.shape, bool)  # written, or read by a copy: later segments must not write here
    count, rows, j = rng.integers(smin, smax + 1, n), np.arange(n), np.arange(lmax)
    for k in range(smax):  # draws do not depend on `count`, so every row consumes the stream alike
        length = rng.integers(lmin, lmax + 1, (ATTEMPTS, n))
        # source start and gap are both uniform, so neither position nor distance predicts a repeat
        src = rng.integers(0, seq_len - 2 * length + 1)
        dst = src + length + rng.integers(0, seq_len - src - 2 * length + 1)
        # fresh strings cannot be guessed from the background (matters for markov); copies of
        # existing text keep the background's statistics
        fresh = rng.random((ATTEMPTS, n)) < fresh_fraction
        new = rng.integers(0, vocab, (n, lmax), dtype=np.int32)
        # take each row's first placement that leaves earlier segments and their sources intact
        cs = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(used, 1)], 1)
        free = lambda start: cs[rows, start + length] == cs[rows, start]  # noqa: E731
        ok = free(dst) & (~fresh | free(src))
        a = ok.argmax(0)
        take = ok[a, rows] & (k < count)
        length, src, dst, fresh = (v[a, rows] for v in (length, src, dst, fresh))
        r, jj = np.nonzero((j < length[:, None]) & take[:, None])
        s, d, f = src[r] + jj, dst[r] + jj, fresh[r]
        x[r[f], s[f]] = new[r[f], jj[f]]
        x[r, d] = x[r, s]
        pasted[r[f], s[f]] = pasted[r, d] = True
        used[r, s] = used[r, d] = True
    return x, pasted


def _background(rng, x, pasted, vocab, table, lag, copy_prob=0.0):
    """Fills the positions not pasted, in order, with the background process, so that the
    background's rule holds at every position whose predecessor it depends on was drawn by it
    or pasted: only pasted tokens break it. copy_prob > 0 (copy2, lag 1): from position 2 on,
    each token repeats the token two back with that probability instead."""
    n, seq_len = x.shape
    if table is None:
        return np.where(pasted, x, rng.integers(0, vocab, x.shape, dtype=np.int32))
    choice = rng.integers(0, table.shape[1], x.shape)
    # drawn only for copy2: the other backgrounds' streams (and loop) stay as they were
    copy = rng.random(x.shape) < copy_prob if copy_prob else None
    # lag 0: "mixed", each row's lag 1 or 2 (drawn only then: other rows' streams unchanged)
    lags = np.full(n, lag) if lag else rng.integers(1, 3, n)
    first = rng.integers(0, vocab, (n, int(lags.max())), dtype=np.int32)
    rows = np.arange(n)
    for t in range(seq_len):
        prev = x[rows, np.maximum(t - lags, 0)]
        bg = np.where(t < lags, first[:, min(t, first.shape[1] - 1)], table[prev, choice[:, t]])
        if copy is not None and t >= 2:
            bg = np.where(copy[:, t], x[:, t - 2], bg)
        x[:, t] = np.where(pasted[:, t], x[:, t], bg)
    return x


def uniform_segments(rng, n, seq_len, vocab, table, smin, smax, lmin, lmax, lag=1,
                     copy_prob=0.0):
    """(tokens int32 [n, seq_len], bool mask of pasted positions): fresh random strings, each
    written twice, at two starts drawn independently and uniformly from [-(length - 1),
    seq_len - 1] (the earlier one is the source; either may run over an edge of the context).

    min and max of two uniform draws have densities 2(1 - u) and 2u, which add up to a
    constant: every position is equally likely to hold a pasted token, so before induction
    exists the loss is the same at every context index (the ICL score starts near 0), and only
    a head that copies from an earlier occurrence can lower the late indices' loss.
    """
    x = np.zeros((n, seq_len), np.int32)
    pasted = np.zeros((n, seq_len), bool)
    count, rows, j = rng.integers(smin, smax + 1, n), np.arange(n), np.arange(lmax)
    for k in range(smax):  # draws do not depend on `count`, so every row consumes the stream alike
        length = rng.integers(lmin, lmax + 1, (ATTEMPTS, n))
        a, b = (rng.integers(-(length - 1), seq_len) for _ in range(2))
        src, dst = np.minimum(a, b), np.maximum(a, b)
        new = rng.integers(0, vocab, (n, lmax), dtype=np.int32)
        # a placement is kept if the copy does not overlap its source and neither touches an
        # earlier segment; each row takes its first such placement
        cs = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(pasted, 1)], 1)
        clip = lambda p: np.clip(p, 0, seq_len)  # noqa: E731
        free = lambda s: cs[rows, clip(s + length)] == cs[rows, clip(s)]  # noqa: E731
        ok = (dst - src >= length) & free(src) & free(dst)
        first = ok.argmax(0)
        take = ok[first, rows] & (k < count)
        length, src, dst = (v[first, rows] for v in (length, src, dst))
        r, jj = np.nonzero((j < length[:, None]) & take[:, None])
        for start in (src, dst):
            p = start[r] + jj
            inside = (p >= 0) & (p < seq_len)
            x[r[inside], p[inside]] = new[r[inside], jj[inside]]
            pasted[r[inside], p[inside]] = True
    return _background(rng, x, pasted, vocab, table, lag, copy_prob), pasted


PLACEMENTS = ("uniform", "after")


class SyntheticSource(Source):
    """A uniform, sparse-Markov (markov, lag2, mixed) or copy2 background with segments pasted
    again later in the sequence."""
    name = "synthetic"

    def __init__(self, vocab_size, seed, background="uniform", markov_branching=4, segments_min=1,
                 segments_max=3, segment_len_min=6, segment_len_max=19, seq_len=65,
                 fresh_fraction=0.5, placement="after"):
        need(background in BACKGROUNDS,
             f"unknown data.background {background!r}; valid: {', '.join(BACKGROUNDS)}")
        need(vocab_size >= 2, f"model.vocab_size must be >= 2, got {vocab_size}")
        need(background == "uniform" or 1 <= markov_branching <= vocab_size,
             f"data.markov_branching must be in 1..{vocab_size} (model.vocab_size), "
             f"got {markov_branching}")
        need(0 <= segments_min <= segments_max, "data.segments_min and data.segments_max must "
             f"satisfy 0 <= min <= max, got {segments_min} and {segments_max}")
        need(1 <= segment_len_min <= segment_len_max, "data.segment_len_max must be >= "
             f"data.segment_len_min >= 1, got {segment_len_min} and {segment_len_max}")
        self.vocab_size, self.seed, self.seq_len = int(vocab_size), int(seed), int(seq_len)
        self.segments = tuple(int(v) for v in (segments_min, segments_max, segment_len_min,
                                               segment_len_max))
        self.table = _markov_table(self.vocab_size, int(markov_branching), self.seed) \
            if background != "uniform" else None
        self.lag = {"lag2": 2, "mixed": 0}.get(background, 1)
        self.copy_prob = COPY2_PROB if background == "copy2" else 0.0
        need(0 <= fresh_fraction <= 1, f"data.fresh_fraction must be in [0, 1], got {fresh_fraction}")
        self.fresh_fraction = float(fresh_fraction)
        need(placement in PLACEMENTS,
             f"unknown data.placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
        need(background not in ("mixed", "copy2") or placement == "uniform",
             f"data.background {background!r} needs data.placement 'uniform'")
        self.placement = placement
        self._check(self.seq_len)

    def _check(self, seq_len):
        need(self.segments[1] == 0 or 2 * self.segments[3] <= seq_len,
             f"data.segment_len_max={self.segments[3]} is too long for sequences of {seq_len} "
             f"tokens: a segment and its copy need 2 * segment_len_max <= {seq_len}")

    def _make(self, rng, n, seq_len):
        return self._make_pasted(rng, n, seq_len)[0]

    def _make_pasted(self, rng, n, seq_len):
        self._check(seq_len)
        if self.placement == "uniform":
            return uniform_segments(rng, n, seq_len, self.vocab_size, self.table,
                                    *self.segments, lag=self.lag, copy_prob=self.copy_prob)
        return synthetic_tokens(rng, n, seq_len, self.vocab_size, self.table, *self.segments,
                                lag=self.lag, fresh_fraction=self.fresh_fraction)

    def batch(self, step, batch_size, seq_len, rows=None):
        x = self._make(step_rng(self.seed, step), batch_size, seq_len)
        return x if rows is None else np.ascontiguousarray(x[rows])

    def eval_set(self, n, seq_len):
        return self._make(stream_rng(self.seed, EVAL_KEY), n, seq_len)

    def eval_set_pasted(self, n, seq_len):
        """(eval_set(n, seq_len), bool [n, seq_len]: the positions a segment wrote, its
        source and its copy): the subsets of head_llc's data-refined LLC."""
        return self._make_pasted(stream_rng(self.seed, EVAL_KEY), n, seq_len)

    def token_frequencies(self):
        x = self._make(stream_rng(self.seed, FREQ_KEY), 256, self.seq_len)
        return np.bincount(x.ravel(), minlength=self.vocab_size).astype(np.float64)


def make_source(config, workdir=None):
    """The source config.data describes, checked against config.model; DataError if unusable.

    Text is tokenized into the shared cache (corpus.cache_root()), not into `workdir`, which is
    accepted so that every caller can pass what it has."""
    f = {**_DEFAULTS, **dict(config.data.items())}
    seed, seq_len, model_vocab = int(config.seed), config.model.context + 1, config.model.vocab_size
    need(seed >= 0, f"seed must be >= 0, got {seed}")
    if f["name"] == "synthetic":
        source = SyntheticSource(
            model_vocab, seed, f["background"], int(f["markov_branching"]), int(f["segments_min"]),
            int(f["segments_max"]), int(f["segment_len_min"]), int(f["segment_len_max"]), seq_len,
            float(f.get("fresh_fraction", 0.5)), f["placement"])
    else:
        need(f["name"] in NAMES, f"unknown data.name {f['name']!r}; valid: {', '.join(NAMES)}")
        source = corpus.make_text_source(f, seed, seq_len)
    wanted = source.vocab_size
    need(wanted <= model_vocab, f"model.vocab_size={model_vocab} is too small for data "
         f"{source.name!r}, which needs {wanted}; set model.vocab_size >= {wanted}")
    return source
