"""DPO family (docs/MATH.md, preference methods): one jitted step on preference batches.

A preference batch (``rlhf_jax.data`` layout) holds right-padded full sequences
``chosen_ids/chosen_mask/rejected_ids/rejected_mask [B, L]`` (prompt + completion, mask 1 on real
tokens), the completion masks ``chosen_loss_mask/rejected_loss_mask [B, L]`` (1 on the
completion tokens only) and optionally ``example_mask [B]`` (0 on padding pairs, which then do
not count). The sequence log-prob of a completion is

    logπ(y|x) = Σ_t loss_mask[t+1] · log softmax(logits[t])[ids[t+1]]

(``losses.sequence_logprobs`` on the shifted arrays, summed). Reference log-probs either come
precomputed in the batch (``ref_chosen_logp``/``ref_rejected_logp [B]``, see
:func:`precompute_reference_logps`) or are computed on the fly from ``DPOFrozen.ref_params``.

``loss_type`` picks the objective: the DPO family (``losses.dpo_loss``), SimPO and ORPO
(reference-free, on the length-normalised log-probs ``logπ(y|x) / |y|``; ORPO adds the chosen
completions' token-mean NLL) and KTO on paired data (chosen = desirable, rejected = undesirable; its
reference point is the policy-reference KL of the batch's mismatched pairs: prompt i with the completion
of row i+1, by a policy and a reference forward pass each step, or 0).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from rlhf_jax import devices as devices_lib
from rlhf_jax import losses, models
from rlhf_jax.config import ConfigError, to_dict
from rlhf_jax.data import DataConfig, load_tokenizer, make_iterator
from rlhf_jax.rl.core import RL_OPTIM, ReadsHParams, own_copy, traced_hparams, train_state
from rlhf_jax.rl.validation import check_choice, check_positive, concrete, fail
from rlhf_jax.training import loop
from rlhf_jax.training import mesh as mesh_lib
from rlhf_jax.models import lora
from rlhf_jax.training.common import (build_model, check_path, export_model, get_task_or_none,
                                      require_tokenizer_dir)
from rlhf_jax.training.configs import ModelSection, RunConfig
from rlhf_jax.training.metrics import to_host_scalars
from rlhf_jax.training.optim import OptimConfig, make_optimizer, schedule_factor
from rlhf_jax.training.state import TrainState

Array = jax.Array
TRACE_COUNTS: collections.Counter = collections.Counter()

_REQUIRED = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "chosen_loss_mask",
             "rejected_loss_mask")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "rdpo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


@struct.dataclass
class DPOHParams:
    """DPO's traced hyper-parameters: beta β (0.1; SimPO's β, ORPO's λ, KTO's β), label_smoothing ε
    (robust/cDPO and SimPO; 0.0), lr (1e-6), simpo_gamma (SimPO's target margin γ, 0.5 as TRL's
    CPOConfig; the SimPO paper uses β = 2–2.5 with γ = β/2 or so), kto_desirable_weight /
    kto_undesirable_weight (KTO's λ_D, λ_U: 1.0, 1.0 as the paper for balanced data)."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    lr: float = 1e-6
    simpo_gamma: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0

    def traced(self) -> "DPOHParams":
        return traced_hparams(self)

    def validate(self, prefix: str) -> None:
        check_positive(prefix, "beta", self.beta)
        check_positive(prefix, "lr", self.lr, strict=False)
        if concrete(self.label_smoothing) and not 0.0 <= self.label_smoothing < 0.5:
            fail(prefix, "label_smoothing", self.label_smoothing, "a number in [0, 0.5)")
        for name in ("simpo_gamma", "kto_desirable_weight", "kto_undesirable_weight"):
            check_positive(prefix, name, getattr(self, name), strict=False)


@struct.dataclass
class DPOConfig(ReadsHParams):
    """The DPO section of a trainer config: ``losses.dpo_loss`` on sequence log-probs of chosen/rejected.

    Static: loss_type (sigmoid|hinge|ipo|robust|rdpo|simpo|orpo|kto), precompute_ref (reference
    log-probs computed once over the dataset before training, else by a reference forward pass every
    step; SimPO/ORPO use no reference), kto_reference_point ("mismatched": KTO's z is the mean
    policy-reference log-ratio of the batch's mismatched pairs, a policy and a reference forward pass
    every step; "zero": z = 0).
    Traced: ``hparams`` (:class:`DPOHParams`).
    """
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "rdpo", "simpo", "orpo", "kto"] = struct.field(
        pytree_node=False, default="sigmoid")
    precompute_ref: bool = struct.field(pytree_node=False, default=True)
    kto_reference_point: Literal["mismatched", "zero"] = struct.field(pytree_node=False, default="mismatched")
    hparams: DPOHParams = DPOHParams()

    name = "dpo"

    @property
    def uses_ref(self) -> bool:
        """Whether the loss needs reference log-probs (SimPO and ORPO are reference-free)."""
        return self.loss_type not in REFERENCE_FREE

    @property
    def ref_forward_each_step(self) -> bool:
        """Whether every step needs a reference forward pass even with precomputed log-probs (KTO's
        mismatched reference point)."""
        return self.loss_type == "kto" and self.kto_reference_point == "mismatched"

    def validate(self, prefix: str = "dpo.") -> "DPOConfig":
        check_choice(prefix, "loss_type", self.loss_type, DPO_LOSS_TYPES)
        check_choice(prefix, "kto_reference_point", self.kto_reference_point, ("mismatched", "zero"))
        self.hparams.validate(prefix)
        return self


