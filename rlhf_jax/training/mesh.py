"""The one place that knows about device meshes and shardings.

Mesh axes: ``runs`` (the runs of a vmapped sweep: every array with a leading runs axis is split
along it, ``P("runs", ...)``; size 1 for a trainer), ``data`` (pure data parallelism: params replicated along it) and
``fsdp`` (params and optimizer state sharded along it, batch too). A batch's
leading dimension is split over both axes, ``P(("data", "fsdp"))``.

Axis types are passed explicitly as ``AxisType.Auto``. With Explicit axes the
sharding becomes part of every array's type and ops whose output sharding is
ambiguous (reshapes of sharded dims, einsums contracting a sharded dim, the
micro-batch split, ``lax.scan`` carries) must be annotated by the caller. The
models, losses and generation code are written without sharding annotations, so
we let the compiler propagate shardings (Auto) from the ``NamedSharding`` of the
jitted inputs and outputs. The same code then runs on 1 CPU, 8 GPUs or a pod
slice; only the mesh shape changes.

``pmap`` data-parallel mode (``pmap_step``) reuses the same pure step with an
``axis_name``: params replicated per device, batch split ``[D, B/D, ...]``.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax import devices as devices_lib

RUNS = "runs"
DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)
MESH_AXES = (RUNS, DATA, FSDP)


def make_mesh(runs: int = 1, data: int = -1, fsdp: int = 1, *, devices=None) -> Mesh:
    """A ``(runs, data, fsdp)`` mesh with Auto axis types over ``devices`` (default: all the devices
    programs are built for, ``rlhf_jax.devices.devices()``: the host's, or a plan's target).

    ``runs`` splits the runs of a vmapped sweep (1 for a trainer: the axis then has size 1 and every
    spec over ``data``/``fsdp`` means what it means on a ``(data, fsdp)`` mesh). ``-1`` for data or
    fsdp means "all remaining devices". ``runs * data * fsdp`` must equal the number of devices.
    """
    devices = list(devices_lib.devices() if devices is None else devices)
    n = len(devices)
    if runs < 1 or n % runs:
        raise ValueError(f"mesh.runs={runs} does not divide the {n} devices")
    m = n // runs
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data/fsdp may be -1")
    if data == -1:
        if fsdp <= 0 or m % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {m} devices")
        data = m // fsdp
    if fsdp == -1:
        if data <= 0 or m % data:
            raise ValueError(f"mesh.data={data} does not divide the {m} devices")
        fsdp = m // data
    if runs * data * fsdp != n:
        raise ValueError(f"mesh runs={runs} x data={data} x fsdp={fsdp} = {runs * data * fsdp} != {n} devices")
    auto = (AxisType.Auto,) * 3
    if n == len(jax.devices()) and devices == list(jax.devices()):
        return jax.make_mesh((runs, data, fsdp), MESH_AXES, axis_types=auto)
    if devices[0].platform == "tpu":  # the physical torus order (a plan's topology devices, a sub-slice)
        try:
            grid = mesh_utils.create_device_mesh((runs, data, fsdp), devices=devices)
        except (NotImplementedError, ValueError):  # e.g. fsdp=4 on an 8x8 torus: split a physical axis
            grid = mesh_utils.create_device_mesh((runs, data, fsdp), devices=devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(runs, data, fsdp), MESH_AXES, axis_types=auto)


def batch_size_multiple(mesh: Mesh) -> int:
    """A global batch size must be a multiple of this (= data × fsdp)."""
    return int(mesh.shape[DATA] * mesh.shape[FSDP])


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, *, min_size: int = 0) -> P:
    """Shard the largest dimension divisible by ``fsdp_size`` over ``fsdp``; else replicate."""
    if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = FSDP
            return P(*spec)
    return P()


def param_sharding(mesh: Mesh, params, *, min_size: int = 0):
    """NamedSharding per leaf of ``params`` (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape[FSDP]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp_size, min_size=min_size)),
        params)


def runs_spec(shape: tuple[int, ...], fsdp_size: int, *, min_size: int = 0) -> P:
    """A leaf with a leading runs axis ``[R, ...]``: runs over ``runs``, the rest of one run's leaf by
    the fsdp rule, ``P("runs", *fsdp_spec(shape[1:]))``."""
    return P(RUNS, *fsdp_spec(tuple(shape[1:]), fsdp_size, min_size=min_size))


def runs_sharding(mesh: Mesh, tree, *, min_size: int = 0):
    """NamedSharding per leaf of a pytree whose leaves carry a leading runs axis (stacked params,
    hyper-parameters, keys): :func:`runs_spec`."""
    fsdp_size = mesh.shape[FSDP]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, runs_spec(tuple(np.shape(x)), fsdp_size, min_size=min_size)), tree)


def by_runs(mesh: Mesh) -> NamedSharding:
    """Split along the leading runs axis only (hyper-parameters ``[R]``, keys ``[R, 2]``)."""
    return NamedSharding(mesh, P(RUNS))


def runs_batch_sharding(mesh: Mesh, tree, *, batch_axis: int = 1):
    """Stacked per-run batches ``[R, ..., B, ...]``: runs over ``runs`` and dimension ``batch_axis``
    over ``("data", "fsdp")`` (replicated there when ``B`` does not split)."""
    def spec(x):
        shape = np.shape(x)
        if len(shape) > batch_axis and shape[batch_axis] % batch_size_multiple(mesh) == 0:
            return NamedSharding(mesh, P(RUNS, *([None] * (batch_axis - 1)), BATCH_AXES))
        return by_runs(mesh)
    return jax.tree_util.tree_map(spec, tree)


