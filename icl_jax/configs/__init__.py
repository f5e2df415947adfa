"""The built-in configs, by name: `icl-jax train --config small:layers=2`.

Each is a Python file with get_config(arg) (as in big_vision) that icl-jax executes;
copy one to start your own (`icl-jax configs` prints where they are) and pass its path:
`--config my_config.py:layers=2`. sweeps/ holds the built-in sweep files.
"""
