"""DPO family (RLHF_SPEC §4): one jitted step on preference batches.

A preference batch (``rlhf_jax.data`` layout) holds right-padded full sequences
``chosen_ids/chosen_mask/rejected_ids/rejected_mask [B, L]`` (prompt + completion, mask 1 on real
tokens), the completion masks ``chosen_loss_mask/rejected_loss_mask [B, L]`` (1 on the
completion tokens only) and optionally ``example_mask [B]`` (0 on padding pairs, which then do
not count). The sequence log-prob of a completion is

    logπ(y|x) = Σ_t loss_mask[t+1] · log softmax(logits[t])[ids[t+1]]

(``losses.sequence_logprobs`` on the shifted arrays, summed). Reference log-probs either come
precomputed in the batch (``ref_chosen_logp``/``ref_rejected_logp [B]``, see
:func:`precompute_reference_logps`) or are computed on the fly from ``DPOFrozen.ref_params``.
"""
from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhf_jax import losses
from rlhf_jax.rl.config import DPOConfig, DPOHParams, static_part
from rlhf_jax.rl.ppo import own_copy, set_learning_rate
from rlhf_jax.training.state import TrainState

Array = jax.Array
TRACE_COUNTS: collections.Counter = collections.Counter()

_REQUIRED = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "chosen_loss_mask",
             "rejected_loss_mask")


@struct.dataclass
class DPOFrozen:
    """Reference params (None when every batch carries precomputed reference log-probs) and the
    policy's Flax module (static)."""
    ref_params: Any
    model: Any = struct.field(pytree_node=False, default=None)


def init_dpo_state(*, model, params, tx: optax.GradientTransformation, cfg: DPOConfig,
                   hparams: DPOHParams | None = None, rng: Array | int = 0) -> TrainState:
    """The policy's ``TrainState`` (all leaves copied: the state is donated, the reference is not)."""
    cfg.validate()
    hparams = DPOHParams.from_config(cfg) if hparams is None else hparams
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=rng)
    return own_copy(state.replace(opt_state=set_learning_rate(state.opt_state, hparams.lr)))


def check_preference_batch(batch: dict, where: str = "dpo") -> None:
    missing = [k for k in _REQUIRED if k not in batch]
    if missing:
        raise KeyError(f"{where}: preference batch lacks {missing} (has {sorted(batch)}); the completion masks "
                       "chosen_loss_mask/rejected_loss_mask mark the response tokens")
    shape = jnp.shape(batch["chosen_ids"])
    for k in _REQUIRED:
        if jnp.shape(batch[k])[0] != shape[0] or jnp.ndim(batch[k]) != 2:
            raise ValueError(f"{where}: batch[{k!r}] has shape {jnp.shape(batch[k])}; expected [B, L] with "
                             f"B = {shape[0]}")


def completion_logps(model, params, ids: Array, mask: Array, loss_mask: Array) -> tuple[Array, Array]:
    """``(Σ_t logπ(y_t | y_<t, x) [B], completion length [B])`` of right-padded sequences."""
    logits = model.apply(params, ids.astype(jnp.int32), attention_mask=mask.astype(jnp.int32))
    if isinstance(logits, tuple):
        logits = logits[0]
    tgt_mask = loss_mask[:, 1:]
    logp = losses.sequence_logprobs(logits[:, :-1].astype(jnp.float32), ids[:, 1:].astype(jnp.int32), tgt_mask)
    return jnp.sum(logp, axis=1), jnp.sum(tgt_mask.astype(jnp.float32), axis=1)


def _pair_logps(model, params, batch: dict) -> dict[str, Array]:
    """Chosen and rejected in one forward pass of ``2B`` rows (same padded length L)."""
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    lmask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]], axis=0)
    logp, length = completion_logps(model, params, ids, mask, lmask)
    b = batch["chosen_ids"].shape[0]
    return {"chosen_logp": logp[:b], "rejected_logp": logp[b:], "chosen_len": length[:b],
            "rejected_len": length[b:]}


def _reference_logps_impl(model, ref_params, batch: dict) -> dict[str, Array]:
    out = _pair_logps(model, jax.lax.stop_gradient(ref_params), batch)
    return {"ref_chosen_logp": out["chosen_logp"], "ref_rejected_logp": out["rejected_logp"]}


_reference_logps_jit = jax.jit(_reference_logps_impl, static_argnums=(0,))


