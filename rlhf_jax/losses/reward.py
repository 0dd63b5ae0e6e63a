"""Reward-model losses: pairwise Bradley–Terry and K-wise rankings (InstructGPT)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import Array, as_float, check_int, check_mask, check_ndim, check_real, check_shape


def bradley_terry_loss(chosen_rewards: Array, rejected_rewards: Array, *, margin: Optional[Any] = None,
                       center_coef: Any = 0.0, mask: Optional[Array] = None) -> Tuple[Array, Dict[str, Array]]:
    """Pairwise Bradley–Terry loss for a reward model.

    ``loss = mean_b[-log σ(r_c - r_r - m)] + c · mean_b[(r_c + r_r)²]``

    ``m`` is an optional per-pair margin (default 0; a scalar broadcasts), ``c = center_coef`` the
    centering coefficient (TRL's ``center_rewards_coefficient``, 0.01 is common; 0 switches it off).
    Both are traced. ``mask [B]`` (optional) drops padded pairs from every mean. Matches
    ``trl.RewardTrainer.compute_loss``.

    Shapes: ``chosen_rewards [B]``, ``rejected_rewards [B]``, ``margin [B]`` or scalar, ``mask [B]``.
    Returns ``(loss, metrics)``: ``loss``, ``accuracy`` = mean(r_c > r_r), ``margin`` = mean(r_c - r_r),
    ``chosen_reward``, ``rejected_reward`` (means), ``num_pairs``.
    """
    fn = "bradley_terry_loss"
    rc = check_real(fn, "chosen_rewards", chosen_rewards)
    rr = check_real(fn, "rejected_rewards", rejected_rewards)
    check_ndim(fn, "chosen_rewards", rc, 1, "[B]")
    check_shape(fn, "rejected_rewards", rr, rc.shape, "`chosen_rewards`")
    w = jnp.ones_like(rc) if mask is None else check_mask(fn, "mask", mask, rc.shape, "`chosen_rewards`")
    if margin is None:
        m = jnp.zeros_like(rc)
    else:
        m = check_real(fn, "margin", margin)
        if m.ndim != 0:
            check_shape(fn, "margin", m, rc.shape, "`chosen_rewards`")
        m = jnp.broadcast_to(m, rc.shape)
    n = jnp.maximum(jnp.sum(w), 1.0)

    def mean(x):
        return jnp.sum(jnp.where(w > 0, x * w, 0.0)) / n

    diff = rc - rr
    nll = -jax.nn.log_sigmoid(diff - m)
    loss = mean(nll) + as_float(center_coef) * mean(jnp.square(rc + rr))
    metrics = {
        "loss": loss,
        "accuracy": mean((diff > 0).astype(jnp.float32)),
        "margin": mean(diff),
        "chosen_reward": mean(rc),
        "rejected_reward": mean(rr),
        "num_pairs": jnp.sum(w),
    }
    return loss, metrics


def ranking_loss(rewards: Array, ranks: Array, mask: Array) -> Tuple[Array, Dict[str, Array]]:
    """K-wise ranking loss (InstructGPT, Ouyang et al. 2022, eq. 1).

    For prompt ``b`` with valid responses ``{i : mask[b,i]}`` and ``ranks[b, i]`` (0 = best; a lower
    rank is preferred), every ordered pair ``(i, j)`` with ``ranks[b,i] < ranks[b,j]`` contributes
    ``-log σ(r_bi - r_bj)``. Pairs are averaged within the prompt (``C(K_b, 2)`` pairs when there are
    no ties; tied pairs are skipped), then prompts are averaged, so every prompt weighs the same
    whatever its ``K_b``. Prompts with no valid pair do not count.

    Shapes: ``rewards [B, K]`` float, ``ranks [B, K]`` int, ``mask [B, K]`` (K may vary per prompt).
    Returns ``(loss, metrics)``: ``loss``, ``accuracy`` (fraction of a prompt's pairs ordered right,
    averaged over prompts), ``num_pairs``, ``num_prompts``.
    """
    fn = "ranking_loss"
    r = check_real(fn, "rewards", rewards)
    check_ndim(fn, "rewards", r, 2, "[B, K]")
    rk = check_int(fn, "ranks", ranks)
    check_shape(fn, "ranks", rk, r.shape, "`rewards`")
    m = check_mask(fn, "mask", mask, r.shape, "`rewards`")
    valid = (m[:, :, None] > 0) & (m[:, None, :] > 0) & (rk[:, :, None] < rk[:, None, :])  # [B, K(i), K(j)]
    diff = r[:, :, None] - r[:, None, :]
    pair_nll = jnp.where(valid, -jax.nn.log_sigmoid(diff), 0.0)
    pair_ok = jnp.where(valid, (diff > 0).astype(jnp.float32), 0.0)
    n_pairs = jnp.sum(valid, axis=(1, 2)).astype(jnp.float32)  # [B]
    has = n_pairs > 0
    n_prompts = jnp.sum(has.astype(jnp.float32))
    per_prompt = jnp.sum(pair_nll, axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
    per_prompt_acc = jnp.sum(pair_ok, axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
    loss = jnp.sum(jnp.where(has, per_prompt, 0.0)) / jnp.maximum(n_prompts, 1.0)
    metrics = {
        "loss": loss,
        "accuracy": jnp.sum(jnp.where(has, per_prompt_acc, 0.0)) / jnp.maximum(n_prompts, 1.0),
        "num_pairs": jnp.sum(n_pairs),
        "num_prompts": n_prompts,
    }
    return loss, metrics
