"""GRPO's clipped token loss with an optional k3 KL term and its aggregation options."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax.numpy as jnp

from rlhf_jax.losses.common import Array, as_float, check_choice, check_float, check_shape, reduce_loss
from rlhf_jax.losses.kl import kl_estimate
from rlhf_jax.losses.ppo import check_policy_inputs, clipped_surrogate

GRPO_AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "dr-grpo", "seq-mean-token-sum-norm")
_TO_REDUCTION = {"seq-mean-token-mean": "sequence", "token-mean": "token", "dr-grpo": "dr-grpo",
                 "seq-mean-token-sum-norm": "dr-grpo"}


def grpo_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, *, clip_eps: Any = 0.2,
                     clip_eps_high: Optional[Any] = None, ref_logp: Optional[Array] = None, kl_coef: Any = 0.0,
                     aggregation: str = "seq-mean-token-mean", max_len: Optional[int] = None,
                     normalizer: Optional[Any] = None) -> Tuple[Array, Dict[str, Array]]:
    """GRPO loss (Shao et al. 2024): clipped per-token ratio loss plus an optional k3 KL to the reference.

    ``l_t = max(-A ρ_t, -A clip(ρ_t, 1-ε_low, 1+ε_high)) + β · k3_t``, ``ρ_t = exp(logp_t - old_logp_t)``,
    ``k3_t = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1`` (only when ``ref_logp`` is given;
    ``β = kl_coef``, traced). Aggregation (as TRL's ``loss_type``):

    * ``"seq-mean-token-mean"`` (TRL ``grpo``): mean over sequences of the per-sequence token mean;
    * ``"token-mean"`` (TRL ``bnpo``/DAPO): ``Σ m·l / Σ m``;
    * ``"dr-grpo"`` (alias ``"seq-mean-token-sum-norm"``, TRL ``dr_grpo``): ``Σ m·l / (B · T_max)``,
      ``T_max = max_len`` (the maximum completion length) or the array's T.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask``: ``[B, T]``; ``advantages [B]`` (broadcast
    over tokens) or ``[B, T]``. Returns ``(loss, metrics)``: the :func:`ppo_policy_loss` metrics plus
    ``kl`` (masked token mean of k3, when ``ref_logp`` is given).
    """
    fn = "grpo_policy_loss"
    check_choice(fn, "aggregation", aggregation, GRPO_AGGREGATIONS)
    logp, old_logp, adv, m = check_policy_inputs(fn, logp, old_logp, advantages, mask)
    per_token, metrics = clipped_surrogate(logp - old_logp, adv, m, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                           dual_clip=None)
    return add_kl_and_aggregate(fn, per_token, metrics, m, logp, ref_logp=ref_logp, kl_coef=kl_coef,
                                aggregation=aggregation, max_len=max_len, normalizer=normalizer)


def add_kl_and_aggregate(fn: str, per_token: Array, metrics: Dict[str, Array], m: Array, logp: Array, *,
                         ref_logp: Optional[Array], kl_coef: Any, aggregation: str, max_len: Optional[int],
                         normalizer: Optional[Any]) -> Tuple[Array, Dict[str, Array]]:
    """The tail shared by the GRPO-family losses: ``+ β·k3`` when ``ref_logp`` is given (metric ``kl``), then
    the named aggregation (metrics ``loss``, ``loss_numerator``, ``loss_denominator``).

    ``per_token``, ``m``, ``logp``: ``[B, T]``, already checked (``logp`` 0 off the mask).
    """
    check_choice(fn, "aggregation", aggregation, GRPO_AGGREGATIONS)
    if ref_logp is not None:
        ref = check_float(fn, "ref_logp", ref_logp)
        check_shape(fn, "ref_logp", ref, logp.shape, "`logp`")
        live = m > 0
        kl = kl_estimate(logp, jnp.where(live, ref, 0.0), estimator="k3", mask=m)
        per_token = per_token + as_float(kl_coef) * kl
        metrics["kl"] = jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)
    loss, num, den = reduce_loss(per_token, m, _TO_REDUCTION[aggregation], normalizer=normalizer, max_len=max_len)
    metrics.update(loss=loss, loss_numerator=num, loss_denominator=den)
    return loss, metrics
