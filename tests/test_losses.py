"""Hand-computed cases, invariances, gradients and compile-once checks for rlhf_jax.losses.

Parity with TRL's implementations lives in tests/test_losses_trl.py.
"""

import functools
import math
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jax.test_util

import rlhf_jax.losses as L

jax.config.update("jax_enable_x64", False)


def softplus(x):
  return math.log1p(math.exp(x))


def close(a, b, tol=1e-6):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------- SFT


def test_sft_loss_hand_computed_reductions():
  # Row 0: uniform over 2 tokens (nll log 2), then p(target)=3/4 (nll log 4/3), then padding.
  # Row 1: one token with p(target)=1/4 (nll log 4).
  logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]],
                      [[0.0, math.log(3.0)], [0.0, 0.0], [0.0, 0.0]]])
  targets = jnp.array([[1, 0, 1], [0, 0, 0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  nll = [math.log(2), math.log(4 / 3), math.log(4)]
  loss, m = L.sft_loss(logits, targets, mask)
  close(loss, sum(nll) / 3)
  close(m["num_tokens"], 3)
  close(m["accuracy"], 1 / 3)  # only row 0 step 1 has its target as argmax ([log3, 0] -> 0)
  loss_seq, _ = L.sft_loss(logits, targets, mask, reduction="sequence")
  close(loss_seq, ((nll[0] + nll[1]) / 2 + nll[2]) / 2)
  loss_sum, _ = L.sft_loss(logits, targets, mask, reduction="sum")
  close(loss_sum, sum(nll))
  loss_norm, mn = L.sft_loss(logits, targets, mask, normalizer=10.0)
  close(loss_norm, sum(nll) / 10)
  close(mn["loss_numerator"], sum(nll))
  close(mn["loss_denominator"], 3)


def test_sft_sum_and_count_accumulates_to_global_mean():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 5, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, size=(4, 5)))
  mask = jnp.asarray(rng.integers(0, 2, size=(4, 5)))
  loss_and_grad = jax.jit(jax.value_and_grad(lambda z, t, m, n: L.sft_loss(z, t, m, normalizer=n)[0]))
  full, g_full = jax.jit(jax.value_and_grad(lambda z: L.sft_loss(z, targets, mask)[0]))(logits)
  n_global = jnp.sum(mask)
  micro = [loss_and_grad(logits[i:i + 2], targets[i:i + 2], mask[i:i + 2], n_global) for i in (0, 2)]
  close(sum(l for l, _ in micro), full, 1e-5)
  g_micro = jnp.concatenate([g for _, g in micro])
  close(g_micro, g_full, 1e-6)


def test_sequence_logprobs_with_temperature():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 5, size=(2, 3)))
  mask = jnp.array([[1, 1, 1], [1, 0, 0]])
  out = L.sequence_logprobs(logits, tokens, mask, temperature=0.7)
  ref = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / 0.7, -1)), np.asarray(tokens)[..., None], -1)[..., 0]
  close(out, ref * np.asarray(mask), 1e-6)
  assert out[1, 1] == 0.0 and out[1, 2] == 0.0


# ------------------------------------------------------------------------------------------- reward


def test_bradley_terry_two_pairs_by_hand():
  rc = jnp.array([1.0, 0.0])
  rr = jnp.array([0.0, 1.0])
  loss, m = L.bradley_terry_loss(rc, rr)
  close(loss, (softplus(-1.0) + softplus(1.0)) / 2)
  close(m["accuracy"], 0.5)
  close(m["margin"], 0.0)
  loss, m = L.bradley_terry_loss(rc, rr, margin=jnp.array([0.5, 0.5]), center_coef=0.01)
  close(loss, (softplus(-0.5) + softplus(1.5)) / 2 + 0.01 * (1.0 + 1.0) / 2)
  loss_s, _ = L.bradley_terry_loss(rc, rr, margin=0.5, center_coef=0.01)
  close(loss_s, loss)
  # A padded third pair does not count.
  loss_p, m_p = L.bradley_terry_loss(jnp.array([1.0, 0.0, 9.0]), jnp.array([0.0, 1.0, -9.0]),
                                     mask=jnp.array([1, 1, 0]))
  close(loss_p, (softplus(-1.0) + softplus(1.0)) / 2)
  close(m_p["accuracy"], 0.5)