@struct.dataclass
class DPOFrozen:
    """Reference params (None when every batch carries precomputed reference log-probs) and the
    policy's Flax module (static)."""
    ref_params: Any
    model: Any = struct.field(pytree_node=False, default=None)


def init_dpo_state(*, model, params, tx, cfg: DPOConfig, rng: Array | int = 0) -> TrainState:
    """The policy's ``TrainState`` (all leaves copied: the state is donated, the reference is not); every
    update is scaled by the traced ``cfg.hparams.lr`` (``rl.core.train_state``)."""
    cfg.validate()
    return own_copy(train_state(model.apply, params, tx, rng))


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


def completion_logps(model, params, ids: Array, mask: Array, loss_mask: Array, *,
                     dropout_rng: Array | None = None) -> tuple[Array, Array]:
    """``(Σ_t logπ(y_t | y_<t, x) [B], completion length [B])`` of right-padded sequences.

    With ``model.config.logits_chunk > 0`` the LM head runs that many positions at a time
    (``losses.chunked_token_logprobs``): the same numbers without a whole ``[B, L, V]`` buffer.
    ``dropout_rng``: the forward's ``"dropout"`` key (the policy's training forward: a LoRA policy with
    ``lora_dropout`` > 0 drops out its adapters' input); None = deterministic (reference, evaluation)."""
    tgt_mask = loss_mask[:, 1:]
    targets = ids[:, 1:].astype(jnp.int32)
    chunk = int(getattr(model.config, "logits_chunk", 0) or 0)
    cls = type(model)
    kw = {} if dropout_rng is None else {"rngs": {"dropout": dropout_rng}}
    if chunk and hasattr(cls, "hidden_states") and hasattr(cls, "logits_from_hidden"):
        hidden = model.apply(params, ids.astype(jnp.int32), attention_mask=mask.astype(jnp.int32),
                             method=cls.hidden_states, **kw)
        head = lambda h: model.apply(params, h, method=cls.logits_from_hidden)  # noqa: E731  (no adapters)
        logp, _ = losses.chunked_token_logprobs(head, hidden[:, :-1], targets, tgt_mask, chunk=chunk)
    else:
        logits = model.apply(params, ids.astype(jnp.int32), attention_mask=mask.astype(jnp.int32), **kw)
        if isinstance(logits, tuple):
            logits = logits[0]
        logp = losses.sequence_logprobs(logits[:, :-1].astype(jnp.float32), targets, tgt_mask)
    return jnp.sum(logp, axis=1), jnp.sum(tgt_mask.astype(jnp.float32), axis=1)


def _pair_logps(model, params, batch: dict, dropout_rng: Array | None = None) -> dict[str, Array]:
    """Chosen and rejected in one forward pass of ``2B`` rows (same padded length L)."""
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    lmask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]], axis=0)
    logp, length = completion_logps(model, params, ids, mask, lmask, dropout_rng=dropout_rng)
    b = batch["chosen_ids"].shape[0]
    return {"chosen_logp": logp[:b], "rejected_logp": logp[b:], "chosen_len": length[:b],
            "rejected_len": length[b:]}


