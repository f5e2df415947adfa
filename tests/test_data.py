"""Tests for icl_jax.data and icl_jax.corpus: determinism, host slicing, synthetic structure,
files, the token cache, errors."""
import os
import pathlib
import socket
import subprocess
import sysconfig
import time

import numpy as np
import pytest

from icl_jax import config as config_lib, corpus, data
from conftest import SMALL

ROOT = pathlib.Path(__file__).resolve().parents[1]
L = 65  # the small config: context 64 + 1 shifted target


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    """Every test tokenizes into its own cache folder (outside its tmp_path), never the user's."""
    monkeypatch.setenv("ICL_JAX_CACHE", str(tmp_path_factory.mktemp("cache") / "icl_jax"))


def _small_config(**data_fields):
    config = config_lib.load(SMALL)
    for key, value in data_fields.items():
        if key in ("vocab_size", "context"):
            config.model[key] = value
        else:
            config.data[key] = value
    return config


def _source(**fields):
    return data.make_source(_small_config(**fields))


def _copier_hits(x, k=3):
    """Per position t: when an ideal induction copier (predict what followed the latest earlier
    occurrence of x[t-k+1:t+1]) gets x[t+1] right, the distance back to that occurrence; else 0."""
    gaps = np.zeros(x.shape, int)
    for b, row in enumerate(x):
        row = row.tolist()
        for t in range(k - 1, len(row) - 1):
            key = row[t - k + 1:t + 1]
            for i in range(t - 1, k - 2, -1):
                if row[i - k + 1:i + 1] == key:
                    gaps[b, t] = (t - i) if row[i + 1] == row[t + 1] else 0
                    break
    return gaps


# ------------------------------------------------------------ determinism and slicing


@pytest.mark.parametrize("background", ["uniform", "markov"])
def test_synthetic_batches_are_pure_functions_of_seed_and_step(background):
    a, b = _source(background=background), _source(background=background)
    first = a.batch(5, 32, L)
    for step in range(5):
        a.batch(step, 32, L)
    np.testing.assert_array_equal(a.batch(5, 32, L), first)
    np.testing.assert_array_equal(b.batch(5, 32, L), first)
    assert not np.array_equal(a.batch(6, 32, L), first)
    assert first.dtype == np.int32 and first.shape == (32, L)
    assert first.min() >= 0 and first.max() < a.vocab_size == 64
    config = _small_config(background=background)
    config.seed = 1
    assert not np.array_equal(data.make_source(config).batch(5, 32, L), first)


def test_rows_are_exact_slices_of_the_global_batch(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(5000, dtype=np.int32) % 50)
    for source in (_source(), _source(background="markov"),
                   _source(name="files", path=str(tmp_path / "t.npy"))):
        full = source.batch(3, 32, L)
        for rows in (slice(0, 16), slice(16, 32), slice(8, 12)):
            np.testing.assert_array_equal(source.batch(3, 32, L, rows), full[rows])


def test_eval_set_is_fixed_and_not_a_training_batch():
    source = _source()
    ev = source.eval_set(64, L)
    np.testing.assert_array_equal(_source().eval_set(64, L), ev)
    np.testing.assert_array_equal(source.eval_set(64, L), ev)
    assert ev.dtype == np.int32 and ev.shape == (64, L)
    assert not any(np.array_equal(source.batch(s, 64, L), ev) for s in range(4))


def test_token_frequencies_cover_the_vocabulary():
    freq = _source().token_frequencies()
    assert freq.dtype == np.float64 and freq.shape == (64,)
    assert freq.min() > 0 and freq.sum() >= 64 * L


# ------------------------------------------------------------ synthetic structure


