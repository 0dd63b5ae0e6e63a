"""Sweep points: a grid and/or random search over config keys, times seeds, and their launch commands.

A point is the base config plus ``KEY=VALUE`` overrides; :func:`expand_points` lists them in a
deterministic order (grid combinations, then random samples per combination, seeds fastest).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
import shlex
from pathlib import Path
from typing import Sequence

from rlhf_jax.config import ConfigError, parse_override

_DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One point: an index, a seed and the ``KEY=VALUE`` overrides that define it."""
    index: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        parts = []
        for o in self.overrides:
            key, _, value = o.partition("=")
            if "/" in value:  # a file or directory: its name says enough
                value = Path(value).stem
            parts.append(f"{key}-{value}".replace("/", "_"))
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


def launch_command(config_path: str, command: str, point: SweepPoint, out_dir: str,
                   suffix: str = "") -> str:
    """The ``rlhf-jax`` command line that runs ``point`` into ``out_dir/<point.name>``, then ``suffix``
    (e.g. multi-host flags)."""
    args = ["rlhf-jax", command, "--config", config_path, "--out", f"{out_dir}/{point.name}",
            *point.overrides]
    line = " ".join(shlex.quote(a) for a in args)
    return f"{line} {suffix}".strip()

