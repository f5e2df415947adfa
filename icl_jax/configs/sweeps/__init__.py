"""The built-in sweep files, by name: `icl-jax sweep --config paper_small:attn`; quick,
text, text-cpu and paper are `icl-jax reproduce`'s profiles. Each is a Python file with
get_sweep(arg) that icl-jax executes."""

# `icl-jax reproduce --profile`: the sweeps above that reproduce the paper, smallest first
PROFILES = ("quick", "text", "text-cpu", "paper")
