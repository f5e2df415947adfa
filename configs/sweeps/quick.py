"""`icl-jax reproduce --profile quick`: the paper's family on configs/small.py's synthetic data
(a few minutes on a 2-core CPU).

The family (1l, 2l, 3l, 1l-smear, 2l-smear, 2l-mlp) is defined once, as paper_small.py's
`family` subset; quick.py, text.py and paper.py each put it on one base config.
Usage: icl-jax sweep --config configs/sweeps/quick.py --workdir runs/quick
"""
import os

from icl_jax.sweep import load_sweep

HERE = os.path.dirname(os.path.abspath(__file__))


def get_sweep(arg=None):
    if arg:
        raise ValueError(f"takes no argument, got {arg!r}; override fields with --config.x=y")
    family = load_sweep(os.path.join(HERE, "paper_small.py:family"))
    return {**family, "base": os.path.normpath(os.path.join(HERE, "..", "small.py"))}
