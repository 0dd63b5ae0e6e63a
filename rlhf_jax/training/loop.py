"""The one host loop every trainer shares: data -> compiled step -> metrics -> checkpoint.

Nothing here knows about a particular model, loss or algorithm. A trainer (SFT, reward model,
PPO/GRPO/RLOO, DPO, ...) builds a :class:`Job` -- its initial state, a compiled
``step(state, batch) -> (state, metrics)`` and a few hooks -- and :func:`run` does the rest.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import devices as devices_lib
from rlhf_jax.config import ConfigError
from rlhf_jax.errors import Interrupted
from rlhf_jax.provenance import write_run_record
from rlhf_jax.training import mesh as mesh_lib
from rlhf_jax.training import rundir
from rlhf_jax.training.checkpoint import CheckpointConfig, CheckpointManager
from rlhf_jax.training.configs import MeshConfig
from rlhf_jax.training.metrics import (LogConfig, MetricsWriter, ProgressBar, Throughput, check_finite,
                                       peak_flops_per_device, read_jsonl, to_host_scalars)

def warn(message: str) -> None:
    """A warning the user must see (a skipped checkpoint, ...): on stderr, from process 0."""
    if jax.process_index() == 0:
        print(f"rlhf-jax: warning: {message}", file=sys.stderr, flush=True)


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
    n = devices_lib.device_count()
    data, fsdp = mesh_cfg.validate(n)
    if batch_size < 1:
        raise ConfigError(f"config key {batch_key!r}: must be >= 1, got {batch_size}")
    if micro_batches < 1:
        raise ConfigError(f"config key {micro_key!r}: must be >= 1, got {micro_batches}")
    if batch_size % n:
        raise ConfigError(f"config key {batch_key!r}: global batch {batch_size} is not divisible by "
                          f"the {n} devices (data={data} x fsdp={fsdp})")
    if batch_size % devices_lib.process_count():
        raise ConfigError(f"config key {batch_key!r}: global batch {batch_size} is not divisible by "
                          f"the {devices_lib.process_count()} processes")
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
    data, fsdp = mesh_cfg.validate(devices_lib.device_count())
    if mesh_cfg.mode == "pmap":
        if devices_lib.target() is not None:
            raise ConfigError("config key 'mesh.mode': a plan compiles jit programs; pmap is not planned "
                              "(mesh.mode=jit with data=N is the same data parallelism)")
        return Placement("pmap", None, jax.local_device_count())
    return Placement("jit", mesh_lib.make_mesh(data=data, fsdp=fsdp), devices_lib.device_count())


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
        return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    return jax.device_get(params)


def run_record(out_dir: Path, config_dict: dict) -> None:
    """``config.json`` plus ``run.json`` (resolved config, git commit and dirty flag, package versions,
    devices, command line, host, time: see :mod:`rlhf_jax.provenance`), so the run can be traced and
    rerun. Only process 0 writes."""
    if jax.process_index() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    write_run_record(out_dir, config_dict)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the restored step by the killed run."""
    if jax.process_index() != 0 or not path.exists():
        return
    keep = [r for r in read_jsonl(path) if int(r["step"]) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


@dataclasses.dataclass
class Job:
    """What a trainer hands to :func:`run`: its state, its compiled step and the hooks around it.

    state: the initial state, unplaced (``arrays()``/``with_arrays()`` name what a checkpoint holds).
    make_step: ``make_step(placed_state) -> step`` with ``step(placed_state, batch) -> (state, metrics)``
      or ``(state, metrics, aux)``; ``aux`` (e.g. the rollout's token rows) goes to ``on_log``.
    batches: host batches (``next()``), resumable (``state()``/``restore()``), with optional ``.stats``
      (the data layer's counters, logged with the train metrics).
    prepare: host batch -> the step's input (default: ``put(placement, batch)``).
    place/unplace: state -> placed state and back (default: :func:`place_state`/:func:`unplace_state`).
    eval_fn(state) -> metrics, every ``eval_every`` steps and at the end.
    tokens(batch, metrics) -> tokens processed by one step; ``flops_per_token`` for MFU.
    lr_fn(step) -> the learning rate of that step (logged as ``lr``).
    average_window: log the mean of the metrics since the last log (else the last step's).
    progress_keys: metrics shown on the progress bar.
    on_log(step, metrics, aux, writer): called at every step after the metrics are read (samples).
    finite_keys: metrics whose NaN/Inf stops the run (the last good checkpoint stays intact).
    step_name: what a step is called in messages ("step", "iteration").
    final_extra(state) -> (pytree for the final checkpoint's ``extra``, numbers for the result).
    export(state, out_dir) -> the export directory (or None).
    programs(placed_state, step_input) -> ``[Program, ...]``: the compiled programs one step runs, for a
      plan (default: the step made by ``make_step``, when it is a jitted function).
    """
    name: str
    state: Any
    make_step: Callable[[Any], Callable]
    batches: Any
    total_steps: int
    config_dict: dict
    placement: Placement
    prepare: Callable[[dict], Any] | None = None
    place: Callable[[Any], Any] | None = None
    unplace: Callable[[Any], Any] | None = None
    eval_fn: Callable[[Any], dict] | None = None
    eval_every: int = 0
    tokens: Callable[[dict, dict], float] | None = None
    flops_per_token: float | None = None
    lr_fn: Callable[[int], float] | None = None
    average_window: bool = True
    progress_keys: tuple[str, ...] = ("loss",)
    on_log: Callable[[int, dict, Any, MetricsWriter], None] | None = None
    finite_keys: tuple[str, ...] = ("loss", "grad_norm")
    step_name: str = "step"
    final_extra: Callable[[Any], tuple[Any, dict]] | None = None
    export: Callable[[Any, Path], str | None] | None = None
    programs: Callable[[Any, Any], list] | None = None


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted program of a step and the inputs it is compiled for: ``fn.lower(*args, **kwargs)``
    (``ShapeDtypeStruct``s with shardings in a plan). ``model_flops``: FLOPs of one call counted from the
    model shapes (all devices together), the figure a compiler's count of loop bodies undercounts."""
    name: str
    fn: Any
    args: tuple
    kwargs: dict
    model_flops: float | None = None


class Planned(Exception):
    """Raised in a plan (``rlhf_jax.devices.abstract()``) where a run would start (:func:`run`, a vmapped
    sweep's compile): carries the programs with their abstract, sharded inputs and the mesh they are laid
    out on (nothing was written or run)."""

    def __init__(self, programs: list[Program], mesh, job: "Job | None" = None):
        super().__init__(f"planned: {[p.name for p in programs]}")
        self.programs, self.mesh, self.job = programs, mesh, job


def plan_programs(job: Job) -> list[Program]:
    """The programs of ``job``'s step with abstract inputs: the placed initial state and the first
    batch's shapes, both sharded as the run would place them. The trainer built everything else (models,
    optimiser, mesh) exactly as for a run, under ``rlhf_jax.devices.targeting(..., abstract=True)``."""
    placed = (job.place or (lambda st: place_state(job.placement, st)))(job.state)
    host_batch = next(job.batches)
    batch = (job.prepare or (lambda b: put(job.placement, b)))(host_batch)
    flops = None
    if job.flops_per_token and job.tokens is not None:
        flops = float(job.flops_per_token) * float(job.tokens(host_batch, {}))
    if job.programs is not None:
        progs = list(job.programs(placed, batch))
    else:
        progs = [Program(f"{job.name}_step", job.make_step(placed), (placed, batch), {})]
    if flops is not None and len(progs) == 1 and progs[0].model_flops is None:
        progs = [dataclasses.replace(progs[0], model_flops=flops)]
    return progs


def _split_step_output(out, placement: Placement) -> tuple[Any, dict, Any]:
    """``(state, host metrics, aux)`` of a step that returned ``(state, metrics[, aux])`` (under pmap the
    metrics are replicated: device 0's copy)."""
    state, metrics, aux = out if len(out) == 3 else (*out, None)
    if placement.mode == "pmap":
        metrics = jax.tree_util.tree_map(lambda x: x[0], metrics)
    return state, to_host_scalars(metrics), aux


class _Logger:
    """Train-metric windows, throughput, learning rate and the data counters of one run."""

    def __init__(self, job: Job, writer: MetricsWriter, log_cfg: LogConfig):
        self.job, self.writer, self.every = job, writer, log_cfg.every
        self.meter = Throughput(job.flops_per_token, peak_flops_per_device(log_cfg.peak_tflops))
        self.window: list[dict] = []
        self.last: dict = {}

    def add(self, i: int, batch: dict, metrics: dict) -> None:
        job = self.job
        self.meter.add((job.tokens(batch, metrics) if job.tokens else 0.0) * jax.process_count())
        self.window.append(metrics)
        done = i + 1
        if done % self.every and done != job.total_steps:
            return
        if job.average_window:
            last = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[-1]}
        else:
            last = dict(self.window[-1])
        last.update(self.meter.read())
        if job.lr_fn is not None:
            last["lr"] = float(job.lr_fn(i))
        # The data layer's counters (rows read, truncated, dropped, skipped by reason) go into the
        # run's metrics, so nothing it cut or skipped goes unreported.
        stats = getattr(job.batches, "stats", None)
        if stats is not None and hasattr(stats, "as_metrics"):
            last.update(stats.as_metrics())
        self.writer.write(done, last, prefix="train")
        self.window, self.last = [], last


