"""SFT of the sentiment task's tiny model from scratch on its noisy demonstrations (CPU, ~1 min).

    rlhf-jax sft --config experiments/sft_sentiment_tiny.py
    rlhf-jax sft --config experiments/sft_sentiment_tiny.py steps=50 --out runs/sft_quick

Its export (``runs/sft_sentiment_tiny/export``) is the policy of ppo_sentiment_tiny.py and
dpo_sentiment_tiny.py and the trunk of reward_sentiment_tiny.py.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.training.optim import OptimConfig
from rlhf_jax.training.sft import SFTConfig


def get_config() -> SFTConfig:
    return SFTConfig(
        task="sentiment",
        model=ModelSection(name="task"),
        data=DataConfig(batch_size=32, max_length=64),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=20),
        steps=200,
        eval_every=100,
        eval_batches=2,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=10, progress=False),
        out_dir="runs/sft_sentiment_tiny",
    )
