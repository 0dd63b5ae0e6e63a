"""Run records: everything needed to trace a result back to its code, config and machine.

    from rlhf_jax.provenance import write_run_record
    write_run_record("runs/ppo", cfg)          # -> runs/ppo/run.json

``run.json`` holds::

    {"config": to_dict(cfg),                      # the resolved config (after overrides)
     "config_type": "PPOTrainConfig",
     "git": {"commit": "<sha>"|None, "dirty": bool|None, "root": path|None},
     "versions": {"python": ..., "jax": ..., "flax": ..., "optax": ..., "orbax-checkpoint": ...,
                  "transformers": ..., ...},      # None for a package that is not installed
     "devices": {"platform": "cpu", "count": 8, "local_count": 8, "kinds": ["cpu"],
                 "process_count": 1, "process_index": 0, "list": ["TFRT_CPU_0", ...]},
     "command": ["rlhf-jax", "ppo", ...],         # sys.argv as run
     "cwd": ..., "hostname": ..., "time": <unix seconds>, "time_utc": "2026-...Z",
     "extra": {...}}                              # caller's additions (sweep point, results, ...)

The git lookup runs from the package's own directory (so it finds the checkout the code came
from, not the caller's working directory) and never fails: outside a git checkout, or without a
``git`` binary, commit and dirty flag are ``None``. Only process 0 writes in a multi-host run.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax

from rlhf_jax.config import to_dict

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "transformers",
            "tokenizers", "safetensors", "tensorflow-datasets", "torch", "rlhf_jax")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """``{distribution name: version}`` from installed metadata (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_info(path: str | Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty", "root"}`` of the git checkout holding ``path`` (default: this package).

    ``dirty`` is True when tracked files differ from the commit (untracked files are ignored).
    All three are None outside a git checkout.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    if not cwd.is_dir():
        cwd = cwd.parent
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"commit": None, "dirty": None, "root": None}
    root = _git(["rev-parse", "--show-toplevel"], cwd)
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip()),
            "root": root.strip() if root else None}


def device_info() -> dict[str, Any]:
    """The device set as JAX sees it (initialises the backend)."""
    devices = jax.devices()
    return {"platform": devices[0].platform if devices else None, "count": len(devices),
            "local_count": jax.local_device_count(), "kinds": sorted({d.device_kind for d in devices}),
            "process_count": jax.process_count(), "process_index": jax.process_index(),
            "list": [str(d) for d in devices]}


def _config_dict(cfg: Any) -> Any:
    if isinstance(cfg, Mapping):
        return to_dict(dict(cfg))
    return to_dict(cfg)


def run_record(cfg: Any, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run record as a dict (see the module docstring); nothing is written."""
    now = time.time()
    return {
        "config": _config_dict(cfg),
        "config_type": type(cfg).__name__,
        "git": git_info(),
        "versions": package_versions(),
        "devices": device_info(),
        "command": list(sys.argv),
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "time": now,
        "time_utc": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "extra": dict(extra or {}),
    }


def write_run_record(out_dir: str | Path, cfg: Any, *, extra: Mapping[str, Any] | None = None,
                     filename: str = "run.json") -> Path | None:
    """Writes ``out_dir/filename`` (default ``run.json``) and returns its path.

    ``cfg``: a config dataclass (or a mapping). ``extra``: JSON-serialisable additions. In a
    multi-host run only process 0 writes (others return None).
    """
    if jax.process_index() != 0:
        return None
    record = run_record(cfg, extra=extra)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_run_record(path: str | Path) -> dict[str, Any]:
    """Reads a ``run.json`` (file or the run directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "run.json"
    return json.loads(p.read_text())