def gather_to_host(tree):
    """A pytree of (possibly multi-host sharded) arrays as numpy on every process: ``device_get``
    single-process, ``process_allgather`` across processes."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_sharding(mesh: Mesh, state, *, min_size: int = 0):
    """Shardings of a ``TrainState``: params and optimizer state by the fsdp rule
    (Adam moments have the params' shapes so they shard alike; scalar counters and
    injected hyper-parameters replicate), ``step`` and ``rng`` replicated."""
    rep = replicated(mesh)
    return state.replace(
        step=rep, rng=rep,
        params=param_sharding(mesh, state.params, min_size=min_size),
        opt_state=param_sharding(mesh, state.opt_state, min_size=min_size))


def shard_state(mesh: Mesh, state, *, min_size: int = 0):
    """``state`` placed on ``mesh``.

    Single-process: a sharded ``device_put``. Multi-process: every process holds
    the same host values (same seed), and each builds its addressable shards from
    them (``make_array_from_callback``), so no cross-host transfer happens.
    """
    return place(state, state_sharding(mesh, state, min_size=min_size))


def place(tree, shardings):
    """``tree`` (the same host values on every process) placed with ``shardings``: a sharded
    ``device_put`` single-process; multi-process, each process builds its addressable shards from its
    copy (``make_array_from_callback``), so no cross-host transfer happens. In a plan
    (``rlhf_jax.devices.abstract()``) nothing is placed: the leaves become ``ShapeDtypeStruct``s with
    their shardings, the inputs a program is compiled for."""
    if devices_lib.abstract():
        return abstract_like(tree, shardings)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, s):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
    return jax.tree_util.tree_map(put, tree, shardings)


def abstract_like(tree, shardings):
    """``ShapeDtypeStruct`` per leaf of ``tree`` (arrays, tracers or shapes) with ``shardings`` (a tree of
    the same structure, or one sharding for every leaf)."""
    def sds(x, s):
        dtype = x.dtype if hasattr(x, "dtype") else jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=s)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: sds(x, shardings), tree)
    return jax.tree_util.tree_map(sds, tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over ``("data", "fsdp")``; other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(mesh: Mesh, batch: dict) -> dict:
    """Host-local numpy batch -> global arrays sharded by ``batch_sharding``.

    Each process passes ITS rows (``B_global / process_count`` of them, the
    ones its data shard produced); the global array is their concatenation in
    process order. Single-process this is a plain sharded ``device_put``.
    """
    sharding = batch_sharding(mesh)
    if devices_lib.abstract():  # a plan: the global batch's shape (the planning host holds all of it)
        return abstract_like(batch, sharding)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def jit_step(step_fn: Callable, mesh: Mesh | None, state, *, donate: bool = True,
             **static) -> Callable:
    """``jax.jit(partial(step_fn, **static))`` with the state donated and, on a mesh,
    its output sharding pinned to its input sharding (no drift between steps)."""
    fn = functools.partial(step_fn, **static)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,) if donate else ())
    s_shard = state_sharding(mesh, state)
    return jax.jit(fn, donate_argnums=(0,) if donate else (),
                   out_shardings=(s_shard, replicated(mesh)))


# ---------------------------------------------------------------- pmap mode

def pmap_step(step_fn: Callable, *, axis_name: str = DATA, donate: bool = True, **static) -> Callable:
    """``jax.pmap`` of ``step_fn(state, batch, cfg=..., axis_name=axis_name)``.

    The state is replicated (``replicate``), the batch split (``split_for_pmap``);
    gradients and metric sums are combined with collectives over ``axis_name``
    inside the same pure step the jit path uses.
    """
    fn = functools.partial(step_fn, axis_name=axis_name, **static)
    return jax.pmap(fn, axis_name=axis_name, donate_argnums=(0,) if donate else ())


def replicate(tree, devices=None):
    """A host copy of every leaf per local device (leading axis = device); pmap places them."""
    n = jax.local_device_count() if devices is None else len(devices)
    return jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(jax.device_get(x)), (n,) + np.shape(x)).copy(), tree)


def unreplicate(tree):
    """The first device's copy of a replicated pytree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def split_for_pmap(batch: dict, n_devices: int | None = None) -> dict:
    """``[B, ...] -> [D, B/D, ...]`` (contiguous rows per device)."""
    d = jax.local_device_count() if n_devices is None else n_devices

    def split(x):
        x = np.asarray(x)
        if x.shape[0] % d:
            raise ValueError(f"batch of {x.shape[0]} rows does not split over {d} devices")
        return x.reshape((d, x.shape[0] // d) + x.shape[1:])
    return jax.tree_util.tree_map(split, batch)


def host_value(x) -> np.ndarray:
    """A fully replicated or addressable array as numpy (for metrics/logs)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


__all__ = ["RUNS", "DATA", "FSDP", "BATCH_AXES", "MESH_AXES", "runs_spec", "runs_sharding", "runs_batch_sharding", "by_runs", "gather_to_host", "make_mesh", "batch_size_multiple", "fsdp_spec",
           "param_sharding", "state_sharding", "shard_state", "place", "abstract_like", "batch_sharding", "put_batch",
           "replicated", "jit_step", "pmap_step", "replicate", "unreplicate", "split_for_pmap",
           "host_value"]
