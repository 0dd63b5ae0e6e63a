"""Rejection-sampling fine-tuning (RSFT; best-of-N distillation, iterated): the ``rsft`` trainer.

One iteration, one compiled program (docs/MATH.md, "Best-of-N" and "RSFT"):

    prompts [B, P] --n samples each--> rl.best_of_n.sample_n_pure (the policy at temperature τ)
      -> scores [B·n]: the reward source (gold | reward model / ensemble | JAX function)
      -> keep each prompt's proxy-best sample (rl.best_of_n.argmax_proxy)
      -> sft_epochs × training.sft.sft_step on prompt + best response (the existing SFT step: token
         cross-entropy on the response tokens)

Iterating makes the policy drift towards its own best-of-n: iteration t samples from the policy that
iteration t−1 trained. The job runs on the one training loop (``training.loop.run``) like every other
trainer; metrics: ``score`` (mean reward of all samples), ``best_score`` (of the kept ones), ``kl``
(per-sequence k1 of the samples to the frozen initial policy), ``loss`` (SFT), ``response_length``.

    rlhf-jax rsft --config experiments/rsft_sentiment_tiny.py
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from rlhf_jax.config import ConfigError, to_dict
from rlhf_jax.rl import core
from rlhf_jax.rl import experience as R
from rlhf_jax.rl.best_of_n import argmax_proxy, sample_n_pure
from rlhf_jax.rl.core import ReadsHParams, traced_hparams
from rlhf_jax.rl.trainer import (RLRunConfig, _build, _place_state, _prompt_iterator, _prompt_length,
                                 _sample_logger, export_policy, state_key, validate_rl_config)
from rlhf_jax.rl.validation import check_positive, check_positive_int, fail
from rlhf_jax.training import loop
from rlhf_jax.training import mesh as mesh_lib
from rlhf_jax.training.metrics import to_host_scalars
from rlhf_jax.training.optim import OptimConfig, make_optimizer, schedule_factor
from rlhf_jax.training.sft import SFTStepConfig, sft_step
from rlhf_jax.training.state import TrainState


@struct.dataclass
class RSFTHParams:
    """RSFT's traced sampling hyper-parameters: ``temperature`` τ and ``top_p`` of the sampler. (The SFT
    update's learning rate is ``optim.learning_rate``.)"""
    temperature: float = 1.0
    top_p: float = 1.0

    def traced(self) -> "RSFTHParams":
        return traced_hparams(self)


@struct.dataclass
class RSFTConfig(ReadsHParams):
    """RSFT's section of the trainer config.

    batch_size: prompts per iteration, B. num_samples: samples per prompt, n (best-of-n; >= 2).
    max_new_tokens: response length. sft_epochs: SFT updates on each iteration's kept samples (one
    full-batch ``sft_step`` each). stop_token_ids (empty = the tokenizer's EOS), pad_token_id, top_k
    (0 = off).
    """
    batch_size: int = struct.field(pytree_node=False, default=16)
    num_samples: int = struct.field(pytree_node=False, default=8)
    max_new_tokens: int = struct.field(pytree_node=False, default=16)
    sft_epochs: int = struct.field(pytree_node=False, default=1)
    stop_token_ids: tuple[int, ...] = struct.field(pytree_node=False, default=())
    pad_token_id: int = struct.field(pytree_node=False, default=0)
    top_k: int = struct.field(pytree_node=False, default=0)
    hparams: RSFTHParams = RSFTHParams()

    name = "rsft"
    uses_ref = True
    value_mode = None
    kl_estimator = "k1"

    @property
    def group_size(self) -> int:
        return self.num_samples

    @property
    def epochs(self) -> int:
        return self.sft_epochs

    @property
    def minibatches(self) -> int:
        return 1

    @property
    def rollout_size(self) -> int:
        return self.batch_size * self.num_samples

    @property
    def minibatch_size(self) -> int:
        return self.batch_size

    def validate(self, prefix: str = "rsft.") -> "RSFTConfig":
        for name in ("batch_size", "max_new_tokens", "sft_epochs"):
            check_positive_int(prefix, name, getattr(self, name))
        check_positive_int(prefix, "num_samples", self.num_samples, minimum=2)
        check_positive_int(prefix, "top_k", self.top_k, minimum=0)
        if not isinstance(self.stop_token_ids, tuple):
            fail(prefix, "stop_token_ids", self.stop_token_ids, "a tuple of token ids")
        check_positive(prefix, "temperature", self.hparams.temperature)
        tp = self.hparams.top_p
        if isinstance(tp, (int, float)) and not 0 < tp <= 1:
            fail(prefix, "top_p", tp, "a number in (0, 1]")
        return self


