"""Supervised fine-tuning: the pure step, the trainer ``train_sft(cfg)`` and ``rlhf-jax sft``.

Loss (docs/MATH.md §1): token cross-entropy on response tokens, ``Σ m·ℓ / Σ m`` over the
GLOBAL batch (``reduction="token"``) or the mean of per-sequence means
(``"sequence"``); numerators and denominators are carried through micro-batches
and devices and divided once (``steps.update_step``).

    rlhf-jax sft --config experiments/sft_sorting.py --out runs/sft optim.learning_rate=1e-3
    rlhf-jax sft task=sorting model.name=task steps=200 --out runs/sft      # no config file
    rlhf-jax sft ... --resume                                              # continue a killed run
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax

from rlhf_jax.config import ConfigError
from rlhf_jax.data import DataConfig, load_tokenizer, make_iterator
from rlhf_jax.losses import sft_loss, sft_loss_chunked
from rlhf_jax.models import lora
from rlhf_jax.training import loop, steps
from rlhf_jax.training.common import (build_model, get_task_or_none, resolve_tokenizer_dir, run_supervised,
                                      validate_supervised)
from rlhf_jax.training.configs import ModelSection, RunConfig
from rlhf_jax.training.optim import OptimConfig
from rlhf_jax.training.state import TrainState

SFT_BATCH_KEYS = ("input_ids", "targets", "loss_mask", "attention_mask", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class SFTConfig(RunConfig):
    """Everything an SFT run needs (the shared run section, :class:`RunConfig`, plus the fields below).

    Data: ``data.path`` (JSONL/Parquet/``tfds:``) in the ``sft`` format, or, when empty,
    the embedded ``task``'s demonstrations. Held-out loss from ``eval_path`` (or the
    task's ``validation`` split) every ``eval_every`` steps over ``eval_batches`` batches.
    """
    data: DataConfig = DataConfig(batch_size=8, max_length=128)
    out_dir: str = "runs/sft"
    model: ModelSection = ModelSection()
    eval_path: str = ""
    eval_batches: int = 4
    optim: OptimConfig = OptimConfig()
    steps: int = 100
    micro_batches: int = 1
    reduction: Literal["token", "sequence"] = "token"
    eval_every: int = 50


@dataclasses.dataclass(frozen=True)
class SFTStepConfig:
    """Static step options (hashable: part of the compiled program's identity)."""
    micro_batches: int = 1
    reduction: Literal["token", "sequence"] = "token"
    logits_chunk: int = 0  # > 0: the loss's logits this many positions at a time (never [B, L, V] whole)


def sft_sums(params, batch: dict, rng, *, apply_fn, reduction: str = "token", logits_chunk: int = 0,
             axis_name: str | None = None):
    """``(loss_numerator, sums)`` of one (micro-)batch; see ``steps`` for the contract.

    ``batch``: ``input_ids, targets, loss_mask, attention_mask [B, L]`` and, for packed
    rows, ``positions, segment_ids [B, L]``. ``logits[b, t]`` predicts ``targets[b, t]``.
    ``logits_chunk > 0`` (``model.logits_chunk``): the head and the loss run ``logits_chunk``
    positions at a time (``losses.sft_loss_chunked``; same numbers, no whole ``[B, L, V]`` buffer).
    ``rng`` (the training step's key; None in evaluation): the forward's ``"dropout"`` key
    (``lora.dropout_key``), which a LoRA model with ``lora_dropout`` > 0 uses and any other model ignores.
    """
    kw = dict(attention_mask=batch["attention_mask"], positions=batch.get("positions"),
              segment_ids=batch.get("segment_ids"))
    if rng is not None:
        kw["rngs"] = {"dropout": lora.dropout_key(rng, axis_name)}
    if logits_chunk:
        hidden = apply_fn(params, batch["input_ids"], method="hidden_states", **kw)
        head = lambda h: apply_fn(params, h, method="logits_from_hidden")  # noqa: E731  (no adapters: no key)
        _, met = sft_loss_chunked(head, hidden, batch["targets"], batch["loss_mask"], chunk=logits_chunk,
                                  reduction=reduction)
    else:
        logits = apply_fn(params, batch["input_ids"], **kw)
        _, met = sft_loss(logits, batch["targets"], batch["loss_mask"], reduction=reduction)
    num, den = met["loss_numerator"], met["loss_denominator"]
    ntok = met["num_tokens"]
    return num, {"loss": (num, den), "nll": (met["nll"] * ntok, ntok),
                 "accuracy": (met["accuracy"] * ntok, ntok)}


def sft_step(state: TrainState, batch: dict, *, cfg: SFTStepConfig = SFTStepConfig(),
             axis_name: str | None = None):
    """One SFT update: ``(state, batch) -> (state, metrics)``; pure, jit/pmap it with the
    state donated. ``cfg`` is anything with ``micro_batches`` and ``reduction`` (an
    ``SFTStepConfig`` or the trainer's ``SFTConfig``; it must be hashable to be static).
    Metrics: ``loss``, ``nll``, ``accuracy`` (token means), ``count`` (loss tokens),
    ``grad_norm`` (before clipping)."""
    fn = functools.partial(sft_sums, apply_fn=state.apply_fn, reduction=cfg.reduction,
                           logits_chunk=_logits_chunk(cfg), axis_name=axis_name)
    return steps.update_step(state, batch, fn, micro_batches=cfg.micro_batches, axis_name=axis_name)


def _logits_chunk(cfg) -> int:
    """``logits_chunk`` of a step config, or ``model.logits_chunk`` of the trainer's config."""
    if hasattr(cfg, "logits_chunk"):
        return int(cfg.logits_chunk)
    model = getattr(cfg, "model", None)
    return int(getattr(model, "logits_chunk", 0) or 0)


def sft_eval_sums(params, batch: dict, *, apply_fn, reduction: str = "token", logits_chunk: int = 0) -> dict:
    """Held-out ``sums`` of one batch (add them on the host, divide once)."""
    _, sums = sft_sums(params, batch, None, apply_fn=apply_fn, reduction=reduction, logits_chunk=logits_chunk)
    return sums


# ------------------------------------------------------------------ trainer

def validate_sft_config(cfg: SFTConfig) -> None:
    """Every check that does not need a model: fails before anything compiles."""
    validate_supervised(cfg, SFTConfig)
    if cfg.data.max_length < 2:
        raise ConfigError(f"config key 'data.max_length': must be >= 2, got {cfg.data.max_length}")


def _iterators(cfg, fmt: str, task, tokenizer, records_fn, eval_records_fn):
    nproc, pid = jax.process_count(), jax.process_index()
    per_host = cfg.data.batch_size // nproc
    train_src = None if cfg.data.path else records_fn("train")
    train_it = make_iterator(cfg.data, fmt, tokenizer=tokenizer, source=train_src,
                             host_id=pid, num_hosts=nproc, batch_size=per_host,
                             seed=cfg.data.seed or cfg.seed)

    def eval_iter():
        if cfg.eval_path:
            src = cfg.eval_path
        elif task is not None:
            src = eval_records_fn("validation")
        else:
            return None
        return make_iterator(cfg.data, fmt, tokenizer=tokenizer, source=src, host_id=pid,
                             num_hosts=nproc, batch_size=per_host, shuffle=False, num_epochs=1)
    return train_it, eval_iter


def run_eval(placement, params, eval_iter_fn, eval_jit, batch_keys, max_batches: int) -> dict:
    it = eval_iter_fn()
    if it is None:
        return {}
    total = None
    for n, batch in enumerate(it):
        if n >= max_batches:
            break
        batch = {k: batch[k] for k in batch_keys if k in batch}
        if placement.mode == "jit":
            batch = loop.put(placement, batch)
        total = steps.add_sums(total, eval_jit(params, batch))
    if total is None:
        return {}
    return steps.finalize_sums(total)


def train_sft(cfg: SFTConfig) -> loop.TrainResult:
    """Trains a causal LM with SFT from ``cfg``; returns paths and final metrics.

    Writes ``out_dir/{config.json, run.json, metrics.jsonl, tb/, checkpoints/, export/}``.
    """
    validate_sft_config(cfg)
    task = get_task_or_none(cfg.task)
    tok_dir = resolve_tokenizer_dir(cfg.data.tokenizer, cfg.model.path, task)
    tokenizer = load_tokenizer(tok_dir)
    data_cfg = dataclasses.replace(cfg.data, tokenizer=tok_dir)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    placement = loop.make_placement(cfg.mesh)
    rng = jax.random.PRNGKey(cfg.seed)
    model, params, mconfig = build_model(cfg.model, task=task, tokenizer=tokenizer, head=None,
                                         rng=jax.random.fold_in(rng, 1), lora_dropout_ok=True)
    train_it, eval_iter_fn = _iterators(
        cfg, "sft", task, tokenizer,
        (lambda split: task.sft_records(split)) if task else None,
        (lambda split: task.sft_records(split)) if task else None)

    eval_jit = jax.jit(functools.partial(sft_eval_sums, apply_fn=model.apply, reduction=cfg.reduction,
                                         logits_chunk=cfg.model.logits_chunk))

    def eval_fn(st):
        return run_eval(placement, st.params, eval_iter_fn, eval_jit, SFT_BATCH_KEYS, cfg.eval_batches)

    return run_supervised(cfg, name="sft", model=model, mconfig=mconfig, params=params, placement=placement,
                          step_fn=sft_step, step_cfg=SFTStepConfig(cfg.micro_batches, cfg.reduction, cfg.model.logits_chunk),
                          batches=train_it, batch_keys=SFT_BATCH_KEYS, eval_fn=eval_fn, tokenizer_dir=tok_dir,
                          tokens=lambda b: float(b["input_ids"].size))
