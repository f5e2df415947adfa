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

import io
import json

import numpy as np

from icl_jax import checkpoints, workdir as workdir_lib
from icl_jax.model import ModelConfig


def params_to_arrays(params, model_cfg) -> dict[str, np.ndarray]:
    """The flax params tree as TransformerLens-named numpy arrays."""
    model_cfg = ModelConfig.of(model_cfg)
    L = model_cfg.n_layers
    blocks = [params[f"block_{l}"] for l in range(L)]
    stack = lambda get: np.stack([np.asarray(get(b)) for b in blocks])
    out = {"W_E": np.asarray(params["W_E"]), "W_pos": np.asarray(params["W_pos"]),
           "W_U": np.asarray(params["W_U"]), "b_U": np.asarray(params["b_U"])}
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        out[name] = stack(lambda b: b["attn"][name])
    if model_cfg.smear_keys:
        out["smear"] = stack(lambda b: b["attn"]["smear"])
    if model_cfg.layer_norm:
        out["ln1_w"] = stack(lambda b: b["ln_attn"]["scale"])
        out["ln1_b"] = stack(lambda b: b["ln_attn"]["bias"])
        out["ln_final_w"] = np.asarray(params["ln_final"]["scale"])
        out["ln_final_b"] = np.asarray(params["ln_final"]["bias"])
        if model_cfg.mlp:
            out["ln2_w"] = stack(lambda b: b["ln_mlp"]["scale"])
            out["ln2_b"] = stack(lambda b: b["ln_mlp"]["bias"])
    if model_cfg.mlp:
        out["W_in"] = stack(lambda b: b["mlp"]["W_in"]["kernel"])
        out["b_in"] = stack(lambda b: b["mlp"]["W_in"]["bias"])
        out["W_out"] = stack(lambda b: b["mlp"]["W_out"]["kernel"])
        out["b_out"] = stack(lambda b: b["mlp"]["W_out"]["bias"])
    return {k: v.astype(np.float32) for k, v in out.items()}


def export(workdir: str, step: int | None = None, out: str = "model.npz") -> str:
    """Writes snapshot `step` (default: the newest) of `workdir` to `out`; returns the path.

    FileNotFoundError, naming the workdir, if it holds no run, no snapshot or no snapshot
    at `step`."""
    run = checkpoints.Run(workdir)
    step = run.steps[-1] if step is None else step
    arrays = params_to_arrays(run.params(step), run.model.cfg)
    config = run.config.to_dict()
    config["step"] = step
    buf = io.BytesIO()  # then one write, so that `out` may be a bucket's URL
    np.savez(buf, config=np.asarray(json.dumps(config, sort_keys=True)), **arrays)
    workdir_lib.write_bytes(out, buf.getvalue())
    return out


def hooked_transformer_config(model_cfg) -> dict:
    """TransformerLens HookedTransformerConfig fields of a model, or ValueError if TL
    cannot express it (smeared keys; LayerNorm with shortformer positions, which TL
    normalises after adding the positions, where this model adds them after)."""
    model_cfg = ModelConfig.of(model_cfg)
    if model_cfg.smear_keys:
        raise ValueError("TransformerLens has no smeared keys; use the .npz export")
    if model_cfg.layer_norm and model_cfg.positions == "shortformer":
        raise ValueError("TransformerLens applies LayerNorm after adding shortformer positions; "
                         "this model adds them after LayerNorm, so the two differ")
    return {
        "n_layers": model_cfg.n_layers, "d_model": model_cfg.d_model,
        "n_ctx": model_cfg.context, "d_head": model_cfg.d_head,
        "n_heads": model_cfg.n_heads, "d_vocab": model_cfg.vocab_size,
        "d_mlp": model_cfg.d_mlp if model_cfg.mlp else None,
        "attn_only": not model_cfg.mlp,
        "act_fn": "gelu_new",  # jax.nn.gelu is the tanh approximation
        "normalization_type": "LN" if model_cfg.layer_norm else None,
        "eps": 1e-6,  # flax's LayerNorm
        "positional_embedding_type": ("shortformer" if model_cfg.positions == "shortformer"
                                      else "standard"),
        "default_prepend_bos": False,
    }


def hooked_transformer_state_dict(arrays: dict, model_cfg) -> dict:
    """TransformerLens state-dict names for the arrays of params_to_arrays."""
    model_cfg = ModelConfig.of(model_cfg)
    sd = {"embed.W_E": arrays["W_E"], "pos_embed.W_pos": arrays["W_pos"],
          "unembed.W_U": arrays["W_U"], "unembed.b_U": arrays["b_U"]}
    for l in range(model_cfg.n_layers):
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            sd[f"blocks.{l}.attn.{name}"] = arrays[name][l]
        for ours, theirs in (("ln1", "ln1"), ("ln2", "ln2")):
            if f"{ours}_w" in arrays:
                sd[f"blocks.{l}.{theirs}.w"] = arrays[f"{ours}_w"][l]
                sd[f"blocks.{l}.{theirs}.b"] = arrays[f"{ours}_b"][l]
        for name in ("W_in", "b_in", "W_out", "b_out"):
            if name in arrays:
                sd[f"blocks.{l}.mlp.{name}"] = arrays[name][l]
    if "ln_final_w" in arrays:
        sd["ln_final.w"], sd["ln_final.b"] = arrays["ln_final_w"], arrays["ln_final_b"]
    return sd


