"""Token selection for one decode step: temperature, top-k, nucleus (top-p), greedy.

Every knob a sweep may vary (``temperature``, ``top_k``, ``top_p``) is a traced
array, so one compiled rollout serves every value. That rules out
``lax.top_k`` (its ``k`` is static); both filters instead find a *threshold*
on the temperature-scaled logits from one descending sort and keep every token
at or above it.

Order of operations (the same as ``transformers``' logits processors)::

    z      = logits / T                                   # [B, V]
    keep_k = rank(z) < k                (k <= 0: keep all)
    p_k    = softmax(z restricted to keep_k)
    keep_p = { i : sum_{j ranked before i} p_k[j] < top_p }   (top_p >= 1: keep all)
    sample ~ softmax(z restricted to keep_k & keep_p)

The first-ranked token is always kept, so the filtered distribution is never
empty. Ties at the threshold are all kept (the kept set is defined by values,
not by sort positions), which only matters for exactly equal logits.

The log-probability returned for a sampled token is ``log_softmax(z)[token]``,
the *unfiltered* temperature-scaled distribution: it is what a full forward pass
recomputes as ``logp``/``old_logp``/``ref_logp`` (RLHF_SPEC §3), so the PPO
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

    The sort runs only when a filter is active (``lax.cond`` on the traced
    values), so plain temperature sampling costs no sort.
    """
    if scaled_logits.ndim != 2:
        raise ValueError(f"filter_logits expects logits [B, V], got shape {scaled_logits.shape}")
    vocab = scaled_logits.shape[-1]
    k = jnp.asarray(top_k, jnp.int32)
    p = jnp.asarray(top_p, jnp.float32)
    active = ((k > 0) & (k < vocab)) | (p < 1.0)

    def _filter(z: Array) -> Array:
        z_sorted = -jnp.sort(-z, axis=-1)  # descending, [B, V]
        ranks = jnp.arange(vocab, dtype=jnp.int32)[None, :]
        k_eff = jnp.where(k > 0, jnp.minimum(k, vocab), vocab)
        in_top_k = ranks < k_eff  # a prefix of the sorted order
        masked_sorted = jnp.where(in_top_k, z_sorted, -jnp.inf)
        probs_sorted = jax.nn.softmax(masked_sorted, axis=-1)
        mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
        # mass_before is non-decreasing, so the kept set is again a prefix; rank 0 always stays.
        keep_sorted = in_top_k & ((mass_before < p) | (ranks == 0))
        n_keep = jnp.sum(keep_sorted, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(z_sorted, n_keep - 1, axis=-1)  # [B, 1]
        return jnp.where(z >= threshold, z, -jnp.inf)

    return jax.lax.cond(active, _filter, lambda z: z, scaled_logits)


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
    logp_all = jax.nn.log_softmax(z, axis=-1)
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        filtered = filter_logits(z, top_k, top_p)
        tokens = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    logprobs = jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
