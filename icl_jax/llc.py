"""The local learning coefficient (LLC) of every snapshot, by SGLD localised at its weights.

Singular learning theory's LLC lambda(w*) measures how degenerate the loss is around a
minimum w*: d/2 for a regular minimum in d parameters, less where directions are flat to
higher order. Following Lau et al. (2023) and devinterp, it is estimated by sampling the
tempered, localised posterior  p(w) ~ exp(-n_beta L(w) - gamma/2 |w - w*|^2)  with
stochastic-gradient Langevin dynamics and taking

    llc = n_beta * (mean sampled loss - L(w*)),   n_beta = m / ln(m) for batch size m.

One SGLD step on a minibatch (devinterp's SGMCMC with the identity or RMSProp
preconditioner G; the loss is recorded at w before the step, as devinterp does):

    w <- w - (eps/2) G (n_beta grad L_batch(w) + gamma (w - w*)) + sqrt(eps G) N(0, 1)
    sgld:         G = 1
    rmsprop_sgld: V <- alpha V + (1 - alpha) grad L_batch(w)^2,  G = 1 / (sqrt(V) + rms_eps)

estimate_llc(loss_fn, params, data, cfg) does one params tree (for notebooks);
llc_over_snapshots(model, stacked_params, data, cfg) does a stack of snapshots, every
chain of a snapshot (on accelerators, of a chunk of snapshots) in one jitted program.
Every snapshot sees the same minibatches and the same noise (common random numbers), so
differences between snapshots are not sampling noise. A chain whose loss turns non-finite
or diverges is reported by name and left out.
"""
from __future__ import annotations

import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax.scores import STACKING, default_stacking

SAMPLERS = ("sgld", "rmsprop_sgld")


def default_nbeta(batch_size: int) -> float:
    """devinterp's default inverse temperature m / ln(m) (1 for a batch of one)."""
    return batch_size / math.log(batch_size) if batch_size > 1 else 1.0


def nbeta_of(cfg) -> float:
    return float(cfg.n_beta) if cfg.n_beta > 0 else default_nbeta(int(cfg.batch_size))


def held_out_pool(source, config) -> np.ndarray:
    """int32 [llc.examples, context + 1]: the held-out sequences an LLC's minibatches are
    drawn from (the source's evaluation set, its first llc.examples rows), the same for
    analyze --llc, launch/llc_steps.py and the bench."""
    return source.eval_set(config.llc.examples, config.model.context + 1)


