"""The paper's small-model family (Olsson et al. 2022, "small models") at CPU scale.

Attention-only transformers with 1-6 layers ("1l".."6l"), the same with MLPs
("1l-mlp".."6l-mlp"), and 1L and 2L with smeared keys ("1l-smear", "2l-smear"; the
attention-only 1l and 2l are their vanilla controls), all from configs/small.py.

Usage: icl-jax sweep --config configs/sweeps/paper_small.py[:SUBSET[,steps=N]] --workdir runs/paper_small
  SUBSET: attn | mlp | smear | all (default all)
  steps=N: train N steps instead of configs/small.py's 12,000 (a shorter run misses the
           phase change: on the synthetic data the 2L model's comes at ~7,500-8,000 steps).

Expected wall time on this 2-core CPU, one member at a time, 12,000 steps: measured
1L ~1.6 min and 2L ~2.8 min, so about 1.2 min more per layer; the 6 attention-only
members ~25 min, the 6 with MLPs ~35-40 min (estimated), the smeared pair ~5 min:
roughly 1.1 h for `all`. steps=N scales it linearly (compile time aside, ~10 s each).
"""
FAMILIES = {
    "attn": {f"{n}l": {"arg": f"layers={n}"} for n in range(1, 7)},
    "mlp": {f"{n}l-mlp": {"arg": f"layers={n},mlp=true"} for n in range(1, 7)},
    "smear": {f"{n}l-smear": {"arg": f"layers={n},smear=true"} for n in (1, 2)},
}


def get_sweep(arg=None):
    subset, overrides = "all", {}
    for part in filter(None, (arg or "").split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            subset = key.strip()
        elif key.strip() == "steps" and value.strip().isdigit():
            overrides["train.steps"] = int(value)
        else:
            raise ValueError(f"unknown argument {part!r}; valid: attn, mlp, smear, all, steps=N")
    if subset not in (*FAMILIES, "all"):
        raise ValueError(f"unknown subset {subset!r}; valid: attn, mlp, smear, all")
    members = {}
    for name, family in FAMILIES.items():
        if subset in (name, "all"):
            members.update(family)
    return {"base": "configs/small.py", "overrides": overrides, "members": members}
