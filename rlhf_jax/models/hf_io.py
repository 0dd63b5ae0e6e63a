"""Hugging Face checkpoint import/export through safetensors (no torch, no pickle, no remote code).

`from_pretrained(dir)` reads `config.json` and `model.safetensors` or a sharded
`model.safetensors.index.json`; `save_pretrained(dir, model, params)` writes a directory that
`transformers.AutoModelForCausalLM` (or `AutoModelForSequenceClassification` for a scalar head)
loads with the same logits.

Weight layout conversion (torch `nn.Linear.weight` is `[out, in]`; GPT-2's `Conv1D.weight` is `[in, out]`):

    q_proj.weight [H·Dh, D]  <->  q_proj/kernel [D, H, Dh]        (transpose, split heads)
    o_proj.weight [D, H·Dh]  <->  o_proj/kernel [H, Dh, D]
    gate/up_proj.weight [F, D] <-> kernel [D, F];  down_proj.weight [D, F] <-> kernel [F, D]
    lm_head.weight [V, D]    <->  lm_head/kernel [D, V];   score.weight [1, D] <-> score/kernel [D, 1]
    gpt2 c_attn.weight [D, 3D] <-> q/k/v_proj kernels (split along the output axis)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rlhf_jax import devices as devices_lib
from rlhf_jax.config import ConfigError
from rlhf_jax.models.architecture import _HF_SEQ_CLS, CheckpointError, ModelConfig, UnsupportedModelError
from rlhf_jax.models.heads import CausalLMWithValueHead, ScalarHeadModel, head_init
from rlhf_jax.models.transformer import CausalLM, init_params

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
VALUE_HEAD_KEYS = ("v_head.summary.weight", "v_head.summary.bias")  # TRL's AutoModelForCausalLMWithValueHead


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor <-> one or more leaves of our param tree."""

    hf_key: str
    hf_shape: tuple
    paths: tuple  # tuple of param paths (tuples of str)
    to_ours: Callable[[np.ndarray], Sequence[np.ndarray]]
    to_hf: Callable[..., np.ndarray]


def _linear(key, out_dim, in_dim, path, kshape):
    """torch Linear weight [out, in] <-> kernel `kshape` (= in-dims + out-dims)."""
    return _Entry(key, (out_dim, in_dim), (path,),
                  lambda w: (w.T.reshape(kshape),),
                  lambda k: k.reshape(in_dim, out_dim).T)


def _out_linear(key, out_dim, in_shape, path):
    """torch Linear weight [out, prod(in_shape)] <-> kernel [*in_shape, out]."""
    n_in = int(np.prod(in_shape))
    return _Entry(key, (out_dim, n_in), (path,),
                  lambda w: (w.T.reshape(*in_shape, out_dim),),
                  lambda k: k.reshape(n_in, out_dim).T)


def _same(key, shape, path, our_shape=None):
    our_shape = tuple(shape) if our_shape is None else tuple(our_shape)
    return _Entry(key, tuple(shape), (path,),
                  lambda w: (w.reshape(our_shape),),
                  lambda p: p.reshape(shape))


