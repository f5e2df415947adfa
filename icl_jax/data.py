"""Token streams for training and evaluation: synthetic induction data, the stdlib, user files.

Every training batch is a pure function of (seed, step), so a restarted or multi-host run sees
exactly the data an uninterrupted single-host run would, and each host cuts its rows out of the
same global batch instead of coordinating.
"""
import functools
import glob
import hashlib
import json
import os
import pathlib
import socket
import sysconfig

import numpy as np

# rng stream keys that training steps (small non-negative ints) never reach
EVAL_KEY, TABLE_KEY, FREQ_KEY = 2**32 - 1, 2**32 - 2, 2**32 - 3
BIN_DTYPES = ("uint16", "uint32")
TOKENIZERS = ("bytes", "bpe")
NAMES = ("synthetic", "pystdlib", "files")
# markov: token t depends on token t-1; lag2: on token t-2, which pays a head that
# attends to the previous token from the next position (the first half of induction)
BACKGROUNDS = ("uniform", "markov", "lag2")
END_OF_TEXT = "<|endoftext|>"
ATTEMPTS = 8  # placements tried per segment before a row goes without it
# fields a config may omit; the values match configs/small.py
_DEFAULTS = dict(name="synthetic", background="uniform", markov_branching=4, segments_min=1,
                 segments_max=3, segment_len_min=6, segment_len_max=19, path="", bin_dtype="uint16",
                 tokenizer="bytes", bpe_vocab_size=512, holdout_fraction=0.1, fresh_fraction=0.5,
                 placement="after")


class DataError(ValueError):
    """A user's data mistake: message names the file or field."""


def _need(ok, message):
    if not ok:
        raise DataError(message)


def _rng(seed, key):
    return np.random.default_rng([seed, key])


def _step_rng(seed, step):
    _need(0 <= step < FREQ_KEY, f"step must be in [0, {FREQ_KEY}), got {step}")
    return _rng(seed, step)


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


def _markov_table(vocab, branching, seed):
    # argsort of random keys is a random permutation per row: distinct successors, no Python loop
    keys = _rng(seed, TABLE_KEY).random((vocab, vocab))
    return np.argsort(keys, axis=1)[:, :branching].astype(np.int32)


