"""Parity of rlhf_jax.losses with TRL 1.12.0 (PyTorch, CPU) on the same random inputs.

Where TRL exposes the loss as a method (RewardTrainer.compute_loss, DPOTrainer._compute_loss) we call the
real method on a minimal stand-in `self` (no model download, no Trainer set-up). Where the math is
inline in a long training loop (GRPO/RLOO advantages, GRPO loss aggregation, the PPO rollout-to-loss
math of `trl.experimental.ppo.PPOTrainer.train`), the formulas are transcribed line by line from
TRL's source, using TRL's own helper functions (`nanstd`, `masked_mean`, `masked_whiten`,
`first_true_indices`, `truncate_response`, `selective_log_softmax`, `entropy_from_logits`); the file and
function are cited above each transcription.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

import rlhf_jax.losses as L  # noqa: E402
from trl import DPOTrainer, RewardTrainer  # noqa: E402
from trl.experimental.ppo.ppo_trainer import INVALID_LOGPROB, masked_mean, masked_whiten  # noqa: E402
from trl.experimental.utils import first_true_indices  # noqa: E402
from trl.experimental.ppo.ppo_trainer import truncate_response  # noqa: E402
from trl.trainer.utils import entropy_from_logits as trl_entropy  # noqa: E402
from trl.trainer.utils import nanstd, selective_log_softmax  # noqa: E402

from tests.trl_utils import close, t  # noqa: E402
from tests.trl_utils import stub_trainer as _stub_trainer  # noqa: E402


def test_trl_version():
  assert trl.__version__ == "1.12.0"


# ------------------------------------------------------------------------------------- reward model


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, 0.01)])
def test_bradley_terry_matches_reward_trainer_compute_loss(with_margin, center):
  rng = np.random.default_rng(0)
  rc = rng.normal(size=6).astype(np.float32)
  rr = rng.normal(size=6).astype(np.float32)
  margin = rng.uniform(0, 1, size=6).astype(np.float32)
  stub = _stub_trainer(args=SimpleNamespace(center_rewards_coefficient=center))
  model = lambda **kw: SimpleNamespace(logits=t(np.concatenate([rc, rr]))[:, None])
  inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long), "attention_mask": torch.ones(12, 3)}
  if with_margin:
    inputs["margin"] = t(margin)
  trl_loss = RewardTrainer.compute_loss(stub, model, inputs)
  loss, met = L.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), margin=margin if with_margin else None,
                                   center_coef=0.0 if center is None else center)
  close(loss, trl_loss)
  close(met["accuracy"], stub._metrics["train"]["accuracy"][0])
  close(met["margin"], stub._metrics["train"]["margin"][0])


# -------------------------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                                       ("robust", 0.0), ("robust", 0.2)])
def test_dpo_matches_dpo_trainer_compute_loss(loss_type, label_smoothing):
  """DPOTrainer._compute_loss on logits we supply; our sequence_logprobs + dpo_loss on the same logits."""
  rng = np.random.default_rng(1)
  B, T, V, beta = 3, 7, 11, 0.3
  input_ids = rng.integers(0, V, size=(2 * B, T))
  prompt_len = np.array([2, 3, 1, 2, 3, 1])
  comp_len = np.array([4, 2, 5, 3, 4, 6])
  pos = np.arange(T)[None]
  completion_mask = ((pos >= prompt_len[:, None]) & (pos < (prompt_len + comp_len)[:, None])).astype(np.int64)
  attention_mask = (pos < (prompt_len + comp_len)[:, None]).astype(np.int64)
  logits = rng.normal(size=(2 * B, T, V)).astype(np.float32)
  ref_logps = rng.normal(size=2 * B).astype(np.float32) - 8.0
  stub = _stub_trainer(aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
                       f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                       label_smoothing=label_smoothing, use_weighting=False)
  model = lambda **kw: SimpleNamespace(logits=t(logits))
  inputs = {"input_ids": t(input_ids), "attention_mask": t(attention_mask), "completion_mask": t(completion_mask),
            "ref_chosen_logps": t(ref_logps[:B]), "ref_rejected_logps": t(ref_logps[B:])}
  trl_loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)

  per_tok = L.sequence_logprobs(jnp.asarray(logits[:, :-1]), jnp.asarray(input_ids[:, 1:]),
                                jnp.asarray(completion_mask[:, 1:]))
  logps = per_tok.sum(-1)
  lens = completion_mask[:, 1:].sum(-1)
  # TRL's "robust" is Chowdhury et al.'s rDPO, which is our "rdpo" (our "robust" is the spec's cDPO form).
  ours_type = "rdpo" if loss_type == "robust" else loss_type
  loss, met = L.dpo_loss(logps[:B], logps[B:], jnp.asarray(ref_logps[:B]), jnp.asarray(ref_logps[B:]), beta=beta,
                         loss_type=ours_type, label_smoothing=label_smoothing, chosen_len=lens[:B],
                         rejected_len=lens[B:])
  close(loss, trl_loss)
  m = stub._metrics["train"]
  close(met["chosen_reward"], m["rewards/chosen"][0])
  close(met["rejected_reward"], m["rewards/rejected"][0])
  close(met["reward_margin"], m["rewards/margins"][0])
  close(met["reward_accuracy"], m["rewards/accuracies"][0])
  close(logps[:B].mean(), m["logps/chosen"][0])


# ------------------------------------------------------------------------------------ GRPO / RLOO


def trl_grpo_advantages(rewards, num_generations, scale_rewards):
  """Transcribed from trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions
  (multi_objective_aggregation == "sum_then_normalize", one reward function)."""
  mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
  mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
  if scale_rewards in ["group", "none"]:
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
  elif scale_rewards == "batch":
    std_rewards = nanstd(rewards).expand_as(rewards)
  advantages = rewards - mean_grouped_rewards
  if scale_rewards != "none":
    advantages = advantages / (std_rewards + 1e-4)
  return torch.nan_to_num(advantages, nan=0.0)


def trl_rloo_advantages(rewards, num_generations):
  """Transcribed from trl/trainer/rloo_trainer.py, RLOOTrainer._generate_and_score_completions
  (normalize_advantages=False)."""
  grouped_rewards = rewards.view(-1, num_generations)
  scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
  grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
  baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
  advantages = rewards - baselines.view(-1)
  return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [2, 4])
def test_grpo_advantages_match_trl(scale, group_size):
  rewards = np.random.default_rng(2).normal(size=8).astype(np.float32)
  rewards[:group_size] = 0.5  # a group with zero std
  close(L.grpo_advantages(jnp.asarray(rewards), group_size, scale=scale),
        trl_grpo_advantages(t(rewards), group_size, scale))


@pytest.mark.parametrize("group_size", [2, 4])
def test_rloo_advantages_match_trl(group_size):
  rewards = np.random.default_rng(3).normal(size=8).astype(np.float32)
  close(L.rloo_advantages(jnp.asarray(rewards), group_size), trl_rloo_advantages(t(rewards), group_size))


def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, *, loss_type,
                  beta, epsilon_low, epsilon_high, max_completion_length):
  """Transcribed from trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss (token-level importance
  sampling, no vLLM, no entropy mask, one accumulation step)."""
  advantages = advantages.unsqueeze(1)
  log_ratio = per_token_logps - old_per_token_logps
  coef_1 = torch.exp(log_ratio)
  per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
  coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
  per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
  if beta != 0.0:
    per_token_loss = per_token_loss + beta * per_token_kl
  if loss_type == "grpo":
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
  if loss_type == "bnpo":
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
  if loss_type == "dr_grpo":
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
  raise ValueError(loss_type)


@pytest.mark.parametrize("trl_type,ours", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                           ("dr_grpo", "dr-grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_policy_loss_matches_trl(trl_type, ours, beta):
  rng = np.random.default_rng(4)
  B, T = 4, 6
  old = -np.abs(rng.normal(size=(B, T))).astype(np.float32)
  logp = (old + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
  ref = -np.abs(rng.normal(size=(B, T))).astype(np.float32)
  adv = rng.normal(size=B).astype(np.float32)
  mask = (np.arange(T)[None] < np.array([[6], [3], [1], [5]])).astype(np.float32)
  expected = trl_grpo_loss(t(logp), t(old), t(ref), t(adv), t(mask), loss_type=trl_type, beta=beta,
                           epsilon_low=0.2, epsilon_high=0.28, max_completion_length=8)
  loss, _ = L.grpo_policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                               clip_eps=0.2, clip_eps_high=0.28, ref_logp=jnp.asarray(ref), kl_coef=beta,
                               aggregation=ours, max_len=8)
  close(loss, expected)


# ------------------------------------------------------------------------------- PPO (experimental)


def trl_ppo_rollout_math(responses, logprobs, ref_logprobs, values, scores, *, stop_token_id, pad_token_id,
                         eos_token_id, kl_coef, kl_estimator, gamma, lam, whiten_rewards, missing_eos_penalty):
  """Transcribed from trl/experimental/ppo/ppo_trainer.py, PPOTrainer.train, "Response Processing" 1–3
  and steps 4–6 (rewards, whitening, GAE), with TRL's own helpers."""
  postprocessed_responses = truncate_response(stop_token_id, pad_token_id, responses)
  sequence_lengths = first_true_indices(postprocessed_responses == pad_token_id) - 1
  contain_eos_token = torch.any(postprocessed_responses == eos_token_id, dim=-1)
  scores = scores.clone()
  if missing_eos_penalty is not None:
    scores[~contain_eos_token] -= missing_eos_penalty
  response_idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)
  padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
  logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
  ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
  sequence_lengths_p1 = sequence_lengths + 1
  padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
  values = torch.masked_fill(values, padding_mask_p1, 0)
  logr = ref_logprobs - logprobs
  kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
  non_score_reward = -kl_coef * kl
  rewards = non_score_reward.clone()
  actual_start = torch.arange(rewards.size(0))
  actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
  rewards[actual_start, actual_end] += scores
  if whiten_rewards:
    rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
    rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
  advantages, returns = trl_gae(rewards, values, gamma, lam)
  advantages = masked_whiten(advantages, ~padding_mask)
  advantages = torch.masked_fill(advantages, padding_mask, 0)
  return SimpleNamespace(rewards=rewards, advantages=advantages, returns=returns, values=values,
                         padding_mask=padding_mask, padding_mask_p1=padding_mask_p1, scores=scores,
                         sequence_lengths=sequence_lengths, contain_eos_token=contain_eos_token)


