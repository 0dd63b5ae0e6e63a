"""Config sections shared by the trainers (frozen dataclasses, overridable as ``section.key=value``)."""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

from rlhf_jax.config import ConfigError
from rlhf_jax.data import DataConfig
from rlhf_jax.models.lora import DEFAULT_TARGETS, LoraConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.metrics import LogConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Where the model comes from.

    ``path``: a Hugging Face model directory (config.json + safetensors) to start from.
    Otherwise the model is built from scratch: ``name="task"`` takes the embedded
    task's tiny config (``task.model_config()``), ``name="tiny"`` takes
    ``rlhf_jax.models.tiny_config(arch=...)`` with the size fields below (0 = that
    config's default; ``vocab_size`` 0 = the tokenizer's size).
    """
    path: str = ""                # a Hugging Face model directory to start from ("" = build from scratch)
    name: Literal["tiny", "task"] = "tiny"  # from scratch: "task" = the task's tiny config, "tiny" = tiny_config(arch)
    arch: str = "llama"           # architecture family of name="tiny" (gpt2|llama|mistral|qwen2|qwen3)
    vocab_size: int = 0           # from scratch: vocabulary size (0 = the tokenizer's size)
    hidden_size: int = 0          # from scratch: model width D (0 = the config's default)
    num_layers: int = 0           # from scratch: transformer layers (0 = the config's default)
    num_heads: int = 0            # from scratch: attention heads (0 = the config's default)
    num_kv_heads: int = 0         # from scratch: key/value heads, GQA (0 = the config's default)
    head_dim: int = 0             # from scratch: per-head width (0 = the config's default)
    intermediate_size: int = 0    # from scratch: MLP width (0 = the config's default)
    max_position_embeddings: int = 0  # from scratch: longest sequence (0 = the config's default)
    tie_word_embeddings: bool = False  # from scratch: the LM head is the input embedding (Llama-3.2-1B, GPT-2)
    dtype: str = "float32"        # compute dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"  # parameter storage dtype (float32|bfloat16|float16)
    remat: bool = False           # rematerialise each layer's activations in the backward pass (saves memory)
    remat_policy: Literal["full", "dots_saveable"] = "full"  # with remat: keep nothing (full) or the matmul outputs
    logits_chunk: int = 0         # the loss's logits this many tokens at a time: SFT, DPO, RL policy (0 = whole)
    attention_impl: Literal["xla", "blocked", "cudnn", "auto"] = "xla"  # xla einsum|blocked tiles|cuDNN (GPU)|auto
    attention_block: int = 64     # query/key tile of the blocked attention (>= 8)
    lora_rank: int = 0            # LoRA adapters of this rank on lora_targets, base frozen (0 = full fine-tune)
    lora_alpha: float = 16.0      # LoRA scale numerator: s = lora_alpha / lora_rank (rsLoRA: / sqrt(rank))
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS  # regexes over kernel paths (model/layers_i/attn/q_proj/kernel)
    lora_dropout: float = 0.0     # LoRA input dropout p in [0,1): SFT/reward/DPO (RL: 0); with lora_path 0 = the adapter's
    lora_rslora: bool = False     # rank-stabilised LoRA scaling lora_alpha / sqrt(lora_rank)
    lora_path: str = ""           # a PEFT LoRA adapter directory to start from (its rank/alpha/targets/dropout are used)
    lora_modules_to_save: tuple[str, ...] = ()  # also train in full (as a copy): embed_tokens (tied head too), lm_head

    def validate(self, prefix: str = "model.", *, lora_dropout_ok: bool = False) -> None:
        """ConfigErrors naming ``prefix + key``. ``lora_dropout_ok``: the trainer applies LoRA dropout (SFT,
        reward model, DPO family); the RL trainers leave it False and refuse ``lora_dropout`` > 0."""
        if self.path and not os.path.isdir(self.path):
            raise ConfigError(f"config key {prefix + 'path'!r}: {self.path!r} is not a directory")
        if self.path and not os.path.isfile(os.path.join(self.path, "config.json")):
            raise ConfigError(f"config key {prefix + 'path'!r}: {self.path!r} has no config.json")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"config key {prefix + key!r}: expected float32/bfloat16/float16, "
                                  f"got {getattr(self, key)!r}")
        self.validate_lora(prefix, lora_dropout_ok=lora_dropout_ok)
        if self.remat_policy not in ("full", "dots_saveable"):
            raise ConfigError(f"config key {prefix + 'remat_policy'!r}: expected full|dots_saveable, got "
                              f"{self.remat_policy!r} (remat=false turns rematerialisation off)")
        if self.logits_chunk < 0:
            raise ConfigError(f"config key {prefix + 'logits_chunk'!r}: must be >= 0 (0 = whole), got {self.logits_chunk}")
        if self.attention_impl not in ("xla", "blocked", "cudnn", "auto"):
            raise ConfigError(f"config key {prefix + 'attention_impl'!r}: expected xla|blocked|cudnn|auto, got "
                              f"{self.attention_impl!r}")
        if self.attention_block < 8:
            raise ConfigError(f"config key {prefix + 'attention_block'!r}: must be >= 8, got {self.attention_block}")
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "max_position_embeddings"):
            if getattr(self, f) < 0:
                raise ConfigError(f"config key {prefix + f!r}: must be >= 0, got {getattr(self, f)}")

    @property
    def uses_lora(self) -> bool:
        return bool(self.lora_rank or self.lora_path)

    def lora_config(self) -> LoraConfig:
        """The adapters' settings (``lora_rank`` > 0)."""
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=tuple(self.lora_targets),
                          rslora=self.lora_rslora, modules_to_save=tuple(self.lora_modules_to_save),
                          dropout=self.lora_dropout)

    def validate_lora(self, prefix: str = "model.", *, lora_dropout_ok: bool = False) -> None:
        """The LoRA keys' checks (``lora_dropout_ok``: as in :meth:`validate`)."""
        if self.lora_rank < 0:
            raise ConfigError(f"config key {prefix + 'lora_rank'!r}: must be >= 0 (0 = full fine-tune), "
                              f"got {self.lora_rank}")
        d = self.lora_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ConfigError(f"config key {prefix + 'lora_dropout'!r}: expected a number in [0, 1), got {d!r}")
        if d > 0 and not lora_dropout_ok:
            raise ConfigError(f"config key {prefix + 'lora_dropout'!r}: the RL trainers (PPO, GRPO, RLOO, online "
                              f"DPO, RSFT) train LoRA without dropout (the rollout's log-probs and the update's first "
                              f"forward must agree: importance ratio 1 at the first epoch; TRL and OpenRLHF also run "
                              f"RL without it); LoRA dropout is for SFT, reward-model and offline DPO-family "
                              f"(rlhf-jax dpo) training; set 0, got {d}")
        if d > 0 and not self.uses_lora:
            raise ConfigError(f"config key {prefix + 'lora_dropout'!r}: lora_dropout needs LoRA ({prefix}lora_rank > 0 "
                              f"or {prefix}lora_path); got {d} with a full fine-tune")
        if self.lora_path:
            if not os.path.isfile(os.path.join(self.lora_path, "adapter_config.json")):
                raise ConfigError(f"config key {prefix + 'lora_path'!r}: {self.lora_path!r} has no "
                                  "adapter_config.json (expected a PEFT LoRA adapter directory)")
        elif self.lora_rank:
            try:
                self.lora_config()
            except ConfigError as e:
                raise ConfigError(str(e).replace("config key '", f"config key '{prefix}", 1)) from None

    def size_overrides(self) -> dict:
        keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "max_position_embeddings")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) > 0}
        if self.tie_word_embeddings:  # (False keeps the family's default: gpt2 ties)
            out["tie_word_embeddings"] = True
        out.update(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, remat_policy=self.remat_policy,
                   logits_chunk=self.logits_chunk, attention_impl=self.attention_impl,
                   attention_block=self.attention_block)
        return out


