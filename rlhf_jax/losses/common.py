"""Shared helpers for the loss modules: argument checks, masked statistics and reductions.

Conventions used by every loss in :mod:`rlhf_jax.losses`:

* ``mask[b, t]`` is 1 on the tokens that count (response tokens up to and including the stop token)
  and 0 elsewhere; it may be bool, int or float. Values outside the mask never influence a result.
* Statistics are computed in float32 (bf16 inputs are upcast) and returned in float32.
* Reductions follow the "(sum, count), divide once" rule: :func:`reduction_terms` returns the
  numerator and denominator of a reduction, so a caller that accumulates micro-batches or sums over
  devices adds the numerators (and the denominators) and divides once. Every loss with a
  ``reduction`` option also takes ``normalizer=``: when given, the numerator of *this* (micro-)batch
  is divided by it instead of by the local count, so passing the global count makes the sum of the
  micro-batch losses (and of their gradients) equal the global-batch loss exactly.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array

REDUCTIONS = ("token", "sequence", "sum")


def _shape(x: Any) -> Tuple[int, ...]:
    return tuple(jnp.shape(x))


def check_shape(fn: str, name: str, x: Any, expected: Sequence[int], expected_from: str) -> None:
    """Raise ``ValueError`` naming the function, the argument and both shapes when they differ."""
    if _shape(x) != tuple(expected):
        raise ValueError(
            f"{fn}: argument `{name}` has shape {_shape(x)} but must have shape {tuple(expected)} "
            f"(the shape of {expected_from})")


def check_ndim(fn: str, name: str, x: Any, ndim: int, what: str) -> None:
    if jnp.ndim(x) != ndim:
        raise ValueError(f"{fn}: argument `{name}` must be {what} ({ndim}-D) but has shape {_shape(x)}")


def check_float(fn: str, name: str, x: Any) -> Array:
    """Require a floating dtype and return the array upcast to at least float32."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn}: argument `{name}` must have a floating dtype but has dtype {x.dtype}")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_real(fn: str, name: str, x: Any) -> Array:
    """A real-valued quantity (rewards, values, advantages): bool/int/float accepted, returned as >= float32."""
    x = jnp.asarray(x)
    if not (x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype, jnp.floating)):
        raise ValueError(f"{fn}: argument `{name}` must be real-valued (bool, integer or float) "
                         f"but has dtype {x.dtype}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.float32)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_int(fn: str, name: str, x: Any) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{fn}: argument `{name}` must have an integer dtype but has dtype {x.dtype}")
    return x


def check_mask(fn: str, name: str, mask: Any, expected: Sequence[int], expected_from: str) -> Array:
    """Check a mask's shape and dtype (bool, integer or floating) and return it as float32 0/1 weights."""
    mask = jnp.asarray(mask)
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)
            or jnp.issubdtype(mask.dtype, jnp.floating)):
        raise ValueError(f"{fn}: argument `{name}` must be bool, integer or float but has dtype {mask.dtype}")
    check_shape(fn, name, mask, expected, expected_from)
    return mask.astype(jnp.float32)


def check_choice(fn: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: `{name}` must be one of {list(choices)} but got {value!r}")


def check_label_smoothing(fn: str, value: Any) -> None:
    """A label-smoothing ε must lie in [0, 0.5). Only concrete Python numbers can be checked; a traced
    value is the caller's responsibility."""
    if isinstance(value, (int, float)) and not 0.0 <= value < 0.5:
        raise ValueError(f"{fn}: `label_smoothing` must be in [0, 0.5) but got {value}")


def as_float(x: Any) -> Array:
    """A hyper-parameter as a float32 array (a Python float or a traced value: never baked in)."""
    return jnp.asarray(x, jnp.float32)


def _psum(x: Array, axis_name: Optional[Any]) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmax(x: Array, axis_name: Optional[Any]) -> Array:
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def masked_sum(x: Array, mask: Array, axis: Optional[Any] = None, *, axis_name: Optional[Any] = None) -> Array:
    """``Σ x·mask`` over ``axis`` (all axes when None), then summed over the mapped ``axis_name``.

    Positions outside the mask are selected away with ``where`` (not multiplied), so a NaN or inf in
    padding cannot leak into the result.
    """
    x = jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))
    mask = jnp.asarray(mask, jnp.float32)
    if _shape(x) != _shape(mask):
        raise ValueError(f"masked_sum: argument `mask` has shape {_shape(mask)} but must have shape {_shape(x)} "
                         f"(the shape of `x`)")
    return _psum(jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis), axis_name)


def masked_mean(x: Array, mask: Array, axis: Optional[Any] = None, *, axis_name: Optional[Any] = None) -> Array:
    """``Σ x·mask / Σ mask``; with ``axis_name`` both sums are taken over all devices first.

    An all-zero mask gives 0 (not NaN): the count is clamped to 1.
    """
    num = masked_sum(x, mask, axis, axis_name=axis_name)
    den = _psum(jnp.sum(jnp.asarray(mask, jnp.float32), axis=axis), axis_name)
    return num / jnp.maximum(den, 1.0)


