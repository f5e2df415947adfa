"""The 2-layer attention-only model with seeds 0..N-1: how much does the phase change move?

Usage: icl-jax sweep --config seeds[:N] --workdir runs/seeds [--ensemble]
N: the number of seeds (default 4). The members differ only in seed, so --ensemble
trains them as one vmapped program. ~2.8 min each on 2 CPU cores at 12,000 steps.
"""
from icl_jax.sweep import product


def get_sweep(arg=None):
    try:
        n = int(arg) if arg else 4
    except ValueError:
        raise ValueError(f"the argument is the number of seeds, got {arg!r}") from None
    if n < 1:
        raise ValueError(f"the number of seeds must be at least 1, got {n}")
    return {"base": "small:layers=2", "overrides": {},
            "members": product({"seed": list(range(n))})}
