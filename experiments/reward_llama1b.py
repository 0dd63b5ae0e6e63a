"""Bradley-Terry reward model at the ~1B Llama shape (Llama-3.2-1B), trunk from the SFT run (accelerators).

    rlhf-jax reward --config experiments/reward_llama1b.py                       # after sft_llama1b.py
    rlhf-jax reward --config experiments/reward_llama1b.py model.path=/path/to/Llama-3.2-1B data.path=prefs.jsonl

The trunk comes from ``model.path`` (default: the SFT export ``runs/sft_llama1b/export``; any Hugging
Face directory works), with a fresh scalar head. Pairs: the sentiment task's simulated labeller
(``label_noise``) or ``data.path`` in the preference format.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, ModelSection
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.training.optim import OptimConfig
from rlhf_jax.training.reward import RewardConfig


def get_config() -> RewardConfig:
    return RewardConfig(
        task="sentiment",
        model=ModelSection(path="runs/sft_llama1b/export", dtype="bfloat16", remat=True),
        data=DataConfig(batch_size=32, max_length=256, pack=False),
        optim=OptimConfig(learning_rate=1e-5, warmup_steps=20, weight_decay=0.01),
        mesh=MeshConfig(data=1, fsdp=-1),
        steps=500,
        eval_every=100,
        eval_batches=8,
        normalize=True,
        checkpoint=CheckpointConfig(every=250, keep=2),
        log=LogConfig(every=10),
        out_dir="runs/reward_llama1b",
    )
