"""GRPO and RLOO (RLHF_SPEC §4): critic-free policy optimisation on the PPO machinery.

One iteration (B prompts, G samples each, N response tokens)::

    prompts [B, P] -> repeat each G times (contiguous) -> generate -> [B·G, N]
      -> chunked forwards: old_logp, entropy, ref_logp (when a KL term is used)
      -> scores [B·G] (reward model / JAX reward fn), missing-EOS penalty, clip
      -> GRPO:  A_i = (r_i - mean_g) / (std_g + 1e-4)          losses.grpo_advantages
         RLOO:  r_i = score_i - β Σ_t k1_t;  A_i = r_i - mean_{j≠i} r_j   losses.rloo_advantages
      -> lax.scan over epochs × minibatches of losses.grpo_policy_loss (clipped token loss,
         + β·k3 KL to the reference for GRPO when use_kl_loss, aggregation option)

No value model: the state is a ``PPOState`` with ``value=None`` (its ``kl_ctl`` holds the fixed β).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.config import ConfigError
from rlhf_jax.rl import rollout as R
from rlhf_jax.rl.config import GRPOConfig, GRPOHParams, static_part
from rlhf_jax.rl.ppo import (TRACE_COUNTS, own_copy, set_learning_rate, PPOFrozen, PPOState, apply_grads, rollout_forwards, run_epochs,
                             sample, score_rollout, summarize_updates)
from rlhf_jax.training.state import TrainState

Array = jax.Array


def _check(cfg: GRPOConfig) -> GRPOConfig:
    cfg.validate()
    if cfg.advantage == "rloo" and cfg.use_kl_loss:
        raise ConfigError("config key 'use_kl_loss': RLOO folds the k1 KL into the reward; set use_kl_loss=false "
                          "(or use advantage='grpo')")
    return cfg


def init_grpo_state(*, policy_model, policy_params, policy_tx: optax.GradientTransformation, cfg: GRPOConfig,
                    hparams: GRPOHParams | None = None, rng: Array | int = 0) -> PPOState:
    """A fresh state for GRPO/RLOO: ``PPOState(policy, value=None, kl_ctl=fixed β, rng, step=0)``."""
    _check(cfg)
    hparams = GRPOHParams.from_config(cfg) if hparams is None else hparams
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    policy = TrainState.create(apply_fn=policy_model.apply, params=policy_params, tx=policy_tx,
                               rng=jax.random.fold_in(rng, 1))
    policy = policy.replace(opt_state=set_learning_rate(policy.opt_state, hparams.lr))
    return own_copy(PPOState(policy=policy, value=None, kl_ctl=losses.AdaptiveKLController.create(hparams.kl_coef),
                             rng=jnp.asarray(rng), step=jnp.zeros((), jnp.int32)))


def group_advantages(scores: Array, old_logp: Array, ref_logp: Array, mask: Array, *, cfg: GRPOConfig,
                     kl_coef: Array) -> tuple[Array, Array]:
    """``(advantages [B·G], rewards [B·G])`` of a grouped rollout (GRPO or RLOO, see module doc)."""
    if cfg.advantage == "rloo":
        kl_seq = jnp.sum(losses.kl_estimate(old_logp, ref_logp, estimator="k1", mask=mask), axis=1)
        rewards = scores - kl_coef * kl_seq
        return losses.rloo_advantages(rewards, cfg.group_size), rewards
    return losses.grpo_advantages(scores, cfg.group_size, scale=cfg.advantage_scale), scores


def _grpo_minibatch_step(carry, batch, *, frozen: PPOFrozen, cfg: GRPOConfig, hparams: GRPOHParams):
    policy, value = carry
    use_kl = cfg.use_kl_loss

    def loss_fn(params):
        mask = batch["response_mask"]
        out = R.policy_forward(frozen.policy_model, params, batch["prompt_ids"], batch["prompt_mask"],
                               batch["response_ids"], mask, hparams.temperature)
        loss, m = losses.grpo_policy_loss(
            out["logp"], batch["old_logp"], batch["advantages"], mask, clip_eps=hparams.clip_eps,
            clip_eps_high=hparams.clip_eps_high, ref_logp=batch["ref_logp"] if use_kl else None,
            kl_coef=hparams.kl_coef, aggregation=cfg.loss_aggregation, max_len=cfg.max_new_tokens)
        metrics = {k: m[k] for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max")}
        metrics["policy_loss"] = loss
        metrics["entropy_update"] = losses.masked_mean(out["entropy"], mask)
        if use_kl:
            metrics["kl_loss"] = m["kl"]
        return loss, metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(policy.params)
    metrics["policy_grad_norm"] = optax.tree.norm(grads)
    return (apply_grads(policy, grads, hparams.lr), value), metrics


def _grpo_rollout_impl(state: PPOState, frozen: PPOFrozen, prompts: dict, rng: Array, *, cfg: GRPOConfig,
                       hparams: GRPOHParams) -> R.Rollout:
    prompt_ids, prompt_mask = R.check_prompts(prompts, cfg.batch_size, f"{cfg.advantage}_rollout")
    grouped = R.repeat_prompts({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}, cfg.group_size)
    gen = sample(frozen, state.policy.params, grouped["prompt_ids"], grouped["prompt_mask"],
                 jax.random.fold_in(rng, 0), cfg=cfg, hparams=hparams)
    with_ref = cfg.use_kl_loss or cfg.advantage == "rloo"
    return rollout_forwards(state.policy.params, None, frozen, grouped["prompt_ids"], grouped["prompt_mask"],
                            gen.tokens, gen.mask, chunk=cfg.minibatch_size, temperature=hparams.temperature,
                            value_mode=None, with_ref=with_ref)


def _grpo_update_impl(state: PPOState, frozen: PPOFrozen, rollout: R.Rollout, scores: Array, rng: Array, *,
                      cfg: GRPOConfig, hparams: GRPOHParams) -> tuple[PPOState, dict]:
    mask = rollout.response_mask.astype(jnp.float32)
    stopped = R.has_stop_token(rollout.response_ids, rollout.response_mask, cfg.stop_token_ids)
    scores_raw = jnp.asarray(scores, jnp.float32)
    scores = R.adjust_scores(scores_raw, stopped, missing_eos_penalty=hparams.missing_eos_penalty,
                             score_clip=hparams.score_clip, stop_token_ids=cfg.stop_token_ids)
    advantages, rewards = group_advantages(scores, rollout.old_logp, rollout.ref_logp, mask, cfg=cfg,
                                           kl_coef=hparams.kl_coef)
    advantages = jax.lax.stop_gradient(advantages)
    data = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
            "response_ids": rollout.response_ids, "response_mask": rollout.response_mask,
            "old_logp": rollout.old_logp, "ref_logp": rollout.ref_logp, "advantages": advantages}

    def step_fn(carry, batch):
        return _grpo_minibatch_step(carry, batch, frozen=frozen, cfg=cfg, hparams=hparams)

    policy, _, stacked = run_epochs(state.policy, None, data, jax.random.fold_in(rng, 1), epochs=cfg.epochs,
                                    minibatches=cfg.minibatches, step_fn=step_fn)
    kl_seq = jnp.sum(losses.kl_estimate(rollout.old_logp, rollout.ref_logp, estimator="k1", mask=mask), axis=1)
    group_std = jnp.std(scores.reshape(cfg.batch_size, cfg.group_size), axis=1, ddof=1)
    metrics = {
        "score": jnp.mean(scores),
        "score_raw": jnp.mean(scores_raw),
        "score_std": jnp.std(scores),
        "reward": jnp.mean(rewards),
        "kl": jnp.mean(kl_seq),
        "kl_coef": jnp.asarray(hparams.kl_coef, jnp.float32),
        "group_score_std": jnp.mean(group_std),
        "frac_zero_std_groups": jnp.mean((group_std < 1e-6).astype(jnp.float32)),
        "advantage_abs_mean": jnp.mean(jnp.abs(advantages)),
        "entropy": losses.masked_mean(rollout.entropy, mask),
        "response_length": jnp.mean(jnp.sum(mask, axis=1)),
        "stop_fraction": jnp.mean(stopped.astype(jnp.float32)),
        "num_tokens": jnp.sum(mask),
    }
    metrics.update(summarize_updates(stacked))
    kl_ctl = state.kl_ctl.replace(beta=jnp.asarray(hparams.kl_coef, jnp.float32))
    return state.replace(policy=policy, kl_ctl=kl_ctl, step=state.step + 1), metrics


def _key(state: PPOState, rng: Array | None) -> Array:
    return jax.random.fold_in(state.rng, state.step) if rng is None else rng


def grpo_iteration_pure(state: PPOState, frozen: PPOFrozen, prompts: dict, rng: Array | None = None, *,
                        cfg: GRPOConfig, hparams: GRPOHParams) -> tuple[PPOState, dict]:
    """Un-jitted GRPO/RLOO iteration (``cfg.advantage`` picks the estimator)."""
    TRACE_COUNTS[f"{cfg.advantage}_iteration"] += 1
    rng = _key(state, rng)
    rollout = _grpo_rollout_impl(state, frozen, prompts, rng, cfg=cfg, hparams=hparams)
    scores = score_rollout(frozen, rollout, chunk=cfg.minibatch_size)
    return _grpo_update_impl(state, frozen, rollout, scores, rng, cfg=cfg, hparams=hparams)


def grpo_rollout_pure(state, frozen, prompts, rng=None, *, cfg: GRPOConfig, hparams: GRPOHParams) -> R.Rollout:
    return _grpo_rollout_impl(state, frozen, prompts, _key(state, rng), cfg=cfg, hparams=hparams)


def grpo_update_pure(state, frozen, rollout, scores, rng=None, *, cfg: GRPOConfig, hparams: GRPOHParams):
    return _grpo_update_impl(state, frozen, rollout, scores, _key(state, rng), cfg=cfg, hparams=hparams)


_grpo_iteration_jit = jax.jit(grpo_iteration_pure, static_argnames=("cfg",), donate_argnums=(0,))
_grpo_rollout_jit = jax.jit(grpo_rollout_pure, static_argnames=("cfg",))
_grpo_update_jit = jax.jit(grpo_update_pure, static_argnames=("cfg",), donate_argnums=(0,))


def grpo_iteration(state: PPOState, frozen: PPOFrozen, prompts: dict, rng: Array | None = None, *,
                   cfg: GRPOConfig, hparams: GRPOHParams | None = None) -> tuple[PPOState, dict]:
    """One GRPO (or RLOO, per ``cfg.advantage``) iteration as one jitted program (state donated).

    ``prompts``: ``batch_size`` left-padded prompts; each is sampled ``group_size`` times.
    """
    hparams = GRPOHParams.from_config(cfg) if hparams is None else hparams
    return _grpo_iteration_jit(state, frozen, prompts, rng, cfg=static_part(_check(cfg)), hparams=hparams)


def rloo_iteration(state: PPOState, frozen: PPOFrozen, prompts: dict, rng: Array | None = None, *,
                   cfg: GRPOConfig, hparams: GRPOHParams | None = None) -> tuple[PPOState, dict]:
    """One RLOO iteration: :func:`grpo_iteration` with ``advantage='rloo'`` (KL in the reward)."""
    if cfg.advantage != "rloo":
        raise ConfigError(f"config key 'advantage': rloo_iteration needs advantage='rloo', got {cfg.advantage!r}")
    return grpo_iteration(state, frozen, prompts, rng, cfg=cfg, hparams=hparams)


def grpo_rollout(state, frozen, prompts, rng=None, *, cfg: GRPOConfig, hparams: GRPOHParams | None = None):
    """Jitted rollout half (for a Python reward: score ``rollout.response_ids`` on the host)."""
    hparams = GRPOHParams.from_config(cfg) if hparams is None else hparams
    return _grpo_rollout_jit(state, frozen, prompts, rng, cfg=static_part(_check(cfg)), hparams=hparams)


def grpo_update(state, frozen, rollout, scores, rng=None, *, cfg: GRPOConfig, hparams: GRPOHParams | None = None):
    """Jitted update half with host-computed ``scores [B·G]`` (state donated)."""
    hparams = GRPOHParams.from_config(cfg) if hparams is None else hparams
    return _grpo_update_jit(state, frozen, rollout, jnp.asarray(scores, jnp.float32), rng,
                            cfg=static_part(_check(cfg)), hparams=hparams)