def test_ranking_loss_by_hand_prompts_weigh_equally():
  # Prompt 0: K=3, ranks 0<1<2, rewards 3,2,1 -> pairs with diffs 1, 2, 1.
  # Prompt 1: K=2 (third slot masked), the preferred response scores lower -> diff -1.
  rewards = jnp.array([[3.0, 2.0, 1.0], [0.0, 1.0, 99.0]])
  ranks = jnp.array([[0, 1, 2], [0, 1, 2]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  loss, m = L.ranking_loss(rewards, ranks, mask)
  p0 = (softplus(-1) + softplus(-2) + softplus(-1)) / 3
  p1 = softplus(1)
  close(loss, (p0 + p1) / 2)
  close(m["accuracy"], (1.0 + 0.0) / 2)
  close(m["num_pairs"], 4)
  # Order of responses within a prompt is irrelevant, only ranks matter.
  perm = jnp.array([2, 0, 1])
  loss_perm, _ = L.ranking_loss(rewards[:, perm], ranks[:, perm], mask[:, perm])
  close(loss_perm, loss)
  # K=2 ranking equals Bradley–Terry on the pair.
  bt, _ = L.bradley_terry_loss(jnp.array([0.3]), jnp.array([1.1]))
  rk, _ = L.ranking_loss(jnp.array([[1.1, 0.3]]), jnp.array([[1, 0]]), jnp.array([[1, 1]]))
  close(rk, bt)


# ----------------------------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
  logp = jnp.array([[math.log(0.5)]])
  ref = jnp.array([[math.log(0.25)]])
  logr = math.log(0.5)
  close(L.kl_estimate(logp, ref, estimator="k1"), [[-logr]])
  close(L.kl_estimate(logp, ref, estimator="k2"), [[0.5 * logr ** 2]])
  close(L.kl_estimate(logp, ref, estimator="k3"), [[math.exp(logr) - 1 - logr]])
  with pytest.raises(ValueError, match="estimator"):
    L.kl_estimate(logp, ref, estimator="k4")


@pytest.mark.parametrize("case,mask,last", [
    ("stop token present", [1, 1, 0, 0], 1),
    ("no stop token", [1, 1, 1, 1], 3),
    ("only the stop token", [1, 0, 0, 0], 0),
])
def test_score_lands_on_last_real_token(case, mask, last):
  logp = jnp.array([[-1.0, -2.0, -3.0, -4.0]])
  ref = jnp.array([[-1.5, -1.0, -3.5, -2.0]])
  mask = jnp.array([mask])
  rewards = L.kl_penalized_rewards(jnp.array([2.0]), logp, ref, mask, kl_coef=0.1, estimator="k1")
  expected = -0.1 * (np.asarray(logp) - np.asarray(ref)) * np.asarray(mask)
  expected[0, last] += 2.0
  close(rewards, expected)
  # The score is not on any other token (e.g. not one position late).
  with_zero_kl = L.kl_penalized_rewards(jnp.array([2.0]), logp, ref, mask, kl_coef=0.0)
  assert int(jnp.argmax(with_zero_kl[0])) == last


def test_score_clip_and_missing_eos_penalty():
  logp = jnp.zeros((3, 2))
  mask = jnp.ones((3, 2))
  r = L.kl_penalized_rewards(jnp.array([5.0, -5.0, 0.5]), logp, logp, mask, kl_coef=0.3, score_clip=1.0)
  close(r[:, 1], [1.0, -1.0, 0.5])
  close(r[:, 0], [0.0, 0.0, 0.0])
  s = L.apply_missing_eos_penalty(jnp.array([1.0, 1.0]), jnp.array([True, False]), 2.5)
  close(s, [1.0, -1.5])


def test_adaptive_kl_controller_by_hand():
  ctrl = L.AdaptiveKLController.create(0.2, target=6.0, horizon=10000)
  # KL far above target: e clipped to +0.2.
  up = ctrl.update(30.0, 512)
  close(up.beta, 0.2 * (1 + 0.2 * 512 / 10000))
  # KL below target: e = 3/6 - 1 = -0.5 -> -0.2.
  down = L.AdaptiveKLController.update(ctrl, 3.0, 512)
  close(down.beta, 0.2 * (1 - 0.2 * 512 / 10000))
  # Inside the band: e = 6.6/6 - 1 = 0.1.
  mid = L.update_kl_controller(ctrl, 6.6, 64)
  close(mid.beta, 0.2 * (1 + 0.1 * 64 / 10000), 1e-6)
  # Two steps compound.
  two = ctrl.update(6.6, 64).update(30.0, 64)
  close(two.beta, 0.2 * (1 + 0.1 * 64 / 10000) * (1 + 0.2 * 64 / 10000), 1e-6)
  # Fixed beta (target None) never moves, as a pytree of arrays of the same structure.
  fixed = L.AdaptiveKLController.create(0.2)
  assert jax.tree_util.tree_structure(fixed) == jax.tree_util.tree_structure(ctrl)
  close(fixed.update(30.0, 512).beta, 0.2)
  assert not bool(fixed.is_adaptive) and bool(ctrl.is_adaptive)
  # Jitted and vmapped over targets (a sweep over the KL target).
  batched = jax.vmap(lambda t: L.AdaptiveKLController.create(0.2, target=t).update(6.6, 64).beta)(
      jnp.array([6.0, jnp.nan, 100.0]))
  close(batched, [0.2 * (1 + 0.1 * 64 / 10000), 0.2, 0.2 * (1 - 0.2 * 64 / 10000)], 1e-6)
  close(jax.jit(lambda c, k: c.update(k, 512))(ctrl, 30.0).beta, up.beta)


# ------------------------------------------------------------------------------------------- GAE


def test_gae_three_step_trajectory_by_hand():
  r = jnp.array([[0.0, 0.0, 1.0]])
  v = jnp.array([[0.5, 0.6, 0.7]])
  g, lam = 0.9, 0.8
  adv, ret = L.gae_advantages(r, v, jnp.ones((1, 3)), gamma=g, lam=lam)
  a2 = 1.0 - 0.7                       # V_T = 0 after the last token
  a1 = (0.0 + g * 0.7 - 0.6) + g * lam * a2
  a0 = (0.0 + g * 0.6 - 0.5) + g * lam * a1
  close(adv, [[a0, a1, a2]])
  close(ret, [[a0 + 0.5, a1 + 0.6, a2 + 0.7]])
  close(adv, [[0.21712, 0.246, 0.3]], 1e-6)
  # γ = λ = 1: the advantage is the reward-to-go minus the value.
  adv1, ret1 = L.gae_advantages(r, v, jnp.ones((1, 3)), gamma=1.0, lam=1.0)
  close(adv1, [[0.5, 0.4, 0.3]])
  close(ret1, [[1.0, 1.0, 1.0]])


def test_gae_padding_invariance_and_terminal_value():
  rng = np.random.default_rng(2)
  r = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  adv, ret = L.gae_advantages(r, v, mask, gamma=0.95, lam=0.9)
  # Values after the last real token are ignored (V_T = 0), garbage there changes nothing.
  v_garbage = v.at[0, 3].set(1e6)
  adv_g, _ = L.gae_advantages(r.at[0, 3].set(jnp.nan), v_garbage, mask, gamma=0.95, lam=0.9)
  close(adv_g, adv)
  assert adv[0, 3] == 0 and ret[0, 3] == 0
  # Inserting padding columns (left, middle, right) with garbage leaves the real tokens' advantages.
  pad = jnp.full((2, 1), 7.0)
  zero = jnp.zeros((2, 1), jnp.int32)
  r2 = jnp.concatenate([pad, r[:, :2], pad, r[:, 2:], pad], 1)
  v2 = jnp.concatenate([pad, v[:, :2], pad, v[:, 2:], pad], 1)
  m2 = jnp.concatenate([zero, mask[:, :2], zero, mask[:, 2:], zero], 1)
  adv2, ret2 = L.gae_advantages(r2, v2, m2, gamma=0.95, lam=0.9)
  keep = np.array([1, 2, 4, 5])
  close(adv2[:, keep], adv, 1e-6)
  close(ret2[:, keep], ret, 1e-6)
  close(adv2[:, [0, 3, 6]], np.zeros((2, 3)))


# ------------------------------------------------------------------------------------------ whitening


def test_masked_statistics_by_hand():
  x = jnp.array([[1.0, 2.0, 100.0], [3.0, 6.0, -50.0]])
  m = jnp.array([[1, 1, 0], [1, 1, 0]])
  close(L.masked_sum(x, m), 12.0)
  close(L.masked_mean(x, m), 3.0)
  close(L.masked_mean(x, m, axis=1), [1.5, 4.5])
  vals = np.array([1.0, 2.0, 3.0, 6.0])
  close(L.masked_var(x, m), vals.var(ddof=1), 1e-6)
  close(L.masked_var(x, m, unbiased=False), vals.var(), 1e-6)
  w = L.masked_whiten(x, m)
  close(w[m > 0], (vals - 3.0) / np.sqrt(vals.var(ddof=1) + 1e-8), 1e-5)
  assert w[0, 2] == 0 and w[1, 2] == 0
  w2 = L.masked_whiten(x, m, shift_mean=False)
  close(w2[m > 0], (vals - 3.0) / np.sqrt(vals.var(ddof=1) + 1e-8) + 3.0, 1e-5)


def test_whitening_with_axis_name_equals_global():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(8, 6)) * 3 + 1, jnp.float32)
  m = jnp.asarray(rng.integers(0, 2, size=(8, 6)))
  xs, ms = x.reshape(4, 2, 6), m.reshape(4, 2, 6)  # 4 "devices" with 2 rows each
  glob = L.masked_whiten(x, m)
  per = jax.vmap(lambda a, b: L.masked_whiten(a, b, axis_name="d"), axis_name="d")(xs, ms)
  close(per.reshape(8, 6), glob, 1e-5)
  # Per-device statistics differ: the test would catch a forgotten axis_name.
  local = jax.vmap(lambda a, b: L.masked_whiten(a, b))(xs, ms)
  assert not np.allclose(local.reshape(8, 6), glob, atol=1e-3)
  v = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  ev = jax.vmap(lambda a, b, c: L.explained_variance(a, b, c, axis_name="d"), axis_name="d")(
      v.reshape(4, 2, 6), xs, ms)
  close(ev, jnp.full((4,), L.explained_variance(v, x, m)), 1e-5)
  mm = jax.vmap(lambda a, b: L.masked_mean(a, b, axis_name="d"), axis_name="d")(xs, ms)
  close(mm, jnp.full((4,), L.masked_mean(x, m)), 1e-6)


