"""Metrics: JSONL + TensorBoard event files, a progress bar, throughput/MFU, a NaN guard.

Only process 0 writes (``MetricsWriter(enabled=jax.process_index() == 0)`` by
default); the values it writes are global (they come out of the compiled step
already reduced over all devices and hosts).
"""
from __future__ import annotations

import dataclasses
import html
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from rlhf_jax.config import ConfigError
from rlhf_jax.errors import UserError


class NonFiniteError(UserError, FloatingPointError):
    """A loss or gradient norm became NaN/Inf; the message names the step and metric."""


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metrics files, progress and experiment tracking."""
    every: int = 10              # write train metrics every N steps
    tensorboard: bool = True     # also write TensorBoard event files to out_dir/tb
    progress: bool = True        # tqdm progress bar (rate, ETA)
    peak_tflops: float = 0.0     # per-device peak for MFU; 0 = look up the device kind
    wandb: bool = False          # also log to Weights & Biases (pip install 'rlhf_jax[wandb]')
    wandb_project: str = "rlhf_jax"  # the W&B project of the run
    wandb_mode: str = "offline"  # online|offline|disabled (offline needs no network: wandb sync later)
    wandb_run_name: str = ""     # the W&B run's name ("" = W&B picks one)

    def validate(self, prefix: str = "log.") -> None:
        if self.every < 1:
            raise ConfigError(f"config key {prefix + 'every'!r}: must be >= 1, got {self.every}")
        if self.peak_tflops < 0:
            raise ConfigError(f"config key {prefix + 'peak_tflops'!r}: must be >= 0")
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"config key {prefix + 'wandb_mode'!r}: expected one of {list(WANDB_MODES)}, "
                              f"got {self.wandb_mode!r}")
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"config key {prefix + 'wandb'!r}: true, but wandb is not installed; "
                              "install it with: pip install 'rlhf_jax[wandb]' (or pip install wandb)")


WANDB_MODES = ("online", "offline", "disabled")


def to_host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device metrics -> Python floats (replicated arrays read from the local copy)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, jax.Array) and not v.is_fully_addressable:
            v = v.addressable_data(0)
        out[k] = float(np.asarray(jax.device_get(v)))
    return out


def check_finite(metrics: Mapping[str, float], step: int,
                 keys: tuple[str, ...] = ("loss", "grad_norm"), *, unit: str = "step") -> None:
    """Raises ``NonFiniteError`` naming the step and metric if any of ``keys`` is NaN/Inf."""
    for k in keys:
        if k in metrics and not math.isfinite(float(metrics[k])):
            raise NonFiniteError(
                f"non-finite {k} = {metrics[k]} at {unit} {step}; stopping (the last saved "
                "checkpoint is untouched)")


# Dense peak FLOP/s per device (bf16, no sparsity) by `device_kind` substring.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
                "V100": 125.0, "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
                "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v3": 123.0,
                "TPU v5": 459.0}  # (v5p reports its device kind as "TPU v5": matched after "TPU v5 lite")


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override, else a table by device kind, else None."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tf in _PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tf * 1e12
    return None


class Throughput:
    """tokens/s over the last interval and MFU = tokens/s · FLOPs/token / (devices · peak)."""

    def __init__(self, flops_per_token: float | None, peak_flops: float | None,
                 n_devices: int | None = None):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops
        self.n_devices = n_devices or jax.device_count()
        self._t = time.perf_counter()
        self._tokens = 0.0
        self._steps = 0

    def add(self, tokens: float) -> None:
        self._tokens += float(tokens)
        self._steps += 1

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        out = {"tokens_per_s": self._tokens / dt, "steps_per_s": self._steps / dt}
        if self.flops_per_token and self.peak:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / (self.n_devices * self.peak)
        self._t, self._tokens, self._steps = now, 0.0, 0
        return out


class MetricsWriter:
    """Appends ``{"step", "time", **metrics}`` lines to ``DIR/metrics.jsonl`` and scalars
    to TensorBoard event files in ``DIR/tb`` (tensorboardX). Process 0 only by default.

    With ``log.wandb`` true (``log_cfg``, else the ``log`` section of ``config``, the run's config
    dict) the same scalars also go to a Weights & Biases run (files under ``DIR/wandb``, its config =
    ``config``, ``step`` = the training step; text as HTML), finished by :meth:`close`. wandb is
    imported here, only then (an optional extra: ``pip install 'rlhf_jax[wandb]'``)."""

    def __init__(self, directory: str | Path, *, tensorboard: bool = True,
                 enabled: bool | None = None, config: Mapping[str, Any] | None = None,
                 log_cfg: LogConfig | None = None):
        self.directory = Path(directory)
        self.enabled = (jax.process_index() == 0) if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if self.enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.directory / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(self.directory / "tb"), flush_secs=10)
            wandb_cfg = log_cfg if log_cfg is not None else _log_section(config)
            if wandb_cfg.wandb:
                self._wandb = _start_wandb(wandb_cfg, self.directory, config)

    @property
    def jsonl_path(self) -> Path:
        return self.directory / "metrics.jsonl"

    def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean},
                                     allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(clean, step=int(step))

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, global_step=int(step))
        if self.enabled and self._wandb is not None:
            import wandb
            self._wandb.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=int(step))

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _log_section(config: Mapping[str, Any] | None) -> LogConfig:
    """The wandb settings in the ``log`` section of a run's config dict (LogConfig defaults elsewhere)."""
    section = (config or {}).get("log") or {}
    names = {f.name for f in dataclasses.fields(LogConfig)}
    return LogConfig(**{k: v for k, v in section.items() if k in names and k.startswith("wandb")})


def _start_wandb(cfg: LogConfig, directory: Path, config: Mapping[str, Any] | None):
    """A W&B run logging into ``directory/wandb`` (``wandb.init(dir=directory)``)."""
    cfg.validate()  # a missing wandb is a ConfigError naming log.wandb
    import wandb  # heavy optional dependency: imported only when asked for
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, mode=cfg.wandb_mode,
                      dir=str(directory), config=dict(config) if config is not None else None,
                      settings=wandb.Settings(console="off", silent=True))


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a metrics JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class ProgressBar:
    """tqdm bar with steps/s and ETA; silent when disabled (other hosts, ``log.progress=false``)."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train"):
        self._bar = None
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                             file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
