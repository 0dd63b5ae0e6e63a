"""Model shapes and workloads of the benchmark suite.

A shape is a Hugging Face config dict (``model_type`` plus the family's field names). Both sides are
built from the same dict: the PyTorch side with ``transformers.AutoConfig.for_model``, ours with
``rlhf_jax.models.ModelConfig.from_hf``, so the two can never disagree on a dimension.

A workload fixes the batch sizes and lengths of every item (the issue's numbers by default; ``micro``
is a minuscule workload for the smoke test only).
"""
from __future__ import annotations

import dataclasses
from typing import Any

# Tiny Llama shape of the issue: 4 layers, d=256, 4 heads, vocab 8192.
TINY: dict[str, Any] = dict(
    model_type="llama",
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# GPT-2 small (124M parameters), transformers' GPT2Config defaults with dropout off.
GPT2_124M: dict[str, Any] = dict(
    model_type="gpt2",
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_inner=None,
    activation_function="gelu_new",
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=True,
    bos_token_id=50256,
    eos_token_id=50256,
    pad_token_id=0,
)

# A ~1.2B Llama (Llama-3.2-1B dimensions) for accelerators only.
LLAMA_1B: dict[str, Any] = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Minuscule shape for the smoke test of the harness itself (never reported as a result).
MICRO: dict[str, Any] = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": TINY,
    "gpt2": GPT2_124M,
    "llama1b": LLAMA_1B,
    "micro": MICRO,
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """Batch sizes and lengths of every item (issue 10's numbers by default)."""

    sft_batch: int = 8
    sft_seq: int = 512
    rm_pairs: int = 8
    rm_seq: int = 512
    gen_batch: int = 16
    gen_prompt: int = 64
    gen_new: int = 128
    ppo_batch: int = 16
    ppo_prompt: int = 64
    ppo_response: int = 64
    ppo_epochs: int = 4
    ppo_minibatches: int = 1
    sweep_runs: int = 4
    sweep_iterations: int = 2
    # The RL core at an accelerator shape (item "rl", no peer): the batch shapes of the repository's
    # experiments/ppo_llama1b.py (64 prompts, 4 epochs x 4 minibatches) and grpo_llama1b.py (16 prompts
    # x G = 8, 1 epoch x 4 minibatches), 64 new tokens each, here after 64-token prompts.
    rl_ppo_prompts: int = 64
    rl_grpo_prompts: int = 16
    rl_group: int = 8
    rl_prompt: int = 64
    rl_response: int = 64
    rl_ppo_epochs: int = 4
    rl_grpo_epochs: int = 1
    rl_minibatches: int = 4


WORKLOADS: dict[str, Workload] = {
    "issue": Workload(),
    "micro": Workload(
        sft_batch=2,
        sft_seq=16,
        rm_pairs=2,
        rm_seq=16,
        gen_batch=2,
        gen_prompt=8,
        gen_new=8,
        ppo_batch=4,
        ppo_prompt=8,
        ppo_response=8,
        ppo_epochs=2,
        ppo_minibatches=1,
        sweep_runs=2,
        sweep_iterations=1,
        rl_ppo_prompts=4,
        rl_grpo_prompts=2,
        rl_group=2,
        rl_prompt=8,
        rl_response=8,
        rl_ppo_epochs=2,
        rl_grpo_epochs=1,
        rl_minibatches=2,
    ),
}


def get_shape(name: str) -> dict[str, Any]:
    """The HF config dict of shape ``name`` (a copy); raises ValueError naming the known shapes."""
    if name not in SHAPES:
        raise ValueError(f"unknown benchmark shape {name!r}; expected one of {sorted(SHAPES)}")
    return dict(SHAPES[name])


def get_workload(name: str) -> Workload:
    """The workload ``name``; raises ValueError naming the known workloads."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown benchmark workload {name!r}; expected one of {sorted(WORKLOADS)}")
    return WORKLOADS[name]
