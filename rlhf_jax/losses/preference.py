"""Preference losses beyond DPO: KTO (unpaired), and the reference-free SimPO and ORPO."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (Array, as_float, check_float, check_label_smoothing, check_mask, check_ndim,
                                    check_shape, masked_mean)


def _check_pair(fn: str, a_name: str, a: Any, b_name: str, b: Any, mask: Optional[Any]) -> Tuple[Array, Array, Array]:
    """Two ``[B]`` float arrays of one shape and an optional ``[B]`` mask -> ``(a, b, w)``, 0 off the mask."""
    a = check_float(fn, a_name, a)
    check_ndim(fn, a_name, a, 1, "[B]")
    b = check_float(fn, b_name, b)
    check_shape(fn, b_name, b, a.shape, f"`{a_name}`")
    w = jnp.ones_like(a) if mask is None else check_mask(fn, "mask", mask, a.shape, f"`{a_name}`")
    return jnp.where(w > 0, a, 0.0), jnp.where(w > 0, b, 0.0), w


def _optional_scalar(fn: str, name: str, x: Optional[Any]) -> Array:
    """A scalar (traced) argument as float32; 0 when None."""
    if x is None:
        return jnp.zeros((), jnp.float32)
    x = as_float(x)
    check_ndim(fn, name, x, 0, "a scalar")
    return x


def _pair_reward_metrics(r_c: Array, r_r: Array, w: Array) -> Dict[str, Array]:
    return {
        "chosen_reward": masked_mean(r_c, w),
        "rejected_reward": masked_mean(r_r, w),
        "reward_margin": masked_mean(r_c - r_r, w),
        "reward_accuracy": masked_mean((r_c > r_r).astype(jnp.float32), w),
        "num_pairs": jnp.sum(w),
    }


def kto_loss(policy_logp: Array, ref_logp: Array, desirable: Array, *, beta: Any, desirable_weight: Any = 1.0,
             undesirable_weight: Any = 1.0, kl_ref: Optional[Any] = None, mask: Optional[Array] = None
             ) -> Tuple[Array, Dict[str, Array]]:
    """KTO (Ethayarajh et al. 2024, *KTO: Model Alignment as Prospect Theoretic Optimization*, eq. 7) on
    unpaired examples, as TRL 1.12's ``KTOTrainer`` (``loss_type="kto"``, ``_compute_loss``); docs/MATH.md §4.5.

    ``r_b = policy_logp_b - ref_logp_b`` (sequence log-probabilities, summed over completion tokens),
    ``z = max(0, sg(kl_ref))`` (0 when ``kl_ref`` is None), and per example

    * desirable:   ``l_b = w_d · (1 - σ(β (r_b - z)))``
    * undesirable: ``l_b = w_u · (1 - σ(β (z - r_b)))``

    ``loss = Σ_b m_b l_b / Σ_b m_b``: a plain mean over ALL (unmasked) examples — the class weights
    ``w_d = desirable_weight``, ``w_u = undesirable_weight`` scale the terms but are not in the denominator
    (TRL's ``losses.nanmean()`` over the concatenated weighted losses). The paper's constant ``λ_y`` in
    ``λ_y - v(x, y)`` is dropped, as in TRL.

    ``kl_ref`` is the reference point's KL estimate, a scalar: the mean of ``policy_logp - ref_logp`` over a
    batch of MISMATCHED completions (TRL pairs each prompt with another example's completion), e.g.
    ``masked_mean(kl_policy_logp - kl_ref_logp, kl_mask, axis_name=...)`` for a global mean. It is
    detached here (no gradient, as in the paper and TRL) and clamped at 0. ``beta``, the weights and
    ``kl_ref`` are traced.

    Shapes: ``policy_logp``, ``ref_logp``: ``[B]`` float; ``desirable``: ``[B]`` bool (or 0/1 integers);
    ``kl_ref``: scalar; ``mask [B]`` (optional) drops padded examples. Returns ``(loss, metrics)``: ``loss``,
    ``kl`` (= z), ``chosen_reward`` / ``rejected_reward`` (mean ``β r`` over desirable / undesirable
    examples), ``reward_margin`` (their difference), ``logps_chosen`` / ``logps_rejected`` (mean
    ``policy_logp``), ``num_desirable``, ``num_undesirable``.
    """
    fn = "kto_loss"
    pl, rl, w = _check_pair(fn, "policy_logp", policy_logp, "ref_logp", ref_logp, mask)
    d = jnp.asarray(desirable)
    if not (d.dtype == jnp.bool_ or jnp.issubdtype(d.dtype, jnp.integer)):
        raise ValueError(f"{fn}: argument `desirable` must be bool (or 0/1 integers) but has dtype {d.dtype}")
    check_shape(fn, "desirable", d, pl.shape, "`policy_logp`")
    d = d.astype(bool)
    beta = as_float(beta)
    z = jnp.maximum(jax.lax.stop_gradient(_optional_scalar(fn, "kl_ref", kl_ref)), 0.0)
    r = pl - rl
    per_example = jnp.where(d, as_float(desirable_weight) * (1.0 - jax.nn.sigmoid(beta * (r - z))),
                            as_float(undesirable_weight) * (1.0 - jax.nn.sigmoid(beta * (z - r))))
    loss = masked_mean(per_example, w)
    w_d = jnp.where(d, w, 0.0)
    w_u = jnp.where(d, 0.0, w)
    chosen_reward = masked_mean(beta * r, w_d)
    rejected_reward = masked_mean(beta * r, w_u)
    metrics = {
        "loss": loss,
        "kl": z,
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "reward_margin": chosen_reward - rejected_reward,
        "logps_chosen": masked_mean(pl, w_d),
        "logps_rejected": masked_mean(pl, w_u),
        "num_desirable": jnp.sum(w_d),
        "num_undesirable": jnp.sum(w_u),
    }
    return loss, metrics


def simpo_loss(chosen_logp_avg: Array, rejected_logp_avg: Array, *, beta: Any, gamma: Optional[Any] = None,
               gamma_beta_ratio: Optional[Any] = None, label_smoothing: Any = 0.0, mask: Optional[Array] = None
               ) -> Tuple[Array, Dict[str, Array]]:
    """SimPO (Meng et al. 2024, *SimPO: Simple Preference Optimization with a Reference-Free Reward*;
    docs/MATH.md §4.6).

    Reference-free, on LENGTH-NORMALISED log-probabilities ``ℓ̄ = (1/|y|) Σ_t logp_t`` (the caller averages
    over the completion's tokens). With ``u = β (ℓ̄_c - ℓ̄_r) - γ`` and ``ε = label_smoothing``:
    ``l = -(1-ε) log σ(u) - ε log σ(-u)`` (ε = 0: the paper's ``-log σ(u)``), mean over (unmasked) pairs.

    The margin: pass exactly one of ``gamma`` (the absolute target margin γ, TRL's ``simpo_gamma``: TRL 1.12
    ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` subtracts ``simpo_gamma / beta`` from the log-ratio
    before multiplying by β, i.e. ``u = βΔ - simpo_gamma``) or ``gamma_beta_ratio`` (the SimPO repository's
    γ/β, so ``γ = gamma_beta_ratio · β``). All hyper-parameters are traced. TRL's ``CPOTrainer`` adds
    ``cpo_alpha · NLL(chosen)`` (default ``cpo_alpha = 1``); pure SimPO is ``cpo_alpha = 0`` — add that term
    yourself (e.g. ``sft_loss``) for CPO-SimPO.

    Shapes: ``chosen_logp_avg``, ``rejected_logp_avg``, ``mask``: ``[B]``. Returns ``(loss, metrics)``:
    ``loss``, ``chosen_reward = mean β ℓ̄_c``, ``rejected_reward``, ``reward_margin``, ``reward_accuracy``
    (mean ``1[ℓ̄_c > ℓ̄_r]``), ``num_pairs``.
    """
    fn = "simpo_loss"
    c, r, w = _check_pair(fn, "chosen_logp_avg", chosen_logp_avg, "rejected_logp_avg", rejected_logp_avg, mask)
    if (gamma is None) == (gamma_beta_ratio is None):
        raise ValueError(f"{fn}: pass exactly one of `gamma` (the margin γ, TRL's simpo_gamma) and "
                         f"`gamma_beta_ratio` (γ/β, the SimPO repository's convention)")
    check_label_smoothing(fn, label_smoothing)
    beta = as_float(beta)
    g = as_float(gamma) if gamma is not None else as_float(gamma_beta_ratio) * beta
    eps = as_float(label_smoothing)
    u = beta * (c - r) - g
    per_pair = -(1.0 - eps) * jax.nn.log_sigmoid(u) - eps * jax.nn.log_sigmoid(-u)
    loss = masked_mean(per_pair, w)
    return loss, {"loss": loss, **_pair_reward_metrics(beta * c, beta * r, w)}


_LOG_HALF = -math.log(2.0)
_MAX_LOGP = -1e-7  # log-probabilities are clamped here so a certain completion (logp = 0) stays finite


def _log1mexp(x: Array) -> Array:
    """``log(1 - e^x)`` for ``x < 0``, stable on both sides of ``-log 2`` (Mächler 2012), NaN-free gradients:
    ``log1p(-e^x)`` below ``-log 2``, ``log(-expm1(x))`` above, each evaluated only on its own side."""
    lo = x < _LOG_HALF
    return jnp.where(lo, jnp.log1p(-jnp.exp(jnp.where(lo, x, _LOG_HALF))),
                     jnp.log(-jnp.expm1(jnp.where(lo, _LOG_HALF, x))))


def orpo_loss(chosen_logp_avg: Array, rejected_logp_avg: Array, *, beta: Any, nll: Optional[Any] = None,
              mask: Optional[Array] = None) -> Tuple[Array, Dict[str, Array]]:
    """ORPO (Hong et al. 2024, *ORPO: Monolithic Preference Optimization without Reference Model*;
    docs/MATH.md §4.7).

    On length-normalised log-probabilities ``ℓ̄`` (TRL's ``average_log_prob=True``):
    ``log odds(y) = ℓ̄ - log(1 - exp(ℓ̄))`` (``log1mexp``, computed stably), and per pair
    ``l_OR = -log σ(log odds_c - log odds_r)``. ``loss = nll + β · mean_b l_OR`` (``nll``: the SFT loss on
    the chosen responses, a scalar the caller computes, e.g. :func:`rlhf_jax.losses.sft_loss`; 0 when None).
    ``β = beta`` is the paper's λ (traced). Equals TRL 1.12 ``ORPOTrainer``: ``loss = policy_nll_loss -
    mean(odds_ratio_loss(...)[0])`` with ``odds_ratio_loss`` returning ``β log σ(·)``. ``ℓ̄`` is clamped to
    ``≤ -1e-7`` (TRL gives inf/NaN at ``ℓ̄ = 0``).

    Shapes: ``chosen_logp_avg``, ``rejected_logp_avg``, ``mask``: ``[B]``; ``nll``: scalar. Returns
    ``(loss, metrics)``: ``loss``, ``or_loss`` (``β mean l_OR``), ``nll``, ``log_odds_ratio`` (mean
    ``log σ(log odds_c - log odds_r)``, TRL's metric), ``log_odds_chosen`` (mean ``log odds_c - log odds_r``),
    and ``chosen_reward = mean β ℓ̄_c``, ``rejected_reward``, ``reward_margin``, ``reward_accuracy``,
    ``num_pairs``.
    """
    fn = "orpo_loss"
    c, r, w = _check_pair(fn, "chosen_logp_avg", chosen_logp_avg, "rejected_logp_avg", rejected_logp_avg, mask)
    beta = as_float(beta)
    nll_v = _optional_scalar(fn, "nll", nll)
    cc = jnp.minimum(c, _MAX_LOGP)
    rc = jnp.minimum(r, _MAX_LOGP)
    log_odds = (cc - rc) - (_log1mexp(cc) - _log1mexp(rc))
    log_ratio = jax.nn.log_sigmoid(log_odds)
    or_loss = -beta * masked_mean(log_ratio, w)
    loss = nll_v + or_loss
    metrics = {
        "loss": loss,
        "or_loss": or_loss,
        "nll": nll_v,
        "log_odds_ratio": masked_mean(log_ratio, w),
        "log_odds_chosen": masked_mean(log_odds, w),
        **_pair_reward_metrics(beta * c, beta * r, w),
    }
    return loss, metrics
