"""GSPO (Zheng et al. 2025): GRPO's group advantages with the clipped SEQUENCE-level importance ratio
(ε = 3e-4 / 4e-4, the paper's), two minibatches per rollout, on the sort task's gold reward (CPU, ~1 min).

    rlhf-jax grpo --config experiments/grpo_gspo_sort_tiny.py
    rlhf-jax grpo --config experiments/grpo_gspo_sort_tiny.py grpo.clip_eps=2e-4
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
            batch_size=8, group_size=4, max_new_tokens=10, policy_loss="gspo", minibatches=2, use_kl_loss=False,
            hparams=GRPOHParams(kl_coef=0.0, lr=1e-3, clip_eps=3e-4, clip_eps_high=4e-4)),
        optim=RL_OPTIM,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=5, progress=False),
        iterations=40,
        sample_every=0,
        out_dir="runs/grpo_gspo_sort_tiny",
    )
