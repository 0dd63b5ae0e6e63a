"""PPO with a KL penalty (RLHF_SPEC §3), one compiled program per iteration.

Data flow of :func:`ppo_iteration` (B prompts, response length N, E epochs, M minibatches)::

    prompts [B, P] --generate(policy, τ)--> responses [B, N], mask [B, N]
      -> chunked forwards (minibatch shape): old_logp, entropy (policy), ref_logp (reference),
         old_values (value model or the policy's value head)
      -> score [B]: reward model at the last real token, or a JAX reward function
      -> missing-EOS penalty, clip to ±score_clip
      -> r_t = -β·kl_t (+ score on the last real token)      losses.kl_penalized_rewards
      -> optional reward whitening                             losses.masked_whiten
      -> A, R = GAE(r, V; γ, λ)                                losses.gae_advantages
      -> advantage whitening over the global batch             losses.masked_whiten
      -> lax.scan over E epochs (fresh permutation: fold_in(key, epoch)) × M minibatches of
         clipped policy loss + clipped value loss (− ent_coef·entropy, + kl_loss_coef·k3)
      -> adaptive KL controller update (β lives in ``PPOState.kl_ctl``)

With a reward model or a JAX reward function everything above is one ``jax.jit`` with the state
donated; with a Python reward on decoded text, :func:`ppo_rollout` and :func:`ppo_update` are the
two jitted halves and only the scores cross to the host in between.

The models have no dropout (the model package builds deterministic modules), so the rollout's
forward pass and the update's first forward pass compute the same function of the same inputs:
the first minibatch of the first epoch has ratio exactly 1 and clip fraction 0.
"""
from __future__ import annotations

import collections
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhf_jax import losses
from rlhf_jax.rl import rollout as R
from rlhf_jax.rl.config import PPOConfig, PPOHParams, static_part
from rlhf_jax.training.state import TrainState

Array = jax.Array

# Python-side trace counters: a function body runs once per compilation.
TRACE_COUNTS: collections.Counter = collections.Counter()

# optax.inject_hyperparams builds InjectStatefulHyperparamsState in optax >= 0.2.5; older ones the other.
_INJECT_STATES = tuple(getattr(optax, n) for n in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
                       if hasattr(optax, n))


def set_learning_rate(opt_state, lr) -> Any:
    """``opt_state`` with every injected ``learning_rate`` set to ``lr`` (traced: no recompilation).

    The optimizer must come from ``training.make_optimizer`` (or any ``optax.inject_hyperparams``
    transformation with a ``learning_rate``); otherwise a ``KeyError`` says so.
    """
    found = []

    def upd(s):
        if isinstance(s, _INJECT_STATES) and "learning_rate" in s.hyperparams:
            found.append(True)
            hp = dict(s.hyperparams)
            hp["learning_rate"] = jnp.asarray(lr, jnp.asarray(hp["learning_rate"]).dtype)
            return s._replace(hyperparams=hp)
        return s

    out = jax.tree_util.tree_map(upd, opt_state, is_leaf=lambda x: isinstance(x, _INJECT_STATES))
    if not found:
        raise KeyError("the optimizer state has no injected 'learning_rate'; build the optimizer with "
                       "rlhf_jax.training.make_optimizer (optax.inject_hyperparams) so the RL learning rate "
                       "can be a traced hyper-parameter")
    return out


