"""Collation of tokenised examples into static-shape numpy batches (layouts in docs/DESIGN.md).

All ids and masks are ``int32``; masks are 0/1. Rows beyond the real examples of a final
partial batch are padding rows (``example_mask`` 0, every token mask 0). Lengths come from a
fixed set of buckets (:func:`length_buckets`) so a training step compiles a bounded number of
times.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_length``, then ``max_length`` itself."""
    out = []
    b = smallest
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)


def fit_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``n``."""
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


def sft_batch(rows: Sequence[Sequence[dict[str, np.ndarray]]], batch_size: int, seq_len: int,
              pad_id: int) -> dict[str, np.ndarray]:
    """SFT batch from rows of (packed) examples ``{"ids", "loss"}``.

    Row ``b`` holds its examples one after another as segments 1, 2, ... (0 = padding):
    ``input_ids [B,L]``; ``targets[b,t] = input_ids[b,t+1]`` when position ``t+1`` is in the same
    segment, else ``pad_id``; ``loss_mask[b,t] = loss[t+1]`` under the same condition (so the first
    token of a segment is never the target of the previous one, and a segment's last token predicts
    nothing); ``attention_mask = segment_ids > 0``; ``positions`` restart at 0 in every segment.
    """
    shape = (batch_size, seq_len)
    input_ids = np.full(shape, pad_id, np.int32)
    token_loss = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows for batch_size {batch_size}")
    for b, row in enumerate(rows):
        t = 0
        for s, ex in enumerate(row, start=1):
            n = len(ex["ids"])
            if t + n > seq_len:
                raise ValueError(f"row {b} overflows seq_len {seq_len}")
            input_ids[b, t:t + n] = ex["ids"]
            token_loss[b, t:t + n] = ex["loss"]
            segment_ids[b, t:t + n] = s
            positions[b, t:t + n] = np.arange(n)
            t += n
    same_next = np.zeros(shape, bool)
    same_next[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    targets = np.where(same_next, np.roll(input_ids, -1, axis=1), pad_id).astype(np.int32)
    loss_mask = np.where(same_next, np.roll(token_loss, -1, axis=1), 0).astype(np.int32)
    return {
        "input_ids": input_ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "attention_mask": (segment_ids > 0).astype(np.int32),
        "positions": positions,
        "segment_ids": segment_ids,
    }


def _right_pad(seqs: Sequence[np.ndarray], batch_size: int, length: int, pad_id: int):
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def _response_mask(lengths: Sequence[int], prompt_lens: Sequence[int], batch_size: int, length: int):
    out = np.zeros((batch_size, length), np.int32)
    for i, (n, p) in enumerate(zip(lengths, prompt_lens)):
        out[i, p:n] = 1
    return out


def row_info(examples, batch_size):
    """`example_mask [B]` (1 on real rows) and `example_index [B]` (source row, -1 on padding)."""
    example_mask = np.zeros((batch_size,), np.int32)
    example_mask[:len(examples)] = 1
    index = np.full((batch_size,), -1, np.int64)
    index[:len(examples)] = [ex.get("index", -1) for ex in examples]
    return example_mask, index


def preference_batch(examples: Sequence[dict[str, Any]], batch_size: int, buckets: Sequence[int],
                     pad_id: int) -> dict[str, np.ndarray]:
    """``chosen_ids/chosen_mask/rejected_ids/rejected_mask [B,L]`` = prompt + response + EOS,
    right-padded to one bucket ``L`` for both sides; ``chosen_loss_mask/rejected_loss_mask [B,L]``
    1 on response tokens (for DPO log-probs); ``margin [B]`` float32; ``example_mask [B]``;
    ``example_index [B]`` (source row, -1 on padding rows)."""
    longest = max([len(ex["chosen"]) for ex in examples] + [len(ex["rejected"]) for ex in examples] + [1])
    L = fit_bucket(longest, buckets)
    c_ids, c_mask = _right_pad([ex["chosen"] for ex in examples], batch_size, L, pad_id)
    r_ids, r_mask = _right_pad([ex["rejected"] for ex in examples], batch_size, L, pad_id)
    plens = [ex["prompt_len"] for ex in examples]
    margin = np.zeros((batch_size,), np.float32)
    margin[:len(examples)] = [ex["margin"] for ex in examples]
    example_mask, index = row_info(examples, batch_size)
    return {
        "chosen_ids": c_ids, "chosen_mask": c_mask,
        "rejected_ids": r_ids, "rejected_mask": r_mask,
        "chosen_loss_mask": _response_mask([len(ex["chosen"]) for ex in examples], plens, batch_size, L),
        "rejected_loss_mask": _response_mask([len(ex["rejected"]) for ex in examples], plens, batch_size, L),
        "margin": margin, "example_mask": example_mask, "example_index": index,
    }


def ranking_batch(examples: Sequence[dict[str, Any]], batch_size: int, buckets: Sequence[int],
                  pad_id: int, num_responses: int | None = None) -> dict[str, np.ndarray]:
    """``response_ids/response_mask/response_loss_mask [B,K,L]`` (prompt + response_k + EOS,
    right-padded), ``ranks [B,K]`` (0 = best, 0..K_b-1 on real slots, 0 on padding slots),
    ``rank_mask [B,K]`` (1 on real responses), ``example_mask [B]``, ``example_index [B]``.
    ``K = num_responses`` (static) or the largest K in the batch."""
    k_max = max([len(ex["responses"]) for ex in examples] + [2])
    K = num_responses or k_max
    if k_max > K:
        raise ValueError(f"a row has {k_max} responses but num_responses={K}")
    longest = max([len(s) for ex in examples for s in ex["responses"]] + [1])
    L = fit_bucket(longest, buckets)
    ids = np.full((batch_size, K, L), pad_id, np.int32)
    mask = np.zeros((batch_size, K, L), np.int32)
    loss = np.zeros((batch_size, K, L), np.int32)
    ranks = np.zeros((batch_size, K), np.int32)
    rank_mask = np.zeros((batch_size, K), np.int32)
    for b, ex in enumerate(examples):
        for k, s in enumerate(ex["responses"]):
            ids[b, k, :len(s)] = s
            mask[b, k, :len(s)] = 1
            loss[b, k, ex["prompt_len"]:len(s)] = 1
        nk = len(ex["responses"])
        ranks[b, :nk] = ex["ranks"]
        rank_mask[b, :nk] = 1
    example_mask, index = row_info(examples, batch_size)
    return {"response_ids": ids, "response_mask": mask, "response_loss_mask": loss, "ranks": ranks,
            "rank_mask": rank_mask, "example_mask": example_mask, "example_index": index}


def prompt_batch(examples: Sequence[dict[str, Any]], batch_size: int, buckets: Sequence[int],
                 pad_id: int) -> dict[str, np.ndarray]:
    """``prompt_ids/prompt_mask [B,P]`` LEFT-padded (real tokens at the end of each row, as the
    generation engine expects), ``example_mask [B]``, ``example_index [B]``. Padding rows are all
    pad with mask 0."""
    longest = max([len(ex["ids"]) for ex in examples] + [1])
    P = fit_bucket(longest, buckets)
    ids = np.full((batch_size, P), pad_id, np.int32)
    mask = np.zeros((batch_size, P), np.int32)
    for i, ex in enumerate(examples):
        n = len(ex["ids"])
        ids[i, P - n:] = ex["ids"]
        mask[i, P - n:] = 1
    example_mask, index = row_info(examples, batch_size)
    return {"prompt_ids": ids, "prompt_mask": mask, "example_mask": example_mask,
            "example_index": index}