def trl_gae(rewards, values, gamma, lam):
  """Transcribed from PPOTrainer.train step 6 (the reverse Python loop)."""
  lastgaelam = 0
  advantages_reversed = []
  gen_length = rewards.shape[1]
  for t_ in reversed(range(gen_length)):
    nextvalues = values[:, t_ + 1] if t_ < gen_length - 1 else 0.0
    delta = rewards[:, t_] + gamma * nextvalues - values[:, t_]
    lastgaelam = delta + gamma * lam * lastgaelam
    advantages_reversed.append(lastgaelam)
  advantages = torch.stack(advantages_reversed[::-1], axis=1)
  return advantages, advantages + values


def trl_ppo_losses(new_logprobs, mb_logprobs, mb_advantage, vpred, mb_values, mb_return, padding_mask,
                   padding_mask_p1, cliprange, cliprange_value):
  """Transcribed from PPOTrainer.train, the minibatch loss block."""
  new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
  vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
  vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
  vf_losses1 = torch.square(vpred - mb_return)
  vf_losses2 = torch.square(vpredclipped - mb_return)
  vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
  vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
  logprobs_diff = new_logprobs - mb_logprobs
  ratio = torch.exp(logprobs_diff)
  pg_losses = -mb_advantage * ratio
  pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
  pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
  pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
  approxkl = 0.5 * (logprobs_diff ** 2).mean()
  return SimpleNamespace(pg_loss=pg_loss, vf_loss=vf_loss, pg_clipfrac=pg_clipfrac, vf_clipfrac=vf_clipfrac,
                         approxkl=approxkl, ratio_mean=ratio.mean())


