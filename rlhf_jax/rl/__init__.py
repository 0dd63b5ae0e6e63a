"""rlhf_jax.rl"""
