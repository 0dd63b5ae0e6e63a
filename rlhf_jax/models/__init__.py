"""rlhf_jax.models"""