def _synthetic_tokens(rng, n, seq_len, vocab, table, smin, smax, lmin, lmax, lag=1,
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


def _background(rng, x, pasted, vocab, table, lag):
    """Fills the positions not pasted, in order, with the background process, so that the
    background's rule holds at every position whose predecessor it depends on was drawn by it
    or pasted: only pasted tokens break it."""
    n, seq_len = x.shape
    if table is None:
        return np.where(pasted, x, rng.integers(0, vocab, x.shape, dtype=np.int32))
    choice = rng.integers(0, table.shape[1], x.shape)
    first = rng.integers(0, vocab, (n, lag), dtype=np.int32)
    for t in range(seq_len):
        bg = first[:, t] if t < lag else table[x[:, t - lag], choice[:, t]]
        x[:, t] = np.where(pasted[:, t], x[:, t], bg)
    return x


def _uniform_segments(rng, n, seq_len, vocab, table, smin, smax, lmin, lmax, lag=1):
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
    return _background(rng, x, pasted, vocab, table, lag), pasted


PLACEMENTS = ("uniform", "after")


class SyntheticSource(Source):
    """A uniform or sparse-Markov background with segments pasted again later in the sequence."""
    name = "synthetic"

    def __init__(self, vocab_size, seed, background="uniform", markov_branching=4, segments_min=1,
                 segments_max=3, segment_len_min=6, segment_len_max=19, seq_len=65,
                 fresh_fraction=0.5, placement="after"):
        _need(background in BACKGROUNDS,
              f"unknown data.background {background!r}; valid: {', '.join(BACKGROUNDS)}")
        _need(vocab_size >= 2, f"model.vocab_size must be >= 2, got {vocab_size}")
        _need(background == "uniform" or 1 <= markov_branching <= vocab_size,
              f"data.markov_branching must be in 1..{vocab_size} (model.vocab_size), "
              f"got {markov_branching}")
        _need(0 <= segments_min <= segments_max, "data.segments_min and data.segments_max must "
              f"satisfy 0 <= min <= max, got {segments_min} and {segments_max}")
        _need(1 <= segment_len_min <= segment_len_max, "data.segment_len_max must be >= "
              f"data.segment_len_min >= 1, got {segment_len_min} and {segment_len_max}")
        self.vocab_size, self.seed, self.seq_len = int(vocab_size), int(seed), int(seq_len)
        self.segments = tuple(int(v) for v in (segments_min, segments_max, segment_len_min,
                                               segment_len_max))
        self.table = _markov_table(self.vocab_size, int(markov_branching), self.seed) \
            if background != "uniform" else None
        self.lag = 2 if background == "lag2" else 1
        _need(0 <= fresh_fraction <= 1, f"data.fresh_fraction must be in [0, 1], got {fresh_fraction}")
        self.fresh_fraction = float(fresh_fraction)
        _need(placement in PLACEMENTS,
              f"unknown data.placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
        self.placement = placement
        self._check(self.seq_len)

    def _check(self, seq_len):
        _need(self.segments[1] == 0 or 2 * self.segments[3] <= seq_len,
              f"data.segment_len_max={self.segments[3]} is too long for sequences of {seq_len} "
              f"tokens: a segment and its copy need 2 * segment_len_max <= {seq_len}")

    def _make(self, rng, n, seq_len):
        self._check(seq_len)
        if self.placement == "uniform":
            return _uniform_segments(rng, n, seq_len, self.vocab_size, self.table,
                                     *self.segments, lag=self.lag)[0]
        return _synthetic_tokens(rng, n, seq_len, self.vocab_size, self.table, *self.segments,
                                 lag=self.lag, fresh_fraction=self.fresh_fraction)[0]

    def batch(self, step, batch_size, seq_len, rows=None):
        x = self._make(_step_rng(self.seed, step), batch_size, seq_len)
        return x if rows is None else np.ascontiguousarray(x[rows])

    def eval_set(self, n, seq_len):
        return self._make(_rng(self.seed, EVAL_KEY), n, seq_len)

    def token_frequencies(self):
        x = self._make(_rng(self.seed, FREQ_KEY), 256, self.seq_len)
        return np.bincount(x.ravel(), minlength=self.vocab_size).astype(np.float64)


class TokenSource(Source):
    """Random windows of a (possibly memory-mapped) train array; fixed windows of an eval array."""

    def __init__(self, train_tokens, eval_tokens, vocab_size, seed, name="tokens"):
        self.train, self.eval = train_tokens, eval_tokens
        self.vocab_size, self.seed, self.name = int(vocab_size), int(seed), name

    @staticmethod
    def _windows(arr, offsets, seq_len):
        return np.asarray(arr[offsets[:, None] + np.arange(seq_len)]).astype(np.int32)

    def batch(self, step, batch_size, seq_len, rows=None):
        _need(len(self.train) >= seq_len, f"the {self.name} training split has {len(self.train)} "
              f"tokens, fewer than seq_len={seq_len}; use a larger corpus or smaller model.context")
        offsets = _step_rng(self.seed, step).integers(0, len(self.train) - seq_len + 1, batch_size)
        return self._windows(self.train, offsets if rows is None else offsets[rows], seq_len)

    def eval_set(self, n, seq_len):
        _need(len(self.eval) >= seq_len, f"the {self.name} held-out split has {len(self.eval)} "
              f"tokens, fewer than seq_len={seq_len}; raise data.holdout_fraction or add data")
        offsets = _rng(self.seed, EVAL_KEY).integers(0, len(self.eval) - seq_len + 1, n)
        return self._windows(self.eval, offsets, seq_len)

    def token_frequencies(self):
        t, chunk = self.train, 1 << 18
        if len(t) > 64 * chunk:  # evenly spaced contiguous chunks: cheap reads from a memmap
            starts = np.linspace(0, len(t) - chunk, 64).astype(np.int64)
            t = np.concatenate([t[s:s + chunk] for s in starts])
        counts = np.bincount(np.asarray(t, np.int64), minlength=self.vocab_size)
        return counts[:self.vocab_size].astype(np.float64)


def _check_text(path, data):
    _need(b"\0" not in data, f"{path} does not look like text (it contains NUL bytes); "
          "pass token files as .npy or .bin")
    bad = len(data) - len(data.decode("utf-8", "ignore").encode("utf-8"))
    _need(bad <= 0.3 * len(data), f"{path} does not look like text ({bad / max(len(data), 1):.0%} "
          "of its bytes are not UTF-8); pass token files as .npy or .bin")


def _split_files(names, docs, fraction):
    """Hold out the files with the smallest path hashes: independent of order, >= 1 per side."""
    n_eval = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).hexdigest())
    held = set(order[:n_eval])
    return ([d for i, d in enumerate(docs) if i not in held],
            [d for i, d in enumerate(docs) if i in held])


