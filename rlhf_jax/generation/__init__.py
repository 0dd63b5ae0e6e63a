"""rlhf_jax.generation"""