def _restore(job: Job, ckpt: CheckpointManager, placed, metrics_path: Path):
    """The newest checkpoint that restores (a corrupt one is reported and skipped), with its data
    position; the metrics the killed run logged after it are dropped."""
    template = placed if job.placement.mode == "jit" else job.state
    restored = ckpt.restore_newest_good(template, report=warn)
    state = restored.state if job.placement.mode == "jit" else _place(job, restored.state)
    if restored.data_state:
        job.batches.restore(restored.data_state)
    _truncate_metrics(metrics_path, restored.step)
    return state, restored.step


def _place(job: Job, state):
    return job.place(state) if job.place else place_state(job.placement, state)


def _unplace(job: Job, placed):
    return job.unplace(placed) if job.unplace else unplace_state(job.placement, placed)


def _next_batch(job: Job, i: int) -> dict:
    try:
        return next(job.batches)
    except StopIteration:
        raise RuntimeError(f"training data ran out at step {i} of {job.total_steps}; raise "
                           "data.num_epochs (0 = repeat forever) or lower steps") from None


def run(job: Job, *, out_dir: str | Path, ckpt_cfg: CheckpointConfig, log_cfg: LogConfig,
        resume: bool = False) -> TrainResult:
    """The one host loop of every trainer: run directory, resume, steps, evaluation, metrics,
    checkpoints, NaN guard, export and clean-up. Runs ``job.total_steps`` steps (or continues a run
    from its newest good checkpoint with ``resume``) and returns the result with the final state.

    Nothing is written into ``out_dir`` before the run has decided to go ahead there
    (:func:`rundir.claim`), and the directory is held by this process while it runs
    (:class:`rundir.RunLock`). Ctrl-C saves the last completed step when it safely can and raises
    :class:`Interrupted`.
    """
    if devices_lib.abstract():  # a plan: hand back the step's programs, touch nothing
        raise Planned(plan_programs(job), job.placement.mesh, job)
    out_dir = Path(out_dir).absolute()
    with rundir.RunLock(out_dir, enabled=jax.process_index() == 0) as lock:
        rundir.claim(out_dir, job.config_dict, resume)
        lock.mark()
        run_record(out_dir, job.config_dict)
        ckpt = CheckpointManager(out_dir / "checkpoints", ckpt_cfg)
        try:
            return _run_steps(job, out_dir, ckpt, log_cfg, resume)
        finally:
            ckpt.close()


