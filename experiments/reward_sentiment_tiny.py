"""Bradley-Terry reward model on the sentiment task's simulated-labeller pairs (CPU, ~1 min).

    rlhf-jax sft --config experiments/sft_sentiment_tiny.py          # first: the SFT trunk
    rlhf-jax reward --config experiments/reward_sentiment_tiny.py
    rlhf-jax reward --config experiments/reward_sentiment_tiny.py label_noise=0.5 model.path= model.name=task

The trunk starts from the SFT export (InstructGPT); ``model.path=`` (empty) with ``model.name=task``
trains it from scratch instead. ``label_noise`` is the labeller's BT temperature (< 0: task default).
The export (``runs/reward_sentiment_tiny/export``) is the proxy reward of ppo_sentiment_tiny.py.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.training.optim import OptimConfig
from rlhf_jax.training.reward import RewardConfig


def get_config() -> RewardConfig:
    return RewardConfig(
        task="sentiment",
        format="preference",
        label_noise=-1.0,
        model=ModelSection(path="runs/sft_sentiment_tiny/export", name="task"),
        data=DataConfig(batch_size=32, max_length=24, pack=False),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=10),
        steps=200,
        eval_every=100,
        eval_batches=2,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=10, progress=False),
        out_dir="runs/reward_sentiment_tiny",
    )
