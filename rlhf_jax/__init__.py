"""rlhf_jax: reinforcement learning from human feedback in JAX."""

__version__ = "0.1.0"
