"""The RL core: state, the epochs × minibatches update and the fused iteration, for every online
algorithm.

An online algorithm (PPO, GRPO, RLOO, ...) is a config class whose instances carry the static
settings and, in their ``hparams`` section, the traced hyper-parameters; it supplies the pieces that
differ between algorithms (the :class:`Algorithm` protocol below). Everything else lives here, once:

    prompts [B, P] --repeat G times--> generate (policy, τ)                  experience.sample
      -> policy / reference / value forwards, chunked at the minibatch shape  experience.rollout_forwards
      -> scores [B·G]: reward model or JAX reward function                     experience.score_rollout
      -> missing-EOS penalty, clip ±score_clip                                 experience.adjust_scores
      -> per-token KL to the reference, computed once                          losses.kl_estimate
      -> algorithm.advantages(...)    (PPO: KL-penalised rewards + GAE; GRPO/RLOO: group baselines)
      -> lax.scan over epochs (fresh permutation each) × minibatches of
         algorithm.minibatch_loss(...) → gradients → p ← p + lr · optimiser update
      -> algorithm.next_algo_state(...)   (PPO: the adaptive KL controller)

:func:`iteration` runs all of it as one jitted program (state donated); :func:`rollout` and
:func:`update` are its two halves, for a Python reward on decoded text that must run on the host in
between. :func:`make_train` turns whole runs into one pure function of ``(hparams, rng)`` for
``jax.vmap`` sweeps.

The models have no dropout, so the rollout's forward pass and the update's first forward pass compute
the same function of the same inputs at the same shape: the first minibatch of the first epoch has
ratio exactly 1 and clip fraction 0.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from rlhf_jax import losses
from rlhf_jax.config import ConfigError
from rlhf_jax.rl import experience as R
from rlhf_jax.training.optim import OptimConfig, has_hyperparam, set_hyperparam
from rlhf_jax.training.state import TrainState

Array = jax.Array

# The optimiser section the RL and preference trainers start from (their learning rate is the
# algorithm's traced ``lr``; this section's ``learning_rate`` is not used).
RL_OPTIM = OptimConfig(learning_rate=1e-5, schedule="constant", b2=0.999, max_grad_norm=1.0)

# Python-side trace counters: a function body runs once per compilation ("<algo>_iteration", ...).
TRACE_COUNTS: collections.Counter = collections.Counter()


class Algorithm(Protocol):
    """What an online algorithm's config supplies to the core (static attributes, traced ``hparams``).

    Static: ``name``, ``batch_size`` (prompts), ``group_size`` (samples per prompt; 1 for PPO),
    ``max_new_tokens``, ``top_k``, ``stop_token_ids``, ``pad_token_id``, ``epochs``, ``minibatches``,
    ``kl_estimator`` (the per-token KL the core computes once), ``value_mode`` ("separate", "shared"
    or None), ``uses_ref`` (whether the reference forward is needed).
    Traced: ``hparams`` with at least ``lr``, ``temperature``, ``top_p``, ``missing_eos_penalty``,
    ``score_clip`` (and ``value_lr`` when there is a separate value model).
    """
    hparams: Any

    def validate(self) -> Any: ...

    def init_algo_state(self) -> Any: ...

    def advantages(self, algo_state, rollout: R.Rollout, scores: Array, kl_tok: Array
                   ) -> tuple[dict[str, Array], dict[str, Array]]: ...

    def minibatch_loss(self, out: dict, values: Array | None, batch: dict) -> tuple[Array, dict]: ...

    def next_algo_state(self, algo_state, metrics: dict) -> Any: ...


class ReadsHParams:
    """Mixin of algorithm configs: a traced hyper-parameter reads directly off the config
    (``cfg.kl_coef`` is ``cfg.hparams.kl_coef``), as it may be written in overrides (``ppo.kl_coef=``)."""

    def __getattr__(self, name: str):
        hp = self.__dict__.get("hparams")
        if not name.startswith("_") and hp is not None and name in {f.name for f in dataclasses.fields(hp)}:
            return getattr(hp, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class Stateless:
    """Mixin of algorithm configs that carry no state between iterations (no adaptive controller)."""

    def init_algo_state(self):
        return None

    def next_algo_state(self, algo_state, metrics):
        return None


def traced_hparams(hp, **fallbacks):
    """``hp`` with every field a float32 array; a ``None`` field takes ``fallbacks[name]``: the name of
    another field (``value_lr=None`` → ``lr``) or a number (``score_clip=None`` → ``inf``)."""
    vals = {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)}
    for name, fb in fallbacks.items():
        if vals[name] is None:
            vals[name] = vals[fb] if isinstance(fb, str) else fb
    return type(hp)(**{k: jnp.asarray(v, jnp.float32) for k, v in vals.items()})


def hparam_fields(cfg) -> tuple[str, ...]:
    """The traced hyper-parameter names of an algorithm config."""
    return tuple(f.name for f in dataclasses.fields(cfg.hparams))


def with_hparams(cfg, **values):
    """``cfg`` with some hyper-parameters replaced (a ConfigError names an unknown one)."""
    unknown = sorted(set(values) - set(hparam_fields(cfg)))
    if unknown:
        raise ConfigError(f"unknown {cfg.name.upper()} hyper-parameter(s) {unknown}; valid: {sorted(hparam_fields(cfg))}")
    return cfg.replace(hparams=cfg.hparams.replace(**values))


def traced(cfg):
    """The config as the compiled programs take it: validated, its hyper-parameters float32 arrays."""
    cfg.validate()
    return cfg.replace(hparams=cfg.hparams.traced())


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------

@struct.dataclass
class RLState:
    """Everything an online algorithm updates, as one pytree (donated to the jitted iteration).

    policy: the policy's ``TrainState`` (a ``CausalLM``, or a ``CausalLMWithValueHead`` when the value
      head shares the trunk). value: the separate value model's ``TrainState`` or None.
    algo_state: the algorithm's own pytree (PPO: its ``AdaptiveKLController``; None for GRPO/RLOO).
    rng: base key of the run; the iteration key defaults to ``fold_in(rng, step)``.
    step: iterations done (int32 scalar).
    """
    policy: TrainState
    value: TrainState | None
    algo_state: Any
    rng: Array
    step: Array

    def arrays(self) -> dict[str, Any]:
        """The leaves to checkpoint (``training.CheckpointManager`` saves this dict)."""
        out = {"policy": self.policy.arrays(), "rng": self.rng, "step": self.step}
        if self.value is not None:
            out["value"] = self.value.arrays()
        if self.algo_state is not None:
            out["algo_state"] = self.algo_state
        return out

    def with_arrays(self, tree: dict[str, Any]) -> "RLState":
        """Inverse of :meth:`arrays` (a state restored into this one's structure)."""
        value = None if self.value is None else self.value.with_arrays(tree["value"])
        return self.replace(policy=self.policy.with_arrays(tree["policy"]), value=value,
                            algo_state=tree.get("algo_state"), rng=tree["rng"], step=tree["step"])


@struct.dataclass
class RLFrozen:
    """What the iteration reads but never updates (never donated).

    ref_params: the frozen reference policy's ``CausalLM`` params (for a ``CausalLMWithValueHead``
      policy: ``models.split_value_head(policy_params)[0]``).
    reward_params: the reward model's params (None with a reward function).
    reward_shift: added to the reward model's scores (the normalisation shift ``train_reward`` records,
      ``reward = model_score + reward_shift``).
    Static fields: ``policy_model`` (the policy's Flax module, used for generation and the reference),
    ``value_model`` (the separate value model's module), ``reward_model`` or ``reward_fn`` (a JAX
    function ``(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]``).
    """
    ref_params: Any
    reward_params: Any = None
    reward_shift: Any = 0.0
    policy_model: Any = struct.field(pytree_node=False, default=None)
    value_model: Any = struct.field(pytree_node=False, default=None)
    reward_model: Any = struct.field(pytree_node=False, default=None)
    reward_fn: Callable | None = struct.field(pytree_node=False, default=None)
    # K > 0: ``reward_params`` / ``reward_shift`` are stacked over K ensemble members, scored in one vmapped
    # program and aggregated by the algorithm's ``reward_aggregation`` (experience.ensemble_scores)
    reward_ensemble: int = struct.field(pytree_node=False, default=0)


def own_copy(tree):
    """A copy of a pytree with fresh buffers: the state is donated to the jitted iteration, so it must
    never share buffers with the frozen reference/reward params or the caller's arrays. (Under a trace
    the copy is a no-op.)"""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def train_state(apply_fn, params, tx, rng) -> TrainState:
    """A ``TrainState`` whose updates take their size from the caller's traced rate: an optimiser built by
    ``training.make_optimizer`` gets its injected peak rate set to 1, once, here; every update is then
    ``p ← p + lr · u`` with the algorithm's ``lr``, and the optimiser state is never rewritten."""
    ts = TrainState.create(apply_fn=apply_fn, params=params, tx=tx, rng=rng)
    if has_hyperparam(ts.opt_state, "learning_rate"):
        ts = ts.replace(opt_state=set_hyperparam(ts.opt_state, "learning_rate", 1.0))
    return ts


def init_state(*, policy_model, policy_params, policy_tx, value_model=None, value_params=None,
               value_tx=None, cfg, rng: Array | int = 0) -> RLState:
    """A fresh ``RLState``: every update is scaled by the traced ``cfg.hparams.lr`` (``value_lr`` for the
    value model); see :func:`train_state`.

    Every leaf is copied into a fresh buffer, so the same arrays may also serve as the frozen reference.
    """
    cfg.validate()
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    policy = train_state(policy_model.apply, policy_params, policy_tx, jax.random.fold_in(rng, 1))
    value = None
    if cfg.value_mode == "separate":
        if value_model is None or value_params is None or value_tx is None:
            raise ValueError(f"init_state: {cfg.name} with value_model='separate' needs value_model, value_params "
                             "and value_tx")
        value = train_state(value_model.apply, value_params, value_tx, jax.random.fold_in(rng, 2))
    elif value_params is not None:
        raise ValueError(f"init_state: {cfg.name} has no separate value model (value_mode={cfg.value_mode!r}); "
                         "do not pass value_params")
    state = RLState(policy=policy, value=value, algo_state=cfg.replace(hparams=cfg.hparams.traced()).init_algo_state(),
                    rng=jnp.asarray(rng), step=jnp.zeros((), jnp.int32))
    return own_copy(state)


# ---------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------

def _minibatch_step(carry, batch, *, frozen: RLFrozen, cfg):
    policy, value = carry
    hp = cfg.hparams

    def loss_fn(policy_params, value_params):
        out = R.policy_forward(frozen.policy_model, policy_params, batch["prompt_ids"], batch["prompt_mask"],
                               batch["response_ids"], batch["response_mask"], hp.temperature)
        values = out.get("values")
        if cfg.value_mode == "separate":
            values = R.value_forward(frozen.value_model, value_params, batch["prompt_ids"], batch["prompt_mask"],
                                     batch["response_ids"], batch["response_mask"])
        loss, metrics = cfg.minibatch_loss(out, values, batch)
        metrics["loss"] = loss
        return loss, metrics

    value_params = None if value is None else value.params
    (_, metrics), (g_pol, g_val) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        policy.params, value_params)
    metrics["policy_grad_norm"] = optax.tree.norm(g_pol)
    policy = policy.apply_gradients(g_pol, hp.lr)
    if value is not None:
        metrics["value_grad_norm"] = optax.tree.norm(g_val)
        value = value.apply_gradients(g_val, hp.value_lr)
    return (policy, value), metrics