@struct.dataclass
class PPOState:
    """Everything PPO updates, as one pytree (donated to the jitted iteration).

    policy: the policy's ``TrainState`` (a ``CausalLM``, or a ``CausalLMWithValueHead`` when the
      value head shares the trunk).
    value: the separate value model's ``TrainState`` (``ScalarHeadModel``), or None when shared.
    kl_ctl: ``losses.AdaptiveKLController`` (β, target, horizon); β is read from here when
      ``cfg.adaptive_kl``.
    rng: base key of the run; the iteration key defaults to ``fold_in(rng, step)``.
    step: iterations done (int32 scalar).
    """
    policy: TrainState
    value: TrainState | None
    kl_ctl: Any
    rng: Array
    step: Array

    def arrays(self) -> dict[str, Any]:
        """The leaves to checkpoint (``training.CheckpointManager`` saves this dict)."""
        out = {"policy": self.policy.arrays(), "kl_ctl": {"beta": self.kl_ctl.beta, "target": self.kl_ctl.target,
                                                           "horizon": self.kl_ctl.horizon},
               "rng": self.rng, "step": self.step}
        if self.value is not None:
            out["value"] = self.value.arrays()
        return out

    def with_arrays(self, tree: dict[str, Any]) -> "PPOState":
        """Inverse of :meth:`arrays` (a state restored into this one's structure)."""
        value = None if self.value is None else self.value.with_arrays(tree["value"])
        return self.replace(policy=self.policy.with_arrays(tree["policy"]), value=value,
                            kl_ctl=self.kl_ctl.replace(**tree["kl_ctl"]), rng=tree["rng"], step=tree["step"])


@struct.dataclass
class PPOFrozen:
    """What PPO reads but never updates (never donated).

    ref_params: the frozen reference policy's ``CausalLM`` params (for a ``CausalLMWithValueHead``
      policy: ``models.split_value_head(policy_params)[0]``).
    reward_params: the reward model's params (None with a reward function).
    reward_shift: added to the reward model's scores (the normalisation shift ``train_reward``
      records, ``-mean`` score of reference responses, so that the SFT policy scores mean 0;
      ``training.reward`` documents ``reward = model_score + reward_shift``).
    Static fields (part of the compiled program): ``policy_model`` (the Flax module of the policy,
    used for generation and the reference), ``value_model`` (module of the separate value model,
    None when shared), ``reward_model`` (module of the reward model) or ``reward_fn`` (a JAX
    function ``(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]``).
    """
    ref_params: Any
    reward_params: Any = None
    reward_shift: Any = 0.0
    policy_model: Any = struct.field(pytree_node=False, default=None)
    value_model: Any = struct.field(pytree_node=False, default=None)
    reward_model: Any = struct.field(pytree_node=False, default=None)
    reward_fn: Callable | None = struct.field(pytree_node=False, default=None)


def make_kl_controller(cfg: PPOConfig, hparams: PPOHParams):
    """The KL controller at the start of a run: β = ``hparams.kl_coef``; target NaN when fixed."""
    return losses.AdaptiveKLController.create(
        hparams.kl_coef, target=hparams.kl_target if cfg.adaptive_kl else None, horizon=hparams.kl_horizon)


def init_ppo_state(*, policy_model, policy_params, policy_tx: optax.GradientTransformation,
                   value_model=None, value_params=None, value_tx: optax.GradientTransformation | None = None,
                   cfg: PPOConfig, hparams: PPOHParams | None = None, rng: Array | int = 0) -> PPOState:
    """A fresh ``PPOState``; optimizers carry ``hparams.lr``/``value_lr`` as their injected rate.

    ``policy_tx``/``value_tx`` should come from ``training.make_optimizer`` (their learning rate
    is overwritten by the traced ``hparams.lr`` at every update). Every leaf is copied into a fresh
    buffer, so the same arrays may also serve as the frozen reference or the hyper-parameters (the
    state is donated to the iteration; those are not).
    """
    cfg.validate()
    hparams = PPOHParams.from_config(cfg) if hparams is None else hparams
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    policy = TrainState.create(apply_fn=policy_model.apply, params=policy_params, tx=policy_tx,
                               rng=jax.random.fold_in(rng, 1))
    policy = policy.replace(opt_state=set_learning_rate(policy.opt_state, hparams.lr))
    value = None
    if cfg.value_model == "separate":
        if value_model is None or value_params is None or value_tx is None:
            raise ValueError("init_ppo_state: ppo.value_model='separate' needs value_model, value_params "
                             "and value_tx")
        value = TrainState.create(apply_fn=value_model.apply, params=value_params, tx=value_tx,
                                  rng=jax.random.fold_in(rng, 2))
        value = value.replace(opt_state=set_learning_rate(value.opt_state, hparams.value_lr))
    elif value_params is not None:
        raise ValueError("init_ppo_state: ppo.value_model='shared' takes the value head from the policy; "
                         "do not pass value_params")
    state = PPOState(policy=policy, value=value, kl_ctl=make_kl_controller(cfg, hparams),
                     rng=jnp.asarray(rng), step=jnp.zeros((), jnp.int32))
    return own_copy(state)


