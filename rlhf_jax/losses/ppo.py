"""PPO's clipped policy and value losses, and the policy entropy."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (Array, as_float, check_choice, check_float, check_mask, check_ndim, check_real,
                                    check_shape, reduce_loss)

_POLICY_REDUCTIONS = ("token", "sequence", "sum", "dr-grpo", "seq-mean-token-sum-norm")


def _masked_token_mean(x: Array, m: Array) -> Array:
    return jnp.sum(jnp.where(m > 0, x * m, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def check_policy_inputs(fn: str, logp: Array, old_logp: Array, advantages: Array, mask: Array
                        ) -> Tuple[Array, Array, Array, Array]:
    """The argument checks shared by the per-token policy losses (PPO, GRPO, GSPO, CISPO).

    ``logp``, ``old_logp``, ``mask``: ``[B, T]``; ``advantages``: ``[B]`` (broadcast over tokens) or
    ``[B, T]``. Returns ``(logp, old_logp, advantages, m)``, ``[B, T]`` float32, with every off-mask value
    replaced by 0 (padding may hold garbage, e.g. TRL's INVALID_LOGPROB: it never reaches ``exp``), and
    ``m`` the mask as 0/1 weights.
    """
    logp = check_float(fn, "logp", logp)
    check_ndim(fn, "logp", logp, 2, "[B, T]")
    old_logp = check_float(fn, "old_logp", old_logp)
    check_shape(fn, "old_logp", old_logp, logp.shape, "`logp`")
    adv = check_real(fn, "advantages", advantages)
    if adv.shape == logp.shape[:1]:
        adv = adv[:, None]
    elif adv.shape != logp.shape:
        raise ValueError(f"{fn}: argument `advantages` has shape {adv.shape} but must have shape {logp.shape} "
                         f"(the shape of `logp`) or {logp.shape[:1]} (one per sequence)")
    adv = jnp.broadcast_to(adv, logp.shape)
    m = check_mask(fn, "mask", mask, logp.shape, "`logp`")
    live = m > 0
    return jnp.where(live, logp, 0.0), jnp.where(live, old_logp, 0.0), jnp.where(live, adv, 0.0), m


def ratio_metrics(log_ratio: Array, ratio: Array, clipped: Array, m: Array) -> Dict[str, Array]:
    """Token-mean diagnostics of an importance ratio: ``clipfrac``, ``approx_kl = 0.5·mean(log ρ²)``,
    ``ratio_mean``, ``ratio_max`` (0 for an empty mask) and ``num_tokens``."""
    live = m > 0
    return {
        "clipfrac": _masked_token_mean(clipped.astype(jnp.float32), m),
        "approx_kl": 0.5 * _masked_token_mean(jnp.square(log_ratio), m),
        "ratio_mean": _masked_token_mean(ratio, m),
        "ratio_max": jnp.where(jnp.any(live), jnp.max(jnp.where(live, ratio, -jnp.inf)), 0.0),
        "num_tokens": jnp.sum(m),
    }


def clipped_surrogate(log_ratio: Array, adv: Array, m: Array, *, clip_eps: Any, clip_eps_high: Optional[Any],
                      dual_clip: Optional[Any]) -> Tuple[Array, Dict[str, Array]]:
    """Per-token clipped surrogate ``max(-A ρ, -A clip(ρ, 1-ε_low, 1+ε_high))`` of ``ρ = exp(log_ratio)``
    (optionally dual-clipped), on inputs already checked by :func:`check_policy_inputs` (0 off the mask).
    Returns ``(per_token_loss, metrics)``."""
    eps_low = as_float(clip_eps)
    eps_high = eps_low if clip_eps_high is None else as_float(clip_eps_high)
    ratio = jnp.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    # max(pg1, pg2) written as a strict `where`, so that at exactly ρ = 1 ± ε (a tie) the unclipped
    # gradient flows and the token is not counted as clipped (jnp.maximum would split the gradient).
    clipped = pg2 > pg1
    per_token = jnp.where(clipped, pg2, pg1)
    metrics = {}
    if dual_clip is not None:
        # Dual clip (Ye et al. 2020): for A < 0 the loss is also bounded by -c·A (c > 1).
        pg3 = -adv * as_float(dual_clip)
        dual = (adv < 0) & (per_token > pg3)
        per_token = jnp.where(dual, pg3, per_token)
        metrics["dual_clipfrac"] = _masked_token_mean(dual.astype(jnp.float32), m)
    metrics.update(ratio_metrics(log_ratio, ratio, clipped, m))
    return per_token, metrics


def clipped_policy_objective(logp: Array, old_logp: Array, advantages: Array, mask: Array, *, clip_eps: Any,
                             clip_eps_high: Optional[Any], dual_clip: Optional[Any], fn: str
                             ) -> Tuple[Array, Dict[str, Array], Array]:
    """Per-token clipped surrogate shared by PPO and GRPO; returns ``(per_token_loss, metrics, mask)``."""
    logp, old_logp, adv, m = check_policy_inputs(fn, logp, old_logp, advantages, mask)
    per_token, metrics = clipped_surrogate(logp - old_logp, adv, m, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                           dual_clip=dual_clip)
    return per_token, metrics, m


def ppo_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, *, clip_eps: Any = 0.2,
                    clip_eps_high: Optional[Any] = None, dual_clip: Optional[Any] = None, reduction: str = "token",
                    normalizer: Optional[Any] = None) -> Tuple[Array, Dict[str, Array]]:
    """PPO clipped surrogate loss (Schulman et al. 2017) with asymmetric and dual clipping.

    ``ρ = exp(logp - old_logp)``,
    ``l_t = max(-A_t ρ_t, -A_t clip(ρ_t, 1 - ε_low, 1 + ε_high))`` with ``ε_low = clip_eps`` and
    ``ε_high = clip_eps_high`` (defaults to ``clip_eps``). With ``dual_clip = c > 1``:
    ``l_t ← min(l_t, -c A_t)`` where ``A_t < 0``. All three are traced.
    Reduced over masked tokens by ``reduction`` (``token`` default, ``sequence``, ``sum``,
    ``dr-grpo``; see :func:`rlhf_jax.losses.common.reduction_terms`); ``normalizer`` replaces the local
    denominator (divide once by a global count).

    Shapes: ``logp``, ``old_logp``, ``mask``: ``[B, T]``; ``advantages [B, T]`` or ``[B]``.
    Returns ``(loss, metrics)``: ``loss``, ``clipfrac`` (fraction of masked tokens where the clipped
    term is strictly larger, TRL's ``pg_clipfrac``), ``approx_kl = 0.5 · mean(Δlogp²)``,
    ``ratio_mean``, ``ratio_max``, ``num_tokens``, ``loss_numerator``, ``loss_denominator``
    (+ ``dual_clipfrac`` with dual clipping); all masked.
    """
    fn = "ppo_policy_loss"
    check_choice(fn, "reduction", reduction, _POLICY_REDUCTIONS)
    per_token, metrics, m = clipped_policy_objective(logp, old_logp, advantages, mask, clip_eps=clip_eps,
                                                     clip_eps_high=clip_eps_high, dual_clip=dual_clip, fn=fn)
    loss, num, den = reduce_loss(per_token, m, reduction, normalizer=normalizer)
    metrics.update(loss=loss, loss_numerator=num, loss_denominator=den)
    return loss, metrics


def ppo_value_loss(values: Array, old_values: Array, returns: Array, mask: Array, *, clip_eps: Any = 0.2,
                   reduction: str = "token", normalizer: Optional[Any] = None) -> Tuple[Array, Dict[str, Array]]:
    """Clipped value loss.

    ``l_t = 0.5 · max((V_t - R_t)², (clip(V_t, V_old,t - ε_v, V_old,t + ε_v) - R_t)²)``, ``ε_v = clip_eps``
    (traced), reduced over masked tokens like :func:`ppo_policy_loss`.

    Shapes: all ``[B, T]``. Returns ``(loss, metrics)``: ``loss``, ``vf_clipfrac`` (fraction where the
    clipped term is strictly larger), ``value_mean``, ``num_tokens``, ``loss_numerator``,
    ``loss_denominator``.
    """
    fn = "ppo_value_loss"
    check_choice(fn, "reduction", reduction, _POLICY_REDUCTIONS)
    v = check_real(fn, "values", values)
    check_ndim(fn, "values", v, 2, "[B, T]")
    v_old = check_real(fn, "old_values", old_values)
    check_shape(fn, "old_values", v_old, v.shape, "`values`")
    ret = check_real(fn, "returns", returns)
    check_shape(fn, "returns", ret, v.shape, "`values`")
    m = check_mask(fn, "mask", mask, v.shape, "`values`")
    live = m > 0
    v, v_old, ret = (jnp.where(live, x, 0.0) for x in (v, v_old, ret))
    eps = as_float(clip_eps)
    v_clipped = jnp.clip(v, v_old - eps, v_old + eps)
    l1 = jnp.square(v - ret)
    l2 = jnp.square(v_clipped - ret)
    per_token = 0.5 * jnp.where(l2 > l1, l2, l1)
    loss, num, den = reduce_loss(per_token, m, reduction, normalizer=normalizer)
    metrics = {
        "loss": loss,
        "vf_clipfrac": _masked_token_mean((l2 > l1).astype(jnp.float32), m),
        "value_mean": _masked_token_mean(v, m),
        "num_tokens": jnp.sum(m),
        "loss_numerator": num,
        "loss_denominator": den,
    }
    return loss, metrics


def entropy_from_logits(logits: Array, mask: Array, *, reduction: str = "token") -> Array:
    """Entropy of ``softmax(logits)`` per token, ``H = logsumexp(z) - Σ_v softmax(z)_v z_v`` (nats).

    ``reduction="token"`` (default): the mean over masked tokens, a scalar (the PPO entropy bonus and
    metric); ``"sequence"``: mean of per-sequence means; ``"none"``: per-token ``[B, T]``, 0 outside
    the mask. Divide the logits by the sampling temperature first if the sampling entropy is meant.

    Shapes: ``logits [B, T, V]``, ``mask [B, T]``.
    """
    fn = "entropy_from_logits"
    check_choice(fn, "reduction", reduction, ("token", "sequence", "none"))
    z = check_float(fn, "logits", logits)
    check_ndim(fn, "logits", z, 3, "[B, T, V]")
    m = check_mask(fn, "mask", mask, z.shape[:2], "`logits` without its vocabulary axis")
    z = jnp.where(m[..., None] > 0, z, 0.0)  # padding never reaches the non-linear math (or a gradient)
    p = jax.nn.softmax(z, axis=-1)
    ent = jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z, axis=-1)
    ent = jnp.where(m > 0, ent, 0.0)
    if reduction == "none":
        return ent
    loss, _, _ = reduce_loss(ent, m, reduction)
    return loss
