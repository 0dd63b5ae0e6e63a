"""PPO with a KL penalty at the ~1B Llama shape (Llama-3.2-1B): SFT policy, learned reward model (accelerators).

    rlhf-jax ppo --config experiments/ppo_llama1b.py          # after sft_llama1b.py and reward_llama1b.py
    rlhf-jax ppo --config experiments/ppo_llama1b.py policy.path=/path/to/Llama-3.2-1B reward.path=/path/to/rm

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
        policy=ModelSection(path="runs/sft_llama1b/export", dtype="bfloat16", remat=True),
        value_init="reward",
        reward=RewardSection(kind="model", path="runs/reward_llama1b/export"),
        data=DataConfig(batch_size=64, max_length=256),
        ppo=PPOConfig(batch_size=64, max_new_tokens=64, ppo_epochs=4, minibatches=4, adaptive_kl=True,
                      hparams=PPOHParams(kl_coef=0.05, kl_target=6.0, lr=1e-6, temperature=1.0)),
        optim=RL_OPTIM,
        mesh=MeshConfig(data=1, fsdp=-1),
        checkpoint=CheckpointConfig(every=50, keep=2),
        log=LogConfig(every=1),
        iterations=200,
        sample_every=10,
        num_samples=4,
        out_dir="runs/ppo_llama1b",
    )