def _trunk_entries(c: ModelConfig, prefix: str, root: str = "model") -> list[_Entry]:
    d, h, kv, dh, f, v = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    es: list[_Entry] = []
    if c.arch == "gpt2":
        p = prefix
        es.append(_same(p + "wte.weight", (v, d), (root, "embed", "embedding")))
        es.append(_same(p + "wpe.weight", (c.max_position_embeddings, d), (root, "pos_embed", "embedding")))
        for i in range(c.num_layers):
            lp, tp = f"{p}h.{i}.", (root, f"layers_{i}")
            for hf_n, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                es.append(_same(lp + hf_n + ".weight", (d,), tp + (ours, "scale")))
                es.append(_same(lp + hf_n + ".bias", (d,), tp + (ours, "bias")))
            qkv_paths = tuple(tp + ("attn", n, "kernel") for n in ("q_proj", "k_proj", "v_proj"))
            es.append(_Entry(lp + "attn.c_attn.weight", (d, 3 * d), qkv_paths,
                             lambda w, d=d, h=h, dh=dh: tuple(x.reshape(d, h, dh) for x in np.split(w, 3, axis=1)),
                             lambda q, k, vv, d=d: np.concatenate([x.reshape(d, -1) for x in (q, k, vv)], axis=1)))
            qkv_bias = tuple(tp + ("attn", n, "bias") for n in ("q_proj", "k_proj", "v_proj"))
            es.append(_Entry(lp + "attn.c_attn.bias", (3 * d,), qkv_bias,
                             lambda b, h=h, dh=dh: tuple(x.reshape(h, dh) for x in np.split(b, 3)),
                             lambda q, k, vv: np.concatenate([x.reshape(-1) for x in (q, k, vv)])))
            es.append(_same(lp + "attn.c_proj.weight", (h * dh, d), tp + ("attn", "o_proj", "kernel"), (h, dh, d)))
            es.append(_same(lp + "attn.c_proj.bias", (d,), tp + ("attn", "o_proj", "bias")))
            es.append(_same(lp + "mlp.c_fc.weight", (d, f), tp + ("mlp", "up_proj", "kernel")))
            es.append(_same(lp + "mlp.c_fc.bias", (f,), tp + ("mlp", "up_proj", "bias")))
            es.append(_same(lp + "mlp.c_proj.weight", (f, d), tp + ("mlp", "down_proj", "kernel")))
            es.append(_same(lp + "mlp.c_proj.bias", (d,), tp + ("mlp", "down_proj", "bias")))
        es.append(_same(p + "ln_f.weight", (d,), (root, "final_norm", "scale")))
        es.append(_same(p + "ln_f.bias", (d,), (root, "final_norm", "bias")))
        return es
    p = prefix
    es.append(_same(p + "embed_tokens.weight", (v, d), (root, "embed", "embedding")))
    for i in range(c.num_layers):
        lp, tp = f"{p}layers.{i}.", (root, f"layers_{i}")
        es.append(_same(lp + "input_layernorm.weight", (d,), tp + ("attn_norm", "scale")))
        es.append(_same(lp + "post_attention_layernorm.weight", (d,), tp + ("mlp_norm", "scale")))
        a = lp + "self_attn."
        for n, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            es.append(_linear(a + n + ".weight", heads * dh, d, tp + ("attn", n, "kernel"), (d, heads, dh)))
            if c.attention_bias:
                es.append(_same(a + n + ".bias", (heads * dh,), tp + ("attn", n, "bias"), (heads, dh)))
        es.append(_out_linear(a + "o_proj.weight", d, (h, dh), tp + ("attn", "o_proj", "kernel")))
        if c.attention_out_bias:
            es.append(_same(a + "o_proj.bias", (d,), tp + ("attn", "o_proj", "bias")))
        if c.qk_norm:
            es.append(_same(a + "q_norm.weight", (dh,), tp + ("attn", "q_norm", "scale")))
            es.append(_same(a + "k_norm.weight", (dh,), tp + ("attn", "k_norm", "scale")))
        m = lp + "mlp."
        for n, (o, i_) in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            es.append(_linear(m + n + ".weight", o, i_, tp + ("mlp", n, "kernel"), (i_, o)))
            if c.mlp_bias:
                es.append(_same(m + n + ".bias", (o,), tp + ("mlp", n, "bias")))
    es.append(_same(p + "norm.weight", (d,), (root, "final_norm", "scale")))
    return es


def _base_prefix(c: ModelConfig) -> str:
    return "transformer." if c.arch == "gpt2" else "model."


def _lm_head_entry(c: ModelConfig) -> _Entry:
    return _linear("lm_head.weight", c.vocab_size, c.hidden_size, ("lm_head", "kernel"), (c.hidden_size, c.vocab_size))


def _score_entry(c: ModelConfig) -> _Entry:
    return _linear("score.weight", 1, c.hidden_size, ("score", "kernel"), (c.hidden_size, 1))


