"""Critic-free policy losses beyond GRPO: GSPO (sequence-level ratios) and CISPO (clipped IS weights)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import Array, as_float, check_choice
from rlhf_jax.losses.grpo import GRPO_AGGREGATIONS, add_kl_and_aggregate
from rlhf_jax.losses.ppo import check_policy_inputs, clipped_surrogate, ratio_metrics


def _per_sequence_mean(x: Array, m: Array) -> Tuple[Array, Array]:
    """Masked mean over T of each row and whether the row has a masked token: ``([B], [B] bool)``."""
    n = jnp.sum(m, axis=-1)
    return jnp.sum(jnp.where(m > 0, x * m, 0.0), axis=-1) / jnp.maximum(n, 1.0), n > 0


def gspo_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, *, clip_eps: Any = 3e-4,
                     clip_eps_high: Optional[Any] = None, ref_logp: Optional[Array] = None, kl_coef: Any = 0.0,
                     aggregation: str = "seq-mean-token-mean", max_len: Optional[int] = None,
                     normalizer: Optional[Any] = None) -> Tuple[Array, Dict[str, Array]]:
    """GSPO (Zheng et al. 2025, *Group Sequence Policy Optimization*): a clipped objective on the
    length-normalised SEQUENCE importance ratio (docs/MATH.md §4.8).

    ``s_i = exp( Σ_t m_it (logp_it - old_logp_it) / Σ_t m_it )`` (the geometric mean of the token ratios),
    ``J_i = min(s_i A_i, clip(s_i, 1-ε_low, 1+ε_high) A_i)``, loss ``= mean_i(-J_i)``; ``ε_low = clip_eps``,
    ``ε_high = clip_eps_high`` (defaults to ``ε_low``), traced. The paper's ranges are ``3e-4`` / ``4e-4``.

    Gradient: the per-token form of GSPO-token, ``s_it = sg(s_i) · exp(logp_it - sg(logp_it))`` (value
    ``s_i`` on every token, ``∂s_it/∂logp_it = s_i``), with ``l_it = max(-A_i s_it, -A_i clip(s_it, ·))``
    aggregated like :func:`grpo_policy_loss`. For the default ``"seq-mean-token-mean"`` this gives the paper's
    gradient ``-(1/G) Σ_i s_i A_i (1/|y_i|) Σ_t ∇logp_it`` on unclipped sequences (0 on clipped ones), and
    for every aggregation it equals, in value and gradient, TRL 1.12 ``GRPOTrainer`` with
    ``importance_sampling_level="sequence"`` (``exp`` of the masked mean, differentiated through) and
    ``trl.experimental.gspo_token`` with ``"sequence_token"``. The optional k3 KL (``ref_logp``,
    ``kl_coef``) is per token, as in :func:`grpo_policy_loss`.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask``: ``[B, T]``; ``advantages [B]`` (one per
    sequence). Returns ``(loss, metrics)``: ``loss``, ``clipfrac`` (fraction of non-empty sequences whose
    clipped term is strictly larger), ``seq_ratio_mean`` / ``seq_ratio_max`` (of ``s_i`` over non-empty
    sequences), ``approx_kl`` (token mean of ``0.5 Δlogp²``), ``num_sequences``, ``num_tokens``,
    ``loss_numerator``, ``loss_denominator`` (+ ``kl``).
    """
    fn = "gspo_policy_loss"
    check_choice(fn, "aggregation", aggregation, GRPO_AGGREGATIONS)
    logp, old_logp, adv, m = check_policy_inputs(fn, logp, old_logp, advantages, mask)
    if jnp.shape(advantages) != logp.shape[:1]:
        raise ValueError(f"{fn}: argument `advantages` has shape {jnp.shape(advantages)} but must have shape "
                         f"{logp.shape[:1]} (one per sequence: GSPO's advantages are sequence-level)")
    token_log_ratio = logp - old_logp
    seq_log_ratio, nonempty = _per_sequence_mean(token_log_ratio, m)
    # GSPO-token: value s_i on every token, gradient s_i·∇logp_t.
    log_ratio = jnp.where(m > 0, logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(seq_log_ratio)[:, None],
                          0.0)
    per_token, tok_metrics = clipped_surrogate(log_ratio, adv, m, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                               dual_clip=None)
    eps_low = as_float(clip_eps)
    eps_high = eps_low if clip_eps_high is None else as_float(clip_eps_high)
    s = jnp.exp(seq_log_ratio)
    a = adv[:, 0]
    seq_clipped = -a * jnp.clip(s, 1.0 - eps_low, 1.0 + eps_high) > -a * s
    w = nonempty.astype(jnp.float32)
    n_seq = jnp.sum(w)
    metrics = {
        "clipfrac": jnp.sum(jnp.where(nonempty, seq_clipped, False).astype(jnp.float32)) / jnp.maximum(n_seq, 1.0),
        "seq_ratio_mean": jnp.sum(jnp.where(nonempty, s, 0.0)) / jnp.maximum(n_seq, 1.0),
        "seq_ratio_max": jnp.where(n_seq > 0, jnp.max(jnp.where(nonempty, s, -jnp.inf)), 0.0),
        "approx_kl": 0.5 * jnp.sum(jnp.square(token_log_ratio) * m) / jnp.maximum(jnp.sum(m), 1.0),
        "num_sequences": n_seq,
        "num_tokens": tok_metrics["num_tokens"],
    }
    return add_kl_and_aggregate(fn, per_token, metrics, m, logp, ref_logp=ref_logp, kl_coef=kl_coef,
                                aggregation=aggregation, max_len=max_len, normalizer=normalizer)


def cispo_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, *,
                      clip_eps_high: Any, clip_eps_low: Optional[Any] = None,
                      ref_logp: Optional[Array] = None, kl_coef: Any = 0.0, aggregation: str = "token-mean",
                      max_len: Optional[int] = None, normalizer: Optional[Any] = None
                      ) -> Tuple[Array, Dict[str, Array]]:
    """CISPO (MiniMax 2025, the MiniMax-M1 report, arXiv 2506.13585): REINFORCE with clipped,
    stop-gradient importance weights (docs/MATH.md §4.9).

    ``ρ_t = exp(logp_t - old_logp_t)``, ``ŵ_t = sg(clip(ρ_t, 1 - ε_low, 1 + ε_high))``,
    ``l_t = -ŵ_t · A_t · logp_t``, aggregated by ``aggregation`` (default ``"token-mean"``: ``Σ m·l / Σ m``,
    the report's ``1/Σ_i|o_i|`` normalisation). ``ε_low = clip_eps_low`` (None: no lower bound, as the report
    uses it), ``ε_high = clip_eps_high`` (required; both traced). Unlike PPO/GRPO no token is dropped: a
    clipped weight only bounds the size of the token's gradient ``-ŵ_t A_t ∇logp_t``. (The report's
    optional trust-region token mask ``M_t`` is not implemented.) Optional per-token k3 KL as in
    :func:`grpo_policy_loss`.

    TRL 1.12 ``GRPOTrainer(loss_type="cispo")`` computes ``-clamp(ρ, max=epsilon_high).detach()·A·logp``
    with ``epsilon_high`` the ABSOLUTE upper bound (ScaleRL's ε_max, 5.0 recommended) and no lower bound, so
    TRL's ``epsilon_high = e`` is ``clip_eps_high = e - 1``, ``clip_eps_low=None`` here (TRL's 5.0 is 4.0).
    The loss VALUE depends on ``logp`` itself: it is a surrogate whose gradient is the objective's.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask``: ``[B, T]``; ``advantages [B]`` or ``[B, T]``.
    Returns ``(loss, metrics)``: ``loss``, ``clipfrac`` (tokens whose weight was clipped), ``approx_kl``,
    ``ratio_mean``, ``ratio_max``, ``num_tokens``, ``loss_numerator``, ``loss_denominator`` (+ ``kl``).
    """
    fn = "cispo_policy_loss"
    check_choice(fn, "aggregation", aggregation, GRPO_AGGREGATIONS)
    logp, old_logp, adv, m = check_policy_inputs(fn, logp, old_logp, advantages, mask)
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    hi = 1.0 + as_float(clip_eps_high)
    lo = jnp.float32(-jnp.inf) if clip_eps_low is None else 1.0 - as_float(clip_eps_low)
    weight = jax.lax.stop_gradient(jnp.clip(ratio, lo, hi))
    per_token = -weight * adv * logp
    clipped = (ratio > hi) | (ratio < lo)
    metrics = ratio_metrics(log_ratio, ratio, clipped, m)
    return add_kl_and_aggregate(fn, per_token, metrics, m, logp, ref_logp=ref_logp, kl_coef=kl_coef,
                                aggregation=aggregation, max_len=max_len, normalizer=normalizer)