@pytest.mark.parametrize("placement", ["uniform", "after"])
def test_synthetic_repeats_pay_an_induction_copier_at_varying_offsets(placement):
    # placement "after" (saved runs) comes with the lag2 background of its time
    x = _source(placement=placement,
                **({"background": "lag2"} if placement == "after" else {})).batch(0, 64, L)
    gaps = _copier_hits(x)
    # ~1.5 intact segments of ~12 tokens per 65 fit (uniform placement cuts some at the
    # context's edges); chance 3-gram matches are ~65/64^3
    assert (gaps > 0).mean() > 0.1
    first_hit = [np.flatnonzero(g)[0] for g in gaps if g.any()]
    assert len(first_hit) > 55 and len(set(first_hit)) > 15  # where repeats start varies
    assert len(set(gaps[gaps > 0].tolist())) > 25  # how far back the copy is varies
    # without segments a copier finds almost nothing further back than two tokens: the lag2
    # background has no repeats, copy2's (the quick profile's) only its two-token runs
    # (x y x y: ~9% of positions, the copy of token t-2 that a previous-token head predicts)
    for background in ("lag2", "copy2"):
        plain = _copier_hits(_source(segments_min=0, segments_max=0,
                                     background=background).batch(0, 64, L))
        assert (plain > 2).mean() < 0.01, background
    assert (plain == 2).mean() > 0.05


def test_markov_background_uses_only_table_transitions_outside_segments():
    source = _source(background="markov", markov_branching=3)
    allowed = np.zeros((64, 64), bool)
    allowed[np.arange(64)[:, None], source.table] = True
    assert allowed.sum(1).tolist() == [3] * 64
    plain = _source(background="markov", markov_branching=3, segments_min=0, segments_max=0)
    x = plain.batch(0, 64, L)
    assert allowed[x[:, :-1], x[:, 1:]].all()
    rng = np.random.default_rng(0)
    x, pasted = data.synthetic_tokens(rng, 64, L, 64, source.table, 1, 3, 6, 19)
    outside = ~pasted[:, :-1] & ~pasted[:, 1:]
    assert outside.mean() > 0.3 and allowed[x[:, :-1], x[:, 1:]][outside].all()
    assert not allowed[x[:, :-1], x[:, 1:]].all()  # fresh segments break the chain


# ------------------------------------------------------------ files


def test_text_file_glob_and_directory(tmp_path):
    text = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(200)).encode()
    (tmp_path / "a.py").write_bytes(text)
    (tmp_path / "b.py").write_bytes(text.upper())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_bytes(text[::-1])
    cases = {str(tmp_path / "a.py"): 1, str(tmp_path / "*.py"): 2, str(tmp_path): 3}
    for path, n_files in cases.items():
        source = _source(name="files", path=path, vocab_size=256, holdout_fraction=0.3)
        assert source.vocab_size == 256
        # files are split whole, joined by one separator within a split
        assert len(source.train) + len(source.eval) == n_files * len(text) + max(0, n_files - 2)
        x = source.batch(0, 8, L)
        assert x.dtype == np.int32 and x.shape == (8, L) and x.max() < 256
        assert source.eval_set(4, L).shape == (4, L)
    # a single file holds out its tail
    one = _source(name="files", path=str(tmp_path / "a.py"), vocab_size=256, holdout_fraction=0.3)
    assert bytes(one.eval) == text[len(text) - int(len(text) * 0.3):]


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_files_round_trip(tmp_path, suffix):
    tokens = np.arange(10_000)  # a token's value is its position, so windows can be located
    path = tmp_path / f"t{suffix}"
    if suffix == ".npy":
        np.save(path, tokens.astype(np.int64))
    else:
        tokens.astype(np.uint16).tofile(path)
    source = _source(name="files", path=str(path), vocab_size=10_000, holdout_fraction=0.2)
    assert source.vocab_size == 10_000
    assert len(source.train) == 8000 and len(source.eval) == 2000
    for x, lo, hi in ((source.batch(7, 16, L), 0, 8000), (source.eval_set(16, L), 8000, 10_000)):
        assert x.dtype == np.int32 and x.shape == (16, L)
        for row in x:  # every row is a contiguous window inside its own split
            np.testing.assert_array_equal(row, np.arange(row[0], row[0] + L))
            assert lo <= row[0] and row[-1] < hi
    np.testing.assert_array_equal(source.token_frequencies(), (tokens < 8000).astype(float))


def test_pystdlib_bytes():
    source = _source(name="pystdlib", vocab_size=256)
    assert source.vocab_size == 256 and len(source.train) > 1_000_000 and len(source.eval) > 100_000
    x = source.batch(0, 4, 200)
    assert x.max() < 256
    assert sum(bytes(row.astype(np.uint8)).isascii() for row in x) >= 3
    assert not np.array_equal(source.eval_set(4, 200), x)


