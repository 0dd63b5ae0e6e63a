"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): GRPO without the std division of
the advantages, without the per-response length normalisation (the loss is the token sum over
B·G · max_new_tokens) and without a KL term, on the sort task's gold reward (CPU, ~1 min).

    rlhf-jax grpo --config experiments/grpo_dr_sort_tiny.py
    rlhf-jax grpo --config experiments/grpo_dr_sort_tiny.py grpo.lr=3e-4 grpo.clip_eps=0.1
"""
import dataclasses
from pathlib import Path

from rlhf_jax.config import load_config_file
from rlhf_jax.rl import GRPOTrainConfig


def get_config() -> GRPOTrainConfig:
    base = load_config_file(Path(__file__).with_name("grpo_sort_tiny.py"))  # everything else as there
    algo = base.grpo.replace(advantage_scale="none", loss_aggregation="dr-grpo", use_kl_loss=False)
    algo = algo.replace(hparams=algo.hparams.replace(kl_coef=0.0))
    return dataclasses.replace(base, grpo=algo, out_dir="runs/grpo_dr_sort_tiny")
