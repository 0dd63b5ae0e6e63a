"""SimPO (Meng et al. 2024): reference-free, on length-normalised log-probs, β=2.0 and target margin
γ=1.0 (the paper's γ/β = 0.5), from the SFT policy on the sentiment task's simulated-labeller pairs
(CPU; no reference pass).

    rlhf-jax sft --config experiments/sft_sentiment_tiny.py
    rlhf-jax dpo --config experiments/dpo_simpo_sentiment_tiny.py
    rlhf-jax dpo --config experiments/dpo_simpo_sentiment_tiny.py dpo.simpo_gamma=0.5 dpo.beta=2.5
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.rl import RL_OPTIM, DPOConfig, DPOHParams, DPOTrainConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig


def get_config() -> DPOTrainConfig:
    return DPOTrainConfig(
        task="sentiment",
        policy=ModelSection(path="runs/sft_sentiment_tiny/export", name="task"),
        data=DataConfig(batch_size=16, max_length=24, pack=False),
        noise=-1.0,
        dpo=DPOConfig(loss_type="simpo", hparams=DPOHParams(beta=2.0, simpo_gamma=1.0, lr=1e-4)),
        optim=RL_OPTIM,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=10, progress=False),
        steps=100,
        eval_every=50,
        eval_batches=2,
        out_dir="runs/dpo_simpo_sentiment_tiny",
    )