_SHARD_MAP_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import rlhf_jax.losses as L
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 5)) * 2 + 1, jnp.float32)
    m = jnp.asarray(rng.integers(0, 2, size=(16, 5)))
    lp = jnp.asarray(-np.abs(rng.normal(size=(16, 5))), jnp.float32)
    old = lp + 0.3 * jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)

    def per_device(x, m, lp, old):
      w = L.masked_whiten(x, m, axis_name="data")
      n = jax.lax.psum(jnp.sum(m), "data")               # global token count: divide once
      loss, _ = L.ppo_policy_loss(lp, old, w, m, normalizer=n)
      return w, jax.lax.psum(loss, "data")[None]

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=(P("data"), P("data"))))
    sh = NamedSharding(mesh, P("data"))
    w, loss = f(*(jax.device_put(a, sh) for a in (x, m, lp, old)))
    gw = L.masked_whiten(x, m)
    gl, _ = L.ppo_policy_loss(lp, old, gw, m)
    np.testing.assert_allclose(np.asarray(w), np.asarray(gw), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(loss), float(gl), rtol=1e-5, atol=1e-5)
    local = jax.jit(jax.shard_map(lambda a, b: L.masked_whiten(a, b), mesh=mesh, in_specs=(P("data"),) * 2,
                                  out_specs=P("data")))(jax.device_put(x, sh), jax.device_put(m, sh))
    assert not np.allclose(np.asarray(local), np.asarray(gw), atol=1e-3)
    print("SHARD_MAP_OK")
""")


def test_whitening_and_divide_once_under_shard_map_on_8_devices():
  """8 fake CPU devices (subprocess): per-device whitening with axis_name equals global whitening, and
  per-device policy losses with the psum'ed token count as normalizer sum to the global loss."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARD_MAP_OK" in out.stdout


