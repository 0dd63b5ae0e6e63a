"""CISPO (MiniMax-M1, 2025): REINFORCE with clipped, stop-gradient importance weights (upper bound
1 + clip_eps_high = 5, no lower bound; token-mean loss), two minibatches per rollout, on the sort
task's gold reward (CPU, ~1 min).

    rlhf-jax grpo --config experiments/grpo_cispo_sort_tiny.py
    rlhf-jax grpo --config experiments/grpo_cispo_sort_tiny.py grpo.clip_eps_high=2.0
"""
import dataclasses
from pathlib import Path

from rlhf_jax.config import load_config_file
from rlhf_jax.rl import GRPOTrainConfig


def get_config() -> GRPOTrainConfig:
    base = load_config_file(Path(__file__).with_name("grpo_sort_tiny.py"))  # everything else as there
    algo = base.grpo.replace(policy_loss="cispo", loss_aggregation="token-mean", use_kl_loss=False,
                             minibatches=2)
    algo = algo.replace(hparams=algo.hparams.replace(kl_coef=0.0, clip_eps_high=4.0))
    return dataclasses.replace(base, grpo=algo, out_dir="runs/grpo_cispo_sort_tiny")
