"""PPO with a KL penalty (InstructGPT; docs/MATH.md, PPO section): the algorithm's pieces for the RL core.

Per iteration, on top of the core's rollout and its per-token KL ``kl_t`` (estimator ``kl_estimator``):

    r_t = -β·kl_t (+ score on the last real token)      losses.kl_penalized_rewards
    optional reward whitening (scale only)                losses.masked_whiten
    A, R = GAE(r, V; γ, λ)                                losses.gae_advantages
    advantage whitening over the global batch             losses.masked_whiten
    minibatch loss = clipped policy loss + vf_coef · clipped value loss − ent_coef · entropy
                     (+ kl_loss_coef · k3 to the reference when use_kl_loss)
    β: fixed ``kl_coef``, or the adaptive controller (Ziegler et al.) in the state's ``algo_state``
"""
from __future__ import annotations

import math
from typing import Literal

import jax.numpy as jnp
from flax import struct

from rlhf_jax import losses
from rlhf_jax.rl.core import ReadsHParams, traced_hparams
from rlhf_jax.rl.validation import check_choice, check_policy_hparams, check_positive_int, concrete, fail

KLEstimator = Literal["k1", "k2", "k3"]


@struct.dataclass
class PPOHParams:
    """PPO's traced hyper-parameters: arguments of the compiled iteration, so changing them never
    recompiles and ``jax.vmap`` maps over them. Values here are the defaults.

    kl_coef β (the fixed β, or the adaptive controller's initial β); kl_target (nats per sequence) and
    kl_horizon (sequences) of the adaptive controller; lr (peak policy rate) and value_lr (None = lr);
    clip_eps ε_low and clip_eps_high ε_high (None = clip_eps); vf_clip ε_v; vf_coef; ent_coef;
    kl_loss_coef; temperature τ and top_p of the sampler; gamma γ and lam λ of GAE;
    missing_eos_penalty (subtracted from the score of a response without a stop token); score_clip
    (None = none; else scores are clipped to ±score_clip); uwo_lambda λ of the uncertainty-weighted
    ensemble reward ``mean − λ·var`` (with ``reward_aggregation="uwo"``).
    """
    kl_coef: float = 0.05
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    lr: float = 1e-5
    value_lr: float | None = None
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    kl_loss_coef: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    missing_eos_penalty: float = 0.0
    score_clip: float | None = None
    uwo_lambda: float = 0.5

    def traced(self) -> "PPOHParams":
        return traced_hparams(self, value_lr="lr", clip_eps_high="clip_eps", score_clip=math.inf)

    def validate(self, prefix: str) -> None:
        """Range checks of the values given as Python numbers (traced arrays are the caller's)."""
        check_policy_hparams(prefix, self, non_negative=("value_lr", "vf_coef", "ent_coef", "kl_loss_coef", "vf_clip",
                                                         "uwo_lambda"))