def batch_indices(n_pool: int, cfg, seed: int = 0) -> np.ndarray:
    """int32 [chains, burn_in + draws, batch_size]: each chain's minibatches, fixed by the
    seed; as a shuffled data loader dropping the last partial batch: every pass over the
    pool of n_pool examples is a fresh permutation of it, cut into batches."""
    if cfg.batch_size > n_pool:
        raise ValueError(f"config field 'llc.batch_size' ({cfg.batch_size}) must not exceed "
                         f"the {n_pool} held-out examples (llc.examples)")
    rng = np.random.default_rng([seed, 0x11C])
    steps, m = cfg.burn_in + cfg.draws, cfg.batch_size
    per_pass = n_pool // m
    passes = -(-steps // per_pass)
    perm = rng.random((cfg.chains, passes, n_pool), dtype=np.float32).argsort(-1)
    idx = perm[..., :per_pass * m].reshape(cfg.chains, passes * per_pass, m)
    return idx[:, :steps].astype(np.int32)


def sampler_settings(cfg) -> tuple:
    """The hashable sampler settings a compiled program depends on."""
    return (cfg.sampler, float(cfg.eps), float(cfg.gamma), nbeta_of(cfg),
            float(cfg.rms_alpha), float(cfg.rms_eps))


def step_noise(key, tree):
    """The N(0, 1) draw of one SGLD step, shaped like tree: one key per leaf, in tree order."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [
        jax.random.normal(k, x.shape, x.dtype)
        for k, x in zip(jax.random.split(key, len(leaves)), leaves)])


def chain_keys(key, chains: int, steps: int):
    """[chains, steps] the key of every step of every chain (step_noise takes each)."""
    return jax.vmap(lambda k: jax.random.split(k, steps))(jax.random.split(key, chains))


NOISE_BLOCK_BYTES = 16 << 20  # "map" stacking: a block's noise, drawn at once, at most this


def noise_block(stacking: str, n_params: int, steps: int) -> int:
    """Steps whose noise a chain draws at once: on CPUs ("map") up to 16, as many as fit in
    NOISE_BLOCK_BYTES, since XLA's CPU code runs the draw of each of the ~20 leaves as a
    few small loops whose fixed cost, not the arithmetic, is most of it (0.2-0.6 of 9 ms of
    CPU per chain step on the quick 2L model); vmapped (accelerators), 1: there the chains' and
    snapshots' copies multiply the block's memory, and the draws are wide already. A block of
    at least half that size that divides the steps is preferred (10 for 100 steps): the chain
    is then one loop of whole blocks, compiled once, not a second copy for the rest (the
    3L model's per-head program compiles each layer's chain separately: head_llc.py)."""
    if stacking == "vmap":
        return 1
    k = max(1, min(16, steps, NOISE_BLOCK_BYTES // (4 * max(n_params, 1))))
    return next((j for j in range(k, (k + 1) // 2 - 1, -1) if steps % j == 0), k)


def run_chain(loss_fn, hyper, block, w_star, pool, idx_SM, keys_S):
    """One chain from w*: the minibatch loss [S] at each step, before the step is taken.
    The noise of `block` steps at a time is drawn together (the same draws: vmapped
    step_noise of each step's key)."""
    sampler, eps, gamma, nbeta, alpha, rms_eps = hyper
    grad_fn = jax.value_and_grad(loss_fn)

    def step(carry, xs):
        w, v = carry
        idx_M, noise = xs
        loss, g = grad_fn(w, jax.tree.map(lambda a: a[idx_M], pool))
        if sampler == "rmsprop_sgld":
            v = jax.tree.map(lambda v, g: alpha * v + (1 - alpha) * g * g, v, g)
            G = jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v) + rms_eps), v)
        else:
            G = jax.tree.map(lambda x: 1.0, w)
        w = jax.tree.map(
            lambda w, w0, g, G, z: w - 0.5 * eps * G * (nbeta * g + gamma * (w - w0))
            + jnp.sqrt(eps * G) * z, w, w_star, g, G, noise)
        return (w, v), loss

    carry = (w_star, jax.tree.map(jnp.zeros_like, w_star))
    S, k = idx_SM.shape[0], block
    if k == 1:  # each step draws its own noise: no more than one step's is ever held
        return jax.lax.scan(lambda c, xs: step(c, (xs[0], step_noise(xs[1], w_star))),
                            carry, (idx_SM, keys_S))[1]

    def steps(carry, xs):  # consecutive steps, their noise drawn at once
        idx_kM, keys_k = xs
        return jax.lax.scan(step, carry, (idx_kM, jax.vmap(step_noise, (0, None))(keys_k, w_star)))

    n = S // k * k  # whole blocks, then the rest as one shorter block
    whole = lambda a: a[:n].reshape(n // k, k, *a.shape[1:])
    carry, losses = jax.lax.scan(steps, carry, (whole(idx_SM), whole(keys_S)))
    if n == S:
        return losses.reshape(S)
    return jnp.concatenate([losses.reshape(n), steps(carry, (idx_SM[n:], keys_S[n:]))[1]])


def chain_losses(loss_fn, hyper, stacking, w_star, pool, idx_CSM, key):
    """Every chain from w*: the minibatch losses [C, S]. Chains vmapped, or (stacking "map",
    for CPUs) one after another: XLA's CPU code runs the vmapped chains' per-chain weight
    products as slow batched kernels (18% more CPU time per chain step on the quick 2L
    model). The noise of step s of chain c is step_noise(chain_keys(key, C, S)[c, s], w_star),
    whatever tree w_star is (a whole model's params, or one head's: head_llc.py)."""
    keys_CS = chain_keys(key, *idx_CSM.shape[:2])
    block = noise_block(stacking, count_params(w_star), idx_CSM.shape[1])
    chain = functools.partial(run_chain, loss_fn, hyper, block, w_star, pool)
    if stacking == "vmap":
        return jax.vmap(chain)(idx_CSM, keys_CS)
    return jax.lax.map(lambda xs: chain(*xs), (idx_CSM, keys_CS))


def sample_chains(loss_fn, hyper, stacking, w_star, pool, idx_CSM, key):
    """Every chain of one snapshot: (losses [C, S], loss at w* on the whole pool)."""
    return (chain_losses(loss_fn, hyper, stacking, w_star, pool, idx_CSM, key),
            loss_fn(w_star, pool))


def summarise(losses_CS, init_loss, n_params, cfg, names=None) -> dict:
    """The estimate from one snapshot's traces, leaving out chains that went bad."""
    nbeta = nbeta_of(cfg)
    draws_CD = losses_CS[:, cfg.burn_in:]
    llc_C = nbeta * (draws_CD.mean(1) - init_loss)
    finite_C = np.isfinite(losses_CS).all(1)
    # no model of d parameters has an LLC above d/2; a chain at twice that has left w*
    bad_C = ~finite_C | ~(llc_C <= n_params)
    diverged, messages = [], []
    for c in np.flatnonzero(bad_C):
        if not finite_C[c]:
            at = int(np.argmin(np.isfinite(losses_CS[c])))
            why = (f"loss turned non-finite at step {at} "
                   f"({'burn-in' if at < cfg.burn_in else 'draw ' + str(at - cfg.burn_in)})")
        else:
            why = (f"loss diverged: its estimate {llc_C[c]:.4g} exceeds {n_params}, twice the "
                   f"largest LLC {n_params} parameters allow")
        name = dict(names or {}, chain=int(c))
        diverged.append({**name, "reason": why})
        where = ", ".join(f"{k} {v}" for k, v in name.items())
        messages.append(f"LLC {where}: {why}; left out of the mean. Try a smaller llc.eps "
                        f"(now {cfg.eps:g}) or a larger llc.gamma (now {cfg.gamma:g})")
    good = llc_C[~bad_C]
    return {
        "llc": float(good.mean()) if good.size else float("nan"),
        "llc_std": float(good.std(ddof=1)) if good.size > 1 else float("nan"),
        "llc_chains": llc_C, "chain_ok": ~bad_C, "init_loss": float(init_loss),
        "loss_trace": draws_CD, "diverged": diverged, "messages": messages,
    }


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def estimate_llc(loss_fn, params, data, cfg, seed: int = 0, indices=None,
                 init_loss: float | None = None, stacking: str | None = None) -> dict:
    """The LLC of one params tree.

    loss_fn(params, batch) -> scalar mean loss of a batch; data: an array (or a tree of
    arrays) of examples on its leading axis, from which the minibatches are drawn and on
    all of which L(w*) is taken; cfg: an `llc` config section (eps, gamma, n_beta,
    chains, burn_in, draws, batch_size, sampler, rms_alpha, rms_eps); indices: the
    minibatches [chains, burn_in + draws, batch_size] (default: batch_indices(seed));
    init_loss: L(w*) if known (default: loss_fn(params, data), all of the data at once);
    stacking: chains "vmap"ped or "map"ped (default: scores.default_stacking()). The noise
    of step s of chain c is step_noise(chain_keys(jax.random.key(seed), C, S)[c, s], params).
    Returns {llc, llc_std, llc_chains [C], chain_ok [C], init_loss, loss_trace [C, draws],
    nbeta, diverged [{chain, reason}], messages}.
    """
    check(cfg)
    n_pool = jax.tree.leaves(data)[0].shape[0]
    idx = batch_indices(n_pool, cfg, seed) if indices is None else np.asarray(indices, np.int32)
    pool = jax.tree.map(jnp.asarray, data)
    run = jax.jit(lambda w, pool, idx, key: sample_chains(
        lambda p, b: loss_fn(p, b), sampler_settings(cfg), resolve_stacking(stacking), w, pool, idx, key))
    losses, init = jax.device_get(run(params, pool, idx, jax.random.key(seed)))
    init = float(init) if init_loss is None else float(init_loss)
    out = summarise(np.asarray(losses), init, count_params(params), cfg)
    out["nbeta"] = nbeta_of(cfg)
    return out


def check(cfg):
    """ConfigError (a ValueError) naming the first bad field of an `llc` section."""
    from icl_jax.config import validate_llc
    validate_llc(cfg)


# ----------------------------------------------------------------------------- snapshots

def token_loss(model):
    """The model's mean next-token cross-entropy of a batch of [B, T + 1] tokens.

    The targets' logits are taken by a product with their one-hot vectors, not gathered
    as loss_by_position does: a gather's gradient is a scatter, which XLA's CPU code runs
    as a slow loop (about 0.5 of 9 ms of CPU per chain step on the quick 2L model)."""
    def loss(params, tokens_BT1):
        logits_BTV, _ = model.apply({"params": params}, tokens_BT1[:, :-1])
        target_BTV = jax.nn.one_hot(tokens_BT1[:, 1:], logits_BTV.shape[-1],
                                    dtype=logits_BTV.dtype)
        return (jax.nn.logsumexp(logits_BTV, axis=-1) - (logits_BTV * target_BTV).sum(-1)).mean()
    return loss


def weighted_token_loss(model):
    """token_loss over some positions only: batch {"tokens": [B, T + 1], "weight": [B, T]},
    the mean cross-entropy of the predictions whose weight is 1 (a data-refined LLC's loss:
    head_llc.py). With every weight 1 it is token_loss."""
    def loss(params, batch):
        tokens_BT1, w_BT = batch["tokens"], batch["weight"]
        logits_BTV, _ = model.apply({"params": params}, tokens_BT1[:, :-1])
        target_BTV = jax.nn.one_hot(tokens_BT1[:, 1:], logits_BTV.shape[-1],
                                    dtype=logits_BTV.dtype)
        ce_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - (logits_BTV * target_BTV).sum(-1)
        # a batch without a weighted position (never at the subsets' sizes) reads 0, not NaN
        return (w_BT * ce_BT).sum() / jnp.maximum(w_BT.sum(), 1.0)
    return loss


def resolve_stacking(stacking: str | None) -> str:
    if stacking is None:
        return default_stacking()
    if stacking not in STACKING:
        raise ValueError(f"stacking must be one of {STACKING}, got {stacking!r}")
    return stacking


@functools.lru_cache(maxsize=8)
def _snapshots_program(model, hyper: tuple, stacking: str):
    """One jitted program, cached by architecture so that several runs of one compile once:
    for "vmap" a chunk of snapshots vmapped, their chains vmapped; for "map" (CPUs) one
    snapshot, its chains one after another. Calling it snapshot by snapshot costs nothing
    against its chains x draws steps and, unlike a lax.map over a chunk, neither pads a
    short last chunk nor compiles again for one (analyze's 33rd snapshot did)."""
    per = functools.partial(sample_chains, token_loss(model), hyper, stacking)
    if stacking == "vmap":
        return jax.jit(jax.vmap(per, in_axes=(0, None, None, None)))
    return jax.jit(per)


def llc_over_snapshots(model, stacked_params, data, cfg, steps=None, seed: int = 0,
                       stacking: str | None = None, chunk: int = 16,
                       progress: bool = False) -> dict:
    """The LLC of every snapshot of a stack.

    model: a model.Transformer; stacked_params: its params with a leading snapshot axis
    (a list of trees is stacked here); data: held-out tokens [N, T + 1] (held_out_pool
    gives the ones analyze uses); cfg: the `llc`
    section; steps: the snapshots' training steps, to name a chain that went bad;
    stacking: "vmap" or "map" (default: scores.default_stacking()). vmap: snapshots run
    `chunk` at a time, one compiled call each (the last chunk padded, so one compile);
    map: one snapshot per call, its chains one after another.
    Returns numpy arrays llc [S], llc_std [S], llc_chains [S, C], chain_ok [S, C],
    init_loss [S], loss_trace [S, C, draws], and nbeta, diverged (a list of {step,
    chain, reason}) and messages (one line each, with what to change).
    """
    check(cfg)
    if isinstance(stacked_params, (list, tuple)):
        stacked_params = jax.tree.map(lambda *a: np.stack(a), *stacked_params)
    n_snap = jax.tree.leaves(stacked_params)[0].shape[0]
    steps = list(range(n_snap)) if steps is None else [int(s) for s in steps]
    if len(steps) != n_snap:
        raise ValueError(f"{len(steps)} steps given for {n_snap} snapshots")
    stacking = resolve_stacking(stacking)
    program = _snapshots_program(model, sampler_settings(cfg), stacking)
    pool = jnp.asarray(data)
    idx = jnp.asarray(batch_indices(pool.shape[0], cfg, seed))
    key = jax.random.key(seed)
    n_params = count_params(jax.tree.map(lambda a: a[0], stacked_params))
    chunk = max(1, min(chunk, n_snap)) if stacking == "vmap" else 1
    per, t0 = [], time.perf_counter()
    for start in range(0, n_snap, chunk):
        part = jax.tree.map(lambda a: a[start:start + chunk], stacked_params)
        n = jax.tree.leaves(part)[0].shape[0]
        if stacking == "map":
            losses_SCT, init_S = jax.device_get(jax.tree.map(
                lambda a: a[None], program(jax.tree.map(lambda a: a[0], part), pool, idx, key)))
        else:
            if n < chunk:  # pad with the last snapshot so the program's shape never changes
                part = jax.tree.map(lambda a: np.concatenate([a] + [a[-1:]] * (chunk - n)),
                                    part)
            losses_SCT, init_S = jax.device_get(program(part, pool, idx, key))
        for i in range(n):
            per.append(summarise(np.asarray(losses_SCT[i]), float(init_S[i]), n_params, cfg,
                                 {"snapshot step": steps[start + i]}))
        if progress:
            print(f"llc: {len(per)}/{n_snap} snapshots ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
    out = {k: np.asarray([p[k] for p in per]) for k in
           ("llc", "llc_std", "llc_chains", "chain_ok", "init_loss", "loss_trace")}
    out["steps"] = np.asarray(steps)
    out["nbeta"] = nbeta_of(cfg)
    out["diverged"] = [{"step": d.pop("snapshot step"), **d} for p in per for d in p["diverged"]]
    out["messages"] = [m for p in per for m in p["messages"]]
    return out
