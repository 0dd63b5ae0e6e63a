"""LoRA adapters on the model's projections, applied functionally, with PEFT adapter files in and out.

A LoRA model's variables are ``{"params": base, "lora": adapters}``: the base tree is an ordinary
``CausalLM`` / ``ScalarHeadModel`` / ``CausalLMWithValueHead`` tree, and ``adapters`` mirrors the paths of
the targeted kernels, each with ``a [n_in, r]`` and ``b [r, n_out]`` (``n_in`` / ``n_out`` the products of
the kernel's input and output axes). The effective kernel is (docs/MATH.md, LoRA)

    W' = W + s · reshape(a @ b),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

which the training forward applies UNMERGED, ``x·W + (x·a)·(s·b)`` in every targeted ``transformer.Linear``
(``lora_variables``; no merged kernel is formed, so none sits in the temporaries, nor one per run of a
vmapped sweep); ``merge`` / ``merged`` form ``W'`` for generation and export. ``LoraModel.apply`` passes
the adapters to the wrapped module, so "adapters off" is the base model exactly (``base_model(lora_model)``
with ``base_params(variables)``), and the reference policy of an RL run or of DPO is the same base
arrays without their adapters (no second copy). The base enters the forward through
``stop_gradient`` (except the scalar heads ``score`` / ``value_head``, which a reward or value model
trains with its adapters), so its gradients are zeros and ``trainable_mask`` gives it no optimiser
state. ``b`` starts at zero (PEFT's init): a fresh adapter does not change the model.

Targets are regexes searched in the '/'-joined kernel path below ``params`` (for example
``model/layers_3/attn/q_proj/kernel``); only leaves named ``kernel`` under ``model/`` can be targeted.

``modules_to_save`` (PEFT's name; config key ``lora_modules_to_save``): ``embed_tokens`` (the input embedding,
which is also the LM head of a tied model) and/or ``lm_head`` are trained in full as a COPY held in the
adapter tree (``lora/modules/...``) that replaces the frozen original in ``merge``; the base keeps the
original, so the reference (adapters off) is still the starting model.

PEFT interop (llama, mistral, qwen2, qwen3): ``save_peft_adapter`` writes ``adapter_config.json`` +
``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(base, dir)`` loads, and
``load_peft_adapter`` reads such a directory back into an adapter tree (``lora_dropout`` included).

LoRA dropout (``LoraConfig.dropout`` p, PEFT's ``lora_dropout``): PEFT's ``lora_B(lora_A(dropout(x))) · s``,
inverted dropout (kept units scaled by 1/(1-p)) on the adapter's INPUT only, the base path ``x·W``
untouched. It applies only in a forward given a dropout key, ``LoraModel.apply(..., rngs={"dropout":
key})`` (the supervised training steps pass one: SFT, reward model, the DPO family's policy forwards; key
from :func:`dropout_key`); then every targeted ``transformer.Linear`` draws its own mask (flax's
``make_rng`` folds in the module path). Without a key (generation, scoring, evaluation, the reference,
every RL forward) or with p = 0 the forward is the deterministic one, the same program as without dropout.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ConfigError
from rlhf_jax.models.architecture import CheckpointError, ModelConfig, UnsupportedModelError
from rlhf_jax.models.hf_io import _trunk_entries

Array = jax.Array

ATTN_TARGETS = (r"attn/(q|k|v|o)_proj/kernel$",)
MLP_TARGETS = (r"mlp/(gate|up|down)_proj/kernel$",)
DEFAULT_TARGETS = ATTN_TARGETS + MLP_TARGETS
HEAD_KEYS = ("score", "value_head")  # scalar heads: trained with the adapters, never frozen
# PEFT's modules_to_save names -> the full weight's path below params (trained as a copy under lora/modules)
SAVE_MODULES = {"embed_tokens": ("model", "embed", "embedding"), "lm_head": ("lm_head", "kernel")}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Static LoRA settings (hashable: part of the compiled program)."""
    rank: int = 8  # r, the adapters' inner width
    alpha: float = 16.0  # scale numerator: s = alpha / r (rsLoRA: alpha / sqrt(r))
    targets: tuple[str, ...] = DEFAULT_TARGETS  # regexes over kernel paths below params
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    modules_to_save: tuple[str, ...] = ()  # base modules trained in full as a copy: embed_tokens, lm_head (PEFT's)
    dropout: float = 0.0  # p of the adapters' input dropout in a forward given a dropout key (PEFT's lora_dropout)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"config key 'lora_rank': expected an int >= 1, got {self.rank!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"config key 'lora_dropout': expected a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if not self.alpha > 0:
            raise ConfigError(f"config key 'lora_alpha': must be > 0, got {self.alpha!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        bad = [m for m in self.modules_to_save if m not in SAVE_MODULES]
        if bad:
            raise ConfigError(f"config key 'lora_modules_to_save': {bad} unknown; choose from {sorted(SAVE_MODULES)} "
                              f"(the input embedding / tied LM head, and an untied LM head)")
        if not self.targets:
            raise ConfigError("config key 'lora_targets': empty; give at least one regex over kernel paths")
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"config key 'lora_targets': bad regex {t!r}: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# ---------------------------------------------------------------------------------------------
# paths and shapes
# ---------------------------------------------------------------------------------------------

def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items") and not hasattr(v, "shape"):
            out.update(_flat(dict(v), prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def n_in_axes(path: tuple, ndim: int) -> int:
    """How many leading axes of a kernel are its inputs: ``o_proj [H, Dh, D]`` has two, the rest one."""
    return ndim - 1 if path[-2] == "o_proj" else 1


def target_paths(params: dict, cfg: LoraConfig) -> list[tuple]:
    """The kernel paths (below ``params``) the targets select, in tree order; a ConfigError when none."""
    inner = params["params"] if "params" in params else params
    pats = [re.compile(t) for t in cfg.targets]
    kernels = [p for p in _flat(inner) if p[-1] == "kernel" and p[0] == "model"]
    hits = [p for p in kernels if any(r.search("/".join(p)) for r in pats)]
    if not hits:
        names = sorted({"/".join(p[2:]) for p in kernels if len(p) > 2})
        raise ConfigError(f"config key 'lora_targets': {list(cfg.targets)} matches no kernel; kernel paths look "
                          f"like 'model/layers_0/<name>' with <name> in {names}")
    return hits


def _io(path: tuple, shape: tuple) -> tuple[int, int]:
    k = n_in_axes(path, len(shape))
    return int(np.prod(shape[:k])), int(np.prod(shape[k:]))


def init_adapters(params: dict, cfg: LoraConfig, rng: Array, dtype=jnp.float32) -> dict:
    """Fresh adapters for the targeted kernels: ``a ~ U(-1/sqrt(n_in), 1/sqrt(n_in))`` (PEFT's
    Kaiming-uniform with a=sqrt(5)), ``b = 0``."""
    inner = params["params"] if "params" in params else params
    out: dict = {}
    for i, p in enumerate(target_paths(params, cfg)):
        n_in, n_out = _io(p, tuple(_get(inner, p).shape))
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (n_in, cfg.rank), dtype, -bound, bound)
        _set(out, p[:-1], {"a": a, "b": jnp.zeros((cfg.rank, n_out), dtype)})
    for name in cfg.modules_to_save:  # a trainable copy; the base keeps the original (the reference's)
        p = SAVE_MODULES[name]
        if _has(inner, p):
            _set(out, ("modules",) + p, jnp.array(_get(inner, p), dtype))
    return out


def _has(tree: dict, path: tuple) -> bool:
    for k in path:
        if not hasattr(tree, "keys") or k not in tree:
            return False
        tree = tree[k]
    return True


def missing_modules(params: dict, cfg: LoraConfig) -> list[str]:
    """The ``modules_to_save`` this model does not have (a tied model has no ``lm_head``)."""
    inner = params["params"] if "params" in params else params
    return [m for m in cfg.modules_to_save if not _has(inner, SAVE_MODULES[m])]


def adapter_paths(adapters: dict) -> list[tuple]:
    """The kernel paths an adapter tree modifies (``.../q_proj/kernel``)."""
    return sorted({p[:-1] + ("kernel",) for p in _flat(adapters) if p[-1] in ("a", "b") and p[0] != "modules"})


def merge(params: dict, adapters: dict, cfg: LoraConfig, *, dtype=None, freeze_base: bool = True) -> dict:
    """``{"params": base with W' = W + s·a@b on every adapted kernel}`` (the base through
    ``stop_gradient`` when ``freeze_base``, except the scalar heads). ``dtype``: the merged kernels'
    dtype (default: the base kernel's; the sum itself is formed in at least the adapters' precision)."""
    out = _base_for_forward(params, adapters, freeze_base)
    for p in adapter_paths(adapters):
        ad = _get(adapters, p[:-1])
        w = _get(out, p)
        delta = (ad["a"] @ ad["b"]) * jnp.asarray(cfg.scale, ad["a"].dtype)
        odt = w.dtype if dtype is None else dtype
        _set(out, p, (w.astype(jnp.promote_types(odt, delta.dtype)) + delta.reshape(w.shape)).astype(odt))
    return {"params": out}


def _base_for_forward(params: dict, adapters: dict, freeze_base: bool) -> dict:
    """The base tree a LoRA forward runs on: fresh containers (the caller's tree is not mutated), every leaf
    through ``stop_gradient`` when ``freeze_base`` except the scalar heads, and the trained
    ``modules_to_save`` copies in place of their frozen originals."""
    inner = params["params"] if "params" in params else params
    sg = jax.lax.stop_gradient if freeze_base else (lambda x: x)
    out = {k: (v if k in HEAD_KEYS else jax.tree_util.tree_map(sg, v)) for k, v in inner.items()}
    out = jax.tree_util.tree_map(lambda x: x, out)
    for p, w in _flat(adapters.get("modules", {})).items():
        _set(out, p, w.astype(_get(inner, p).dtype))
    return out


def lora_variables(params: dict, adapters: dict, cfg: LoraConfig, *, freeze_base: bool = True,
                   dropout: bool = False) -> dict:
    """The variables of an UNMERGED LoRA forward: ``{"params": base, "lora": {module path: {"a", "b"}}}`` with
    ``b`` pre-scaled by ``s``; every ``transformer.Linear`` that finds ``a``/``b`` in its ``lora`` collection
    adds ``(x·a)·(s·b)`` to ``x·W``. Same function as :func:`merge` (to float rounding), without forming
    ``W + s·a·b``: no merged kernel per layer in the temporaries (and under ``vmap`` none per run; only
    ``x·a [.., r]``). The base goes through ``stop_gradient`` (``freeze_base``) except the scalar heads;
    ``modules_to_save`` copies replace their originals as in :func:`merge`.
    ``dropout`` (and ``cfg.dropout`` > 0): each module also gets ``"dropout": p``, which makes its ``Linear``
    drop out the adapter's input when the forward has a ``"dropout"`` rng (``LoraModel.apply``)."""
    out = _base_for_forward(params, adapters, freeze_base)
    scale = cfg.scale
    low: dict = {}
    for p in adapter_paths(adapters):
        ad = _get(adapters, p[:-1])
        entry = {"a": ad["a"], "b": ad["b"] * jnp.asarray(scale, ad["b"].dtype)}
        if dropout and cfg.dropout > 0:
            entry["dropout"] = jnp.asarray(cfg.dropout, jnp.float32)
        _set(low, p[:-1], entry)
    return {"params": out, "lora": low}


DROPOUT_STREAM = 0x4C44  # folded into a step's key for the LoRA dropout masks (other draws use other numbers)


def dropout_key(rng: Array, axis_name: str | None = None) -> Array:
    """The key of the LoRA dropout masks of one training (micro-)batch: ``fold_in(rng, DROPOUT_STREAM)``,
    and under ``pmap`` (``axis_name``) also the device's index, so every device draws its own masks
    (``rng``: the step's key, ``TrainState.step_rng()``, so a resumed run draws the same masks)."""
    key = jax.random.fold_in(rng, DROPOUT_STREAM)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    return key


def is_lora_params(params) -> bool:
    return isinstance(params, dict) and "lora" in params


def base_params(variables: dict) -> dict:
    """The base of LoRA variables (``{"params": ...}`` without the adapters): the model with them off."""
    return {"params": variables["params"]}


def trainable_mask(params: dict) -> Any:
    """True on the leaves a LoRA run trains: the adapters and the scalar heads (the base is frozen)."""
    def rule(path, _):
        keys = [getattr(k, "key", None) for k in path]
        return keys[0] == "lora" or (keys[0] == "params" and len(keys) > 1 and keys[1] in HEAD_KEYS)
    return jax.tree_util.tree_map_with_path(rule, params)


# ---------------------------------------------------------------------------------------------
# the model wrapper
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoraModel:
    """A model whose ``apply`` takes ``{"params": base, "lora": adapters}`` (hashable: a static argument).

    ``apply(variables, *args, method=None, **kw)`` calls the wrapped module with the adapters unmerged
    (``lora_variables``: each targeted ``Linear`` adds ``(x·a)·(s·b)`` in the compute dtype); variables
    without ``"lora"`` run the base as it is. ``rngs={"dropout": key}`` turns LoRA dropout on when
    ``lora.dropout`` > 0 (the adapters' input dropped out, a mask per module); with ``lora.dropout`` = 0 or
    no adapters the key is not passed on (the same program as without it).
    The class attributes ``hidden_states`` / ``logits_from_hidden`` / ``heads_from_hidden`` are the
    wrapped class's own functions, so code that passes ``method=type(model).hidden_states`` works
    unchanged. Build one with :func:`wrap`.
    """
    model: Any
    lora: LoraConfig

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def apply(self, variables, *args, method=None, rngs=None, **kwargs):
        drop = False
        if rngs is not None and "dropout" in rngs:
            drop = is_lora_params(variables) and self.lora.dropout > 0
            if not drop:  # nothing draws from it: the deterministic program, as without a key
                rngs = {k: v for k, v in rngs.items() if k != "dropout"}
        if is_lora_params(variables):
            variables = lora_variables(variables, variables["lora"], self.lora, dropout=drop)
        if isinstance(method, str):
            method = getattr(type(self.model), method)
        if rngs:
            kwargs["rngs"] = rngs
        return self.model.apply(variables, *args, method=method, **kwargs)


_CLASSES: dict[type, type] = {}


def wrap(model, cfg: LoraConfig) -> LoraModel:
    """``model`` (a ``CausalLM``, ``ScalarHeadModel`` or ``CausalLMWithValueHead``) with LoRA adapters."""
    if isinstance(model, LoraModel):
        raise TypeError("lora.wrap: the model already has adapters")
    inner = type(model)
    if inner not in _CLASSES:
        attrs = {name: getattr(inner, name) for name in ("hidden_states", "logits_from_hidden", "heads_from_hidden")
                 if hasattr(inner, name)}
        _CLASSES[inner] = dataclasses.dataclass(frozen=True)(type(f"Lora{inner.__name__}", (LoraModel,), attrs))
    return _CLASSES[inner](model=model, lora=cfg)


def base_model(model):
    """The module without adapters (itself when it has none)."""
    return model.model if isinstance(model, LoraModel) else model


def merged(model, variables: dict) -> tuple[Any, dict]:
    """``(plain module, merged params)`` of a LoRA model (unchanged for a plain one): what generation,
    export and any consumer that does not know about adapters takes."""
    if not isinstance(model, LoraModel):
        return model, variables
    if not is_lora_params(variables):
        return model.model, variables
    return model.model, merge(variables, variables["lora"], model.lora, freeze_base=False)


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories
# ---------------------------------------------------------------------------------------------

def _peft_modules(config: ModelConfig) -> dict[tuple, tuple[str, tuple]]:
    """kernel path -> (HF module name, HF weight shape [out, in]) for every projection of the trunk."""
    if config.arch == "gpt2":
        raise UnsupportedModelError("LoRA adapters in PEFT format: gpt2's fused c_attn / Conv1D projections are not "
                                    "supported (llama, mistral, qwen2, qwen3 are)")
    out = {}
    for e in _trunk_entries(config, "model."):
        if len(e.paths) == 1 and e.paths[0][-1] == "kernel" and e.hf_key.endswith(".weight"):
            out[e.paths[0]] = (e.hf_key[: -len(".weight")], e.hf_shape)
    return out


def save_peft_adapter(path, config: ModelConfig, cfg: LoraConfig, adapters: dict, *,
                      base_model_name_or_path: str = "", task_type: str = "CAUSAL_LM") -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's LoRA format, f32 tensors
    ``base_model.model.<module>.lora_A.weight [r, in]`` / ``lora_B.weight [out, r]``)."""
    from safetensors.numpy import save_file

    mods = _peft_modules(config)
    tensors, names = {}, []
    for p in adapter_paths(adapters):
        if p not in mods:
            raise UnsupportedModelError(f"save_peft_adapter: {'/'.join(p)} has no Hugging Face module")
        name, _ = mods[p]
        ad = jax.device_get(_get(adapters, p[:-1]))
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ad["a"], np.float32).T)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ad["b"], np.float32).T)
        names.append(name)
    saved = []
    for name in cfg.modules_to_save:  # PEFT's modules_to_save: the full trained weight, HF layout [out, in]
        p = SAVE_MODULES[name]
        if not _has(adapters.get("modules", {}), p):
            continue
        w = np.asarray(jax.device_get(_get(adapters["modules"], p)), np.float32)
        if name == "embed_tokens":
            tensors["base_model.model.model.embed_tokens.weight"] = np.ascontiguousarray(w)
            if config.tie_word_embeddings:  # PEFT ties lm_head to the trained copy (ensure_weight_tying)
                tensors["base_model.model.lm_head.weight"] = np.ascontiguousarray(w)
        else:
            tensors["base_model.model.lm_head.weight"] = np.ascontiguousarray(w.T)
        saved.append(name)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    meta = {"peft_type": "LORA", "task_type": task_type, "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "use_rslora": bool(cfg.rslora), "target_modules": sorted(names),
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": saved or None, "base_model_name_or_path": base_model_name_or_path,
            "ensure_weight_tying": bool(config.tie_word_embeddings and "embed_tokens" in saved),
            "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return path


def load_peft_adapter(path, config: ModelConfig, *, dtype=jnp.float32) -> tuple[LoraConfig, dict]:
    """``(LoraConfig, adapters)`` of a PEFT LoRA directory; a CheckpointError names the file and key."""
    from safetensors import safe_open

    path = os.fspath(path)
    cfg_file, w_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    for f in (cfg_file, w_file):
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: missing (a PEFT LoRA adapter directory holds {ADAPTER_CONFIG} and "
                                  f"{ADAPTER_WEIGHTS})")
    try:
        with open(cfg_file) as fh:
            meta = json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if meta.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type {meta.get('peft_type')!r}; only LORA adapters load")
    for key in ("rank_pattern", "alpha_pattern"):
        if meta.get(key):
            raise CheckpointError(f"{cfg_file}: {key} (per-module ranks/alphas) is not supported")
    if meta.get("fan_in_fan_out"):
        raise CheckpointError(f"{cfg_file}: fan_in_fan_out=true (Conv1D models) is not supported")
    if meta.get("use_dora"):
        raise CheckpointError(f"{cfg_file}: DoRA adapters are not supported")
    r, alpha = int(meta.get("r", 8)), float(meta.get("lora_alpha", 8))
    dropout = meta.get("lora_dropout", 0.0)  # PEFT's default when absent
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise CheckpointError(f"{cfg_file}: lora_dropout {dropout!r}; expected a number in [0, 1)")
    save = []
    for m in meta.get("modules_to_save") or ():
        m = m.split(".")[-1]  # PEFT also lists "model.embed_tokens"
        if m not in SAVE_MODULES:
            raise CheckpointError(f"{cfg_file}: modules_to_save {m!r} is not supported (only {sorted(SAVE_MODULES)})")
        if m not in save:
            save.append(m)
    by_name = {name: (p, shape) for p, (name, shape) in _peft_modules(config).items()}
    full_keys = {"base_model.model.model.embed_tokens.weight": "embed_tokens",
                 "base_model.model.lm_head.weight": "lm_head"}
    adapters: dict = {}
    found = []
    with safe_open(w_file, framework="np") as fh:
        keys = list(fh.keys())
        for key in keys:
            if key in full_keys and save:
                name = full_keys[key]
                if name == "lm_head" and config.tie_word_embeddings:
                    continue  # the tied head is the trained embedding copy itself
                if name not in save:
                    raise CheckpointError(f"{w_file}: tensor {key!r} but {name!r} is not in modules_to_save of {cfg_file}")
                x = np.asarray(fh.get_tensor(key), np.float32)
                want = (config.vocab_size, config.hidden_size)
                if tuple(x.shape) != want:
                    raise CheckpointError(f"{w_file}: {key!r} has shape {list(x.shape)}, expected {list(want)}")
                _set(adapters, ("modules",) + SAVE_MODULES[name], jnp.asarray(x if name == "embed_tokens" else x.T, dtype))
                continue
            if not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise CheckpointError(f"{w_file}: unexpected tensor {key!r} (only lora_A/lora_B weights load)")
            mod = key[: -len(".lora_A.weight")]
            for pre in ("base_model.model.", "base_model."):
                if mod.startswith(pre):
                    mod = mod[len(pre):]
                    break
            if mod not in by_name:
                raise CheckpointError(f"{w_file}: tensor {key!r} names module {mod!r}, which the model does not have")
            p, (out_dim, in_dim) = by_name[mod]
            x = np.asarray(fh.get_tensor(key), np.float32)
            is_a = ".lora_A." in key
            want = (r, in_dim) if is_a else (out_dim, r)
            if tuple(x.shape) != want:
                raise CheckpointError(f"{w_file}: {key!r} has shape {list(x.shape)}, expected {list(want)} (r={r})")
            _set(adapters, p[:-1] + ("a" if is_a else "b",), jnp.asarray(x.T, dtype))
            found.append(p)
    for p in set(found):
        ad = _get(adapters, p[:-1])
        if "a" not in ad or "b" not in ad:
            raise CheckpointError(f"{w_file}: module of {'/'.join(p)} has only one of lora_A / lora_B")
    if not found:
        raise CheckpointError(f"{w_file}: no lora_A / lora_B tensors")
    for m in save:
        if m == "lm_head" and config.tie_word_embeddings:
            raise CheckpointError(f"{cfg_file}: modules_to_save 'lm_head' but the model ties its LM head to the "
                                  f"embedding (list 'embed_tokens')")
        if not _has(adapters.get("modules", {}), SAVE_MODULES[m]):
            raise CheckpointError(f"{w_file}: modules_to_save {m!r} listed in {cfg_file} but its weight is missing")
    targets = tuple("^" + re.escape("/".join(p)) + "$" for p in sorted(set(found)))
    return LoraConfig(rank=r, alpha=alpha, targets=targets, rslora=bool(meta.get("use_rslora", False)),
                      modules_to_save=tuple(save), dropout=float(dropout)), adapters

