"""PPO with a KL penalty at the GPT-2 124M shape: SFT policy, learned reward model (accelerators).

    rlhf-jax ppo --config experiments/ppo_gpt2.py          # after sft_gpt2.py and reward_gpt2.py
    rlhf-jax ppo --config experiments/ppo_gpt2.py policy.path=/path/to/gpt2 reward.path=/path/to/rm

``policy.path`` is the SFT policy (also the frozen reference), ``reward.path`` the reward model
(a ``ScalarHeadModel`` directory, e.g. ``train_reward``'s export). Prompts: the sentiment task's
prompt records, or ``data.path`` in the prompt format.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, ModelSection
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.rl import RL_OPTIM, PPOConfig, PPOHParams, PPOTrainConfig, RewardSection


def get_config() -> PPOTrainConfig:
    return PPOTrainConfig(
        task="sentiment",
        policy=ModelSection(path="runs/sft_gpt2/export", dtype="bfloat16", remat=False),
        value_init="reward",
        reward=RewardSection(kind="model", path="runs/reward_gpt2/export"),
        data=DataConfig(batch_size=64, max_length=128),
        ppo=PPOConfig(batch_size=64, max_new_tokens=32, ppo_epochs=4, minibatches=2, adaptive_kl=True,
                      hparams=PPOHParams(kl_coef=0.05, kl_target=6.0, lr=1e-6, temperature=1.0)),
        optim=RL_OPTIM,
        mesh=MeshConfig(data=-1, fsdp=1),
        checkpoint=CheckpointConfig(every=50, keep=2),
        log=LogConfig(every=1),
        iterations=200,
        sample_every=10,
        num_samples=4,
        out_dir="runs/ppo_gpt2",
    )