def test_integer_rewards_accepted_and_update_alias():
  close(L.grpo_advantages(jnp.array([1, 0, 1, 1]), 2, scale="none"), [0.5, -0.5, 0.0, 0.0])
  close(L.bradley_terry_loss(jnp.array([1, 0]), jnp.array([0, 1]))[0], (softplus(-1.0) + softplus(1.0)) / 2)
  ctrl = L.AdaptiveKLController(beta=0.1, target=6.0, horizon=10000.0)  # plain construction works too
  close(L.update(ctrl, 30.0, 100).beta, 0.1 * (1 + 0.2 * 100 / 10000))
  close(L.AdaptiveKLController(beta=0.1, target=None, horizon=10000.0).update(30.0, 100).beta, 0.1)
  with pytest.raises(ValueError, match="`rewards` must be real-valued"):
    L.rloo_advantages(jnp.zeros(2, jnp.complex64), 2)


def test_explained_variance_by_hand():
  ret = jnp.array([[1.0, 2.0, 3.0, 9.0]])
  m = jnp.array([[1, 1, 1, 0]])
  close(L.explained_variance(ret, ret, m), 1.0)
  close(L.explained_variance(jnp.full((1, 4), 2.0), ret, m), 0.0, 1e-6)
  # residual [1, 0, -1] var 2/3 over var(R) 2/3 -> 0; residual [0.5,0,-0.5] var 1/6 -> 0.75
  close(L.explained_variance(jnp.array([[1.5, 2.0, 2.5, 0.0]]), ret, m), 0.75, 1e-6)


# ------------------------------------------------------------------------------------------- PPO


def test_ppo_clip_switches_on_exactly_at_one_plus_minus_eps():
  # Choose ε from the float32 ratio itself so that ρ = 1 + ε holds exactly in float32.
  logp = jnp.array([[0.2]], jnp.float32)
  rho = jnp.exp(logp - 0.0)
  eps_hi = rho - 1.0
  adv = jnp.array([[1.0]])
  m = jnp.ones((1, 1))
  loss, met = L.ppo_policy_loss(logp, jnp.zeros((1, 1)), adv, m, clip_eps=eps_hi)
  close(met["clipfrac"], 0.0)  # at the boundary: not clipped, gradient flows
  g = jax.grad(lambda lp: L.ppo_policy_loss(lp, jnp.zeros((1, 1)), adv, m, clip_eps=eps_hi)[0])(logp)
  close(g, -rho, 1e-6)
  # One float32 ulp lower bound: 1 + ε is now the float just below ρ (x - 1 is exact for x in [1, 2)).
  eps_below = jnp.nextafter(rho, jnp.float32(0.0)) - 1.0
  loss_c, met_c = L.ppo_policy_loss(logp, jnp.zeros((1, 1)), adv, m, clip_eps=eps_below)
  close(met_c["clipfrac"], 1.0)
  g_c = jax.grad(lambda lp: L.ppo_policy_loss(lp, jnp.zeros((1, 1)), adv, m, clip_eps=eps_below)[0])(logp)
  close(g_c, 0.0)
  close(loss_c, -(1.0 + eps_below))
  # Lower side: ρ = 1 - ε with A < 0.
  logp_lo = jnp.array([[-0.3]], jnp.float32)
  rho_lo = jnp.exp(logp_lo)
  eps_lo = 1.0 - rho_lo
  neg = -adv
  _, met_lo = L.ppo_policy_loss(logp_lo, jnp.zeros((1, 1)), neg, m, clip_eps=eps_lo, clip_eps_high=0.5)
  close(met_lo["clipfrac"], 0.0)
  _, met_lo2 = L.ppo_policy_loss(logp_lo, jnp.zeros((1, 1)), neg, m,
                                 clip_eps=1.0 - jnp.nextafter(rho_lo, jnp.float32(2.0)), clip_eps_high=0.5)
  close(met_lo2["clipfrac"], 1.0)
  # Clipping on the side where it does not bind (A > 0, ρ < 1 - ε) is not clipping.
  _, met_other = L.ppo_policy_loss(logp_lo, jnp.zeros((1, 1)), adv, m, clip_eps=0.01)
  close(met_other["clipfrac"], 0.0)


def test_ppo_policy_loss_by_hand_and_metrics():
  lp_diff = np.log(np.array([[1.5, 0.5, 1.1, 2.0]], np.float32))
  adv = jnp.array([[1.0, -2.0, 3.0, 5.0]])
  m = jnp.array([[1, 1, 1, 0]])
  loss, met = L.ppo_policy_loss(jnp.asarray(lp_diff), jnp.zeros((1, 4)), adv, m, clip_eps=0.2)
  # token 0: A>0, ρ=1.5 -> clipped 1.2 -> -1.2; token 1: A<0, ρ=0.5 -> max(1, 2*0.8=1.6) = 1.6;
  # token 2: ρ=1.1 inside -> -3.3.
  close(loss, (-1.2 + 1.6 - 3.3) / 3, 1e-6)
  close(met["clipfrac"], 2 / 3, 1e-6)
  close(met["ratio_mean"], (1.5 + 0.5 + 1.1) / 3, 1e-6)
  close(met["ratio_max"], 1.5, 1e-6)
  close(met["approx_kl"], 0.5 * np.mean(lp_diff[0, :3] ** 2), 1e-6)
  # Asymmetric clip: ε_high = 0.6 frees token 0.
  loss_a, _ = L.ppo_policy_loss(jnp.asarray(lp_diff), jnp.zeros((1, 4)), adv, m, clip_eps=0.2, clip_eps_high=0.6)
  close(loss_a, (-1.5 + 1.6 - 3.3) / 3, 1e-6)
  # Dual clip c=3 bounds the A<0 token with ρ large: ρ=10, A=-1 -> min(max(10, 1.2), 3) = 3.
  loss_d, met_d = L.ppo_policy_loss(jnp.log(jnp.array([[10.0]])), jnp.zeros((1, 1)), jnp.array([[-1.0]]),
                                    jnp.ones((1, 1)), dual_clip=3.0)
  close(loss_d, 3.0, 1e-5)
  close(met_d["dual_clipfrac"], 1.0)
  loss_nd, _ = L.ppo_policy_loss(jnp.log(jnp.array([[10.0]])), jnp.zeros((1, 1)), jnp.array([[-1.0]]),
                                 jnp.ones((1, 1)))
  close(loss_nd, 10.0, 1e-5)
  # Sequence-level advantages [B] broadcast over tokens.
  loss_b, _ = L.ppo_policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([1.0, -1.0]),
                                jnp.array([[1, 1, 1], [1, 0, 0]]), reduction="sequence")
  close(loss_b, 0.0)


