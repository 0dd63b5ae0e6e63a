"""Supervised fine-tuning loss and token log-probabilities."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (Array, as_float, check_choice, check_float, check_int, check_mask, check_ndim,
                                    check_shape, reduce_loss)


@jax.custom_vjp
def _masked_token_logprobs(logits: Array, targets: Array, mask: Array) -> Array:
    """``log softmax(logits)[targets]`` on rows with ``mask > 0``, computed on ``where(mask, logits, 0)``.

    ``z_y - logsumexp(z)`` without materialising the log-softmax. The backward pass is written out:
    ``d logp / d logits = onehot(y) - softmax(z)`` as one elementwise pass (autodiff of
    ``take_along_axis`` scatters into a zero ``[B, T, V]`` buffer and then selects the padding away:
    two more passes over the largest tensor of a language-model step). Padding rows, even with
    non-finite logits, get exactly zero gradient.
    """
    logp, _ = _masked_token_logprobs_fwd(logits, targets, mask)
    return logp


def _masked_token_logprobs_fwd(logits, targets, mask):
    live = (mask > 0)[..., None]
    z = jnp.where(live, logits, 0.0)
    zmax = jnp.max(z, axis=-1, keepdims=True)  # a custom VJP: no gradient flows through this anyway
    lse = jnp.log(jnp.sum(jnp.exp(z - zmax), axis=-1)) + zmax[..., 0]
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return picked - lse, (logits, lse, targets, mask)


def _masked_token_logprobs_bwd(res, g):
    logits, lse, targets, mask = res
    live = (mask > 0)[..., None]
    p = jnp.exp(jnp.where(live, logits, 0.0) - lse[..., None])
    onehot = targets[..., None] == jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    d = jnp.where(live, (onehot.astype(p.dtype) - p) * g[..., None], 0.0)
    return d.astype(logits.dtype), None, None


_masked_token_logprobs.defvjp(_masked_token_logprobs_fwd, _masked_token_logprobs_bwd)


def _check_logits_targets(fn: str, logits: Any, targets: Any, mask: Any, targets_name: str):
    logits = check_float(fn, "logits", logits)
    check_ndim(fn, "logits", logits, 3, "[B, T, V]")
    targets = check_int(fn, targets_name, targets)
    check_shape(fn, targets_name, targets, logits.shape[:2], "`logits` without its vocabulary axis")
    m = check_mask(fn, "mask", mask, logits.shape[:2], "`logits` without its vocabulary axis")
    # Padding is selected away inside `_masked_token_logprobs` BEFORE the non-linear math, so
    # non-finite padding cannot reach a value or a gradient.
    return logits, targets, m


def sequence_logprobs(logits: Array, tokens: Array, mask: Array, *, temperature: Any = 1.0) -> Array:
    """Per-token log-probability of ``tokens`` under ``softmax(logits / temperature)``.

    ``logp[b, t] = log softmax(logits[b, t] / τ)[tokens[b, t]]`` on masked positions, 0 elsewhere.
    ``logits[b, t]`` must already be the distribution that predicts ``tokens[b, t]`` (the caller does
    the one-position shift). The same τ as sampling must be used for logp, old_logp and ref_logp, or the
    first PPO ratio is not 1. ``temperature`` is traced (changing it does not recompile).

    Shapes: ``logits [B, T, V]``, ``tokens [B, T]`` int, ``mask [B, T]`` -> ``[B, T]`` float32.
    Sum over ``T`` for a sequence log-probability (as DPO needs).
    """
    fn = "sequence_logprobs"
    logits, tokens, m = _check_logits_targets(fn, logits, tokens, mask, "tokens")
    logp = _masked_token_logprobs(logits / as_float(temperature), tokens, m)
    return jnp.where(m > 0, logp, 0.0)


def sft_loss(logits: Array, targets: Array, mask: Array, *, reduction: str = "token",
             normalizer: Optional[Any] = None) -> Tuple[Array, Dict[str, Array]]:
    """Masked token cross-entropy.

    ``l[b, t] = logsumexp(logits[b, t]) - logits[b, t, targets[b, t]]`` on masked tokens
    (response tokens; prompt and padding have ``mask = 0``). ``targets[b, t]`` is the token that
    ``logits[b, t]`` predicts — the caller does the one-position shift (and for packed rows sets
    ``mask = 0`` at the last token of each segment, so a segment never predicts the next one).

    Reductions (see :func:`rlhf_jax.losses.common.reduction_terms`): ``"token"`` (default,
    ``Σ m·l / Σ m``), ``"sequence"`` (mean over sequences of the per-sequence token mean), ``"sum"``.
    ``normalizer``: divide the numerator by this (e.g. the global token count) instead.

    Shapes: ``logits [B, T, V]`` float, ``targets [B, T]`` int, ``mask [B, T]``.
    Returns ``(loss, metrics)`` with metrics ``loss``, ``nll`` (token-mean NLL), ``accuracy``
    (token-mean argmax accuracy), ``num_tokens``, ``loss_numerator``, ``loss_denominator``.
    """
    fn = "sft_loss"
    check_choice(fn, "reduction", reduction, ("token", "sequence", "sum"))
    logits, targets, m = _check_logits_targets(fn, logits, targets, mask, "targets")
    nll = -_masked_token_logprobs(logits, targets, m)
    correct = (jnp.argmax(jnp.where(m[..., None] > 0, logits, 0.0), axis=-1) == targets).astype(jnp.float32)
    return _sft_from_nll(nll, correct, m, reduction, normalizer)


def _sft_from_nll(nll: Array, correct: Array, m: Array, reduction: str, normalizer) -> Tuple[Array, Dict[str, Array]]:
    loss, num, den = reduce_loss(nll, m, reduction, normalizer=normalizer)
    n_tok = jnp.sum(m)
    metrics = {
        "loss": loss,
        "nll": jnp.sum(jnp.where(m > 0, nll * m, 0.0)) / jnp.maximum(n_tok, 1.0),
        "accuracy": jnp.sum(correct * m) / jnp.maximum(n_tok, 1.0),
        "num_tokens": n_tok,
        "loss_numerator": num,
        "loss_denominator": den,
    }
    return loss, metrics


def chunked_token_logprobs(head: Callable[[Array], Array], hidden: Array, targets: Array, mask: Array, *,
                           chunk: int, temperature: Any = 1.0) -> Tuple[Array, Array]:
    """``(logp, correct)``, both ``[B, T]`` float32, of ``logits = head(hidden)`` computed ``chunk`` positions
    at a time, so the ``[B, T, V]`` logits are never materialised whole (vocabulary 128k makes them the
    largest buffer of a language-model step).

    ``head``: ``[B, c, D] -> [B, c, V]`` (a model's ``logits_from_hidden``). ``logp[b, t] = log
    softmax(head(hidden)[b, t] / τ)[targets[b, t]]`` and ``correct[b, t] = argmax == targets`` on masked
    positions, 0 elsewhere: the same numbers as :func:`sequence_logprobs` on the whole logits (tested).
    Each chunk's logits live inside one rematerialised ``lax.map`` step (the backward pass recomputes
    them from the chunk's hidden states); ``T`` need not divide by ``chunk`` (the tail is padded and
    masked). Shapes: ``hidden [B, T, D]``, ``targets [B, T]`` int, ``mask [B, T]``.
    """
    fn = "chunked_token_logprobs"
    check_ndim(fn, "hidden", hidden, 3, "[B, T, D]")
    targets = check_int(fn, "targets", targets)
    check_shape(fn, "targets", targets, hidden.shape[:2], "`hidden` without its feature axis")
    m = check_mask(fn, "mask", mask, hidden.shape[:2], "`hidden` without its feature axis")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{fn}: chunk must be an int >= 1, got {chunk!r}")
    b, t = targets.shape
    k = -(-t // chunk)
    pad = k * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        m = jnp.pad(m, ((0, 0), (0, pad)))
    tau = as_float(temperature)

    @jax.checkpoint
    def one(xs):
        h_c, t_c, m_c = xs
        logits = head(h_c).astype(jnp.float32) / tau
        logp = _masked_token_logprobs(logits, t_c, m_c)
        correct = jnp.argmax(jnp.where(m_c[..., None] > 0, logits, 0.0), axis=-1) == t_c
        return jnp.where(m_c > 0, logp, 0.0), jnp.where(m_c > 0, correct, False).astype(jnp.float32)

    split = lambda x: jnp.swapaxes(x.reshape((b, k, chunk) + x.shape[2:]), 0, 1)  # noqa: E731  [k, B, c, ...]
    logp, correct = jax.lax.map(one, (split(hidden), split(targets), split(m)))
    back = lambda x: jnp.swapaxes(x, 0, 1).reshape(b, k * chunk)[:, :t]  # noqa: E731
    return back(logp), back(correct)


def sft_loss_chunked(head: Callable[[Array], Array], hidden: Array, targets: Array, mask: Array, *, chunk: int,
                     reduction: str = "token", normalizer: Optional[Any] = None) -> Tuple[Array, Dict[str, Array]]:
    """:func:`sft_loss` of ``logits = head(hidden)`` without the whole ``[B, T, V]`` logits: the token
    log-probabilities come from :func:`chunked_token_logprobs` (``chunk`` positions at a time). Same
    loss, metrics and gradients as ``sft_loss(head(hidden), ...)`` (tested in f32)."""
    check_choice("sft_loss_chunked", "reduction", reduction, ("token", "sequence", "sum"))
    logp, correct = chunked_token_logprobs(head, hidden, targets, mask, chunk=chunk)
    m = as_float(mask)
    return _sft_from_nll(-logp, correct, m, reduction, normalizer)
