"""GRPO and RLOO (docs/MATH.md, critic-free methods): the algorithms' pieces for the RL core.

B prompts, each sampled G times (a prompt's samples contiguous), no value model::

    GRPO:  A_i = (r_i − mean_g) / (std_g + 1e-4)                           losses.grpo_advantages
    RLOO:  r_i = score_i − β Σ_t k1_t;  A_i = r_i − mean_{j≠i} r_j         losses.rloo_advantages
    minibatch loss: losses.grpo_policy_loss (clipped token loss, + β·k3 to the reference when
    use_kl_loss, aggregation seq-mean-token-mean | token-mean | dr-grpo)
"""
from __future__ import annotations

import math
from typing import Literal

import jax.numpy as jnp
from flax import struct

from rlhf_jax import losses
from rlhf_jax.rl.core import ReadsHParams, traced_hparams
from rlhf_jax.rl.validation import check_choice, check_policy_hparams, check_positive_int, fail


@struct.dataclass
class GRPOHParams:
    """GRPO/RLOO's traced hyper-parameters (defaults here): kl_coef β (in the loss for GRPO, in the
    reward for RLOO), lr, clip_eps, clip_eps_high (None = clip_eps), temperature, top_p,
    missing_eos_penalty, score_clip (None = none)."""
    kl_coef: float = 0.04
    lr: float = 1e-5
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float = 0.0
    score_clip: float | None = None

    def traced(self) -> "GRPOHParams":
        return traced_hparams(self, clip_eps_high="clip_eps", score_clip=math.inf)

    def validate(self, prefix: str) -> None:
        check_policy_hparams(prefix, self, non_negative=())


