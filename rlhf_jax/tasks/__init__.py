"""rlhf_jax.tasks"""
