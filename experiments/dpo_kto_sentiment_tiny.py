"""KTO (Ethayarajh et al. 2024) on paired data: chosen completions are desirable, rejected undesirable;
the reference point is the policy/reference KL of the batch's mismatched pairs (a reference forward
pass every step), β=0.1, λ_D = λ_U = 1, from the SFT policy on the sentiment task's pairs (CPU).

    rlhf-jax sft --config experiments/sft_sentiment_tiny.py
    rlhf-jax dpo --config experiments/dpo_kto_sentiment_tiny.py
    rlhf-jax dpo --config experiments/dpo_kto_sentiment_tiny.py dpo.kto_reference_point=zero dpo.kto_undesirable_weight=1.5
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
        dpo=DPOConfig(loss_type="kto", hparams=DPOHParams(beta=0.1, lr=1e-4)),
        optim=RL_OPTIM,
        checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=10, progress=False),
        steps=100,
        eval_every=50,
        eval_batches=2,
        out_dir="runs/dpo_kto_sentiment_tiny",
    )