def run_epochs(policy: TrainState, value: TrainState | None, data: dict, rng: Array, *, epochs: int,
               minibatches: int, step_fn: Callable, group: int = 1) -> tuple[TrainState, TrainState | None, dict]:
    """``lax.scan`` over ``epochs`` × ``minibatches`` of ``step_fn((policy, value), batch)``.

    Each epoch draws a fresh permutation with ``fold_in(rng, epoch)``: of the rows, or with ``group > 1``
    of the blocks of ``group`` consecutive rows, which stay together and in order (online DPO's pairs).
    Returns the new states and the per-update metrics stacked as ``[epochs, minibatches]``.
    """
    rows = jax.tree_util.tree_leaves(data)[0].shape[0]
    mb = rows // minibatches

    def permutation(key):
        if group == 1:
            return jax.random.permutation(key, rows)
        blocks = jax.random.permutation(key, rows // group)
        return (blocks[:, None] * group + jnp.arange(group)[None, :]).reshape(-1)

    def one_epoch(carry, epoch):
        perm = permutation(jax.random.fold_in(rng, epoch)).reshape(minibatches, mb)

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


def rollout_metrics(rollout: R.Rollout, scores_raw: Array, scores: Array, kl_tok: Array, stopped: Array) -> dict:
    """The statistics every online algorithm reports (sequence means unless named per token)."""
    mask = rollout.response_mask.astype(jnp.float32)
    return {
        "score": jnp.mean(scores),
        "score_raw": jnp.mean(scores_raw),
        "score_std": jnp.std(scores),
        "kl": jnp.mean(jnp.sum(kl_tok * mask, axis=1)),
        "entropy": losses.masked_mean(rollout.entropy, mask),
        "response_length": jnp.mean(jnp.sum(mask, axis=1)),
        "stop_fraction": jnp.mean(stopped.astype(jnp.float32)),
        "num_tokens": jnp.sum(mask),
    }


def _update_impl(state: RLState, frozen: RLFrozen, rollout: R.Rollout, scores: Array, rng: Array, cfg
                 ) -> tuple[RLState, dict]:
    hp = cfg.hparams
    mask = rollout.response_mask.astype(jnp.float32)
    stopped = R.has_stop_token(rollout.response_ids, rollout.response_mask, cfg.stop_token_ids)
    scores_raw = jnp.asarray(scores, jnp.float32)
    scores = R.adjust_scores(scores_raw, stopped, missing_eos_penalty=hp.missing_eos_penalty,
                             score_clip=hp.score_clip, stop_token_ids=cfg.stop_token_ids)
    kl_tok = losses.kl_estimate(rollout.old_logp, rollout.ref_logp, estimator=cfg.kl_estimator, mask=mask)
    extra, metrics = cfg.advantages(state.algo_state, rollout, scores, kl_tok)
    data = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
            "response_ids": rollout.response_ids, "response_mask": rollout.response_mask,
            "old_logp": rollout.old_logp, "ref_logp": rollout.ref_logp,
            **jax.tree_util.tree_map(jax.lax.stop_gradient, extra)}

    def step_fn(carry, batch):
        return _minibatch_step(carry, batch, frozen=frozen, cfg=cfg)

    policy, value, stacked = run_epochs(state.policy, state.value, data, jax.random.fold_in(rng, 1),
                                        epochs=cfg.epochs, minibatches=cfg.minibatches, step_fn=step_fn,
                                        group=getattr(cfg, "minibatch_group", 1))
    metrics = {**rollout_metrics(rollout, scores_raw, scores, kl_tok, stopped), **metrics,
               **summarize_updates(stacked)}
    algo_state = cfg.next_algo_state(state.algo_state, metrics)
    return state.replace(policy=policy, value=value, algo_state=algo_state, step=state.step + 1), metrics


