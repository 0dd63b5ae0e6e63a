"""Tiny random Hugging Face models for parity tests (torch side; tests only).

Every test that compares rlhf_jax against `transformers` builds its reference model here, so all
packages agree on the same tiny shapes and on how the torch side is run:

    path = make_hf_model("llama", tmp_path / "llama")          # save_pretrained, safetensors
    logits = hf_logits(path, input_ids, attention_mask)         # numpy float32 [B, T, V]

Families (`FAMILIES`): gpt2, llama (GQA, untied), llama_tied, llama3 (llama3 rope_scaling), mistral,
mistral_swa (sliding window 8), qwen2 (q/k/v biases), qwen3 (q/k RMSNorm).

The random models are deliberately not at their `transformers` init: every norm weight and bias is
perturbed (HF initialises them to 1 and 0, which would hide a missing bias or norm weight), and the
weight scale is raised so that logits are O(1) and parity tolerances mean something.

`hf_logits` passes `position_ids = max(cumsum(mask) - 1, 0)` explicitly: this is how
`transformers.generate` numbers left-padded rows, and the convention rlhf_jax uses (positions count
from each row's first real token). A plain HF forward without position_ids would number pad slots.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

FAMILIES = ("gpt2", "llama", "llama_tied", "llama3", "mistral", "mistral_swa", "qwen2", "qwen3")

# Shared tiny shape: d=64, 2 layers, 4 query heads, 2 kv heads (GQA), head_dim 16, vocab 128.
_LLAMA_LIKE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def make_hf_config(family: str, **overrides: Any):
    """The `transformers` config of the tiny model of `family`, with keyword `overrides` applied.

    Overrides use the transformers field names of that family (e.g. `n_embd` for gpt2,
    `hidden_size` for llama-like families).
    """
    import transformers

    if family == "gpt2":
        kw = dict(
            vocab_size=128,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=None,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
        kw.update(overrides)
        return transformers.GPT2Config(**kw)
    kw = dict(_LLAMA_LIKE)
    if family == "llama":
        cls = transformers.LlamaConfig
    elif family == "llama_tied":
        cls = transformers.LlamaConfig
        kw["tie_word_embeddings"] = True
    elif family == "llama3":
        cls = transformers.LlamaConfig
        kw["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        kw["rope_theta"] = 500000.0
    elif family == "mistral":
        cls = transformers.MistralConfig
        kw["sliding_window"] = None
    elif family == "mistral_swa":
        cls = transformers.MistralConfig
        kw["sliding_window"] = 8
    elif family == "qwen2":
        cls = transformers.Qwen2Config
        kw.pop("head_dim")  # Qwen2 derives head_dim = hidden_size / num_attention_heads
    elif family == "qwen3":
        cls = transformers.Qwen3Config
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


def _perturb_(model, seed: int) -> None:
    """Move every norm weight and bias away from its (1, 0) init, in place, deterministically."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights and biases
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_hf_model(family: str, path, *, seed: int = 0, **overrides: Any) -> str:
    """Build the tiny random `family` model, `save_pretrained` it (safetensors) to `path`, return `path`.

    Weights are deterministic in `seed`. `overrides` go to the transformers config
    (see `make_hf_config`).
    """
    import torch
    import transformers

    config = make_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_(model, seed)
    model.eval()
    path = os.fspath(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_hf_model(path, *, cls: str = "AutoModelForCausalLM", **kwargs: Any):
    """Load a saved directory with transformers (float32, eager attention, eval mode)."""
    import torch
    import transformers

    model = getattr(transformers, cls).from_pretrained(
        os.fspath(path), dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    model.eval()
    return model


def hf_positions(attention_mask) -> np.ndarray:
    """Positions counted from each row's first real token: `max(cumsum(mask) - 1, 0)` `[B, T]`."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def hf_logits(path_or_model, input_ids, attention_mask=None) -> np.ndarray:
    """Logits `[B, T, V]` float32 of the HF model (a directory or a loaded model) on `input_ids`.

    `attention_mask` (1 = real token) defaults to all ones; rows may be left- or right-padded.
    Positions follow `hf_positions`. Logits at pad positions are whatever HF computes there;
    compare only where the mask is 1.
    """
    import torch

    model = path_or_model if hasattr(path_or_model, "forward") else load_hf_model(path_or_model)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(hf_positions(mask)),
            use_cache=False,
        )
    return out.logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, lengths, total_len: int, vocab_size: int,
                      *, pad_token_id: int = 0, low: int = 3):
    """A left-padded batch: `input_ids [B, total_len]` with random tokens in `[low, vocab)` on the
    right `lengths[b]` slots and `pad_token_id` before them; `attention_mask [B, total_len]` int32."""
    lengths = list(lengths)
    ids = np.full((len(lengths), total_len), pad_token_id, dtype=np.int32)
    mask = np.zeros((len(lengths), total_len), dtype=np.int32)
    for b, n in enumerate(lengths):
        if not 0 < n <= total_len:
            raise ValueError(f"row {b}: length {n} not in (0, {total_len}]")
        ids[b, total_len - n:] = rng.integers(low, vocab_size, size=n)
        mask[b, total_len - n:] = 1
    return ids, mask
