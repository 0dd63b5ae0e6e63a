"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): GRPO without the std division of
the advantages, without the per-response length normalisation (the loss is the token sum over
B·G · max_new_tokens) and without a KL term, on the sort task's gold reward (CPU, ~1 min).

    rlhf-jax grpo --config experiments/grpo_dr_sort_tiny.py
    rlhf-jax grpo --config experiments/grpo_dr_sort_tiny.py grpo.lr=3e-4 grpo.clip_eps=0.1
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
            batch_size=8, group_size=4, max_new_tokens=10, advantage_scale="none", loss_aggregation="dr-grpo",
            use_kl_loss=False,
            hparams=GRPOHParams(kl_coef=0.0, lr=1e-3)),
        optim=RL_OPTIM,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=5, progress=False),
        iterations=40,
        sample_every=0,
        out_dir="runs/grpo_dr_sort_tiny",
    )