def _rollout_impl(state: RLState, frozen: RLFrozen, prompts: dict, rng: Array, cfg) -> R.Rollout:
    if dynamic_rounds(cfg) > 1:
        raise ConfigError(f"config key '{cfg.name}.dynamic_sampling_rounds': dynamic sampling scores every round "
                          "inside the program; it needs a reward the program computes (gold, model or jax), not "
                          "the rollout -> host scores -> update split of a Python reward")
    prompt_ids, prompt_mask = R.check_prompts(prompts, cfg.batch_size, f"{cfg.name} rollout")
    if cfg.group_size > 1:
        grouped = R.repeat_prompts({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}, cfg.group_size)
        prompt_ids, prompt_mask = grouped["prompt_ids"], grouped["prompt_mask"]
    gen = R.sample(frozen.policy_model, state.policy.params, prompt_ids, prompt_mask, jax.random.fold_in(rng, 0),
                   cfg=cfg)
    return R.rollout_forwards(state.policy.params, None if state.value is None else state.value.params, frozen,
                              prompt_ids, prompt_mask, gen.tokens, gen.mask, chunk=cfg.minibatch_size,
                              temperature=cfg.hparams.temperature, value_mode=cfg.value_mode,
                              with_ref=cfg.uses_ref)


# ---------------------------------------------------------------------------------------------
# DAPO's dynamic sampling: keep sampling until the batch holds informative groups
# ---------------------------------------------------------------------------------------------

