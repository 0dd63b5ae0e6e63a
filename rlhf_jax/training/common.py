"""Pieces every trainer shares: model/tokenizer set-up, path checks, export, the supervised job, CLI glue."""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhf_jax import models
from rlhf_jax.models import lora
from rlhf_jax.config import ConfigError, apply_overrides, load_config_file, to_dict
from rlhf_jax.tasks import get_task, list_tasks
from rlhf_jax.training import loop
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.distributed import add_distributed_arguments, init_distributed
from rlhf_jax.training.optim import make_optimizer, schedule_factor
from rlhf_jax.training.state import TrainState


def get_task_or_none(name: str, key: str = "task"):
    if not name:
        return None
    try:
        return get_task(name)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config key {key!r}: unknown task {name!r} ({e}); "
                          f"available: {list_tasks()}") from None


def resolve_tokenizer_dir(data_tokenizer: str, model_path: str, task) -> str:
    """``data.tokenizer``, else the model directory (HF dirs usually carry one), else the task's."""
    if data_tokenizer:
        return data_tokenizer
    if model_path and any(os.path.exists(os.path.join(model_path, f))
                          for f in ("tokenizer.json", "tokenizer_config.json")):
        return model_path
    if task is not None:
        return task.tokenizer_dir
    return ""


def require_tokenizer_dir(data_tokenizer: str, model_path: str, task, model_key: str = "model") -> str:
    """:func:`resolve_tokenizer_dir`, or a ConfigError when there is none."""
    tok = resolve_tokenizer_dir(data_tokenizer, model_path, task)
    if not tok:
        raise ConfigError(f"config key 'data.tokenizer': empty (and neither {model_key}.path nor task has "
                          "a tokenizer)")
    check_path("data.tokenizer", tok, kind="dir")
    return tok


def validate_supervised(cfg, cls: type) -> Any:
    """The checks every supervised trainer config (SFT, reward) needs before any model is built;
    returns the task (or None)."""
    if not isinstance(cfg, cls):
        raise ConfigError(f"expected a {cls.__name__}, got {type(cfg).__name__}")
    if cfg.steps < 1:
        raise ConfigError(f"config key 'steps': must be >= 1, got {cfg.steps}")
    if cfg.eval_every < 0:
        raise ConfigError(f"config key 'eval_every': must be >= 0, got {cfg.eval_every}")
    if cfg.eval_batches < 1:
        raise ConfigError(f"config key 'eval_batches': must be >= 1, got {cfg.eval_batches}")
    cfg.validate_run()
    cfg.optim.validate()
    cfg.model.validate(lora_dropout_ok=True)
    loop.validate_layout(cfg.mesh, cfg.data.batch_size, cfg.micro_batches)
    task = get_task_or_none(cfg.task)
    if not cfg.data.path and task is None:
        raise ConfigError("config key 'data.path': empty and no 'task' given; nothing to train on")
    check_path("data.path", cfg.data.path)
    check_path("eval_path", cfg.eval_path)
    require_tokenizer_dir(cfg.data.tokenizer, cfg.model.path, task)
    return task


def check_path(key: str, path: str, *, kind: str = "file") -> None:
    """ConfigError naming ``key`` when a data path (comma-separated, globs, tfds:) is missing."""
    if not path or path.startswith("tfds:"):
        return
    for part in path.split(","):
        part = os.path.expanduser(part.strip())
        if not part:
            continue
        if any(c in part for c in "*?["):
            if not glob.glob(part):
                raise ConfigError(f"config key {key!r}: no file matches {part!r}")
        elif kind == "dir" and not os.path.isdir(part):
            raise ConfigError(f"config key {key!r}: directory {part!r} does not exist")
        elif kind == "file" and not os.path.exists(part):
            raise ConfigError(f"config key {key!r}: {part!r} does not exist")


