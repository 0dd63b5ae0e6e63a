"""rlhf_jax.data"""