def test_ppo_value_loss_by_hand():
  v = jnp.array([[1.0, 0.6, 5.0]])
  v_old = jnp.array([[0.5, 0.5, 0.0]])
  ret = jnp.array([[2.0, 0.0, 0.0]])
  m = jnp.array([[1, 1, 0]])
  loss, met = L.ppo_value_loss(v, v_old, ret, m, clip_eps=0.2)
  # token 0: clip(1.0) = 0.7 -> max(1, 1.69) = 1.69; token 1: inside -> 0.36.
  close(loss, 0.5 * (1.69 + 0.36) / 2, 1e-6)
  close(met["vf_clipfrac"], 0.5)


def test_entropy_from_logits():
  logits = jnp.zeros((2, 3, 8)).at[1, 2].set(jnp.array([100.0] + [0.0] * 7))
  m = jnp.array([[1, 1, 1], [1, 1, 0]])
  close(L.entropy_from_logits(logits, m), math.log(8), 1e-6)
  per = L.entropy_from_logits(logits, m, reduction="none")
  close(per, np.array([[1, 1, 1], [1, 1, 0]]) * math.log(8), 1e-6)
  p = np.array([0.5, 0.25, 0.25])
  close(L.entropy_from_logits(jnp.log(jnp.asarray(p))[None, None], jnp.ones((1, 1))), -(p * np.log(p)).sum(), 1e-6)


# ------------------------------------------------------------------------------------ GRPO / RLOO


def test_grpo_and_rloo_advantages_by_hand():
  r = jnp.array([1.0, 2.0, 3.0, 4.0])
  close(L.grpo_advantages(r, 2), np.array([-0.5, 0.5, -0.5, 0.5]) / (math.sqrt(0.5) + 1e-4), 1e-6)
  close(L.grpo_advantages(r, 2, scale="batch"), np.array([-0.5, 0.5, -0.5, 0.5]) / (math.sqrt(5 / 3) + 1e-4), 1e-6)
  close(L.grpo_advantages(r, 2, scale="none"), [-0.5, 0.5, -0.5, 0.5])
  close(L.grpo_advantages(jnp.array([1.0, 1.0]), 2), [0.0, 0.0])
  close(L.rloo_advantages(jnp.array([1.0, 2.0, 3.0]), 3), [1 - 2.5, 2 - 2.0, 3 - 1.5])
  close(L.rloo_advantages(r, 2), [-1.0, 1.0, -1.0, 1.0])
  with pytest.raises(ValueError, match="group_size=3"):
    L.grpo_advantages(r, 3)


def test_grpo_policy_loss_aggregations_by_hand():
  # On-policy (ρ = 1): per-token loss is -A (+ β k3).
  adv = jnp.array([1.0, -2.0])
  m = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  z = jnp.zeros((2, 4))
  l_seq, _ = L.grpo_policy_loss(z, z, adv, m)
  close(l_seq, (-1.0 + 2.0) / 2)
  l_tok, _ = L.grpo_policy_loss(z, z, adv, m, aggregation="token-mean")
  close(l_tok, (-3.0 + 2.0) / 4)
  l_dr, _ = L.grpo_policy_loss(z, z, adv, m, aggregation="dr-grpo")
  close(l_dr, (-3.0 + 2.0) / (2 * 4))
  l_dr8, _ = L.grpo_policy_loss(z, z, adv, m, aggregation="dr-grpo", max_len=8)
  close(l_dr8, (-3.0 + 2.0) / (2 * 8))
  ref = jnp.full((2, 4), math.log(0.5))
  l_kl, met = L.grpo_policy_loss(z, z, adv, m, ref_logp=ref, kl_coef=0.1, aggregation="token-mean")
  k3 = 0.5 - 1 - math.log(0.5)
  close(l_kl, (-3.0 + 2.0) / 4 + 0.1 * k3, 1e-6)
  close(met["kl"], k3, 1e-6)


# -------------------------------------------------------------------------------------------- DPO


