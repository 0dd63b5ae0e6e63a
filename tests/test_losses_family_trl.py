"""Parity of the loss family (KTO, SimPO, ORPO, GSPO, CISPO) with TRL 1.12.0 (PyTorch, CPU), as in
tests/test_losses_trl.py: TRL's own loss methods are called on a minimal stand-in `self` (no model download,
no Trainer set-up):

* KTO: `trl.KTOTrainer._compute_loss` (trl/trainer/kto_trainer.py) on logits we supply, with precomputed
  reference log-probs and the KL (mismatched-completion) batch;
* SimPO: `trl.experimental.cpo.CPOTrainer.cpo_loss` with `loss_type="simpo"` (and `get_batch_logps` with
  `average_log_prob=True` for the length-normalised log-probs);
* ORPO: `trl.experimental.orpo.ORPOTrainer.odds_ratio_loss`, combined as `get_batch_loss_metrics` does
  (`loss = nll - losses.mean()`);
* GSPO: `trl.GRPOTrainer._compute_loss` with `importance_sampling_level="sequence"`, and
  `trl.experimental.gspo_token.GRPOTrainer._compute_loss` with `"sequence_token"`;
* CISPO: `trl.GRPOTrainer._compute_loss` with `loss_type="cispo"`;
* online DPO: the loss block of `trl.experimental.online_dpo.OnlineDPOTrainer.training_step`, transcribed
  line by line (it is not a separate method), against `rl.online_dpo.OnlineDPOConfig.minibatch_loss`.

For the policy losses the stand-in's `_get_per_token_logps_and_entropies` returns a leaf tensor of
log-probabilities, so TRL's loss VALUE and its GRADIENT with respect to the per-token log-probabilities are
compared with ours (`jax.grad`). REINFORCE++ has no TRL implementation (see tests/test_losses_family.py).
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

import rlhf_jax.losses as L  # noqa: E402
from trl import GRPOTrainer, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.gspo_token import GRPOTrainer as GSPOTokenGRPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from tests.trl_utils import close, t  # noqa: E402
from tests.trl_utils import stub_trainer as _stub_trainer  # noqa: E402


def test_trl_version():
  assert trl.__version__ == "1.12.0"


# ----------------------------------------------------------------------------------------------- KTO


def _completion_batch(rng, n, width, vocab):
  ids = rng.integers(0, vocab, size=(n, width))
  prompt_len = rng.integers(1, 3, size=n)
  comp_len = rng.integers(1, width - 2, size=n)
  pos = np.arange(width)[None]
  completion_mask = ((pos >= prompt_len[:, None]) & (pos < (prompt_len + comp_len)[:, None])).astype(np.int64)
  attention_mask = (pos < (prompt_len + comp_len)[:, None]).astype(np.int64)
  logits = rng.normal(size=(n, width, vocab)).astype(np.float32)
  return ids, completion_mask, attention_mask, logits


def _our_logps(ids, completion_mask, logits):
  return L.sequence_logprobs(jnp.asarray(logits[:, :-1]), jnp.asarray(ids[:, 1:]),
                             jnp.asarray(completion_mask[:, 1:])).sum(-1)


@pytest.mark.parametrize("kl_shift", [5.0, -5.0])  # a positive KL estimate, and a negative one (clamped to 0)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_matches_kto_trainer_compute_loss(kl_shift, weights):
  rng = np.random.default_rng(10)
  B, W, V, beta = 5, 8, 11, 0.3
  ids, cm, am, logits = _completion_batch(rng, B, W, V)
  kl_ids, kl_cm, kl_am, kl_logits = _completion_batch(rng, B, W + 1, V)  # mismatched completions
  labels = np.array([True, False, True, True, False])
  ref_logps = (rng.normal(size=B) - 8.0).astype(np.float32)
  ref_kl_logps = (rng.normal(size=B) - 8.0 - kl_shift).astype(np.float32)
  inputs = {"input_ids": t(ids), "attention_mask": t(am), "completion_mask": t(cm), "label": t(labels),
            "KL_input_ids": t(kl_ids), "KL_attention_mask": t(kl_am), "KL_completion_mask": t(kl_cm),
            "ref_logps": t(ref_logps), "ref_KL_logps": t(ref_kl_logps)}

  def model(input_ids, attention_mask, **kw):
    return SimpleNamespace(logits=t(kl_logits if input_ids.shape[1] == W + 1 else logits))

  stub = _stub_trainer(calculate_KL=True, use_liger_kernel=False, aux_loss_enabled=False, precompute_ref_logps=True,
                       loss_type="kto", beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
  stub._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(stub, m, b)
  trl_loss = KTOTrainer._compute_loss(stub, model, inputs, return_outputs=False)

  logps = _our_logps(ids, cm, logits)
  kl_ref = jnp.mean(_our_logps(kl_ids, kl_cm, kl_logits) - ref_kl_logps)
  loss, met = L.kto_loss(logps, jnp.asarray(ref_logps), jnp.asarray(labels), beta=beta, desirable_weight=weights[0],
                         undesirable_weight=weights[1], kl_ref=kl_ref)
  close(loss, trl_loss)
  m = stub._metrics["train"]
  close(met["kl"], m["kl"][0])
  assert (float(met["kl"]) > 0) == (kl_shift > 0)
  close(met["chosen_reward"], m["rewards/chosen"][0])
  close(met["rejected_reward"], m["rewards/rejected"][0])
  close(met["reward_margin"], m["rewards/margins"][0])
  close(met["logps_chosen"], m["logps/chosen"][0])
  close(met["logps_rejected"], m["logps/rejected"][0])


# --------------------------------------------------------------------------------------------- SimPO


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_simpo_matches_cpo_trainer_cpo_loss(label_smoothing):
  rng = np.random.default_rng(11)
  B, W, V, beta, simpo_gamma = 4, 7, 9, 2.0, 0.8
  ids, cm, _, logits = _completion_batch(rng, 2 * B, W, V)
  # CPOTrainer's length-normalised log-probs (labels = -100 off the completion) equal our token average.
  labels = np.where(cm > 0, ids, -100)
  trl_avg = CPOTrainer.get_batch_logps(t(logits), t(labels), average_log_prob=True)
  lens = cm[:, 1:].sum(-1)
  ours_avg = _our_logps(ids, cm, logits) / lens
  close(ours_avg, trl_avg)
  stub = _stub_trainer(alpha=0.0, loss_type="simpo", simpo_gamma=simpo_gamma, beta=beta,
                       label_smoothing=label_smoothing)
  losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, trl_avg[:B], trl_avg[B:])
  # TRL's simpo_gamma is the absolute margin γ; the SimPO repository's gamma_beta_ratio is γ/β.
  for kw in (dict(gamma=simpo_gamma), dict(gamma_beta_ratio=simpo_gamma / beta)):
    loss, met = L.simpo_loss(ours_avg[:B], ours_avg[B:], beta=beta, label_smoothing=label_smoothing, **kw)
    close(loss, losses.mean())
    close(met["chosen_reward"], chosen_rewards.mean())
    close(met["rejected_reward"], rejected_rewards.mean())
    close(met["reward_accuracy"], (chosen_rewards > rejected_rewards).float().mean())


# ---------------------------------------------------------------------------------------------- ORPO


def test_orpo_matches_orpo_trainer_odds_ratio_loss():
  rng = np.random.default_rng(12)
  c = np.concatenate([-np.abs(rng.normal(size=5)), [-1e-3, -0.69, -25.0]]).astype(np.float32)
  r = np.concatenate([-np.abs(rng.normal(size=5)) * 2, [-2.0, -0.7, -1e-4]]).astype(np.float32)
  beta, nll = 0.1, 2.3
  stub = _stub_trainer(beta=beta)
  losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
      stub, t(c), t(r))
  trl_loss = torch.tensor(nll) - losses.mean()  # ORPOTrainer.get_batch_loss_metrics: policy_nll_loss - losses.mean()
  loss, met = L.orpo_loss(jnp.asarray(c), jnp.asarray(r), beta=beta, nll=nll)
  close(loss, trl_loss)
  close(met["log_odds_ratio"], log_odds_ratio)
  close(met["log_odds_chosen"], log_odds_chosen, 1e-4)
  close(met["chosen_reward"], chosen_rewards.mean())
  close(met["rejected_reward"], rejected_rewards.mean())
  close(met["reward_accuracy"], (chosen_rewards > rejected_rewards).float().mean())
  # Gradients w.r.t. the average log-probs agree too.
  tc, tr = t(c).requires_grad_(), t(r).requires_grad_()
  (torch.tensor(nll) - ORPOTrainer.odds_ratio_loss(stub, tc, tr)[0].mean()).backward()
  gc, gr = jax.grad(lambda a, b: L.orpo_loss(a, b, beta=beta, nll=nll)[0], argnums=(0, 1))(jnp.asarray(c),
                                                                                           jnp.asarray(r))
  close(gc, tc.grad, 1e-4)
  close(gr, tr.grad, 1e-4)


# ------------------------------------------------------------------------------------- GSPO / CISPO


def _policy_inputs(seed, spread):
  rng = np.random.default_rng(seed)
  B, T = 4, 6
  old = -np.abs(rng.normal(size=(B, T))).astype(np.float32)
  logp = (old + spread * rng.normal(size=(B, T))).astype(np.float32)
  ref = (old + 0.2 * rng.normal(size=(B, T))).astype(np.float32)
  adv = rng.normal(size=B).astype(np.float32)
  mask = (np.arange(T)[None] < np.array([[6], [3], [1], [5]])).astype(np.float32)  # no empty row (MATH §5.5)
  return logp, old, ref, adv, mask


def _trl_policy_loss(trainer_cls, logp, old, ref, adv, mask, *, loss_type, importance_sampling_level, beta,
                     epsilon_low, epsilon_high, max_completion_length=8):
  """Run TRL's real `_compute_loss` with the model forward replaced by the given per-token log-probs.
  Returns (loss, d loss / d logp)."""
  B, T = logp.shape
  per_token_logps = t(logp).requires_grad_()
  stub = _stub_trainer(
      top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=importance_sampling_level,
      beta=beta, loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False,
      current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
      _entropy_bonus_enabled=False, aux_loss_enabled=False,
      args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
  stub._get_per_token_logps_and_entropies = lambda *a, **kw: (per_token_logps, torch.zeros(B, T), None)
  inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
            "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": t(mask),
            "advantages": t(adv), "old_per_token_logps": t(old), "ref_per_token_logps": t(ref),
            "num_items_in_batch": t(mask).sum()}
  loss = trainer_cls._compute_loss(stub, None, inputs)
  loss.backward()
  return loss, per_token_logps.grad


@pytest.mark.parametrize("trl_type,ours", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                           ("dr_grpo", "dr-grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("spread", [0.05, 0.3])  # ratios mostly inside the band / several sequences clipped
def test_gspo_matches_grpo_trainer_sequence_level(trl_type, ours, beta, spread):
  logp, old, ref, adv, mask = _policy_inputs(13, spread)
  eps_low, eps_high = 0.03, 0.04
  fn = lambda x: L.gspo_policy_loss(x, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), clip_eps=eps_low,
                                    clip_eps_high=eps_high, ref_logp=jnp.asarray(ref), kl_coef=beta,
                                    aggregation=ours, max_len=8)[0]
  loss, grad = jax.value_and_grad(fn)(jnp.asarray(logp))
  for trainer_cls, level in ((GRPOTrainer, "sequence"), (GSPOTokenGRPOTrainer, "sequence_token")):
    trl_loss, trl_grad = _trl_policy_loss(trainer_cls, logp, old, ref, adv, mask, loss_type=trl_type,
                                          importance_sampling_level=level, beta=beta, epsilon_low=eps_low,
                                          epsilon_high=eps_high)
    close(loss, trl_loss)
    close(grad, trl_grad)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_cispo_matches_grpo_trainer_cispo(beta):
  logp, old, ref, adv, mask = _policy_inputs(14, 0.4)
  trl_eps_high = 1.3  # TRL's epsilon_high is the absolute bound ε_max: ours is clip_eps_high = ε_max - 1
  trl_loss, trl_grad = _trl_policy_loss(GRPOTrainer, logp, old, ref, adv, mask, loss_type="cispo",
                                        importance_sampling_level="token", beta=beta, epsilon_low=0.2,
                                        epsilon_high=trl_eps_high)
  fn = lambda x: L.cispo_policy_loss(x, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                     clip_eps_high=trl_eps_high - 1.0, ref_logp=jnp.asarray(ref), kl_coef=beta)
  (loss, met), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logp))
  assert float(met["clipfrac"]) > 0  # some weights are clipped
  close(loss, trl_loss)
  close(grad, trl_grad)


# ------------------------------------------------------------------------------------------ online DPO


def trl_online_dpo_loss(logprobs, ref_logprobs, completion_mask, rewards, *, beta, loss_type):
  """Transcribed from trl/experimental/online_dpo/online_dpo_trainer.py, OnlineDPOTrainer.training_step
  (TRL 1.12.0): rows 0..B-1 are each prompt's first sample, rows B..2B-1 its second."""
  F = torch.nn.functional
  batch_size = rewards.shape[0] // 2
  first_half, second_half = rewards.split(batch_size)
  mask = first_half >= second_half
  batch_range = torch.arange(batch_size)
  chosen_indices = batch_range + (~mask * batch_size)
  rejected_indices = batch_range + (mask * batch_size)
  cr_indices = torch.cat((chosen_indices, rejected_indices), dim=0)
  cr_logprobs = logprobs[cr_indices]
  cr_ref_logprobs = ref_logprobs[cr_indices]
  padding_mask = ~completion_mask.bool()
  cr_padding_mask = padding_mask[cr_indices]
  cr_logprobs_sum = (cr_logprobs * ~cr_padding_mask).sum(1)
  cr_ref_logprobs_sum = (cr_ref_logprobs * ~cr_padding_mask).sum(1)
  chosen_logprobs_sum, rejected_logprobs_sum = torch.split(cr_logprobs_sum, batch_size)
  chosen_ref_logprobs_sum, rejected_ref_logprobs_sum = torch.split(cr_ref_logprobs_sum, batch_size)
  pi_logratios = chosen_logprobs_sum - rejected_logprobs_sum
  ref_logratios = chosen_ref_logprobs_sum - rejected_ref_logprobs_sum
  logits = pi_logratios - ref_logratios
  if loss_type == "sigmoid":
    losses = -F.logsigmoid(beta * logits)
  else:  # ipo
    losses = (logits - 1 / (2 * beta)) ** 2
  return losses.mean()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_online_dpo_matches_online_dpo_trainer(loss_type):
  from rlhf_jax.rl import OnlineDPOConfig, OnlineDPOHParams
  rng = np.random.default_rng(5)
  B, N, beta = 6, 5, 0.3
  logp = rng.normal(-1.5, 0.5, size=(2 * B, N)).astype(np.float32)
  ref = rng.normal(-1.5, 0.5, size=(2 * B, N)).astype(np.float32)
  lengths = rng.integers(1, N + 1, size=2 * B)
  mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
  rewards = rng.permutation(2 * B).astype(np.float32) / 10  # no ties (TRL would label a tie "first chosen")
  trl_loss = trl_online_dpo_loss(t(logp), t(ref), t(mask).long(), t(rewards), beta=beta, loss_type=loss_type)
  # ours: a prompt's two samples are contiguous rows (2i, 2i + 1) = TRL's rows (i, B + i)
  order = np.stack([np.arange(B), np.arange(B) + B], axis=1).reshape(-1)
  cfg = OnlineDPOConfig(batch_size=B, loss_type=loss_type, hparams=OnlineDPOHParams(beta=beta)).validate()
  extra, _ = cfg.advantages(None, None, jnp.asarray(rewards[order]), None)
  m = jnp.asarray(mask[order])
  batch = {"response_mask": m, "ref_logp": jnp.asarray(ref[order]) * m, "old_logp": jnp.asarray(logp[order]) * m,
           **extra}
  loss, _ = cfg.minibatch_loss({"logp": jnp.asarray(logp[order]) * m, "entropy": jnp.zeros_like(m)}, None, batch)
  close(loss, trl_loss)
