"""Checkpoints: an Orbax ``CheckpointManager`` holding everything an exact resume needs.

Each saved step ``DIR/<step>/`` holds the items

- ``state``:  the ``TrainState`` leaves (step, params, optimizer state, rng), sharded
  arrays written by every host in parallel (Orbax coordinates multi-host saves);
- ``data``:   the data iterator position (a small JSON dict from ``iterator.state()``);
- ``config``: the resolved run config (JSON);
- ``extra``:  any further pytree (the RL KL controller, the reward-model shift, ...).

Saves are asynchronous (training continues while the arrays are written) and
atomic (Orbax writes to a temporary directory and renames it once complete, so a
run killed mid-save leaves the previous step as the latest valid one). Only the
last ``keep`` steps are kept. A resume takes the newest checkpoint that restores
(:meth:`CheckpointManager.restore_newest_good`): a corrupt one is reported and skipped.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from rlhf_jax.config import ConfigError
from rlhf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100          # save every N steps (and always at the end); 0 = only at the end
    keep: int = 3             # keep the last K
    async_save: bool = True   # write checkpoints in the background while training continues

    def validate(self, prefix: str = "checkpoint.") -> None:
        if self.every < 0:
            raise ConfigError(f"config key {prefix + 'every'!r}: must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"config key {prefix + 'keep'!r}: must be >= 1, got {self.keep}")


class CheckpointUnusable(UserError):
    """No checkpoint of a run could be restored (each failure is named)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_state: dict | None
    config: dict | None
    extra: Any


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    def conv(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree_util.tree_map(conv, tree)


class CheckpointManager:
    """Save/restore a ``TrainState`` (+ data position, config, extra) every N steps.

    ``save`` is a no-op on steps that are not multiples of ``every`` unless
    ``force=True`` (the final save). Call ``wait()`` (or ``close()``) before
    reading a checkpoint that was just written.
    """

    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
        cfg.validate()
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            save_interval_steps=max(cfg.every, 1),
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def should_save(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    # ------------------------------------------------------------ save / restore
    def save(self, step: int, state, *, data_state: dict | None = None, config: dict | None = None,
             extra: Any = None, force: bool = False) -> bool:
        """Starts an (async) save of ``state`` at ``step``; returns whether one was started."""
        if not force and not self.should_save(step):
            return False
        if step in self.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(_arrays(state))}
        items["data"] = ocp.args.JsonSave(dict(data_state or {}))
        items["config"] = ocp.args.JsonSave(dict(config or {}))
        if extra is not None:
            items["extra"] = ocp.args.StandardSave(extra)
        return bool(self._mgr.save(step, args=ocp.args.Composite(**items), force=True))

    def restore(self, state_template, *, step: int | None = None, extra_template: Any = None) -> Restored:
        """Restores into the structure and shardings of ``state_template``.

        ``state_template`` is a ``TrainState`` built exactly as for a fresh run
        (same model, optimiser, mesh); its arrays only provide shapes, dtypes and
        shardings. Raises ``FileNotFoundError`` when there is nothing to restore.
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} under {self.directory}; "
                                    f"have {self.all_steps()}")
        items = {"state": ocp.args.StandardRestore(abstract_like(_arrays(state_template))),
                 "data": ocp.args.JsonRestore(), "config": ocp.args.JsonRestore()}
        if extra_template is not None:
            items["extra"] = ocp.args.StandardRestore(abstract_like(extra_template))
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        tree = out["state"]
        state = state_template.with_arrays(tree) if hasattr(state_template, "with_arrays") else tree
        return Restored(step=int(step), state=state, data_state=out["data"] or None,
                        config=out["config"] or None,
                        extra=out["extra"] if extra_template is not None else None)

    def restore_newest_good(self, state_template, *, report=None) -> Restored:
        """:meth:`restore` of the newest checkpoint that restores; each one that does not (truncated,
        half-written, corrupt) is reported through ``report(message)`` and skipped. A
        :class:`CheckpointUnusable` lists every failure when none restores."""
        failures = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return self.restore(state_template, step=step)
            except Exception as e:  # noqa: BLE001 -- reported, and raised below when no step restores
                message = f"step {step}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                failures.append(message)
                if report is not None:
                    report(f"checkpoint {self.directory / str(step)} could not be restored ({message}); "
                           "trying the previous one")
        raise CheckpointUnusable(f"no checkpoint under {self.directory} could be restored: "
                                 + ("; ".join(failures) or "there are none"))

    def wait(self) -> None:
        """Blocks until pending async saves are durable."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _arrays(state):
    return state.arrays() if hasattr(state, "arrays") else state