def prompt_batch(cfg) -> int:
    """Prompts one iteration of ``cfg`` consumes: ``batch_size`` (× DAPO's sampling rounds)."""
    return getattr(cfg, "prompt_batch_size", cfg.batch_size)


def dynamic_rounds(cfg) -> int:
    """DAPO's dynamic-sampling rounds of ``cfg`` (1 = off)."""
    return getattr(cfg, "dynamic_sampling_rounds", 1)


def informative_groups(scores: Array, group_size: int) -> Array:
    """``[B]`` bool: the groups (``group_size`` contiguous rows of ``scores [B·G]``) whose scores are not all
    equal. A group whose scores agree has zero advantage under every group baseline: it teaches nothing."""
    g = scores.reshape(-1, group_size)
    return jnp.max(g, axis=1) - jnp.min(g, axis=1) > 1e-6


def dynamic_rollout(state: RLState, frozen: RLFrozen, prompts: dict, rng: Array, cfg
                    ) -> tuple[R.Rollout, Array, dict]:
    """DAPO's dynamic sampling (Yu et al. 2025) inside one program, at a fixed batch shape.

    ``prompts`` holds ``R · B`` prompts (``R = cfg.dynamic_sampling_rounds``, ``B = cfg.batch_size``). Round
    ``r`` samples ``G`` responses for prompts ``r·B .. (r+1)·B − 1`` (key ``fold_in(fold_in(rng, 0), r)``) and
    scores them (after the missing-EOS penalty and clipping, as the update will); its informative groups
    (:func:`informative_groups`) fill the batch's free slots in order. Rounds stop once ``B`` informative
    groups are held or ``R`` rounds are spent; slots still free keep round 0's uninformative groups.
    The policy/reference/value forwards then run once, on the kept rows.

    Returns ``(rollout [B·G rows], raw scores [B·G], metrics)``: ``dynamic_sampling_rounds`` (rounds run) and
    ``dynamic_sampling_filled`` (fraction of the B groups that are informative).
    """
    B, G, rounds = cfg.batch_size, cfg.group_size, dynamic_rounds(cfg)
    hp = cfg.hparams
    ids_all, mask_all = R.check_prompts(prompts, B * rounds, f"{cfg.name} rollout (dynamic sampling)")
    ids_r = ids_all.reshape(rounds, B, -1)
    mask_r = mask_all.reshape(rounds, B, -1)
    base = jax.random.fold_in(rng, 0)

    def sample_round(r):
        p_ids = R.repeat_prompts({"x": jax.lax.dynamic_index_in_dim(ids_r, r, keepdims=False)}, G)["x"]
        p_mask = R.repeat_prompts({"x": jax.lax.dynamic_index_in_dim(mask_r, r, keepdims=False)}, G)["x"]
        gen = R.sample(frozen.policy_model, state.policy.params, p_ids, p_mask, jax.random.fold_in(base, r),
                       cfg=cfg)
        tokens, tmask = gen.tokens, gen.mask.astype(p_mask.dtype)
        raw = R.score_tokens(frozen, p_ids, p_mask, tokens, tmask, chunk=cfg.minibatch_size, cfg=cfg)
        stopped = R.has_stop_token(tokens, tmask, cfg.stop_token_ids)
        adj = R.adjust_scores(raw, stopped, missing_eos_penalty=hp.missing_eos_penalty, score_clip=hp.score_clip,
                              stop_token_ids=cfg.stop_token_ids)
        rows = {"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": tokens, "response_mask": tmask,
                "scores": raw}
        groups = jax.tree_util.tree_map(lambda x: x.reshape((B, G) + x.shape[1:]), rows)
        return groups, informative_groups(adj, G)

    groups, keep = sample_round(0)
    order = jnp.argsort(~keep, stable=True)  # round 0's informative groups first, in order
    buf = jax.tree_util.tree_map(lambda x: x[order], groups)
    filled = jnp.sum(keep.astype(jnp.int32))

    def cond(carry):
        r, filled, _ = carry
        return (r < rounds) & (filled < B)

    def body(carry):
        r, filled, buf = carry
        new, keep = sample_round(r)
        slot = filled + jnp.cumsum(keep.astype(jnp.int32)) - 1
        slot = jnp.where(keep & (slot < B), slot, B)  # index B is out of range: dropped
        buf = jax.tree_util.tree_map(lambda b, n: b.at[slot].set(n, mode="drop"), buf, new)
        return r + 1, jnp.minimum(B, filled + jnp.sum(keep.astype(jnp.int32))), buf

    used, filled, buf = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), filled, buf))
    rows = jax.tree_util.tree_map(lambda x: x.reshape((B * G,) + x.shape[2:]), buf)
    roll = R.rollout_forwards(state.policy.params, None if state.value is None else state.value.params, frozen,
                              rows["prompt_ids"], rows["prompt_mask"], rows["response_ids"], rows["response_mask"],
                              chunk=cfg.minibatch_size, temperature=hp.temperature, value_mode=cfg.value_mode,
                              with_ref=cfg.uses_ref)
    metrics = {"dynamic_sampling_rounds": used.astype(jnp.float32),
               "dynamic_sampling_filled": filled.astype(jnp.float32) / B}
    return roll, rows["scores"], metrics


