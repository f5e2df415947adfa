"""`icl-jax reproduce --profile paper`: the paper's family at the paper's shapes,
paper.py (d_model 768, 12 heads, long context): for accelerators.

The family (1l, 2l, 3l, 1l-smear, 2l-smear, 2l-mlp) is defined once, as paper_small.py's
`family` subset; quick.py, text.py, text-cpu.py and paper.py each put it on one base config
(sweep.family_on).
Usage: icl-jax sweep --config paper --workdir runs/paper
"""
from icl_jax.sweep import family_on


def get_sweep(arg=None):
    return family_on("paper", arg)
