"""GRPO and RLOO on the shared rollout machinery: both raise a JAX reward on a tiny model, the
on-policy ratio is exactly 1, groups are contiguous, the advantages are the losses package's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM, init_params, tiny_config
from rlhf_jax.rl import GRPOConfig, GRPOHParams
from rlhf_jax.rl import RLFrozen as PPOFrozen
from rlhf_jax.rl import init_state as init_grpo_state
from rlhf_jax.rl import iteration as grpo_iteration
from rlhf_jax.rl import iteration as rloo_iteration
from rlhf_jax.rl import rollout as grpo_rollout
from rlhf_jax.rl.grpo import group_advantages
from rlhf_jax.training.optim import OptimConfig, make_optimizer

TARGET = 3
MODEL_CFG = tiny_config(vocab_size=16, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                        intermediate_size=64, max_position_embeddings=64)
OPTIM = OptimConfig(learning_rate=1e-3, schedule="constant", b2=0.999, max_grad_norm=1.0)


def target_fraction(prompt_ids, prompt_mask, response_ids, response_mask):
    m = response_mask.astype(jnp.float32)
    return jnp.sum((response_ids == TARGET) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


@pytest.fixture(scope="module")
def parts():
    model = CausalLM(MODEL_CFG)
    params = init_params(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    ids = rng.integers(4, 16, (4, 4)).astype(np.int32)
    mask = np.ones((4, 4), np.int32)
    ids[0, 0], mask[0, 0] = 0, 0
    prompts = {"prompt_ids": jnp.asarray(ids), "prompt_mask": jnp.asarray(mask)}
    frozen = PPOFrozen(ref_params=params, policy_model=model, reward_fn=target_fraction)
    return model, params, prompts, frozen


def _train(parts, cfg, n, iteration):
    model, params, prompts, frozen = parts
    state = init_grpo_state(policy_model=model, policy_params=params,
                            policy_tx=make_optimizer(OPTIM, params, total_steps=1000), cfg=cfg)
    hist = []
    for _ in range(n):
        state, m = iteration(state, frozen, prompts, cfg=cfg)
        hist.append({k: float(v) for k, v in m.items()})
    return state, hist


def test_grpo_raises_reward_with_k3_kl_in_loss(parts):
    cfg = GRPOConfig(batch_size=4, group_size=4, max_new_tokens=8, minibatches=2, use_kl_loss=True, 
                     hparams=GRPOHParams(kl_coef=0.01, lr=5e-3))
    _, hist = _train(parts, cfg, 25, grpo_iteration)
    for h in hist:
        assert h["first_ratio_mean"] == pytest.approx(1.0, abs=1e-6) and h["first_clipfrac"] == 0.0
        assert np.isfinite(h["kl_loss"])
    first = np.mean([h["score"] for h in hist[:3]])
    last = np.mean([h["score"] for h in hist[-3:]])
    assert last > first + 0.3, (first, last)


def test_rloo_raises_reward_with_kl_in_reward(parts):
    cfg = GRPOConfig(batch_size=4, group_size=4, max_new_tokens=8, advantage="rloo", use_kl_loss=False,
                     loss_aggregation="token-mean", hparams=GRPOHParams(kl_coef=0.01, lr=5e-3))
    _, hist = _train(parts, cfg, 25, rloo_iteration)
    first = np.mean([h["score"] for h in hist[:3]])
    last = np.mean([h["score"] for h in hist[-3:]])
    assert last > first + 0.3, (first, last)
    # RLOO's reward is the score minus β·KL (k1, per sequence)
    for h in hist:
        assert h["reward"] == pytest.approx(h["score"] - 0.01 * h["kl"], abs=1e-5)


def test_groups_are_contiguous_and_advantages_match_losses(parts):
    model, params, prompts, frozen = parts
    cfg = GRPOConfig(batch_size=4, group_size=4, max_new_tokens=8, minibatches=2, use_kl_loss=True)
    state = init_grpo_state(policy_model=model, policy_params=params,
                            policy_tx=make_optimizer(OPTIM, params, total_steps=10), cfg=cfg)
    roll = grpo_rollout(state, frozen, prompts, jax.random.PRNGKey(3), cfg=cfg)
    np.testing.assert_array_equal(roll.prompt_ids, np.repeat(np.asarray(prompts["prompt_ids"]), 4, axis=0))
    scores = jnp.arange(16, dtype=jnp.float32) % 5
    adv, _ = group_advantages(scores, losses.kl_estimate(roll.old_logp, roll.ref_logp, mask=roll.response_mask),
                              cfg=cfg, kl_coef=jnp.float32(0.0))
    g = np.asarray(scores).reshape(4, 4)
    expected = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(adv, expected.reshape(-1), rtol=1e-5)
    cfg_r = cfg.replace(advantage="rloo", use_kl_loss=False)
    adv_r, rewards = group_advantages(scores, losses.kl_estimate(roll.old_logp, roll.ref_logp, mask=roll.response_mask),
                                      cfg=cfg_r, kl_coef=jnp.float32(0.0))
    np.testing.assert_allclose(adv_r, losses.rloo_advantages(scores, 4), rtol=1e-6)
    loo = (g.sum(1, keepdims=True) - g) / 3
    np.testing.assert_allclose(adv_r, (g - loo).reshape(-1), rtol=1e-5, atol=1e-6)


def test_grpo_config_errors():
    with pytest.raises(ConfigError, match="group_size"):
        GRPOConfig(group_size=1).validate()
    with pytest.raises(ConfigError, match="minibatches"):
        GRPOConfig(batch_size=3, group_size=3, minibatches=2).validate()
    with pytest.raises(ConfigError, match="loss_aggregation"):
        GRPOConfig(loss_aggregation="mean").validate()