def masked_var(x: Array, mask: Array, *, unbiased: bool = True, axis_name: Optional[Any] = None) -> Array:
    """Masked variance over all masked elements (and all devices with ``axis_name``).

    ``μ = Σ m x / n``, ``var = Σ m (x-μ)² / n``, times ``n/(n-1)`` when ``unbiased`` (Bessel, as TRL's
    ``masked_var``). Two passes for numerical stability. ``n ≤ 1`` with ``unbiased`` gives 0.
    """
    mask = jnp.asarray(mask, jnp.float32)
    x = jnp.asarray(x)
    x = jnp.where(mask > 0, x, 0.0)  # before the square: non-finite padding must not reach a gradient
    n = _psum(jnp.sum(mask), axis_name)
    mean = masked_sum(x, mask, axis_name=axis_name) / jnp.maximum(n, 1.0)
    sq = masked_sum(jnp.square(x - mean), mask, axis_name=axis_name)
    if unbiased:
        return jnp.where(n > 1, sq / jnp.maximum(n - 1.0, 1.0), 0.0)
    return sq / jnp.maximum(n, 1.0)


def masked_whiten(x: Array, mask: Array, *, shift_mean: bool = True, axis_name: Optional[Any] = None,
                  eps: float = 1e-8) -> Array:
    """Whiten ``x`` with the mean and (unbiased) variance of its masked elements.

    ``y = (x - μ) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back
    (``y + μ``, TRL's convention for reward whitening). Statistics are over the GLOBAL batch when
    ``axis_name`` is given (``psum`` of the sums and counts, divide once), so every device whitens
    with the same numbers. Output is 0 outside the mask.

    Shapes: ``x``, ``mask``: any shape, equal. Returns ``x``'s shape, float32.
    """
    fn = "masked_whiten"
    x = check_real(fn, "x", x)
    m = check_mask(fn, "mask", mask, _shape(x), "`x`")
    x = jnp.where(m > 0, x, 0.0)
    mean = masked_mean(x, m, axis_name=axis_name)
    var = masked_var(x, m, unbiased=True, axis_name=axis_name)
    y = (x - mean) * jax.lax.rsqrt(var + as_float(eps))
    if not shift_mean:
        y = y + mean
    return jnp.where(m > 0, y, 0.0)


def explained_variance(values: Array, returns: Array, mask: Array, *, axis_name: Optional[Any] = None) -> Array:
    """``1 - Var[R - V] / Var[R]`` over masked tokens (global with ``axis_name``).

    1 is a perfect value function, 0 no better than a constant, negative worse. Returns NaN when the
    returns have zero variance (undefined). Shapes: all ``[B, T]`` (or any equal shape) -> scalar.
    """
    fn = "explained_variance"
    values = check_real(fn, "values", values)
    returns = check_real(fn, "returns", returns)
    check_shape(fn, "returns", returns, values.shape, "`values`")
    m = check_mask(fn, "mask", mask, values.shape, "`values`")
    var_r = masked_var(returns, m, unbiased=False, axis_name=axis_name)
    var_res = masked_var(returns - values, m, unbiased=False, axis_name=axis_name)
    return jnp.where(var_r > 0, 1.0 - var_res / jnp.where(var_r > 0, var_r, 1.0), jnp.nan)


def reduction_terms(per_token: Array, mask: Array, reduction: str, *, max_len: Optional[int] = None
                    ) -> Tuple[Array, Array]:
    """Numerator and denominator of a named reduction of a per-token quantity ``[B, T]``.

    * ``"token"``: ``(Σ_bt m·l, Σ_bt m)`` — mean over all masked tokens (default everywhere).
    * ``"sequence"``: ``(Σ_b mean_t(l_b), #{b : Σ_t m_bt > 0})`` — mean over sequences of the
      per-sequence token mean; sequences with no masked token do not count.
    * ``"sum"``: ``(Σ_bt m·l, 1)``.
    * ``"dr-grpo"`` (alias ``"seq-mean-token-sum-norm"``): ``(Σ_bt m·l, B·T_max)`` with
      ``T_max = max_len`` or the array's T (Dr.GRPO, Liu et al. 2025).

    Callers that accumulate micro-batches or devices add numerators and denominators and divide once.
    """
    m = jnp.asarray(mask, jnp.float32)
    x = jnp.where(m > 0, per_token * m, 0.0)
    if reduction == "token":
        return jnp.sum(x), jnp.sum(m)
    if reduction == "sequence":
        n_b = jnp.sum(m, axis=-1)
        seq_mean = jnp.sum(x, axis=-1) / jnp.maximum(n_b, 1.0)
        return jnp.sum(seq_mean), jnp.sum((n_b > 0).astype(jnp.float32))
    if reduction == "sum":
        return jnp.sum(x), jnp.ones((), jnp.float32)
    if reduction in ("dr-grpo", "seq-mean-token-sum-norm"):
        t_max = per_token.shape[-1] if max_len is None else max_len
        n_seq = 1
        for d in per_token.shape[:-1]:
            n_seq *= d
        return jnp.sum(x), jnp.asarray(float(n_seq * t_max), jnp.float32)
    raise ValueError(f"reduction must be one of ['token', 'sequence', 'sum', 'dr-grpo'] but got {reduction!r}")


def reduce_loss(per_token: Array, mask: Array, reduction: str, *, normalizer: Optional[Any] = None,
                max_len: Optional[int] = None) -> Tuple[Array, Array, Array]:
    """Apply a named reduction: returns ``(loss, numerator, denominator)``.

    ``loss = numerator / (normalizer if given else max(denominator, 1))``. Pass the global
    denominator (summed over micro-batches/devices) as ``normalizer`` to divide once.
    """
    num, den = reduction_terms(per_token, mask, reduction, max_len=max_len)
    div = jnp.maximum(den, 1.0) if normalizer is None else as_float(normalizer)
    return num / div, num, den
