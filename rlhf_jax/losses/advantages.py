"""Advantage estimators: GAE (PPO), group-normalised (GRPO), leave-one-out (RLOO) and REINFORCE++."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (Array, as_float, check_choice, check_mask, check_ndim, check_real, check_shape,
                                    masked_whiten)
from rlhf_jax.losses.kl import kl_penalized_rewards


def gae_advantages(rewards: Array, values: Array, mask: Array, *, gamma: Any = 1.0, lam: Any = 0.95
                   ) -> Tuple[Array, Array]:
    """Generalised advantage estimation over response tokens, by a reverse ``lax.scan``.

    Over the masked positions ``t_1 < … < t_n`` of a row (padding is skipped, as if absent):
    ``δ_t = r_t + γ V_next - V_t``, ``A_t = δ_t + γ λ A_next``, with ``V_next = A_next = 0`` after the
    last real token (``V_T = 0``: the episode ends there). Returns ``R_t = A_t + V_t``. Both outputs
    are 0 outside the mask, so adding padding anywhere never changes an advantage. ``gamma`` and
    ``lam`` are traced (defaults γ = 1, λ = 0.95; docs/MATH.md §3.5).

    Shapes: ``rewards``, ``values``, ``mask``: ``[B, T]``. Returns ``(advantages, returns)``, ``[B, T]``
    float32. Whitening (global batch) is a separate step: :func:`rlhf_jax.losses.masked_whiten`.
    """
    fn = "gae_advantages"
    rewards = check_real(fn, "rewards", rewards)
    check_ndim(fn, "rewards", rewards, 2, "[B, T]")
    values = check_real(fn, "values", values)
    check_shape(fn, "values", values, rewards.shape, "`rewards`")
    m = check_mask(fn, "mask", mask, rewards.shape, "`rewards`")
    gamma = as_float(gamma)
    lam = as_float(lam)
    live = m > 0
    # Padding must not leak NaN/inf into the scan carry.
    r = jnp.where(live, rewards, 0.0)
    v = jnp.where(live, values, 0.0)

    def step(carry, xs):
        next_value, next_adv = carry
        r_t, v_t, live_t = xs
        delta = r_t + gamma * next_value - v_t
        adv = delta + gamma * lam * next_adv
        new_carry = (jnp.where(live_t, v_t, next_value), jnp.where(live_t, adv, next_adv))
        return new_carry, jnp.where(live_t, adv, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, live.T), reverse=True)
    advantages = adv_tb.T
    returns = jnp.where(live, advantages + v, 0.0)
    return advantages, returns


def _check_groups(fn: str, rewards: Any, group_size: int) -> Array:
    rewards = check_real(fn, "rewards", rewards)
    check_ndim(fn, "rewards", rewards, 1, "[B]")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{fn}: `group_size` must be a positive Python int (it is a shape) but got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{fn}: `rewards` has shape {rewards.shape}, whose batch size is not a multiple of "
                         f"group_size={group_size}")
    return rewards


def _unbiased_std(x: Array, axis=None, keepdims=False) -> Array:
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis, keepdims=keepdims))
    return jnp.std(x, axis=axis, keepdims=keepdims, ddof=1)


def grpo_advantages(rewards: Array, group_size: int, *, scale: str = "group", eps: float = 1e-4) -> Array:
    """Group-relative advantages (GRPO, Shao et al. 2024), one per sample.

    The ``group_size`` samples of a prompt are contiguous. ``A_i = (r_i - mean_g) / (std + 1e-4)``
    where ``mean_g`` is the group mean and ``std`` the UNBIASED (n-1) standard deviation of the group
    (``scale="group"``), of the whole batch (``scale="batch"``), or no division (``scale="none"``,
    Dr.GRPO). Matches TRL's ``GRPOTrainer`` (``scale_rewards``). A group of size 1 has std 0.
    Broadcast over tokens by the caller (``A[:, None]``).

    Shapes: ``rewards [B]``, ``B % group_size == 0`` -> ``[B]`` float32.
    """
    fn = "grpo_advantages"
    check_choice(fn, "scale", scale, ("group", "batch", "none"))
    r = _check_groups(fn, rewards, group_size)
    g = r.reshape(-1, group_size)
    centred = (g - jnp.mean(g, axis=1, keepdims=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = jnp.repeat(_unbiased_std(g, axis=1), group_size)
    else:
        std = jnp.broadcast_to(_unbiased_std(r), r.shape)
    return centred / (std + as_float(eps))


def rloo_advantages(rewards: Array, group_size: int) -> Array:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024).

    ``A_i = r_i - mean_{j≠i} r_j = r_i - (Σ_g r - r_i) / (k - 1)`` within each contiguous group of
    ``k = group_size`` samples; ``k = 1`` gives 0. For PPO-style RLOO fold the KL into ``r`` first
    (``r - β Σ_t k1``). Shapes: ``rewards [B]`` -> ``[B]`` float32.
    """
    fn = "rloo_advantages"
    r = _check_groups(fn, rewards, group_size)
    if group_size == 1:
        return jnp.zeros_like(r)
    g = r.reshape(-1, group_size)
    baseline = (jnp.sum(g, axis=1, keepdims=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def reinforce_pp_advantages(rewards: Array, mask: Array, *, logp: Optional[Array] = None,
                            ref_logp: Optional[Array] = None, kl_coef: Any = 0.0, estimator: str = "k1",
                            gamma: Any = 1.0, baseline: bool = False, group_size: Optional[int] = None,
                            axis_name: Optional[Any] = None, eps: float = 1e-8) -> Tuple[Array, Array]:
    """REINFORCE++ (Hu 2025, *REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
    Models*) and REINFORCE++-baseline: critic-free per-token advantages with GLOBAL whitening
    (docs/MATH.md §4.10).

    1. Scores ``s_b`` (``rewards [B]``). With ``baseline=True`` (REINFORCE++-baseline) the group mean is
       subtracted first: ``s_i ← s_i - mean_{j in i's group} s_j`` over ``group_size`` contiguous samples
       (:func:`grpo_advantages` with ``scale="none"``; no division by the std).
    2. Per-token rewards with the KL in the reward, exactly :func:`kl_penalized_rewards`:
       ``r_t = -β · kl_t + 1[t = last] · s_b`` with ``kl`` the ``estimator`` (default k1,
       ``logp - ref_logp`` of the ROLLOUT policy) and ``β = kl_coef``; no KL term when ``logp`` is None.
       Per-token ``rewards [B, T]`` are used as given instead (plus ``-β kl`` when ``logp`` is given);
       ``baseline`` then is an error (there is no per-sequence score to centre).
    3. Returns ``G_t = Σ_{t' ≥ t} γ^{t'-t} r_t'`` over the masked tokens (holes skipped; ``γ = gamma``,
       default 1): :func:`gae_advantages` with ``V = 0`` and ``λ = 1``.
    4. ``A = masked_whiten(G, mask, axis_name=axis_name)``: mean and UNBIASED std over all masked tokens of
       the batch (every device's, with ``axis_name``), ``A = (G - μ) / sqrt(var + eps)``.

    (OpenRLHF whitens with the population variance, ``rsqrt(max(var, 1e-8))``; the two differ by
    ``sqrt(n/(n-1))``, n the number of masked tokens.) ``kl_coef``, ``gamma`` traced; ``group_size``,
    ``estimator``, ``baseline`` static. Shapes: ``rewards [B]`` or ``[B, T]``, ``mask``, ``logp``,
    ``ref_logp``: ``[B, T]``. Returns ``(advantages, returns)``, ``[B, T]`` float32, 0 off the mask.
    """
    fn = "reinforce_pp_advantages"
    m = jnp.asarray(mask)
    check_ndim(fn, "mask", m, 2, "[B, T]")
    m = check_mask(fn, "mask", m, m.shape, "`mask`")
    if (logp is None) != (ref_logp is None):
        raise ValueError(f"{fn}: pass both `logp` and `ref_logp` (for the KL in the reward) or neither")
    rewards = check_real(fn, "rewards", rewards)
    if rewards.ndim == 1:
        check_shape(fn, "rewards", rewards, m.shape[:1], "`mask`'s batch axis")
        if baseline:
            if group_size is None:
                raise ValueError(f"{fn}: `baseline=True` (REINFORCE++-baseline) needs `group_size`")
            rewards = grpo_advantages(rewards, group_size, scale="none")
        scores, token_rewards = rewards, jnp.zeros_like(m)
    else:
        check_shape(fn, "rewards", rewards, m.shape, "`mask` (per-token rewards) or its batch axis (scores)")
        if baseline:
            raise ValueError(f"{fn}: `baseline=True` needs per-sequence scores `rewards [B]`, not per-token rewards")
        scores, token_rewards = jnp.zeros(m.shape[:1], jnp.float32), jnp.where(m > 0, rewards, 0.0)
    if logp is None:
        logp = ref_logp = jnp.zeros_like(m)
    r = kl_penalized_rewards(scores, logp, ref_logp, m, kl_coef=kl_coef, estimator=estimator) + token_rewards
    returns, _ = gae_advantages(r, jnp.zeros_like(m), m, gamma=gamma, lam=1.0)
    return masked_whiten(returns, m, axis_name=axis_name, eps=eps), returns