def _value_entries(c: ModelConfig) -> list[_Entry]:
    return [
        _linear(VALUE_HEAD_KEYS[0], 1, c.hidden_size, ("value_head", "kernel"), (c.hidden_size, 1)),
        _same(VALUE_HEAD_KEYS[1], (1,), ("value_head", "bias")),
    ]


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
class _SafetensorsReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint directory."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, SAFE_INDEX)
        single = os.path.join(path, SAFE_SINGLE)
        if os.path.exists(index):
            weight_map = _read_json(index, "a safetensors index with a 'weight_map' object")
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: not a valid safetensors index (need a 'weight_map' object)")
            for key, fname in weight_map.items():
                if os.path.basename(fname) != fname or not fname.endswith(".safetensors"):
                    raise CheckpointError(f"{index}: weight {key!r} maps to {fname!r}, expected a .safetensors file name in {path}")
            self.files = {k: os.path.join(path, f) for k, f in weight_map.items()}
            for f in sorted(set(self.files.values())):
                if not os.path.exists(f):
                    raise CheckpointError(f"{index}: shard {os.path.basename(f)} is listed but missing from {path}")
        elif os.path.exists(single):
            self._open: dict[str, Any] = {}
            self.files = {k: single for k in self._file(single).keys()}
        else:
            present = sorted(os.listdir(path)) if os.path.isdir(path) else []
            pickles = [f for f in present if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
            hint = (f"; found {pickles}: pickle checkpoints are never read, only safetensors; convert "
                    "with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                    "safe_serialization=True)") if pickles else ""
            raise CheckpointError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX}{hint}")
        self._open = {}

    def _file(self, fname: str):
        """The open safetensors file ``fname``; a truncated or corrupt one is a CheckpointError."""
        if fname not in self._open:
            try:
                self._open[fname] = safe_open(fname, framework="flax")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{fname}: not a readable safetensors file ({e}); the file is "
                                      "truncated or corrupt: copy or save it again") from None
        return self._open[fname]

    def keys(self):
        return self.files.keys()

    def get(self, key: str) -> np.ndarray:
        fname = self.files[key]
        try:
            return np.asarray(self._file(fname).get_tensor(key))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{fname}: cannot read tensor {key!r} ({e}); the file is truncated or "
                                  "corrupt: copy or save it again") from None

    def shape(self, key: str) -> tuple:
        fname = self.files[key]
        return tuple(self._file(fname).get_slice(key).get_shape())