def precompute_reference_logps(model, ref_params, batch: dict) -> dict[str, Array]:
    """``{"ref_chosen_logp": [B], "ref_rejected_logp": [B]}`` under the frozen reference (jitted).

    Add them to a batch (``{**batch, **refs}``) and :func:`dpo_step` uses them instead of a
    reference forward pass.
    """
    check_preference_batch(batch, "precompute_reference_logps")
    return _reference_logps_jit(model, ref_params, {k: jnp.asarray(batch[k]) for k in _REQUIRED})


def dpo_step_pure(state: TrainState, frozen: DPOFrozen, batch: dict, *, cfg: DPOConfig,
                  hparams: DPOHParams) -> tuple[TrainState, dict]:
    """One DPO update: ``losses.dpo_loss`` on the batch, gradient step with the traced lr."""
    TRACE_COUNTS["dpo_step"] += 1
    if "ref_chosen_logp" in batch:
        ref = {"ref_chosen_logp": batch["ref_chosen_logp"], "ref_rejected_logp": batch["ref_rejected_logp"]}
    else:
        if frozen.ref_params is None:
            raise ValueError("dpo_step: the batch has no ref_chosen_logp/ref_rejected_logp and DPOFrozen.ref_params "
                             "is None")
        ref = _reference_logps_impl(frozen.model, frozen.ref_params, batch)

    def loss_fn(params):
        pol = _pair_logps(frozen.model, params, batch)
        loss, m = losses.dpo_loss(pol["chosen_logp"], pol["rejected_logp"], ref["ref_chosen_logp"],
                                  ref["ref_rejected_logp"], beta=hparams.beta, loss_type=cfg.loss_type,
                                  label_smoothing=hparams.label_smoothing, chosen_len=pol["chosen_len"],
                                  rejected_len=pol["rejected_len"], mask=batch.get("example_mask"))
        m = dict(m)
        m["policy_chosen_logp"] = jnp.mean(pol["chosen_logp"])
        m["policy_rejected_logp"] = jnp.mean(pol["rejected_logp"])
        return loss, m

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    state = state.replace(opt_state=set_learning_rate(state.opt_state, hparams.lr))
    return state.apply_gradients(grads), metrics


def dpo_eval_pure(params, frozen: DPOFrozen, batch: dict, *, cfg: DPOConfig, hparams: DPOHParams) -> dict:
    """DPO loss metrics of ``params`` on a batch (no update)."""
    if "ref_chosen_logp" in batch:
        ref = {"ref_chosen_logp": batch["ref_chosen_logp"], "ref_rejected_logp": batch["ref_rejected_logp"]}
    else:
        ref = _reference_logps_impl(frozen.model, frozen.ref_params, batch)
    pol = _pair_logps(frozen.model, params, batch)
    _, m = losses.dpo_loss(pol["chosen_logp"], pol["rejected_logp"], ref["ref_chosen_logp"],
                           ref["ref_rejected_logp"], beta=hparams.beta, loss_type=cfg.loss_type,
                           label_smoothing=hparams.label_smoothing, chosen_len=pol["chosen_len"],
                           rejected_len=pol["rejected_len"], mask=batch.get("example_mask"))
    return m


_dpo_step_jit = jax.jit(dpo_step_pure, static_argnames=("cfg",), donate_argnums=(0,))
_dpo_eval_jit = jax.jit(dpo_eval_pure, static_argnames=("cfg",))


def _device_batch(batch: dict) -> dict:
    keys = list(_REQUIRED) + [k for k in ("ref_chosen_logp", "ref_rejected_logp", "example_mask") if k in batch]
    return {k: jnp.asarray(batch[k]) for k in keys}


def dpo_step(state: TrainState, frozen: DPOFrozen, batch: dict, *, cfg: DPOConfig,
             hparams: DPOHParams | None = None) -> tuple[TrainState, dict]:
    """Jitted DPO step (state donated). Metrics: loss, chosen/rejected reward (β·Δ), reward_margin,
    reward_accuracy, grad_norm."""
    check_preference_batch(batch, "dpo_step")
    hparams = DPOHParams.from_config(cfg) if hparams is None else hparams
    return _dpo_step_jit(state, frozen, _device_batch(batch), cfg=static_part(cfg.validate()), hparams=hparams)


def dpo_eval(params, frozen: DPOFrozen, batch: dict, *, cfg: DPOConfig, hparams: DPOHParams | None = None) -> dict:
    """Jitted DPO metrics of ``params`` on a batch (implicit reward margin and accuracy)."""
    check_preference_batch(batch, "dpo_eval")
    hparams = DPOHParams.from_config(cfg) if hparams is None else hparams
    return _dpo_eval_jit(params, frozen, _device_batch(batch), cfg=static_part(cfg.validate()), hparams=hparams)
