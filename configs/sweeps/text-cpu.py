"""`icl-jax reproduce --profile text-cpu`: the paper's family on natural text at the
cheapest setting the CPU search found (configs/text_cpu.py: pycode, d_model 128, context
128, 5,000 steps of 8,192 tokens), for this 2-core CPU.
Usage: icl-jax sweep --config configs/sweeps/text-cpu.py --workdir runs/text-cpu
"""
import os

from icl_jax.sweep import load_sweep

HERE = os.path.dirname(os.path.abspath(__file__))


def get_sweep(arg=None):
    if arg:
        raise ValueError(f"takes no argument, got {arg!r}; override fields with --config.x=y")
    family = load_sweep(os.path.join(HERE, "paper_small.py:family"))
    return {**family, "base": os.path.normpath(os.path.join(HERE, "..", "text_cpu.py"))}
