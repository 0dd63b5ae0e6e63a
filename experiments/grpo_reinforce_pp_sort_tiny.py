"""REINFORCE++-baseline (Hu 2025): the group mean subtracted from the scores, the k1 KL in the
per-token reward, returns whitened over the whole rollout's tokens (per-token advantages), GRPO's
clipped token loss, on the sort task's gold reward (CPU, ~1 min). ``grpo.advantage=reinforce_pp`` is
plain REINFORCE++ (no group baseline).

    rlhf-jax grpo --config experiments/grpo_reinforce_pp_sort_tiny.py
    rlhf-jax grpo --config experiments/grpo_reinforce_pp_sort_tiny.py grpo.advantage=reinforce_pp
"""
import dataclasses
from pathlib import Path

from rlhf_jax.config import load_config_file
from rlhf_jax.rl import GRPOTrainConfig


def get_config() -> GRPOTrainConfig:
    base = load_config_file(Path(__file__).with_name("grpo_sort_tiny.py"))  # everything else as there
    algo = base.grpo.replace(advantage="reinforce_pp_baseline", use_kl_loss=False,
                             loss_aggregation="token-mean")
    algo = algo.replace(hparams=algo.hparams.replace(kl_coef=0.01))
    return dataclasses.replace(base, grpo=algo, out_dir="runs/grpo_reinforce_pp_sort_tiny")