@struct.dataclass
class PPOConfig(ReadsHParams):
    """PPO's section of a trainer config: static settings (part of the compiled program) + ``hparams``.

    batch_size: prompts (= rollouts) per iteration, B. max_new_tokens: response length N (padded after
    the stop token). ppo_epochs: passes over each rollout (4). minibatches: per epoch (batch_size must be
    divisible by it; the rollout's forwards run in chunks of the same size). kl_estimator: per-token KL
    in the reward, k1 ``log π − log π_ref``, k2 ``½(log π_ref − log π)²``, k3 ``exp(Δ) − 1 − Δ`` with
    ``Δ = log π_ref − log π``. adaptive_kl: the adaptive controller instead of a fixed β.
    whiten_rewards (off) / whiten_advantages (on). value_model: "separate" (own trunk and optimiser) or
    "shared" (a value head on the policy's trunk). stop_token_ids (empty = run to N tokens; the trainers
    fill in the tokenizer's EOS), pad_token_id, top_k (0 = off). dual_clip: c > 1 bounding the policy
    loss for A < 0 (None = off). loss_reduction: token|sequence|sum. use_kl_loss: add
    ``kl_loss_coef · k3`` to the policy loss. reward_aggregation: how a reward-model ENSEMBLE's member
    scores become one reward (mean | wco = min over members | uwo = mean − uwo_lambda·var); unused with a
    single reward model.
    """
    batch_size: int = struct.field(pytree_node=False, default=16)
    max_new_tokens: int = struct.field(pytree_node=False, default=16)
    ppo_epochs: int = struct.field(pytree_node=False, default=4)
    minibatches: int = struct.field(pytree_node=False, default=1)
    kl_estimator: KLEstimator = struct.field(pytree_node=False, default="k1")
    adaptive_kl: bool = struct.field(pytree_node=False, default=False)
    whiten_rewards: bool = struct.field(pytree_node=False, default=False)
    whiten_advantages: bool = struct.field(pytree_node=False, default=True)
    value_model: Literal["separate", "shared"] = struct.field(pytree_node=False, default="separate")
    stop_token_ids: tuple[int, ...] = struct.field(pytree_node=False, default=())
    pad_token_id: int = struct.field(pytree_node=False, default=0)
    top_k: int = struct.field(pytree_node=False, default=0)
    dual_clip: float | None = struct.field(pytree_node=False, default=None)
    loss_reduction: Literal["token", "sequence", "sum"] = struct.field(pytree_node=False, default="token")
    use_kl_loss: bool = struct.field(pytree_node=False, default=False)
    reward_aggregation: Literal["mean", "wco", "uwo"] = struct.field(pytree_node=False, default="mean")
    hparams: PPOHParams = PPOHParams()

    name = "ppo"
    group_size = 1
    uses_ref = True

    @property
    def epochs(self) -> int:
        return self.ppo_epochs

    @property
    def value_mode(self) -> str:
        return self.value_model

    @property
    def rollout_size(self) -> int:
        return self.batch_size

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.minibatches

    def validate(self, prefix: str = "ppo.") -> "PPOConfig":
        for name in ("batch_size", "max_new_tokens", "ppo_epochs", "minibatches"):
            check_positive_int(prefix, name, getattr(self, name))
        check_positive_int(prefix, "top_k", self.top_k, minimum=0)
        if self.batch_size % self.minibatches:
            fail(prefix, "minibatches", self.minibatches,
                 f"a divisor of batch_size {self.batch_size}")
        check_choice(prefix, "kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        check_choice(prefix, "value_model", self.value_model, ("separate", "shared"))
        check_choice(prefix, "loss_reduction", self.loss_reduction, ("token", "sequence", "sum"))
        check_choice(prefix, "reward_aggregation", self.reward_aggregation, ("mean", "wco", "uwo"))
        if self.dual_clip is not None and not self.dual_clip > 1:
            fail(prefix, "dual_clip", self.dual_clip, "a number > 1 (or none)")
        if not isinstance(self.stop_token_ids, tuple):
            fail(prefix, "stop_token_ids", self.stop_token_ids, "a tuple of token ids")
        self.hparams.validate(prefix)
        hp = self.hparams
        if self.adaptive_kl and concrete(hp.kl_target) and not (hp.kl_target > 0 and hp.kl_horizon > 0):
            fail(prefix, "kl_target", hp.kl_target, "kl_target > 0 and kl_horizon > 0 with adaptive_kl")
        return self

    # ---- the pieces the RL core calls (hparams are traced arrays here) ----

    def init_algo_state(self):
        """The KL controller of an adaptive run (None for a fixed β)."""
        if not self.adaptive_kl:
            return None
        hp = self.hparams
        return losses.AdaptiveKLController.create(hp.kl_coef, target=hp.kl_target, horizon=hp.kl_horizon)

    def beta(self, algo_state):
        return algo_state.beta if self.adaptive_kl else jnp.asarray(self.hparams.kl_coef, jnp.float32)

    def advantages(self, algo_state, rollout, scores, kl_tok):
        hp = self.hparams
        mask = rollout.response_mask.astype(jnp.float32)
        beta = self.beta(algo_state)
        # losses.kl_penalized_rewards on the KL the core computed once: the score on the last real token
        last = losses.last_token_index(mask)
        at_last = (jnp.arange(mask.shape[1])[None, :] == last[:, None]) & (mask > 0)
        rewards = -beta * kl_tok + jnp.where(at_last, scores[:, None], 0.0)
        if self.whiten_rewards:
            rewards = losses.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = losses.gae_advantages(rewards, rollout.old_values, mask, gamma=hp.gamma, lam=hp.lam)
        if self.whiten_advantages:
            advantages = losses.masked_whiten(advantages, mask)
        advantages, returns = advantages * mask, returns * mask
        non_score = -beta * jnp.sum(kl_tok * mask, axis=1)
        metrics = {
            "non_score_reward": jnp.mean(non_score),
            "total_reward": jnp.mean(scores + non_score),
            "kl_coef": beta,
            "explained_variance": losses.explained_variance(rollout.old_values, returns, mask),
            "advantage_mean": losses.masked_mean(advantages, mask),
            "return_mean": losses.masked_mean(returns, mask),
            "value_mean": losses.masked_mean(rollout.old_values, mask),
        }
        data = {"advantages": advantages, "returns": returns, "old_values": rollout.old_values}
        return data, metrics

    def minibatch_loss(self, out, values, batch):
        hp = self.hparams
        mask = batch["response_mask"]
        pg_loss, pg_m = losses.ppo_policy_loss(
            out["logp"], batch["old_logp"], batch["advantages"], mask, clip_eps=hp.clip_eps,
            clip_eps_high=hp.clip_eps_high, dual_clip=self.dual_clip, reduction=self.loss_reduction)
        vf_loss, vf_m = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                              clip_eps=hp.vf_clip)
        entropy = losses.masked_mean(out["entropy"], mask)
        total = pg_loss + hp.vf_coef * vf_loss - hp.ent_coef * entropy
        metrics = {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy_update": entropy}
        if self.use_kl_loss:
            kl_loss = losses.masked_mean(losses.kl_estimate(out["logp"], batch["ref_logp"], estimator="k3",
                                                            mask=mask), mask)
            total = total + hp.kl_loss_coef * kl_loss
            metrics["kl_loss"] = kl_loss
        metrics.update({k: pg_m[k] for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max")})
        metrics["value_clipfrac"] = vf_m["vf_clipfrac"]
        return total, metrics

    def next_algo_state(self, algo_state, metrics):
        if not self.adaptive_kl:
            metrics["kl_coef_next"] = jnp.asarray(self.hparams.kl_coef, jnp.float32)
            return None
        hp = self.hparams
        ctl = algo_state.replace(target=jnp.asarray(hp.kl_target, jnp.float32),
                                 horizon=jnp.asarray(hp.kl_horizon, jnp.float32)).update(metrics["kl"], self.batch_size)
        metrics["kl_coef_next"] = ctl.beta
        return ctl
