"""The run directory: who may run in it, and whether a resumed run is the same run.

* :func:`claim` decides BEFORE anything is written whether a run may start in ``out_dir``: a file
  there, a directory holding another run's checkpoints without ``resume``, or a resume whose config
  changes the computation is refused, and no existing file is touched.
* :class:`RunLock` holds the directory for one process at a time (``out_dir/.lock``, an ``flock``
  that the kernel releases when the process dies, so a killed run never leaves it stuck); a second
  process is refused with the holder's pid, host, start time and command.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Iterable

from rlhf_jax.config import ConfigError
from rlhf_jax.errors import UserError

# Keys a resumed run may change (dotted; a trailing ".*" covers a section): they change how long the
# run goes, where and how often it writes, and the device layout, not what any step computes.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "resume", "out_dir", "steps", "iterations", "export", "log.*", "checkpoint.*", "mesh.*",
    "eval_every", "eval_batches", "sample_every", "num_samples",
)


class RunDirInUse(UserError):
    """Another live process holds the run directory."""


def saved_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the finished checkpoints under ``ckpt_dir`` (Orbax names them by step), without
    creating anything; unfinished saves (Orbax's temporary directories) are not steps."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of a nested dict (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _allowed(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or (a.endswith(".*") and key.startswith(a[:-1])) for a in allowed)


def config_changes(saved: dict, current: dict, allowed: Iterable[str] = RESUMABLE_CHANGES) -> list[str]:
    """``"key: saved -> current"`` for every key that differs and changes the computation."""
    old, new = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>") and not _allowed(key, allowed):
            out.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return out


def claim(out_dir: Path, config: dict, resume: bool) -> list[int]:
    """Whether a run may start (or resume) in ``out_dir``; raises a ConfigError naming the reason and
    touches nothing. Returns the saved checkpoint steps."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file; expected a run directory")
    steps = saved_steps(out_dir / "checkpoints")
    if steps and not resume:
        raise ConfigError(f"--out {str(out_dir)!r} already holds checkpoints (latest step {steps[-1]}); "
                          "pass --resume (resume=True) to continue it or choose another --out")
    saved_cfg = out_dir / "config.json"
    if steps and saved_cfg.is_file():
        try:
            saved = json.loads(saved_cfg.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{saved_cfg}: the saved run config is not valid JSON ({e}); cannot check that "
                              "--resume continues the same run") from None
        changes = config_changes(saved, config)
        if changes:
            raise ConfigError(f"--resume: the config differs from the run saved in {str(out_dir)!r} in keys that "
                              f"change the computation: {'; '.join(changes)}. Resume with the saved config "
                              f"({saved_cfg}) or start a new run in another --out (a resume may change only "
                              f"{', '.join(RESUMABLE_CHANGES)})")
    return steps


class RunLock:
    """``with RunLock(out_dir) as lock:`` holds ``out_dir`` for this process (process 0 of a multi-host
    run); a second process is refused with a :class:`RunDirInUse` naming the holder.

    The lock is an ``flock`` on ``out_dir/.lock``, released by the kernel when the process exits or is
    killed, so it never stays stuck. Taking it writes nothing; :meth:`mark` (called once the run has
    decided to go ahead) writes the holder's pid, host, start time and command into the file.
    """

    def __init__(self, out_dir: Path, *, enabled: bool = True):
        self.path = Path(out_dir) / ".lock"
        self.enabled = enabled
        self._fh = None

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise ConfigError(f"--out {str(self.path.parent)!r} is a file; expected a run directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirInUse(f"--out {str(self.path.parent)!r} is in use by {holder}; wait for that run to "
                              "finish (or stop it) or choose another --out") from None
        self._fh = fh
        return self

    def mark(self) -> None:
        """Names this process in the lock file."""
        if self._fh is None:
            return
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"process {os.getpid()} on {socket.gethostname()} (started {started}: "
                       f"{shlex.join(sys.argv)})\n")
        self._fh.flush()

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
