"""The paper's small-model family (Olsson et al. 2022, "small models") at CPU scale.

Attention-only transformers with 1-6 layers ("1l".."6l"), the same with MLPs
("1l-mlp".."6l-mlp"), and 1L and 2L with smeared keys ("1l-smear", "2l-smear"; the
attention-only 1l and 2l are their vanilla controls), all from small.py.

Usage: icl-jax sweep --config paper_small[:SUBSET[,steps=N]] --workdir runs/paper_small
  SUBSET: attn | mlp | smear | all (default all) | family (the six models `icl-jax
          reproduce` trains: 1l, 2l, 3l, 1l-smear, 2l-smear, 2l-mlp; the sweep files
          quick.py, text.py and paper.py beside this one are that family on each profile)
  steps=N: train N steps instead of small.py's 6,000 (on its copy2 synthetic data
           the 2L models' phase changes come at ~1,000-3,000 steps, 2L-MLP's last).

Measured on this 2-core CPU, `all` with --jobs 2 --analyze: 50 min of training and 6 min
of analysis, with two other single-core runs sharing the machine for most of it (alone,
members should take about 25 s for 1L plus ~25 s per further layer, MLPs ~30% more,
as estimated from the quick profile).
"""
FAMILIES = {
    "attn": {f"{n}l": {"arg": f"layers={n}"} for n in range(1, 7)},
    "mlp": {f"{n}l-mlp": {"arg": f"layers={n},mlp=true"} for n in range(1, 7)},
    "smear": {f"{n}l-smear": {"arg": f"layers={n},smear=true"} for n in (1, 2)},
}
# the members the paper's four claims are checked on, in the order results.md lists them
FAMILY = ("1l", "2l", "3l", "1l-smear", "2l-smear", "2l-mlp")


def get_sweep(arg=None):
    subset, overrides = "all", {}
    for part in filter(None, (arg or "").split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            subset = key.strip()
        elif key.strip() == "steps" and value.strip().isdigit():
            overrides["train.steps"] = int(value)
        else:
            raise ValueError(f"unknown argument {part!r}; valid: attn, mlp, smear, all, "
                             "family, steps=N")
    if subset not in (*FAMILIES, "all", "family"):
        raise ValueError(f"unknown subset {subset!r}; valid: attn, mlp, smear, all, family")
    members = {}
    for name, family in FAMILIES.items():
        if subset in (name, "all"):
            members.update(family)
    if subset == "family":
        every = {n: m for family in FAMILIES.values() for n, m in family.items()}
        members = {n: every[n] for n in FAMILY}
    return {"base": "small", "overrides": overrides, "members": members}
