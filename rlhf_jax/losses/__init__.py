"""rlhf_jax.losses"""