def test_dpo_variants_by_hand():
  pc, pr, rc, rr = (jnp.array([x]) for x in (-1.0, -3.0, -1.5, -2.0))
  beta = 0.5
  d = (-1.0 + 1.5) - (-3.0 + 2.0)  # 1.5
  loss, met = L.dpo_loss(pc, pr, rc, rr, beta=beta)
  close(loss, softplus(-beta * d), 1e-6)
  close(met["chosen_reward"], beta * 0.5)
  close(met["rejected_reward"], beta * -1.0)
  close(met["reward_margin"], beta * d)
  close(met["reward_accuracy"], 1.0)
  close(L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")[0], max(0.0, 1 - beta * d))
  close(L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_len=jnp.array([2]),
                   rejected_len=jnp.array([4]))[0], (0.5 / 2 - (-1.0) / 4 - 1 / (2 * beta)) ** 2, 1e-6)
  eps = 0.1
  # the spec's robust/cDPO: -(1-e) log s(bD) - e log s(-bD), optionally / (1-2e)
  close(L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)[0],
        (1 - eps) * softplus(-beta * d) + eps * softplus(beta * d), 1e-6)
  close(L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps, robust_normalize=True)[0],
        ((1 - eps) * softplus(-beta * d) + eps * softplus(beta * d)) / (1 - 2 * eps), 1e-6)
  # Chowdhury et al.'s rDPO (TRL's "robust"): the eps term has the opposite sign
  close(L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="rdpo", label_smoothing=eps)[0],
        ((1 - eps) * softplus(-beta * d) - eps * softplus(beta * d)) / (1 - 2 * eps), 1e-6)
  close(L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=eps)[0],
        (1 - eps) * softplus(-beta * d) + eps * softplus(beta * d), 1e-6)
  close(L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")[0], (0.5 - (-1.0) - 1 / (2 * beta)) ** 2, 1e-6)
  with pytest.raises(ValueError, match="chosen_len"):
    L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_len=jnp.array([2]))
  with pytest.raises(ValueError, match="label_smoothing"):
    L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=0.5)


# --------------------------------------------------------------------------------- mask invariance


def _pad(x, n, value):
  """Append n columns of `value` on axis 1 (and keep trailing axes)."""
  x = jnp.asarray(x)
  shape = list(x.shape)
  shape[1] = n
  return jnp.concatenate([x, jnp.full(shape, value, x.dtype)], axis=1)


def test_padding_never_changes_a_loss_or_advantage():
  rng = np.random.default_rng(4)
  B, T, V = 3, 5, 6
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  logits, logp, old, ref, adv, vals, vold, ret = f(B, T, V), f(B, T), f(B, T), f(B, T), f(B, T), f(B, T), f(B, T), f(B, T)
  logp, old, ref = -jnp.abs(logp), -jnp.abs(old), -jnp.abs(ref)
  targets = jnp.asarray(rng.integers(0, V, size=(B, T)))
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
  P = 4
  pm = _pad(mask, P, 0)
  garbage = 123.0  # padding content must never matter

  def both(fn, *arrays, **kw):
    fn = functools.partial(fn, **kw)
    a = fn(*arrays, mask)
    b = fn(*(_pad(x, P, garbage) for x in arrays), pm)
    return a, b

  def same(a, b):
    a0 = a[0] if isinstance(a, tuple) else a
    b0 = b[0] if isinstance(b, tuple) else b
    close(a0, b0, 1e-5)
    if isinstance(a, tuple) and isinstance(a[1], dict):
      for k in a[1]:
        if k == "loss_denominator":
          continue  # dr-grpo's denominator counts T_max by design
        close(a[1][k], b[1][k], 1e-5)

  for red in ("token", "sequence", "sum"):
    same(*both(L.sft_loss, logits, targets, reduction=red))
  for red in ("token", "sequence"):
    same(*both(L.ppo_policy_loss, logp, old, adv, reduction=red, dual_clip=3.0))
    same(*both(L.ppo_value_loss, vals, vold, ret, reduction=red))
  for agg in ("seq-mean-token-mean", "token-mean"):
    a = L.grpo_policy_loss(logp, old, adv[:, 0], mask, ref_logp=ref, kl_coef=0.05, aggregation=agg)
    b = L.grpo_policy_loss(_pad(logp, P, garbage), _pad(old, P, garbage), adv[:, 0], pm,
                           ref_logp=_pad(ref, P, garbage), kl_coef=0.05, aggregation=agg)
    same(a, b)
  # Dr.GRPO divides by B·T_max: with T_max fixed it is padding invariant too.
  a = L.grpo_policy_loss(logp, old, adv[:, 0], mask, aggregation="dr-grpo", max_len=16)
  b = L.grpo_policy_loss(_pad(logp, P, garbage), _pad(old, P, garbage), adv[:, 0], pm, aggregation="dr-grpo",
                         max_len=16)
  same(a, b)
  a, b = both(L.entropy_from_logits, logits)
  same(a, b)
  a, b = both(L.sequence_logprobs, logits, targets, temperature=0.8)
  close(b[:, :T], a, 1e-6)
  a, b = both(L.gae_advantages, vals, ret, gamma=0.9, lam=0.95)
  close(b[0][:, :T], a[0], 1e-5)
  close(b[1][:, :T], a[1], 1e-5)
  a, b = both(L.masked_whiten, adv)
  close(b[:, :T], a, 1e-5)
  a = L.kl_penalized_rewards(ret[:, 0], logp, ref, mask, kl_coef=0.1, estimator="k3", score_clip=2.0)
  b = L.kl_penalized_rewards(ret[:, 0], _pad(logp, P, garbage), _pad(ref, P, garbage), pm, kl_coef=0.1,
                             estimator="k3", score_clip=2.0)
  close(b[:, :T], a, 1e-6)
  close(b[:, T:], np.zeros((B, P)))
  close(L.explained_variance(vals, ret, mask), L.explained_variance(_pad(vals, P, garbage), _pad(ret, P, 9.0), pm),
        1e-5)
  # Padded responses in a ranking, padded pairs in BT/DPO.
  rw = f(2, 3)
  rk = jnp.array([[0, 1, 2], [1, 0, 2]])
  rm = jnp.array([[1, 1, 0], [1, 1, 1]])
  same(L.ranking_loss(rw, rk, rm), L.ranking_loss(_pad(rw, 2, garbage), _pad(rk, 2, 0), _pad(rm, 2, 0)))
  # NaN in padding stays out of forward values and gradients.
  nan_logp = _pad(logp, P, jnp.nan)
  loss_nan, _ = L.ppo_policy_loss(nan_logp, _pad(old, P, jnp.nan), _pad(adv, P, jnp.nan), pm)
  assert np.isfinite(loss_nan)
  g = jax.grad(lambda x: L.ppo_policy_loss(x, _pad(old, P, jnp.nan), _pad(adv, P, jnp.nan), pm)[0])(nan_logp)
  assert np.all(np.isfinite(g))
  nan_logits = _pad(logits, P, jnp.nan)
  nan_targets = _pad(targets, P, 0)
  grads = [
      jax.grad(lambda z: L.sft_loss(z, nan_targets, pm)[0])(nan_logits),
      jax.grad(lambda z: L.sequence_logprobs(z, nan_targets, pm).sum())(nan_logits),
      jax.grad(lambda z: L.entropy_from_logits(z, pm))(nan_logits),
      jax.grad(lambda x: L.kl_estimate(x, _pad(ref, P, jnp.nan), estimator="k3", mask=pm).sum())(nan_logp),
      jax.grad(lambda x: L.grpo_policy_loss(x, _pad(old, P, jnp.nan), adv[:, 0], pm, ref_logp=_pad(ref, P, jnp.nan),
                                            kl_coef=0.1)[0])(nan_logp),
      jax.grad(lambda x: L.gae_advantages(x, _pad(vals, P, jnp.nan), pm)[0].sum())(_pad(ret, P, jnp.nan)),
      jax.grad(lambda x: L.masked_whiten(x, pm).sum())(_pad(adv, P, jnp.nan)),
  ]
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g))), g


