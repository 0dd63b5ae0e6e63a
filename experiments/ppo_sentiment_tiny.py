"""PPO with a KL penalty against the LEARNED reward model on the sentiment task (CPU, a few min).

    rlhf-jax sft --config experiments/sft_sentiment_tiny.py
    rlhf-jax reward --config experiments/reward_sentiment_tiny.py
    rlhf-jax ppo --config experiments/ppo_sentiment_tiny.py
    rlhf-jax ppo --config experiments/ppo_sentiment_tiny.py --config.ppo.kl_coef=0.02 iterations=20

The policy and the frozen reference start from the SFT export; the value model's trunk from the
policy. β (``ppo.kl_coef``) is traced: sweep it in one program with
``rlhf-jax sweep experiments/ppo_sentiment_tiny.py --vmap --grid ppo.kl_coef=0.01,0.05,0.2 --seeds 2``.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.rl import RL_OPTIM, PPOConfig, PPOHParams, PPOTrainConfig, RewardSection
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig


def get_config() -> PPOTrainConfig:
    return PPOTrainConfig(
        task="sentiment",
        policy=ModelSection(path="runs/sft_sentiment_tiny/export", name="task"),
        value_init="policy",
        reward=RewardSection(kind="model", path="runs/reward_sentiment_tiny/export"),
        data=DataConfig(batch_size=32, max_length=64),
        ppo=PPOConfig(batch_size=32, max_new_tokens=16, ppo_epochs=4, minibatches=2,
                      hparams=PPOHParams(kl_coef=0.05, kl_target=6.0, lr=1e-3, temperature=1.0)),
        optim=RL_OPTIM,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=5, progress=False),
        iterations=60,
        sample_every=20,
        num_samples=4,
        out_dir="runs/ppo_sentiment_tiny",
    )
