"""Algorithm configs of the RL trainers: static settings and traced hyper-parameters.

Every algorithm has two halves:

* a frozen dataclass (``PPOConfig``, ``GRPOConfig``, ``DPOConfig``) holding everything the
  compiled program's *shape* depends on (batch size, response length, epochs, minibatches,
  estimator names, whitening switches, stop tokens) **and** the default values of the
  continuous hyper-parameters, so one config section describes a run;
* a ``flax.struct`` pytree of float32 scalars (``PPOHParams``, ``GRPOHParams``, ``DPOHParams``)
  holding the continuous hyper-parameters (β, KL target, clip ranges, learning rate, vf/ent
  coefficients, temperature, γ, λ, ...). These are *traced* arguments of the jitted iteration:
  changing them never recompiles, and ``jax.vmap`` maps over them (stack N values on a leading
  axis).

``static_part(cfg)`` returns the config with every hyper-parameter field reset to its default,
which is what the jitted functions receive as their static argument, so two configs that differ
only in a hyper-parameter share one compiled program.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
from flax import struct

from rlhf_jax.config import ConfigError

KLEstimator = Literal["k1", "k2", "k3"]


def _f32(x) -> jnp.ndarray:
    return jnp.asarray(x, jnp.float32)


def _check_positive_int(prefix: str, name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"config key {prefix + name!r}: expected an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO with a KL penalty (RLHF_SPEC §3). Defaults follow the spec / InstructGPT recipe.

    Static (part of the compiled program):
      batch_size: prompts (= rollouts) per iteration, B.
      max_new_tokens: response length N (responses are padded to it after the stop token).
      ppo_epochs: passes over the rollout per iteration (4).
      minibatches: minibatches per epoch; ``batch_size`` must be divisible by it. The reference,
        value and reward forward passes of the rollout are run in chunks of the same size.
      kl_estimator: per-token KL estimator in the reward: k1 ``log π - log π_ref`` (default),
        k2 ``½ (log π_ref - log π)²``, k3 ``exp(log π_ref - log π) - 1 - (log π_ref - log π)``.
      adaptive_kl: use the Ziegler et al. adaptive controller (β ← β(1 + clip(KL/target-1, ±0.2)·n/H));
        otherwise β = ``kl_coef`` is fixed.
      whiten_rewards: whiten per-token rewards over the batch (scale only, mean added back). Off.
      whiten_advantages: whiten GAE advantages over the masked tokens of the global batch. On.
      value_model: "separate" (its own trunk, own optimizer; PPOState.value) or "shared"
        (``CausalLMWithValueHead``: one trunk, loss = policy + vf_coef · value; PPOState.value None).
      stop_token_ids: tokens that end a response (usually EOS); empty = responses run to N tokens.
      pad_token_id: written after the stop token.
      top_k: sampler top-k (0 = off).
      dual_clip: dual-clip constant c > 1 bounding the policy loss for A < 0 (None = off).
      loss_reduction: token-level aggregation of the policy loss (``ppo_policy_loss``'s reduction).
      use_kl_loss: add ``kl_loss_coef · k3(π‖π_ref)`` to the policy loss (off in classic PPO).

    Traced (``PPOHParams``; values here are the defaults):
      kl_coef β (0.05; the fixed β, or the adaptive controller's initial β), kl_target (6.0 nats per
      sequence), kl_horizon (10000 sequences), lr (1e-5 peak policy rate), value_lr (None = lr),
      clip_eps ε_low (0.2), clip_eps_high ε_high (None = clip_eps), vf_clip ε_v (0.2), vf_coef (0.1),
      ent_coef (0.0), kl_loss_coef (0.0), temperature τ (1.0), top_p (1.0), gamma γ (1.0),
      lam λ (0.95), missing_eos_penalty (0.0 subtracted from the score of responses without a stop
      token), score_clip (None = no clipping; else scores are clipped to ±score_clip).
    """
    batch_size: int = 16
    max_new_tokens: int = 16
    ppo_epochs: int = 4
    minibatches: int = 1
    kl_estimator: KLEstimator = "k1"
    adaptive_kl: bool = False
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    value_model: Literal["separate", "shared"] = "separate"
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    top_k: int = 0
    dual_clip: float | None = None
    loss_reduction: Literal["token", "sequence", "sum"] = "token"
    use_kl_loss: bool = False
    # ---- traced hyper-parameters (defaults) ----
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

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.minibatches

    def validate(self, prefix: str = "ppo.") -> "PPOConfig":
        _check_positive_int(prefix, "batch_size", self.batch_size)
        _check_positive_int(prefix, "max_new_tokens", self.max_new_tokens)
        _check_positive_int(prefix, "ppo_epochs", self.ppo_epochs)
        _check_positive_int(prefix, "minibatches", self.minibatches)
        if self.batch_size % self.minibatches:
            raise ConfigError(f"config key {prefix + 'minibatches'!r}: batch_size {self.batch_size} is not "
                              f"divisible by minibatches {self.minibatches}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"config key {prefix + 'kl_estimator'!r}: expected k1|k2|k3, got {self.kl_estimator!r}")
        if self.value_model not in ("separate", "shared"):
            raise ConfigError(f"config key {prefix + 'value_model'!r}: expected separate|shared, "
                              f"got {self.value_model!r}")
        if self.temperature <= 0:
            raise ConfigError(f"config key {prefix + 'temperature'!r}: must be > 0, got {self.temperature}")
        if self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ConfigError(f"config key {prefix + 'clip_eps'!r}: clip ranges must be > 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"config key {prefix + 'dual_clip'!r}: must be > 1, got {self.dual_clip}")
        if self.adaptive_kl and not (self.kl_target > 0 and self.kl_horizon > 0):
            raise ConfigError(f"config key {prefix + 'kl_target'!r}: adaptive_kl needs kl_target > 0 and "
                              f"kl_horizon > 0, got {self.kl_target}, {self.kl_horizon}")
        if not isinstance(self.stop_token_ids, tuple):
            raise ConfigError(f"config key {prefix + 'stop_token_ids'!r}: expected a tuple of ints")
        return self


@struct.dataclass
class PPOHParams:
    """Traced PPO hyper-parameters (float32 scalars, or ``[N]`` stacks under ``jax.vmap``)."""
    kl_coef: jnp.ndarray
    kl_target: jnp.ndarray
    kl_horizon: jnp.ndarray
    lr: jnp.ndarray
    value_lr: jnp.ndarray
    clip_eps: jnp.ndarray
    clip_eps_high: jnp.ndarray
    vf_clip: jnp.ndarray
    vf_coef: jnp.ndarray
    ent_coef: jnp.ndarray
    kl_loss_coef: jnp.ndarray
    temperature: jnp.ndarray
    top_p: jnp.ndarray
    gamma: jnp.ndarray
    lam: jnp.ndarray
    missing_eos_penalty: jnp.ndarray
    score_clip: jnp.ndarray

    @classmethod
    def from_config(cls, cfg: PPOConfig, **overrides) -> "PPOHParams":
        """The config's hyper-parameter values as float32 arrays; ``overrides`` replace some.

        ``value_lr=None`` becomes ``lr``, ``clip_eps_high=None`` becomes ``clip_eps``,
        ``score_clip=None`` becomes +inf (clipping to ±inf is the identity).
        """
        vals = {f: getattr(cfg, f) for f in PPO_HPARAM_FIELDS}
        unknown = set(overrides) - set(vals)
        if unknown:
            raise ConfigError(f"unknown PPO hyper-parameter(s) {sorted(unknown)}; valid: {sorted(vals)}")
        vals.update(overrides)
        if vals["value_lr"] is None:
            vals["value_lr"] = vals["lr"]
        if vals["clip_eps_high"] is None:
            vals["clip_eps_high"] = vals["clip_eps"]
        if vals["score_clip"] is None:
            vals["score_clip"] = math.inf
        return cls(**{k: _f32(v) for k, v in vals.items()})


PPO_HPARAM_FIELDS = tuple(f.name for f in dataclasses.fields(PPOHParams))


# ---------------------------------------------------------------------------------------------
# GRPO / RLOO (critic-free, group sampling)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO and RLOO (RLHF_SPEC §4): G samples per prompt, no value model.

    Static:
      batch_size: prompts per iteration; the rollout has ``batch_size · group_size`` responses,
        each prompt's G samples contiguous.
      group_size: G (>= 2).
      max_new_tokens, stop_token_ids, pad_token_id, top_k: as in PPO.
      epochs: passes over each rollout (GRPO's μ; 1 = on-policy, the ratio is then exactly 1).
      minibatches: minibatches per epoch over the ``batch_size · group_size`` responses.
      advantage: "grpo" (``(r - mean_g) / (std_g + 1e-4)``, unbiased std) or "rloo"
        (``r_i - mean_{j≠i} r_j`` with the k1 KL folded into the reward).
      advantage_scale: GRPO's scaling: "group" (default), "batch" or "none" (Dr.GRPO).
      loss_aggregation: "seq-mean-token-mean" (GRPO paper), "token-mean" (DAPO), or
        "dr-grpo" (Dr.GRPO: sum over tokens / (B · max_new_tokens)).
      use_kl_loss: add ``kl_coef · k3(π‖π_ref)`` to the loss (GRPO; RLOO puts KL in the reward).

    Traced (``GRPOHParams``): kl_coef β (0.04 GRPO-in-loss or RLOO-in-reward), lr (1e-5),
      clip_eps (0.2), clip_eps_high (None = clip_eps), temperature (1.0), top_p (1.0),
      missing_eos_penalty (0.0), score_clip (None).
    """
    batch_size: int = 8
    group_size: int = 4
    max_new_tokens: int = 16
    epochs: int = 1
    minibatches: int = 1
    advantage: Literal["grpo", "rloo"] = "grpo"
    advantage_scale: Literal["group", "batch", "none"] = "group"
    loss_aggregation: Literal["seq-mean-token-mean", "token-mean", "dr-grpo"] = "seq-mean-token-mean"
    use_kl_loss: bool = True
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    top_k: int = 0
    # ---- traced hyper-parameters (defaults) ----
    kl_coef: float = 0.04
    lr: float = 1e-5
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float = 0.0
    score_clip: float | None = None

    @property
    def rollout_size(self) -> int:
        return self.batch_size * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.rollout_size // self.minibatches

    def validate(self, prefix: str = "grpo.") -> "GRPOConfig":
        _check_positive_int(prefix, "batch_size", self.batch_size)
        _check_positive_int(prefix, "group_size", self.group_size, 2)
        _check_positive_int(prefix, "max_new_tokens", self.max_new_tokens)
        _check_positive_int(prefix, "epochs", self.epochs)
        _check_positive_int(prefix, "minibatches", self.minibatches)
        if self.rollout_size % self.minibatches:
            raise ConfigError(f"config key {prefix + 'minibatches'!r}: batch_size·group_size = "
                              f"{self.rollout_size} is not divisible by minibatches {self.minibatches}")
        if self.advantage not in ("grpo", "rloo"):
            raise ConfigError(f"config key {prefix + 'advantage'!r}: expected grpo|rloo, got {self.advantage!r}")
        if self.advantage_scale not in ("group", "batch", "none"):
            raise ConfigError(f"config key {prefix + 'advantage_scale'!r}: expected group|batch|none, "
                              f"got {self.advantage_scale!r}")
        if self.loss_aggregation not in ("seq-mean-token-mean", "token-mean", "dr-grpo"):
            raise ConfigError(f"config key {prefix + 'loss_aggregation'!r}: expected seq-mean-token-mean|"
                              f"token-mean|dr-grpo, got {self.loss_aggregation!r}")
        if self.temperature <= 0:
            raise ConfigError(f"config key {prefix + 'temperature'!r}: must be > 0, got {self.temperature}")
        if not isinstance(self.stop_token_ids, tuple):
            raise ConfigError(f"config key {prefix + 'stop_token_ids'!r}: expected a tuple of ints")
        return self


@struct.dataclass
class GRPOHParams:
    """Traced GRPO/RLOO hyper-parameters (float32 scalars, or stacks under ``jax.vmap``)."""
    kl_coef: jnp.ndarray
    lr: jnp.ndarray
    clip_eps: jnp.ndarray
    clip_eps_high: jnp.ndarray
    temperature: jnp.ndarray
    top_p: jnp.ndarray
    missing_eos_penalty: jnp.ndarray
    score_clip: jnp.ndarray

    @classmethod
    def from_config(cls, cfg: GRPOConfig, **overrides) -> "GRPOHParams":
        vals = {f: getattr(cfg, f) for f in GRPO_HPARAM_FIELDS}
        unknown = set(overrides) - set(vals)
        if unknown:
            raise ConfigError(f"unknown GRPO hyper-parameter(s) {sorted(unknown)}; valid: {sorted(vals)}")
        vals.update(overrides)
        if vals["clip_eps_high"] is None:
            vals["clip_eps_high"] = vals["clip_eps"]
        if vals["score_clip"] is None:
            vals["score_clip"] = math.inf
        return cls(**{k: _f32(v) for k, v in vals.items()})


GRPO_HPARAM_FIELDS = tuple(f.name for f in dataclasses.fields(GRPOHParams))


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO family (RLHF_SPEC §4): ``losses.dpo_loss`` on sequence log-probs of chosen/rejected.

    Static: loss_type ("sigmoid"|"hinge"|"ipo"|"robust"|"rdpo"), precompute_ref (reference log-probs
    computed once over the dataset before training, else on the fly each step).
    Traced (``DPOHParams``): beta (0.1), label_smoothing (0.0; robust/cDPO ε), lr (1e-6).
    """
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "rdpo"] = "sigmoid"
    precompute_ref: bool = True
    beta: float = 0.1
    label_smoothing: float = 0.0
    lr: float = 1e-6

    def validate(self, prefix: str = "dpo.") -> "DPOConfig":
        if self.loss_type not in ("sigmoid", "hinge", "ipo", "robust", "rdpo"):
            raise ConfigError(f"config key {prefix + 'loss_type'!r}: expected sigmoid|hinge|ipo|robust, "
                              f"got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigError(f"config key {prefix + 'beta'!r}: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"config key {prefix + 'label_smoothing'!r}: must be in [0, 0.5), "
                              f"got {self.label_smoothing}")
        return self


@struct.dataclass
class DPOHParams:
    beta: jnp.ndarray
    label_smoothing: jnp.ndarray
    lr: jnp.ndarray

    @classmethod
    def from_config(cls, cfg: DPOConfig, **overrides) -> "DPOHParams":
        vals = {f: getattr(cfg, f) for f in DPO_HPARAM_FIELDS}
        unknown = set(overrides) - set(vals)
        if unknown:
            raise ConfigError(f"unknown DPO hyper-parameter(s) {sorted(unknown)}; valid: {sorted(vals)}")
        vals.update(overrides)
        return cls(**{k: _f32(v) for k, v in vals.items()})


DPO_HPARAM_FIELDS = tuple(f.name for f in dataclasses.fields(DPOHParams))


def static_part(cfg):
    """``cfg`` with every traced hyper-parameter field reset to its class default.

    The jitted iterations take this as their static argument, so configs that differ only in
    traced values (β, lr, clip ranges, ...) hit the same compiled program.
    """
    fields = {PPOConfig: PPO_HPARAM_FIELDS, GRPOConfig: GRPO_HPARAM_FIELDS,
              DPOConfig: DPO_HPARAM_FIELDS}[type(cfg)]
    defaults = {f.name: f.default for f in dataclasses.fields(type(cfg)) if f.name in fields}
    return dataclasses.replace(cfg, **defaults)
