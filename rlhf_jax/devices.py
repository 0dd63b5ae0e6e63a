"""The devices a program is built for: the host's (a run) or a named target's (a compiled plan).

Everything that decides a layout or a code path from "the devices" asks this module instead of
``jax.devices()``/``jax.default_backend()``: the mesh (``training.mesh``), the batch and mesh checks
of the trainers, the decode loop's platform-specific choices (``generation.engine``). A run never sets a
target, so these are the host's devices. ``rlhf-jax plan`` compiles a run's programs ahead of time for
devices that are not attached (a TPU topology from ``jax.experimental.topologies``, or fake CPU devices)
inside :func:`targeting`: the same code then validates against the target's device count, builds the
target's mesh, picks the target platform's code paths, and -- with ``abstract=True`` -- builds models
from their configs only (shapes, no weights) and places shapes instead of arrays.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices to build for. ``abstract``: build shapes only (no weights, nothing placed or run)."""
    devices: tuple[Any, ...]
    abstract: bool = True
    name: str = ""

    @property
    def platform(self) -> str:
        return str(self.devices[0].platform)

    @property
    def num_processes(self) -> int:
        return len({int(getattr(d, "process_index", 0)) for d in self.devices})


_TARGET: contextvars.ContextVar[Target | None] = contextvars.ContextVar("rlhf_jax_target", default=None)


@contextlib.contextmanager
def targeting(devices: Sequence[Any], *, abstract: bool = True, name: str = "") -> Iterator[Target]:
    """Within the block, :func:`devices` etc. describe ``devices`` instead of the host's."""
    devs = tuple(devices)
    if not devs:
        raise ValueError("targeting: no devices")
    token = _TARGET.set(Target(devs, abstract, name))
    try:
        yield _TARGET.get()
    finally:
        _TARGET.reset(token)


def target() -> Target | None:
    """The current target (None: the host's devices, a real run)."""
    return _TARGET.get()


def devices() -> list:
    """The devices programs are built for: the target's, else ``jax.devices()``."""
    t = _TARGET.get()
    return list(t.devices) if t is not None else jax.devices()


def device_count() -> int:
    t = _TARGET.get()
    return len(t.devices) if t is not None else jax.device_count()


def process_count() -> int:
    """Processes (hosts) over which the target's devices are spread; ``jax.process_count()`` for a run."""
    t = _TARGET.get()
    return t.num_processes if t is not None else jax.process_count()


def platform() -> str:
    """``cpu``/``gpu``/``tpu`` of the devices programs are built for (``jax.default_backend()`` for a run)."""
    t = _TARGET.get()
    return t.platform if t is not None else jax.default_backend()


def abstract() -> bool:
    """Whether models are built as shapes only and nothing is placed (a plan)."""
    t = _TARGET.get()
    return bool(t is not None and t.abstract)


__all__ = ["Target", "targeting", "target", "devices", "device_count", "process_count", "platform", "abstract"]