def _key(state: RLState, rng: Array | None) -> Array:
    return jax.random.fold_in(state.rng, state.step) if rng is None else rng


def sample_rows(rollout: R.Rollout, scores: Array) -> dict[str, Array]:
    """The token rows of a rollout with their scores (what the trainer decodes into ``samples.jsonl``)."""
    return {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
            "response_ids": rollout.response_ids, "response_mask": rollout.response_mask, "scores": scores}


def iteration_pure(state: RLState, frozen: RLFrozen, prompts: dict, rng: Array | None, cfg
                   ) -> tuple[RLState, dict, dict]:
    """The un-jitted iteration (vmap/scan it freely): ``(new_state, metrics, sample_rows)``."""
    TRACE_COUNTS[f"{cfg.name}_iteration"] += 1
    rng = _key(state, rng)
    if dynamic_rounds(cfg) > 1:
        roll, scores, dyn = dynamic_rollout(state, frozen, prompts, rng, cfg)
    else:
        roll = _rollout_impl(state, frozen, prompts, rng, cfg)
        scores, dyn = R.score_rollout(frozen, roll, chunk=cfg.minibatch_size, cfg=cfg), {}
    new_state, metrics = _update_impl(state, frozen, roll, scores, rng, cfg)
    return new_state, {**metrics, **dyn}, sample_rows(roll, scores)