def build_model(section: ModelSection, *, task, tokenizer, head: str | None, rng: jax.Array, prefix: str = "model.",
                lora_dropout_ok: bool = False):
    """``(model, params, model_config)`` from a HF directory, the task's config, or a tiny config.
    ``lora_dropout_ok``: the trainer applies LoRA dropout (SFT, reward model, DPO family; see :func:`add_lora`)."""
    if section.path:
        model, params = models.from_pretrained(
            section.path, dtype=jnp.dtype(section.dtype), param_dtype=jnp.dtype(section.param_dtype),
            head=head, rng=rng, remat=section.remat, remat_policy=section.remat_policy,
            logits_chunk=section.logits_chunk, attention_impl=section.attention_impl,
            attention_block=section.attention_block)
        mconfig = model.config
    else:
        sizes = section.size_overrides()
        if section.name == "task":
            if task is None:
                raise ConfigError("config key 'model.name': 'task' needs config key 'task' set")
            mconfig = task.model_config(**sizes)
        else:
            if "vocab_size" not in sizes:
                sizes["vocab_size"] = len(tokenizer)
            for attr, key in (("pad_token_id", "pad_token_id"), ("eos_token_id", "eos_token_id"),
                              ("bos_token_id", "bos_token_id")):
                val = getattr(tokenizer, attr, None)
                if val is not None:
                    sizes[key] = int(val)
            mconfig = models.tiny_config(arch=section.arch, **sizes)
        cls = {None: models.CausalLM, "scalar": models.ScalarHeadModel,
               "value": models.CausalLMWithValueHead}[head]
        model = cls(mconfig)
        params = models.init_params(model, rng)
    if tokenizer is not None:
        try:
            models.check_tokenizer_compat(mconfig, tokenizer)
        except ValueError as e:
            raise ConfigError(f"config key 'model': {e}") from None
    if section.uses_lora:
        model, params = add_lora(section, model, params, jax.random.fold_in(rng, 7), prefix=prefix,
                                 lora_dropout_ok=lora_dropout_ok)
    return model, params, mconfig


def add_lora(section: ModelSection, model, params, rng: jax.Array, *, prefix: str = "model.",
             lora_dropout_ok: bool = False):
    """``(LoraModel, {"params": base, "lora": adapters})``: fresh adapters of ``section.lora_rank``, or the
    PEFT adapter directory ``section.lora_path``. With ``lora_path`` the adapter's ``adapter_config.json``
    gives r, lora_alpha, the targets, use_rslora and modules_to_save; of the config's keys, ``lora_rank`` 0
    takes the adapter's r (non-zero must agree: r is the weights' shape), and ``lora_dropout`` 0 takes the
    adapter's lora_dropout while a non-zero one replaces it (dropout is a training setting, not part of the
    weights). Without ``lora_dropout_ok`` (the RL trainers, which train LoRA without dropout) the adapters'
    dropout is 0 whatever the adapter's config says, and a non-zero ``lora_dropout`` is a ConfigError."""
    if section.lora_dropout and not lora_dropout_ok:
        section.validate_lora(prefix)  # raises: the error of a trainer that applies no LoRA dropout
    if section.lora_path:
        try:
            cfg, adapters = lora.load_peft_adapter(section.lora_path, model.config)
        except models.CheckpointError as e:
            raise ConfigError(f"config key {prefix + 'lora_path'!r}: {e}") from None
        if section.lora_rank and section.lora_rank != cfg.rank:
            raise ConfigError(f"config key {prefix + 'lora_rank'!r}: {section.lora_rank} differs from the adapter's "
                              f"r={cfg.rank} in {section.lora_path!r} (set 0 to take the adapter's)")
        if section.lora_dropout or not lora_dropout_ok:
            cfg = dataclasses.replace(cfg, dropout=section.lora_dropout)
    else:
        cfg = section.lora_config()
        missing = lora.missing_modules(params, cfg)
        if missing:
            raise ConfigError(f"config key {prefix + 'lora_modules_to_save'!r}: the model has no {missing} "
                              f"(a model with tied embeddings trains its LM head through 'embed_tokens')")
        try:
            adapters = lora.init_adapters(params, cfg, rng)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config key '", f"config key '{prefix}", 1)) from None
    return lora.wrap(model, cfg), {"params": params["params"], "lora": adapters}


