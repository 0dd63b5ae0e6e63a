"""SFT of the sort task's tiny model from scratch on its noisy demonstrations (CPU, ~1 min).

    rlhf-jax sft --config experiments/sft_sort_tiny.py
    rlhf-jax sft --config experiments/sft_sort_tiny.py --out runs/sft_sort steps=50 optim.learning_rate=1e-3

The exported policy (``runs/sft_sort_tiny/export``) is the start of ppo_sort_tiny.py with
``policy.path=runs/sft_sort_tiny/export`` and of dpo/grpo runs on the same task.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.training.optim import OptimConfig
from rlhf_jax.training.sft import SFTConfig


def get_config() -> SFTConfig:
    return SFTConfig(
        task="sort",
        model=ModelSection(name="task"),
        data=DataConfig(batch_size=32, max_length=32),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=20),
        steps=200,
        eval_every=100,
        eval_batches=2,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=10, progress=False),
        out_dir="runs/sft_sort_tiny",
    )