def _set_path(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            raise KeyError("/".join(path))
        tree = tree[k]
    return tree


def _load_entries(reader: _SafetensorsReader, entries: list[_Entry], param_dtype, config_file: str) -> dict:
    tree: dict = {}
    for e in entries:
        if e.hf_key not in reader.files:
            raise CheckpointError(
                f"{reader.path}: missing weight {e.hf_key!r} (expected shape {list(e.hf_shape)} from {config_file})"
            )
        shape = reader.shape(e.hf_key)
        if shape != e.hf_shape:
            raise CheckpointError(
                f"{reader.path}: weight {e.hf_key!r} has shape {list(shape)} but {config_file} implies {list(e.hf_shape)}"
            )
        for path, arr in zip(e.paths, e.to_ours(reader.get(e.hf_key))):
            _set_path(tree, path, jnp.asarray(arr, dtype=param_dtype))
    return tree


# Non-parameter buffers some checkpoints carry; never weights of the model.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
# Head tensors a trunk checkpoint may or may not carry, depending on the head it was saved with.
_HEAD_KEYS = ("lm_head.weight", "score.weight", "score.bias") + VALUE_HEAD_KEYS


def _check_unexpected(reader: _SafetensorsReader, entries: list[_Entry], prefix: str, config_file: str) -> None:
    """Trunk tensors that the config does not describe (e.g. more layers than `num_hidden_layers`)
    mean the config and the weights disagree: refuse rather than silently drop weights."""
    used = {e.hf_key for e in entries}
    extra = sorted(
        k for k in reader.keys()
        if k not in used and k not in _HEAD_KEYS and not k.endswith(_IGNORED_SUFFIXES) and k.startswith(prefix)
    )
    if extra:
        shown = ", ".join(repr(k) for k in extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        raise CheckpointError(
            f"{reader.path}: {len(extra)} weight(s) not described by {config_file}: {shown}; "
            "do the architecture and layer/head counts in config.json match the checkpoint?"
        )


def _read_json(file: str, what: str) -> Any:
    """The JSON value in ``file`` (UTF-8, a byte-order mark allowed), or a CheckpointError naming
    the file and, for a syntax error, the line and column."""
    try:
        with open(file, "rb") as fh:
            text = fh.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not UTF-8 text (byte {e.start}: {e.reason}); expected {what}") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read {what}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                              f"expected {what}") from None


def load_config(path: str, **overrides) -> ModelConfig:
    """`ModelConfig` from `path/config.json` (raises `CheckpointError`/`UnsupportedModelError` naming the file)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise CheckpointError(f"model directory {path} {what}; expected a Hugging Face model directory "
                              "(config.json + model.safetensors)")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        present = sorted(os.listdir(path))
        shown = ", ".join(present[:8]) + (f" (+{len(present) - 8} more)" if len(present) > 8 else "")
        raise CheckpointError(f"{path}: no config.json in this model directory (it holds: {shown or 'nothing'}); "
                              "expected a Hugging Face model directory (config.json + model.safetensors)")
    hf = _read_json(cfg_file, "a Hugging Face config.json object")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(hf).__name__}")
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except (UnsupportedModelError, CheckpointError) as e:
        raise type(e)(f"{cfg_file}: {str(e).removeprefix('config.json: ')}") from e
    except ConfigError:  # a framework option passed as an override (attention_impl, ...): names its key
        raise
    except ValueError as e:  # ModelConfig's own checks of the values read (names the field)
        raise CheckpointError(f"{cfg_file}: {e}") from e


def from_pretrained(path, *, dtype=jnp.float32, param_dtype=jnp.float32, head: str | None = None,
                    rng: jax.Array | None = None, remat: bool = False, **config_overrides):
    """Load a Hugging Face model directory -> `(model, params)`.

    head=None: `CausalLM` (needs the LM head, or tied embeddings).
    head="scalar": `ScalarHeadModel`; loads `score.weight` when the checkpoint has it (a saved reward
      model / `XxxForSequenceClassification`), else initialises a fresh head from `rng` (an LM
      checkpoint: the usual way to start a reward or value model).
    head="value": `CausalLMWithValueHead`; LM head loaded, value head loaded from
      `v_head.summary.*` (TRL's layout) when present, else fresh from `rng`.
    `dtype` is the compute dtype, `param_dtype` the storage dtype of the returned params.
    Unused checkpoint tensors (e.g. the LM head when loading a scalar head) are ignored.
    In a plan (`rlhf_jax.devices.abstract()`, traced under `jax.eval_shape`) only `config.json` is
    read: the params are the model's initialisation, which has the checkpoint's shapes, and no weight
    file is opened.
    """
    path = os.fspath(path)
    if head not in (None, "scalar", "value"):
        raise ValueError(f"from_pretrained: head must be None, 'scalar' or 'value', got {head!r}")
    config = load_config(path, dtype=dtype, param_dtype=param_dtype, remat=remat, **config_overrides)
    if devices_lib.abstract():
        model = {None: CausalLM, "scalar": ScalarHeadModel, "value": CausalLMWithValueHead}[head](config)
        return model, init_params(model, jax.random.PRNGKey(0) if rng is None else rng)
    reader = _SafetensorsReader(path)
    keys = set(reader.keys())
    prefix = _base_prefix(config)
    first = "wte.weight" if config.arch == "gpt2" else "embed_tokens.weight"
    if prefix + first not in keys and first in keys:
        prefix = ""  # a bare base model (GPT2Model / LlamaModel) saved without the wrapper prefix
    cfg_file = os.path.join(path, "config.json")
    entries = _trunk_entries(config, prefix)
    pdt = config.params_dtype
    rng = jax.random.PRNGKey(0) if rng is None else rng
    d = config.hidden_size
    if head is None or head == "value":
        if not config.tie_word_embeddings:
            if "lm_head.weight" not in keys and "score.weight" in keys:
                raise CheckpointError(
                    f"{path}: missing weight 'lm_head.weight' — this is a sequence-classification checkpoint "
                    "(it has 'score.weight'); load it with head='scalar'"
                )
            entries.append(_lm_head_entry(config))
    if head == "scalar":
        if "score.weight" in keys:
            entries.append(_score_entry(config))
    if head == "value" and all(k in keys for k in VALUE_HEAD_KEYS):
        entries.extend(_value_entries(config))
    _check_unexpected(reader, entries, prefix, cfg_file)
    tree = _load_entries(reader, entries, pdt, cfg_file)
    if head == "scalar" and "score.weight" not in keys:
        tree["score"] = {"kernel": head_init(d)(rng, (d, 1), pdt)}
    if head == "value" and "value_head" not in tree:
        tree["value_head"] = {"kernel": head_init(d)(rng, (d, 1), pdt), "bias": jnp.zeros((1,), pdt)}
    model = {None: CausalLM, "scalar": ScalarHeadModel, "value": CausalLMWithValueHead}[head](config)
    return model, {"params": tree}


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _model_kind(model) -> str:
    if isinstance(model, ScalarHeadModel):
        return "scalar"
    if isinstance(model, CausalLMWithValueHead):
        return "value"
    if isinstance(model, CausalLM):
        return "lm"
    raise TypeError(f"save_pretrained: expected CausalLM, ScalarHeadModel or CausalLMWithValueHead, got {type(model).__name__}")


def hf_state_dict(model, params: dict) -> dict[str, np.ndarray]:
    """HF-named tensors (numpy, in the params' dtype) for `model`'s params."""
    config: ModelConfig = model.config
    kind = _model_kind(model)
    tree = params["params"] if "params" in params else params
    entries = _trunk_entries(config, _base_prefix(config))
    if kind in ("lm", "value") and not config.tie_word_embeddings:
        entries.append(_lm_head_entry(config))
    if kind == "scalar":
        entries.append(_score_entry(config))
    if kind == "value":
        entries.extend(_value_entries(config))
    out = {}
    for e in entries:
        leaves = []
        for p in e.paths:
            try:
                leaves.append(np.asarray(jax.device_get(_get_path(tree, p))))
            except KeyError:
                raise CheckpointError(f"save_pretrained: params lack {'/'.join(p)} (needed for {e.hf_key!r})") from None
        arr = np.ascontiguousarray(e.to_hf(*leaves))
        if tuple(arr.shape) != e.hf_shape:
            raise CheckpointError(
                f"save_pretrained: {'/'.join(e.paths[0])} gives {e.hf_key!r} of shape {list(arr.shape)}, "
                f"config implies {list(e.hf_shape)}"
            )
        out[e.hf_key] = arr
    return out


def save_pretrained(path, model, params: dict, *, max_shard_bytes: int | None = None) -> str:
    """Write `config.json` + safetensors that transformers loads; returns `path`.

    CausalLM -> `XxxForCausalLM`; ScalarHeadModel -> `XxxForSequenceClassification` (num_labels=1,
    `score.weight`); CausalLMWithValueHead -> `XxxForCausalLM` plus TRL's `v_head.summary.*` tensors
    (transformers ignores them; `from_pretrained(head="value")` reads them back).
    `max_shard_bytes` splits the weights into shards with a `model.safetensors.index.json`.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config: ModelConfig = model.config
    kind = _model_kind(model)
    hf = config.to_hf()
    hf["dtype"] = config.param_dtype
    if kind == "scalar":
        hf["architectures"] = [_HF_SEQ_CLS[config.arch]]
        hf["num_labels"] = 1
        hf["id2label"] = {"0": "LABEL_0"}
        hf["label2id"] = {"LABEL_0": 0}
    tensors = hf_state_dict(model, params)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2, sort_keys=True)
    meta = {"format": "pt"}
    for stale in (SAFE_SINGLE, SAFE_INDEX):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(path, SAFE_SINGLE), metadata=meta)
        return path
    shards: list[dict] = [{}]
    size = 0
    for k, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = arr
        size += arr.nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(path, SAFE_INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
                   "weight_map": weight_map}, fh, indent=2, sort_keys=True)
    return path
