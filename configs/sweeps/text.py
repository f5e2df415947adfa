"""`icl-jax reproduce --profile text`: the paper's family on natural text at Hoogland et al.'s
shape, configs/text_hoogland.py (the pycode corpus, 2B tokens a member: for accelerators).

The family (1l, 2l, 3l, 1l-smear, 2l-smear, 2l-mlp) is defined once, as paper_small.py's
`family` subset; quick.py, text.py and paper.py each put it on one base config.
Usage: icl-jax sweep --config configs/sweeps/text.py --workdir runs/text
"""
import os

from icl_jax.sweep import load_sweep

HERE = os.path.dirname(os.path.abspath(__file__))


def get_sweep(arg=None):
    if arg:
        raise ValueError(f"takes no argument, got {arg!r}; override fields with --config.x=y")
    family = load_sweep(os.path.join(HERE, "paper_small.py:family"))
    return {**family, "base": os.path.normpath(os.path.join(HERE, "..", "text_hoogland.py"))}
