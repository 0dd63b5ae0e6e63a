"""Multi-host start-up: ``jax.distributed.initialize`` from CLI flags or the environment.

Flags win over environment variables ``RLHF_JAX_COORDINATOR`` (``host:port``),
``RLHF_JAX_NUM_PROCESSES``, ``RLHF_JAX_PROCESS_ID``, ``RLHF_JAX_LOCAL_DEVICE_IDS``
(comma-separated). With none of them set on a cluster JAX knows (TPU pods,
SLURM, ...), ``auto=True`` lets ``jax.distributed.initialize()`` detect
everything itself. Call it before anything touches a device.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import jax

_ENV = {"coordinator": "RLHF_JAX_COORDINATOR", "num_processes": "RLHF_JAX_NUM_PROCESSES",
        "process_id": "RLHF_JAX_PROCESS_ID", "local_device_ids": "RLHF_JAX_LOCAL_DEVICE_IDS"}


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-host")
    g.add_argument("--coordinator", default=None,
                   help="host:port of process 0 (env RLHF_JAX_COORDINATOR)")
    g.add_argument("--num-processes", type=int, default=None,
                   help="number of processes (env RLHF_JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process's index (env RLHF_JAX_PROCESS_ID)")
    g.add_argument("--local-device-ids", default=None,
                   help="comma-separated local device ids (env RLHF_JAX_LOCAL_DEVICE_IDS)")
    g.add_argument("--distributed-auto", action="store_true",
                   help="call jax.distributed.initialize() with cluster auto-detection")


def _parse_ids(text) -> list[int] | None:
    if text is None or text == "":
        return None
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--local-device-ids: expected comma-separated integers, got {text!r}") from None


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None,
                     local_device_ids: Sequence[int] | str | None = None, *,
                     auto: bool = False) -> bool:
    """Initialises JAX's multi-process runtime when asked to; returns whether it did.

    Nothing set (flags or env) and ``auto`` False: single process, returns False.
    On CPU, cross-process collectives use gloo.
    """
    coordinator = coordinator or os.environ.get(_ENV["coordinator"]) or None
    if num_processes is None and os.environ.get(_ENV["num_processes"]):
        num_processes = int(os.environ[_ENV["num_processes"]])
    if process_id is None and os.environ.get(_ENV["process_id"]):
        process_id = int(os.environ[_ENV["process_id"]])
    ids = _parse_ids(local_device_ids if local_device_ids is not None
                     else os.environ.get(_ENV["local_device_ids"]))
    if coordinator is None and num_processes is None and process_id is None and not auto:
        return False
    if not auto:
        missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-host: {', '.join(missing)} not set (flags --coordinator/"
                             "--num-processes/--process-id or RLHF_JAX_* env)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"multi-host: process_id={process_id} not in [0, {num_processes})")
    # Only affects the CPU backend (the fake-device and laptop case); accelerator
    # backends bring their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=ids)
    return True


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Waits until every process reaches ``name`` (no-op single-process). Used after a long compile: hosts
    finish compiling at different times, and CPU (gloo) collectives give a late peer only 30 s to join
    their first call. Waits through the coordination service (no device collective); older jax without
    its client falls back to ``multihost_utils.sync_global_devices``."""
    if jax.process_count() == 1:
        return
    client = getattr(getattr(getattr(jax, "_src", None), "distributed", None), "global_state", None)
    client = getattr(client, "client", None)
    if client is None or not hasattr(client, "wait_at_barrier"):
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, int(timeout_s * 1000))


def is_main_process() -> bool:
    """Process 0 writes logs and run records (Orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0