def test_bpe_is_trained_cached_and_reused(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    source_text = (ROOT / "icl_jax" / "corpus.py").read_text()
    for i in range(4):
        (texts / f"{i}.py").write_text(source_text[i * 3000:(i + 1) * 3000] * 3)
    fields = dict(name="files", path=str(texts), tokenizer="bpe", bpe_vocab_size=300,
                  vocab_size=300, holdout_fraction=0.25)
    source = data.make_source(_small_config(**fields), str(tmp_path / "work"))
    assert 257 <= source.vocab_size <= 300
    (cache,) = os.listdir(corpus.cache_root())
    assert {"tokenizer.json", "train.bin", "eval.bin", "meta.json"} == set(
        os.listdir(os.path.join(corpus.cache_root(), cache)))
    assert isinstance(source.train, np.memmap) and source.train.dtype == np.uint16
    assert len(source.train) < 0.8 * 3 * 9000  # merges compress the 3 training files' bytes
    again = data.make_source(_small_config(**fields))  # any workdir, or none: the same cache
    np.testing.assert_array_equal(again.batch(2, 8, L), source.batch(2, 8, L))
    # a different vocabulary, or an edited file, must not reuse stale tokens
    small = data.make_source(_small_config(**{**fields, "bpe_vocab_size": 280}))
    assert small.vocab_size <= 280 and len(os.listdir(corpus.cache_root())) == 2
    (texts / "0.py").write_text("x = 1\n" * 3000)
    edited = data.make_source(_small_config(**fields))
    assert len(os.listdir(corpus.cache_root())) == 3
    total = lambda s: s.meta["train"]["bytes"] + s.meta["eval"]["bytes"]  # noqa: E731
    assert total(source) == 4 * 9000 and total(edited) == 3 * 9000 + 18000


# ------------------------------------------------------------ pycode


def _pycode_root(root, n=12):
    """n distinct .py files (one nested, one duplicated under another name, one empty)."""
    text = (ROOT / "icl_jax" / "corpus.py").read_text()
    (root / "pkg").mkdir(parents=True)
    for i in range(n):
        folder = root / "pkg" if i % 3 == 0 else root
        (folder / f"m{i}.py").write_text(f"# module {i}\n" + text[i * 1500:(i + 1) * 1500])
    (root / "zz_copy_of_m1.py").write_text((root / "m1.py").read_text())
    (root / "__init__.py").write_text("")
    (root / "notes.txt").write_text("not python\n" * 100)
    return root


def _pycode(root, **fields):
    fields = dict(dict(vocab_size=256, holdout_fraction=0.25), **fields)
    config = _small_config(name="pycode", roots=str(root), **fields)
    config.model.context = 32
    return data.make_source(config)


def test_pycode_dedups_files_by_content(tmp_path):
    root = _pycode_root(tmp_path / "root")
    files = corpus.pycode_files([str(root)])
    names = sorted(os.path.relpath(p, root) for p, _, _ in files)
    assert len(names) == 12 and "zz_copy_of_m1.py" not in names and "m1.py" in names
    assert "pkg/m0.py" in names and "__init__.py" not in names
    source = _pycode(root)
    unique = sum(len(pathlib.Path(p).read_bytes()) for p, _, _ in files)
    # bytes: every distinct file once, joined by one NUL within each split
    assert len(source.train) + len(source.eval) == unique + 12 - 2
    assert source.meta["train"]["files"] + source.meta["eval"]["files"] == 12


def test_pycode_split_is_by_file_hash_and_stable_when_files_are_added(tmp_path):
    root = _pycode_root(tmp_path / "root", n=40)
    train, held = corpus.split_by_hash(corpus.pycode_files([str(root)]), 0.25)
    assert 4 <= len(held) <= 18 and len(train) + len(held) == 40
    assert all(int(d[:16], 16) < 0.25 * 2**64 for _, d, _ in held)
    for i in range(40, 80):
        (root / f"new{i}.py").write_text(f"value_{i} = {i * 7919}\n" * 20)
    train2, held2 = corpus.split_by_hash(corpus.pycode_files([str(root)]), 0.25)
    assert set(held) <= set(held2) and set(train) <= set(train2)  # no old file changed sides
    # one file per side at least, even when the fraction would leave a side empty
    train, held = corpus.split_by_hash(corpus.pycode_files([str(root)])[:3], 1e-9)
    assert len(held) == 1 and len(train) == 2


def test_pycode_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    root = _pycode_root(tmp_path / "root")
    first = _pycode(root, tokenizer="bpe", bpe_vocab_size=300, vocab_size=300)
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint16
    assert first.vocab_size == 300 and first.meta["train"]["tokens"] == len(first.train)

    def no_rebuild(*args):
        raise AssertionError("the cached corpus was rebuilt")
    monkeypatch.setattr(corpus, "_build_tokens", no_rebuild)
    monkeypatch.setattr(corpus, "pycode_files", no_rebuild)
    second = _pycode(root, tokenizer="bpe", bpe_vocab_size=300, vocab_size=300)
    np.testing.assert_array_equal(second.batch(0, 4, 33), first.batch(0, 4, 33))
    np.testing.assert_array_equal(second.eval_set(4, 33), first.eval_set(4, 33))


def test_pycode_build_is_atomic(tmp_path, monkeypatch):
    root = _pycode_root(tmp_path / "root")
    reference = _pycode(root)
    (built,) = os.listdir(corpus.cache_root())
    monkeypatch.setenv("ICL_JAX_CACHE", str(tmp_path / "cache2"))
    final = os.path.join(corpus.cache_root(), built)
    # a killed build left its folder: half a file, no meta.json; its process is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = f"{final}.{socket.gethostname()}.{dead.pid}.tmp"
    other_host = f"{final}.another-host.1.tmp"  # may still be building there: left alone
    for folder in (leftover, other_host):
        os.makedirs(folder)
        pathlib.Path(folder, "train.bin").write_bytes(b"\1\2\3")
    # a build that crashes midway publishes nothing
    real = corpus._build_tokens

    def crash(out, *args):
        pathlib.Path(out, "train.bin").write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(corpus, "_build_tokens", crash)
    with pytest.raises(KeyboardInterrupt):
        _pycode(root)
    # the dead builder's folder is cleared, the crashed one's too; the other host's is kept
    assert os.listdir(corpus.cache_root()) == [os.path.basename(other_host)]
    monkeypatch.setattr(corpus, "_build_tokens", real)
    source = _pycode(root)
    np.testing.assert_array_equal(source.train, reference.train)
    assert sorted(os.listdir(corpus.cache_root())) == sorted([built, os.path.basename(other_host)])


def test_pycode_waits_for_a_live_builder_on_this_host(tmp_path, monkeypatch):
    root = _pycode_root(tmp_path / "root")
    _pycode(root)
    (built,) = os.listdir(corpus.cache_root())
    monkeypatch.setenv("ICL_JAX_CACHE", str(tmp_path / "cache2"))
    builder = subprocess.Popen(["sleep", "1.5"])  # stands in for a process still building
    os.makedirs(os.path.join(corpus.cache_root(), f"{built}.{socket.gethostname()}.{builder.pid}.tmp"))
    t = time.perf_counter()
    _pycode(root)
    assert time.perf_counter() - t >= 1.0  # waited for it to end before building itself
    builder.wait()


def test_pycode_mistakes(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no python here")
    with pytest.raises(data.DataError, match="data.roots .*empty hold no readable .py files"):
        _pycode(tmp_path / "empty")
    with pytest.raises(data.DataError, match="data.roots entry .*missing is not a directory"):
        _pycode(tmp_path / "missing")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("x = 1\n" * 100)
    with pytest.raises(data.DataError, match="only one distinct .py file"):
        _pycode(tmp_path / "one")
    assert not os.path.exists(corpus.cache_root()) or not os.listdir(corpus.cache_root())


def test_pycode_default_roots_are_the_interpreters_path():
    roots = corpus.pycode_roots("")
    assert sysconfig.get_paths()["stdlib"] in roots or os.path.realpath(
        sysconfig.get_paths()["stdlib"]) in map(os.path.realpath, roots)
    assert all(os.path.isabs(r) and os.path.isdir(r) for r in roots)


# ------------------------------------------------------------ errors


def _error(match, workdir=None, **fields):
    with pytest.raises(data.DataError, match=match):
        data.make_source(_small_config(**fields), workdir)


@pytest.mark.parametrize("fields, match", [
    (dict(name="nope"), "data.name.*synthetic, pystdlib, pycode, files"),
    (dict(background="gaussian"), "data.background.*uniform, markov"),
    (dict(segment_len_min=10, segment_len_max=5), "data.segment_len_max"),
    (dict(segment_len_max=40), "data.segment_len_max.*2 \\* segment_len_max"),
    (dict(segments_min=-1), "data.segments_min"),
    (dict(segments_min=4, segments_max=2), "data.segments_max"),
    (dict(background="markov", markov_branching=0), "data.markov_branching"),
    (dict(background="markov", markov_branching=65), "data.markov_branching"),
    (dict(name="pystdlib", tokenizer="words"), "data.tokenizer.*bytes, bpe"),
    (dict(name="pystdlib", tokenizer="bpe", bpe_vocab_size=100), "data.bpe_vocab_size"),
    (dict(name="pystdlib", holdout_fraction=1.0), "data.holdout_fraction"),
    (dict(name="files", path=""), "data.path"),
    (dict(name="pystdlib"), "model.vocab_size=64.*256"),
])
def test_config_mistakes(fields, match):
    _error(match, **fields)


def test_file_mistakes(tmp_path):
    files = dict(name="files", vocab_size=256)
    _error("does not exist", path=str(tmp_path / "missing.txt"), **files)
    _error("matches no files", path=str(tmp_path / "*.txt"), **files)
    (tmp_path / "empty").mkdir()
    _error("contains no files", path=str(tmp_path / "empty"), **files)
    (tmp_path / "zero.txt").write_bytes(b"")
    _error("zero.txt.*empty", path=str(tmp_path / "zero.txt"), **files)
    (tmp_path / "nul.txt").write_bytes(b"hello\0world" * 100)
    _error("nul.txt does not look like text.*NUL.*\\.npy or \\.bin",
           path=str(tmp_path / "nul.txt"), **files)
    (tmp_path / "latin.txt").write_bytes(bytes(range(128, 256)) * 10)
    _error("latin.txt does not look like text", path=str(tmp_path / "latin.txt"), **files)
    (tmp_path / "short.txt").write_text("too short")
    _error("short.txt.*fewer than model.context \\+ 1 = 65",
           path=str(tmp_path / "short.txt"), **files)
    np.save(tmp_path / "neg.npy", np.array([1, -2, 3] * 100))
    _error("neg.npy contains negative", path=str(tmp_path / "neg.npy"), **files)
    np.save(tmp_path / "float.npy", np.zeros(100))
    _error("float.npy must hold integer", path=str(tmp_path / "float.npy"), **files)
    np.save(tmp_path / "none.npy", np.zeros(0, np.int32))
    _error("none.npy holds no tokens", path=str(tmp_path / "none.npy"), **files)
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    _error("data.bin_dtype 'int8'", path=str(tmp_path / "t.bin"), bin_dtype="int8", **files)
    _error("model.vocab_size=256.*1000", path=str(tmp_path / "t.bin"), **files)
    (tmp_path / "odd.bin").write_bytes(b"\1\2\3")
    _error("odd.bin has 3 bytes", path=str(tmp_path / "odd.bin"), **files)


def test_short_held_out_split_and_windows_longer_than_corpus(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(600) % 50)
    _error("held-out split.*60 tokens.*data.holdout_fraction",
           name="files", path=str(tmp_path / "t.npy"), holdout_fraction=0.1)
    source = _source(name="files", path=str(tmp_path / "t.npy"), holdout_fraction=0.2)
    with pytest.raises(data.DataError, match="seq_len=1000"):
        source.batch(0, 2, 1000)
    with pytest.raises(data.DataError, match="data.segment_len_max"):
        _source().batch(0, 2, 30)
