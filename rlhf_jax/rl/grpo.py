"""GRPO and RLOO (docs/MATH.md, critic-free methods): the algorithms' pieces for the RL core.

B prompts, each sampled G times (a prompt's samples contiguous), no value model::

    GRPO:  A_i = (r_i − mean_g) / (std_g + 1e-4)                           losses.grpo_advantages
    RLOO:  r_i = score_i − β Σ_t k1_t;  A_i = r_i − mean_{j≠i} r_j         losses.rloo_advantages
    REINFORCE++:  r_t = −β k1_t + 1[t = last]·score (score − group mean for the baseline variant),
                  A_t = whiten(Σ_{t'≥t} r_t') over the rollout's tokens  losses.reinforce_pp_advantages
    minibatch loss (policy_loss): "clip" losses.grpo_policy_loss (clipped token loss), "gspo"
    losses.gspo_policy_loss (sequence-level ratio), "cispo" losses.cispo_policy_loss (clipped IS
    weights); + β·k3 to the reference when use_kl_loss; aggregation seq-mean-token-mean | token-mean |
    dr-grpo.

Dr. GRPO is ``advantage_scale="none", loss_aggregation="dr-grpo"``; DAPO's token-level loss is
``loss_aggregation="token-mean"`` with ``clip_eps_high`` > ``clip_eps``, and its soft overlong punishment
is ``overlong_buffer`` + ``overlong_penalty``. DAPO's dynamic sampling (drop the groups whose scores all
agree and sample more prompts until the batch is full) is ``dynamic_sampling_rounds`` > 1: the core
samples up to that many rounds of ``batch_size`` prompts inside the one compiled iteration
(``core.dynamic_rollout``), at a fixed batch shape. ``mask_zero_std_groups`` gives whatever
uninformative groups remain zero weight in the loss.
"""
from __future__ import annotations

import math
from typing import Literal

import jax.numpy as jnp
from flax import struct

from rlhf_jax import losses
from rlhf_jax.rl.core import ReadsHParams, Stateless, traced_hparams
from rlhf_jax.rl.validation import check_choice, check_policy_hparams, check_positive_int, fail


ADVANTAGES = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
KL_IN_REWARD = ("rloo", "reinforce_pp", "reinforce_pp_baseline")
POLICY_LOSSES = ("clip", "gspo", "cispo")


@struct.dataclass
class GRPOHParams:
    """GRPO/RLOO's traced hyper-parameters (defaults here): kl_coef β (in the loss for GRPO, in the
    reward for RLOO), lr, clip_eps, clip_eps_high (None = clip_eps), temperature, top_p,
    missing_eos_penalty, score_clip (None = none), overlong_penalty (DAPO's soft overlong punishment at
    full length, used when the config's overlong_buffer > 0), uwo_lambda (λ of a reward-model ensemble's
    uncertainty-weighted score ``mean − λ·var``, with reward_aggregation="uwo").

    With policy_loss="gspo" clip_eps/clip_eps_high bound the SEQUENCE ratio (the GSPO paper: 3e-4/4e-4);
    with "cispo" clip_eps_high (None = clip_eps) is the upper bound of the IS weight (no lower bound)."""
    kl_coef: float = 0.04
    lr: float = 1e-5
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float = 0.0
    score_clip: float | None = None
    overlong_penalty: float = 1.0
    uwo_lambda: float = 0.5

    def traced(self) -> "GRPOHParams":
        return traced_hparams(self, clip_eps_high="clip_eps", score_clip=math.inf)

    def validate(self, prefix: str) -> None:
        check_policy_hparams(prefix, self, non_negative=("overlong_penalty", "uwo_lambda"))


