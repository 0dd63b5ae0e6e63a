"""GRPO with LoRA adapters (rank 8 on q/k/v/o + gate/up/down) on the sort task's gold reward (CPU).

    rlhf-jax grpo --config experiments/grpo_lora_sort_tiny.py policy.path=runs/sft_sort_tiny/export
    rlhf-jax grpo --config experiments/grpo_lora_sort_tiny.py policy.lora_rank=16 policy.lora_rslora=true

The policy is the base (frozen, no optimiser state) plus the adapters; the reference is the same base
with the adapters off (no second copy of the weights); ``export/`` holds the merged model and
``export/adapter/`` the adapters in PEFT's format. Without ``policy.path`` the base is the task's tiny
model from random weights (what the test suite runs).
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
                            head_dim=16, lora_rank=8, lora_alpha=16.0),
        reward=RewardSection(kind="gold"),
        data=DataConfig(batch_size=8, max_length=32),
        grpo=GRPOConfig(batch_size=8, group_size=4, max_new_tokens=10, hparams=GRPOHParams(kl_coef=0.04, lr=3e-3)),
        optim=RL_OPTIM,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=5, progress=False),
        iterations=40,
        sample_every=0,
        out_dir="runs/grpo_lora_sort_tiny",
    )
