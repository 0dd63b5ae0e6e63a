"""Stop tokens and the response mask.

A response is every generated token up to *and including* the first stop token;
everything after it is padding (docs/MATH.md §3.3: the sequence score lands on the
last real response token, the stop token when there is one).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.generation.errors import GenerationArgumentError

Array = jax.Array


def normalize_stop_ids(stop_token_ids: int | Iterable[int] | None) -> tuple[int, ...]:
    """Returns stop ids as a sorted tuple of Python ints (hashable, so usable as a static arg).

    Raises ``GenerationArgumentError`` (a ``ValueError``) on a negative or non-integer id.
    """
    if stop_token_ids is None:
        return ()
    if isinstance(stop_token_ids, (int, np.integer)):
        stop_token_ids = (stop_token_ids,)
    out = []
    for i, t in enumerate(stop_token_ids):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise GenerationArgumentError(f"stop_token_ids[{i}] must be an int token id, got {t!r}")
        if int(t) < 0:
            raise GenerationArgumentError(f"stop_token_ids[{i}] must be >= 0, got {int(t)}")
        out.append(int(t))
    return tuple(sorted(set(out)))


def is_stop_token(tokens: Array, stop_token_ids: Sequence[int]) -> Array:
    """Boolean array, same shape as ``tokens``: whether each token is a stop token."""
    if not stop_token_ids:
        return jnp.zeros(jnp.shape(tokens), bool)
    ids = jnp.asarray(stop_token_ids, dtype=jnp.asarray(tokens).dtype)
    return jnp.any(jnp.asarray(tokens)[..., None] == ids, axis=-1)


def response_mask(tokens: Array, stop_token_ids: Sequence[int]) -> Array:
    """``mask [B, N]`` int32: 1 up to and including the first stop token of each row, 0 after.

    A row without a stop token is all ones. Equivalent to
    ``mask[b, t] = 1 - any(is_stop[b, :t])``.
    """
    stop = is_stop_token(tokens, stop_token_ids).astype(jnp.int32)
    stops_before = jnp.cumsum(stop, axis=-1) - stop  # stops strictly before t
    return (stops_before == 0).astype(jnp.int32)


def truncate_after_stop(tokens: Array, stop_token_ids: Sequence[int], pad_token_id: int) -> tuple[Array, Array]:
    """Replaces every token after the first stop token with ``pad_token_id``.

    Returns ``(tokens [B, N], mask [B, N])`` with ``mask = response_mask(tokens, stop_token_ids)``.
    """
    mask = response_mask(tokens, stop_token_ids)
    return jnp.where(mask > 0, tokens, jnp.asarray(pad_token_id, jnp.asarray(tokens).dtype)), mask