# Published model shapes, for building a model of that size from scratch (random weights: plans, benchmarks,
# smoke runs) with ``model_shape(name, dtype=..., ...)``; ``path=`` a real checkpoint of the same model
# loads its weights instead.
MODEL_SHAPES: dict[str, dict] = {
    "llama3.2-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, intermediate_size=8192, max_position_embeddings=4096,
                        tie_word_embeddings=True),
    "llama3.1-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, intermediate_size=14336, max_position_embeddings=8192),
}


def model_shape(name: str, **fields) -> ModelSection:
    """A :class:`ModelSection` that builds ``MODEL_SHAPES[name]`` from scratch, with ``fields`` on top."""
    if name not in MODEL_SHAPES:
        raise ConfigError(f"model shape {name!r}: unknown; known: {', '.join(MODEL_SHAPES)}")
    return ModelSection(**{"name": "tiny", **MODEL_SHAPES[name], **fields})


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device layout: ``runs × data × fsdp`` devices (``-1`` for data or fsdp = the rest), compiled
    with ``jit`` and NamedShardings, or ``pmap`` data parallelism (params replicated, fsdp must be 1).

    ``runs`` shards the R runs of a vmapped sweep (``rlhf-jax sweep --vmap --mesh runs=4,fsdp=2``);
    every trainer runs one run and refuses ``runs > 1``."""
    runs: int = 1                 # devices the runs of a vmapped sweep are split over (sweeps only)
    data: int = -1                # data-parallel devices (-1 = the devices runs and fsdp leave)
    fsdp: int = 1                 # devices each parameter is sharded over, FSDP (-1 = the devices runs and data leave)
    mode: Literal["jit", "pmap"] = "jit"  # jit with NamedShardings, or pmap data parallelism (fsdp must be 1)

    def validate(self, n_devices: int, prefix: str = "mesh.") -> tuple[int, int]:
        """The resolved ``(data, fsdp)`` of a trainer's mesh (``runs`` must be 1), or a ConfigError
        naming the key."""
        if self.runs != 1:
            raise ConfigError(f"config key {prefix + 'runs'!r}: runs={self.runs} splits the runs of a vmapped "
                              f"sweep over devices (rlhf-jax sweep --vmap --mesh runs=...); a trainer runs one run: "
                              f"set {prefix + 'runs'}=1")
        return self.resolve(n_devices, prefix)[1:]

    def resolve(self, n_devices: int, prefix: str = "mesh.") -> tuple[int, int, int]:
        """The resolved ``(runs, data, fsdp)`` with ``runs × data × fsdp == n_devices``, or a
        ConfigError naming the key."""
        runs, data, fsdp = self.runs, self.data, self.fsdp
        if runs < 1:
            raise ConfigError(f"config key {prefix + 'runs'!r}: must be >= 1, got {runs}")
        if n_devices % runs:
            raise ConfigError(f"config key {prefix + 'runs'!r}: {runs} does not divide the {n_devices} devices")
        n = n_devices // runs
        left = f"the {n} devices mesh.runs={runs} leaves" if runs > 1 else f"the {n} devices"
        if data == 0 or data < -1:
            raise ConfigError(f"config key {prefix + 'data'!r}: must be >= 1 or -1, got {data}")
        if fsdp == 0 or fsdp < -1:
            raise ConfigError(f"config key {prefix + 'fsdp'!r}: must be >= 1 or -1, got {fsdp}")
        if data == -1 and fsdp == -1:
            raise ConfigError(f"config key {prefix + 'data'!r}: data and fsdp cannot both be -1")
        if data == -1:
            if n % fsdp:
                raise ConfigError(f"config key {prefix + 'fsdp'!r}: {fsdp} does not divide {left}")
            data = n // fsdp
        if fsdp == -1:
            if n % data:
                raise ConfigError(f"config key {prefix + 'data'!r}: {data} does not divide {left}")
            fsdp = n // data
        if runs * data * fsdp != n_devices:
            raise ConfigError(f"config key {prefix + 'data'!r}: runs={runs} x data={data} x fsdp={fsdp} != "
                              f"{n_devices} devices")
        if self.mode == "pmap" and fsdp != 1:
            raise ConfigError(f"config key {prefix + 'fsdp'!r}: pmap mode is pure data parallel; "
                              f"fsdp must be 1, got {fsdp}")
        return runs, data, fsdp


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run section every trainer config shares (its fields sit at the top level of the config:
    ``seed=1``, ``out_dir=...``, ``data.batch_size=16``, ``checkpoint.every=50``, ...).

    task: an embedded task (``rlhf_jax.tasks``) whose data, tokenizer and tiny model fill in what is
    not given ("" = none). data: the data section (its ``batch_size`` is the GLOBAL batch). mesh:
    device layout. checkpoint: when to save and how many to keep. log: metrics files, progress and
    experiment tracking (Weights & Biases).
    seed: the run's base seed. out_dir: the run directory. export: write the trained model as a Hugging
    Face directory (``out_dir/export``) at the end. resume: continue the run in ``out_dir`` from its
    latest checkpoint (exact resume).
    """
    task: str = ""
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    seed: int = 0
    out_dir: str = "runs/run"
    export: bool = True
    resume: bool = False

    def validate_run(self) -> None:
        """The checks of the shared section that need no model (trainers add their own)."""
        self.checkpoint.validate()
        self.log.validate()
        if not self.out_dir:
            raise ConfigError("config key 'out_dir': empty; expected a run directory")
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ConfigError(f"--out {self.out_dir!r} (config key 'out_dir') is a file; expected a run directory")
