"""Hand-computed cases, gradients, invariances and compile-once checks for the loss family beyond
PPO/GRPO/DPO: KTO, SimPO, ORPO, GSPO, CISPO and REINFORCE++ (docs/MATH.md §4.5–§4.10).

Expected values are computed by hand or with plain NumPy (float64) in the test. Parity with TRL 1.12 lives
in tests/test_losses_family_trl.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax.losses as L


def close(a, b, tol=1e-6):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def log_sigmoid(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def same(a, b, tol=1e-6):
  """Two ``(loss, metrics)`` results agree on the loss and every metric."""
  close(a[0], b[0], tol)
  assert a[1].keys() == b[1].keys()
  for k in a[1]:
    close(a[1][k], b[1][k], tol)


def _pad(x, n, value):
  """Append ``n`` positions filled with ``value`` on the last axis."""
  x = jnp.asarray(x)
  return jnp.concatenate([x, jnp.full(x.shape[:-1] + (n,), value, x.dtype)], axis=-1)


# ----------------------------------------------------------------------------------------------- KTO


def test_kto_hand_computed():
  pl = np.array([-3.0, -4.0, -5.0, -2.0])
  rl = np.array([-3.5, -3.0, -5.2, -2.0])
  des = np.array([True, False, True, False])
  beta, wd, wu, kl = 0.5, 1.5, 0.7, 0.2
  r = pl - rl  # [0.5, -1, 0.2, 0]
  per = [wd * (1 - sigmoid(beta * (r[0] - kl))), wu * (1 - sigmoid(beta * (kl - r[1]))),
         wd * (1 - sigmoid(beta * (r[2] - kl))), wu * (1 - sigmoid(beta * (kl - r[3])))]
  loss, m = L.kto_loss(pl, rl, des, beta=beta, desirable_weight=wd, undesirable_weight=wu, kl_ref=kl)
  close(loss, np.mean(per))  # a plain mean over all 4 examples: the weights are not in the denominator
  close(m["kl"], kl)
  close(m["chosen_reward"], beta * (r[0] + r[2]) / 2)
  close(m["rejected_reward"], beta * (r[1] + r[3]) / 2)
  close(m["reward_margin"], beta * ((r[0] + r[2]) / 2 - (r[1] + r[3]) / 2))
  close(m["logps_chosen"], -4.0)
  close(m["logps_rejected"], -3.0)
  close(m["num_desirable"], 2)
  close(m["num_undesirable"], 2)
  # z = max(0, KL): a negative estimate, and no estimate, both give z = 0.
  zero = [wd * (1 - sigmoid(beta * r[0])), wu * (1 - sigmoid(-beta * r[1])), wd * (1 - sigmoid(beta * r[2])),
          wu * (1 - sigmoid(-beta * r[3]))]
  for kl_ref in (None, -0.3):
    loss0, m0 = L.kto_loss(pl, rl, des, beta=beta, desirable_weight=wd, undesirable_weight=wu, kl_ref=kl_ref)
    close(loss0, np.mean(zero))
    close(m0["kl"], 0.0)
  # 0/1 integer labels work like bools.
  close(L.kto_loss(pl, rl, des.astype(np.int32), beta=beta, kl_ref=kl)[0],
        L.kto_loss(pl, rl, des, beta=beta, kl_ref=kl)[0])


def test_kto_gradient_and_detached_reference_point():
  pl = jnp.array([-3.0, -4.0, -5.0])
  rl = jnp.array([-3.5, -3.0, -5.2])
  des = jnp.array([True, False, True])
  beta, wd, wu, kl = 0.5, 1.5, 0.7, 0.2
  g = jax.grad(lambda x: L.kto_loss(x, rl, des, beta=beta, desirable_weight=wd, undesirable_weight=wu,
                                    kl_ref=kl)[0])(pl)
  r = np.asarray(pl - rl, np.float64)
  s_d = sigmoid(beta * (r - kl))
  s_u = sigmoid(beta * (kl - r))
  expected = np.where(np.asarray(des), -wd * beta * s_d * (1 - s_d), wu * beta * s_u * (1 - s_u)) / 3
  close(g, expected)
  # The reference point is detached: no gradient flows into the KL estimate.
  g_kl = jax.grad(lambda k: L.kto_loss(pl, rl, des, beta=beta, kl_ref=k)[0])(0.2)
  assert float(g_kl) == 0.0


def test_kto_mask_drops_padded_examples_even_nan():
  pl = jnp.array([-3.0, -4.0, -5.0])
  rl = jnp.array([-3.5, -3.0, -5.2])
  des = jnp.array([True, False, True])
  a = L.kto_loss(pl, rl, des, beta=0.3, kl_ref=0.1)
  padded = lambda x, v: jnp.concatenate([x, jnp.full((2,), v, x.dtype)])
  mask = jnp.array([1, 1, 1, 0, 0])
  b = L.kto_loss(padded(pl, jnp.nan), padded(rl, jnp.inf), padded(des, True), beta=0.3, kl_ref=0.1, mask=mask)
  same(a, b)
  g = jax.grad(lambda x: L.kto_loss(x, padded(rl, jnp.nan), padded(des, False), beta=0.3, mask=mask)[0])(
      padded(pl, jnp.nan))
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[3:] == 0)


# --------------------------------------------------------------------------------------------- SimPO


def test_simpo_hand_computed_and_gamma_conventions():
  c = np.array([-1.0, -2.0, -0.5])
  r = np.array([-1.5, -1.0, -2.0])
  beta, gamma = 2.0, 0.5
  u = beta * (c - r) - gamma
  loss, m = L.simpo_loss(c, r, beta=beta, gamma=gamma)
  close(loss, np.mean(-log_sigmoid(u)))
  # gamma_beta_ratio = γ/β is the same margin.
  close(L.simpo_loss(c, r, beta=beta, gamma_beta_ratio=gamma / beta)[0], loss)
  close(m["chosen_reward"], beta * c.mean())
  close(m["rejected_reward"], beta * r.mean())
  close(m["reward_margin"], beta * (c - r).mean())
  close(m["reward_accuracy"], 2 / 3)
  eps = 0.1
  close(L.simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=eps)[0],
        np.mean(-(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)))
  # The gradient w.r.t. the chosen average log-prob: -β σ(-u) (1-ε)... at ε = 0, divided by B.
  g = jax.grad(lambda x: L.simpo_loss(x, r, beta=beta, gamma=gamma)[0])(jnp.asarray(c, jnp.float32))
  close(g, -beta * sigmoid(-u) / 3)
  with pytest.raises(ValueError, match="simpo_loss: pass exactly one of `gamma`"):
    L.simpo_loss(c, r, beta=beta)
  with pytest.raises(ValueError, match="simpo_loss: pass exactly one of `gamma`"):
    L.simpo_loss(c, r, beta=beta, gamma=0.5, gamma_beta_ratio=0.25)
  with pytest.raises(ValueError, match="simpo_loss: `label_smoothing`"):
    L.simpo_loss(c, r, beta=beta, gamma=0.5, label_smoothing=0.5)


# ---------------------------------------------------------------------------------------------- ORPO


def test_orpo_hand_computed():
  c = np.array([-0.2, -1.3, -3.0, -0.9])
  r = np.array([-0.7, -0.6, -4.5, -2.0])
  beta, nll = 0.25, 1.7
  log_odds = lambda x: x - np.log1p(-np.exp(x))  # float64: exact enough here
  lo = log_odds(c) - log_odds(r)
  loss, m = L.orpo_loss(c, r, beta=beta, nll=nll)
  close(loss, nll - beta * np.mean(log_sigmoid(lo)), 1e-5)
  close(m["or_loss"], -beta * np.mean(log_sigmoid(lo)), 1e-5)
  close(m["nll"], nll)
  close(m["log_odds_ratio"], np.mean(log_sigmoid(lo)), 1e-5)
  close(m["log_odds_chosen"], np.mean(lo), 1e-5)
  close(m["chosen_reward"], beta * c.mean())
  close(m["reward_accuracy"], 0.75)
  close(L.orpo_loss(c, r, beta=beta)[0], -beta * np.mean(log_sigmoid(lo)), 1e-5)  # no NLL: the OR term alone


def test_orpo_log_odds_stable_at_the_extremes():
  # Near 0 (p → 1), on the branch point -log 2, and very negative: finite values and gradients, and the
  # value agrees with float64 math (where float32 log(1 - exp(x)) would lose everything).
  c = np.array([-1e-4, -np.log(2.0), -40.0, 0.0])
  r = np.array([-2.0, -1e-3, -0.5, -1e-7])
  loss, m = L.orpo_loss(c, r, beta=1.0)
  cc = np.minimum(c, -1e-7)
  rc = np.minimum(r, -1e-7)
  log_odds = lambda x: x - np.log(-np.expm1(x))
  close(m["log_odds_chosen"], np.mean(log_odds(cc) - log_odds(rc)), 1e-4)
  close(loss, -np.mean(log_sigmoid(log_odds(cc) - log_odds(rc))), 1e-5)
  g = jax.grad(lambda a, b: L.orpo_loss(a, b, beta=1.0)[0], argnums=(0, 1))(jnp.asarray(c, jnp.float32),
                                                                          jnp.asarray(r, jnp.float32))
  assert all(np.all(np.isfinite(x)) for x in g)
  # d log odds / dx = 1 / (1 - e^x): check the chosen gradient away from the clamp.
  s = sigmoid(log_odds(cc) - log_odds(rc))
  close(np.asarray(g[0])[:3], (-(1 - s) / (1 - np.exp(cc)) / 4)[:3], 1e-4)
  assert float(g[0][3]) == 0.0  # logp = 0 is clamped: no gradient, no NaN


# ---------------------------------------------------------------------------------------------- GSPO


def _gspo_direct(logp, old, adv, mask, eps_low, eps_high):
  """GSPO written the obvious way (sequence ratio differentiated through the masked mean, no
  stop-gradient trick): the paper's objective and TRL's importance_sampling_level="sequence"."""
  n = jnp.sum(mask, -1)
  s = jnp.exp(jnp.sum((logp - old) * mask, -1) / n)
  return jnp.mean(-jnp.minimum(s * adv, jnp.clip(s, 1 - eps_low, 1 + eps_high) * adv))


def test_gspo_hand_computed_value_and_gradient():
  old = jnp.array([[-1.0, -2.0, -0.5, -1.0], [-0.3, -1.2, -2.0, -0.7], [-1.5, -0.1, -0.4, -0.9]])
  delta = jnp.array([[0.02, -0.01, 0.05, 9.0], [0.3, 0.2, 0.4, 0.1], [-0.3, -0.2, -0.25, 0.0]])
  logp = old + delta
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], jnp.float32)
  adv = jnp.array([1.0, 2.0, -0.5])
  eps = 0.2
  # s_0 = exp(0.02) (inside the band), s_1 = exp(0.25) > 1.2 with A > 0 (clipped), s_2 = exp(-0.25) < 0.8
  # with A < 0 (clipped).
  s = np.exp([0.06 / 3, 1.0 / 4, -0.5 / 2])
  per_seq = [-s[0] * 1.0, -(1 + eps) * 2.0, -(1 - eps) * -0.5]
  loss, m = L.gspo_policy_loss(logp, old, adv, mask, clip_eps=eps)
  close(loss, np.mean(per_seq), 1e-6)
  close(m["clipfrac"], 2 / 3)
  close(m["seq_ratio_mean"], s.mean(), 1e-6)
  close(m["seq_ratio_max"], s.max(), 1e-6)
  close(m["num_sequences"], 3)
  close(m["num_tokens"], 9)
  # Gradient: -A_i s_i / |y_i| / G on the unclipped sequence's tokens, 0 on the clipped ones.
  g = jax.grad(lambda x: L.gspo_policy_loss(x, old, adv, mask, clip_eps=eps)[0])(logp)
  expected = np.zeros((3, 4))
  expected[0, :3] = -1.0 * s[0] / 3 / 3
  close(g, expected, 1e-6)
  # Identical to differentiating the sequence ratio directly (away from the kinks).
  close(g, jax.grad(lambda x: _gspo_direct(x, old, adv, mask, eps, eps))(logp), 1e-6)
  # A wider band: nothing clipped; gradients equal the direct form everywhere.
  g_wide = jax.grad(lambda x: L.gspo_policy_loss(x, old, adv, mask, clip_eps=0.5, clip_eps_high=0.6)[0])(logp)
  close(g_wide, jax.grad(lambda x: _gspo_direct(x, old, adv, mask, 0.5, 0.6))(logp), 1e-6)
  assert np.all(np.asarray(g_wide)[mask > 0] != 0)
  # ...which is NOT the token-level GRPO gradient (the ratio is shared by the sequence's tokens).
  g_tok = jax.grad(lambda x: L.grpo_policy_loss(x, old, adv, mask, clip_eps=0.5, clip_eps_high=0.6)[0])(logp)
  assert not np.allclose(g_wide, g_tok)


def test_gspo_token_advantages_rejected_and_aggregations():
  logp = -jnp.ones((2, 3)) * 0.5
  mask = jnp.array([[1, 1, 1], [1, 0, 0]])
  with pytest.raises(ValueError, match=r"gspo_policy_loss: argument `advantages` has shape \(2, 3\).*\(2,\)"):
    L.gspo_policy_loss(logp, logp, jnp.ones((2, 3)), mask)
  # On-policy (ratio 1): the loss is -mean A under every aggregation's weighting.
  adv = jnp.array([1.0, -3.0])
  close(L.gspo_policy_loss(logp, logp, adv, mask)[0], -(1.0 - 3.0) / 2)
  close(L.gspo_policy_loss(logp, logp, adv, mask, aggregation="token-mean")[0], -(3 * 1.0 - 3.0) / 4)
  close(L.gspo_policy_loss(logp, logp, adv, mask, aggregation="dr-grpo", max_len=5)[0], -(3 * 1.0 - 3.0) / 10)


# --------------------------------------------------------------------------------------------- CISPO


def test_cispo_hand_computed_value_and_stop_gradient():
  old = jnp.log(jnp.array([[0.5, 0.2, 0.4], [0.1, 0.3, 0.6]]))
  ratio = np.array([[1.5, 0.5, 1.0], [1.1, 3.0, 7.0]])
  logp = old + jnp.log(jnp.asarray(ratio, jnp.float32))
  mask = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32)
  adv = jnp.array([2.0, -1.0])
  lp = np.asarray(logp, np.float64)
  m = np.asarray(mask)
  a = np.asarray(adv)[:, None]
  # No lower bound (the report's setting): ŵ = min(ρ, 1 + ε_high).
  w = np.minimum(ratio, 1.2)
  loss, met = L.cispo_policy_loss(logp, old, adv, mask, clip_eps_high=0.2)
  close(loss, np.sum(-w * a * lp * m) / 5, 1e-6)
  close(met["clipfrac"], 2 / 5)  # 1.5 and 3.0 (7.0 is padding)
  close(met["ratio_max"], 3.0, 1e-5)
  # The weight is a constant: d loss / d logp = -ŵ A / N (no gradient through ρ).
  g = jax.grad(lambda x: L.cispo_policy_loss(x, old, adv, mask, clip_eps_high=0.2)[0])(logp)
  close(g, -w * a * m / 5, 1e-6)
  # With a lower bound too.
  w2 = np.clip(ratio, 0.8, 1.2)
  close(L.cispo_policy_loss(logp, old, adv, mask, clip_eps_high=0.2, clip_eps_low=0.2)[0],
        np.sum(-w2 * a * lp * m) / 5, 1e-6)
  g2 = jax.grad(lambda x: L.cispo_policy_loss(x, old, adv, mask, clip_eps_high=0.2, clip_eps_low=0.2)[0])(logp)
  close(g2, -w2 * a * m / 5, 1e-6)
  # Sequence aggregation, and a k3 KL term like GRPO's.
  ref = old - 0.1
  loss_s, met_s = L.cispo_policy_loss(logp, old, adv, mask, clip_eps_high=0.2, ref_logp=ref, kl_coef=0.05,
                                      aggregation="seq-mean-token-mean")
  u = np.asarray(ref, np.float64) - lp
  per = -w * a * lp + 0.05 * (np.exp(u) - u - 1)
  close(loss_s, np.mean([(per[0] * m[0]).sum() / 3, (per[1] * m[1]).sum() / 2]), 1e-5)
  close(met_s["kl"], ((np.exp(u) - u - 1) * m).sum() / 5, 1e-5)


# -------------------------------------------------------------------------------------------- REINFORCE++


def _np_discounted_returns(r, mask, gamma):
  out = np.zeros_like(r)
  for b in range(r.shape[0]):
    acc = 0.0
    for t in reversed(range(r.shape[1])):
      if mask[b, t]:
        acc = r[b, t] + gamma * acc
        out[b, t] = acc
  return out


def _np_whiten(x, mask):
  v = x[mask > 0]
  return np.where(mask > 0, (x - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8), 0.0)


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_hand_computed(baseline):
  scores = np.array([1.0, 0.0, 2.0, 1.5])
  mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)  # a hole in row 1
  rng = np.random.default_rng(0)
  logp = -np.abs(rng.normal(size=(4, 4))).astype(np.float32)
  ref = (logp + 0.3 * rng.normal(size=(4, 4))).astype(np.float32)
  beta, gamma = 0.1, 0.9
  s = scores - np.repeat(scores.reshape(2, 2).mean(1), 2) if baseline else scores  # [0.5, -0.5, 0.25, -0.25]
  r = -beta * (logp.astype(np.float64) - ref) * mask
  last = [2, 3, 0, 3]
  for b in range(4):
    r[b, last[b]] += s[b]
  ret = _np_discounted_returns(r, mask, gamma)
  adv, got_ret = L.reinforce_pp_advantages(scores, mask, logp=logp, ref_logp=ref, kl_coef=beta, gamma=gamma,
                                           baseline=baseline, group_size=2)
  close(got_ret, ret, 1e-6)
  close(adv, _np_whiten(ret, mask), 1e-5)
  # Per-token rewards given directly (score already placed, KL already in) give the same advantages.
  adv2, _ = L.reinforce_pp_advantages(jnp.asarray(r, jnp.float32), mask, gamma=gamma)
  close(adv2, adv, 1e-5)
  # γ = 1 default: a plain reverse cumulative sum.
  _, ret1 = L.reinforce_pp_advantages(scores, mask, logp=logp, ref_logp=ref, kl_coef=beta, baseline=baseline,
                                      group_size=2)
  close(ret1, _np_discounted_returns(r, mask, 1.0), 1e-6)


def test_reinforce_pp_global_whitening_over_devices():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=8).astype(np.float32)
  mask = (np.arange(5)[None] < rng.integers(1, 6, size=(8, 1))).astype(np.float32)
  logp = -np.abs(rng.normal(size=(8, 5))).astype(np.float32)
  ref = (logp + 0.2 * rng.normal(size=(8, 5))).astype(np.float32)
  kw = dict(kl_coef=0.05, baseline=True, group_size=2)
  full, _ = L.reinforce_pp_advantages(scores, mask, logp=logp, ref_logp=ref, **kw)
  # Two "devices" of 4 rows (whole groups each): with axis_name the statistics are global.
  split = lambda x: jnp.asarray(x).reshape((2, 4) + x.shape[1:])
  per_dev, _ = jax.vmap(lambda s, m, a, b: L.reinforce_pp_advantages(s, m, logp=a, ref_logp=b, axis_name="d", **kw),
                        axis_name="d")(split(scores), split(mask), split(logp), split(ref))
  close(per_dev.reshape(8, 5), full, 1e-5)
  local, _ = jax.vmap(lambda s, m, a, b: L.reinforce_pp_advantages(s, m, logp=a, ref_logp=b, **kw))(
      split(scores), split(mask), split(logp), split(ref))
  assert not np.allclose(local.reshape(8, 5), full, atol=1e-3)


def test_reinforce_pp_argument_errors():
  mask = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="reinforce_pp_advantages: `baseline=True` .* needs `group_size`"):
    L.reinforce_pp_advantages(jnp.ones(2), mask, baseline=True)
  with pytest.raises(ValueError, match="reinforce_pp_advantages: `baseline=True` needs per-sequence scores"):
    L.reinforce_pp_advantages(jnp.ones((2, 3)), mask, baseline=True, group_size=2)
  with pytest.raises(ValueError, match="reinforce_pp_advantages: pass both `logp` and `ref_logp`"):
    L.reinforce_pp_advantages(jnp.ones(2), mask, logp=jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"reinforce_pp_advantages: argument `rewards` has shape \(3,\)"):
    L.reinforce_pp_advantages(jnp.ones(3), mask)
  with pytest.raises(ValueError, match=r"reinforce_pp_advantages: argument `mask` must be \[B, T\]"):
    L.reinforce_pp_advantages(jnp.ones(2), jnp.ones(2))
  with pytest.raises(ValueError, match="group_size=4"):
    L.reinforce_pp_advantages(jnp.ones(2), mask, baseline=True, group_size=4)


# -------------------------------------------------------------------- padding / NaN invariance (policy)


def test_policy_losses_padding_invariant_with_nan():
  rng = np.random.default_rng(2)
  B, T, P = 3, 4, 3
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  old = -jnp.abs(f(B, T))
  logp = old + 0.1 * f(B, T)
  ref = old + 0.2 * f(B, T)
  adv = f(B)
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], jnp.float32)
  pm = _pad(mask, P, 0.0)
  nan = lambda x: _pad(x, P, jnp.nan)
  for fn, kw in ((L.gspo_policy_loss, dict(clip_eps=0.05)), (L.cispo_policy_loss, dict(clip_eps_high=0.05))):
    for agg in ("seq-mean-token-mean", "token-mean"):
      kw2 = dict(kw, aggregation=agg, ref_logp=None, kl_coef=0.1)
      a = fn(logp, old, adv, mask, **dict(kw2, ref_logp=ref))
      b = fn(nan(logp), nan(old), adv, pm, **dict(kw2, ref_logp=nan(ref)))
      same(a, b)
      g = jax.grad(lambda x: fn(x, nan(old), adv, pm, **dict(kw2, ref_logp=nan(ref)))[0])(nan(logp))
      g0 = jax.grad(lambda x: fn(x, old, adv, mask, **dict(kw2, ref_logp=ref))[0])(logp)
      assert np.all(np.isfinite(g))
      close(g[:, :T], g0)
      close(g[:, T:], np.zeros((B, P)))
  # REINFORCE++: NaN in padded rewards/log-probs changes nothing.
  scores = f(B)
  a = L.reinforce_pp_advantages(scores, mask, logp=logp, ref_logp=ref, kl_coef=0.1)
  b = L.reinforce_pp_advantages(scores, pm, logp=nan(logp), ref_logp=nan(ref), kl_coef=0.1)
  close(b[0][:, :T], a[0], 1e-6)
  close(b[1][:, :T], a[1], 1e-6)
  close(b[0][:, T:], np.zeros((B, P)))
  g = jax.grad(lambda x: L.reinforce_pp_advantages(scores, pm, logp=x, ref_logp=nan(ref), kl_coef=0.1)[0].sum())(
      nan(logp))
  assert np.all(np.isfinite(g))


def test_pair_losses_mask_nan_invariant():
  c = jnp.array([-1.0, -2.0, -0.5])
  r = jnp.array([-1.5, -1.0, -2.0])
  pad = lambda x: jnp.concatenate([x, jnp.array([jnp.nan, 0.0])])
  mask = jnp.array([1, 1, 1, 0, 0])
  same(L.simpo_loss(c, r, beta=2.0, gamma=0.3), L.simpo_loss(pad(c), pad(r), beta=2.0, gamma=0.3, mask=mask))
  same(L.orpo_loss(c, r, beta=0.1, nll=0.5), L.orpo_loss(pad(c), pad(r), beta=0.1, nll=0.5, mask=mask))
  for fn, kw in ((L.simpo_loss, dict(beta=2.0, gamma=0.3)), (L.orpo_loss, dict(beta=0.1))):
    g = jax.grad(lambda x: fn(x, pad(r), mask=mask, **kw)[0])(pad(c))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[3:] == 0)


# --------------------------------------------------------------------------- jit / vmap / no recompile


def test_family_hyperparameters_are_traced_no_recompilation():
  rng = np.random.default_rng(3)
  old = -jnp.abs(jnp.asarray(rng.normal(size=(2, 4)), jnp.float32))
  logp = old + 0.1
  mask = jnp.ones((2, 4))
  adv = jnp.array([1.0, -1.0])
  c, r = logp[:, 0], logp[:, 1]
  des = jnp.array([True, False])

  @jax.jit
  @chex.assert_max_traces(n=1)
  def kto_fn(beta, wd, wu, kl):
    return L.kto_loss(c, r, des, beta=beta, desirable_weight=wd, undesirable_weight=wu, kl_ref=kl)[0]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def pair_fn(beta, gamma, ratio, ls, nll):
    return (L.simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=ls)[0],
            L.simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio)[0], L.orpo_loss(c, r, beta=beta, nll=nll)[0])

  @jax.jit
  @chex.assert_max_traces(n=1)
  def policy_fn(eps, eps_high, kl_coef):
    return (L.gspo_policy_loss(logp, old, adv, mask, clip_eps=eps, clip_eps_high=eps_high, ref_logp=old,
                               kl_coef=kl_coef)[0],
            L.cispo_policy_loss(logp, old, adv, mask, clip_eps_high=eps_high, clip_eps_low=eps)[0])

  @jax.jit
  @chex.assert_max_traces(n=1)
  def rpp_fn(kl_coef, gamma):
    return L.reinforce_pp_advantages(adv, mask, logp=logp, ref_logp=old, kl_coef=kl_coef, gamma=gamma,
                                     baseline=True, group_size=2)

  ktos = [kto_fn(b, wd, wu, k) for b, wd, wu, k in ((0.1, 1.0, 1.0, 0.0), (0.5, 2.0, 0.5, 0.3), (1.0, 1.0, 1.3, 1.0))]
  assert len(set(float(x) for x in ktos)) == 3
  close(kto_fn(0.7, 1.1, 0.9, 0.2), L.kto_loss(c, r, des, beta=0.7, desirable_weight=1.1, undesirable_weight=0.9,
                                                kl_ref=0.2)[0])
  for args in ((0.1, 0.5, 0.3, 0.0, 1.0), (2.0, 1.0, 0.1, 0.2, 0.0)):
    pair_fn(*args)
  pols = [policy_fn(e, h, k) for e, h, k in ((1e-3, 2e-3, 0.0), (0.2, 0.28, 0.04), (0.05, 4.0, 0.1))]
  assert len(set(float(p[0]) for p in pols)) > 1
  for args in ((0.0, 1.0), (0.1, 0.9)):
    rpp_fn(*args)


def test_family_vmap_over_beta_equals_separate_calls():
  c = jnp.array([-1.0, -2.0, -0.5])
  r = jnp.array([-1.5, -1.0, -2.0])
  des = jnp.array([True, False, True])
  betas = jnp.array([0.1, 0.5, 2.0])
  kto = jax.vmap(lambda b: L.kto_loss(c, r, des, beta=b, kl_ref=0.1)[0])(betas)
  simpo = jax.vmap(lambda b: L.simpo_loss(c, r, beta=b, gamma_beta_ratio=0.5)[0])(betas)
  orpo = jax.vmap(lambda b: L.orpo_loss(c, r, beta=b)[0])(betas)
  for i, b in enumerate([0.1, 0.5, 2.0]):
    close(kto[i], L.kto_loss(c, r, des, beta=b, kl_ref=0.1)[0])
    close(simpo[i], L.simpo_loss(c, r, beta=b, gamma_beta_ratio=0.5)[0])
    close(orpo[i], L.orpo_loss(c, r, beta=b)[0])
  # vmap over a leading batch axis of the policy losses equals separate calls.
  old = -jnp.abs(jnp.arange(12.0).reshape(2, 2, 3) / 10 + 0.1)
  lp = old + 0.05
  mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  adv = jnp.array([1.0, -0.5])
  for fn, kw in ((L.gspo_policy_loss, dict(clip_eps=0.01)), (L.cispo_policy_loss, dict(clip_eps_high=0.01))):
    batched = jax.vmap(lambda a, b: fn(a, b, adv, mask, **kw)[0])(lp, old)
    close(batched, [fn(lp[i], old[i], adv, mask, **kw)[0] for i in range(2)], 1e-6)


# ---------------------------------------------------------------------------------------- shape errors


def test_family_shape_and_dtype_errors_name_function_and_argument():
  x2 = jnp.zeros((2,))
  x3 = jnp.zeros((3,))
  with pytest.raises(ValueError, match=r"kto_loss: argument `ref_logp` has shape \(3,\).*\(2,\)"):
    L.kto_loss(x2, x3, jnp.array([True, False]), beta=0.1)
  with pytest.raises(ValueError, match=r"kto_loss: argument `desirable` has shape \(3,\).*\(2,\)"):
    L.kto_loss(x2, x2, jnp.array([True, False, True]), beta=0.1)
  with pytest.raises(ValueError, match=r"kto_loss: argument `desirable` must be bool"):
    L.kto_loss(x2, x2, jnp.array([1.0, 0.0]), beta=0.1)
  with pytest.raises(ValueError, match=r"kto_loss: argument `kl_ref` must be a scalar"):
    L.kto_loss(x2, x2, jnp.array([True, False]), beta=0.1, kl_ref=x2)
  with pytest.raises(ValueError, match=r"kto_loss: argument `mask` has shape \(3,\)"):
    L.kto_loss(x2, x2, jnp.array([True, False]), beta=0.1, mask=x3)
  with pytest.raises(ValueError, match=r"kto_loss: argument `policy_logp` must be \[B\]"):
    L.kto_loss(jnp.zeros((2, 2)), x2, jnp.array([True, False]), beta=0.1)
  with pytest.raises(ValueError, match=r"simpo_loss: argument `rejected_logp_avg` has shape \(3,\).*\(2,\)"):
    L.simpo_loss(x2, x3, beta=1.0, gamma=0.5)
  with pytest.raises(ValueError, match=r"simpo_loss: argument `chosen_logp_avg` must have a floating dtype"):
    L.simpo_loss(jnp.zeros(2, jnp.int32), x2, beta=1.0, gamma=0.5)
  with pytest.raises(ValueError, match=r"orpo_loss: argument `rejected_logp_avg` has shape \(3,\).*\(2,\)"):
    L.orpo_loss(x2, x3, beta=0.1)
  with pytest.raises(ValueError, match=r"orpo_loss: argument `nll` must be a scalar"):
    L.orpo_loss(x2, x2, beta=0.1, nll=x2)
  a = jnp.zeros((2, 4))
  for fn, kw in ((L.gspo_policy_loss, {}), (L.cispo_policy_loss, dict(clip_eps_high=1.0))):
    name = fn.__name__
    with pytest.raises(ValueError, match=rf"{name}: argument `old_logp` has shape \(2, 3\).*\(2, 4\)"):
      fn(a, jnp.zeros((2, 3)), x2, a, **kw)
    with pytest.raises(ValueError, match=rf"{name}: argument `mask` has shape \(2, 3\).*\(2, 4\)"):
      fn(a, a, x2, jnp.ones((2, 3)), **kw)
    with pytest.raises(ValueError, match=rf"{name}: argument `advantages` has shape \(3,\)"):
      fn(a, a, x3, a, **kw)
    with pytest.raises(ValueError, match=rf"{name}: argument `ref_logp` has shape \(2, 3\)"):
      fn(a, a, x2, a, ref_logp=jnp.zeros((2, 3)), **kw)
    with pytest.raises(ValueError, match=rf"{name}: `aggregation` must be one of"):
      fn(a, a, x2, a, aggregation="mean", **kw)
