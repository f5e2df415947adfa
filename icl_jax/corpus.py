"""Text corpora as token streams: the Python standard library (pystdlib), every .py file the
interpreter reaches (pycode), and user files (text, or token ids in .npy/.bin).

Text is read, optionally BPE-tokenized, and written once into a memory-mapped cache shared by
every run on the machine (cache_root()); a TokenSource cuts training windows out of it by
(seed, step), like every source in icl_jax.data, and a fixed held-out set from its eval split.
icl_jax.data.make_source dispatches here for every name but "synthetic".
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

from icl_jax.sources import EVAL_KEY, DataError, Source, need, step_rng, stream_rng

BIN_DTYPES = ("uint16", "uint32")
TOKENIZERS = ("bytes", "bpe")
END_OF_TEXT = "<|endoftext|>"


class TokenSource(Source):
    """Random windows of a (possibly memory-mapped) train array; fixed windows of an eval array."""

    def __init__(self, train_tokens, eval_tokens, vocab_size, seed, name="tokens"):
        self.train, self.eval = train_tokens, eval_tokens
        self.vocab_size, self.seed, self.name = int(vocab_size), int(seed), name

    @staticmethod
    def _windows(arr, offsets, seq_len):
        return np.asarray(arr[offsets[:, None] + np.arange(seq_len)]).astype(np.int32)

    def batch(self, step, batch_size, seq_len, rows=None):
        need(len(self.train) >= seq_len, f"the {self.name} training split has {len(self.train)} "
             f"tokens, fewer than seq_len={seq_len}; use a larger corpus or smaller model.context")
        offsets = step_rng(self.seed, step).integers(0, len(self.train) - seq_len + 1, batch_size)
        return self._windows(self.train, offsets if rows is None else offsets[rows], seq_len)

    def eval_set(self, n, seq_len):
        need(len(self.eval) >= seq_len, f"the {self.name} held-out split has {len(self.eval)} "
             f"tokens, fewer than seq_len={seq_len}; raise data.holdout_fraction or add data")
        offsets = stream_rng(self.seed, EVAL_KEY).integers(0, len(self.eval) - seq_len + 1, n)
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
    need(b"\0" not in data, f"{path} does not look like text (it contains NUL bytes); "
         "pass token files as .npy or .bin")
    bad = len(data) - len(data.decode("utf-8", "ignore").encode("utf-8"))
    need(bad <= 0.3 * len(data), f"{path} does not look like text ({bad / max(len(data), 1):.0%} "
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
    need(path, "data.path is empty; set it to a text file, directory, glob, .npy or .bin")
    if any(c in path for c in "*?["):
        files = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        need(files, f"data.path {path!r} matches no files")
    elif os.path.isdir(path):
        files = []
        for dirpath, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip .git and the like
            files += [os.path.join(dirpath, n) for n in names if not n.startswith(".")]
        need(files, f"data.path directory {path} contains no files")
    else:
        need(os.path.isfile(path), f"data.path {path} does not exist")
        files = [path]
    return sorted(files)


def _load_token_file(path, bin_dtype):
    """A .npy (memory-mapped) or nanoGPT-style raw .bin of token ids -> (flat array, vocab size)."""
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is not a readable .npy file ({e})") from e
        need(arr.dtype.kind in "iu", f"{path} must hold integer token ids, not {arr.dtype}")
        arr = arr.reshape(-1)
    else:
        need(bin_dtype in BIN_DTYPES,
             f"unsupported data.bin_dtype {bin_dtype!r}; valid: {', '.join(BIN_DTYPES)}")
        size, item = os.path.getsize(path), np.dtype(bin_dtype).itemsize
        need(size % item == 0, f"{path} has {size} bytes, not a multiple of {item} "
             f"(data.bin_dtype={bin_dtype})")
        arr = np.memmap(path, dtype=bin_dtype, mode="r") if size else np.zeros(0, bin_dtype)
    need(arr.size, f"{path} holds no tokens")
    need(arr.min() >= 0, f"{path} contains negative token ids")
    return arr, int(arr.max()) + 1


def _files_source(f, seed):
    files = _list_files(f["path"])
    if any(p.endswith((".npy", ".bin")) for p in files):
        need(len(files) == 1, f"data.path {f['path']} matches {len(files)} files; token files "
             "(.npy, .bin) must be passed one at a time")
        arr, vocab = _load_token_file(files[0], f["bin_dtype"])
        cut = len(arr) - int(len(arr) * f["holdout_fraction"])
        return TokenSource(arr[:cut], arr[cut:], vocab, seed, name=files[0])
    stats = [os.stat(p) for p in files]
    need(sum(s.st_size for s in stats), f"data.path {f['path']} is empty (0 bytes of text)")
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
            need(os.path.isdir(r), f"data.roots entry {r} is not a directory")
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
        need(files, f"data.roots {', '.join(roots) or '(none)'} hold no readable .py files")
        need(len(files) >= 2, f"data.roots {', '.join(roots)} hold only one distinct .py file; "
             "a train and a held-out split need at least two")
        return tuple([p for p, _, _ in side] for side in split_by_hash(files, f["holdout_fraction"]))
    # installing a package does not change the key: the corpus is frozen at its first build,
    # so resumed runs keep their tokens (delete the cache folder to take new files in)
    key = ["pycode", roots, f["tokenizer"], f["bpe_vocab_size"], f["holdout_fraction"]]
    return _text_source("pycode", key, split, f, seed, _read_path, "pycode")


def make_text_source(f, seed, seq_len):
    """The TokenSource of the text corpus f["name"] names (f: config.data with the defaults
    filled in), with both splits at least seq_len tokens long; DataError if unusable."""
    need(f["tokenizer"] in TOKENIZERS,
         f"unknown data.tokenizer {f['tokenizer']!r}; valid: {', '.join(TOKENIZERS)}")
    need(f["tokenizer"] != "bpe" or f["bpe_vocab_size"] >= 257, "data.bpe_vocab_size must be "
         f">= 257 (256 bytes + end-of-text), got {f['bpe_vocab_size']}")
    need(0 < f["holdout_fraction"] < 1,
         f"data.holdout_fraction must be in (0, 1), got {f['holdout_fraction']}")
    source = {"pystdlib": _stdlib_source, "pycode": _pycode_source,
              "files": _files_source}[f["name"]](f, seed)
    for split, arr in (("training", source.train), ("held-out", source.eval)):
        need(len(arr) >= seq_len, f"the {split} split of {source.name} has {len(arr)} tokens, "
             f"fewer than model.context + 1 = {seq_len}; use a larger corpus or adjust "
             "data.holdout_fraction")
    return source