# ------------------------------------------------------------------------------ gradients (check_grads)


def test_check_grads_on_hand_written_losses():
  rng = np.random.default_rng(5)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  kw = dict(modes=["rev"], order=1, atol=5e-2, rtol=5e-2, eps=1e-3)

  def check_grads(fn, args, **kw):  # jit first: numerical differencing evaluates fn many times
    return jax.test_util.check_grads(jax.jit(fn), args, **kw)

  logits = f(2, 4, 5)
  targets = jnp.asarray(rng.integers(0, 5, size=(2, 4)))
  check_grads(lambda z: L.sft_loss(z, targets, mask)[0], (logits,), **kw)
  check_grads(lambda z: L.sft_loss(z, targets, mask, reduction="sequence")[0], (logits,), **kw)
  check_grads(lambda z: L.entropy_from_logits(z, mask), (logits,), **kw)
  check_grads(lambda z: L.sequence_logprobs(z, targets, mask, temperature=0.7).sum(), (logits,), **kw)
  check_grads(lambda a, b: L.bradley_terry_loss(a, b, margin=0.3, center_coef=0.01)[0], (f(3), f(3)), **kw)
  check_grads(lambda r: L.ranking_loss(r, jnp.array([[0, 2, 1]]), jnp.ones((1, 3)))[0], (f(1, 3),), **kw)
  for lt in ("sigmoid", "hinge", "ipo", "robust"):
    check_grads(lambda a, b: L.dpo_loss(a, b, jnp.zeros(3), jnp.zeros(3), beta=0.7, loss_type=lt,
                                        label_smoothing=0.1 if lt == "robust" else 0.0,
                                        chosen_len=jnp.array([2, 3, 4]), rejected_len=jnp.array([1, 5, 2]))[0],
                (f(3) * 0.3, f(3) * 0.3), **kw)
  # PPO policy loss away from the clip kinks (ratios well inside / outside the band).
  lp = jnp.log(jnp.array([[1.05, 0.95, 1.5, 1.0], [0.5, 1.1, 1.0, 1.0]]))
  adv = jnp.array([[1.0, -1.0, 2.0, 0.0], [-3.0, 0.5, 0.0, 0.0]])
  check_grads(lambda x: L.ppo_policy_loss(x, jnp.zeros((2, 4)), adv, mask, clip_eps=0.2)[0], (lp,), **kw)
  v = jnp.array([[0.1, 0.5, 2.0, 0.0], [-1.0, 0.2, 0.0, 0.0]])
  check_grads(lambda x: L.ppo_value_loss(x, jnp.zeros((2, 4)), jnp.ones((2, 4)), mask)[0], (v,), **kw)
  check_grads(lambda r, vv: sum(jnp.sum(o) for o in L.gae_advantages(r, vv, mask, gamma=0.9, lam=0.8)),
              (f(2, 4), f(2, 4)), **kw)
  check_grads(lambda x: jnp.sum(L.masked_whiten(x, mask) * jnp.arange(8.0).reshape(2, 4)), (f(2, 4),), **kw)
  check_grads(lambda x: jnp.sum(L.kl_penalized_rewards(jnp.ones(2), x, jnp.zeros((2, 4)), mask, kl_coef=0.2,
                                                       estimator="k3") ** 2), (f(2, 4) * 0.3,), **kw)


def test_gae_gradient_matches_hand_derivative():
  # dA_0/dr_t = (γλ)^t on a full row, dA_0/dV_0 = -1 + ... (linear map): check the reward part exactly.
  r = jnp.zeros((1, 3))
  v = jnp.zeros((1, 3))
  g = jax.grad(lambda x: L.gae_advantages(x, v, jnp.ones((1, 3)), gamma=0.9, lam=0.5)[0][0, 0])(r)
  close(g, [[1.0, 0.45, 0.45 ** 2]], 1e-6)


# --------------------------------------------------------------------------- jit / vmap / no recompile


