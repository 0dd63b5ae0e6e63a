"""KL estimators, KL-penalised per-token rewards and the adaptive KL controller."""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax.numpy as jnp

from rlhf_jax.losses.common import (Array, as_float, check_choice, check_float, check_mask, check_ndim, check_real,
                                    check_shape)

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: Array, ref_logp: Array, *, estimator: str = "k1", mask: Optional[Array] = None) -> Array:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from samples of π (Schulman, "Approximating KL").

    With ``logr = ref_logp - logp``:
    ``k1 = -logr`` (unbiased, can be negative), ``k2 = logr² / 2``,
    ``k3 = exp(logr) - 1 - logr`` (non-negative, unbiased).

    Shapes: ``logp``, ``ref_logp``: equal, any (usually ``[B, T]``); optional ``mask`` of that shape
    zeroes the estimate outside it. Returns that shape, float32.
    """
    fn = "kl_estimate"
    check_choice(fn, "estimator", estimator, KL_ESTIMATORS)
    logp = check_float(fn, "logp", logp)
    ref_logp = check_float(fn, "ref_logp", ref_logp)
    check_shape(fn, "ref_logp", ref_logp, logp.shape, "`logp`")
    m = None if mask is None else check_mask(fn, "mask", mask, logp.shape, "`logp`")
    logr = ref_logp - logp if m is None else jnp.where(m > 0, ref_logp - logp, 0.0)
    if estimator == "k1":
        kl = -logr
    elif estimator == "k2":
        kl = 0.5 * jnp.square(logr)
    else:
        kl = jnp.expm1(logr) - logr
    if m is not None:
        kl = jnp.where(m > 0, kl, 0.0)
    return kl


def last_token_index(mask: Array) -> Array:
    """Index of the last position with ``mask = 1`` in each row (``-1`` for an empty row).

    For a response mask (1 up to and including the first stop token) this is the stop token when
    there is one, else the last generated token. Shapes: ``mask [B, T]`` -> ``[B]`` int32.
    """
    mask = jnp.asarray(mask)
    t = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask > 0, t, -1), axis=-1)


def apply_missing_eos_penalty(scores: Array, has_eos: Array, penalty: Any) -> Array:
    """``scores - penalty`` where a response has no stop token, unchanged elsewhere (TRL's
    ``missing_eos_penalty``). ``penalty`` is traced. Shapes: ``scores [B]``, ``has_eos [B]`` bool."""
    fn = "apply_missing_eos_penalty"
    scores = check_real(fn, "scores", scores)
    has_eos = jnp.asarray(has_eos)
    check_shape(fn, "has_eos", has_eos, scores.shape, "`scores`")
    return jnp.where(has_eos.astype(bool), scores, scores - as_float(penalty))


def kl_penalized_rewards(scores: Array, logp: Array, ref_logp: Array, mask: Array, *, kl_coef: Any,
                         estimator: str = "k1", score_clip: Optional[Any] = None) -> Array:
    """Per-token PPO rewards: a KL penalty on every token plus the sequence score on the last one.

    ``r[b, t] = -β · kl[b, t] · mask[b, t] + 1[t = last_b] · clip(score_b, -c, c)``

    where ``kl`` is :func:`kl_estimate` (``estimator``), ``β = kl_coef`` (traced), ``c = score_clip``
    (no clipping when None; traced otherwise) and ``last_b`` the LAST REAL response token of row b —
    the stop token when present, else the last generated token (:func:`last_token_index`). (TRL's
    PPO puts the score one position later when pad ≠ eos; we do not.) A row with an empty mask gets
    no score. Zero outside the mask.

    Shapes: ``scores [B]``, ``logp``, ``ref_logp``, ``mask``: ``[B, T]``. Returns ``[B, T]`` float32.
    """
    fn = "kl_penalized_rewards"
    logp = check_float(fn, "logp", logp)
    check_ndim(fn, "logp", logp, 2, "[B, T]")
    scores = check_real(fn, "scores", scores)
    check_shape(fn, "scores", scores, logp.shape[:1], "`logp`'s batch axis")
    m = check_mask(fn, "mask", mask, logp.shape, "`logp`")
    kl = kl_estimate(logp, ref_logp, estimator=estimator, mask=m)
    if score_clip is not None:
        c = as_float(score_clip)
        scores = jnp.clip(scores, -c, c)
    last = last_token_index(m)
    at_last = (jnp.arange(logp.shape[1])[None, :] == last[:, None]) & (m > 0)
    return -as_float(kl_coef) * kl + jnp.where(at_last, scores[:, None], 0.0)


@flax.struct.dataclass
class AdaptiveKLController:
    """The KL coefficient β and its adaptive controller (Ziegler et al. 2019), as a pytree of arrays.

    ``beta``: current β; ``target``: KL target (NaN, or None, means a FIXED β); ``horizon``: the
    controller's horizon in sequences. Build with :meth:`create` so that fixed and adaptive
    controllers share one pytree structure of float32 scalars (a sweep can vmap over ``target``).
    Lives in the PPO state; :meth:`update` is pure.
    """
    beta: Any
    target: Any
    horizon: Any

    @classmethod
    def create(cls, init_kl_coef: Any, target: Optional[Any] = None, horizon: Any = 10000) -> "AdaptiveKLController":
        """``target=None`` (or NaN) gives a fixed β = ``init_kl_coef``."""
        tgt = jnp.asarray(jnp.nan if target is None else target, jnp.float32)
        return cls(beta=as_float(init_kl_coef), target=tgt, horizon=as_float(horizon))

    @property
    def is_adaptive(self) -> Array:
        if self.target is None:
            return jnp.asarray(False)
        return jnp.isfinite(jnp.asarray(self.target, jnp.float32))

    def update(self, kl: Any, n_steps: Any) -> "AdaptiveKLController":
        """One controller step after an iteration with mean sequence KL ``kl`` over ``n_steps`` sequences.

        ``e = clip(kl / target - 1, -0.2, 0.2)``, ``β ← β · (1 + e · n_steps / horizon)``; β unchanged
        when the controller is fixed. Call as ``ctrl.update(kl, n)`` or ``AdaptiveKLController.update(ctrl, kl, n)``.
        """
        beta = as_float(self.beta)
        if self.target is None:
            return self.replace(beta=beta)
        target = as_float(self.target)
        adaptive = jnp.isfinite(target)
        safe_target = jnp.where(adaptive, target, 1.0)
        e = jnp.clip(as_float(kl) / safe_target - 1.0, -0.2, 0.2)
        new_beta = beta * (1.0 + e * as_float(n_steps) / as_float(self.horizon))
        return self.replace(beta=jnp.where(adaptive, new_beta, beta))


def update_kl_controller(ctrl: AdaptiveKLController, kl: Any, n_steps: Any) -> AdaptiveKLController:
    """Functional form of :meth:`AdaptiveKLController.update`."""
    return ctrl.update(kl, n_steps)


update = update_kl_controller  # `update(ctrl, kl, n_steps) -> ctrl`, the name issue 3 uses
