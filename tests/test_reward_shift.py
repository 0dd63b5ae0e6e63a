"""The reward model's normalisation shift is applied with the sign train_reward records.

train_reward stores ``shift = -mean score`` of reference responses and documents
``reward = model_score + shift`` (docs/MATH.md §2.4); PPO must score rollouts the same way, so the
SFT policy's responses score mean 0 during RL.
"""
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import ScalarHeadModel, init_params, tiny_config
from rlhf_jax.rl import RLFrozen as PPOFrozen
from rlhf_jax.rl.experience import Rollout, reward_model_scores, score_rollout


def test_ppo_scores_add_the_recorded_shift():
    cfg = tiny_config(vocab_size=32, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      intermediate_size=64)
    rm = ScalarHeadModel(cfg)
    params = init_params(rm, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    B, P, N = 4, 3, 5
    prompt_ids = jnp.asarray(rng.integers(3, 32, (B, P)), jnp.int32)
    prompt_mask = jnp.ones((B, P), jnp.int32)
    response_ids = jnp.asarray(rng.integers(3, 32, (B, N)), jnp.int32)
    response_mask = jnp.asarray([[1] * N, [1, 1, 0, 0, 0], [1] * 3 + [0] * 2, [1, 0, 0, 0, 0]], jnp.int32)
    zeros = jnp.zeros((B, N), jnp.float32)
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, zeros, zeros, zeros, zeros)
    raw = reward_model_scores(rm, params, prompt_ids, prompt_mask, response_ids, response_mask)
    shift = -float(jnp.mean(raw))  # what train_reward records for these "reference" responses
    assert abs(shift) > 1e-3  # otherwise adding and subtracting it would look alike
    frozen = PPOFrozen(ref_params=None, reward_params=params, reward_shift=shift, reward_model=rm)
    scores = score_rollout(frozen, rollout, chunk=B)
    np.testing.assert_allclose(scores, raw + shift, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(jnp.mean(scores)), 0.0, atol=1e-5)
