"""rlhf_jax.models: the Flax decoder-only transformer (GPT-2 / Llama / Mistral / Qwen2 / Qwen3 by
config), scalar heads, the KV cache and Hugging Face safetensors import/export."""

from rlhf_jax.models.architecture import (
    SUPPORTED_ARCHS,
    ModelConfig,
    UnsupportedModelError,
    check_tokenizer_compat,
    flops_per_token,
    tiny_config,
)
from rlhf_jax.models.heads import (
    CausalLMWithValueHead,
    ScalarHeadModel,
    last_token_values,
    split_value_head,
)
from rlhf_jax.models.hf_io import (
    CheckpointError,
    from_pretrained,
    hf_state_dict,
    load_config,
    save_pretrained,
)
from rlhf_jax.models.transformer import (
    CausalLM,
    KVCache,
    Transformer,
    apply_rope,
    grow_cache,
    init_cache,
    init_params,
    positions_from_mask,
    positions_from_segments,
    rope_inv_freq,
)
from rlhf_jax.models.utils import count_params

__all__ = [
    "SUPPORTED_ARCHS", "ModelConfig", "UnsupportedModelError", "check_tokenizer_compat", "flops_per_token",
    "tiny_config", "CausalLMWithValueHead", "ScalarHeadModel", "last_token_values", "split_value_head",
    "CheckpointError", "from_pretrained", "hf_state_dict", "load_config", "save_pretrained", "CausalLM",
    "KVCache", "Transformer", "apply_rope", "grow_cache", "init_cache", "init_params", "positions_from_mask",
    "positions_from_segments", "rope_inv_freq", "count_params",
]
