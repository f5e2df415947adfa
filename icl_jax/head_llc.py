"""Every head's local learning coefficient across training: the refined LLCs of Wang, Hoogland,
van Wingerden, Furman and Murfet (2024, arXiv 2410.02984).

- The weight-refined LLC (wrLLC) of head (l, h): llc.py's SGLD, localised at a snapshot, moving
  only that head's weights, W_Q[h], W_K[h], W_V[h], W_O[h], b_Q[h], b_K[h], b_V[h] (and its
  smear alpha where keys are smeared), every other weight held at the snapshot; the loss is the
  whole model's. b_O is shared by the layer's heads and is not one head's: it stays fixed, as
  in devinterp's own head restriction (devinterp.slt.weight_restrictions, "l0h1"). A head of d
  parameters at a regular minimum has wrLLC d/2 (d = 4 d_model d_head + 3 d_head).
- The data-refined LLC (drLLC): the same with the loss taken on a subset of the data, named
  (subset_pools): on the synthetic data, the predictions of pasted tokens ("pasted") against
  the background's ("background"); on pycode, held-out test files ("tests") against held-out
  library files ("library"), chosen by a filter like data.roots.

The sampler, its hyperparameters and n_beta are the `llc` section's (llc.py), so a head's
wrLLC and the model's LLC differ only in which weights move. Every head, subset and snapshot
sees the same minibatches and the same noise (common random numbers). heads_over_snapshots
runs one compiled program per snapshot (on accelerators, per chunk of snapshots): every
subset and head of every layer, every chain; heads and chains vmapped on accelerators, one
after another on CPUs (llc.py says why). estimate_head_llc does one head of one snapshot, as
llc.estimate_llc does a model, and the program gives what it gives (tests/test_head_llc.py).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax import llc
from icl_jax.model import ModelConfig

HEAD_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
# the default drLLC subsets of each kind of data (subset_pools)
SYNTHETIC_SUBSETS = ("pasted", "background")
TEXT_SUBSETS = ("tests", "library")
# held-out files of pycode that are tests (comma-separated globs, matched against the path)
TEST_FILES = "*/test_*.py,*/*_test.py,*/tests/*,*/test/*,*/testing/*"


# ----------------------------------------------------------------------------- one head

def head_names(model_cfg) -> tuple:
    """The names of a head's weights in its layer's "attn" params."""
    model_cfg = ModelConfig.of(model_cfg)
    return HEAD_WEIGHTS + (("smear",) if model_cfg.smear_keys else ())


def head_weights(params, layer: int, head: int, names=HEAD_WEIGHTS) -> dict:
    """{name: head's slice} of a snapshot's params: W_Q [D, K], W_O [K, D], b_Q [K], ..."""
    attn = params[f"block_{layer}"]["attn"]
    return {n: attn[n][head] for n in names}


def with_head(params, layer: int, head, w: dict):
    """params with head (layer, head)'s weights replaced by w (head may be traced)."""
    block = params[f"block_{layer}"]
    attn = {**block["attn"], **{n: jnp.asarray(block["attn"][n]).at[head].set(w[n]) for n in w}}
    return {**params, f"block_{layer}": {**block, "attn": attn}}


def n_head_params(model_cfg) -> int:
    """d, the parameters of one head (its wrLLC at a regular minimum is d / 2)."""
    model_cfg = ModelConfig.of(model_cfg)
    D, K = model_cfg.d_model, model_cfg.d_head
    return 4 * D * K + 3 * K + (1 if model_cfg.smear_keys else 0)


def estimate_head_llc(model, params, layer: int, head: int, data, cfg, seed: int = 0,
                      indices=None, stacking: str | None = None) -> dict:
    """The wrLLC of one head of one snapshot (for notebooks): llc.estimate_llc of the loss as
    a function of that head's weights alone. data: held-out tokens [N, T + 1] (the wrLLC), or
    {"tokens": [N, T + 1], "weight": [N, T]} (a drLLC: the loss on the weighted predictions);
    indices: the minibatches [chains, burn_in + draws, batch_size] (default
    llc.batch_indices(seed)). The noise of step s of chain c is llc.step_noise(
    llc.chain_keys(jax.random.key(seed), C, S)[c, s], head_weights(params, layer, head)).
    One compiled program serves every head of a layer (cached by architecture).
    Returns llc.estimate_llc's dict."""
    llc.check(cfg)
    pool = _as_pool(data)
    n_pool = jax.tree.leaves(pool)[0].shape[0]
    idx = llc.batch_indices(n_pool, cfg, seed) if indices is None else np.asarray(indices, np.int32)
    program = _head_program(model, llc.sampler_settings(cfg),
                            llc.resolve_stacking(stacking), layer)
    params = jax.tree.map(jnp.asarray, params)  # a restored snapshot's numpy arrays, on device
    losses, init = jax.device_get(program(params, head, pool, jnp.asarray(idx),
                                          jax.random.key(seed)))
    w_star = head_weights(params, layer, head, head_names(model.cfg))
    out = llc.summarise(np.asarray(losses), float(init), llc.count_params(w_star), cfg)
    out["nbeta"] = llc.nbeta_of(cfg)
    return out


@functools.lru_cache(maxsize=8)
def _head_program(model, hyper: tuple, stacking: str, layer: int):
    names, loss_fn = head_names(model.cfg), llc.weighted_token_loss(model)

    def run(params, head, pool, idx_CSM, key):
        loss = lambda w, b: loss_fn(with_head(params, layer, head, w), b)  # noqa: E731
        return llc.sample_chains(loss, hyper, stacking, head_weights(params, layer, head, names),
                                 pool, idx_CSM, key)
    return jax.jit(run)


def _as_pool(data) -> dict:
    """Tokens [N, T + 1] -> {"tokens", "weight": ones [N, T]}; a tree of arrays as it is."""
    if isinstance(data, dict):
        return jax.tree.map(jnp.asarray, data)
    tokens = jnp.asarray(data)
    return {"tokens": tokens, "weight": jnp.ones((tokens.shape[0], tokens.shape[1] - 1),
                                                 jnp.float32)}


# ----------------------------------------------------------------------------- snapshots

def _snapshot(loss_fn, n_layers, n_heads, names, hyper, stacking, params, pools_P, idx_CSM,
              key):
    """(losses [P, L, H, C, S], loss at w* [P]) of one snapshot: every subset p (pools_P: a
    pool tree stacked on a leading subset axis), head and chain. Layers are a loop here, so
    that a head's loss is differentiated through its own layer and those above only; heads
    and subsets are one axis, mapped or vmapped."""
    P = jax.tree.leaves(pools_P)[0].shape[0]
    pool = lambda p: jax.tree.map(lambda a: a[p], pools_P)  # noqa: E731
    p_idx, h_idx = (jnp.asarray(a.ravel()) for a in np.meshgrid(np.arange(P), np.arange(n_heads),
                                                                 indexing="ij"))
    per_layer = []
    for layer in range(n_layers):
        def one(p, h, layer=layer):
            loss = lambda w, b: loss_fn(with_head(params, layer, h, w), b)  # noqa: E731
            return llc.chain_losses(loss, hyper, stacking, head_weights(params, layer, h, names),
                                    pool(p), idx_CSM, key)
        if stacking == "vmap":
            losses = jax.vmap(one)(p_idx, h_idx)
        else:
            losses = jax.lax.map(lambda ph: one(*ph), (p_idx, h_idx))
        per_layer.append(losses.reshape(P, n_heads, *losses.shape[1:]))
    init_P = jnp.stack([loss_fn(params, pool(p)) for p in range(P)])
    return jnp.stack(per_layer, axis=1), init_P


def _build(loss_fn, model_cfg, hyper: tuple, stacking: str):
    model_cfg = ModelConfig.of(model_cfg)
    per = functools.partial(_snapshot, loss_fn, model_cfg.n_layers, model_cfg.n_heads,
                            head_names(model_cfg), hyper, stacking)
    if stacking == "vmap":
        return jax.jit(jax.vmap(per, in_axes=(0, None, None, None)))
    return jax.jit(per)


@functools.lru_cache(maxsize=8)
def _program(model, hyper: tuple, stacking: str):
    """One jitted program per architecture and settings (as llc._snapshots_program): a chunk
    of snapshots vmapped for "vmap", one snapshot for "map"."""
    return _build(llc.weighted_token_loss(model), model.cfg, hyper, stacking)


def heads_over_snapshots(model, stacked_params, pools, cfg, steps=None, seed: int = 0,
                         stacking: str | None = None, chunk: int = 16,
                         progress: bool = False, loss_fn=None) -> dict:
    """Every head's wrLLC (and drLLC) at every snapshot of a stack.

    model: a model.Transformer; stacked_params: its params with a leading snapshot axis (or a
    list of trees); pools: {subset name: held-out tokens [N, T + 1], or {"tokens", "weight"
    [N, T]}}, every subset of the same N (subset_pools builds them; name "all" for the wrLLC);
    cfg: the `llc` section; steps: the snapshots' training steps (to name a chain that went
    bad); stacking: "vmap" (snapshots `chunk` at a time, the last chunk padded) or "map" (one
    snapshot a call), default scores.default_stacking(). loss_fn(params, batch) -> scalar,
    the loss of a minibatch of a pool (default llc.weighted_token_loss(model); a pool may then
    be any tree of arrays with a leading example axis): a hand-built loss whose answer is known
    (tests/test_head_llc.py) runs through the same program.
    Returns numpy arrays llc, llc_std, llc_se [S, P, L, H] (se: the chains' standard error,
    std / sqrt(good chains)), llc_chains [S, P, L, H, C], init_loss [S, P], and steps,
    subsets (the P names, in pools' order), n_params (d of one head), nbeta, diverged (a list
    of {step, subset, head, chain, reason}) and messages.
    """
    llc.check(cfg)
    if isinstance(stacked_params, (list, tuple)):
        stacked_params = jax.tree.map(lambda *a: np.stack(a), *stacked_params)
    n_snap = jax.tree.leaves(stacked_params)[0].shape[0]
    steps = list(range(n_snap)) if steps is None else [int(s) for s in steps]
    if len(steps) != n_snap:
        raise ValueError(f"{len(steps)} steps given for {n_snap} snapshots")
    names = list(pools)
    as_pools = [_as_pool(pools[n]) for n in names]
    shapes = [[a.shape for a in jax.tree.leaves(p)] for p in as_pools]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("every subset's pool must hold as many sequences of one length: "
                         + ", ".join(f"{n} {s}" for n, s in zip(names, shapes)))
    pools_P = jax.tree.map(lambda *a: jnp.stack(a), *as_pools)
    stacking = llc.resolve_stacking(stacking)
    hyper = llc.sampler_settings(cfg)
    program = (_program(model, hyper, stacking)
               if loss_fn is None else _build(loss_fn, model.cfg, hyper, stacking))
    idx = jnp.asarray(llc.batch_indices(shapes[0][0][0], cfg, seed))
    key = jax.random.key(seed)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    d = llc.count_params(head_weights(jax.tree.map(lambda a: a[0], stacked_params), 0, 0,
                                      head_names(model.cfg)))
    chunk = max(1, min(chunk, n_snap)) if stacking == "vmap" else 1
    out = {k: [] for k in ("llc", "llc_std", "llc_se", "llc_chains", "init_loss")}
    diverged, messages, t0 = [], [], time.perf_counter()
    for start in range(0, n_snap, chunk):
        part = jax.tree.map(lambda a: a[start:start + chunk], stacked_params)
        n = jax.tree.leaves(part)[0].shape[0]
        if stacking == "map":
            losses, init = jax.device_get(jax.tree.map(
                lambda a: a[None], program(jax.tree.map(lambda a: a[0], part), pools_P, idx,
                                           key)))
        else:
            if n < chunk:  # padded with the last snapshot: one shape, one compile
                part = jax.tree.map(lambda a: np.concatenate([a] + [a[-1:]] * (chunk - n)), part)
            losses, init = jax.device_get(program(part, pools_P, idx, key))
        for i in range(n):
            grid = np.empty((len(names), L, H), object)
            for p, l, h in np.ndindex(grid.shape):
                grid[p, l, h] = llc.summarise(
                    np.asarray(losses[i, p, l, h]), float(init[i, p]), d, cfg,
                    {"snapshot step": steps[start + i], "subset": names[p],
                     "head": f"L{l}H{h}"})
            for k in ("llc", "llc_std", "llc_chains"):
                out[k].append(np.asarray([[[grid[p, l, h][k] for h in range(H)]
                                           for l in range(L)] for p in range(len(names))]))
            good = np.asarray([[[grid[p, l, h]["chain_ok"].sum() for h in range(H)]
                                for l in range(L)] for p in range(len(names))])
            out["llc_se"].append(out["llc_std"][-1] / np.sqrt(np.maximum(good, 1)))
            out["init_loss"].append(np.asarray(init[i], np.float64))
            for g in grid.ravel():
                diverged += [{"step": x.pop("snapshot step"), **x} for x in g["diverged"]]
                messages += g["messages"]
        if progress:
            done = min(start + chunk, n_snap)
            print(f"head llc: {done}/{n_snap} snapshots, {len(names)} x {L * H} heads "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    result = {k: np.asarray(v) for k, v in out.items()}
    result.update(steps=np.asarray(steps), subsets=names, n_params=d, nbeta=llc.nbeta_of(cfg),
                  diverged=diverged, messages=messages)
    return result


# ----------------------------------------------------------------------------- data subsets

def subset_pools(source, config, subsets: bool = False) -> dict:
    """{name: pool} of a run's held-out data: "all", the held-out sequences llc.held_out_pool
    gives (the wrLLC's); with subsets, also the drLLC subsets of its kind of data:
    synthetic: "pasted" and "background", the same sequences weighted by whether the
    predicted token was pasted by a segment (data.SyntheticSource.eval_set_pasted);
    pycode: "tests" and "library", llc.examples windows of the held-out files that match
    TEST_FILES and of those that do not (text_subset_pool). Any other source: DataError."""
    from icl_jax import data as data_lib
    n, seq_len = config.llc.examples, config.model.context + 1
    if not subsets:
        return {"all": llc.held_out_pool(source, config)}
    if isinstance(source, data_lib.SyntheticSource):
        tokens, pasted = source.eval_set_pasted(n, seq_len)
        target = pasted[:, 1:].astype(np.float32)  # weights of the predictions of tokens 1..T
        return {"all": tokens, "pasted": {"tokens": tokens, "weight": target},
                "background": {"tokens": tokens, "weight": 1.0 - target}}
    if config.data.name != "pycode":
        raise data_lib.DataError(
            f"data-refined LLCs need synthetic or pycode data (subsets of their held-out "
            f"files), not data.name={config.data.name!r}; use --llc heads")
    return {"all": llc.held_out_pool(source, config),
            "tests": text_subset_pool(source, config, TEST_FILES, n),
            "library": text_subset_pool(source, config, TEST_FILES, n, exclude=True)}


def _matches(path: str, roots: list[str], patterns: list[str]) -> bool:
    """Whether "/" + path's place under its root (the longest that holds it) matches a glob:
    the folders above the root (a pytest folder named test_..., say) never count."""
    root = max((r for r in roots if path.startswith(r.rstrip(os.sep) + os.sep)), key=len,
               default="")
    rel = "/" + os.path.relpath(path, root).replace(os.sep, "/") if root else path
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def text_subset_pool(source, config, patterns: str, n: int, exclude: bool = False,
                     seed: int | None = None) -> np.ndarray:
    """int32 [n, context + 1]: windows of the pycode corpus's held-out files whose path matches
    one of `patterns` (comma-separated globs, as data.roots is a comma-separated list, each
    matched against "/" + the file's path under its root, "*" spanning folders; with
    exclude, the held-out files that match none), tokenized as the corpus is (its cached BPE
    tokenizer, or bytes) and joined by its separator. Files are taken in the order of their
    content hash (a fixed pseudo-random order, as corpus.split_by_hash) until they hold twice
    the n windows' tokens; the offsets are fixed by the run's seed. DataError if no held-out
    file matches, or the ones that do hold less than one window."""
    from icl_jax import corpus, data as data_lib
    seq_len = config.model.context + 1
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    roots = corpus.pycode_roots(config.data.roots)
    _, held = corpus.split_by_hash(corpus.pycode_files(roots), config.data.holdout_fraction)
    chosen = sorted((f for f in held if _matches(f[0], roots, globs) != exclude),
                    key=lambda f: f[1])
    if not chosen:
        raise data_lib.DataError(
            f"no held-out pycode file {'outside' if exclude else 'matches'} {patterns!r} "
            f"(data.roots {config.data.roots or 'sys.path'})")
    if config.data.tokenizer == "bpe":
        import tokenizers
        folder = os.path.dirname(source.eval.filename)  # the corpus cache (a memmap's file)
        tok = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        sep = tok.token_to_id(corpus.END_OF_TEXT)
        encode = lambda text: np.asarray(tok.encode(text.decode("utf-8", "replace")).ids)  # noqa: E731
    else:
        sep, encode = 0, lambda text: np.frombuffer(text, np.uint8)  # noqa: E731
    parts, total, want = [], 0, 2 * n * seq_len
    for path, _, _ in chosen:
        with open(path, "rb") as f:
            ids = encode(f.read())
        parts += [ids, np.array([sep])]
        total += len(ids) + 1
        if total >= want:
            break
    stream = np.concatenate(parts[:-1]).astype(np.int32)
    if len(stream) < seq_len:
        raise data_lib.DataError(f"the held-out files {'outside' if exclude else 'matching'} "
                                 f"{patterns!r} hold {len(stream)} tokens, fewer than "
                                 f"model.context + 1 = {seq_len}")
    rng = np.random.default_rng([config.seed if seed is None else seed, 0x11C, int(exclude)])
    offsets = rng.integers(0, len(stream) - seq_len + 1, n)
    return stream[offsets[:, None] + np.arange(seq_len)]


# ----------------------------------------------------------------------------- analyze

@dataclasses.dataclass(frozen=True)
class HeadView:
    """What analyze measures of every head (icl-jax analyze --llc heads[,data]).

    subsets: also the drLLC on the data's named subsets (subset_pools); snapshots: at most
    this many snapshots, spread over the run (chosen_steps; 0: every snapshot); chains: chains
    per head (0: the llc section's)."""
    subsets: bool = False
    snapshots: int = 0
    chains: int = 0


# reproduce --llc's per-head view of the quick 2L and 3L models: 12 snapshots and 2 chains a
# head keep it within the whole-model LLC's time again (docs/llc-heads.md measures it)
REPRODUCE_VIEW = HeadView(snapshots=12, chains=2)


def parse_mode(text: str) -> tuple[bool, HeadView | None]:
    """`--llc` values: "model" (the whole model's LLC), "heads" (also every head's wrLLC),
    "heads,data" (and their drLLC on the data's subsets) -> (model LLC, HeadView or None).
    ValueError naming the valid values otherwise."""
    parts = {p.strip() for p in text.split(",") if p.strip()}
    if not parts or parts - {"model", "heads", "data"} or ("data" in parts and "heads" not in parts):
        raise ValueError(f"--llc takes model, heads or heads,data, got {text!r}")
    return True, (HeadView(subsets="data" in parts) if "heads" in parts else None)


def chosen_steps(steps, k: int) -> list[int]:
    """At most k of a run's snapshot steps (all if k is 0 or there are no more): the first,
    the last, and between them the snapshots nearest to k - 2 points evenly spaced in
    log(1 + step), so that the early log-spaced snapshots and the dense later ones are both
    seen (a development spread over decades of steps)."""
    steps = sorted(int(s) for s in steps)
    if not k or len(steps) <= k:
        return steps
    x = np.log1p(steps)
    chosen = {steps[0], steps[-1]}
    for t in np.linspace(x[0], x[-1], k)[1:-1]:
        order = np.argsort(np.abs(x - t))
        chosen.add(next(steps[i] for i in order if steps[i] not in chosen))
    return sorted(chosen)


def view_config(cfg, view: HeadView):
    """The llc section a HeadView samples with (its chains, if it names any)."""
    cfg = cfg.copy_and_resolve_references()
    if view.chains:
        cfg.chains = view.chains
    return cfg


class Recorder:
    """Collects a run's head view chunk by chunk inside analysis.score_run's scoring loop (the
    snapshots restored once for every measurement) and gives what scores.json keeps."""

    def __init__(self, run, source, view: HeadView, stacking: str | None, chunk: int):
        self.run, self.view, self.stacking, self.chunk = run, view, stacking, chunk
        self.cfg = view_config(run.config.llc, view)
        self.pools = subset_pools(source, run.config, view.subsets)
        self.wanted = set(chosen_steps(run.steps, view.snapshots))
        self.parts = []

    def add(self, trees, steps):
        keep = [i for i, s in enumerate(steps) if s in self.wanted]
        if keep:
            self.parts.append(heads_over_snapshots(
                self.run.model, [trees[i] for i in keep], self.pools, self.cfg,
                steps=[steps[i] for i in keep], seed=self.run.config.seed,
                stacking=self.stacking, chunk=self.chunk))

    def record(self) -> dict:
        """{"steps", "wrllc" [S, L, H], "wrllc_se", "wrllc_std", "drllc": {subset: [S, L, H]},
        "drllc_se", "n_params", "nbeta", "chains", "draws", "diverged", "messages"}."""
        if not self.parts:
            raise ValueError("no snapshot of the head view was restored")
        cat = {k: np.concatenate([p[k] for p in self.parts]) for k in
               ("steps", "llc", "llc_std", "llc_se")}
        names = self.parts[0]["subsets"]
        return {
            "steps": cat["steps"], "wrllc": cat["llc"][:, 0], "wrllc_se": cat["llc_se"][:, 0],
            "wrllc_std": cat["llc_std"][:, 0],
            "drllc": {n: cat["llc"][:, p] for p, n in enumerate(names) if p},
            "drllc_se": {n: cat["llc_se"][:, p] for p, n in enumerate(names) if p},
            "n_params": self.parts[0]["n_params"], "nbeta": self.parts[0]["nbeta"],
            "chains": int(self.cfg.chains), "draws": int(self.cfg.draws),
            "diverged": [d for p in self.parts for d in p["diverged"]],
            "messages": [m for p in self.parts for m in p["messages"]],
        }