@dataclasses.dataclass(frozen=True)
class RSFTTrainConfig(RLRunConfig):
    """An RSFT run: ``iterations`` rounds of sample n → keep the best → SFT (see :mod:`rlhf_jax.rl.rsft`).
    ``optim``: the SFT updates' optimiser (its ``learning_rate`` IS used here). ``reward.kind``:
    gold | model | jax (the whole iteration is one compiled program; a Python reward is refused)."""
    out_dir: str = "runs/rsft"
    optim: OptimConfig = OptimConfig(learning_rate=3e-4, schedule="constant", b2=0.999, max_grad_norm=1.0)
    rsft: RSFTConfig = RSFTConfig()

    section: ClassVar[str] = "rsft"


def validate_rsft_config(cfg: RSFTTrainConfig) -> None:
    """Every check that needs no model (what ``--print-config`` runs)."""
    if not isinstance(cfg, RSFTTrainConfig):
        raise ConfigError(f"train_rsft expects an RSFTTrainConfig, got {type(cfg).__name__}")
    validate_rl_config(cfg)
    if cfg.reward.kind == "python":
        raise ConfigError("config key 'reward.kind': rsft scores inside its compiled iteration; use gold, model "
                          "or jax, not python")


def sft_batch_of(prompt_ids, prompt_mask, response_ids, response_mask) -> dict:
    """The ``training.sft`` batch of prompt + response rows: loss on the response tokens only."""
    ids, mask = R.concat_sequences(prompt_ids, prompt_mask, response_ids, response_mask)
    P, N = prompt_ids.shape[1], response_ids.shape[1]
    loss_mask = jnp.zeros_like(mask).at[:, P - 1:P - 1 + N].set(response_mask.astype(mask.dtype))
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "attention_mask": mask}


def rsft_iteration_pure(state: core.RLState, frozen: core.RLFrozen, prompts: dict, cfg: RSFTConfig):
    """One RSFT iteration (un-jitted): ``(new_state, metrics, kept rows)``."""
    hp = cfg.hparams
    B, n = cfg.batch_size, cfg.num_samples
    p_ids, p_mask = R.check_prompts(prompts, B, "rsft iteration")
    key = jax.random.fold_in(state.rng, state.step)
    s = sample_n_pure(frozen.policy_model, state.policy.params, p_ids, p_mask, key, hp.temperature, n=n,
                      max_new_tokens=cfg.max_new_tokens, stop_token_ids=cfg.stop_token_ids,
                      pad_token_id=cfg.pad_token_id)
    rows = (s["prompt_ids"], s["prompt_mask"], s["tokens"], s["mask"])
    scores = R.score_tokens(frozen, *rows, chunk=cfg.minibatch_size, cfg=cfg)          # [B·n]
    best = jnp.arange(B) * n + argmax_proxy(scores.reshape(B, n))                     # [B]
    kept = [x[best] for x in rows]
    ref = R.chunked(lambda *a: R.policy_forward(frozen.policy_model, frozen.ref_params, *a, hp.temperature,
                                                with_entropy=False)["logp"], cfg.minibatch_size, *rows)
    mask_f = s["mask"].astype(jnp.float32)
    kl = jnp.mean(jnp.sum((s["logprobs"] - ref) * mask_f, axis=1))
    batch = sft_batch_of(*kept)

    def one_epoch(policy, _):
        return sft_step(policy, batch, cfg=SFTStepConfig())

    policy, sft_m = jax.lax.scan(one_epoch, state.policy, jnp.arange(cfg.sft_epochs))
    metrics = {"score": jnp.mean(scores), "best_score": jnp.mean(scores[best]), "kl": kl,
               "loss": sft_m["loss"][-1], "first_loss": sft_m["loss"][0], "grad_norm": sft_m["grad_norm"][-1],
               "response_length": jnp.mean(jnp.sum(mask_f, axis=1)), "num_tokens": jnp.sum(mask_f)}
    new_state = state.replace(policy=policy, step=state.step + 1)
    return new_state, metrics, {"prompt_ids": kept[0], "prompt_mask": kept[1], "response_ids": kept[2],
                                "response_mask": kept[3], "scores": scores[best]}