def export_hooked_transformer(workdir: str, step: int | None, out: str) -> str:
    """Writes a torch file {"config": HookedTransformerConfig fields, "state_dict": ...}
    in HookedTransformer naming; load it with load_hooked_transformer(out) under
    TransformerLens 3.x or 4.x. Needs torch (the tl extra)."""
    torch = _import_torch()
    run = checkpoints.Run(workdir)
    step = run.steps[-1] if step is None else step
    cfg = hooked_transformer_config(run.model.cfg)
    arrays = params_to_arrays(run.params(step), run.model.cfg)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v))
          for k, v in hooked_transformer_state_dict(arrays, run.model.cfg).items()}
    torch.save({"config": cfg, "state_dict": sd, "step": step}, out)
    return out


def load_hooked_transformer(path: str):
    """The TransformerLens model of export_hooked_transformer's file (transformer_lens_model)."""
    torch = _import_torch()
    # tensors and plain values only: a pickle could run any code, so none is unpickled
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises several kinds for a file that is not its own
        raise ValueError(f"{path}: not a file export_hooked_transformer wrote "
                         f"({str(e).splitlines()[0][:200]})") from None
    if not isinstance(saved, dict) or not {"config", "state_dict"} <= set(saved):
        raise ValueError(f"{path}: not a file export_hooked_transformer wrote (no config and "
                         "state_dict)")
    return transformer_lens_model(saved["config"], saved["state_dict"])


def hooked_transformer(params, model_cfg: dict):
    """The TransformerLens model of a params tree, without a file between."""
    torch = _import_torch()
    cfg = hooked_transformer_config(model_cfg)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
          hooked_transformer_state_dict(params_to_arrays(params, model_cfg), model_cfg).items()}
    return transformer_lens_model(cfg, sd)


TL_EXTRA = "pip install 'icl_jax[tl]' (from a checkout: pip install '.[tl]')"


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError(f"the TransformerLens hand-off needs torch and transformer_lens: "
                          f"{TL_EXTRA}") from None
    return torch


def transformer_lens_major() -> int:
    """The installed TransformerLens's major version; ImportError naming the extra if none."""
    _import_torch()
    try:
        from importlib.metadata import version
        import transformer_lens  # noqa: F401
        return int(version("transformer_lens").split(".")[0])
    except ImportError:
        raise ImportError(f"transformer_lens is not installed: {TL_EXTRA}") from None


def transformer_lens_model(cfg: dict, state_dict: dict | None = None):
    """A TransformerLens model of HookedTransformerConfig fields `cfg` (hooked_transformer_config's),
    holding `state_dict` (HookedTransformer naming) or, without one, TransformerLens's own
    initialisation (seed 0). Under TransformerLens 3.x a HookedTransformer; under 4.x, which
    has no HookedTransformer, a TransformerBridge around its native model, whose hooks
    (run_with_cache, run_with_hooks, cache["pattern", l]) and weights (W_E, OV, W_U,
    all_composition_scores) read the same. TransformerLens 4's native model has no
    shortformer positions: there they are added by permanent hooks on every layer's query
    and key inputs (blocks.{l}.attn.q.hook_in, k.hook_in, which hold the positions; W_pos
    itself is zero), which is where this model adds them; removing permanent hooks removes
    them."""
    torch = _import_torch()
    if transformer_lens_major() < 4:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        model = HookedTransformer(HookedTransformerConfig(**cfg, seed=0))
        if state_dict is not None:
            _load(model, state_dict)
        return model.eval()

    import transformer_lens.model_bridge.sources.native  # noqa: F401  (TransformerBridge.boot_native)
    from transformer_lens import TransformerBridge, TransformerBridgeConfig
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
    shortformer = cfg["positional_embedding_type"] == "shortformer"
    bridge_cfg = TransformerBridgeConfig.from_dict(
        {**cfg, "positional_embedding_type": "standard", "seed": 0})
    model = TransformerBridge.boot_native(bridge_cfg)
    if state_dict is not None:
        sd = dict(state_dict)
        if shortformer:
            sd["pos_embed.W_pos"] = torch.zeros_like(state_dict["pos_embed.W_pos"])
        _load(model, convert_tl_checkpoint(sd, bridge_cfg))
    if shortformer:
        W_pos = (state_dict["pos_embed.W_pos"].clone() if state_dict is not None
                 else model.pos_embed.weight.detach().clone())
        with torch.no_grad():
            model.pos_embed.weight.zero_()
        model.pos_embed.weight.requires_grad_(False)  # the residual stream holds no positions
        W_pos = torch.nn.Parameter(W_pos)  # held by the hooks, outside the bridge's parameters

        def add_positions(x_BTD, hook):
            return x_BTD + W_pos[:x_BTD.shape[-2]]

        for l in range(cfg["n_layers"]):
            for name in ("q", "k"):
                model.add_perma_hook(f"blocks.{l}.attn.{name}.hook_in", add_positions)
    return model.eval()


def _load(model, state_dict):
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    learned = [k for k in missing if not k.endswith(("mask", "IGNORE"))]
    if learned or unexpected:
        raise ValueError(f"state dict mismatch: missing {learned}, unexpected {unexpected}")
