"""`ModelConfig`: one frozen, hashable description of every supported decoder-only family.

The families differ only in a handful of switches, all derived from `arch`:

| arch    | positions       | norm      | MLP            | biases                  | extra            |
|---------|-----------------|-----------|----------------|-------------------------|------------------|
| gpt2    | learned         | LayerNorm | GELU (tanh)    | everywhere              | tied embeddings  |
| llama   | RoPE (+llama3)  | RMSNorm   | SwiGLU         | `attention_bias` option | GQA              |
| mistral | RoPE            | RMSNorm   | SwiGLU         | none                    | sliding window   |
| qwen2   | RoPE            | RMSNorm   | SwiGLU         | q/k/v                   |                  |
| qwen3   | RoPE            | RMSNorm   | SwiGLU         | `attention_bias` option | q/k RMSNorm      |

`ModelConfig.from_hf(config_dict)` reads a Hugging Face `config.json` (both the transformers 4.x
`rope_theta`/`rope_scaling` keys and the 5.x `rope_parameters` key); `to_hf()` writes one that
`transformers.AutoConfig` reads back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from rlhf_jax.config import ConfigError
from rlhf_jax.errors import UserError

SUPPORTED_ARCHS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")

_HF_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_HF_SEQ_CLS = {
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
}
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu", "swish")
_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(UserError, ValueError):
    """The checkpoint's architecture or one of its options is not implemented here."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, malformed, or does not match its config (names the key)."""


_REQUIRED = object()


def _hf_int(hf: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> int:
    """``config.json`` field ``key`` as a positive int (``default`` when absent or null)."""
    v = hf.get(key)
    if v is None:
        if default is _REQUIRED:
            raise CheckpointError(f"config.json: missing required field {key!r}")
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
        raise CheckpointError(f"config.json: field {key!r}: expected a positive integer, got {v!r}")
    return int(v)


def _hf_float(hf: Mapping[str, Any], key: str, default: float) -> float:
    """``config.json`` field ``key`` as a float (``default`` when absent or null)."""
    v = hf.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CheckpointError(f"config.json: field {key!r}: expected a number, got {v!r}")
    return float(v)


def _dtype_name(value: Any, field: str) -> str:
    try:
        return jnp.dtype(value).name
    except TypeError as e:
        raise ValueError(f"ModelConfig.{field}: {value!r} is not a dtype") from e


def _freeze_mapping(value: Any, field: str):
    if value is None:
        return None
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze_value(v)) for k, v in value.items()))
    if isinstance(value, tuple) and all(isinstance(kv, tuple) and len(kv) == 2 for kv in value):
        return tuple(sorted(value))
    raise ValueError(f"ModelConfig.{field}: expected a dict or None, got {value!r}")


def _freeze_value(v: Any):
    if isinstance(v, list):
        return tuple(v)
    return v


