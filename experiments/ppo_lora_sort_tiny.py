"""PPO with LoRA adapters on the policy and its own adapters on the critic, sort task, gold reward (CPU).

    rlhf-jax ppo --config experiments/ppo_lora_sort_tiny.py policy.path=runs/sft_sort_tiny/export
    rlhf-jax ppo --config experiments/ppo_lora_sort_tiny.py ppo.value_model=shared   # value head on the policy

The reference is the policy's base with the adapters off (no second copy). The separate value model
(``value_init="policy"``: the policy's trunk + a fresh head) trains its own adapters and its head; with
``ppo.value_model=shared`` the value head trains with the policy's adapters. ``export/adapter/`` holds the
policy's adapters in PEFT's format. Without ``policy.path`` the base is the task's tiny model from random
weights (what the test suite runs).
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.rl import RL_OPTIM, PPOConfig, PPOHParams, PPOTrainConfig, RewardSection
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig


def get_config() -> PPOTrainConfig:
    return PPOTrainConfig(
        task="sort",
        policy=ModelSection(name="task", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2,
                            head_dim=16, lora_rank=8, lora_alpha=16.0),
        reward=RewardSection(kind="gold"),
        data=DataConfig(batch_size=8, max_length=32),
        ppo=PPOConfig(batch_size=8, max_new_tokens=10, ppo_epochs=2, minibatches=2,
                      hparams=PPOHParams(kl_coef=0.05, lr=3e-3)),
        optim=RL_OPTIM,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=5, progress=False),
        iterations=40,
        sample_every=0,
        out_dir="runs/ppo_lora_sort_tiny",
    )
