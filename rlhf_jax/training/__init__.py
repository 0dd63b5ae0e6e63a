"""rlhf_jax.training"""
