"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback"): the algorithm's
pieces for the RL core.

Per iteration, all in the core's one compiled program: each of B prompts is sampled twice from the current
policy (a group of G = 2, contiguous), both responses are scored by the run's judge (reward model, gold
reward or JAX function; after the missing-EOS penalty and clipping), the higher-scored one is ``chosen``
(:func:`preference_labels`; a tie teaches nothing and leaves the loss), and the pairs are trained with the
offline DPO loss (``losses.dpo_loss``: sigmoid, hinge or IPO) against the frozen reference, whose
log-probs the core computed once in the rollout. The epochs × minibatches scan keeps each pair in one
minibatch (``minibatch_group = 2``).

The loss equals TRL 1.12's ``OnlineDPOTrainer`` on the same log-probs and judge scores
(tests/test_losses_family_trl.py) with one deliberate difference: a tie is dropped, where TRL labels the
first sample chosen (``first_half >= second_half``) and trains on it. The log-probs are temperature-scaled
(TRL's are not; equal at τ = 1); score clipping is the RL core's.
"""
from __future__ import annotations

import math
from typing import Literal

import jax.numpy as jnp
from flax import struct

from rlhf_jax import losses
from rlhf_jax.rl.core import ReadsHParams, Stateless, traced_hparams
from rlhf_jax.rl.validation import check_choice, check_positive, check_positive_int, concrete, fail

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@struct.dataclass
class OnlineDPOHParams:
    """Online DPO's traced hyper-parameters: beta (DPO's β; TRL's default 0.1), lr, label_smoothing
    (cDPO's ε, sigmoid only), temperature and top_p of sampling (the log-probs are taken at the same
    temperature), missing_eos_penalty (subtracted from the judge's score of a response without EOS),
    score_clip (None = none)."""
    beta: float = 0.1
    lr: float = 1e-5
    label_smoothing: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float = 0.0
    score_clip: float | None = None

    def traced(self) -> "OnlineDPOHParams":
        return traced_hparams(self, score_clip=math.inf)

    def validate(self, prefix: str) -> None:
        check_positive(prefix, "beta", self.beta)
        check_positive(prefix, "temperature", self.temperature)
        for name in ("lr", "missing_eos_penalty"):
            check_positive(prefix, name, getattr(self, name), strict=False)
        if concrete(self.top_p) and not 0.0 < self.top_p <= 1.0:
            fail(prefix, "top_p", self.top_p, "a number in (0, 1]")
        if concrete(self.label_smoothing) and not 0.0 <= self.label_smoothing < 0.5:
            fail(prefix, "label_smoothing", self.label_smoothing, "a number in [0, 0.5)")
        if concrete(self.score_clip):
            check_positive(prefix, "score_clip", self.score_clip)


@struct.dataclass
class OnlineDPOConfig(Stateless, ReadsHParams):
    """Online DPO's section of a trainer config: static settings + traced ``hparams``.

    batch_size: prompts (= pairs) per iteration; the rollout has ``2 · batch_size`` responses.
    max_new_tokens, stop_token_ids, pad_token_id, top_k: sampling, as in PPO/GRPO. epochs: passes over
    each iteration's pairs (1 = on-policy, TRL's setting). minibatches: per epoch (each holds whole pairs).
    loss_type: "sigmoid" (DPO; cDPO with label_smoothing > 0), "hinge" (SLiC) or "ipo" (on the summed
    log-ratios, as TRL's OnlineDPOTrainer).
    """
    batch_size: int = struct.field(pytree_node=False, default=8)
    max_new_tokens: int = struct.field(pytree_node=False, default=16)
    epochs: int = struct.field(pytree_node=False, default=1)
    minibatches: int = struct.field(pytree_node=False, default=1)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = struct.field(pytree_node=False, default="sigmoid")
    stop_token_ids: tuple[int, ...] = struct.field(pytree_node=False, default=())
    pad_token_id: int = struct.field(pytree_node=False, default=0)
    top_k: int = struct.field(pytree_node=False, default=0)
    hparams: OnlineDPOHParams = OnlineDPOHParams()

    name = "online_dpo"
    group_size = 2
    minibatch_group = 2
    kl_estimator = "k1"
    value_mode = None
    uses_ref = True

    @property
    def rollout_size(self) -> int:
        return 2 * self.batch_size

    @property
    def minibatch_size(self) -> int:
        return self.rollout_size // self.minibatches

    def validate(self, prefix: str = "online_dpo.") -> "OnlineDPOConfig":
        check_positive_int(prefix, "batch_size", self.batch_size)
        for name in ("max_new_tokens", "epochs", "minibatches"):
            check_positive_int(prefix, name, getattr(self, name))
        check_positive_int(prefix, "top_k", self.top_k, minimum=0)
        if self.batch_size % self.minibatches:
            fail(prefix, "minibatches", self.minibatches, f"a divisor of batch_size = {self.batch_size} (whole pairs)")
        check_choice(prefix, "loss_type", self.loss_type, LOSS_TYPES)
        if not isinstance(self.stop_token_ids, tuple):
            fail(prefix, "stop_token_ids", self.stop_token_ids, "a tuple of token ids")
        self.hparams.validate(prefix)
        return self

    # ---- the pieces the RL core calls ----

    def advantages(self, algo_state, rollout, scores, kl_tok):
        sign = preference_labels(scores)
        pair = scores.reshape(-1, 2)
        tie = sign[0::2] == 0
        metrics = {"judge_gap": jnp.mean(jnp.abs(pair[:, 0] - pair[:, 1])),
                   "tie_fraction": jnp.mean(tie.astype(jnp.float32))}
        return {"pref_sign": sign}, metrics

    def minibatch_loss(self, out, values, batch):
        hp = self.hparams
        mask = batch["response_mask"].astype(jnp.float32)
        logp = jnp.sum(out["logp"] * mask, axis=1).reshape(-1, 2)
        ref = jnp.sum(batch["ref_logp"] * mask, axis=1).reshape(-1, 2)
        first = batch["pref_sign"].reshape(-1, 2)[:, 0]  # +1: row 0 chosen, -1: row 1 chosen, 0: tie

        def pick(x, chosen: bool):
            want_first = (first > 0) if chosen else (first < 0)
            return jnp.where(want_first, x[:, 0], x[:, 1])

        loss, m = losses.dpo_loss(pick(logp, True), pick(logp, False), pick(ref, True), pick(ref, False),
                                  beta=hp.beta, loss_type=self.loss_type, label_smoothing=hp.label_smoothing,
                                  mask=(first != 0).astype(jnp.float32))
        log_ratio = (out["logp"] - batch["old_logp"]) * mask
        metrics = {"policy_loss": loss, "reward_margin": m["reward_margin"],
                   "reward_accuracy": m["reward_accuracy"], "chosen_reward": m["chosen_reward"],
                   "rejected_reward": m["rejected_reward"],
                   "ratio_mean": losses.masked_mean(jnp.exp(log_ratio), mask),
                   "approx_kl": losses.masked_mean(-log_ratio, mask),
                   "entropy_update": losses.masked_mean(out["entropy"], mask)}
        return loss, metrics


def preference_labels(scores):
    """``[2B]`` signs of a pair-grouped score vector (rows ``2i, 2i+1`` are prompt i's two responses):
    ``+1`` on the chosen (higher-scored) row, ``−1`` on the rejected one, ``0`` on both rows of a tie
    (``|s_0 − s_1| ≤ 1e-6``)."""
    pair = jnp.asarray(scores, jnp.float32).reshape(-1, 2)
    d = pair[:, 0] - pair[:, 1]
    s = jnp.where(jnp.abs(d) > 1e-6, jnp.sign(d), 0.0)
    return jnp.stack([s, -s], axis=1).reshape(-1)