def mismatched_rows(ids: Array, mask: Array, loss_mask: Array) -> tuple[Array, Array, Array]:
    """Row i's prompt followed by row (i+1 mod N)'s completion, right-padded to the same width L (a
    completion that no longer fits is cut): KTO's mismatched pairs. ``[N, L]`` each -> ``(ids, mask,
    loss_mask)``. The prompt is the real tokens before the completion (loss_mask 0), at the row's start."""
    lm = loss_mask.astype(jnp.int32)
    real = mask.astype(jnp.int32)
    prompt_len = jnp.sum(real * (1 - lm), axis=1)
    comp_len = jnp.sum(lm, axis=1)
    src_ids, src_start, src_len = (jnp.roll(ids, -1, axis=0), jnp.roll(prompt_len, -1),
                                   jnp.roll(comp_len, -1))
    k = jnp.arange(ids.shape[1])[None, :]
    p = prompt_len[:, None]
    in_prompt = k < p
    in_comp = (k >= p) & (k - p < src_len[:, None])
    idx = jnp.clip(src_start[:, None] + k - p, 0, ids.shape[1] - 1)
    comp = jnp.take_along_axis(src_ids, idx, axis=1)
    new_ids = jnp.where(in_prompt, ids, jnp.where(in_comp, comp, 0)).astype(ids.dtype)
    return new_ids, (in_prompt | in_comp).astype(mask.dtype), in_comp.astype(loss_mask.dtype)


def _mismatched_logp(model, params, batch: dict) -> Array:
    """Completion log-probs ``[2B]`` of the batch's mismatched pairs (chosen and rejected rows together)."""
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    lmask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]], axis=0)
    logp, _ = completion_logps(model, params, *mismatched_rows(ids, mask, lmask))
    return logp


def _kto_reference_point(frozen: "DPOFrozen", params, batch: dict, cfg: "DPOConfig") -> Array | None:
    """KTO's z estimate (before the clamp at 0): mean over the mismatched pairs of logπ − logπ_ref
    (padding pairs excluded), or None for ``kto_reference_point="zero"``."""
    if cfg.loss_type != "kto" or cfg.kto_reference_point == "zero":
        return None
    if frozen.ref_params is None:
        raise ValueError("dpo_step: KTO's mismatched reference point needs DPOFrozen.ref_params (a reference "
                         "forward pass every step); or set dpo.kto_reference_point='zero'")
    ratio = (_mismatched_logp(frozen.model, jax.lax.stop_gradient(params), batch)
             - _mismatched_logp(frozen.model, jax.lax.stop_gradient(frozen.ref_params), batch))
    w = batch.get("example_mask")
    w = jnp.ones_like(ratio) if w is None else jnp.concatenate([w, w]).astype(jnp.float32)
    return jax.lax.stop_gradient(losses.masked_mean(ratio, w))


def preference_loss(pol: dict, ref: dict | None, batch: dict, cfg: "DPOConfig", kl_ref=None) -> tuple[Array, dict]:
    """The configured objective on the policy's (and reference's) completion log-probs and lengths.

    Metrics always include loss, chosen_reward, rejected_reward, reward_margin, reward_accuracy, num_pairs
    (SimPO/ORPO: rewards are β·logπ(y|x)/|y|; KTO: β·(logπ − logπ_ref), accuracy per pair)."""
    hp = cfg.hparams
    mask = batch.get("example_mask")
    if cfg.loss_type == "simpo" or cfg.loss_type == "orpo":
        c_avg = pol["chosen_logp"] / jnp.maximum(pol["chosen_len"], 1.0)
        r_avg = pol["rejected_logp"] / jnp.maximum(pol["rejected_len"], 1.0)
        if cfg.loss_type == "simpo":
            return losses.simpo_loss(c_avg, r_avg, beta=hp.beta, gamma=hp.simpo_gamma,
                                     label_smoothing=hp.label_smoothing, mask=mask)
        w = jnp.ones_like(pol["chosen_len"]) if mask is None else mask.astype(jnp.float32)
        nll = -jnp.sum(pol["chosen_logp"] * w) / jnp.maximum(jnp.sum(pol["chosen_len"] * w), 1.0)
        return losses.orpo_loss(c_avg, r_avg, beta=hp.beta, nll=nll, mask=mask)
    if cfg.loss_type == "kto":
        b = pol["chosen_logp"].shape[0]
        desirable = jnp.concatenate([jnp.ones((b,), bool), jnp.zeros((b,), bool)])
        both = None if mask is None else jnp.concatenate([mask, mask])
        loss, m = losses.kto_loss(jnp.concatenate([pol["chosen_logp"], pol["rejected_logp"]]),
                                  jnp.concatenate([ref["ref_chosen_logp"], ref["ref_rejected_logp"]]), desirable,
                                  beta=hp.beta, desirable_weight=hp.kto_desirable_weight,
                                  undesirable_weight=hp.kto_undesirable_weight, kl_ref=kl_ref, mask=both)
        r_c = pol["chosen_logp"] - ref["ref_chosen_logp"]
        r_r = pol["rejected_logp"] - ref["ref_rejected_logp"]
        w = jnp.ones_like(r_c) if mask is None else mask.astype(jnp.float32)
        m = dict(m, reward_accuracy=losses.masked_mean((r_c > r_r).astype(jnp.float32), w), num_pairs=jnp.sum(w))
        return loss, m
    return losses.dpo_loss(pol["chosen_logp"], pol["rejected_logp"], ref["ref_chosen_logp"],
                           ref["ref_rejected_logp"], beta=hp.beta, loss_type=cfg.loss_type,
                           label_smoothing=hp.label_smoothing, chosen_len=pol["chosen_len"],
                           rejected_len=pol["rejected_len"], mask=mask)


