"""PPO iteration: ratio exactly 1 at the first update, learning on a JAX reward, the KL penalty,
one compilation across hyper-parameters, jitted == step by step, vmapped seeds == separate runs.

Tiny model (2 layers, d=32, vocab 16), 8 prompts of 4 tokens, 8-token responses. The reward is
the fraction of response tokens equal to TARGET (a JAX function of the token ids).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM, CausalLMWithValueHead, ScalarHeadModel, init_params, split_value_head, tiny_config
from rlhf_jax.rl import (TRACE_COUNTS, PPOConfig, PPOHParams, RLSetup, make_train, stack_hparams, sweep_keys,
                         with_hparams)
from rlhf_jax.rl import RLFrozen as PPOFrozen
from rlhf_jax.rl import init_state as init_ppo_state
from rlhf_jax.rl import iteration as ppo_iteration
from rlhf_jax.rl import rollout as ppo_rollout
from rlhf_jax.rl import update as ppo_update
from rlhf_jax.rl import experience as R
from rlhf_jax.training.optim import OptimConfig, make_optimizer

TARGET = 3


def target_fraction(prompt_ids, prompt_mask, response_ids, response_mask):
    m = response_mask.astype(jnp.float32)
    return jnp.sum((response_ids == TARGET) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


MODEL_CFG = tiny_config(vocab_size=16, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                        intermediate_size=64, max_position_embeddings=64)
OPTIM = OptimConfig(learning_rate=1e-3, schedule="constant", b2=0.999, max_grad_norm=1.0)
CFG = PPOConfig(batch_size=8, max_new_tokens=8, ppo_epochs=2, minibatches=2, hparams=PPOHParams(kl_coef=0.0, lr=3e-3))


@pytest.fixture(scope="module")
def setup():
    pm, vm = CausalLM(MODEL_CFG), ScalarHeadModel(MODEL_CFG)
    pp = init_params(pm, jax.random.PRNGKey(0))
    vp = init_params(vm, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 16, (8, 4)).astype(np.int32)
    mask = np.ones((8, 4), np.int32)
    ids[:3, 0], mask[:3, 0] = 0, 0  # three left-padded prompts
    return RLSetup(frozen=PPOFrozen(ref_params=pp, policy_model=pm, value_model=vm, reward_fn=target_fraction),
                   policy_model=pm, policy_params=pp, policy_tx=make_optimizer(OPTIM, pp, total_steps=1000),
                   value_model=vm, value_params=vp, value_tx=make_optimizer(OPTIM, vp, total_steps=1000),
                   prompts={"prompt_ids": jnp.asarray(ids), "prompt_mask": jnp.asarray(mask)})


def fresh_state(s: RLSetup, hparams=None, rng=0):
    return init_ppo_state(policy_model=s.policy_model, policy_params=s.policy_params, policy_tx=s.policy_tx,
                          value_model=s.value_model, value_params=s.value_params, value_tx=s.value_tx,
                          cfg=CFG if hparams is None else CFG.replace(hparams=hparams), rng=rng)


def run(s: RLSetup, n: int, **hp):
    hparams = with_hparams(CFG, **hp).hparams
    state = fresh_state(s, hparams)
    history = []
    for _ in range(n):
        state, m = ppo_iteration(state, s.frozen, s.prompts, cfg=CFG.replace(hparams=hparams))
        history.append({k: float(v) for k, v in m.items()})
    return state, history


def test_first_minibatch_ratio_is_exactly_one_and_one_compilation(setup):
    before = TRACE_COUNTS["ppo_iteration"]
    # temperature != 1 catches logits not divided by τ in one of the recomputations
    for hp in (dict(temperature=0.7), dict(kl_coef=0.3, lr=1e-3, clip_eps=0.1, temperature=1.3),
               dict(kl_coef=0.05, clip_eps_high=0.28, vf_coef=0.5, lam=0.9)):
        hparams = with_hparams(CFG, **hp).hparams
        state = fresh_state(setup, hparams)
        for _ in range(2):
            state, m = ppo_iteration(state, setup.frozen, setup.prompts, cfg=CFG.replace(hparams=hparams))
            assert float(m["first_ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
            assert float(m["first_ratio_max"]) == pytest.approx(1.0, abs=1e-6)
            assert float(m["first_clipfrac"]) == 0.0
            assert float(m["first_approx_kl"]) < 1e-12
        # later minibatches did move the policy
        assert float(m["ratio_max"]) > 1.0 + 1e-4
    # a config differing only in hyper-parameter values shares the compiled program too
    state, m = ppo_iteration(fresh_state(setup), setup.frozen, setup.prompts,
                             cfg=with_hparams(CFG, kl_coef=0.2, lr=1e-4, clip_eps=0.3))
    assert TRACE_COUNTS["ppo_iteration"] - before <= 1


def test_ppo_raises_reward_and_kl_penalty_controls_drift(setup):
    _, free = run(setup, 20, kl_coef=0.0)
    _, tied = run(setup, 20, kl_coef=5.0)
    first = np.mean([h["score"] for h in free[:3]])
    last = np.mean([h["score"] for h in free[-3:]])
    assert last > first + 0.4, (first, last)
    # β = 0 lets the policy drift far from the reference; a large β keeps the KL near zero
    free_kl = np.mean([h["kl"] for h in free[-3:]])
    tied_kl = np.mean([h["kl"] for h in tied[-10:]])  # k1 per sequence is noisy: average iterations
    assert free_kl > 3.0
    assert abs(tied_kl) < 0.5 and abs(tied_kl) < 0.1 * free_kl, (tied_kl, free_kl)
    for h in free + tied:
        assert np.isfinite(h["value_loss"]) and np.isfinite(h["explained_variance"])
    assert free[0]["kl_coef"] == 0.0 and tied[0]["kl_coef"] == 5.0


def test_jitted_iteration_equals_rollout_then_host_scores_then_update(setup):
    hparams = with_hparams(CFG, kl_coef=0.1, temperature=0.9).hparams
    key = jax.random.PRNGKey(7)
    s1, m1 = ppo_iteration(fresh_state(setup, hparams), setup.frozen, setup.prompts, key, cfg=CFG.replace(hparams=hparams))
    # the same computation in pieces: jitted rollout, the reward on the host (numpy), jitted update
    s2 = fresh_state(setup, hparams)
    roll = ppo_rollout(s2, setup.frozen, setup.prompts, key, cfg=CFG.replace(hparams=hparams))
    resp, mask = np.asarray(roll.response_ids), np.asarray(roll.response_mask)
    host_scores = ((resp == TARGET) * mask).sum(1) / np.maximum(mask.sum(1), 1)
    s2, m2 = ppo_update(s2, setup.frozen, roll, host_scores, key, cfg=CFG.replace(hparams=hparams))
    for k in ("score", "kl", "value_loss", "policy_loss", "clipfrac", "ratio_mean", "explained_variance"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(s1.policy.params), jax.tree_util.tree_leaves(s2.policy.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(s1.value.params), jax.tree_util.tree_leaves(s2.value.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(s1.step) == int(s2.step) == 1


def test_two_seeds_vmapped_equal_two_separate_runs(setup):
    iters = 3
    train = make_train(CFG, setup, num_iterations=iters)
    hparams, seeds = stack_hparams(CFG, {"kl_coef": [0.1]}, num_seeds=2)
    keys = sweep_keys(0, seeds)
    final, hist = jax.jit(jax.vmap(train))(hparams, keys)
    assert hist["score"].shape == (2, iters)
    for run_i in range(2):
        hp = jax.tree_util.tree_map(lambda x: x[run_i], hparams)
        rng = keys[run_i]
        state = fresh_state(setup, hp, rng=rng)
        for it in range(iters):
            k = jax.random.fold_in(rng, it)
            n = setup.prompts["prompt_ids"].shape[0]
            idx = jax.random.choice(jax.random.fold_in(k, 0), n, (CFG.batch_size,), replace=False)
            batch = {name: v[idx] for name, v in setup.prompts.items()}
            state, m = ppo_iteration(state, setup.frozen, batch, jax.random.fold_in(k, 1), cfg=CFG.replace(hparams=hp))
            for name in ("score", "kl", "value_loss", "clipfrac"):
                np.testing.assert_allclose(hist[name][run_i, it], m[name], rtol=1e-4, atol=1e-5, err_msg=name)
        for a, b in zip(jax.tree_util.tree_leaves(final.policy.params), jax.tree_util.tree_leaves(state.policy.params)):
            np.testing.assert_allclose(a[run_i], b, rtol=1e-4, atol=1e-5)
    # the two seeds really are different runs
    assert not np.allclose(hist["kl"][0], hist["kl"][1])


def test_shared_value_head_first_ratio_one_and_learns(setup):
    cfg = with_hparams(CFG.replace(value_model="shared"), vf_coef=0.1)
    model = CausalLMWithValueHead(MODEL_CFG)
    params = init_params(model, jax.random.PRNGKey(3))
    frozen = PPOFrozen(ref_params=split_value_head(params)[0], policy_model=model, reward_fn=target_fraction)
    hparams = with_hparams(cfg, temperature=0.8).hparams
    state = init_ppo_state(policy_model=model, policy_params=params,
                           policy_tx=make_optimizer(OPTIM, params, total_steps=1000), cfg=cfg.replace(hparams=hparams))
    assert state.value is None
    scores = []
    for _ in range(12):
        state, m = ppo_iteration(state, frozen, setup.prompts, cfg=cfg.replace(hparams=hparams))
        assert float(m["first_ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
        assert float(m["first_clipfrac"]) == 0.0
        scores.append(float(m["score"]))
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.15, scores
    # the value head was trained too
    assert not np.allclose(state.policy.params["params"]["value_head"]["kernel"],
                           params["params"]["value_head"]["kernel"])


def test_score_adjustment_missing_eos_penalty_and_clip():
    scores = jnp.asarray([2.0, 0.5, -3.0, 0.1])
    resp = jnp.asarray([[5, 1, 0], [5, 6, 7], [1, 0, 0], [5, 6, 1]])
    mask = jnp.asarray([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])  # row 3's stop token is masked out
    stopped = R.has_stop_token(resp, mask, (1,))
    np.testing.assert_array_equal(stopped, [True, False, True, False])
    out = R.adjust_scores(scores, stopped, missing_eos_penalty=jnp.float32(1.0), score_clip=jnp.float32(1.5),
                          stop_token_ids=(1,))
    np.testing.assert_allclose(out, [1.5, -0.5, -1.5, -0.9], atol=1e-6)
    # without stop tokens configured there is no penalty; inf = no clip
    out = R.adjust_scores(scores, stopped, missing_eos_penalty=jnp.float32(1.0), score_clip=jnp.float32(np.inf),
                          stop_token_ids=())
    np.testing.assert_allclose(out, scores)


def test_reward_model_scores_the_last_real_token():
    model = ScalarHeadModel(MODEL_CFG)
    params = init_params(model, jax.random.PRNGKey(5))
    p_ids = jnp.asarray([[0, 4, 5], [6, 7, 8]])
    p_mask = jnp.asarray([[0, 1, 1], [1, 1, 1]])
    r_ids = jnp.asarray([[9, 1, 0, 0], [10, 11, 12, 13]])
    r_mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]])
    got = R.reward_model_scores(model, params, p_ids, p_mask, r_ids, r_mask)
    ids, mask = R.concat_sequences(p_ids, p_mask, r_ids, r_mask)
    values = model.apply(params, ids, attention_mask=mask)
    np.testing.assert_allclose(got, [values[0, 4], values[1, 6]], rtol=1e-6)  # the stop token / last token


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="minibatches"):
        PPOConfig(batch_size=6, minibatches=4).validate()
    with pytest.raises(ConfigError, match="kl_estimator"):
        PPOConfig(kl_estimator="k4").validate()
    with pytest.raises(ConfigError, match="unknown PPO hyper-parameter"):
        with_hparams(PPOConfig(), beta=0.1)
