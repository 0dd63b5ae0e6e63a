"""DAPO's dynamic sampling inside the one compiled GRPO iteration: which groups count as informative,
how later rounds refill the batch (checked against the same samples drawn by hand), that it raises the
reward where most groups teach nothing, and that bad settings are refused naming the key."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax.rl import GRPOConfig, GRPOHParams, GRPOTrainConfig, RLFrozen, core, init_state, iteration
from rlhf_jax.rl import experience as R
from rlhf_jax.rl.trainer import validate_rl_config
from rlhf_jax.training.optim import make_optimizer
from tests.test_grpo import OPTIM, TARGET
from tests.test_grpo import parts  # noqa: F401  (the tiny model fixture)

LIVE = 4  # prompts whose last token is >= LIVE are scored; the others always get 0 (no signal)


def gated_target_fraction(prompt_ids, prompt_mask, response_ids, response_mask):
    """The target-token fraction on live prompts, a constant 0 on dead ones (their groups are uninformative)."""
    m = response_mask.astype(jnp.float32)
    frac = jnp.sum((response_ids == TARGET) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    mean_id = jnp.sum(response_ids * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return jnp.where(prompt_ids[:, -1] >= LIVE, frac + 1e-3 * mean_id, 0.0)


def _prompts(last_tokens):
    rng = np.random.default_rng(3)
    ids = rng.integers(4, 16, (len(last_tokens), 4)).astype(np.int32)
    ids[:, -1] = last_tokens
    return {"prompt_ids": jnp.asarray(ids), "prompt_mask": jnp.ones_like(jnp.asarray(ids))}


def test_informative_groups_by_hand():
    scores = jnp.asarray([1.0, 1.0, 0.0, 0.5, 0.2, 0.2, 0.2, 0.2])
    np.testing.assert_array_equal(core.informative_groups(scores, 2), [False, True, False, False])
    np.testing.assert_array_equal(core.informative_groups(scores, 4), [True, False])


def test_later_rounds_fill_the_free_slots_with_informative_groups(parts):
    model, params, _, _ = parts
    frozen = RLFrozen(ref_params=params, policy_model=model, reward_fn=gated_target_fraction)
    B, G, rounds = 4, 2, 3
    cfg = GRPOConfig(batch_size=B, group_size=G, max_new_tokens=6, dynamic_sampling_rounds=rounds,
                     hparams=GRPOHParams(lr=1e-3))
    # round 0: two live prompts (slots 0-1), round 1: all dead, round 2: all live (fills slots 2-3)
    prompts = _prompts([5, 1, 6, 2] + [1, 2, 3, 1] + [7, 8, 9, 10])
    state = init_state(policy_model=model, policy_params=params, policy_tx=make_optimizer(OPTIM, params, total_steps=100),
                       cfg=cfg)
    rng = jax.random.PRNGKey(7)
    roll, scores, metrics = jax.jit(functools.partial(core.dynamic_rollout, cfg=core.traced(cfg)))(
        state, frozen, prompts, rng)

    # the same samples by hand: round r uses key fold_in(fold_in(rng, 0), r) on its B prompts
    expected_rows, expected_scores, kept = [], [], 0
    for r in range(rounds):
        p_ids = jnp.repeat(prompts["prompt_ids"][r * B:(r + 1) * B], G, axis=0)
        p_mask = jnp.ones_like(p_ids)
        gen = R.sample(model, params, p_ids, p_mask, jax.random.fold_in(jax.random.fold_in(rng, 0), r),
                       cfg=core.traced(cfg))
        s = np.asarray(gated_target_fraction(p_ids, p_mask, gen.tokens, gen.mask))
        for g in range(B):
            rows = slice(g * G, (g + 1) * G)
            if np.ptp(s[rows]) > 1e-6 and kept < B:
                expected_rows.append(np.asarray(gen.tokens[rows]))
                expected_scores.append(s[rows])
                kept += 1
        if kept == B:
            break
    assert kept == B and r == 2
    np.testing.assert_array_equal(np.asarray(roll.response_ids), np.concatenate(expected_rows))
    np.testing.assert_allclose(np.asarray(scores), np.concatenate(expected_scores), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(roll.prompt_ids[:, -1]).reshape(B, G)[:, 0], [5, 6, 7, 8])
    assert float(metrics["dynamic_sampling_rounds"]) == 3.0 and float(metrics["dynamic_sampling_filled"]) == 1.0
    # the forwards ran on the kept rows: the reference is the policy here, so ref_logp == old_logp
    np.testing.assert_allclose(roll.old_logp, roll.ref_logp, atol=1e-6)
    assert np.all(np.asarray(roll.old_logp)[np.asarray(roll.response_mask) > 0] < 0)


def test_dynamic_sampling_trains_where_most_groups_teach_nothing(parts):
    model, params, _, _ = parts
    frozen = RLFrozen(ref_params=params, policy_model=model, reward_fn=gated_target_fraction)
    # 3 of every 4 prompts are dead: without refills, most of each batch has zero advantage
    prompts = _prompts([1, 2, 5, 3, 2, 1, 3, 7, 1, 3, 2, 9])
    cfg = GRPOConfig(batch_size=4, group_size=4, max_new_tokens=8, minibatches=2, use_kl_loss=False,
                     dynamic_sampling_rounds=3, mask_zero_std_groups=True,
                     hparams=GRPOHParams(kl_coef=0.0, lr=5e-3))
    state = init_state(policy_model=model, policy_params=params,
                       policy_tx=make_optimizer(OPTIM, params, total_steps=1000), cfg=cfg)
    hist = []
    for _ in range(20):
        state, m = iteration(state, frozen, prompts, cfg=cfg)
        hist.append({k: float(v) for k, v in m.items()})
    # the first minibatch is on-policy whenever some group is kept (all-masked batches report 0)
    assert all(h["first_ratio_mean"] == pytest.approx(1.0, abs=1e-6) for h in hist if h["dynamic_sampling_filled"])
    assert all(h["dynamic_sampling_rounds"] == 3.0 for h in hist)  # 3 live prompts of 12: never full early
    # early on, every live group (3 of the 4 slots; one per round would be 1 without refills) is kept; late,
    # the policy may answer a live prompt the same way 4 times: that group teaches nothing and is dropped
    assert all(h["dynamic_sampling_filled"] == 0.75 for h in hist[:10])
    first = np.mean([h["score"] for h in hist[:3]])
    last = np.mean([h["score"] for h in hist[-5:]])
    print(f"dynamic sampling: score {first:.3f} -> {last:.3f}")
    assert last > first + 0.2


def test_dynamic_sampling_settings_are_validated():
    with pytest.raises(ConfigError, match=r"grpo\.dynamic_sampling_rounds"):
        GRPOConfig(dynamic_sampling_rounds=0).validate()
    assert GRPOConfig(batch_size=4, dynamic_sampling_rounds=3).prompt_batch_size == 12
    cfg = apply_overrides(GRPOTrainConfig(task="sort"), ["grpo.dynamic_sampling_rounds=2", "reward.kind=python"])
    with pytest.raises(ConfigError, match=r"grpo\.dynamic_sampling_rounds.*python"):
        validate_rl_config(cfg)
    # the split rollout -> host scores -> update path cannot score in between rounds
    with pytest.raises(ConfigError, match="dynamic_sampling_rounds"):
        core._rollout_impl(None, None, {}, None, GRPOConfig(dynamic_sampling_rounds=2))