def _reference(frozen: "DPOFrozen", batch: dict, cfg: "DPOConfig", where: str) -> dict | None:
    if not cfg.uses_ref:
        return None
    if "ref_chosen_logp" in batch:
        return {"ref_chosen_logp": batch["ref_chosen_logp"], "ref_rejected_logp": batch["ref_rejected_logp"]}
    if frozen.ref_params is None:
        raise ValueError(f"{where}: the batch has no ref_chosen_logp/ref_rejected_logp and DPOFrozen.ref_params "
                         "is None")
    return _reference_logps_impl(frozen.model, frozen.ref_params, batch)


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


def _lora_reference(frozen: DPOFrozen, params) -> DPOFrozen:
    """A LoRA policy's reference is its own base without the adapters (``ref_params=None``): no copy."""
    if frozen.ref_params is None and lora.is_lora_params(params):
        return frozen.replace(ref_params=lora.base_params(params))
    return frozen


def dpo_step_pure(state: TrainState, frozen: DPOFrozen, batch: dict, cfg: DPOConfig) -> tuple[TrainState, dict]:
    """One DPO update: ``losses.dpo_loss`` on the batch, gradient step with the traced lr.

    A LoRA policy with ``lora_dropout`` > 0 drops out its adapters' input in the policy's chosen/rejected
    forward (key: ``lora.dropout_key(state.step_rng())``, the same masks after a resume); the reference
    log-probs and KTO's reference point run without dropout."""
    TRACE_COUNTS["dpo_step"] += 1
    hparams = cfg.hparams
    frozen = _lora_reference(frozen, state.params)
    ref = _reference(frozen, batch, cfg, "dpo_step")
    kl_ref = _kto_reference_point(frozen, state.params, batch, cfg)
    drop = lora.dropout_key(state.step_rng())

    def loss_fn(params):
        pol = _pair_logps(frozen.model, params, batch, drop)
        loss, m = preference_loss(pol, ref, batch, cfg, kl_ref)
        m = dict(m)
        m["policy_chosen_logp"] = jnp.mean(pol["chosen_logp"])
        m["policy_rejected_logp"] = jnp.mean(pol["rejected_logp"])
        return loss, m

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads, hparams.lr), metrics


def dpo_eval_pure(params, frozen: DPOFrozen, batch: dict, cfg: DPOConfig) -> dict:
    """The configured loss's metrics of ``params`` on a batch (no update)."""
    frozen = _lora_reference(frozen, params)
    ref = _reference(frozen, batch, cfg, "dpo_eval")
    _, m = preference_loss(_pair_logps(frozen.model, params, batch), ref, batch, cfg,
                           _kto_reference_point(frozen, params, batch, cfg))
    return m


_dpo_step_jit = jax.jit(dpo_step_pure, donate_argnums=(0,))
_dpo_eval_jit = jax.jit(dpo_eval_pure)


def _traced(cfg: DPOConfig) -> DPOConfig:
    return cfg.validate().replace(hparams=cfg.hparams.traced())


def _batch_keys(batch: dict) -> dict:
    """The entries of a preference batch the step reads."""
    keys = list(_REQUIRED) + [k for k in ("ref_chosen_logp", "ref_rejected_logp", "example_mask") if k in batch]
    return {k: batch[k] for k in keys}


def _device_batch(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in _batch_keys(batch).items()}


