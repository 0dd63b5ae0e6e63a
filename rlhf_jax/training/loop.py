"""The thin host loop every trainer shares: data -> compiled step -> metrics -> checkpoint.

Nothing here knows about a particular model or loss; ``sft.py`` and ``reward.py``
pass their pure step function, their eval function and their data iterator.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from rlhf_jax.config import ConfigError
from rlhf_jax.training import mesh as mesh_lib
from rlhf_jax.training.checkpoint import CheckpointConfig, CheckpointManager
from rlhf_jax.training.metrics import (LogConfig, MetricsWriter, ProgressBar, Throughput,
                                       check_finite, peak_flops_per_device, read_jsonl,
                                       to_host_scalars)
from rlhf_jax.training.configs import MeshConfig


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a trainer returns: where things are and the final numbers."""
    out_dir: str
    checkpoint_dir: str
    metrics_path: str
    export_dir: str | None
    final_step: int
    resumed_from: int | None
    train_metrics: dict
    eval_metrics: dict
    extra: dict
    state: Any = dataclasses.field(repr=False, compare=False, default=None)
    model: Any = dataclasses.field(repr=False, compare=False, default=None)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the computation runs: a jit mesh or pmap over local devices."""
    mode: str
    mesh: Any            # jax.sharding.Mesh in jit mode, None in pmap mode
    n_devices: int


def validate_layout(mesh_cfg: MeshConfig, batch_size: int, micro_batches: int, *,
                    batch_key: str = "data.batch_size", micro_key: str = "micro_batches") -> tuple[int, int]:
    """Checks batch/mesh/micro-batch divisibility before anything is built; ``(data, fsdp)``."""
    n = jax.device_count()
    data, fsdp = mesh_cfg.validate(n)
    if batch_size < 1:
        raise ConfigError(f"config key {batch_key!r}: must be >= 1, got {batch_size}")
    if micro_batches < 1:
        raise ConfigError(f"config key {micro_key!r}: must be >= 1, got {micro_batches}")
    if batch_size % n:
        raise ConfigError(f"config key {batch_key!r}: global batch {batch_size} is not divisible by "
                          f"the {n} devices (data={data} x fsdp={fsdp})")
    if batch_size % jax.process_count():
        raise ConfigError(f"config key {batch_key!r}: global batch {batch_size} is not divisible by "
                          f"the {jax.process_count()} processes")
    per_dev = batch_size // n
    if mesh_cfg.mode == "pmap":
        if per_dev % micro_batches:
            raise ConfigError(f"config key {micro_key!r}: {micro_batches} does not divide the "
                              f"per-device batch {per_dev}")
    elif batch_size % micro_batches:
        raise ConfigError(f"config key {micro_key!r}: {micro_batches} does not divide the "
                          f"global batch {batch_size}")
    return data, fsdp


def make_placement(mesh_cfg: MeshConfig) -> Placement:
    data, fsdp = mesh_cfg.validate(jax.device_count())
    if mesh_cfg.mode == "pmap":
        return Placement("pmap", None, jax.local_device_count())
    return Placement("jit", mesh_lib.make_mesh(data=data, fsdp=fsdp), jax.device_count())


def place_state(placement: Placement, state):
    if placement.mode == "pmap":
        return mesh_lib.replicate(state)
    return mesh_lib.shard_state(placement.mesh, state)


def unplace_state(placement: Placement, state):
    """The state as one logical copy (pmap: device 0's replica)."""
    return mesh_lib.unreplicate(state) if placement.mode == "pmap" else state


def compile_step(placement: Placement, step_fn: Callable, placed_state, **static) -> Callable:
    if placement.mode == "pmap":
        return mesh_lib.pmap_step(step_fn, **static)
    return mesh_lib.jit_step(step_fn, placement.mesh, placed_state, **static)


def put(placement: Placement, batch: dict) -> Any:
    if placement.mode == "pmap":
        return mesh_lib.split_for_pmap(batch)
    return mesh_lib.put_batch(placement.mesh, batch)


def host_params(params):
    """Params as host numpy (gathered across processes when sharded over several hosts)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    return jax.device_get(params)


def run_record(out_dir: Path, config_dict: dict) -> None:
    """``config.json`` plus ``run.json`` (resolved config, git commit and dirty flag, package versions,
    devices, command line, host, time: see :mod:`rlhf_jax.provenance`), so the run can be traced and
    rerun. Only process 0 writes."""
    if jax.process_index() != 0:
        return
    from rlhf_jax.provenance import write_run_record
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    write_run_record(out_dir, config_dict)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the restored step by the killed run."""
    if jax.process_index() != 0 or not path.exists():
        return
    keep = [r for r in read_jsonl(path) if int(r["step"]) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def run_training(*, state, step_fn: Callable, step_static: dict, data_iter: Iterator[dict],
                 batch_keys: tuple[str, ...], total_steps: int, out_dir: str | Path,
                 config_dict: dict, placement: Placement, ckpt_cfg: CheckpointConfig,
                 log_cfg: LogConfig, eval_every: int = 0,
                 eval_fn: Callable[[Any], dict] | None = None, resume: bool = False,
                 tokens_per_batch: Callable[[dict], float] | None = None,
                 flops_per_token: float | None = None,
                 lr_fn: Callable[[int], float] | None = None,
                 final_extra_fn: Callable[[Any], tuple[Any, dict]] | None = None,
                 desc: str = "train") -> tuple[Any, TrainResult]:
    """Runs ``total_steps`` optimiser steps (or continues a run from its checkpoint).

    ``step_fn(state, batch, *, cfg, axis_name=None)`` is the pure step; it is
    compiled once (jit on the mesh, or pmap). ``data_iter`` yields host-local
    numpy batches (this process's rows) and has ``state()``/``restore()``.
    ``eval_fn(state) -> metrics`` runs every ``eval_every`` steps and at the end.
    ``final_extra_fn(state) -> (extra_pytree, extra_json)`` runs after the last
    step; the pytree goes into the final checkpoint's ``extra`` item.
    Returns ``(final_state, TrainResult)``.
    """
    out_dir = Path(out_dir).absolute()
    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    run_record(out_dir, config_dict)
    ckpt = CheckpointManager(ckpt_dir, ckpt_cfg)
    writer = None
    progress = None
    try:
        placed = place_state(placement, state)
        resumed_from = None
        latest = ckpt.latest_step()
        if latest is not None and not resume:
            raise ConfigError(f"--out {str(out_dir)!r} already holds checkpoints (latest step {latest}); "
                              "pass --resume (resume=True) to continue it or choose another --out")
        if resume and latest is not None:
            template = placed if placement.mode == "jit" else state
            restored = ckpt.restore(template)
            placed = restored.state if placement.mode == "jit" else place_state(placement, restored.state)
            if restored.data_state:
                data_iter.restore(restored.data_state)
            resumed_from = restored.step
            _truncate_metrics(metrics_path, restored.step)
        start = resumed_from or 0
        step = compile_step(placement, step_fn, placed, **step_static)
        writer = MetricsWriter(out_dir, tensorboard=log_cfg.tensorboard)
        progress = ProgressBar(total_steps, start, enabled=log_cfg.progress, desc=desc)
        peak = peak_flops_per_device(log_cfg.peak_tflops)
        meter = Throughput(flops_per_token, peak)
        last_train: dict = {}
        last_eval: dict = {}
        window: list[dict] = []
        for i in range(start, total_steps):
            try:
                batch = next(data_iter)
            except StopIteration:
                raise RuntimeError(f"training data ran out at step {i} of {total_steps}; raise "
                                   "data.num_epochs (0 = repeat forever) or lower steps") from None
            n_tokens = (tokens_per_batch(batch) if tokens_per_batch else 0.0) * jax.process_count()
            batch = {k: batch[k] for k in batch_keys if k in batch}
            placed, m = step(placed, put(placement, batch))
            if placement.mode == "pmap":
                m = jax.tree_util.tree_map(lambda x: x[0], m)
            m = to_host_scalars(m)
            done = i + 1
            check_finite(m, done)
            meter.add(n_tokens)
            window.append(m)
            if done % log_cfg.every == 0 or done == total_steps:
                last_train = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
                last_train.update(meter.read())
                if lr_fn is not None:
                    last_train["lr"] = float(lr_fn(i))
                # The data layer's counters (rows read, truncated, dropped, skipped by reason) go
                # into the run's metrics, so nothing it cut or skipped goes unreported.
                stats = getattr(data_iter, "stats", None)
                if stats is not None and hasattr(stats, "as_metrics"):
                    last_train.update(stats.as_metrics())
                writer.write(done, last_train, prefix="train")
                window = []
            progress.update(1, loss=m["loss"])
            if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == total_steps):
                last_eval = eval_fn(unplace_state(placement, placed))
                writer.write(done, last_eval, prefix="eval")
            if done != total_steps:
                ckpt.save(done, unplace_state(placement, placed), data_state=data_iter.state(),
                          config=config_dict)
        final_state = unplace_state(placement, placed)
        extra_tree, extra_json = (None, {})
        if final_extra_fn is not None:
            extra_tree, extra_json = final_extra_fn(final_state)
            if extra_json:
                writer.write(total_steps, {k: v for k, v in extra_json.items()
                                           if isinstance(v, (int, float))}, prefix="final")
        if start < total_steps or ckpt.latest_step() != total_steps:
            ckpt.save(total_steps, final_state, data_state=data_iter.state(), config=config_dict,
                      extra=extra_tree, force=True)
        ckpt.wait()
        result = TrainResult(out_dir=str(out_dir), checkpoint_dir=str(ckpt_dir),
                             metrics_path=str(metrics_path), export_dir=None,
                             final_step=total_steps, resumed_from=resumed_from,
                             train_metrics=last_train, eval_metrics=last_eval, extra=extra_json)
        return final_state, result
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        ckpt.close()
