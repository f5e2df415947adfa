"""`icl-jax reproduce --profile text-cpu`: the paper's family on natural text at the
cheapest setting the CPU search found (text_cpu.py: pycode, d_model 128, context
128, 5,000 steps of 8,192 tokens), for this 2-core CPU.
Usage: icl-jax sweep --config text-cpu --workdir runs/text-cpu
"""
from icl_jax.sweep import family_on


def get_sweep(arg=None):
    return family_on("text_cpu", arg)