@struct.dataclass
class GRPOConfig(Stateless, ReadsHParams):
    """GRPO's or RLOO's section of a trainer config: static settings + traced ``hparams``.

    batch_size: prompts per iteration; the rollout has ``batch_size · group_size`` responses. group_size:
    G (>= 2). max_new_tokens, stop_token_ids, pad_token_id, top_k: as in PPO. epochs: passes over each
    rollout (1 = on-policy: the ratio is exactly 1). minibatches: per epoch over the rollout's rows.
    advantage: "grpo" (group-normalised), "rloo" (leave-one-out, k1 KL folded into the reward),
    "reinforce_pp" (REINFORCE++: k1 KL in the per-token reward, returns whitened over the rollout's
    tokens; per-token advantages) or "reinforce_pp_baseline" (the same on score − group mean).
    advantage_scale: GRPO's scaling, "group", "batch" or "none" (Dr. GRPO). loss_aggregation:
    "seq-mean-token-mean" (GRPO paper), "token-mean" (DAPO) or "dr-grpo" (sum / (B · max_new_tokens)).
    use_kl_loss: add ``β · k3(π‖π_ref)`` to the loss (GRPO; RLOO and REINFORCE++ put the KL in the
    reward instead). policy_loss: "clip" (GRPO's clipped token ratio), "gspo" (clipped sequence ratio;
    needs per-sequence advantages, so not with REINFORCE++) or "cispo" (REINFORCE with clipped,
    stop-gradient IS weights). overlong_buffer: DAPO's soft overlong punishment, 0 = off: a response of
    length L > max_new_tokens − buffer gets ``− overlong_penalty · (L − (max_new_tokens − buffer)) /
    buffer`` added to its score. mask_zero_std_groups: groups whose scores all agree get zero weight in
    the loss (``frac_zero_std_groups`` reports them). dynamic_sampling_rounds: DAPO's dynamic sampling,
    1 = off; R > 1 draws ``R · batch_size`` prompts per iteration and samples them ``batch_size`` at a
    time, keeping only the groups whose scores are not all equal, until ``batch_size`` such groups are
    found or R rounds are spent (the remaining slots keep uninformative groups; combine with
    mask_zero_std_groups to drop them from the loss). Needs a reward the program can compute (gold,
    model or jax; not python). reward_aggregation: how a reward-model ENSEMBLE's member scores become one
    (mean | wco = min over members | uwo = mean − uwo_lambda·var); unused with one reward model.
    """
    batch_size: int = struct.field(pytree_node=False, default=8)
    group_size: int = struct.field(pytree_node=False, default=4)
    max_new_tokens: int = struct.field(pytree_node=False, default=16)
    epochs: int = struct.field(pytree_node=False, default=1)
    minibatches: int = struct.field(pytree_node=False, default=1)
    advantage: Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = struct.field(
        pytree_node=False, default="grpo")
    advantage_scale: Literal["group", "batch", "none"] = struct.field(pytree_node=False, default="group")
    loss_aggregation: Literal["seq-mean-token-mean", "token-mean", "dr-grpo"] = struct.field(
        pytree_node=False, default="seq-mean-token-mean")
    use_kl_loss: bool = struct.field(pytree_node=False, default=True)
    policy_loss: Literal["clip", "gspo", "cispo"] = struct.field(pytree_node=False, default="clip")
    overlong_buffer: int = struct.field(pytree_node=False, default=0)
    mask_zero_std_groups: bool = struct.field(pytree_node=False, default=False)
    dynamic_sampling_rounds: int = struct.field(pytree_node=False, default=1)
    stop_token_ids: tuple[int, ...] = struct.field(pytree_node=False, default=())
    pad_token_id: int = struct.field(pytree_node=False, default=0)
    top_k: int = struct.field(pytree_node=False, default=0)
    reward_aggregation: Literal["mean", "wco", "uwo"] = struct.field(pytree_node=False, default="mean")
    hparams: GRPOHParams = GRPOHParams()

    kl_estimator = "k1"
    value_mode = None

    @property
    def name(self) -> str:
        return self.advantage

    @property
    def uses_ref(self) -> bool:
        return self.use_kl_loss or self.kl_in_reward

    @property
    def kl_in_reward(self) -> bool:
        return self.advantage in KL_IN_REWARD

    @property
    def per_token_advantages(self) -> bool:
        return self.advantage.startswith("reinforce_pp")

    @property
    def rollout_size(self) -> int:
        return self.batch_size * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.rollout_size // self.minibatches

    @property
    def prompt_batch_size(self) -> int:
        """Prompts drawn per iteration: ``batch_size`` × ``dynamic_sampling_rounds``."""
        return self.batch_size * self.dynamic_sampling_rounds

    def validate(self, prefix: str = "grpo.") -> "GRPOConfig":
        check_positive_int(prefix, "batch_size", self.batch_size)
        check_positive_int(prefix, "group_size", self.group_size, 2)
        for name in ("max_new_tokens", "epochs", "minibatches"):
            check_positive_int(prefix, name, getattr(self, name))
        check_positive_int(prefix, "top_k", self.top_k, minimum=0)
        if self.rollout_size % self.minibatches:
            fail(prefix, "minibatches", self.minibatches,
                 f"a divisor of batch_size·group_size = {self.rollout_size}")
        check_choice(prefix, "advantage", self.advantage, ADVANTAGES)
        check_choice(prefix, "policy_loss", self.policy_loss, POLICY_LOSSES)
        check_choice(prefix, "reward_aggregation", self.reward_aggregation, ("mean", "wco", "uwo"))
        check_positive_int(prefix, "overlong_buffer", self.overlong_buffer, minimum=0)
        if self.overlong_buffer > self.max_new_tokens:
            fail(prefix, "overlong_buffer", self.overlong_buffer, f"at most max_new_tokens = {self.max_new_tokens}")
        check_positive_int(prefix, "dynamic_sampling_rounds", self.dynamic_sampling_rounds)
        if not isinstance(self.mask_zero_std_groups, bool):
            fail(prefix, "mask_zero_std_groups", self.mask_zero_std_groups, "true|false")
        if self.policy_loss == "gspo" and self.per_token_advantages:
            fail(prefix, "policy_loss", self.policy_loss,
                 f"clip|cispo with advantage={self.advantage!r} (GSPO needs one advantage per sequence; "
                 "REINFORCE++'s are per token)")
        check_choice(prefix, "advantage_scale", self.advantage_scale, ("group", "batch", "none"))
        check_choice(prefix, "loss_aggregation", self.loss_aggregation,
                     ("seq-mean-token-mean", "token-mean", "dr-grpo"))
        if not isinstance(self.stop_token_ids, tuple):
            fail(prefix, "stop_token_ids", self.stop_token_ids, "a tuple of token ids")
        if self.kl_in_reward and self.use_kl_loss:
            fail(prefix, "use_kl_loss", self.use_kl_loss,
                 f"false with advantage={self.advantage!r} (it folds the k1 KL into the reward)")
        self.hparams.validate(prefix)
        return self

    # ---- the pieces the RL core calls ----

    def advantages(self, algo_state, rollout, scores, kl_tok):
        kl_coef = jnp.asarray(self.hparams.kl_coef, jnp.float32)
        mask = rollout.response_mask.astype(jnp.float32)
        metrics = {}
        if self.overlong_buffer:
            penalty = overlong_punishment(jnp.sum(mask, axis=1), max_new_tokens=self.max_new_tokens,
                                          buffer=self.overlong_buffer, penalty=self.hparams.overlong_penalty)
            scores = scores + penalty
            metrics["overlong_penalty_mean"] = -jnp.mean(penalty)
        advantages, rewards = group_advantages(scores, kl_tok, cfg=self, kl_coef=kl_coef, mask=mask)
        group_std = jnp.std(scores.reshape(self.batch_size, self.group_size), axis=1, ddof=1)
        zero_std = group_std < 1e-6
        metrics.update({
            "reward": jnp.mean(rewards),
            "kl_coef": kl_coef,
            "group_score_std": jnp.mean(group_std),
            "frac_zero_std_groups": jnp.mean(zero_std.astype(jnp.float32)),
            "advantage_abs_mean": (losses.masked_mean(jnp.abs(advantages), mask) if self.per_token_advantages
                                   else jnp.mean(jnp.abs(advantages))),
        })
        extra = {"advantages": advantages}
        if self.mask_zero_std_groups:
            extra["row_weight"] = jnp.repeat(1.0 - zero_std.astype(jnp.float32), self.group_size)
        return extra, metrics

    def minibatch_loss(self, out, values, batch):
        hp = self.hparams
        mask = batch["response_mask"].astype(jnp.float32)
        if "row_weight" in batch:  # mask_zero_std_groups: those rows have no token in the loss
            mask = mask * batch["row_weight"][:, None]
        common = dict(ref_logp=batch["ref_logp"] if self.use_kl_loss else None, kl_coef=hp.kl_coef,
                      aggregation=self.loss_aggregation, max_len=self.max_new_tokens)
        if self.policy_loss == "gspo":
            loss, m = losses.gspo_policy_loss(out["logp"], batch["old_logp"], batch["advantages"], mask,
                                              clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high, **common)
            m = {**m, "ratio_mean": m["seq_ratio_mean"], "ratio_max": m["seq_ratio_max"]}
        elif self.policy_loss == "cispo":
            loss, m = losses.cispo_policy_loss(out["logp"], batch["old_logp"], batch["advantages"], mask,
                                               clip_eps_high=hp.clip_eps_high, **common)
        else:
            loss, m = losses.grpo_policy_loss(out["logp"], batch["old_logp"], batch["advantages"], mask,
                                              clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high, **common)
        metrics = {k: m[k] for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max")}
        metrics["policy_loss"] = loss
        metrics["entropy_update"] = losses.masked_mean(out["entropy"], mask)
        if self.use_kl_loss:
            metrics["kl_loss"] = m["kl"]
        return loss, metrics


def overlong_punishment(lengths, *, max_new_tokens: int, buffer: int, penalty):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score: 0 up to
    ``max_new_tokens − buffer`` tokens, then linear down to ``−penalty`` at ``max_new_tokens`` (a response
    cannot be longer). ``lengths [B]`` -> ``[B]`` (≤ 0)."""
    over = (lengths - (max_new_tokens - buffer)) / buffer
    return -jnp.asarray(penalty, jnp.float32) * jnp.clip(over, 0.0, 1.0)


def group_advantages(scores, kl_tok, *, cfg: GRPOConfig, kl_coef, mask=None) -> tuple:
    """``(advantages, rewards [B·G])`` of a grouped rollout: GRPO's normalised group baseline on the
    scores, RLOO's leave-one-out baseline on ``score − β Σ_t k1_t`` (``kl_tok`` = per-token k1), or
    REINFORCE++'s whitened per-token returns ``[B·G, N]`` (``mask`` = the response mask) with the k1 KL the
    core computed as the per-token reward (``rewards`` then is ``score − β Σ_t k1_t``)."""
    if cfg.per_token_advantages:
        m = jnp.ones_like(kl_tok) if mask is None else mask
        # kl_estimate(k1) of (kl_tok, 0) is kl_tok itself: the reward's KL is the core's, not recomputed.
        adv, _ = losses.reinforce_pp_advantages(scores, m, logp=kl_tok, ref_logp=jnp.zeros_like(kl_tok),
                                                kl_coef=kl_coef, estimator="k1",
                                                baseline=cfg.advantage == "reinforce_pp_baseline",
                                                group_size=cfg.group_size)
        return adv, scores - kl_coef * jnp.sum(kl_tok * m, axis=1)
    if cfg.advantage == "rloo":
        rewards = scores - kl_coef * jnp.sum(kl_tok, axis=1)
        return losses.rloo_advantages(rewards, cfg.group_size), rewards
    return losses.grpo_advantages(scores, cfg.group_size, scale=cfg.advantage_scale), scores
