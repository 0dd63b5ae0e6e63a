"""Hyper-parameter sweeps: grids and random search over any config key.

Three ways to run the points of a sweep over an experiment config file:

* locally, one after another (the default): each point is the config with its
  overrides applied, run through the trainer that owns the config type;
* as launch commands (``--emit-commands FILE``): one ``rlhf-jax`` command line
  per point, for a cluster scheduler or a TPU pod (multi-host flags appended
  from ``--launch-suffix``);
* vmapped (``--vmap``): for models small enough, N seeds x M values of ONE
  continuous hyper-parameter run as a single compiled program through
  ``jax.vmap`` over the traced hyper-parameters (see ``rlhf_jax.rl.sweep``).

Results are collected into ``results.jsonl`` and ``results.csv`` in the sweep
directory: one row per point with its overrides and final metrics.

    rlhf-jax sweep experiments/ppo_tiny.py --grid ppo.kl_coef=0.01,0.05 --seeds 2 --out runs/sw
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import itertools
import json
import math
import random
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhf_jax.config import ConfigError, apply_overrides, load_config_file, parse_override

# config class name -> (cli subcommand, "module:function" of its Python entry point)
TRAINERS: dict[str, tuple[str, str]] = {
    "SFTConfig": ("sft", "rlhf_jax.training.sft:train_sft"),
    "RewardConfig": ("reward", "rlhf_jax.training.reward:train_reward"),
    "PPOConfig": ("ppo", "rlhf_jax.rl:train_ppo"),
    "GRPOConfig": ("grpo", "rlhf_jax.rl:train_grpo"),
    "RLOOConfig": ("rloo", "rlhf_jax.rl:train_rloo"),
    "DPOConfig": ("dpo", "rlhf_jax.rl:train_dpo"),
    "PipelineConfig": ("pipeline", "rlhf_jax.pipeline:run_pipeline"),
}

_DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One point: an index, a seed and the ``KEY=VALUE`` overrides that define it."""
    index: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        parts = [o.replace("/", "_").replace("=", "-") for o in self.overrides]
        return f"{self.index:03d}_" + "_".join(parts) if parts else f"{self.index:03d}"


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["a.b=1,2", "c=x"]`` -> ``{"a.b": ["1", "2"], "c": ["x"]}``."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, values = parse_override(spec)
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not items:
            raise ConfigError(f"--grid {spec!r}: no values after '='")
        if key in grid:
            raise ConfigError(f"--grid {spec!r}: key {key!r} given twice")
        grid[key] = items
    return grid


