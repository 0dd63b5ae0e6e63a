"""ORPO (Hong et al. 2024): reference-free; the chosen completions' NLL plus λ=0.1 times the odds-ratio
loss on length-normalised log-probs, on the sentiment task's simulated-labeller pairs (CPU; no
reference pass).

    rlhf-jax sft --config experiments/sft_sentiment_tiny.py
    rlhf-jax dpo --config experiments/dpo_orpo_sentiment_tiny.py
    rlhf-jax dpo --config experiments/dpo_orpo_sentiment_tiny.py dpo.beta=0.2
"""
import dataclasses
from pathlib import Path

from rlhf_jax.config import load_config_file
from rlhf_jax.rl import DPOTrainConfig


def get_config() -> DPOTrainConfig:
    base = load_config_file(Path(__file__).with_name("dpo_sentiment_tiny.py"))  # everything else as there
    algo = base.dpo.replace(loss_type="orpo")
    algo = algo.replace(hparams=algo.hparams.replace(beta=0.1))
    return dataclasses.replace(base, dpo=algo, out_dir="runs/dpo_orpo_sentiment_tiny")