def export_model(export_dir: Path, model, params, tokenizer_dir: str) -> str:
    """Hugging Face directory (weights via ``rlhf_jax.models.save_pretrained``) + tokenizer files."""
    host = loop.host_params(params)
    if jax.process_index() != 0:
        return str(export_dir)
    lora_model = model if isinstance(model, lora.LoraModel) else None
    model, merged = lora.merged(model, host)
    models.save_pretrained(str(export_dir), model, merged)
    if lora_model is not None and isinstance(model, models.CausalLM) and model.config.arch != "gpt2":
        # the adapters alone, in PEFT's format (peft.PeftModel.from_pretrained(base, export/adapter))
        lora.save_peft_adapter(export_dir / "adapter", model.config, lora_model.lora, host["lora"])
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        for name in os.listdir(tokenizer_dir):
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens",
                                "chat_template")):
                shutil.copy2(os.path.join(tokenizer_dir, name), export_dir / name)
    return str(export_dir)


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--config", default=None,
                        help="experiments/*.py file with get_config() (default: built-in defaults)")
    parser.add_argument("--out", default=None, help=f"run directory (default: config out_dir, {default_out})")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --out (exact resume)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, validated), one 'key = value  "
                             "# doc (default: X)' line per key, and exit without building or writing anything")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.learning_rate=1e-3 data.batch_size=16")
    add_distributed_arguments(parser)


def config_from_args(args, default_cfg) -> Any:
    """Config file (or defaults) + ``KEY=VALUE`` overrides + --out/--resume, validated."""
    cfg = load_config_file(args.config) if args.config else default_cfg
    if not isinstance(cfg, type(default_cfg)):
        raise ConfigError(f"config file {args.config!r}: get_config() returned "
                          f"{type(cfg).__name__}, expected {type(default_cfg).__name__}")
    overrides = [o for o in (args.overrides or [])]
    cfg = apply_overrides(cfg, overrides)
    if args.out:
        cfg = dataclasses.replace(cfg, out_dir=args.out)
    if args.resume:
        cfg = dataclasses.replace(cfg, resume=True)
    return cfg


def init_distributed_from_args(args) -> None:
    init_distributed(args.coordinator, args.num_processes, args.process_id, args.local_device_ids,
                     auto=args.distributed_auto)


def run_supervised(cfg, *, name: str, model, mconfig, params, placement: loop.Placement, step_fn, step_cfg,
                   batches, batch_keys: tuple[str, ...], eval_fn, tokenizer_dir: str,
                   tokens: Callable[[dict], float], final_extra=None, state=None, export=None) -> loop.TrainResult:
    """The :class:`loop.Job` of a supervised trainer (SFT, reward model): one optimiser step per batch
    of ``batch_keys``, ``cfg.steps`` steps, the optimiser and schedule of ``cfg.optim``. ``state``: a
    prebuilt initial state (e.g. a stacked reward-model ensemble) instead of one from ``params``;
    ``export(state, out_dir)``: instead of one Hugging Face export of ``state.params``."""
    if state is None:
        tx = make_optimizer(cfg.optim, params, total_steps=cfg.steps)
        state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                  rng=jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2))
    if export is None:
        export = lambda st, out: export_model(out / "export", model, st.params, tokenizer_dir)  # noqa: E731
    factor = schedule_factor(cfg.optim, cfg.steps)
    job = loop.Job(
        name=name, state=state, batches=batches, total_steps=cfg.steps, config_dict=to_dict(cfg),
        placement=placement,
        make_step=lambda placed: loop.compile_step(placement, step_fn, placed, cfg=step_cfg),
        prepare=lambda b: loop.put(placement, {k: b[k] for k in batch_keys if k in b}),
        eval_fn=eval_fn, eval_every=cfg.eval_every, tokens=lambda b, m: tokens(b),
        flops_per_token=models.flops_per_token(mconfig, cfg.data.max_length, training=True,
                                               lm_head=not isinstance(lora.base_model(model), models.ScalarHeadModel)),
        lr_fn=lambda i: cfg.optim.learning_rate * float(factor(i)), final_extra=final_extra,
        export=export if cfg.export else None)
    result = loop.run(job, out_dir=cfg.out_dir, ckpt_cfg=cfg.checkpoint, log_cfg=cfg.log, resume=cfg.resume)
    return dataclasses.replace(result, model=model)