def dpo_step(state: TrainState, frozen: DPOFrozen, batch: dict, *, cfg: DPOConfig) -> tuple[TrainState, dict]:
    """Jitted DPO step (state donated). Metrics: loss, chosen/rejected reward (β·Δ), reward_margin,
    reward_accuracy, grad_norm."""
    check_preference_batch(batch, "dpo_step")
    return _dpo_step_jit(state, frozen, _device_batch(batch), _traced(cfg))


def dpo_eval(params, frozen: DPOFrozen, batch: dict, *, cfg: DPOConfig) -> dict:
    """Jitted DPO metrics of ``params`` on a batch (implicit reward margin and accuracy)."""
    check_preference_batch(batch, "dpo_eval")
    return _dpo_eval_jit(params, frozen, _device_batch(batch), _traced(cfg))


# ---------------------------------------------------------------------------------------------
# The DPO trainer
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DPOTrainConfig(RunConfig):
    """A DPO run: the policy starts from ``policy`` (the SFT model), the reference is a frozen copy.

    Pairs from ``data.path`` (``preference`` format) or, when empty, the task's simulated-labeller
    pairs (``noise`` < 0: the task's default labeller noise). ``data.batch_size`` pairs per step.
    ``dpo.precompute_ref``: reference log-probs are computed once over the training set before the
    first step (looked up by example index), else by a reference forward pass in every step.
    Evaluation (implicit reward margin/accuracy on ``eval_path`` or the task's validation pairs)
    every ``eval_every`` steps over ``eval_batches`` batches.
    """
    task: str = "sentiment"
    data: DataConfig = DataConfig(batch_size=8, max_length=64)
    out_dir: str = "runs/dpo"
    policy: ModelSection = ModelSection(name="task")
    noise: float = -1.0
    eval_path: str = ""
    eval_batches: int = 4
    eval_every: int = 50
    dpo: DPOConfig = DPOConfig()
    optim: OptimConfig = RL_OPTIM
    steps: int = 100


_PREF_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "chosen_loss_mask",
              "rejected_loss_mask", "example_mask")