def parse_random(specs: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """``["optim.lr=loguniform:1e-5:1e-3", "x=choice:a:b"]`` -> distributions."""
    out: dict[str, tuple[str, list[str]]] = {}
    for spec in specs:
        key, body = parse_override(spec)
        kind, *args = body.split(":")
        if kind not in _DISTRIBUTIONS:
            raise ConfigError(f"--random {spec!r}: distribution must be one of {_DISTRIBUTIONS}")
        if kind in ("uniform", "loguniform", "int"):
            if len(args) != 2:
                raise ConfigError(f"--random {spec!r}: {kind} takes LOW:HIGH")
            try:
                lo, hi = float(args[0]), float(args[1])
            except ValueError:
                raise ConfigError(f"--random {spec!r}: LOW and HIGH must be numbers") from None
            if not lo < hi or (kind == "loguniform" and lo <= 0):
                raise ConfigError(f"--random {spec!r}: need 0 < LOW < HIGH for loguniform, LOW < HIGH otherwise")
        elif not args:
            raise ConfigError(f"--random {spec!r}: choice needs at least one option")
        out[key] = (kind, args)
    return out


def _sample(kind: str, args: list[str], rng: random.Random) -> str:
    if kind == "choice":
        return rng.choice(args)
    lo, hi = float(args[0]), float(args[1])
    if kind == "uniform":
        return repr(rng.uniform(lo, hi))
    if kind == "loguniform":
        return repr(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return str(rng.randint(int(lo), int(hi)))


def expand_points(grid: dict[str, list[str]], *, random_specs: dict[str, tuple[str, list[str]]] | None = None,
                  num_samples: int = 0, seeds: int = 1, seed_key: str = "seed",
                  sweep_seed: int = 0) -> list[SweepPoint]:
    """All grid combinations (x random samples) x seeds, in a deterministic order."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    keys = list(grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]
    if random_specs:
        if num_samples < 1:
            raise ConfigError("--random needs --num-samples >= 1")
        rng = random.Random(sweep_seed)
        sampled = []
        for combo in combos:
            for _ in range(num_samples):
                extra = {k: _sample(kind, args, rng) for k, (kind, args) in random_specs.items()}
                sampled.append({**combo, **extra})
        combos = sampled
    points = []
    for combo in combos:
        for s in range(seeds):
            overrides = [f"{k}={v}" for k, v in combo.items()]
            if seeds > 1 or seed_key in combo:
                overrides = [o for o in overrides if not o.startswith(seed_key + "=")]
                overrides.append(f"{seed_key}={combo.get(seed_key, 0) if seeds == 1 else s}")
            points.append(SweepPoint(len(points), tuple(overrides)))
    return points


def trainer_for(cfg: Any) -> tuple[str, Callable[[Any], Any]]:
    """The (subcommand, entry point) that runs a config of this type."""
    name = type(cfg).__name__
    if name not in TRAINERS:
        raise ConfigError(f"no trainer runs a {name}; sweepable config types: {sorted(TRAINERS)}")
    command, target = TRAINERS[name]
    module, func = target.split(":")
    return command, getattr(importlib.import_module(module), func)


def launch_command(config_path: str, command: str, point: SweepPoint, out_dir: str,
                   suffix: str = "") -> str:
    args = ["rlhf-jax", command, "--config", config_path, "--out", f"{out_dir}/{point.name}",
            *point.overrides]
    line = " ".join(shlex.quote(a) for a in args)
    return f"{line} {suffix}".strip()


def final_metrics(result: Any) -> dict[str, float]:
    """Flattens whatever a trainer returned into ``{name: number}``."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    if hasattr(result, "_asdict"):
        result = result._asdict()
    flat: dict[str, float] = {}

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(x, bool):
            flat[prefix] = float(x)
        elif isinstance(x, (int, float)):
            flat[prefix] = float(x)
        elif hasattr(x, "shape") and getattr(x, "shape", None) == ():
            flat[prefix] = float(x)

    walk("", result)
    return flat


def write_results(rows: list[dict[str, Any]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k != "point", k != "overrides", k))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (" ".join(v) if isinstance(v, list) else v) for k, v in row.items()})


def run_sequential(config_path: str, base_cfg: Any, points: list[SweepPoint], out_dir: Path,
                   *, out_key: str = "out_dir") -> list[dict[str, Any]]:
    """Runs each point through its trainer in this process, one after another."""
    _, train = trainer_for(base_cfg)
    # Validate every point before running any, so a typo fails in seconds, not hours.
    cfgs = [apply_overrides(base_cfg, p.overrides) for p in points]
    rows = []
    for point, cfg in zip(points, cfgs):
        if any(f.name == out_key for f in dataclasses.fields(cfg)):
            cfg = dataclasses.replace(cfg, **{out_key: str(out_dir / point.name)})
        t0 = time.time()
        result = train(cfg)
        row = {"point": point.index, "overrides": list(point.overrides),
               "wall_seconds": round(time.time() - t0, 3), **final_metrics(result)}
        rows.append(row)
        write_results(rows, out_dir)  # keep partial results if a later point dies
    return rows


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
                        help="run seeds x values of one continuous hyper-parameter as ONE vmapped program")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to every point")


def run(args: argparse.Namespace) -> int:
    base = apply_overrides(load_config_file(args.config), args.overrides)
    grid = parse_grid(args.grid)
    random_specs = parse_random(args.random)
    out_dir = Path(args.out)
    if args.vmap:
        from rlhf_jax.rl import sweep as vsweep  # heavy import only when asked
        rows = vsweep.run_vmapped_sweep(base, grid, seeds=args.seeds, out_dir=out_dir)
        write_results(rows, out_dir)
        print(f"{len(rows)} vmapped points -> {out_dir / 'results.csv'}")
        return 0
    points = expand_points(grid, random_specs=random_specs, num_samples=args.num_samples,
                           seeds=args.seeds, seed_key=args.seed_key, sweep_seed=args.sweep_seed)
    for p in points:  # validate all points before anything runs or is emitted
        apply_overrides(base, p.overrides)
    if args.emit_commands:
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
    rows = run_sequential(args.config, base, points, out_dir)
    print(f"{len(rows)} points -> {out_dir / 'results.csv'}")
    return 0
