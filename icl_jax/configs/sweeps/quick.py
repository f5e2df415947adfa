"""`icl-jax reproduce --profile quick`: the paper's family on small.py's synthetic data
(a few minutes on a 2-core CPU).

The family (1l, 2l, 3l, 1l-smear, 2l-smear, 2l-mlp) is defined once, as paper_small.py's
`family` subset; quick.py, text.py, text-cpu.py and paper.py each put it on one base config
(sweep.family_on).
Usage: icl-jax sweep --config quick --workdir runs/quick
"""
from icl_jax.sweep import family_on


def get_sweep(arg=None):
    return family_on("small", arg)
