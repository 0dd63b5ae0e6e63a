"""Token selection for one decode step: temperature, top-k, nucleus (top-p), greedy.

Every knob a sweep may vary (``temperature``, ``top_k``, ``top_p``) is a traced
array, so one compiled rollout serves every value. That rules out
``lax.top_k`` (its ``k`` is static); both filters instead find a per-row
*threshold* on the temperature-scaled logits and keep every token at or above it.
The threshold is found by an exact 32-step bisection on the float bit pattern
(``keep_threshold``): a sort of the vocabulary is ~100x slower on CPU.

Sampling draws one uniform per row and inverts the CDF of the (filtered)
distribution (``_inverse_cdf``) rather than adding Gumbel noise to every logit:
generating ``B·V`` random numbers per step costs more than the model step on CPU.

Order of operations (the same as ``transformers``' logits processors)::

    z      = logits / T                                   # [B, V]
    keep_k = rank(z) < k                (k <= 0: keep all)
    p_k    = softmax(z restricted to keep_k)
    keep_p = { i : sum_{j ranked before i} p_k[j] < top_p }   (top_p >= 1: keep all)
    sample ~ softmax(z restricted to keep_k & keep_p)

The first-ranked token is always kept, so the filtered distribution is never
empty. Ties at the threshold are all kept (the kept set is defined by values,
not by positions), which only matters for exactly equal logits.

The log-probability returned for a sampled token is ``log_softmax(z)[token]``,
the *unfiltered* temperature-scaled distribution: it is what a full forward pass
recomputes as ``logp``/``old_logp``/``ref_logp`` (docs/MATH.md §0.3), so the PPO
ratio is exactly 1 before the first update. (Top-k/top-p renormalisation would
make the sampler's log-probs disagree with every later recomputation.)
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def scale_logits(logits: Array, temperature: Any) -> Array:
    """``logits / temperature`` in float32. ``logits [..., V]``, ``temperature`` scalar or ``[...]``."""
    t = jnp.asarray(temperature, jnp.float32)
    if t.ndim > 0:
        t = t[..., None]
    return logits.astype(jnp.float32) / t


def _sortable_key(x: Array) -> Array:
    """float32 -> uint32 with the same order: ``a < b`` iff ``key(a) < key(b)``, ``a == b`` iff equal keys."""
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 == +0.0
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    i = jnp.where(i >= 0, i, i ^ jnp.int32(0x7FFFFFFF))  # negative floats: reverse the magnitude order
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _max_key_where(pred, batch: int) -> Array:
    """Per row, the largest uint32 ``t`` with ``pred(t)`` true, for ``pred`` monotone (true, then false).

    ``pred: uint32 [B] -> bool [B]`` must hold at ``t = 0``. Exact bisection: 32 halvings of 2^32.
    """

    def body(_, lo_hi):
        lo, hi = lo_hi
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)  # ceil((lo + hi) / 2) without overflow
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - jnp.uint32(1) + (gap == 0).astype(jnp.uint32))

    lo = jnp.zeros((batch,), jnp.uint32)
    hi = jnp.full((batch,), 0xFFFFFFFF, jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def keep_threshold(scaled_logits: Array, top_k: Any = 0, top_p: Any = 1.0) -> Array:
    """Per-row key threshold ``[B]`` uint32: token i is kept iff ``_sortable_key(z_i) >= threshold``.

    top-k: the threshold is the key of the k-th largest logit (bisection on
    ``count(key >= t) >= k``). top-p: the largest ``t`` whose kept mass
    ``sum_{key_i >= max(t, t_k)} p_i`` still reaches ``top_p · sum_{key_i >= t_k} p_i``
    (``p = softmax(z)``; ``t_k`` the top-k threshold). That set is exactly the shortest
    prefix, in descending order, whose mass reaches ``top_p`` — the nucleus — and it always
    contains the most likely token. Each filter costs 32 masked reductions over ``[B, V]``,
    which on CPU is far cheaper than a sort of the vocabulary.
    """
    batch, vocab = scaled_logits.shape
    key = _sortable_key(scaled_logits)
    k = jnp.asarray(top_k, jnp.int32)
    p = jnp.asarray(top_p, jnp.float32)
    k_on = (k > 0) & (k < vocab)
    t_k = _max_key_where(lambda t: jnp.sum(key >= t[:, None], axis=-1) >= k, batch)
    t_k = jnp.where(k_on, t_k, jnp.uint32(0))
    probs = jnp.exp(scaled_logits - jnp.max(scaled_logits, axis=-1, keepdims=True))
    probs = jnp.where(key >= t_k[:, None], probs, 0.0)
    target = p * jnp.sum(probs, axis=-1)
    t_p = _max_key_where(lambda t: jnp.sum(jnp.where(key >= t[:, None], probs, 0.0), axis=-1) >= target, batch)
    t_p = jnp.where(p < 1.0, t_p, jnp.uint32(0))
    return jnp.maximum(t_k, t_p)


def _filters_active(top_k: Any, top_p: Any, vocab: int) -> Array:
    k = jnp.asarray(top_k, jnp.int32)
    return ((k > 0) & (k < vocab)) | (jnp.asarray(top_p, jnp.float32) < 1.0)


def filter_logits(scaled_logits: Array, top_k: Any = 0, top_p: Any = 1.0) -> Array:
    """Sets to ``-inf`` every logit outside the top-k set and then outside the nucleus.

    Args:
      scaled_logits: ``[B, V]`` temperature-scaled logits (float32).
      top_k: int scalar (traced or not); ``k <= 0`` or ``k >= V`` keeps everything.
      top_p: float scalar (traced or not) in ``(0, 1]``; ``>= 1`` keeps everything.
        The nucleus is the shortest prefix (by descending probability, after the
        top-k filter and its renormalisation) whose mass reaches ``top_p``.

    Returns:
      ``[B, V]`` logits with the rejected entries at ``-inf``; kept entries unchanged.

    The thresholds are computed only when a filter is active (``lax.cond`` on the
    traced values), so plain temperature sampling pays nothing for them.
    """
    if scaled_logits.ndim != 2:
        raise ValueError(f"filter_logits expects logits [B, V], got shape {scaled_logits.shape}")
    z = scaled_logits.astype(jnp.float32)

    def _filter(z):
        t = keep_threshold(z, top_k, top_p)
        return jnp.where(_sortable_key(z) >= t[:, None], z, -jnp.inf)

    return jax.lax.cond(_filters_active(top_k, top_p, z.shape[-1]), _filter, lambda z: z, z)


INVERSE_CDF_BLOCK = 256


def _inverse_cdf(weights: Array, u: Array) -> Array:
    """Index ``i`` per row with ``W[i-1] <= u·W[V-1] < W[i]`` (``W`` = cumsum of ``weights [B, V] >= 0``).

    I.e. a draw from ``weights / sum(weights)`` given ``u ~ U[0, 1)`` — one uniform per row
    instead of Gumbel noise over the whole vocabulary. Two levels (blocks of 256, then within
    the chosen block) so the scan is short. Zero-weight entries are never returned.
    """
    batch, vocab = weights.shape
    blk = INVERSE_CDF_BLOCK
    nb = -(-vocab // blk)
    w = jnp.pad(weights, ((0, 0), (0, nb * blk - vocab))).reshape(batch, nb, blk)
    block_mass = jnp.sum(w, axis=-1)  # [B, nb]
    cdf = jnp.cumsum(block_mass, axis=-1)
    target = u * cdf[:, -1]
    last_block = jnp.max(jnp.where(block_mass > 0, jnp.arange(nb), 0), axis=-1)
    b = jnp.minimum(jnp.sum(cdf <= target[:, None], axis=-1), last_block)  # rounding can overshoot
    w_b = jnp.take_along_axis(w, b[:, None, None], axis=1)[:, 0]  # [B, blk]
    before = jnp.take_along_axis(cdf - block_mass, b[:, None], axis=-1)[:, 0]
    inner = jnp.cumsum(w_b, axis=-1)
    last_inner = jnp.max(jnp.where(w_b > 0, jnp.arange(blk), 0), axis=-1)
    j = jnp.minimum(jnp.sum(inner <= (target - before)[:, None], axis=-1), last_inner)
    return (b * blk + j).astype(jnp.int32)


def sample_tokens(
    rng: Array,
    logits: Array,
    *,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    greedy: bool = False,
) -> tuple[Array, Array]:
    """Chooses one token per row and returns ``(tokens [B] int32, logprobs [B] float32)``.

    ``logprobs[b] = log_softmax(logits[b] / T)[tokens[b]]`` — temperature-scaled,
    never renormalised by top-k/top-p (see the module docstring).

    ``greedy`` (static) takes ``argmax(logits)``; the filters are then irrelevant
    but the log-prob still uses ``T`` so it matches a recomputation at ``T``.
    """
    z = scale_logits(logits, temperature)
    z_max = jnp.max(z, axis=-1, keepdims=True)
    weights = jnp.exp(z - z_max)  # unnormalised softmax(z), shared by sampling and the log-prob
    log_norm = jnp.log(jnp.sum(weights, axis=-1))
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        def _filtered(w):
            t = keep_threshold(z, top_k, top_p)
            return jnp.where(_sortable_key(z) >= t[:, None], w, 0.0)

        w = jax.lax.cond(_filters_active(top_k, top_p, z.shape[-1]), _filtered, lambda w: w, weights)
        u = jax.random.uniform(rng, (z.shape[0],), jnp.float32)
        tokens = _inverse_cdf(w, u)
    # (z - max) - log(sum(exp(z - max))): the same arithmetic as jax.nn.log_softmax
    logprobs = (jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0] - z_max[:, 0]) - log_norm
    return tokens, logprobs
