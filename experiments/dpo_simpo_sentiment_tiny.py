"""SimPO (Meng et al. 2024): reference-free, on length-normalised log-probs, β=2.0 and target margin
γ=1.0 (the paper's γ/β = 0.5), from the SFT policy on the sentiment task's simulated-labeller pairs
(CPU; no reference pass).

    rlhf-jax sft --config experiments/sft_sentiment_tiny.py
    rlhf-jax dpo --config experiments/dpo_simpo_sentiment_tiny.py
    rlhf-jax dpo --config experiments/dpo_simpo_sentiment_tiny.py dpo.simpo_gamma=0.5 dpo.beta=2.5
"""
import dataclasses
from pathlib import Path

from rlhf_jax.config import load_config_file
from rlhf_jax.rl import DPOTrainConfig


def get_config() -> DPOTrainConfig:
    base = load_config_file(Path(__file__).with_name("dpo_sentiment_tiny.py"))  # everything else as there
    algo = base.dpo.replace(loss_type="simpo")
    algo = algo.replace(hparams=algo.hparams.replace(beta=2.0, simpo_gamma=1.0))
    return dataclasses.replace(base, dpo=algo, out_dir="runs/dpo_simpo_sentiment_tiny")
