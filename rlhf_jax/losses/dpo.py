"""Direct preference optimisation and its variants (sigmoid/cDPO, hinge, IPO, robust)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (Array, as_float, check_choice, check_float, check_label_smoothing, check_mask,
                                    check_ndim, check_shape)

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "rdpo")


def dpo_loss(policy_chosen_logp: Array, policy_rejected_logp: Array, ref_chosen_logp: Array,
             ref_rejected_logp: Array, *, beta: Any, loss_type: str = "sigmoid", label_smoothing: Any = 0.0,
             chosen_len: Optional[Array] = None, rejected_len: Optional[Array] = None,
             mask: Optional[Array] = None, robust_normalize: bool = False) -> Tuple[Array, Dict[str, Array]]:
    """DPO loss family on sequence log-probabilities (summed over completion tokens).

    ``Δ_c = logπ(c) - logπ_ref(c)``, ``Δ_r = logπ(r) - logπ_ref(r)``, ``Δ = Δ_c - Δ_r``, ``ε = label_smoothing``:

    * ``sigmoid`` (Rafailov et al. 2023): ``-log σ(βΔ)``; with ``ε > 0`` the conservative cDPO form
      ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)`` (TRL 1.12's ``sigmoid`` ignores ε; equal at ε = 0).
    * ``hinge`` (SLiC): ``relu(1 - βΔ)``.
    * ``ipo`` (Azar et al. 2023), length-normalised as TRL does:
      ``(Δ_c/|c| - Δ_r/|r| - 1/(2β))²`` with ``chosen_len``/``rejected_len`` the completion token counts
      (clamped ≥ 1). Pass them for the form of docs/MATH.md §4.4; without them ``|c| = |r| = 1`` (the paper's eq. 17
      on the log-ratios as given, e.g. already per-token averages).
    * ``robust`` (docs/MATH.md §4.4, "robust/cDPO"): ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)``, the expected loss
      when a label is flipped with probability ε; divided by ``1 - 2ε`` when ``robust_normalize=True``.
    * ``rdpo`` (Chowdhury et al. 2024, TRL 1.12's ``robust``): ``[-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1 - 2ε)``,
      the unbiased estimator under label-flip rate ε < 1/2 (note the + sign: not our ``robust``).

    ``beta`` and ``label_smoothing`` are traced. ``mask [B]`` (optional) drops padded pairs.
    Shapes: the four log-probs and lengths ``[B]``. Returns ``(loss, metrics)``: ``loss`` (mean over
    pairs), ``chosen_reward = mean βΔ_c``, ``rejected_reward = mean βΔ_r``, ``reward_margin``,
    ``reward_accuracy`` = mean(βΔ_c > βΔ_r), ``num_pairs``.
    """
    fn = "dpo_loss"
    check_choice(fn, "loss_type", loss_type, DPO_LOSS_TYPES)
    pc = check_float(fn, "policy_chosen_logp", policy_chosen_logp)
    check_ndim(fn, "policy_chosen_logp", pc, 1, "[B]")
    pr = check_float(fn, "policy_rejected_logp", policy_rejected_logp)
    rc = check_float(fn, "ref_chosen_logp", ref_chosen_logp)
    rr = check_float(fn, "ref_rejected_logp", ref_rejected_logp)
    for name, x in (("policy_rejected_logp", pr), ("ref_chosen_logp", rc), ("ref_rejected_logp", rr)):
        check_shape(fn, name, x, pc.shape, "`policy_chosen_logp`")
    w = jnp.ones_like(pc) if mask is None else check_mask(fn, "mask", mask, pc.shape, "`policy_chosen_logp`")
    check_label_smoothing(fn, label_smoothing)
    beta = as_float(beta)
    eps = as_float(label_smoothing)
    d_c = pc - rc
    d_r = pr - rr
    delta = d_c - d_r
    if loss_type == "sigmoid":
        per_pair = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
    elif loss_type == "hinge":
        per_pair = jax.nn.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        if (chosen_len is None) != (rejected_len is None):
            raise ValueError(f"{fn}: loss_type='ipo' needs both `chosen_len` and `rejected_len` (or neither)")
        if chosen_len is None:
            lc = lr = jnp.ones_like(pc)  # Δ taken as given: IPO eq. 17 without length normalisation
        else:
            lc = jnp.asarray(chosen_len)
            lr = jnp.asarray(rejected_len)
            check_shape(fn, "chosen_len", lc, pc.shape, "`policy_chosen_logp`")
            check_shape(fn, "rejected_len", lr, pc.shape, "`policy_chosen_logp`")
            lc = jnp.maximum(lc.astype(jnp.float32), 1.0)
            lr = jnp.maximum(lr.astype(jnp.float32), 1.0)
        per_pair = jnp.square(d_c / lc - d_r / lr - 1.0 / (2.0 * beta))
    elif loss_type == "robust":
        per_pair = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
        if robust_normalize:
            per_pair = per_pair / (1.0 - 2.0 * eps)
    else:  # rdpo
        per_pair = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
                    + eps * jax.nn.log_sigmoid(-beta * delta)) / (1.0 - 2.0 * eps)
    n = jnp.maximum(jnp.sum(w), 1.0)

    def mean(x):
        return jnp.sum(jnp.where(w > 0, x * w, 0.0)) / n

    loss = mean(per_pair)
    r_c = beta * d_c
    r_r = beta * d_r
    metrics = {
        "loss": loss,
        "chosen_reward": mean(r_c),
        "rejected_reward": mean(r_r),
        "reward_margin": mean(r_c - r_r),
        "reward_accuracy": mean((r_c > r_r).astype(jnp.float32)),
        "num_pairs": jnp.sum(w),
    }
    return loss, metrics
