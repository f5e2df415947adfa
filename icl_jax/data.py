"""Token streams for training and evaluation: synthetic induction data, Python source, user files.

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
import shutil
import socket
import sys
import sysconfig
import time

import numpy as np

# rng stream keys that training steps (small non-negative ints) never reach
EVAL_KEY, TABLE_KEY, FREQ_KEY = 2**32 - 1, 2**32 - 2, 2**32 - 3
BIN_DTYPES = ("uint16", "uint32")
TOKENIZERS = ("bytes", "bpe")
NAMES = ("synthetic", "pystdlib", "pycode", "files")
# markov: token t depends on token t-1; lag2: on token t-2, which pays a head that
# attends to the previous token from the next position (the first half of induction);
# mixed: each sequence markov or lag2, half and half (placement "uniform" only)
BACKGROUNDS = ("uniform", "markov", "lag2", "mixed")
END_OF_TEXT = "<|endoftext|>"
ATTEMPTS = 8  # placements tried per segment before a row goes without it
# fields a config may omit; the values match configs/small.py
_DEFAULTS = dict(name="synthetic", background="uniform", markov_branching=4, segments_min=1,
                 segments_max=3, segment_len_min=6, segment_len_max=19, path="", bin_dtype="uint16",
                 tokenizer="bytes", bpe_vocab_size=512, holdout_fraction=0.1, fresh_fraction=0.5,
                 placement="after", roots="")


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
    # lag 0: "mixed", each row's lag 1 or 2 (drawn only then: other rows' streams unchanged)
    lags = np.full(n, lag) if lag else rng.integers(1, 3, n)
    first = rng.integers(0, vocab, (n, int(lags.max())), dtype=np.int32)
    rows = np.arange(n)
    for t in range(seq_len):
        prev = x[rows, np.maximum(t - lags, 0)]
        bg = np.where(t < lags, first[:, min(t, first.shape[1] - 1)], table[prev, choice[:, t]])
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
        self.lag = {"lag2": 2, "mixed": 0}.get(background, 1)
        _need(0 <= fresh_fraction <= 1, f"data.fresh_fraction must be in [0, 1], got {fresh_fraction}")
        self.fresh_fraction = float(fresh_fraction)
        _need(placement in PLACEMENTS,
              f"unknown data.placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
        _need(background != "mixed" or placement == "uniform",
              "data.background 'mixed' needs data.placement 'uniform'")
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


def _looks_like_text(data):
    bad = len(data) - len(data.decode("utf-8", "ignore").encode("utf-8"))
    return b"\0" not in data and bad <= 0.3 * len(data)


def _check_text(path, data):
    _need(b"\0" not in data, f"{path} does not look like text (it contains NUL bytes); "
          "pass token files as .npy or .bin")
    bad = len(data) - len(data.decode("utf-8", "ignore").encode("utf-8"))
    _need(bad <= 0.3 * len(data), f"{path} does not look like text ({bad / max(len(data), 1):.0%} "
          "of its bytes are not UTF-8); pass token files as .npy or .bin")


def _split_by_name(names, fraction):
    """Hold out the files with the smallest path hashes: independent of order, >= 1 per side."""
    n_eval = min(len(names) - 1, max(1, round(fraction * len(names))))
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).hexdigest())
    held = set(order[:n_eval])
    return ([n for i, n in enumerate(names) if i not in held],
            [n for i, n in enumerate(names) if i in held])


# ------------------------------------------------------------------ text: the token cache
#
# Text is tokenized once into a cache directory shared by every run on the machine, keyed by
# what defines the tokens (corpus, tokenizer, vocabulary size, split), not into each run's
# workdir: a search trains many models on one corpus, and building it (reading ~20,000 files,
# learning BPE merges, encoding ~100M tokens) costs minutes, while opening the cache is a
# memory map. The directory appears by one rename, so a crash or a concurrent builder never
# leaves half a corpus under the final name.

CACHE_FORMAT = 1  # bump when the layout or the encoding changes: old caches are then ignored
BPE_SAMPLE_BYTES = 64 << 20  # BPE merges are learned from at most this much training text
ENCODE_BATCH = 256  # documents per tokenizer call


def cache_root():
    """$ICL_JAX_CACHE, else $XDG_CACHE_HOME/icl_jax, else ~/.cache/icl_jax."""
    return os.environ.get("ICL_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "icl_jax")


class _Progress:
    """'label: 1,234/20,000 files, 12.3M tokens' on stderr, redrawn at most twice a second."""

    def __init__(self, label, total, unit="tokens"):
        self.label, self.total, self.unit, self.last = label, total, unit, 0.0

    def __call__(self, files, amount, final=False):
        now = time.monotonic()
        if final or now - self.last >= 0.5:
            self.last = now
            sys.stderr.write(f"\r{self.label}: {files:,}/{self.total:,} files, "
                             f"{amount / 1e6:.1f}M {self.unit}" + ("\n" if final else ""))
            sys.stderr.flush()


def _token_dtype(vocab):
    return np.uint8 if vocab <= 2**8 else np.uint16 if vocab <= 2**16 else np.uint32


def _bpe_sample(docs, read):
    """Every k-th training document, k chosen so the sample is about BPE_SAMPLE_BYTES."""
    sizes = [len(d) if isinstance(d, bytes) else os.path.getsize(d) for d in docs]
    stride = max(1, -(-sum(sizes) // BPE_SAMPLE_BYTES))
    return (read(d).decode("utf-8", "replace") for d in docs[::stride])


def _build_tokens(out, train_docs, eval_docs, f, label, read):
    """Tokenizes the documents (paths or bytes) into out/{train,eval}.bin; returns the meta.

    Documents are joined by one separator (NUL for bytes, END_OF_TEXT for BPE), none after the
    last, and written batch by batch, so memory stays flat however large the corpus."""
    tok = None
    if f["tokenizer"] == "bpe":
        import tokenizers  # imported here so synthetic-only runs do not need it
        sys.stderr.write(f"{label}: learning {f['bpe_vocab_size']} BPE tokens\n")
        tok = tokenizers.ByteLevelBPETokenizer()
        tok.train_from_iterator(_bpe_sample(train_docs, read), vocab_size=f["bpe_vocab_size"],
                                min_frequency=2, special_tokens=[END_OF_TEXT], show_progress=False)
        tok.save(os.path.join(out, "tokenizer.json"))
        vocab, sep = tok.get_vocab_size(), tok.token_to_id(END_OF_TEXT)
    else:  # NUL separates: text never contains it (_check_text, _looks_like_text)
        vocab, sep = 256, 0
    dtype, separator = _token_dtype(vocab), np.array([sep])
    progress = _Progress(f"{label}: tokenizing", len(train_docs) + len(eval_docs))
    meta, done, total = dict(vocab_size=int(vocab), dtype=np.dtype(dtype).name), 0, 0
    for split, docs in (("train", train_docs), ("eval", eval_docs)):
        n_tokens, n_bytes = 0, 0
        with open(os.path.join(out, f"{split}.bin"), "wb") as fh:
            for i in range(0, len(docs), ENCODE_BATCH):
                texts = [read(d) for d in docs[i:i + ENCODE_BATCH]]
                n_bytes += sum(map(len, texts))
                if tok is None:
                    ids = [np.frombuffer(t, np.uint8) for t in texts]
                else:
                    ids = [np.asarray(e.ids) for e in
                           tok.encode_batch([t.decode("utf-8", "replace") for t in texts])]
                parts = []
                for a in ids:
                    if n_tokens or parts:
                        parts.append(separator)
                    parts.append(a)
                arr = np.concatenate(parts).astype(dtype)
                arr.tofile(fh)
                n_tokens, done, total = n_tokens + len(arr), done + len(texts), total + len(arr)
                progress(done, total)
        meta[split] = dict(files=len(docs), bytes=n_bytes, tokens=n_tokens)
    progress(done, total, final=True)
    return meta


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a builder that died but was not yet reaped (a zombie) builds nothing
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _remove_dead_builds(final):
    """Deletes this host's leftover build folders of `final` whose builder has died."""
    host = socket.gethostname()
    for tmp in glob.glob(glob.escape(final) + ".*.tmp"):
        owner, _, pid = tmp[len(final) + 1:-len(".tmp")].rpartition(".")
        if owner == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_live_build(final, poll=0.5):
    """Another process of this host building the same corpus: wait for it, not build twice."""
    host, told = socket.gethostname(), None
    while not os.path.exists(os.path.join(final, "meta.json")):
        live = []
        for tmp in glob.glob(glob.escape(final) + ".*.tmp"):
            owner, _, pid = tmp[len(final) + 1:-len(".tmp")].rpartition(".")
            if owner == host and pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                live.append(pid)
        if not live:
            return
        if live[0] != told:
            told = live[0]
            sys.stderr.write(f"waiting for process {told} to finish building {final}\n")
        time.sleep(poll)


