"""``rlhf-jax sweep``: the points of a grid/random search over an experiment config, run here one
after another, emitted as launch commands (``--emit-commands``) or run as one vmapped program
(``--vmap``); see :mod:`rlhf_jax.sweeps`.

    rlhf-jax sweep experiments/sft_sort_tiny.py --grid optim.learning_rate=1e-3,3e-3 --seeds 2 --out runs/sw
    rlhf-jax sweep experiments/ppo_sort_tiny.py --vmap --grid ppo.kl_coef=0.01,0.05,0.2 --seeds 4 --out runs/kl
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rlhf_jax.config import ConfigError, apply_overrides, load_config_file
from rlhf_jax.sweeps.points import SweepPoint, expand_points, launch_command, parse_grid, parse_random
from rlhf_jax.sweeps.sequential import TRAINERS, run_sequential
from rlhf_jax.sweeps.vmapped import run_vmapped_sweep, vmap_values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment config file (a Python file with get_config())")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="grid over a config key (repeatable)")
    parser.add_argument("--random", action="append", default=[], metavar="KEY=DIST:A:B",
                        help="random search: uniform:LO:HI, loguniform:LO:HI, int:LO:HI, choice:A:B")
    parser.add_argument("--num-samples", type=int, default=0, help="random samples per grid point")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per point (0..N-1)")
    parser.add_argument("--seed-key", default="seed", help="config key holding the seed")
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the random search")
    parser.add_argument("--out", default="runs/sweep", help="sweep directory")
    parser.add_argument("--emit-commands", metavar="FILE",
                        help="write one launch command per point to FILE ('-' for stdout) instead of running")
    parser.add_argument("--launch-suffix", default="",
                        help="appended to each emitted command (e.g. multi-host flags)")
    parser.add_argument("--vmap", action="store_true",
                        help="PPO/GRPO/RLOO: run seeds x values of traced hyper-parameters as ONE vmapped program")
    parser.add_argument("--save-policies", action="store_true",
                        help="--vmap: write each run's final policy as a Hugging Face directory <out>/<point>/export")
    parser.add_argument("--stop-on-error", action="store_true",
                        help="sequential sweeps: stop at the first failing point instead of going on")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to every point")
    # `sweep CONFIG --grid a=1,2 steps=2`: the overrides may come after the options, which plain
    # parse_args cannot split from the CONFIG positional; intermixed parsing can.
    parser.parse_args = parser.parse_intermixed_args



def run(args: argparse.Namespace) -> int:
    base = apply_overrides(load_config_file(args.config), args.overrides)
    grid = parse_grid(args.grid)
    random_specs = parse_random(args.random)
    out_dir = Path(args.out)
    if args.vmap:
        return _run_vmapped(args, base, grid, bool(random_specs), out_dir)
    points = expand_points(grid, random_specs=random_specs, num_samples=args.num_samples,
                           seeds=args.seeds, seed_key=args.seed_key, sweep_seed=args.sweep_seed)
    for p in points:  # validate all points before anything runs or is emitted
        apply_overrides(base, p.overrides)
    if args.emit_commands:
        return _emit_commands(args, base, points, out_dir)
    rows = run_sequential(args.config, base, points, out_dir, stop_on_error=args.stop_on_error)
    failed = [r for r in rows if "error" in r]
    print(f"{len(rows)} points -> {out_dir / 'results.csv'}"
          + (f"; {len(failed)} FAILED: " + "; ".join(f"point {r['point']}: {r['error']}" for r in failed)
             if failed else ""))
    return 1 if failed else 0


def _run_vmapped(args: argparse.Namespace, base, grid: dict[str, list[str]], has_random: bool,
                 out_dir: Path) -> int:
    if has_random:
        raise ConfigError("--vmap takes --grid values only (no --random)")
    if args.emit_commands:
        raise ConfigError("--vmap runs one program here; it cannot be combined with --emit-commands")
    vmap_values(base, grid)  # refuse non-traced keys before anything is built
    res = run_vmapped_sweep(base, grid, seeds=args.seeds, out_dir=out_dir, config_path=args.config,
                            save_policies=args.save_policies)
    print(f"{res.num_runs} vmapped runs in one program (compile {res.compile_seconds:.1f} s, "
          f"run {res.run_seconds:.1f} s) -> {out_dir / 'results.csv'}")
    return 0


def _emit_commands(args: argparse.Namespace, base, points: list[SweepPoint], out_dir: Path) -> int:
    command, _ = TRAINERS.get(type(base).__name__, (None, None))
    if command is None:
        raise ConfigError(f"no rlhf-jax subcommand runs a {type(base).__name__}")
    lines = [launch_command(args.config, command, p, str(out_dir), args.launch_suffix)
             for p in points]
    text = "\n".join(lines) + "\n"
    if args.emit_commands == "-":
        print(text, end="")
    else:
        Path(args.emit_commands).write_text(text)
        print(f"{len(lines)} commands -> {args.emit_commands}")
    return 0
