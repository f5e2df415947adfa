"""`icl-jax reproduce --profile text`: the paper's family on natural text at Hoogland et al.'s
shape, text_hoogland.py (the pycode corpus, 2B tokens a member: for accelerators).

The family (1l, 2l, 3l, 1l-smear, 2l-smear, 2l-mlp) is defined once, as paper_small.py's
`family` subset; quick.py, text.py, text-cpu.py and paper.py each put it on one base config
(sweep.family_on).
Usage: icl-jax sweep --config text --workdir runs/text
"""
from icl_jax.sweep import family_on


def get_sweep(arg=None):
    return family_on("text_hoogland", arg)
