"""Export one snapshot to .npz in TransformerLens naming and layout.

Arrays (L layers, H heads, D d_model, K d_head, V vocabulary, F d_mlp, T context):
  W_E [V, D], W_pos [T, D], W_Q W_K W_V [L, H, D, K], W_O [L, H, K, D],
  b_Q b_K b_V [L, H, K], b_O [L, D], W_U [D, V], b_U [V];
  with LayerNorm: ln1_w ln1_b [L, D] (before attention), ln2_w ln2_b [L, D] (before
  the MLP), ln_final_w ln_final_b [D]; with MLPs: W_in [L, D, F], b_in [L, F],
  W_out [L, F, D], b_out [L, D]; with smeared keys: smear [L, H] (the logit alpha;
  keys mix sigmoid(alpha) of position j with the rest of j-1);
  config: the run's config as a JSON string (model.positions says whether the
  positions enter the residual stream or, shortformer, only queries and keys).
"""
from __future__ import annotations

import json
import os

import numpy as np

from icl_jax import checkpoints


def params_to_arrays(params, model_cfg: dict) -> dict[str, np.ndarray]:
    """The flax params tree as TransformerLens-named numpy arrays."""
    L = model_cfg["n_layers"]
    blocks = [params[f"block_{l}"] for l in range(L)]
    stack = lambda get: np.stack([np.asarray(get(b)) for b in blocks])
    out = {"W_E": np.asarray(params["W_E"]), "W_pos": np.asarray(params["W_pos"]),
           "W_U": np.asarray(params["W_U"]), "b_U": np.asarray(params["b_U"])}
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        out[name] = stack(lambda b: b["attn"][name])
    if model_cfg.get("smear_keys"):
        out["smear"] = stack(lambda b: b["attn"]["smear"])
    if model_cfg.get("layer_norm"):
        out["ln1_w"] = stack(lambda b: b["ln_attn"]["scale"])
        out["ln1_b"] = stack(lambda b: b["ln_attn"]["bias"])
        out["ln_final_w"] = np.asarray(params["ln_final"]["scale"])
        out["ln_final_b"] = np.asarray(params["ln_final"]["bias"])
        if model_cfg.get("mlp"):
            out["ln2_w"] = stack(lambda b: b["ln_mlp"]["scale"])
            out["ln2_b"] = stack(lambda b: b["ln_mlp"]["bias"])
    if model_cfg.get("mlp"):
        out["W_in"] = stack(lambda b: b["mlp"]["W_in"]["kernel"])
        out["b_in"] = stack(lambda b: b["mlp"]["W_in"]["bias"])
        out["W_out"] = stack(lambda b: b["mlp"]["W_out"]["kernel"])
        out["b_out"] = stack(lambda b: b["mlp"]["W_out"]["bias"])
    return {k: v.astype(np.float32) for k, v in out.items()}


def export(workdir: str, step: int | None = None, out: str = "model.npz") -> str:
    """Writes snapshot `step` (default: the newest) of `workdir` to `out`; returns the path."""
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"{workdir!r} holds no run (no config.json)")
    if not os.path.isdir(os.path.join(workdir, "snapshots")):
        raise FileNotFoundError(f"{workdir!r} has no snapshots yet")
    run = checkpoints.Run(workdir)
    steps = run.steps
    if not steps:
        raise FileNotFoundError(f"{workdir!r} has no snapshots yet")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{workdir!r} has no snapshot at step {step}; saved steps: "
                                f"{steps[0]}..{steps[-1]} ({len(steps)} in all)")
    step = steps[-1] if step is None else step
    arrays = params_to_arrays(run.params(step), run.model.cfg)
    config = run.config.to_dict()
    config["step"] = step
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, config=np.asarray(json.dumps(config, sort_keys=True)), **arrays)
    return out