def _open_corpus(folder):
    with open(os.path.join(folder, "meta.json")) as fh:
        meta = json.load(fh)

    def load(split):
        path = os.path.join(folder, f"{split}.bin")
        if not os.path.getsize(path):  # np.memmap refuses empty files
            return np.zeros(0, meta["dtype"])
        return np.memmap(path, dtype=meta["dtype"], mode="r")
    return load("train"), load("eval"), meta


def _cached_corpus(label, key, build):
    """(train memmap, eval memmap, meta) of the corpus `key` names; build(folder) -> meta fills
    a fresh folder the first time, and a rename publishes it whole."""
    key = [CACHE_FORMAT, BPE_SAMPLE_BYTES, *key]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    final = os.path.join(cache_root(), f"{label}-{digest}")
    if not os.path.exists(os.path.join(final, "meta.json")):
        os.makedirs(cache_root(), exist_ok=True)
        _remove_dead_builds(final)
        _wait_for_live_build(final)
    if not os.path.exists(os.path.join(final, "meta.json")):
        tmp = _tmp_name(final)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            meta = dict(build(tmp), key=key)
            with open(os.path.join(tmp, "meta.json"), "w") as fh:
                json.dump(meta, fh, indent=1)
            if os.path.isdir(final) and not os.path.exists(os.path.join(final, "meta.json")):
                shutil.rmtree(final, ignore_errors=True)  # not ours to keep: no build leaves one
            try:
                os.rename(tmp, final)
            except OSError:  # another builder published first; its tokens are the same
                if not os.path.exists(os.path.join(final, "meta.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _open_corpus(final)


def _tmp_name(path):
    """A temporary name beside `path`, unique across the hosts that share its folder."""
    return f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"


def _read_path(path):
    return pathlib.Path(path).read_bytes()


def _read_checked(doc):
    if isinstance(doc, bytes):
        return doc
    content = _read_path(doc)
    _check_text(doc, content)
    return content


def _text_source(label, key, split, f, seed, read, name):
    """split() -> (train documents, held-out documents), called only if the cache is missing."""
    train, ev, meta = _cached_corpus(
        label, key, lambda out: _build_tokens(out, *split(), f, label, read))
    source = TokenSource(train, ev, meta["vocab_size"], seed, name=name)
    source.meta = meta
    return source


@functools.lru_cache(maxsize=None)
def _stdlib_files():
    """Absolute paths of the stdlib's .py files, sorted by relative path."""
    root = sysconfig.get_paths()["stdlib"]
    names = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        rel = os.path.relpath(dirpath, root)
        names += [os.path.normpath(os.path.join(rel, n)) for n in files if n.endswith(".py")]
    names.sort()
    return tuple(os.path.join(root, n) for n in names)


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


def _files_source(f, seed):
    files = _list_files(f["path"])
    if any(p.endswith((".npy", ".bin")) for p in files):
        _need(len(files) == 1, f"data.path {f['path']} matches {len(files)} files; token files "
              "(.npy, .bin) must be passed one at a time")
        arr, vocab = _load_token_file(files[0], f["bin_dtype"])
        cut = len(arr) - int(len(arr) * f["holdout_fraction"])
        return TokenSource(arr[:cut], arr[cut:], vocab, seed, name=files[0])
    stats = [os.stat(p) for p in files]
    _need(sum(s.st_size for s in stats), f"data.path {f['path']} is empty (0 bytes of text)")
    # the user edits their files: any change of name, size or time makes a new cache
    fingerprint = hashlib.sha256(json.dumps(
        [(p, s.st_size, s.st_mtime_ns) for p, s in zip(files, stats)]).encode()).hexdigest()
    key = ["files", os.path.abspath(f["path"]), fingerprint, f["tokenizer"], f["bpe_vocab_size"],
           f["holdout_fraction"]]
    def split():
        if len(files) >= 2:
            return _split_by_name(files, f["holdout_fraction"])
        content = _read_checked(files[0])  # one file: hold out its tail
        cut = len(content) - int(len(content) * f["holdout_fraction"])
        return [content[:cut]], [content[cut:]]
    return _text_source("files", key, split, f, seed, _read_checked, f["path"])


def _stdlib_source(f, seed):
    key = ["pystdlib", sysconfig.get_paths()["stdlib"], f["tokenizer"], f["bpe_vocab_size"],
           f["holdout_fraction"]]
    split = lambda: _split_by_name(list(_stdlib_files()), f["holdout_fraction"])  # noqa: E731
    return _text_source("pystdlib", key, split, f, seed, _read_path, "pystdlib")


# ------------------------------------------------------------------ pycode


def pycode_roots(roots=""):
    """The folders `data.roots` names (comma-separated), or the running interpreter's sys.path
    folders when it is empty; absolute, sorted, without duplicates."""
    if roots.strip():
        out = [os.path.abspath(os.path.expanduser(r.strip())) for r in roots.split(",") if r.strip()]
        for r in out:
            _need(os.path.isdir(r), f"data.roots entry {r} is not a directory")
    else:
        out = [os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)]
    return sorted(set(out))


def pycode_files(roots):
    """(path, sha256 hex, bytes) of every distinct .py file under `roots`: the first path in
    sorted order stands for each content; empty, binary and unreadable files are left out."""
    paths = set()
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
            paths.update(os.path.join(dirpath, n) for n in files if n.endswith(".py"))
    seen, kept, n_bytes = set(), [], 0
    progress = _Progress("pycode: reading", len(paths), unit="bytes")
    for i, path in enumerate(sorted(paths)):
        try:
            content = _read_path(path)
        except OSError:  # a dangling link or a file we may not read
            continue
        digest = hashlib.sha256(content).hexdigest()
        if content and digest not in seen and _looks_like_text(content):
            seen.add(digest)
            kept.append((path, digest, len(content)))
        n_bytes += len(content)
        progress(i + 1, n_bytes)
    progress(len(paths), n_bytes, final=True)
    return kept


def split_by_hash(files, fraction):
    """Held out: the files whose content hash, read as a number in [0, 1), is below `fraction`.
    A file's side depends on its content alone, so adding files moves no other file; if a side
    would be empty, the file with the smallest (or largest) hash crosses over."""
    by_hash = sorted(files, key=lambda x: x[1])
    held = {d for _, d, _ in files if int(d[:16], 16) < fraction * 2**64}
    if not held:
        held = {by_hash[0][1]}
    if len(held) == len(files):
        held.discard(by_hash[-1][1])
    return ([x for x in files if x[1] not in held], [x for x in files if x[1] in held])


def _pycode_source(f, seed):
    roots = pycode_roots(f["roots"])

    def split():
        files = pycode_files(roots)
        _need(files, f"data.roots {', '.join(roots) or '(none)'} hold no readable .py files")
        _need(len(files) >= 2, f"data.roots {', '.join(roots)} hold only one distinct .py file; "
              "a train and a held-out split need at least two")
        return tuple([p for p, _, _ in side] for side in split_by_hash(files, f["holdout_fraction"]))
    # installing a package does not change the key: the corpus is frozen at its first build,
    # so resumed runs keep their tokens (delete the cache folder to take new files in)
    key = ["pycode", roots, f["tokenizer"], f["bpe_vocab_size"], f["holdout_fraction"]]
    return _text_source("pycode", key, split, f, seed, _read_path, "pycode")


def make_source(config, workdir=None):
    """The source config.data describes, checked against config.model; DataError if unusable.

    Text is tokenized into the shared cache (cache_root()), not into `workdir`, which is
    accepted so that every caller can pass what it has."""
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
        source = {"pystdlib": _stdlib_source, "pycode": _pycode_source,
                  "files": _files_source}[f["name"]](f, seed)
        for split, arr in (("training", source.train), ("held-out", source.eval)):
            _need(len(arr) >= seq_len, f"the {split} split of {source.name} has {len(arr)} tokens, "
                  f"fewer than model.context + 1 = {seq_len}; use a larger corpus or adjust "
                  "data.holdout_fraction")
    need = source.vocab_size
    _need(need <= model_vocab, f"model.vocab_size={model_vocab} is too small for data "
          f"{source.name!r}, which needs {need}; set model.vocab_size >= {need}")
    return source