_rsft_iteration_jit = jax.jit(rsft_iteration_pure, donate_argnums=(0,))


def rsft_iteration(state, frozen, prompts, *, cfg: RSFTConfig):
    """:func:`rsft_iteration_pure` as one jitted program (state donated; ``cfg`` validated, τ/top-p traced)."""
    cfg.validate()
    return _rsft_iteration_jit(state, frozen, prompts, cfg.replace(hparams=cfg.hparams.traced()))


def train_rsft(cfg: RSFTTrainConfig) -> loop.TrainResult:
    """RSFT through the one training loop (``rlhf-jax rsft``); returns the loop's ``TrainResult``."""
    validate_rsft_config(cfg)
    built = _build(cfg)
    algo = built.algo
    placement = loop.make_placement(cfg.mesh)
    s = built.setup
    tx = make_optimizer(cfg.optim, s.policy_params, total_steps=cfg.iterations * algo.sft_epochs)
    policy = TrainState.create(apply_fn=s.policy_model.apply, params=core.own_copy(s.policy_params), tx=tx,
                               rng=jax.random.PRNGKey(cfg.seed))
    state = core.RLState(policy=policy, value=None, algo_state=None, rng=state_key(cfg.seed),
                         step=jnp.zeros((), jnp.int32))
    frozen = mesh_lib.place(s.frozen, mesh_lib.param_sharding(placement.mesh, s.frozen))
    seq_len = _prompt_length(cfg, built.task) + algo.max_new_tokens
    factor = schedule_factor(cfg.optim, cfg.iterations * algo.sft_epochs)

    def step(st, prompts):
        t0 = time.perf_counter()
        st, m, rows = rsft_iteration(st, frozen, prompts, cfg=algo)
        m = to_host_scalars(m)
        m["iteration_seconds"] = time.perf_counter() - t0
        return st, m, rows

    job = loop.Job(
        name="rsft", state=state, batches=_prompt_iterator(cfg, built), total_steps=cfg.iterations,
        config_dict=to_dict(dataclasses.replace(cfg, rsft=algo)), placement=placement,
        make_step=lambda placed: step,
        prepare=lambda b: loop.put(placement, {k: b[k] for k in ("prompt_ids", "prompt_mask")}),
        place=lambda st: _place_state(placement.mesh, st), unplace=lambda st: st,
        tokens=lambda b, m: float(algo.rollout_size * seq_len), flops_per_token=0.0,
        lr_fn=lambda i: cfg.optim.learning_rate * float(factor(i * algo.sft_epochs)),
        average_window=False, progress_keys=("score", "kl"), step_name="iteration",
        finite_keys=("loss", "score", "kl"),
        on_log=_sample_logger(cfg, built, Path(cfg.out_dir).absolute() / "samples.jsonl"),
        export=(lambda st, out: export_policy(s.policy_model, st.policy.params, built.tokenizer_dir,
                                              Path(out) / "export")) if cfg.export else None,
        programs=lambda st, p: [loop.Program("rsft_iteration", _rsft_iteration_jit,
                                             (st, frozen, p, algo.replace(hparams=algo.hparams.traced())), {})])
    result = loop.run(job, out_dir=Path(cfg.out_dir).absolute(), ckpt_cfg=cfg.checkpoint, log_cfg=cfg.log,
                      resume=cfg.resume)
    return dataclasses.replace(result, model=built.export_model)


__all__ = ["RSFTHParams", "RSFTConfig", "RSFTTrainConfig", "validate_rsft_config", "sft_batch_of",
           "rsft_iteration_pure", "rsft_iteration", "train_rsft"]
