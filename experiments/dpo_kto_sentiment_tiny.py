"""KTO (Ethayarajh et al. 2024) on paired data: chosen completions are desirable, rejected undesirable;
the reference point is the policy/reference KL of the batch's mismatched pairs (a reference forward
pass every step), β=0.1, λ_D = λ_U = 1, from the SFT policy on the sentiment task's pairs (CPU).

    rlhf-jax sft --config experiments/sft_sentiment_tiny.py
    rlhf-jax dpo --config experiments/dpo_kto_sentiment_tiny.py
    rlhf-jax dpo --config experiments/dpo_kto_sentiment_tiny.py dpo.kto_reference_point=zero
"""
import dataclasses
from pathlib import Path

from rlhf_jax.config import load_config_file
from rlhf_jax.rl import DPOTrainConfig


def get_config() -> DPOTrainConfig:
    base = load_config_file(Path(__file__).with_name("dpo_sentiment_tiny.py"))  # everything else as there
    algo = base.dpo.replace(loss_type="kto")
    algo = algo.replace(hparams=algo.hparams.replace(beta=0.1))
    return dataclasses.replace(base, dpo=algo, out_dir="runs/dpo_kto_sentiment_tiny")
