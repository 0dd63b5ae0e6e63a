"""REINFORCE++-baseline (Hu 2025): the group mean subtracted from the scores, the k1 KL in the
per-token reward, returns whitened over the whole rollout's tokens (per-token advantages), GRPO's
clipped token loss, on the sort task's gold reward (CPU, ~1 min). ``grpo.advantage=reinforce_pp`` is
plain REINFORCE++ (no group baseline).

    rlhf-jax grpo --config experiments/grpo_reinforce_pp_sort_tiny.py
    rlhf-jax grpo --config experiments/grpo_reinforce_pp_sort_tiny.py grpo.advantage=reinforce_pp
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
            batch_size=8, group_size=4, max_new_tokens=10, advantage="reinforce_pp_baseline",
            use_kl_loss=False, loss_aggregation="token-mean",
            hparams=GRPOHParams(kl_coef=0.01, lr=1e-3)),
        optim=RL_OPTIM,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=5, progress=False),
        iterations=40,
        sample_every=0,
        out_dir="runs/grpo_reinforce_pp_sort_tiny",
    )
