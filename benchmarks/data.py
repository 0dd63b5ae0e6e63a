"""Random batches shared by both sides (numpy, from a seed): identical inputs for ours and the peer."""
from __future__ import annotations

import numpy as np

# Ids 0..2 are pad/bos/eos in every benchmark shape; random tokens avoid them so no row stops early
# and no sequence head mistakes a token for padding.
FIRST_ID = 3


def sft_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full rows of random tokens: ``input_ids``, ``targets`` (shifted by one), masks, positions.

    Shapes ``[batch, seq]``; ``loss_mask``/``attention_mask`` all ones, ``segment_ids`` all ones
    (one document per row), ``positions`` ``0..seq-1``.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(FIRST_ID, vocab, size=(batch, seq + 1), dtype=np.int64).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    return {
        "input_ids": tokens[:, :-1].copy(),
        "targets": tokens[:, 1:].copy(),
        "loss_mask": ones.copy(),
        "attention_mask": ones.copy(),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": ones.copy(),
    }


def preference_batch(vocab: int, pairs: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``pairs`` random chosen/rejected rows of length ``seq`` (no padding) and zero margins."""
    rng = np.random.default_rng(seed)
    ones = np.ones((pairs, seq), np.int32)
    return {
        "chosen_ids": rng.integers(FIRST_ID, vocab, size=(pairs, seq)).astype(np.int32),
        "chosen_mask": ones.copy(),
        "rejected_ids": rng.integers(FIRST_ID, vocab, size=(pairs, seq)).astype(np.int32),
        "rejected_mask": ones.copy(),
        "margin": np.zeros((pairs,), np.float32),
    }


def prompts(vocab: int, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length (unpadded) random prompts: ``prompt_ids``/``prompt_mask`` ``[batch, length]``."""
    rng = np.random.default_rng(seed)
    return {
        "prompt_ids": rng.integers(FIRST_ID, vocab, size=(batch, length)).astype(np.int32),
        "prompt_mask": np.ones((batch, length), np.int32),
    }