def rollout_pure(state: RLState, frozen: RLFrozen, prompts: dict, rng: Array | None, cfg) -> R.Rollout:
    TRACE_COUNTS[f"{cfg.name}_rollout"] += 1
    return _rollout_impl(state, frozen, prompts, _key(state, rng), cfg)


def update_pure(state: RLState, frozen: RLFrozen, roll: R.Rollout, scores: Array, rng: Array | None, cfg
                ) -> tuple[RLState, dict]:
    TRACE_COUNTS[f"{cfg.name}_update"] += 1
    return _update_impl(state, frozen, roll, scores, _key(state, rng), cfg)


# The config is a pytree: its static fields are part of the program's identity, its traced
# hyper-parameters are arguments (changing them never recompiles).
_iteration_jit = jax.jit(iteration_pure, donate_argnums=(0,))
_rollout_jit = jax.jit(rollout_pure)
_update_jit = jax.jit(update_pure, donate_argnums=(0,))


def iteration(state: RLState, frozen: RLFrozen, prompts: dict, rng: Array | None = None, *, cfg,
              with_samples: bool = False):
    """One iteration of the config's algorithm as one jitted program (state donated; JAX reward source).

    Args:
      state: ``RLState`` (donated: do not reuse the argument after the call).
      frozen: ``RLFrozen`` with ``reward_fn`` or ``reward_model``.
      prompts: ``{"prompt_ids": [B, P] int, "prompt_mask": [B, P]}`` left-padded, B = cfg.batch_size.
      rng: the iteration's key (default ``fold_in(state.rng, state.step)``).
      cfg: the algorithm config (``PPOConfig``, ``GRPOConfig``, ...): static fields + traced ``hparams``.
      with_samples: also return the rollout's token rows and scores (:func:`sample_rows`); the same
        compiled program serves both.

    Returns ``(new_state, metrics)`` (or ``(new_state, metrics, samples)``): metrics are float32 scalars;
    ``first_ratio_mean``/``first_clipfrac`` are those of the first minibatch of the first epoch.
    """
    new_state, metrics, samples = _iteration_jit(state, frozen, prompts, rng, traced(cfg))
    return (new_state, metrics, samples) if with_samples else (new_state, metrics)


