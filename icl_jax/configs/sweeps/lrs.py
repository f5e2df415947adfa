"""The 2-layer attention-only model over a learning-rate grid times seeds.

Usage: icl-jax sweep --config lrs[:seeds=S,lrs=3e-4/1e-3/3e-3] --workdir runs/lrs
Members are named lr=<lr>_seed=<s> (e.g. lr=1e-3_seed=0). Default: lrs 3e-4, 1e-3,
3e-3 and seeds 0, 1 (6 members, ~2.8 min each on 2 CPU cores at 12,000 steps). All
members differ only in train.lr and seed, so --ensemble trains them together.
"""
from icl_jax.sweep import product


def get_sweep(arg=None):
    lrs, seeds = [3e-4, 1e-3, 3e-3], 2
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        try:
            if key.strip() == "seeds":
                seeds = int(value)
            elif key.strip() == "lrs":
                lrs = [float(v) for v in value.split("/") if v]
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"cannot read {part!r}; valid: seeds=N, lrs=a/b/c") from None
    return {"base": "small:layers=2", "overrides": {},
            "members": product({"train.lr": lrs, "seed": list(range(seeds))})}
