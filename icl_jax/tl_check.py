"""The TransformerLens cross-check: one snapshot's scores computed again, the way a
TransformerLens user would.

score_with_hooks(model, ...) reads a HookedTransformer (export.hooked_transformer)
through its hook points (run_with_cache, run_with_hooks) and its weights (model.OV,
model.all_composition_scores), with torch ops and none of icl_jax.scores: a second,
independent implementation of scores.snapshot_scores, which
tests/test_tl_check.py holds ours against and icl-jax bench --suite score times ours against.
Definitions: docs/measurements.md. Attention-only models and models with
MLPs, without LayerNorm or smeared keys. Needs torch and transformer_lens 3.x or 4.x
(the tl extra).
"""
from __future__ import annotations

import numpy as np
import torch

from icl_jax import export
from icl_jax.model import ModelConfig
from icl_jax.scores import ABLATIONS


def hooked_transformer(params, model_cfg):
    """The HookedTransformer of a params tree, or NotImplementedError naming what
    score_with_hooks cannot score."""
    model_cfg = ModelConfig.of(model_cfg)
    if model_cfg.smear_keys:
        raise NotImplementedError("score_with_hooks: TransformerLens has no smeared keys")
    if model_cfg.layer_norm:
        raise NotImplementedError("score_with_hooks: models with LayerNorm are not supported "
                                  "(copying_empirical would need ln_final's centring and scale)")
    return export.hooked_transformer(params, model_cfg)


def _check(cfg):
    if cfg.normalization_type is not None:
        raise NotImplementedError(f"score_with_hooks: normalization_type "
                                  f"{cfg.normalization_type!r} is not supported (only None)")
    if cfg.positional_embedding_type not in ("shortformer", "standard"):
        raise NotImplementedError(f"score_with_hooks: positional_embedding_type "
                                  f"{cfg.positional_embedding_type!r} is not supported")


def _tokens(x, device):
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=device, dtype=torch.long)


def _losses(logits_BTV, targets_BT):
    """[B, T] cross-entropy of each next token."""
    logp_BTV = logits_BTV.log_softmax(-1)
    return -logp_BTV.gather(-1, targets_BT[..., None])[..., 0]


def _icl(losses_BT, early, late):
    losses_T = losses_BT.mean(0)
    return losses_T[late] - losses_T[early]


def _wanted(name):
    return name == "hook_pos_embed" or name.endswith(("hook_pattern", "hook_z", "hook_resid_pre"))


@torch.no_grad()
def score_with_hooks(model, eval_BT1, probe_BT, index_B, early: int, late: int, n_tokens: int,
                     ablation: str = "pattern") -> dict:
    """scores.snapshot_scores of one snapshot {name: numpy array}, same keys and shapes
    (less probe_attention, kept for a figure).

    eval_BT1 [B, T+1] evaluation set, probe_BT the repeated-token probe, index_B each
    example's PCA index; early, late the ICL score's indices; n_tokens the probe's
    repeated chunk; ablation "pattern" (patterns frozen), "zero" or "mean".
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation kind must be one of {ABLATIONS}, got {ablation!r}")
    _check(model.cfg)
    dev = model.cfg.device
    eval_BT1, probe_BT, index_B = (_tokens(x, dev) for x in (eval_BT1, probe_BT, index_B))
    tokens_BT, targets_BT = eval_BT1[:, :-1], eval_BT1[:, 1:]
    L = model.cfg.n_layers

    logits_BTV, cache = model.run_with_cache(tokens_BT, names_filter=_wanted)
    losses_BT = _losses(logits_BTV, targets_BT)
    icl = _icl(losses_BT, early, late)
    _, probe_cache = model.run_with_cache(probe_BT, names_filter=_wanted)
    probe_att_LBHTS = torch.stack([probe_cache["pattern", l] for l in range(L)])

    # previous token: attention from i to i - 1 on the evaluation set
    prev_LH = torch.stack([cache["pattern", l].diagonal(offset=-1, dim1=-2, dim2=-1).mean((0, -1))
                           for l in range(L)])
    return _numpy({
        "loss_by_position": losses_BT.mean(0),
        "icl_score": icl,
        "icl_se": (losses_BT[:, late] - losses_BT[:, early]).std() / losses_BT.shape[0] ** 0.5,
        "icl_by_example": losses_BT[:, late] - losses_BT[:, early],
        "per_token_loss": losses_BT.gather(1, index_B[:, None])[:, 0],
        "prefix_matching": _prefix_matching(probe_att_LBHTS, probe_BT, n_tokens),
        "previous_token": prev_LH,
        "copying": _copying(model),
        "copying_empirical": _copying_empirical(model, probe_cache, probe_att_LBHTS, probe_BT,
                                                n_tokens),
        "ablation_icl": _ablation_icl(model, cache, targets_BT, early, late, ablation, icl),
        "composition": {m.lower(): model.all_composition_scores(m) for m in "QKV"},
    })


def _numpy(tree):
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    return tree.detach().cpu().numpy().astype(np.float32)


def _prefix_matching(att_LBHTS, probe_BT, n_tokens):
    """[L, H]: for each query in repeats 2 and later, the attention paid to every key whose
    previous token is the query's token, averaged over queries and sequences."""
    T = probe_BT.shape[1]
    first = 1 + n_tokens
    # key s is a match for query t when token s - 1 (s >= 1, s - 1 < t) equals token t
    match_BTS = torch.zeros(probe_BT.shape[0], T, T, dtype=torch.bool, device=probe_BT.device)
    match_BTS[:, :, 1:] = probe_BT[:, :, None] == probe_BT[:, None, :-1]
    match_BTS &= torch.ones(T, T, dtype=torch.bool, device=probe_BT.device).tril()
    per_query_LBHT = (att_LBHTS * match_BTS[None, :, None]).sum(-1)
    return per_query_LBHT[..., first:].mean((1, 3))


