"""Generic step machinery: gradient accumulation over (sum, count) and the update.

A *sum function* ``f(params, batch, rng) -> (loss_sum, sums)`` returns the loss
SUMMED over its normalising units (tokens, sequences, pairs, prompts) and a dict
``sums[name] = (sum, count)`` of metric numerators and denominators, with
``sums["loss"] = (loss_sum, count)``. Everything downstream divides once:

    grad  = Σ_micro ∇ loss_sum / Σ_micro count          (then over devices: pmean/psum)
    metric[name] = Σ sum_name / Σ count_name

so M micro-batches of B/M rows, or D devices of B/D rows, give exactly the
gradient of the loss on the whole B-row batch (token-weighted, not an average of
per-micro-batch means). Model-specific sum functions live in ``sft.py`` and
``reward.py``; this module knows nothing about models.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.training.state import TrainState

SumFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def split_micro_batches(batch: dict, micro_batches: int) -> dict:
    """``[B, ...] -> [M, B/M, ...]`` with micro-batch ``i`` = rows ``i, i+M, i+2M, ...``.

    Strided rather than contiguous rows, so that when the batch dimension is
    sharded over devices every micro-batch is spread over all of them.
    """
    def split(x):
        b = x.shape[0]
        if b % micro_batches:
            raise ValueError(f"batch of {b} rows does not split into {micro_batches} micro-batches")
        x = x.reshape((b // micro_batches, micro_batches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree_util.tree_map(split, batch)


def accumulate_gradients(sum_fn: SumFn, params, batch: dict, rng: jax.Array,
                         micro_batches: int = 1) -> tuple[Any, dict]:
    """Σ over micro-batches of (∇ loss_sum, sums). Nothing is divided here."""
    grad_fn = jax.grad(lambda p, b, r: sum_fn(p, b, r), has_aux=True)

    def one(p, b, r):
        grads, sums = grad_fn(p, b, r)
        return grads, sums

    if micro_batches == 1:
        return one(params, batch, rng)
    micro = split_micro_batches(batch, micro_batches)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    _, sums_shape = jax.eval_shape(one, params, first, rng)
    zeros = (jax.tree_util.tree_map(jnp.zeros_like, params),
             jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))

    def body(carry, xs):
        i, b = xs
        g, s = one(params, b, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, carry, (g, s)), None

    (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(micro_batches), micro))
    return grads, sums


def reduce_sums(grads, sums, *, axis_name: str | None = None):
    """Divides once: grads by the total loss count, each metric by its own count.

    With ``axis_name`` (pmap/shard_map), sums and counts are first added over the
    devices with ``lax.psum`` (the ratio of the two ``lax.pmean``s is the same
    number), so the result equals the single-device one even when devices hold
    different numbers of tokens.
    """
    if axis_name is not None:
        grads, sums = jax.lax.psum((grads, sums), axis_name)
    count = sums["loss"][1]
    denom = jnp.maximum(count, jnp.finfo(jnp.float32).tiny)
    grads = jax.tree_util.tree_map(lambda g: g / denom.astype(g.dtype), grads)
    metrics = {k: s / jnp.maximum(c, jnp.finfo(jnp.float32).tiny) for k, (s, c) in sums.items()}
    metrics["count"] = count
    return grads, metrics


def update_step(state: TrainState, batch: dict, sum_fn: SumFn, *, micro_batches: int = 1,
                axis_name: str | None = None) -> tuple[TrainState, dict]:
    """Accumulate, reduce, clip-and-update (through ``state.tx``). Pure.

    Metrics: every ``sums`` entry as a ratio, ``count`` (total loss units in the
    global batch), and ``grad_norm`` = ‖∇L‖₂ before clipping.
    """
    rng = state.step_rng()
    grads, sums = accumulate_gradients(sum_fn, state.params, batch, rng, micro_batches)
    grads, metrics = reduce_sums(grads, sums, axis_name=axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads), metrics


def eval_sums(sum_fn: SumFn, params, batch: dict, rng: jax.Array) -> dict:
    """The ``sums`` of one evaluation batch (no gradient); the host adds them up."""
    _, sums = sum_fn(params, batch, rng)
    return sums


def finalize_sums(total: dict) -> dict:
    """``{name: (sum, count)}`` -> ``{name: sum / count}`` on the host."""
    out = {}
    for k, (s, c) in total.items():
        out[k] = float(s) / max(float(c), 1e-30)
    out["count"] = float(total["loss"][1])
    return out


def add_sums(a: dict | None, b: dict) -> dict:
    """Adds two ``sums`` dicts on the host (float64)."""
    b = {k: (float(s), float(c)) for k, (s, c) in jax.device_get(b).items()}
    if a is None:
        return b
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in b}
