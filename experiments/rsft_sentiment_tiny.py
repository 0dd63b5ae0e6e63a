"""Rejection-sampling fine-tuning (best-of-n distillation, iterated) on the sentiment task (CPU, ~1 min).

    rlhf-jax sft --config experiments/sft_sentiment_tiny.py
    rlhf-jax reward --config experiments/reward_sentiment_tiny.py
    rlhf-jax rsft --config experiments/rsft_sentiment_tiny.py
    rlhf-jax rsft --config experiments/rsft_sentiment_tiny.py reward.kind=gold iterations=10

Each iteration samples ``rsft.num_samples`` responses per prompt from the current policy, keeps the
one the reward model scores highest and takes ``rsft.sft_epochs`` SFT steps on the kept responses.
The policy starts from the SFT export; ``kl`` is measured to that starting policy.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.rl.rsft import RSFTConfig, RSFTHParams, RSFTTrainConfig
from rlhf_jax.rl.trainer import RewardSection
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.training.optim import OptimConfig


def get_config() -> RSFTTrainConfig:
    return RSFTTrainConfig(
        task="sentiment",
        policy=ModelSection(path="runs/sft_sentiment_tiny/export", name="task"),
        reward=RewardSection(kind="model", path="runs/reward_sentiment_tiny/export"),
        data=DataConfig(batch_size=16, max_length=64),
        rsft=RSFTConfig(batch_size=16, num_samples=8, max_new_tokens=16, sft_epochs=2,
                        hparams=RSFTHParams(temperature=1.0)),
        optim=OptimConfig(learning_rate=3e-4, schedule="constant", b2=0.999, max_grad_norm=1.0),
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=5, progress=False),
        iterations=30,
        sample_every=10,
        num_samples=4,
        out_dir="runs/rsft_sentiment_tiny",
    )