def _copying(model):
    """[L, H] Re(sum eig) / sum |eig| of the OV circuit W_E W_OV W_U; TransformerLens's
    FactoredMatrix takes the eigenvalues of the small d_head x d_head product."""
    eig_LHK = (model.W_E @ model.OV @ model.W_U).eigenvalues
    return eig_LHK.sum(-1).real / eig_LHK.abs().sum(-1).clamp_min(1e-30)


def _copying_empirical(model, probe_cache, att_LBHTS, probe_BT, n_tokens):
    """[L, H]: of each head's ReLU'd, mean-centred direct logit effect, the share on the
    tokens it attends to, each weighted by its attention over the most attended token's."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    B, T = probe_BT.shape
    # every head's output z W_O (no b_O), [L*H, B, T, D], ordered (layer, head)
    out_XBTD = probe_cache.stack_head_results(layer=-1)
    eff_XBTV = out_XBTD @ model.W_U
    r_XBTV = (eff_XBTV - eff_XBTV.mean(-1, keepdim=True)).relu()
    # attention paid to each vocabulary entry: sum over the key positions holding it
    att_XBTS = att_LBHTS.transpose(1, 2).reshape(L * H, B, T, T)
    a_XBTV = torch.zeros_like(r_XBTV).scatter_add_(
        -1, probe_BT[None, :, None, :].expand(L * H, B, T, T), att_XBTS)
    w_XBTV = a_XBTV / a_XBTV.amax(-1, keepdim=True).clamp_min(1e-30)
    per_query_XBT = (w_XBTV * r_XBTV).sum(-1) / r_XBTV.sum(-1).clamp_min(1e-30)
    return per_query_XBT[..., 1 + n_tokens:].mean((1, 2)).reshape(L, H)


def _ablation_icl(model, cache, targets_BT, early, late, kind, clean_icl):
    """[L, H] ICL(head ablated) - ICL(clean), one run_with_hooks per head, each started at
    the head's layer from the clean run's residual stream (start_at_layer)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    # TransformerLens 3's shortformer positions are passed to a run started mid-way; 4's
    # (export.transformer_lens_model) are added by permanent hooks and need nothing
    pos_kw = ({"shortformer_pos_embed": cache["pos_embed"]}
              if model.cfg.positional_embedding_type == "shortformer" else {})
    out_LH = torch.zeros(L, H)
    for layer in range(L):
        z_mean_THK = cache["z", layer].mean(0)
        for head in range(H):
            def ablate(z_BTHK, hook, head=head, fill_TK=z_mean_THK[:, head]):
                z_BTHK[:, :, head] = fill_TK if kind == "mean" else 0.0
                return z_BTHK
            hooks = [(f"blocks.{layer}.attn.hook_z", ablate)]
            if kind == "pattern":  # every pattern from here on frozen at its clean value
                hooks += [(f"blocks.{l}.attn.hook_pattern",
                           lambda p, hook, l=l: cache["pattern", l]) for l in range(layer, L)]
            logits_BTV = model.run_with_hooks(cache["resid_pre", layer], start_at_layer=layer,
                                              fwd_hooks=hooks, **pos_kw)
            out_LH[layer, head] = _icl(_losses(logits_BTV, targets_BT), early, late) - clean_icl
    return out_LH