def _bpe(docs, vocab_size, path):
    import tokenizers  # imported here so synthetic-only runs do not need it
    if path and os.path.exists(path):
        return tokenizers.Tokenizer.from_file(path)
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator((d.decode("utf-8", "replace") for d in docs), vocab_size=vocab_size,
                            min_frequency=2, special_tokens=[END_OF_TEXT], show_progress=False)
    if path:  # every host of a pod may train and save it at once: never a half-written file
        tmp = _tmp_name(path)
        tok.save(tmp)
        os.replace(tmp, path)
    return tok


def _encode(train_docs, eval_docs, f, tokenizer_path):
    """Documents (bytes) -> (train ids, eval ids, vocab size); documents joined by a separator."""
    if f["tokenizer"] == "bytes":  # NUL separates: text files never contain it (_check_text)
        return (np.frombuffer(b"\0".join(train_docs), np.uint8),
                np.frombuffer(b"\0".join(eval_docs), np.uint8), 256)
    tok = _bpe(train_docs, f["bpe_vocab_size"], tokenizer_path)
    sep = tok.token_to_id(END_OF_TEXT)

    def join(docs):
        encoded = tok.encode_batch([d.decode("utf-8", "replace") for d in docs])
        parts = [p for e in encoded for p in (np.asarray(e.ids, np.int64), [sep])][:-1]
        return np.concatenate(parts).astype(np.int64)
    return join(train_docs), join(eval_docs), tok.get_vocab_size()


def _tmp_name(path):
    """A temporary name beside `path`, unique across the hosts that share its folder."""
    return f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"


def _write_atomic(path, save):
    tmp = _tmp_name(path)  # hosts sharing a workdir must never read half a file
    with open(tmp, "wb") as fh:
        save(fh)
    os.replace(tmp, path)


def _cached_tokens(workdir, key, build):
    """build(tokenizer_path) -> (train, eval, vocab), memoised in workdir under a config key."""
    if workdir is None:
        return build(None)
    meta = os.path.join(workdir, "tokens_meta.json")
    paths = [os.path.join(workdir, n) for n in ("tokens_train.npy", "tokens_eval.npy")]
    try:
        with open(meta) as fh:
            stored = json.load(fh)
    except (OSError, ValueError):
        stored = None
    if stored is not None and stored.get("key") == key and all(map(os.path.exists, paths)):
        return (*(np.load(p, mmap_mode="r") for p in paths), stored["vocab_size"])
    os.makedirs(workdir, exist_ok=True)
    tok_path = os.path.join(workdir, "tokenizer.json")
    if stored is not None and stored.get("key") != key and os.path.exists(tok_path):
        os.remove(tok_path)  # trained for another corpus or size
    train, ev, vocab = build(tok_path)
    dtype = np.uint8 if vocab <= 2**8 else np.uint16 if vocab <= 2**16 else np.uint32
    for path, arr in zip(paths, (train, ev)):
        _write_atomic(path, lambda fh, a=arr: np.save(fh, a.astype(dtype)))
    record = json.dumps({"key": key, "vocab_size": int(vocab)}).encode()
    _write_atomic(meta, lambda fh: fh.write(record))
    return train, ev, vocab


@functools.lru_cache(maxsize=None)
def _stdlib_docs():
    """(relative paths, contents) of the stdlib's .py files, sorted; read once per process."""
    root = sysconfig.get_paths()["stdlib"]
    names = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        rel = os.path.relpath(dirpath, root)
        names += [os.path.normpath(os.path.join(rel, n)) for n in files if n.endswith(".py")]
    names.sort()
    return tuple(names), tuple(pathlib.Path(root, n).read_bytes() for n in names)


def _list_files(path):
    _need(path, "data.path is empty; set it to a text file, directory, glob, .npy or .bin")
    if any(c in path for c in "*?["):
        files = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        _need(files, f"data.path {path!r} matches no files")
    elif os.path.isdir(path):
        files = []
        for dirpath, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip .git and the like
            files += [os.path.join(dirpath, n) for n in names if not n.startswith(".")]
        _need(files, f"data.path directory {path} contains no files")
    else:
        _need(os.path.isfile(path), f"data.path {path} does not exist")
        files = [path]
    return sorted(files)