def _ppo_inputs(seed, responses):
  rng = np.random.default_rng(seed)
  B, T = responses.shape
  logprobs = -np.abs(rng.normal(size=(B, T))).astype(np.float32)
  ref = (logprobs + 0.2 * rng.normal(size=(B, T))).astype(np.float32)
  values = rng.normal(size=(B, T)).astype(np.float32)
  scores = rng.normal(size=B).astype(np.float32) * 2
  return logprobs, ref, values, scores


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_ppo_math_matches_trl_when_no_response_stops(kl_estimator, whiten_rewards):
  """No stop token anywhere: every response is full length, TRL's bookkeeping and ours coincide."""
  PAD, EOS = 0, 1
  rng = np.random.default_rng(5)
  B, T = 4, 6
  responses = rng.integers(2, 20, size=(B, T))
  logprobs, ref, values, scores = _ppo_inputs(6, responses)
  kw = dict(kl_coef=0.05, gamma=0.97, lam=0.9)
  trl_out = trl_ppo_rollout_math(t(responses), t(logprobs), t(ref), t(values), t(scores), stop_token_id=EOS,
                                 pad_token_id=PAD, eos_token_id=EOS, kl_estimator=kl_estimator,
                                 whiten_rewards=whiten_rewards, missing_eos_penalty=1.5, **kw)
  mask = jnp.ones((B, T))
  has_eos = jnp.any(jnp.asarray(responses) == EOS, axis=-1)
  our_scores = L.apply_missing_eos_penalty(jnp.asarray(scores), has_eos, 1.5)
  close(our_scores, trl_out.scores)
  rewards = L.kl_penalized_rewards(our_scores, jnp.asarray(logprobs), jnp.asarray(ref), mask, kl_coef=kw["kl_coef"],
                                   estimator=kl_estimator)
  if whiten_rewards:
    rewards = L.masked_whiten(rewards, mask, shift_mean=False)
  close(rewards, trl_out.rewards)
  adv, ret = L.gae_advantages(rewards, jnp.asarray(values), mask, gamma=kw["gamma"], lam=kw["lam"])
  close(ret, trl_out.returns)
  adv = L.masked_whiten(adv, mask)
  close(adv, trl_out.advantages, 1e-4)

  new_logprobs = (logprobs + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
  vpred = (values + 0.5 * rng.normal(size=(B, T))).astype(np.float32)
  trl_l = trl_ppo_losses(t(new_logprobs), t(logprobs), trl_out.advantages, t(vpred), t(values), trl_out.returns,
                         trl_out.padding_mask, trl_out.padding_mask_p1, 0.2, 0.2)
  pl, pm = L.ppo_policy_loss(jnp.asarray(new_logprobs), jnp.asarray(logprobs), adv, mask, clip_eps=0.2)
  vl, vm = L.ppo_value_loss(jnp.asarray(vpred), jnp.asarray(values), ret, mask, clip_eps=0.2)
  close(pl, trl_l.pg_loss, 1e-4)
  close(vl, trl_l.vf_loss, 1e-4)
  close(pm["clipfrac"], trl_l.pg_clipfrac)
  close(vm["vf_clipfrac"], trl_l.vf_clipfrac)
  close(pm["approx_kl"], trl_l.approxkl)
  close(pm["ratio_mean"], trl_l.ratio_mean)


def test_ppo_score_placement_differs_from_trl_by_one_token_when_pad_is_not_eos():
  """TRL places the score at `sequence_lengths + 1` (one token AFTER the stop token) when pad ≠ eos —
  the open bug the spec names. We place it on the last real token. Everything else agrees: the
  per-token KL part is identical, and once TRL's score is moved back onto the stop token (and the
  value after it zeroed, V_T = 0), TRL's GAE loop equals our masked reverse scan for any γ, λ."""
  PAD, EOS = 0, 1
  rng = np.random.default_rng(7)
  B, T = 4, 6
  responses = rng.integers(2, 20, size=(B, T))
  responses[0, 2] = EOS                # stops mid-way
  responses[1, 0] = EOS                # the response is only the stop token
  responses[2, 5] = EOS                # stops at the last position
  responses[3, 3] = EOS                # stops mid-way (row 3)
  responses[3, 4] = EOS                # a second stop token after the first: truncated away
  logprobs, ref, values, scores = _ppo_inputs(8, responses)
  gamma, lam = 0.95, 0.9
  trl_out = trl_ppo_rollout_math(t(responses), t(logprobs), t(ref), t(values), t(scores), stop_token_id=EOS,
                                 pad_token_id=PAD, eos_token_id=EOS, kl_coef=0.1, kl_estimator="k1", gamma=gamma,
                                 lam=lam, whiten_rewards=False, missing_eos_penalty=None)
  last = np.array([2, 0, 5, 3])
  mask = (np.arange(T)[None] <= last[:, None]).astype(np.float32)
  np.testing.assert_array_equal(~trl_out.padding_mask.numpy(), mask > 0)  # same response mask
  rewards = L.kl_penalized_rewards(jnp.asarray(scores), jnp.asarray(logprobs), jnp.asarray(ref), jnp.asarray(mask),
                                   kl_coef=0.1)
  ours = np.asarray(rewards)
  theirs = trl_out.rewards.numpy().copy()
  kl_part = -0.1 * (logprobs - ref) * mask
  for b in range(B):
    np.testing.assert_allclose(ours[b, last[b]] - kl_part[b, last[b]], scores[b], rtol=1e-5, atol=1e-5)
    trl_pos = last[b] + 1 if last[b] + 1 < T else last[b]
    np.testing.assert_allclose(theirs[b, trl_pos] - kl_part[b, trl_pos], scores[b], rtol=1e-5, atol=1e-5)
  assert [int(np.argmax(np.abs(ours[b] - kl_part[b]))) for b in range(B)] == [2, 0, 5, 3]
  # TRL: one token late for every row that stopped before the end.
  assert [last[b] + 1 if last[b] + 1 < T else last[b] for b in range(B)] == [3, 1, 5, 4]
  # Fix TRL's placement, zero the value after the last real token, and its GAE loop equals ours.
  fixed = theirs.copy()
  for b in range(B):
    trl_pos = last[b] + 1 if last[b] + 1 < T else last[b]
    fixed[b, trl_pos] -= scores[b]
    fixed[b, last[b]] += scores[b]
  np.testing.assert_allclose(fixed * mask, ours, rtol=1e-5, atol=1e-5)
  trl_adv, trl_ret = trl_gae(t(fixed * mask), t(values * mask), gamma, lam)
  adv, ret = L.gae_advantages(rewards, jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
  close(adv, trl_adv.numpy() * mask)
  close(ret, trl_ret.numpy() * mask)
  # Whitening over the response mask and the clipped policy loss agree with TRL's helpers.
  close(L.masked_whiten(adv, jnp.asarray(mask)), masked_whiten(trl_adv, t(mask > 0)) * t(mask), 1e-4)
  new_logprobs = (logprobs + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
  trl_l = trl_ppo_losses(t(new_logprobs), t(logprobs), trl_adv * t(mask), t(values), t(values), trl_ret,
                         trl_out.padding_mask, trl_out.padding_mask_p1, 0.2, 0.2)
  pl, pm = L.ppo_policy_loss(jnp.asarray(new_logprobs), jnp.asarray(logprobs), adv, jnp.asarray(mask))
  close(pl, trl_l.pg_loss, 1e-4)
  close(pm["clipfrac"], trl_l.pg_clipfrac)


def test_sequence_logprobs_and_entropy_match_trl_helpers():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(2, 5, 13)).astype(np.float32) * 3
  tokens = rng.integers(0, 13, size=(2, 5))
  tau = 0.7
  # PPOTrainer divides by (temperature + 1e-7) before selective_log_softmax.
  expected = selective_log_softmax(t(logits) / (tau + 1e-7), t(tokens))
  close(L.sequence_logprobs(jnp.asarray(logits), jnp.asarray(tokens), jnp.ones((2, 5)), temperature=tau), expected,
        1e-4)
  close(L.entropy_from_logits(jnp.asarray(logits), jnp.ones((2, 5)), reduction="none"), trl_entropy(t(logits)), 1e-5)
  close(L.entropy_from_logits(jnp.asarray(logits), jnp.ones((2, 5))), trl_entropy(t(logits)).mean(), 1e-5)
