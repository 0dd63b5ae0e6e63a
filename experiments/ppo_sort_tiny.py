"""PPO on the sort task against its JAX gold reward, no prerequisites (CPU, under a minute).

    rlhf-jax ppo --config experiments/ppo_sort_tiny.py
    rlhf-jax ppo --config experiments/ppo_sort_tiny.py policy.path=runs/sft_sort_tiny/export   # from SFT
    rlhf-jax sweep experiments/ppo_sort_tiny.py --vmap --grid ppo.kl_coef=0.01,0.1 --seeds 2 --out runs/kl_sweep

The smallest RL recipe: the task's tiny model (d=32 here) from scratch as policy and reference, the
gold reward inside the jitted iteration. It is the config the vmapped-sweep test runs.
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
                            head_dim=16),
        reward=RewardSection(kind="gold"),
        data=DataConfig(batch_size=8, max_length=32),
        ppo=PPOConfig(batch_size=8, max_new_tokens=10, ppo_epochs=2, minibatches=2,
                      hparams=PPOHParams(kl_coef=0.05, lr=1e-3)),
        optim=RL_OPTIM,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=5, progress=False),
        iterations=40,
        sample_every=0,
        out_dir="runs/ppo_sort_tiny",
    )
