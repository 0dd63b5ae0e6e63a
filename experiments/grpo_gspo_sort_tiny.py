"""GSPO (Zheng et al. 2025): GRPO's group advantages with the clipped SEQUENCE-level importance ratio
(ε = 3e-4 / 4e-4, the paper's), two minibatches per rollout, on the sort task's gold reward (CPU, ~1 min).

    rlhf-jax grpo --config experiments/grpo_gspo_sort_tiny.py
    rlhf-jax grpo --config experiments/grpo_gspo_sort_tiny.py grpo.clip_eps=2e-4
"""
import dataclasses
from pathlib import Path

from rlhf_jax.config import load_config_file
from rlhf_jax.rl import GRPOTrainConfig


def get_config() -> GRPOTrainConfig:
    base = load_config_file(Path(__file__).with_name("grpo_sort_tiny.py"))  # everything else as there
    algo = base.grpo.replace(policy_loss="gspo", minibatches=2, use_kl_loss=False)
    algo = algo.replace(hparams=algo.hparams.replace(kl_coef=0.0, clip_eps=3e-4, clip_eps_high=4e-4))
    return dataclasses.replace(base, grpo=algo, out_dir="runs/grpo_gspo_sort_tiny")
