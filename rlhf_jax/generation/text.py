"""Strings in, strings out: ``generate_text`` for notebooks and the ``rlhf-jax generate`` CLI."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from rlhf_jax.generation.bucketing import left_pad_sequences
from rlhf_jax.generation.engine import generate
from rlhf_jax.generation.errors import GenerationArgumentError
from rlhf_jax.generation.stopping import normalize_stop_ids


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text`` for a ``transformers`` tokenizer or a raw ``tokenizers.Tokenizer``."""
    enc = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(enc.ids) if hasattr(enc, "ids") else [int(t) for t in enc]


def _special_id(tokenizer, model, name: str):
    tid = getattr(tokenizer, name, None)
    if tid is None:
        tid = getattr(model.config, name, None)
    return None if tid is None else int(tid)


def generate_text(
    model,
    params,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    rng: jax.Array | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    add_special_tokens: bool = True,
    skip_special_tokens: bool = True,
    return_output: bool = False,
) -> Any:
    """Completes each prompt string; returns the decoded responses (prompt not included).

    Prompts are tokenised one by one, left-padded into one batch (width bucketed, see
    ``bucketing``) and sampled with ``generate``. Each response is decoded up to and including
    its first stop token (``skip_special_tokens`` then drops the stop token itself).

    Defaults: ``stop_token_ids`` = the tokenizer's EOS (else the model config's), ``pad_token_id``
    = the tokenizer's pad id (else EOS, else 0), ``rng = jax.random.key(seed)``.

    Returns ``list[str]``, or ``(list[str], GenerationOutput, prompt_ids, prompt_mask)`` with
    ``return_output=True``.
    """
    if isinstance(prompts, str):
        raise TypeError("generate_text: prompts must be a list of strings, got a single str")
    prompts = list(prompts)
    if not prompts:
        raise GenerationArgumentError("generate_text: prompts is empty; give at least one prompt string")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"generate_text: prompts[{i}] must be a str, got {type(p).__name__}")
    eos = _special_id(tokenizer, model, "eos_token_id")
    if stop_token_ids is None:
        stop_token_ids = () if eos is None else (eos,)
    if pad_token_id is None:
        pad_token_id = _special_id(tokenizer, model, "pad_token_id")
        pad_token_id = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)
    seqs = [_encode(tokenizer, p, add_special_tokens) for p in prompts]
    for i, s in enumerate(seqs):
        if not s:
            raise GenerationArgumentError(f"generate_text: prompts[{i}] encodes to no tokens ({prompts[i]!r})")
        too_big = [t for t in s if t >= model.config.vocab_size]
        if too_big:
            raise GenerationArgumentError(
                f"generate_text: prompts[{i}] has token id {too_big[0]} >= the model's vocab_size "
                f"{model.config.vocab_size}: tokenizer and model do not match"
            )
    ids, mask = left_pad_sequences(seqs, pad_token_id)
    rng = jax.random.key(seed) if rng is None else rng
    out = generate(model, params, ids, mask, rng=rng, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, greedy=greedy, stop_token_ids=normalize_stop_ids(stop_token_ids),
                   pad_token_id=int(pad_token_id))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    texts = [tokenizer.decode(tokens[b, : lengths[b]].tolist(), skip_special_tokens=skip_special_tokens)
             for b in range(len(prompts))]
    if return_output:
        return texts, out, ids, mask
    return texts