def _gpt2_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of a GPT-2 ``config.json``."""
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise UnsupportedModelError("config.json: gpt2 option scale_attn_by_inverse_layer_idx=True is not supported")
    if hf.get("scale_attn_weights") is False:
        raise UnsupportedModelError("config.json: gpt2 option scale_attn_weights=False is not supported")
    d = _hf_int(hf, "n_embd")
    h = _hf_int(hf, "n_head")
    return dict(
        arch="gpt2",
        vocab_size=_hf_int(hf, "vocab_size"),
        hidden_size=d,
        num_layers=_hf_int(hf, "n_layer"),
        num_heads=h,
        num_kv_heads=h,
        head_dim=d // h,
        intermediate_size=_hf_int(hf, "n_inner", 4 * d),
        max_position_embeddings=_hf_int(hf, "n_positions"),
        norm_eps=_hf_float(hf, "layer_norm_epsilon", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        hidden_act=hf.get("activation_function", "gelu_new"),
    )


def _decoder_fields(hf: Mapping[str, Any], mtype: str) -> dict[str, Any]:
    """The ModelConfig fields of a Llama/Mistral/Qwen2/Qwen3 ``config.json``."""
    d = _hf_int(hf, "hidden_size")
    h = _hf_int(hf, "num_attention_heads")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling")
    if legacy:
        rope.update(legacy)
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if rope_type == "default" else rope
    if mtype in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise UnsupportedModelError(
            f"config.json: {mtype} with use_sliding_window=True (per-layer windows) is not supported"
        )
    sliding = hf.get("sliding_window") if mtype == "mistral" else None
    attn_bias = bool(hf.get("attention_bias", False))
    kw = dict(
        arch=mtype,
        vocab_size=_hf_int(hf, "vocab_size"),
        hidden_size=d,
        num_layers=_hf_int(hf, "num_hidden_layers"),
        num_heads=h,
        num_kv_heads=_hf_int(hf, "num_key_value_heads", h),
        head_dim=_hf_int(hf, "head_dim", d // h),
        intermediate_size=_hf_int(hf, "intermediate_size"),
        max_position_embeddings=_hf_int(hf, "max_position_embeddings", 2048),
        norm_eps=_hf_float(hf, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if mtype == "qwen2" else attn_bias,
        attention_out_bias=False if mtype in ("qwen2", "mistral") else attn_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if mtype == "llama" else False,
        qk_norm=mtype == "qwen3",
        sliding_window=int(sliding) if sliding else None,
        hidden_act=hf.get("hidden_act", "silu"),
    )
    if kw["hidden_act"] not in ("silu", "swish"):
        raise UnsupportedModelError(
            f"config.json: hidden_act {kw['hidden_act']!r} is not supported for {mtype} (expected silu)"
        )
    return kw


REMAT_POLICIES = ("full", "dots_saveable")
# how full-sequence forwards (training, scoring, prefill without a cache) compute attention; see
# `models.transformer.attention` and docs/USAGE.md ("Attention implementation")
ATTENTION_IMPLS = ("xla", "blocked", "cudnn", "auto")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder-only transformer (hashable: usable as a static jit arg).

    `dtype` is the compute dtype (activations, matmul inputs); `param_dtype` the storage dtype of the
    parameters. Both are stored as dtype names ("float32", "bfloat16"); any dtype-like is accepted.
    `rope_scaling` is stored as a sorted tuple of (key, value) pairs; `rope_scaling_dict` gives a dict.
    `remat=True` rematerialises each layer's activations in the backward pass (`nn.remat`).
    """

    arch: str = "llama"
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    max_position_embeddings: int = 64
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v
    attention_out_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: bool = False
    initializer_range: float = 0.02
    # what a rematerialised layer keeps for the backward pass: "full" (nothing: recompute the whole layer)
    # or "dots_saveable" (the matmul outputs; recompute only the elementwise work)
    remat_policy: str = "full"
    # > 0: the RL policy's log-probs/entropy are computed over the response in chunks of this many tokens,
    # each chunk's [B, c, V] logits recomputed in the backward pass, so [B, N, V] is never whole
    logits_chunk: int = 0
    # attention of full-sequence forwards: "xla" (one masked einsum over [T, S]), "blocked" (query x key
    # blocks of `attention_block` with an online softmax, fully masked blocks skipped), "cudnn"
    # (jax.nn.dot_product_attention's cuDNN kernel, GPU only) or "auto" (cudnn on a GPU where it
    # applies, blocked on CPU from T >= 2 * attention_block, else xla). The KV-cache decode path is
    # unaffected. A framework option, not a Hugging Face field: `to_hf` does not write it.
    attention_impl: str = "xla"
    attention_block: int = 64

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("dtype", _dtype_name(self.dtype, "dtype"))
        set_("param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
        set_("rope_scaling", _freeze_mapping(self.rope_scaling, "rope_scaling"))
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"ModelConfig.arch: unsupported architecture {self.arch!r}; supported: {SUPPORTED_ARCHS}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{name}: expected a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise UnsupportedModelError(
                f"ModelConfig.hidden_act: unsupported activation {self.hidden_act!r}; supported: {_ACTIVATIONS}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window: expected None or > 0, got {self.sliding_window}")
        rs = self.rope_scaling_dict
        if rs is not None:
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rtype not in _ROPE_TYPES:
                raise UnsupportedModelError(
                    f"ModelConfig.rope_scaling: unsupported rope_type {rtype!r}; supported: {_ROPE_TYPES}"
                )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat_policy: expected one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if isinstance(self.logits_chunk, bool) or not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
            raise ValueError(f"ModelConfig.logits_chunk: expected an int >= 0, got {self.logits_chunk!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"ModelConfig.attention_impl (config key model.attention_impl / policy.attention_impl): "
                              f"expected one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if (isinstance(self.attention_block, bool) or not isinstance(self.attention_block, int)
                or self.attention_block < 8):
            raise ConfigError(f"ModelConfig.attention_block (config key model.attention_block / policy.attention_block): "
                              f"expected an int >= 8 (the query/key tile of the blocked attention), got "
                              f"{self.attention_block!r}")
        if self.arch != "gpt2" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim: RoPE needs an even head_dim, got {self.head_dim}")

    # ---- derived switches -------------------------------------------------------------------
    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def learned_positions(self) -> bool:
        return self.arch == "gpt2"

    @property
    def norm_type(self) -> str:
        return "layernorm" if self.arch == "gpt2" else "rmsnorm"

    @property
    def gated_mlp(self) -> bool:
        return self.arch != "gpt2"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; `overrides` (e.g. dtype) replace fields.

        Raises `UnsupportedModelError` naming `model_type` for an unsupported architecture and
        naming the option for an unsupported option (e.g. a rope type, Qwen's per-layer windows).
        """
        hf = dict(hf)
        mtype = hf.get("model_type")
        if mtype not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"config.json: unsupported model_type {mtype!r} (architectures={hf.get('architectures')}); "
                f"supported: {SUPPORTED_ARCHS}"
            )
        common = dict(
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
            pad_token_id=_first_id(hf.get("pad_token_id")),
            initializer_range=_hf_float(hf, "initializer_range", 0.02),
        )
        kw = _gpt2_fields(hf) if mtype == "gpt2" else _decoder_fields(hf, mtype)
        kw.update(common)
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """A Hugging Face `config.json` dict for this config (architectures = the CausalLM class)."""
        ids = dict(bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                   pad_token_id=self.pad_token_id)
        if self.arch == "gpt2":
            if not (self.attention_bias and self.attention_out_bias and self.mlp_bias):
                raise ValueError("ModelConfig.to_hf: gpt2 requires attention_bias, attention_out_bias and mlp_bias")
            if self.num_kv_heads != self.num_heads or self.head_dim * self.num_heads != self.hidden_size:
                raise ValueError("ModelConfig.to_hf: gpt2 requires num_kv_heads == num_heads and head_dim*num_heads == hidden_size")
            return dict(
                model_type="gpt2",
                architectures=[_HF_ARCHITECTURES["gpt2"]],
                vocab_size=self.vocab_size,
                n_positions=self.max_position_embeddings,
                n_embd=self.hidden_size,
                n_layer=self.num_layers,
                n_head=self.num_heads,
                n_inner=self.intermediate_size,
                activation_function=self.hidden_act,
                layer_norm_epsilon=self.norm_eps,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                initializer_range=self.initializer_range,
                tie_word_embeddings=self.tie_word_embeddings,
                **ids,
            )
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling_dict)
        out = dict(
            model_type=self.arch,
            architectures=[_HF_ARCHITECTURES[self.arch]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_eps,
            hidden_act=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta/rope_scaling.
            rope_parameters=rope,
            rope_theta=self.rope_theta,
            rope_scaling=None if self.rope_scaling is None else self.rope_scaling_dict,
            **ids,
        )
        if self.arch == "qwen2":
            if not self.attention_bias or self.attention_out_bias:
                raise ValueError("ModelConfig.to_hf: qwen2 has q/k/v biases and no output bias")
            out["use_sliding_window"] = False
        elif self.arch == "mistral":
            if self.attention_bias or self.attention_out_bias:
                raise ValueError("ModelConfig.to_hf: mistral has no attention biases")
            out["sliding_window"] = self.sliding_window
        else:
            if self.attention_bias != self.attention_out_bias:
                raise ValueError(f"ModelConfig.to_hf: {self.arch} uses one attention_bias for q/k/v/o")
            out["attention_bias"] = self.attention_bias
            if self.arch == "qwen3":
                out["use_sliding_window"] = False
        if self.arch == "llama":
            out["mlp_bias"] = self.mlp_bias
        elif self.mlp_bias:
            raise ValueError(f"ModelConfig.to_hf: {self.arch} has no MLP biases")
        if self.qk_norm != (self.arch == "qwen3"):
            raise ValueError(f"ModelConfig.to_hf: qk_norm={self.qk_norm} is not expressible for {self.arch}")
        if self.sliding_window is not None and self.arch != "mistral":
            raise ValueError(f"ModelConfig.to_hf: sliding_window is only expressible for mistral, not {self.arch}")
        return out


def _first_id(v):
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def tiny_config(**overrides) -> ModelConfig:
    """A tiny Llama-style config for tests and CPU demos (d=64, 2 layers, 4 heads, 2 kv heads, vocab 128).

    For another family pass `arch=...`; the family's fixed switches (biases, q/k norm, tied
    embeddings for gpt2) are filled in unless given explicitly.
    """
    arch = overrides.get("arch", "llama")
    base: dict[str, Any] = dict(arch=arch)
    if arch == "gpt2":
        base.update(attention_bias=True, attention_out_bias=True, mlp_bias=True, tie_word_embeddings=True,
                    hidden_act="gelu_new", num_kv_heads=4, norm_eps=1e-5, intermediate_size=256)
    elif arch == "qwen2":
        base.update(attention_bias=True)
    elif arch == "qwen3":
        base.update(qk_norm=True)
    base.update(overrides)
    return ModelConfig(**base)


def flops_per_token(config: ModelConfig, seq_len: int, *, training: bool = True, lm_head: bool = True) -> float:
    """Model FLOPs per token (the MFU numerator): PaLM appendix B with the attention term halved for causality.

    With N the number of matmul parameters (excluding the input embedding table, including the
    output projection even when tied; ``lm_head=False`` for a scalar-head model -- reward, value --
    which does not run it: its ``d x 1`` head is negligible) and a context of `seq_len`:

        training:  6 N + 12 L H Dh T / 2   (forward + backward, causal attention scores and values)
        inference: 2 N +  4 L H Dh T / 2

    The attention term counts q·k and p·v for a causal mask (half of the T×T products on average).
    """
    if seq_len <= 0:
        raise ValueError(f"flops_per_token: seq_len must be > 0, got {seq_len}")
    c = config
    d, hd = c.hidden_size, c.head_dim
    attn = d * hd * (c.num_heads + 2 * c.num_kv_heads) + c.num_heads * hd * d
    mlp = (3 if c.gated_mlp else 2) * d * c.intermediate_size
    n_matmul = c.num_layers * (attn + mlp) + (d * c.vocab_size if lm_head else 0)
    attn_term = c.num_layers * c.num_heads * hd * seq_len / 2
    if training:
        return 6.0 * n_matmul + 12.0 * attn_term
    return 2.0 * n_matmul + 4.0 * attn_term


def check_tokenizer_compat(config: ModelConfig, tokenizer) -> None:
    """Raise ValueError unless `tokenizer` (a HF tokenizer) fits the model's embedding table.

    Every id the tokenizer can produce (`len(tokenizer)`, incl. added tokens) must be < vocab_size
    (a larger, padded embedding table is fine), and its pad/eos/bos ids must lie in the table.
    """
    n = len(tokenizer)
    if n > config.vocab_size:
        raise ValueError(
            f"tokenizer/model vocab mismatch: the tokenizer has {n} tokens (ids up to {n - 1}) but the "
            f"model's embedding table has vocab_size={config.vocab_size} rows"
        )
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None and not 0 <= int(tid) < config.vocab_size:
            raise ValueError(
                f"tokenizer {name}={tid} is outside the model's vocab_size={config.vocab_size}"
            )