# ---------------------------------------------------------------------------------------------
# Rollout
# ---------------------------------------------------------------------------------------------

def lm_view(model, params) -> tuple[Any, Any]:
    """``(CausalLM, its params)`` of a policy: itself, or the LM part of a ``CausalLMWithValueHead``."""
    from rlhf_jax.models import CausalLM, CausalLMWithValueHead, split_value_head
    if isinstance(model, CausalLMWithValueHead):
        return CausalLM(model.config), (None if params is None else split_value_head(params)[0])
    return model, params


def sample(frozen: PPOFrozen, policy_params, prompt_ids: Array, prompt_mask: Array, rng: Array, *,
           cfg, hparams) -> Any:
    """``generation.generate`` with the policy: returns a ``GenerationOutput`` (tokens, mask, ...)."""
    from rlhf_jax.generation import generate
    model, params = lm_view(frozen.policy_model, policy_params)
    return generate(model, params, prompt_ids, prompt_mask, rng=rng,
                    max_new_tokens=cfg.max_new_tokens, temperature=hparams.temperature,
                    top_k=cfg.top_k, top_p=hparams.top_p, stop_token_ids=tuple(cfg.stop_token_ids),
                    pad_token_id=cfg.pad_token_id)


def rollout_forwards(policy_params, value_params, frozen: PPOFrozen, prompt_ids: Array,
                     prompt_mask: Array, response_ids: Array, response_mask: Array, *,
                     chunk: int, temperature: Array, value_mode: str | None,
                     with_ref: bool = True) -> R.Rollout:
    """The policy/reference/value forward passes of a rollout, in chunks of ``chunk`` rows.

    ``value_mode``: "separate" (value model), "shared" (the policy's value head) or None (zeros).
    ``with_ref=False`` skips the reference pass (``ref_logp`` is then a copy of ``old_logp``).
    """
    model = frozen.policy_model
    ref_model, _ = lm_view(model, None)
    sg = jax.lax.stop_gradient

    def pol(p_ids, p_mask, r_ids, r_mask):
        out = R.policy_forward(model, sg(policy_params), p_ids, p_mask, r_ids, r_mask, temperature)
        if with_ref:
            ref_logp = R.policy_forward(ref_model, sg(frozen.ref_params), p_ids, p_mask, r_ids, r_mask,
                                        temperature, with_entropy=False)["logp"]
        else:
            ref_logp = out["logp"]
        res = {"logp": out["logp"], "entropy": out["entropy"], "ref_logp": ref_logp}
        if value_mode == "shared":
            res["values"] = out["values"]
        elif value_mode == "separate":
            res["values"] = R.value_forward(frozen.value_model, sg(value_params), p_ids, p_mask, r_ids, r_mask)
        else:
            res["values"] = jnp.zeros(r_ids.shape, jnp.float32)
        return res

    out = R.chunked(pol, chunk, prompt_ids, prompt_mask, response_ids, response_mask)
    return R.Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                     response_mask=response_mask, old_logp=out["logp"], ref_logp=out["ref_logp"],
                     old_values=out["values"], entropy=out["entropy"])