TRUNCATION_WARNING_SHARE = 0.05


def report_data(batches) -> None:
    """The one-line data summary at the start of a run (rows, lengths, what is truncated, dropped or
    skipped), and a warning when more than 5% of the rows are truncated."""
    summary = getattr(batches, "summary", None)
    if summary is None or jax.process_index() != 0:
        return
    s = summary()
    print(s.line(), file=sys.stderr, flush=True)
    if s.truncated > TRUNCATION_WARNING_SHARE * max(s.read, 1):
        warn(f"{s.truncated} of the first {s.read} rows of {s.name} are truncated to fit {s.limit} tokens "
             f"({s.truncated_prompt} prompts, {s.truncated_response} responses); raise data.max_length "
             "(and data.max_prompt_length) if that is not intended")


def _run_steps(job: Job, out_dir: Path, ckpt: CheckpointManager, log_cfg: LogConfig, resume: bool) -> TrainResult:
    metrics_path = out_dir / "metrics.jsonl"
    report_data(job.batches)
    writer = progress = None
    try:
        placed = _place(job, job.state)
        resumed_from = None
        if resume and ckpt.latest_step() is not None:
            placed, resumed_from = _restore(job, ckpt, placed, metrics_path)
        start = resumed_from or 0
        step = job.make_step(placed)
        prepare = job.prepare or (lambda b: put(job.placement, b))
        writer = MetricsWriter(out_dir, tensorboard=log_cfg.tensorboard, config=job.config_dict, log_cfg=log_cfg)
        progress = ProgressBar(job.total_steps, start, enabled=log_cfg.progress, desc=job.name)
        logger = _Logger(job, writer, log_cfg)
        last_eval: dict = {}
        done, data_state = start, job.batches.state()
        try:
            for i in range(start, job.total_steps):
                batch = _next_batch(job, i)
                placed, m, aux = _split_step_output(step(placed, prepare(batch)), job.placement)
                done, data_state = i + 1, job.batches.state()
                check_finite(m, done, job.finite_keys, unit=job.step_name)
                logger.add(i, batch, m)
                if job.on_log is not None:
                    job.on_log(done, m, aux, writer)
                progress.update(1, **{k: m[k] for k in job.progress_keys if k in m})
                if job.eval_fn is not None and ((job.eval_every and done % job.eval_every == 0)
                                                or done == job.total_steps):
                    last_eval = job.eval_fn(_unplace(job, placed))
                    if last_eval:
                        writer.write(done, last_eval, prefix="eval")
                if done != job.total_steps:
                    ckpt.save(done, _unplace(job, placed), data_state=data_state, config=job.config_dict)
        except KeyboardInterrupt:
            raise _interrupted(job, ckpt, out_dir, placed, done, data_state) from None
        final_state = _unplace(job, placed)
        extra_tree, extra_json = job.final_extra(final_state) if job.final_extra else (None, {})
        if extra_json:
            writer.write(job.total_steps, {k: v for k, v in extra_json.items() if isinstance(v, (int, float))},
                         prefix="final")
        if start < job.total_steps or ckpt.latest_step() != job.total_steps:
            ckpt.save(job.total_steps, final_state, data_state=job.batches.state(), config=job.config_dict,
                      extra=extra_tree, force=True)
        ckpt.wait()
        export_dir = job.export(final_state, out_dir) if job.export else None
        return TrainResult(out_dir=str(out_dir), checkpoint_dir=str(out_dir / "checkpoints"),
                           metrics_path=str(metrics_path), export_dir=export_dir, final_step=job.total_steps,
                           resumed_from=resumed_from, train_metrics=logger.last, eval_metrics=last_eval,
                           extra=extra_json, state=final_state)
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()


def _interrupted(job: Job, ckpt: CheckpointManager, out_dir: Path, placed, done: int, data_state) -> Interrupted:
    """After Ctrl-C: saves step ``done`` when its state is intact (a step interrupted mid-call may have
    consumed its donated input) and says where the run stands."""
    alive = all(not (isinstance(x, jax.Array) and x.is_deleted()) for x in jax.tree_util.tree_leaves(placed))
    saved = None
    if alive and done > 0:
        if done not in ckpt.all_steps():
            ckpt.save(done, _unplace(job, placed), data_state=data_state, config=job.config_dict, force=True)
        ckpt.wait()
        saved = done
    elif ckpt.latest_step() is not None:
        ckpt.wait()
        saved = ckpt.latest_step()
    where = (f"checkpoint of {job.step_name} {saved} in {out_dir / 'checkpoints'}" if saved is not None
             else "no checkpoint (nothing completed yet)")
    return Interrupted(f"interrupted after {job.step_name} {done} of {job.total_steps}; {where}", out_dir, saved)