def rollout(state: RLState, frozen: RLFrozen, prompts: dict, rng: Array | None = None, *, cfg) -> R.Rollout:
    """Jitted first half of an iteration (sampling + policy/reference/value forwards).

    Use with a Python reward: decode ``rollout.response_ids`` on the host, score, and pass the ``[B]``
    scores to :func:`update` with the same ``rng``. ``rollout + update`` with the same key equals
    :func:`iteration`.
    """
    return _rollout_jit(state, frozen, prompts, rng, traced(cfg))


def update(state: RLState, frozen: RLFrozen, roll: R.Rollout, scores, rng: Array | None = None, *, cfg
           ) -> tuple[RLState, dict]:
    """Jitted second half: advantages, epochs × minibatches of updates, algorithm state (state donated)."""
    return _update_jit(state, frozen, roll, jnp.asarray(scores, jnp.float32), rng, traced(cfg))


# ---------------------------------------------------------------------------------------------
# Whole runs as one pure function (vmapped sweeps)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RLSetup:
    """Everything a run starts from (not traced per run; closed over by ``train``).

    frozen: ``RLFrozen`` (reference params, reward model or reward function, static modules).
    policy_model/policy_params/policy_tx: the policy's module, initial params, optimiser (unit rate).
    value_model/value_params/value_tx: the separate value model (None for shared heads / GRPO).
    algo: the resolved algorithm config (stop/pad ids from the tokenizer), set by ``build_setup``.
    prompts: ``{"prompt_ids": [N_pool, P], "prompt_mask": [N_pool, P]}`` left-padded prompt pool.
    """
    frozen: Any
    policy_model: Any
    policy_params: Any
    policy_tx: Any
    prompts: dict
    value_model: Any = None
    value_params: Any = None
    value_tx: Any = None
    algo: Any = None


def sample_prompt_batch(prompts: dict, batch_size: int, key: Array) -> dict:
    """``batch_size`` distinct rows of the pool (with replacement only if the pool is smaller)."""
    n = prompts["prompt_ids"].shape[0]
    idx = jax.random.choice(key, n, (batch_size,), replace=n < batch_size)
    return {k: jnp.asarray(v)[idx] for k, v in prompts.items()}


