"""icl-jax bench's PyTorch and TransformerLens side: the peers our step and scorer are timed against.

The same architecture as a plain PyTorch module (our weights copy into it, and
tests/test_bench.py holds its logits to ours), TransformerLens's HookedTransformer of the
same shape, a standard AdamW loop for either, PyTorch's matmul and fused attention beside
ours, and TransformerLens hooks scoring snapshots (tl_check.py). bench.py's suites call
these; torch and transformer_lens are imported inside each function, so that bench.py runs
without the bench extra and only the PyTorch rows are skipped.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax.bench_harness import fixed_batch, note_row
from icl_jax.model import QUERY_BLOCK, causal_attention

# ----------------------------------------------------------------------------- PyTorch

def torch_reference_class():
    """The same architecture as a plain PyTorch module (attention-only or with MLP, no
    LayerNorm, no smeared keys), with our parameter names and layouts."""
    import torch
    import torch.nn.functional as F

    class TorchTransformer(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            D, H, V = m.d_model, m.n_heads, m.vocab_size
            K = m.d_head or D // H
            self.m, self.H, self.K = m, H, K
            P = lambda *shape, std=None: torch.nn.Parameter(  # noqa: E731
                torch.randn(*shape) * std if std else torch.zeros(*shape))
            self.W_E, self.W_pos = P(V, D, std=1.0), P(m.context, D, std=m.pos_init_std)
            self.blocks = torch.nn.ModuleList()
            for _ in range(m.n_layers):
                b = torch.nn.Module()
                for n in ("W_Q", "W_K", "W_V"):
                    setattr(b, n, P(H, D, K, std=D ** -0.5))
                b.W_O = P(H, K, D, std=(H * K) ** -0.5)
                b.b_Q, b.b_K, b.b_V, b.b_O = P(H, K), P(H, K), P(H, K), P(D)
                if m.mlp:
                    b.W_in, b.W_out = torch.nn.Linear(D, m.d_mlp), torch.nn.Linear(m.d_mlp, D)
                self.blocks.append(b)
            self.W_U, self.b_U = P(D, V, std=D ** -0.5), P(V)

        def forward(self, tokens_BT):
            B, T = tokens_BT.shape
            x = self.W_E[tokens_BT]
            pos = self.W_pos[:T]
            if self.m.positions == "residual":
                x = x + pos
            for b in self.blocks:
                qk_in = x + pos if self.m.positions == "shortformer" else x
                q = torch.einsum("btd,hdk->bhtk", qk_in, b.W_Q) + b.b_Q[:, None]
                k = torch.einsum("btd,hdk->bhtk", qk_in, b.W_K) + b.b_K[:, None]
                v = torch.einsum("btd,hdk->bhtk", x, b.W_V) + b.b_V[:, None]
                z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + torch.einsum("bhtk,hkd->btd", z, b.W_O) + b.b_O
                if self.m.mlp:
                    x = x + b.W_out(F.gelu(b.W_in(x), approximate="tanh"))
            return x @ self.W_U + self.b_U

    return TorchTransformer


def torch_reference(m, params=None):
    """A TorchTransformer for model config m, with our params copied in when given."""
    import torch
    if m.layer_norm or m.smear_keys:
        raise NotImplementedError("the PyTorch reference has no LayerNorm and no smeared keys")
    net = torch_reference_class()(m)
    if params is not None:
        with torch.no_grad():
            t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
            for n in ("W_E", "W_pos", "W_U", "b_U"):
                getattr(net, n).copy_(t(params[n]))
            for i, b in enumerate(net.blocks):
                p = params[f"block_{i}"]
                for n, v in p["attn"].items():
                    getattr(b, n).copy_(t(v))
                if m.mlp:
                    for n in ("W_in", "W_out"):
                        getattr(b, n).weight.copy_(t(p["mlp"][n]["kernel"]).T)
                        getattr(b, n).bias.copy_(t(p["mlp"][n]["bias"]))
    return net


def transformer_lens_model(m):
    """TransformerLens's model of the same shape (attention-only, no LN), at its own
    initialisation: a HookedTransformer under 3.x, its native TransformerBridge under 4.x
    (export.transformer_lens_model; there the shortformer positions, held by hooks, are not
    among the parameters the optimizer steps)."""
    from icl_jax import export
    if m.mlp or m.layer_norm or m.smear_keys:
        raise NotImplementedError("the TransformerLens row is attention-only without LayerNorm")
    return export.transformer_lens_model(dict(
        n_layers=m.n_layers, d_model=m.d_model, n_ctx=m.context, n_heads=m.n_heads,
        d_head=m.d_head or m.d_model // m.n_heads, d_vocab=m.vocab_size, attn_only=True,
        act_fn="gelu", normalization_type=None,
        positional_embedding_type="shortformer" if m.positions == "shortformer" else "standard",
        device="cpu"))


def torch_trainer(net, config, compile_: bool = False):
    """A standard PyTorch AdamW loop (with the config's clipping) on a fixed batch."""
    import torch
    import torch.nn.functional as F
    t = config.train
    opt = torch.optim.AdamW(net.parameters(), lr=t.lr, betas=(t.b1, t.b2),
                            weight_decay=t.weight_decay)
    fwd = torch.compile(net) if compile_ else net
    tokens = torch.from_numpy(fixed_batch(config).astype(np.int64))
    inp, tgt = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = fwd(inp)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
        opt.step()
        return loss.item()

    return step


TORCH_THREADS = [None]  # None: every core; set by run(torch_threads=...)


def set_torch_threads():
    # With every core busy elsewhere, OpenMP's spinning barriers can make 2 threads 10-30x
    # slower than 1; --torch-threads picks the count.
    import torch
    torch.set_num_threads(TORCH_THREADS[0] or os.cpu_count() or 1)


def torch_candidates(config, rows, case):
    """{name: step fn} of the PyTorch rows that can run here; a note row for each that can't."""
    out = {}
    try:
        import torch  # noqa: F401
    except ImportError:
        rows.append(note_row(case, "PyTorch rows", "torch not installed (the bench extra: "
                             "pip install 'icl_jax[bench]')"))
        return out
    m = config.model
    try:
        out["torch eager"] = torch_trainer(torch_reference(m), config)
        out["torch.compile"] = torch_trainer(torch_reference(m), config, compile_=True)
    except NotImplementedError as e:
        rows.append(note_row(case, "PyTorch rows", f"skipped: {e}"))
    try:
        out["TransformerLens"] = torch_trainer(transformer_lens_model(m), config)
    except ImportError:
        rows.append(note_row(case, "TransformerLens", "transformer_lens not installed "
                             "(the bench extra: pip install 'icl_jax[bench]')"))
    except NotImplementedError as e:
        rows.append(note_row(case, "TransformerLens", f"skipped: {e}"))
    set_torch_threads()
    for name, fn in list(out.items()):
        try:
            fn()  # torch.compile can fail without a C++ toolchain: skip, don't crash
        except Exception as e:  # noqa: BLE001
            rows.append(note_row(case, name, f"skipped: {type(e).__name__}: {str(e)[:120]}"))
            del out[name]
    return out


# ----------------------------------------------------------------------------- timing

def torch_matmul_peak_fn(n: int = 2048):
    """(fn, flops): the same float32 n^3 product through PyTorch (MKL / oneDNN on CPU)."""
    import torch
    a = torch.randn(n, n)
    return (lambda: torch.mm(a, a)), 2 * n ** 3


def attention_fns(m, batch: int):
    """({name: fn}, bmm FLOPs): one layer's causal attention core, forward and backward,
    at the model's [B, H, T, K], ours (model.causal_attention) and PyTorch's fused
    scaled_dot_product_attention, on the same random inputs; and the batched product of
    its last query block's scores through XLA and through torch.bmm."""
    import torch
    B, H, T = batch, m.n_heads, m.context
    K = m.d_head or m.d_model // H
    q, k, v, g = (np.random.default_rng(i).normal(size=(B, H, T, K)).astype(np.float32)
                  for i in range(4))
    g_jax = jnp.asarray(g)
    grad = jax.jit(jax.grad(lambda q, k, v: (causal_attention(q, k, v)[0] * g_jax).sum(),
                            argnums=(0, 1, 2)))
    qkv = [jnp.asarray(x) for x in (q, k, v)]
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tg = torch.from_numpy(g)

    def torch_step():
        z = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                             scale=1.0)
        (z * tg).sum().backward()
        for x in (tq, tk, tv):
            x.grad = None

    # the product XLA:CPU is slow at: the last query block's scores, [B*H] x [64 x K] x [K x T]
    a = np.random.default_rng(5).normal(size=(B * H, min(QUERY_BLOCK, T), K)).astype(np.float32)
    b = np.random.default_rng(6).normal(size=(B * H, K, T)).astype(np.float32)
    bmm = jax.jit(lambda x, y: jnp.einsum("nik,nkj->nij", x, y))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return {"jax attention": lambda: jax.block_until_ready(grad(*qkv)),
            "torch attention": torch_step,
            "jax bmm": lambda: jax.block_until_ready(bmm(ja, jb)),
            "torch bmm": lambda: torch.bmm(ta, tb)}, 2 * a.size * T


# ----------------------------------------------------------------------------- scoring

def tl_hooks_scorer(model, trees, inputs, key, rows, case):
    """A fn scoring every snapshot with tl_check.score_with_hooks, its HookedTransformers built
    here, outside the timing; None and a note row where TransformerLens can't run."""
    try:
        import torch
        import transformer_lens  # noqa: F401
        from icl_jax import tl_check
    except ImportError:
        rows.append(note_row(case, "TransformerLens hooks", "transformer_lens not installed "
                             "(the bench extra: pip install 'icl_jax[bench]')"))
        return None
    try:
        tls = [tl_check.hooked_transformer(t, model.cfg) for t in trees]
    except NotImplementedError as e:
        rows.append(note_row(case, "TransformerLens hooks", f"skipped: {e}"))
        return None
    set_torch_threads()
    tokens = tuple(torch.from_numpy(np.array(inputs[k])).long()  # a writable copy
                   for k in ("eval_BT1", "probe_BT", "pca_index_B"))
    return lambda: [tl_check.score_with_hooks(tl, *tokens, *key) for tl in tls]