def test_hyperparameters_are_traced_no_recompilation():
  rng = np.random.default_rng(6)
  logp = -jnp.abs(jnp.asarray(rng.normal(size=(2, 4)), jnp.float32))
  ref = -jnp.abs(jnp.asarray(rng.normal(size=(2, 4)), jnp.float32))
  mask = jnp.ones((2, 4))
  scores = jnp.array([1.0, -1.0])

  @jax.jit
  @chex.assert_max_traces(n=1)
  def rewards_fn(kl_coef, score_clip):
    return L.kl_penalized_rewards(scores, logp, ref, mask, kl_coef=kl_coef, score_clip=score_clip)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def policy_fn(clip_eps, clip_high, dual):
    return L.ppo_policy_loss(logp, ref, ref, mask, clip_eps=clip_eps, clip_eps_high=clip_high, dual_clip=dual)[0]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def dpo_fn(beta, ls):
    return L.dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta=beta, loss_type="robust",
                      label_smoothing=ls)[0]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def misc_fn(gamma, lam, margin, center, vclip, temp):
    a, _ = L.gae_advantages(logp, ref, mask, gamma=gamma, lam=lam)
    bt = L.bradley_terry_loss(scores, -scores, margin=margin, center_coef=center)[0]
    vl = L.ppo_value_loss(logp, ref, ref, mask, clip_eps=vclip)[0]
    sl = L.sequence_logprobs(jnp.ones((2, 4, 3)), jnp.zeros((2, 4), jnp.int32), mask, temperature=temp)
    return a, bt, vl, sl

  outs = [rewards_fn(k, c) for k, c in ((0.1, 1.0), (0.05, 2.0), (0.2, 0.5))]
  assert not np.allclose(outs[0], outs[1])
  close(rewards_fn(0.3, 10.0), L.kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.3, score_clip=10.0))
  pols = [policy_fn(e, h, d) for e, h, d in ((0.2, 0.28, 3.0), (0.1, 0.1, 2.0), (0.3, 0.3, 5.0))]
  assert len(set(float(p) for p in pols)) > 1
  dpos = [dpo_fn(b, s) for b, s in ((0.1, 0.0), (0.5, 0.1), (1.0, 0.2))]
  assert len(set(float(p) for p in dpos)) == 3
  for args in ((1.0, 0.95, 0.0, 0.0, 0.2, 1.0), (0.9, 0.5, 0.3, 0.01, 0.1, 0.7)):
    misc_fn(*args)
  # The KL controller update compiles once too.
  upd = jax.jit(chex.assert_max_traces(lambda c, kl, n: c.update(kl, n), n=1))
  ctrl = L.AdaptiveKLController.create(0.1, target=6.0)
  for kl in (1.0, 7.0, 30.0):
    ctrl = upd(ctrl, kl, 64)
  assert float(ctrl.beta) != 0.1


def test_vmap_over_hyperparameters_and_batch():
  logp = jnp.array([[-1.0, -2.0, -0.5]])
  ref = jnp.array([[-1.5, -1.0, -0.5]])
  mask = jnp.array([[1, 1, 0]])
  betas = jnp.array([0.0, 0.1, 0.5])
  out = jax.vmap(lambda b: L.kl_penalized_rewards(jnp.array([1.0]), logp, ref, mask, kl_coef=b))(betas)
  for i, b in enumerate([0.0, 0.1, 0.5]):
    close(out[i], L.kl_penalized_rewards(jnp.array([1.0]), logp, ref, mask, kl_coef=b))
  # vmap over an extra leading batch axis equals separate calls.
  x = jnp.stack([logp, ref])
  losses = jax.vmap(lambda a: L.ppo_policy_loss(a, ref, jnp.ones((1, 3)), mask)[0])(x)
  close(losses, [L.ppo_policy_loss(logp, ref, jnp.ones((1, 3)), mask)[0],
                 L.ppo_policy_loss(ref, ref, jnp.ones((1, 3)), mask)[0]])


# --------------------------------------------------------------------------------- argument checks


def test_shape_and_dtype_errors_name_the_argument_and_shapes():
  with pytest.raises(ValueError, match=r"`old_logp` has shape \(2, 3\).*\(2, 4\)"):
    L.ppo_policy_loss(jnp.zeros((2, 4)), jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"`mask` has shape \(2, 3\).*\(2, 4\)"):
    L.gae_advantages(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"`targets` must have an integer dtype"):
    L.sft_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2)), jnp.ones((1, 2)))
  with pytest.raises(ValueError, match=r"`targets` has shape \(1, 3\)"):
    L.sft_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 2)))
  with pytest.raises(ValueError, match=r"`logp` must have a floating dtype"):
    L.kl_estimate(jnp.zeros((2,), jnp.int32), jnp.zeros((2,)))
  with pytest.raises(ValueError, match=r"`rejected_rewards` has shape \(3,\).*\(2,\)"):
    L.bradley_terry_loss(jnp.zeros(2), jnp.zeros(3))
  with pytest.raises(ValueError, match=r"`scores` has shape \(3,\).*\(2,\)"):
    L.kl_penalized_rewards(jnp.zeros(3), jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.ones((2, 4)), kl_coef=0.1)
  with pytest.raises(ValueError, match=r"`ref_rejected_logp` has shape"):
    L.dpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(3), beta=0.1)
  with pytest.raises(ValueError, match=r"`advantages` has shape \(3,\)"):
    L.ppo_policy_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.zeros(3), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="reduction"):
    L.sft_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), reduction="mean")
  with pytest.raises(ValueError, match=r"`ranks` must have an integer dtype"):
    L.ranking_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)))
