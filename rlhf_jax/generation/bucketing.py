"""Prompt-length buckets: a stream of prompts compiles a bounded number of times.

``generate`` compiles once per (batch, prompt length, max_new_tokens). Prompts are
left-padded, and extra *left* padding changes nothing in the output (pad keys are
masked and positions count from each row's first real token), so a prompt batch of
length ``P`` is widened on the left to the smallest bucket ``>= P``. With the default
power-of-two buckets, prompt lengths up to ``L`` cost at most ``log2(L) - 3`` programs,
and at most 2x prefill work on the padding.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.generation.errors import GenerationArgumentError

Array = jax.Array

MIN_BUCKET = 16


def power_of_two_buckets(max_len: int) -> tuple[int, ...]:
    """Powers of two from ``MIN_BUCKET`` up to the first one ``>= max_len``."""
    out = [MIN_BUCKET]
    while out[-1] < max_len:
        out.append(out[-1] * 2)
    return tuple(out)


def bucket_length(length: int, buckets: Sequence[int] | None = None) -> int:
    """The smallest bucket ``>= length``.

    ``buckets=None`` means powers of two ``>= 16``. An explicit bucket list that has
    no bucket ``>= length`` raises ``ValueError`` naming both.
    """
    length = int(length)
    if length < 1:
        raise ValueError(f"prompt length must be >= 1, got {length}")
    if buckets is None:
        return power_of_two_buckets(length)[-1]
    fitting = sorted(int(b) for b in buckets if int(b) >= length)
    if not fitting:
        raise GenerationArgumentError(
            f"prompt length {length} exceeds the largest prompt bucket {max(buckets)} "
            f"(prompt_buckets={tuple(buckets)})"
        )
    return fitting[0]


def left_pad_to(prompt_ids: Array, prompt_mask: Array, length: int, pad_token_id: int):
    """Adds columns of ``pad_token_id`` (mask 0) on the left up to ``length`` columns.

    Works on numpy arrays (returns numpy) and on jax arrays / tracers (returns jax).
    """
    p = prompt_ids.shape[-1]
    if length < p:
        raise ValueError(f"cannot left-pad prompts of length {p} down to {length}")
    if length == p:
        return prompt_ids, prompt_mask
    widths = [(0, 0)] * (prompt_ids.ndim - 1) + [(length - p, 0)]
    xp = np if isinstance(prompt_ids, np.ndarray) and isinstance(prompt_mask, np.ndarray) else jnp
    ids = xp.pad(prompt_ids, widths, constant_values=pad_token_id)
    mask = xp.pad(prompt_mask, widths, constant_values=0)
    return ids, mask


def left_pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    buckets: Sequence[int] | None = None,
    bucket: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Host-side: a list of token-id lists -> left-padded ``(ids [B, P], mask [B, P])`` int32.

    With ``bucket=True`` the width ``P`` is the bucket of the longest sequence.
    Raises ``ValueError`` for an empty list or an empty sequence (index named).
    """
    if len(sequences) == 0:
        raise ValueError("left_pad_sequences: got no sequences")
    for i, s in enumerate(sequences):
        if len(s) == 0:
            raise GenerationArgumentError(f"left_pad_sequences: sequence {i} is empty (a prompt needs >= 1 token)")
    longest = max(len(s) for s in sequences)
    width = bucket_length(longest, buckets) if bucket else longest
    ids = np.full((len(sequences), width), pad_token_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = np.asarray(s, np.int32)
        mask[i, width - len(s):] = 1
    return ids, mask
