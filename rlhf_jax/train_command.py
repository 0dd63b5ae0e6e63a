"""The runner of every trainer subcommand (``rlhf-jax sft|reward|ppo|grpo|rloo|dpo``), from the table
``rlhf_jax.trainers.TRAINERS``: one argument set, config file + overrides, one summary line
(``--print-config``: the resolved config, documented key by key, and nothing else)."""
from __future__ import annotations

import argparse
import textwrap

import jax

from rlhf_jax.config import config_sections, format_config, to_dict
from rlhf_jax.trainers import TRAINERS, VALIDATORS, load
from rlhf_jax.training.common import add_common_arguments, config_from_args, init_distributed_from_args


# ---- the trainer subcommands (one argument set, one runner) ----

def add_arguments(parser: argparse.ArgumentParser, name: str | None = None) -> None:
    """The arguments every trainer subcommand takes; with the trainer's ``name``, the help also lists
    its config sections."""
    add_common_arguments(parser, "the config's out_dir")
    if name is not None:
        parser.epilog = config_help(name) + ("\n\n" + parser.epilog if parser.epilog else "")
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def config_help(name: str, width: int = 100) -> str:
    """The config sections of trainer ``name`` with their one-line purpose, and its top-level keys."""
    cfg = load(TRAINERS[name][0])()
    lines = textwrap.wrap(f"config sections (override any key as section.KEY=VALUE; 'rlhf-jax {name} "
                          "--print-config' shows every key with its value, default and doc):", width)
    for key, doc in config_sections(cfg):
        depth = key.count(".")
        lines += textwrap.wrap(f"{key}: {doc}", width, initial_indent="  " * (depth + 1),
                               subsequent_indent="  " * (depth + 3))
    top = [k for k, v in to_dict(cfg).items() if not isinstance(v, dict)]
    lines += textwrap.wrap("top-level keys: " + ", ".join(top), width, subsequent_indent="  ")
    return "\n".join(lines)


def run(args) -> int:
    """Runs the trainer of ``args.command`` on ``--config`` + overrides; prints one summary line."""
    config_target, train_target, keys, _ = TRAINERS[args.command]
    if getattr(args, "print_config", False):
        return print_config(args)
    init_distributed_from_args(args)
    cfg = config_from_args(args, load(config_target)())
    result = load(train_target)(cfg)
    if jax.process_index() == 0:
        print(summary_line(args.command, result, keys))
    return 0


def print_config(args) -> int:
    """``--print-config``: the resolved config, one documented line per key, then the trainer's own
    checks (nothing is built or written). A config the trainer would refuse is still printed, and the
    refusal is the usual error (exit status 2)."""
    cfg = config_from_args(args, load(TRAINERS[args.command][0])())
    print(format_config(cfg), end="", flush=True)
    load(VALIDATORS[args.command])(cfg)
    return 0


def summary_line(name: str, result, keys: tuple[str, ...]) -> str:
    """``"<name>: N steps; <metric> <value>, ...; out DIR[; export DIR]"``."""
    found = {**result.train_metrics, **{f"eval/{k}": v for k, v in result.eval_metrics.items()},
             **{k: v for k, v in result.extra.items() if isinstance(v, (int, float))}}
    parts = ", ".join(f"{k} {found[k]:.4f}" for k in keys if k in found)
    return (f"{name}: {result.final_step} steps; {parts}; out {result.out_dir}"
            + (f"; export {result.export_dir}" if result.export_dir else ""))
