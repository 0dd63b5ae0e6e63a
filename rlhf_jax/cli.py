"""`rlhf-jax` command line: parse a subcommand and hand over to the library.

Every trainer is one row of ``rlhf_jax.trainers.TRAINERS`` (its config class, its train function, the
metrics of its summary line); they all share one argument set (``--config FILE``, ``--out``, ``--resume``, the
multi-host flags and ``KEY=VALUE`` overrides) and one runner, :mod:`rlhf_jax.train_command`. The other
subcommands live in the package that owns them. Each subcommand's module exposes
``add_arguments(parser)`` and ``run(args) -> int`` (``args.command`` names the subcommand).
Modules are named by string, so ``rlhf-jax --help`` imports nothing heavy.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import textwrap

from rlhf_jax.errors import Interrupted, UserError
from rlhf_jax.trainers import TRAINERS

# name -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    **{name: ("rlhf_jax.train_command", row[3]) for name, row in TRAINERS.items()},
    "pipeline": ("rlhf_jax.pipeline", "SFT -> reward model -> PPO on an embedded gold-reward task"),
    "compare": ("rlhf_jax.compare", "the algorithm family side by side on a gold-reward task (leaderboard)"),
    "sweep": ("rlhf_jax.sweeps.cli", "grid/random sweeps, sequential, as launch commands, or vmapped"),
    "generate": ("rlhf_jax.generation.cli", "sample completions from a checkpoint"),
    "data": ("rlhf_jax.data.cli", "inspect, validate and convert datasets (JSONL/Parquet/TFDS)"),
    "bench": ("benchmarks.cli", "benchmarks against PyTorch peers and the hardware limit"),
    "plan": ("rlhf_jax.plan", "compile a run's programs for a TPU topology (or cpu:N): memory, fits, FLOPs, roofline"),
    "overopt": ("rlhf_jax.overopt", "over-optimisation lab: best-of-N, RL and RM ensembles vs gold (Gao-style fits)"),
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


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` anywhere on the command line, or ``RLHF_JAX_DEBUG`` set to a true value."""
    return "--debug" in argv or os.environ.get("RLHF_JAX_DEBUG", "").lower() in ("1", "true", "yes", "on")


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: this one with ``--resume``."""
    args = [a for a in argv if a != "--debug"]
    return shlex.join(["rlhf-jax", *args, *([] if "--resume" in args else ["--resume"])])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from: {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(
        prog=f"rlhf-jax {name}", description=help_text,
        epilog=textwrap.fill(
            "Errors in what you give (config keys, data, model directories, checkpoints, run directories) "
            "print one message and exit with status 2; --debug (or RLHF_JAX_DEBUG=1) shows the traceback.", 100))
    if name in TRAINERS:  # the trainers' help lists their config sections
        module.add_arguments(sub_parser, name)
    else:
        module.add_arguments(sub_parser)
    # `--config.a.b=1` style overrides (absl/ml_collections habit) are pulled out before argparse
    # sees them, and land in the subcommand's `overrides` list as `a.b=1`.
    rest = argv[1:]
    dotted = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    rest = [a for a in rest if not a.startswith("--config.")]
    args = sub_parser.parse_intermixed_args(rest)  # overrides may come before and after --out etc.
    args.command = name
    if dotted:
        if not hasattr(args, "overrides"):
            sub_parser.error(f"'rlhf-jax {name}' takes no config overrides (got --config.{dotted[0]})")
        args.overrides = list(args.overrides or []) + dotted
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"rlhf-jax {name}: interrupted", file=sys.stderr)
        return 130
    except UserError as e:  # the user's to fix: say it plainly, no traceback (unless --debug)
        if debug:
            raise
        print(f"rlhf-jax {name}: error: {e}", file=sys.stderr)
        if isinstance(e, Interrupted):
            print(f"rlhf-jax {name}: continue with: {resume_command(argv)}", file=sys.stderr)
            return 130
        return 2


if __name__ == "__main__":
    sys.exit(main())