def score_rollout(frozen: PPOFrozen, rollout: R.Rollout, *, chunk: int) -> Array:
    """``[B]`` raw scores from the reward model (last real token) or the JAX reward function."""
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
    if frozen.reward_fn is not None:
        scores = frozen.reward_fn(*args)
    elif frozen.reward_model is not None:
        scores = R.chunked(lambda *a: R.reward_model_scores(frozen.reward_model, frozen.reward_params, *a),
                           chunk, *args) + jnp.asarray(frozen.reward_shift, jnp.float32)
    else:
        raise ValueError("PPOFrozen has neither reward_fn nor reward_model: a Python reward must go through "
                         "ppo_rollout -> host scores -> ppo_update")
    scores = jnp.asarray(scores, jnp.float32)
    if scores.shape != rollout.response_ids.shape[:1]:
        raise ValueError(f"reward source returned scores of shape {scores.shape}; expected "
                         f"({rollout.response_ids.shape[0]},)")
    return jax.lax.stop_gradient(scores)


def _ppo_rollout_impl(state: PPOState, frozen: PPOFrozen, prompts: dict, rng: Array, *, cfg: PPOConfig,
                      hparams: PPOHParams) -> R.Rollout:
    prompt_ids, prompt_mask = R.check_prompts(prompts, cfg.batch_size, "ppo_rollout")
    gen = sample(frozen, state.policy.params, prompt_ids, prompt_mask, jax.random.fold_in(rng, 0),
                 cfg=cfg, hparams=hparams)
    return rollout_forwards(state.policy.params, None if state.value is None else state.value.params,
                            frozen, prompt_ids, prompt_mask, gen.tokens, gen.mask,
                            chunk=cfg.minibatch_size, temperature=hparams.temperature,
                            value_mode=cfg.value_model)


# ---------------------------------------------------------------------------------------------
# Update
# ---------------------------------------------------------------------------------------------

def own_copy(tree):
    """A copy of a pytree with fresh buffers: the state is donated to the jitted iteration, so it must
    never share buffers with the frozen reference/reward params, the hyper-parameters or the caller's
    arrays. (Under a trace the copy is a no-op.)"""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def apply_grads(ts: TrainState, grads, lr: Array) -> TrainState:
    """One optimizer update with the traced peak learning rate ``lr``."""
    return ts.replace(opt_state=set_learning_rate(ts.opt_state, lr)).apply_gradients(grads)


