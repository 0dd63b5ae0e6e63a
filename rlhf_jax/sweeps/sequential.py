"""Sequential sweeps: every point through the trainer that owns the config type, in this process.

Each point runs in ``<out_dir>/<point.name>`` and gets a ``run.json`` (:mod:`rlhf_jax.provenance`)
with its overrides and final metrics; the table of all points is rewritten after each one
(:func:`rlhf_jax.sweeps.report.write_results`), so a sweep that dies keeps what it finished.
"""
from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path
from typing import Any, Callable

from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax import trainers
from rlhf_jax.provenance import write_run_record
from rlhf_jax.sweeps.points import SweepPoint
from rlhf_jax.sweeps.report import write_results

# config class name -> (cli subcommand, "module:function" of its Python entry point): the trainers'
# table plus the pipeline
TRAINERS: dict[str, tuple[str, str]] = {
    **{config.split(":")[1]: (name, train) for name, (config, train, _, _) in trainers.TRAINERS.items()},
    "PipelineConfig": ("pipeline", "rlhf_jax.pipeline:run_pipeline"),
}


def trainer_for(cfg: Any) -> tuple[str, Callable[[Any], Any]]:
    """The (subcommand, entry point) that runs a config of this type."""
    name = type(cfg).__name__
    if name not in TRAINERS:
        raise ConfigError(f"no trainer runs a {name}; sweepable config types: {sorted(TRAINERS)}")
    command, target = TRAINERS[name]
    module, func = target.split(":")
    return command, getattr(importlib.import_module(module), func)


def final_metrics(result: Any) -> dict[str, float]:
    """Flattens whatever a trainer returned into ``{name: number}``.

    A dataclass (e.g. ``training.TrainResult``) is read field by field WITHOUT deep-copying (its
    ``state``/``model`` fields hold whole parameter trees and are skipped, like every value that
    is neither a number, a scalar array nor a dict); dicts are flattened with dotted names, so
    ``TrainResult.train_metrics["score"]`` becomes ``"train_metrics.score"``.
    """
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
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
        elif hasattr(x, "shape") and getattr(x, "shape", None) == () and hasattr(x, "dtype"):
            flat[prefix] = float(x)

    walk("", result)
    return flat


def run_sequential(config_path: str, base_cfg: Any, points: list[SweepPoint], out_dir: Path,
                   *, out_key: str = "out_dir", stop_on_error: bool = False) -> list[dict[str, Any]]:
    """Runs each point through its trainer in this process, one after another.

    Every point is validated before the first one runs. Point ``i`` runs in
    ``out_dir/<point.name>`` (its ``out_key`` field is set to that), and after it finishes its
    ``run.json`` is (re)written by :func:`rlhf_jax.provenance.write_run_record` with the sweep
    point and its final metrics under ``extra``. A point that raises is recorded with its
    ``error`` and the sweep goes on (``stop_on_error=False``) or re-raises at once; the caller sees
    failures in the rows (``run`` exits non-zero).
    """
    _, train = trainer_for(base_cfg)
    # Validate every point before running any, so a typo fails in seconds, not hours.
    cfgs = [apply_overrides(base_cfg, p.overrides) for p in points]
    write_run_record(out_dir, base_cfg, extra={"sweep": {
        "mode": "sequential", "config_path": config_path,
        "points": [{"point": p.index, "overrides": list(p.overrides)} for p in points]}})
    rows: list[dict[str, Any]] = []
    for point, cfg in zip(points, cfgs):
        _run_point(train, point, cfg, out_dir, rows, out_key=out_key, stop_on_error=stop_on_error)
    return rows


def _run_point(train: Callable[[Any], Any], point: SweepPoint, cfg: Any, out_dir: Path,
               rows: list[dict[str, Any]], *, out_key: str, stop_on_error: bool) -> None:
    """Runs one point, appends its row to ``rows`` and writes its run record and the table so far."""
    run_dir = out_dir / point.name
    if any(f.name == out_key for f in dataclasses.fields(cfg)):
        cfg = dataclasses.replace(cfg, **{out_key: str(run_dir)})
    t0 = time.time()
    row: dict[str, Any] = {"point": point.index, "overrides": list(point.overrides), "out_dir": str(run_dir)}
    try:
        result = train(cfg)
    except Exception as e:  # recorded in the table and the run record, then re-raised or reported
        row.update(wall_seconds=round(time.time() - t0, 3), error=f"{type(e).__name__}: {e}")
        rows.append(row)
        write_results(rows, out_dir)
        write_run_record(run_dir, cfg, extra={"sweep_point": row})
        if stop_on_error:
            raise
        return
    row.update(wall_seconds=round(time.time() - t0, 3), **final_metrics(result))
    rows.append(row)
    write_run_record(run_dir, cfg, extra={"sweep_point": row})
    write_results(rows, out_dir)  # keep partial results if a later point dies
