"""`rlhf-jax` command line: parse a subcommand and hand over to the library.

Each subcommand lives in the package that owns it, as a module exposing
``add_arguments(parser)`` and ``run(args) -> int``. The table below is the only
place that knows them, so `rlhf-jax --help` imports nothing heavy.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("rlhf_jax.training.sft", "supervised fine-tuning (token cross-entropy on responses)"),
    "reward": ("rlhf_jax.training.reward", "train a Bradley-Terry reward model on preferences/rankings"),
    "ppo": ("rlhf_jax.rl.ppo_cli", "PPO with a KL penalty against a reward model or function"),
    "grpo": ("rlhf_jax.rl.grpo_cli", "GRPO: group-relative policy optimisation"),
    "rloo": ("rlhf_jax.rl.rloo_cli", "RLOO: REINFORCE with a leave-one-out baseline"),
    "dpo": ("rlhf_jax.rl.dpo_cli", "direct preference optimisation (sigmoid/hinge/IPO/robust)"),
    "pipeline": ("rlhf_jax.pipeline", "SFT -> reward model -> PPO on an embedded gold-reward task"),
    "sweep": ("rlhf_jax.sweeps.cli", "grid/random sweeps, sequential, as launch commands, or vmapped"),
    "generate": ("rlhf_jax.generation.cli", "sample completions from a checkpoint"),
    "data": ("rlhf_jax.data.cli", "inspect, validate and convert datasets (JSONL/Parquet/TFDS)"),
    "bench": ("benchmarks.cli", "benchmarks against PyTorch peers and the hardware limit"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-jax",
        description="RLHF in JAX: SFT, reward models, PPO with KL penalty, GRPO/RLOO/DPO.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from: {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"rlhf-jax {name}", description=help_text)
    module.add_arguments(sub_parser)
    # `--config.a.b=1` style overrides (absl/ml_collections habit) are pulled out before argparse
    # sees them, and land in the subcommand's `overrides` list as `a.b=1`.
    rest = argv[1:]
    dotted = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    rest = [a for a in rest if not a.startswith("--config.")]
    args = sub_parser.parse_args(rest)
    if dotted:
        if not hasattr(args, "overrides"):
            sub_parser.error(f"'rlhf-jax {name}' takes no config overrides (got --config.{dotted[0]})")
        args.overrides = list(args.overrides or []) + dotted
    from rlhf_jax.config import ConfigError
    try:
        return int(module.run(args) or 0)
    except ConfigError as e:  # a user error: say it plainly, no traceback
        print(f"rlhf-jax {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
