"""icl_jax: in-context learning and induction heads (Olsson et al., 2022) in JAX."""

__all__ = ["Run"]
__version__ = "0.2.0"


def __getattr__(name):
    # Run needs jax; importing the package (icl_jax.workdir, icl_jax.config) does not
    if name == "Run":
        from icl_jax.checkpoints import Run
        return Run
    raise AttributeError(f"module 'icl_jax' has no attribute {name!r}")