def make_train(algo, setup: RLSetup, *, num_iterations: int, sample_metrics: Callable | None = None,
               checkpoint_eval: tuple[int, Callable] | None = None) -> Callable[..., tuple[Any, dict]]:
    """A pure ``train(hparams, rng, run=None) -> (final_state, metrics_history)`` of ``num_iterations``
    iterations.

    Without ``run`` every run starts from the setup's params (same SFT start, same reference) and each
    iteration draws ``prompt_batch(algo)`` prompts from the setup's pool with ``fold_in(rng, iteration)``.
    ``run`` makes a run the trainer's run exactly (``rl.trainer.run_inputs``): ``{"prompts": {k: [I, B,
    P]}}`` (the data iterator's batches in order), and optionally ``"policy_params"``,
    ``"value_params"``, ``"ref_params"`` (this run's initial params); ``rng`` is then the state key and
    each iteration's key is ``fold_in(state.rng, step)``, as in ``rl.iteration``. Un-jitted: wrap it in
    ``jax.jit`` (one run) or ``jax.jit(jax.vmap(train))`` (a sweep: ``hparams``, ``rng`` and ``run``
    carry a leading runs axis; see :func:`stack_hparams`). ``metrics_history`` holds ``[num_iterations]``
    arrays. ``sample_metrics(sample_rows) -> dict`` adds per-iteration metrics of the iteration's own samples
    (e.g. their gold reward) to the history. ``checkpoint_eval=(every, fn)`` evaluates the updated policy
    inside the program after every iteration ``it`` with ``it % every == every - 1``: ``fn(state, frozen, cfg,
    key) -> dict`` of float32 scalars (e.g. ``evaluation.heldout_eval_fn``) runs under ``lax.cond`` (the
    predicate depends on ``it`` only, so it stays a branch under ``vmap``), with one key per run,
    ``fold_in(rng, num_iterations)``, the same at every checkpoint; the history gets ``eval/<name>``
    (NaN on the other iterations) and ``eval/mask`` (1.0 where evaluated).
    """
    algo.validate()
    if checkpoint_eval is not None and not 1 <= int(checkpoint_eval[0]) <= num_iterations:
        raise ValueError(f"make_train: checkpoint_eval every={checkpoint_eval[0]} must be in 1..num_iterations "
                         f"({num_iterations})")
    pool = {k: jnp.asarray(v) for k, v in setup.prompts.items()}

    def train(hparams, rng, run=None):
        run = {} if run is None else run
        cfg = algo.replace(hparams=hparams)
        frozen = setup.frozen.replace(ref_params=run["ref_params"]) if "ref_params" in run else setup.frozen
        state = init_state(policy_model=setup.policy_model, policy_params=run.get("policy_params", setup.policy_params),
                           policy_tx=setup.policy_tx, value_model=setup.value_model,
                           value_params=run.get("value_params", setup.value_params), value_tx=setup.value_tx,
                           cfg=cfg, rng=rng)

        def one_iteration(state, it):
            if "prompts" in run:
                batch, key = jax.tree_util.tree_map(lambda x: x[it], run["prompts"]), None
            else:
                key = jax.random.fold_in(rng, it)
                batch = sample_prompt_batch(pool, prompt_batch(cfg), jax.random.fold_in(key, 0))
                key = jax.random.fold_in(key, 1)
            new_state, metrics, rows = iteration_pure(state, frozen, batch, key, cfg)
            if sample_metrics is not None:
                metrics = {**metrics, **sample_metrics(rows)}
            if checkpoint_eval is not None:
                every, eval_fn = checkpoint_eval
                due, ekey = it % every == every - 1, jax.random.fold_in(rng, num_iterations)
                shapes = jax.eval_shape(eval_fn, new_state, frozen, cfg, ekey)
                ev = jax.lax.cond(due, lambda: eval_fn(new_state, frozen, cfg, ekey), lambda: jax.tree_util.tree_map(
                    lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes))
                metrics = {**metrics, **{f"eval/{k}": v for k, v in ev.items()}, "eval/mask": due.astype(jnp.float32)}
            return new_state, metrics

        return jax.lax.scan(one_iteration, state, jnp.arange(num_iterations))

    return train


def stack_hparams(cfg, values: dict[str, Any] | None = None, *, num_seeds: int = 1) -> tuple[Any, Array]:
    """Stacked traced hyper-parameters of a grid ``values`` × ``num_seeds`` seeds.

    ``values`` maps hyper-parameter names to lists (their Cartesian product is the grid); every other
    field keeps the config's value. Returns ``(hparams with a leading axis of num_points · num_seeds,
    seed_index [runs] int32)``; points vary slowest, seeds fastest. Example: β ∈ {0.01, 0.1} × 3
    seeds -> 6 runs.
    """
    values = dict(values or {})
    names = list(values)
    grid = list(itertools.product(*(list(values[n]) for n in names))) or [()]
    runs = [with_hparams(cfg, **dict(zip(names, point))).hparams.traced() for point in grid
            for _ in range(num_seeds)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *runs)
    seeds = np.tile(np.arange(num_seeds, dtype=np.int32), len(grid))
    return stacked, seeds  # (host numpy: it names runs, the host reads it)


def sweep_keys(base_seed: int, seed_index: Array) -> Array:
    """One PRNG key per run: ``fold_in(PRNGKey(base_seed), seed_index[i])`` (points share seeds)."""
    base = jax.random.PRNGKey(base_seed)
    return jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.asarray(seed_index))