def _preference_iterator(cfg: DPOTrainConfig, task, tokenizer, split: str, **kw):
    path = cfg.data.path if split == "train" else cfg.eval_path
    src = None
    if not path:
        if task is None:
            return None
        src = task.preference_records(split, None if cfg.noise < 0 else cfg.noise)
    nproc, pid = jax.process_count(), jax.process_index()
    return make_iterator(cfg.data, "preference", tokenizer=tokenizer, source=src, host_id=pid, num_hosts=nproc,
                         batch_size=cfg.data.batch_size // nproc, seed=cfg.data.seed or cfg.seed, **kw)


def validate_dpo_config(cfg: DPOTrainConfig) -> None:
    if not isinstance(cfg, DPOTrainConfig):
        raise ConfigError(f"train_dpo expects a DPOTrainConfig, got {type(cfg).__name__}")
    cfg.dpo.validate()
    cfg.validate_run()
    if cfg.steps < 1:
        raise ConfigError(f"config key 'steps': must be >= 1, got {cfg.steps}")
    if cfg.mesh.mode != "jit":
        raise ConfigError(f"config key 'mesh.mode': DPO runs on a jit mesh, got {cfg.mesh.mode!r}")
    cfg.optim.validate()
    cfg.policy.validate("policy.", lora_dropout_ok=True)
    loop.validate_layout(cfg.mesh, cfg.data.batch_size, 1)
    check_path("data.path", cfg.data.path)
    check_path("eval_path", cfg.eval_path)
    if not cfg.data.path and get_task_or_none(cfg.task) is None:
        raise ConfigError("config key 'data.path': empty and no 'task' given; nothing to train on")


def _reference_table(cfg: DPOTrainConfig, task, tokenizer, model, params) -> dict[int, tuple[float, float]]:
    """Reference log-probs of every training pair, by example index (one pass over the data)."""
    table: dict[int, tuple[float, float]] = {}
    for b in _preference_iterator(cfg, task, tokenizer, "train", shuffle=False, num_epochs=1):
        refs = precompute_reference_logps(model, params, b)
        for j, idx in enumerate(np.asarray(b["example_index"])):
            if idx >= 0:
                table[int(idx)] = (float(refs["ref_chosen_logp"][j]), float(refs["ref_rejected_logp"][j]))
    return table


def _dpo_evaluator(cfg: DPOTrainConfig, task, tokenizer, model, ref_params) -> Callable[[TrainState], dict]:
    def evaluate(st) -> dict:
        it = _preference_iterator(cfg, task, tokenizer, "validation", shuffle=False, num_epochs=1)
        if it is None:
            return {}
        frozen = DPOFrozen(ref_params=ref_params, model=model)
        rows = [to_host_scalars(dpo_eval(st.params, frozen, {k: b[k] for k in _PREF_KEYS}, cfg=cfg.dpo))
                for _, b in zip(range(cfg.eval_batches), it)]
        if not rows:
            return {}
        weights = np.asarray([r["num_pairs"] for r in rows])
        return {k: float(np.average([r[k] for r in rows], weights=weights)) for k in rows[0] if k != "num_pairs"}
    return evaluate


def train_dpo(cfg: DPOTrainConfig) -> loop.TrainResult:
    """DPO (sigmoid/hinge/IPO/robust/rDPO), SimPO, ORPO or KTO from a config (CLI: ``rlhf-jax dpo``), through the one loop."""
    validate_dpo_config(cfg)
    task = get_task_or_none(cfg.task)
    tok_dir = require_tokenizer_dir(cfg.data.tokenizer, cfg.policy.path, task, "policy")
    tokenizer = load_tokenizer(tok_dir)
    rng = jax.random.PRNGKey(cfg.seed)
    model, params, mconfig = build_model(cfg.policy, task=task, tokenizer=tokenizer, head=None,
                                         rng=jax.random.fold_in(rng, 1), prefix="policy.", lora_dropout_ok=True)
    algo = cfg.dpo
    tx = make_optimizer(dataclasses.replace(cfg.optim, learning_rate=1.0), params, total_steps=cfg.steps)
    state = init_dpo_state(model=model, params=params, tx=tx, cfg=algo, rng=jax.random.fold_in(rng, 2))
    ref_params = lora.base_params(params) if lora.is_lora_params(params) else params  # LoRA: base, adapters off
    table = None
    if algo.precompute_ref and algo.uses_ref:  # (a plan compiles the step only: the table's values are not needed)
        table = {} if devices_lib.abstract() else _reference_table(cfg, task, tokenizer, model, ref_params)
    needs_ref = algo.ref_forward_each_step or (algo.uses_ref and table is None)
    placement = loop.make_placement(cfg.mesh)
    # a LoRA reference is read from the state's own base at each step (None here: no second copy)
    frozen_ref = ref_params if needs_ref and not lora.is_lora_params(params) else None
    if frozen_ref is not None:  # sharded like the policy (fsdp), replicated over data
        frozen_ref = mesh_lib.place(frozen_ref, mesh_lib.param_sharding(placement.mesh, frozen_ref))
    frozen = DPOFrozen(ref_params=frozen_ref, model=model)

    def with_refs(b: dict) -> dict:
        out = {k: b[k] for k in _PREF_KEYS if k in b}
        if table is not None:
            pairs = np.asarray([table.get(int(i), (0.0, 0.0)) for i in np.asarray(b["example_index"])], np.float32)
            out["ref_chosen_logp"], out["ref_rejected_logp"] = pairs[:, 0], pairs[:, 1]
        return out

    factor = schedule_factor(cfg.optim, cfg.steps)
    job = loop.Job(
        name="dpo", state=state, batches=_preference_iterator(cfg, task, tokenizer, "train"),
        total_steps=cfg.steps, config_dict=to_dict(cfg), placement=placement,
        make_step=lambda placed: (lambda st, b: dpo_step(st, frozen, b, cfg=algo)),
        prepare=lambda b: loop.put(placement, with_refs(b)), unplace=lambda st: st,
        programs=lambda st, b: [loop.Program("dpo_step", _dpo_step_jit, (st, frozen, _batch_keys(b), _traced(algo)), {})],
        eval_fn=_dpo_evaluator(cfg, task, tokenizer, model, None if lora.is_lora_params(params) else params), eval_every=cfg.eval_every,
        tokens=lambda b, m: float(2 * np.asarray(b["chosen_ids"]).size),
        # the policy's forward + backward on chosen and rejected, and the reference's forward when it runs
        flops_per_token=models.flops_per_token(mconfig, cfg.data.max_length, training=True)
        + (models.flops_per_token(mconfig, cfg.data.max_length, training=False) if needs_ref else 0.0),
        lr_fn=lambda i: float(algo.hparams.lr) * float(factor(i)),
        export=(lambda st, out: export_model(out / "export", model, st.params, tok_dir)) if cfg.export else None)
    result = loop.run(job, out_dir=cfg.out_dir, ckpt_cfg=cfg.checkpoint, log_cfg=cfg.log, resume=cfg.resume)
    return dataclasses.replace(result, model=model)
