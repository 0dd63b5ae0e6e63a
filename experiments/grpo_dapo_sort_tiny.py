"""DAPO (Yu et al. 2025): token-level loss (token-mean), decoupled clip ε_low=0.2 / ε_high=0.28, no KL
term, soft overlong punishment in the last 4 tokens before max_new_tokens, and dynamic sampling: up to 3
rounds of prompts per iteration, keeping only groups whose rewards differ (any left over are masked out
of the loss), all inside the one compiled iteration, on the sort task's gold reward (CPU, ~1-2 min).

    rlhf-jax grpo --config experiments/grpo_dapo_sort_tiny.py
    rlhf-jax grpo --config experiments/grpo_dapo_sort_tiny.py grpo.overlong_penalty=0.5 grpo.clip_eps_high=0.3
"""
import dataclasses
from pathlib import Path

from rlhf_jax.config import load_config_file
from rlhf_jax.rl import GRPOTrainConfig


def get_config() -> GRPOTrainConfig:
    base = load_config_file(Path(__file__).with_name("grpo_sort_tiny.py"))  # everything else as there
    algo = base.grpo.replace(loss_aggregation="token-mean", use_kl_loss=False, overlong_buffer=4,
                             mask_zero_std_groups=True, dynamic_sampling_rounds=3)
    algo = algo.replace(hparams=algo.hparams.replace(kl_coef=0.0, clip_eps=0.2, clip_eps_high=0.28,
                                                     overlong_penalty=1.0))
    return dataclasses.replace(base, grpo=algo, out_dir="runs/grpo_dapo_sort_tiny")
