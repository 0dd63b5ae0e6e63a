"""DAPO (Yu et al. 2025): token-level loss (token-mean), decoupled clip ε_low=0.2 / ε_high=0.28, no KL
term, soft overlong punishment in the last 4 tokens before max_new_tokens, and zero-variance groups
masked out of the loss (the in-program stand-in for dynamic sampling), on the sort task's gold
reward (CPU, ~1 min).

    rlhf-jax grpo --config experiments/grpo_dapo_sort_tiny.py
    rlhf-jax grpo --config experiments/grpo_dapo_sort_tiny.py grpo.overlong_penalty=0.5 grpo.clip_eps_high=0.3
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.rl import RL_OPTIM, GRPOConfig, GRPOHParams, GRPOTrainConfig, RewardSection
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig


def get_config() -> GRPOTrainConfig:
    return GRPOTrainConfig(
        task="sort",
        policy=ModelSection(name="task", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2,
                            head_dim=16),
        reward=RewardSection(kind="gold"),
        data=DataConfig(batch_size=8, max_length=32),
        grpo=GRPOConfig(
            batch_size=8, group_size=4, max_new_tokens=10, loss_aggregation="token-mean", use_kl_loss=False,
            overlong_buffer=4, mask_zero_std_groups=True,
            hparams=GRPOHParams(kl_coef=0.0, lr=1e-3, clip_eps=0.2, clip_eps_high=0.28, overlong_penalty=1.0)),
        optim=RL_OPTIM,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=5, progress=False),
        iterations=40,
        sample_every=0,
        out_dir="runs/grpo_dapo_sort_tiny",
    )