def _load_token_file(path, bin_dtype):
    """A .npy (memory-mapped) or nanoGPT-style raw .bin of token ids -> (flat array, vocab size)."""
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is not a readable .npy file ({e})") from e
        _need(arr.dtype.kind in "iu", f"{path} must hold integer token ids, not {arr.dtype}")
        arr = arr.reshape(-1)
    else:
        _need(bin_dtype in BIN_DTYPES,
              f"unsupported data.bin_dtype {bin_dtype!r}; valid: {', '.join(BIN_DTYPES)}")
        size, item = os.path.getsize(path), np.dtype(bin_dtype).itemsize
        _need(size % item == 0, f"{path} has {size} bytes, not a multiple of {item} "
              f"(data.bin_dtype={bin_dtype})")
        arr = np.memmap(path, dtype=bin_dtype, mode="r") if size else np.zeros(0, bin_dtype)
    _need(arr.size, f"{path} holds no tokens")
    _need(arr.min() >= 0, f"{path} contains negative token ids")
    return arr, int(arr.max()) + 1


def _files_source(f, seed, workdir):
    files = _list_files(f["path"])
    if any(p.endswith((".npy", ".bin")) for p in files):
        _need(len(files) == 1, f"data.path {f['path']} matches {len(files)} files; token files "
              "(.npy, .bin) must be passed one at a time")
        arr, vocab = _load_token_file(files[0], f["bin_dtype"])
        cut = len(arr) - int(len(arr) * f["holdout_fraction"])
        return TokenSource(arr[:cut], arr[cut:], vocab, seed, name=files[0])
    docs = [pathlib.Path(p).read_bytes() for p in files]
    for p, d in zip(files, docs):
        _check_text(p, d)
    _need(sum(map(len, docs)), f"data.path {f['path']} is empty (0 bytes of text)")
    if len(docs) >= 2:
        train_docs, eval_docs = _split_files(files, docs, f["holdout_fraction"])
    else:  # one file: hold out its tail
        cut = len(docs[0]) - int(len(docs[0]) * f["holdout_fraction"])
        train_docs, eval_docs = [docs[0][:cut]], [docs[0][cut:]]
    key = ["files", os.path.abspath(f["path"]), f["tokenizer"], f["bpe_vocab_size"],
           f["holdout_fraction"]]
    build = lambda tok_path: _encode(train_docs, eval_docs, f, tok_path)  # noqa: E731
    return TokenSource(*_cached_tokens(workdir, key, build), seed, name=f["path"])


def _stdlib_source(f, seed, workdir):
    def build(tok_path):
        names, docs = _stdlib_docs()
        return _encode(*_split_files(names, docs, f["holdout_fraction"]), f, tok_path)
    key = ["pystdlib", sysconfig.get_paths()["stdlib"], f["tokenizer"], f["bpe_vocab_size"],
           f["holdout_fraction"]]
    return TokenSource(*_cached_tokens(workdir, key, build), seed, name="pystdlib")


def make_source(config, workdir=None):
    """The source config.data describes, checked against config.model; DataError if unusable."""
    f = {**_DEFAULTS, **dict(config.data.items())}
    seed, seq_len, model_vocab = int(config.seed), config.model.context + 1, config.model.vocab_size
    _need(seed >= 0, f"seed must be >= 0, got {seed}")
    if f["name"] == "synthetic":
        source = SyntheticSource(
            model_vocab, seed, f["background"], int(f["markov_branching"]), int(f["segments_min"]),
            int(f["segments_max"]), int(f["segment_len_min"]), int(f["segment_len_max"]), seq_len,
            float(f.get("fresh_fraction", 0.5)), f["placement"])
    else:
        _need(f["name"] in NAMES, f"unknown data.name {f['name']!r}; valid: {', '.join(NAMES)}")
        _need(f["tokenizer"] in TOKENIZERS,
              f"unknown data.tokenizer {f['tokenizer']!r}; valid: {', '.join(TOKENIZERS)}")
        _need(f["tokenizer"] != "bpe" or f["bpe_vocab_size"] >= 257, "data.bpe_vocab_size must be "
              f">= 257 (256 bytes + end-of-text), got {f['bpe_vocab_size']}")
        _need(0 < f["holdout_fraction"] < 1,
              f"data.holdout_fraction must be in (0, 1), got {f['holdout_fraction']}")
        source = (_stdlib_source if f["name"] == "pystdlib" else _files_source)(f, seed, workdir)
        for split, arr in (("training", source.train), ("held-out", source.eval)):
            _need(len(arr) >= seq_len, f"the {split} split of {source.name} has {len(arr)} tokens, "
                  f"fewer than model.context + 1 = {seq_len}; use a larger corpus or adjust "
                  "data.holdout_fraction")
    need = source.vocab_size
    _need(need <= model_vocab, f"model.vocab_size={model_vocab} is too small for data "
          f"{source.name!r}, which needs {need}; set model.vocab_size >= {need}")
    return source