def _minibatch_losses(policy_params, value_params, frozen: PPOFrozen, batch: dict, *, cfg: PPOConfig,
                      hparams: PPOHParams):
    """Total loss of one minibatch and its metrics (see RLHF_SPEC §3 'Losses on a minibatch')."""
    mask = batch["response_mask"]
    out = R.policy_forward(frozen.policy_model, policy_params, batch["prompt_ids"], batch["prompt_mask"],
                           batch["response_ids"], mask, hparams.temperature)
    pg_loss, pg_m = losses.ppo_policy_loss(
        out["logp"], batch["old_logp"], batch["advantages"], mask, clip_eps=hparams.clip_eps,
        clip_eps_high=hparams.clip_eps_high, dual_clip=cfg.dual_clip, reduction=cfg.loss_reduction)
    if cfg.value_model == "shared":
        values = out["values"]
    else:
        values = R.value_forward(frozen.value_model, value_params, batch["prompt_ids"], batch["prompt_mask"],
                                 batch["response_ids"], mask)
    vf_loss, vf_m = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                          clip_eps=hparams.vf_clip)
    entropy = losses.masked_mean(out["entropy"], mask)
    total = pg_loss + hparams.vf_coef * vf_loss - hparams.ent_coef * entropy
    metrics = {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy_update": entropy}
    if cfg.use_kl_loss:
        kl_tok = losses.kl_estimate(out["logp"], batch["ref_logp"], estimator="k3", mask=mask)
        kl_loss = losses.masked_mean(kl_tok, mask)
        total = total + hparams.kl_loss_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    metrics.update({k: pg_m[k] for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max")})
    metrics["value_clipfrac"] = vf_m["vf_clipfrac"]
    metrics["loss"] = total
    return total, metrics


def _minibatch_step(carry, batch, *, frozen, cfg, hparams):
    policy, value = carry
    value_params = None if value is None else value.params
    grad_fn = jax.value_and_grad(_minibatch_losses, argnums=(0, 1), has_aux=True)
    (_, metrics), (g_pol, g_val) = grad_fn(policy.params, value_params, frozen, batch, cfg=cfg,
                                          hparams=hparams)
    metrics["policy_grad_norm"] = optax.tree.norm(g_pol)
    policy = apply_grads(policy, g_pol, hparams.lr)
    if value is not None:
        metrics["value_grad_norm"] = optax.tree.norm(g_val)
        value = apply_grads(value, g_val, hparams.value_lr)
    return (policy, value), metrics


def run_epochs(policy: TrainState, value: TrainState | None, data: dict, rng: Array, *, epochs: int,
               minibatches: int, step_fn: Callable) -> tuple[TrainState, TrainState | None, dict]:
    """``lax.scan`` over ``epochs`` × ``minibatches`` of ``step_fn((policy, value), batch)``.

    Each epoch draws a fresh permutation of the rows with ``fold_in(rng, epoch)``. Returns the
    new states and the per-update metrics stacked as ``[epochs, minibatches]``.
    """
    rows = jax.tree_util.tree_leaves(data)[0].shape[0]
    mb = rows // minibatches

    def one_epoch(carry, epoch):
        perm = jax.random.permutation(jax.random.fold_in(rng, epoch), rows).reshape(minibatches, mb)

        def one_minibatch(carry, idx):
            batch = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)
            return step_fn(carry, batch)

        return jax.lax.scan(one_minibatch, carry, perm)

    (policy, value), metrics = jax.lax.scan(one_epoch, (policy, value), jnp.arange(epochs))
    return policy, value, metrics


def summarize_updates(stacked: dict) -> dict:
    """Means over all updates, maxima for ``*_max``, plus the first update's ratio/clipfrac."""
    out = {}
    for k, v in stacked.items():
        out[k] = jnp.max(v) if k.endswith("_max") else jnp.mean(v)
    for k in ("ratio_mean", "ratio_max", "clipfrac", "approx_kl"):
        if k in stacked:
            out[f"first_{k}"] = stacked[k][0, 0]
    return out


def rollout_metrics(rollout: R.Rollout, scores_raw: Array, scores: Array, kl_tok: Array, beta: Array,
                    stopped: Array) -> dict:
    """Rollout statistics of RLHF_SPEC §3 (sequence means unless named per token)."""
    mask = rollout.response_mask.astype(jnp.float32)
    kl_seq = jnp.sum(kl_tok * mask, axis=1)
    non_score = -beta * kl_seq
    lengths = jnp.sum(mask, axis=1)
    return {
        "score": jnp.mean(scores),
        "score_raw": jnp.mean(scores_raw),
        "score_std": jnp.std(scores),
        "non_score_reward": jnp.mean(non_score),
        "total_reward": jnp.mean(scores + non_score),
        "kl": jnp.mean(kl_seq),
        "kl_coef": jnp.asarray(beta, jnp.float32),
        "entropy": losses.masked_mean(rollout.entropy, mask),
        "response_length": jnp.mean(lengths),
        "stop_fraction": jnp.mean(stopped.astype(jnp.float32)),
        "num_tokens": jnp.sum(mask),
    }


def _ppo_update_impl(state: PPOState, frozen: PPOFrozen, rollout: R.Rollout, scores: Array, rng: Array, *,
                     cfg: PPOConfig, hparams: PPOHParams) -> tuple[PPOState, dict]:
    mask = rollout.response_mask.astype(jnp.float32)
    stopped = R.has_stop_token(rollout.response_ids, rollout.response_mask, cfg.stop_token_ids)
    scores_raw = jnp.asarray(scores, jnp.float32)
    scores = R.adjust_scores(scores_raw, stopped, missing_eos_penalty=hparams.missing_eos_penalty,
                             score_clip=hparams.score_clip, stop_token_ids=cfg.stop_token_ids)
    beta = state.kl_ctl.beta if cfg.adaptive_kl else hparams.kl_coef
    kl_tok = losses.kl_estimate(rollout.old_logp, rollout.ref_logp, estimator=cfg.kl_estimator, mask=mask)
    rewards = losses.kl_penalized_rewards(scores, rollout.old_logp, rollout.ref_logp, mask, kl_coef=beta,
                                          estimator=cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = losses.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = losses.gae_advantages(rewards, rollout.old_values, mask, gamma=hparams.gamma,
                                                lam=hparams.lam)
    if cfg.whiten_advantages:
        advantages = losses.masked_whiten(advantages, mask)
    advantages = jax.lax.stop_gradient(advantages * mask)
    returns = jax.lax.stop_gradient(returns * mask)

    data = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
            "response_ids": rollout.response_ids, "response_mask": rollout.response_mask,
            "old_logp": rollout.old_logp, "ref_logp": rollout.ref_logp, "old_values": rollout.old_values,
            "advantages": advantages, "returns": returns}

    def step_fn(carry, batch):
        return _minibatch_step(carry, batch, frozen=frozen, cfg=cfg, hparams=hparams)

    policy, value, stacked = run_epochs(state.policy, state.value, data, jax.random.fold_in(rng, 1),
                                        epochs=cfg.ppo_epochs, minibatches=cfg.minibatches, step_fn=step_fn)

    metrics = rollout_metrics(rollout, scores_raw, scores, kl_tok, beta, stopped)
    metrics.update(summarize_updates(stacked))
    metrics["explained_variance"] = losses.explained_variance(rollout.old_values, returns, mask)
    metrics["advantage_mean"] = losses.masked_mean(advantages, mask)
    metrics["return_mean"] = losses.masked_mean(returns, mask)
    metrics["value_mean"] = losses.masked_mean(rollout.old_values, mask)

    if cfg.adaptive_kl:
        kl_ctl = state.kl_ctl.replace(target=jnp.asarray(hparams.kl_target, jnp.float32),
                                      horizon=jnp.asarray(hparams.kl_horizon, jnp.float32))
        kl_ctl = kl_ctl.update(metrics["kl"], cfg.batch_size)
    else:
        kl_ctl = state.kl_ctl.replace(beta=jnp.asarray(hparams.kl_coef, jnp.float32))
    metrics["kl_coef_next"] = kl_ctl.beta
    new_state = state.replace(policy=policy, value=value, kl_ctl=kl_ctl, step=state.step + 1)
    return new_state, metrics


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def _iteration_key(state: PPOState, rng: Array | None) -> Array:
    return jax.random.fold_in(state.rng, state.step) if rng is None else rng


def ppo_iteration_pure(state: PPOState, frozen: PPOFrozen, prompts: dict, rng: Array | None = None, *,
                       cfg: PPOConfig, hparams: PPOHParams) -> tuple[PPOState, dict]:
    """The un-jitted iteration (what :func:`ppo_iteration` compiles; vmap/scan it freely)."""
    TRACE_COUNTS["ppo_iteration"] += 1
    rng = _iteration_key(state, rng)
    rollout = _ppo_rollout_impl(state, frozen, prompts, rng, cfg=cfg, hparams=hparams)
    scores = score_rollout(frozen, rollout, chunk=cfg.minibatch_size)
    return _ppo_update_impl(state, frozen, rollout, scores, rng, cfg=cfg, hparams=hparams)


_ppo_iteration_jit = jax.jit(ppo_iteration_pure, static_argnames=("cfg",), donate_argnums=(0,))


def ppo_iteration(state: PPOState, frozen: PPOFrozen, prompts: dict, rng: Array | None = None, *,
                  cfg: PPOConfig, hparams: PPOHParams | None = None) -> tuple[PPOState, dict]:
    """One PPO iteration as one jitted program (state donated; JAX reward source).

    Args:
      state: ``PPOState`` (donated: do not reuse the argument after the call).
      frozen: ``PPOFrozen`` with ``reward_fn`` or ``reward_model``.
      prompts: ``{"prompt_ids": [B, P] int, "prompt_mask": [B, P]}`` left-padded, B = cfg.batch_size.
      rng: the iteration's key (default ``fold_in(state.rng, state.step)``).
      cfg: static ``PPOConfig`` (only its static fields matter for compilation).
      hparams: traced ``PPOHParams`` (default: the config's values).

    Returns ``(new_state, metrics)``: metrics are float32 scalars (see ``rollout_metrics`` and
    ``summarize_updates``; ``first_ratio_mean``/``first_clipfrac`` are those of the first
    minibatch of the first epoch).
    """
    hparams = PPOHParams.from_config(cfg) if hparams is None else hparams
    return _ppo_iteration_jit(state, frozen, prompts, rng, cfg=static_part(cfg.validate()), hparams=hparams)


def ppo_rollout_pure(state: PPOState, frozen: PPOFrozen, prompts: dict, rng: Array | None = None, *,
                     cfg: PPOConfig, hparams: PPOHParams) -> R.Rollout:
    TRACE_COUNTS["ppo_rollout"] += 1
    return _ppo_rollout_impl(state, frozen, prompts, _iteration_key(state, rng), cfg=cfg, hparams=hparams)


def ppo_update_pure(state: PPOState, frozen: PPOFrozen, rollout: R.Rollout, scores: Array,
                    rng: Array | None = None, *, cfg: PPOConfig, hparams: PPOHParams) -> tuple[PPOState, dict]:
    TRACE_COUNTS["ppo_update"] += 1
    return _ppo_update_impl(state, frozen, rollout, scores, _iteration_key(state, rng), cfg=cfg,
                            hparams=hparams)


_ppo_rollout_jit = jax.jit(ppo_rollout_pure, static_argnames=("cfg",))
_ppo_update_jit = jax.jit(ppo_update_pure, static_argnames=("cfg",), donate_argnums=(0,))


def ppo_rollout(state: PPOState, frozen: PPOFrozen, prompts: dict, rng: Array | None = None, *,
                cfg: PPOConfig, hparams: PPOHParams | None = None) -> R.Rollout:
    """Jitted first half of an iteration (sampling + policy/reference/value forwards).

    Use with a Python reward: decode ``rollout.response_ids`` on the host, score, and pass the
    ``[B]`` scores to :func:`ppo_update` with the same ``rng``. ``rollout + update`` with the
    same key equals :func:`ppo_iteration`.
    """
    hparams = PPOHParams.from_config(cfg) if hparams is None else hparams
    return _ppo_rollout_jit(state, frozen, prompts, rng, cfg=static_part(cfg.validate()), hparams=hparams)


def ppo_update(state: PPOState, frozen: PPOFrozen, rollout: R.Rollout, scores: Array, rng: Array | None = None,
               *, cfg: PPOConfig, hparams: PPOHParams | None = None) -> tuple[PPOState, dict]:
    """Jitted second half: rewards, GAE, epochs × minibatches of updates, KL controller (state donated)."""
    hparams = PPOHParams.from_config(cfg) if hparams is None else hparams
    return _ppo_update_jit(state, frozen, rollout, jnp.asarray(scores, jnp.float32), rng,
                           cfg=static_part(cfg.validate()), hparams=hparams)
