"""`rlhf-jax rloo`: RLOO from an experiments config file plus KEY=VALUE overrides.

    rlhf-jax rloo --config experiments/rloo_sentiment.py rloo.batch_size=16 --out runs/rloo
    rlhf-jax rloo task=sort iterations=50            # built-in defaults on an embedded task
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rlhf_jax.rl.trainer import RLOOTrainConfig
    from rlhf_jax.training.common import add_common_arguments
    add_common_arguments(parser, RLOOTrainConfig.out_dir)


def run(args) -> int:
    import jax

    from rlhf_jax.rl.trainer import RLOOTrainConfig, train_rloo
    from rlhf_jax.training.common import config_from_args, init_distributed_from_args
    init_distributed_from_args(args)
    cfg = config_from_args(args, RLOOTrainConfig())
    result = train_rloo(cfg)
    if jax.process_index() == 0:
        m = result.train_metrics
        summary = ", ".join(f"{k} {m[k]:.4f}" for k in ("score", "kl", "loss", "reward_margin") if k in m)
        print(f"rloo: {result.final_step} steps; {summary}; out {result.out_dir}"
              + (f"; export {result.export_dir}" if result.export_dir else ""))
    return 0
