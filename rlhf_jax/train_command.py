"""The runner of every trainer subcommand (``rlhf-jax sft|reward|ppo|grpo|rloo|dpo``), from the table
``rlhf_jax.trainers.TRAINERS``: one argument set, config file + overrides, one summary line."""
from __future__ import annotations

import argparse

import jax

from rlhf_jax.trainers import TRAINERS, load
from rlhf_jax.training.common import add_common_arguments, config_from_args, init_distributed_from_args


# ---- the trainer subcommands (one argument set, one runner) ----

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every trainer subcommand takes."""
    add_common_arguments(parser, "the config's out_dir")


def run(args) -> int:
    """Runs the trainer of ``args.command`` on ``--config`` + overrides; prints one summary line."""
    config_target, train_target, keys, _ = TRAINERS[args.command]
    init_distributed_from_args(args)
    cfg = config_from_args(args, load(config_target)())
    result = load(train_target)(cfg)
    if jax.process_index() == 0:
        print(summary_line(args.command, result, keys))
    return 0


def summary_line(name: str, result, keys: tuple[str, ...]) -> str:
    """``"<name>: N steps; <metric> <value>, ...; out DIR[; export DIR]"``."""
    found = {**result.train_metrics, **{f"eval/{k}": v for k, v in result.eval_metrics.items()},
             **{k: v for k, v in result.extra.items() if isinstance(v, (int, float))}}
    parts = ", ".join(f"{k} {found[k]:.4f}" for k in keys if k in found)
    return (f"{name}: {result.final_step} steps; {parts}; out {result.out_dir}"
            + (f"; export {result.export_dir}" if result.export_dir else ""))
