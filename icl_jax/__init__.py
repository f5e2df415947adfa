"""icl_jax: in-context learning and induction heads (Olsson et al., 2022) in JAX."""
from icl_jax.checkpoints import Run

__all__ = ["Run"]
__version__ = "0.1.0"