@struct.dataclass
class GRPOConfig(ReadsHParams):
    """GRPO's or RLOO's section of a trainer config: static settings + traced ``hparams``.

    batch_size: prompts per iteration; the rollout has ``batch_size · group_size`` responses. group_size:
    G (>= 2). max_new_tokens, stop_token_ids, pad_token_id, top_k: as in PPO. epochs: passes over each
    rollout (1 = on-policy: the ratio is exactly 1). minibatches: per epoch over the rollout's rows.
    advantage: "grpo" (group-normalised) or "rloo" (leave-one-out, k1 KL folded into the reward).
    advantage_scale: GRPO's scaling, "group", "batch" or "none" (Dr. GRPO). loss_aggregation:
    "seq-mean-token-mean" (GRPO paper), "token-mean" (DAPO) or "dr-grpo" (sum / (B · max_new_tokens)).
    use_kl_loss: add ``β · k3(π‖π_ref)`` to the loss (GRPO; RLOO puts the KL in the reward instead).
    """
    batch_size: int = struct.field(pytree_node=False, default=8)
    group_size: int = struct.field(pytree_node=False, default=4)
    max_new_tokens: int = struct.field(pytree_node=False, default=16)
    epochs: int = struct.field(pytree_node=False, default=1)
    minibatches: int = struct.field(pytree_node=False, default=1)
    advantage: Literal["grpo", "rloo"] = struct.field(pytree_node=False, default="grpo")
    advantage_scale: Literal["group", "batch", "none"] = struct.field(pytree_node=False, default="group")
    loss_aggregation: Literal["seq-mean-token-mean", "token-mean", "dr-grpo"] = struct.field(
        pytree_node=False, default="seq-mean-token-mean")
    use_kl_loss: bool = struct.field(pytree_node=False, default=True)
    stop_token_ids: tuple[int, ...] = struct.field(pytree_node=False, default=())
    pad_token_id: int = struct.field(pytree_node=False, default=0)
    top_k: int = struct.field(pytree_node=False, default=0)
    hparams: GRPOHParams = GRPOHParams()

    kl_estimator = "k1"
    value_mode = None

    @property
    def name(self) -> str:
        return self.advantage

    @property
    def uses_ref(self) -> bool:
        return self.use_kl_loss or self.advantage == "rloo"

    @property
    def rollout_size(self) -> int:
        return self.batch_size * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.rollout_size // self.minibatches

    def validate(self, prefix: str = "grpo.") -> "GRPOConfig":
        check_positive_int(prefix, "batch_size", self.batch_size)
        check_positive_int(prefix, "group_size", self.group_size, 2)
        for name in ("max_new_tokens", "epochs", "minibatches"):
            check_positive_int(prefix, name, getattr(self, name))
        check_positive_int(prefix, "top_k", self.top_k, minimum=0)
        if self.rollout_size % self.minibatches:
            fail(prefix, "minibatches", self.minibatches,
                 f"a divisor of batch_size·group_size = {self.rollout_size}")
        check_choice(prefix, "advantage", self.advantage, ("grpo", "rloo"))
        check_choice(prefix, "advantage_scale", self.advantage_scale, ("group", "batch", "none"))
        check_choice(prefix, "loss_aggregation", self.loss_aggregation,
                     ("seq-mean-token-mean", "token-mean", "dr-grpo"))
        if not isinstance(self.stop_token_ids, tuple):
            fail(prefix, "stop_token_ids", self.stop_token_ids, "a tuple of token ids")
        if self.advantage == "rloo" and self.use_kl_loss:
            fail(prefix, "use_kl_loss", self.use_kl_loss,
                 "false with advantage='rloo' (RLOO folds the k1 KL into the reward)")
        self.hparams.validate(prefix)
        return self

    # ---- the pieces the RL core calls ----

    def init_algo_state(self):
        return None

    def next_algo_state(self, algo_state, metrics):
        return None

    def advantages(self, algo_state, rollout, scores, kl_tok):
        kl_coef = jnp.asarray(self.hparams.kl_coef, jnp.float32)
        advantages, rewards = group_advantages(scores, kl_tok, cfg=self, kl_coef=kl_coef)
        group_std = jnp.std(scores.reshape(self.batch_size, self.group_size), axis=1, ddof=1)
        metrics = {
            "reward": jnp.mean(rewards),
            "kl_coef": kl_coef,
            "group_score_std": jnp.mean(group_std),
            "frac_zero_std_groups": jnp.mean((group_std < 1e-6).astype(jnp.float32)),
            "advantage_abs_mean": jnp.mean(jnp.abs(advantages)),
        }
        return {"advantages": advantages}, metrics

    def minibatch_loss(self, out, values, batch):
        hp = self.hparams
        mask = batch["response_mask"]
        loss, m = losses.grpo_policy_loss(
            out["logp"], batch["old_logp"], batch["advantages"], mask, clip_eps=hp.clip_eps,
            clip_eps_high=hp.clip_eps_high, ref_logp=batch["ref_logp"] if self.use_kl_loss else None,
            kl_coef=hp.kl_coef, aggregation=self.loss_aggregation, max_len=self.max_new_tokens)
        metrics = {k: m[k] for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max")}
        metrics["policy_loss"] = loss
        metrics["entropy_update"] = losses.masked_mean(out["entropy"], mask)
        if self.use_kl_loss:
            metrics["kl_loss"] = m["kl"]
        return loss, metrics


def group_advantages(scores, kl_tok, *, cfg: GRPOConfig, kl_coef) -> tuple:
    """``(advantages [B·G], rewards [B·G])`` of a grouped rollout: GRPO's normalised group baseline on the
    scores, or RLOO's leave-one-out baseline on ``score − β Σ_t k1_t`` (``kl_tok`` = per-token k1)."""
    if cfg.advantage == "rloo":
        rewards = scores - kl_coef * jnp.sum(kl_tok, axis=1)
        return losses.rloo_advantages(rewards, cfg.group_size), rewards
    return losses.grpo_advantages(scores, cfg.group_size, scale=cfg.advantage_scale), scores
