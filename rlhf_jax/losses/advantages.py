"""Advantage estimators: GAE (PPO), group-normalised (GRPO) and leave-one-out (RLOO)."""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import Array, as_float, check_choice, check_mask, check_ndim, check_real, check_shape


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
