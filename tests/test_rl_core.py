"""The RL core's contract: an algorithm is a config class with four pieces; the KL is computed once per
iteration; sample rows come out of the fused iteration; hyper-parameters are defined once and traced;
the learning rate scales the update (the optimiser state is never rewritten); equal optimisers share
one compiled program without a cache."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from rlhf_jax import losses
from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax.models import CausalLM, CausalLMWithValueHead, init_params
from rlhf_jax.rl import (TRACE_COUNTS, PPOConfig, PPOHParams, PPOTrainConfig, RLFrozen, init_state, iteration,
                         with_hparams)
from rlhf_jax.rl.core import ReadsHParams, traced_hparams
from rlhf_jax.training.optim import OptimConfig, get_hyperparam, make_optimizer

from tests.test_grpo import MODEL_CFG, OPTIM, target_fraction


# ---- a new algorithm in a few lines: REINFORCE with the batch-mean baseline -------------------

@struct.dataclass
class ReinforceHParams:
    lr: float = 5e-3
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float = 0.0
    score_clip: float | None = None

    def traced(self):
        return traced_hparams(self, score_clip=math.inf)


@struct.dataclass
class ReinforceConfig(ReadsHParams):
    batch_size: int = struct.field(pytree_node=False, default=8)
    max_new_tokens: int = struct.field(pytree_node=False, default=8)
    hparams: ReinforceHParams = ReinforceHParams()

    name = "reinforce"
    group_size = 1
    epochs = 1
    minibatches = 1
    top_k = 0
    stop_token_ids = ()
    pad_token_id = 0
    kl_estimator = "k1"
    value_mode = None
    uses_ref = False

    @property
    def minibatch_size(self):
        return self.batch_size

    def validate(self):
        return self

    def init_algo_state(self):
        return None

    def next_algo_state(self, algo_state, metrics):
        return None

    def advantages(self, algo_state, rollout, scores, kl_tok):
        return {"advantages": scores - jnp.mean(scores)}, {}

    def minibatch_loss(self, out, values, batch):
        mask = batch["response_mask"]
        seq_logp = jnp.sum(out["logp"] * mask, axis=1)
        return -jnp.mean(seq_logp * batch["advantages"]), {}


@pytest.fixture(scope="module")
def parts():
    model = CausalLM(MODEL_CFG)
    params = init_params(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompts = {"prompt_ids": jnp.asarray(rng.integers(4, 16, (8, 4)), jnp.int32),
               "prompt_mask": jnp.ones((8, 4), jnp.int32)}
    return model, params, prompts, RLFrozen(ref_params=params, policy_model=model, reward_fn=target_fraction)


def test_a_new_algorithm_is_a_config_class_and_learns(parts):
    model, params, prompts, frozen = parts
    cfg = ReinforceConfig()
    state = init_state(policy_model=model, policy_params=params,
                       policy_tx=make_optimizer(OPTIM, params, total_steps=100), cfg=cfg)
    scores = []
    for _ in range(20):
        state, m = iteration(state, frozen, prompts, cfg=cfg)
        scores.append(float(m["score"]))
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.2, scores
    assert TRACE_COUNTS["reinforce_iteration"] == 1


def test_ppo_iteration_computes_the_kl_once_and_returns_its_samples(parts, monkeypatch):
    _, params, prompts, _ = parts
    calls = []
    real = losses.kl_estimate

    def counting(*a, **k):
        calls.append(k.get("estimator"))
        return real(*a, **k)

    monkeypatch.setattr(losses, "kl_estimate", counting)
    cfg = PPOConfig(batch_size=8, max_new_tokens=8, ppo_epochs=1, minibatches=1, value_model="shared",
                    hparams=PPOHParams(kl_coef=0.1, top_p=0.97))  # a fresh static config: a fresh trace
    vmodel = CausalLMWithValueHead(MODEL_CFG)
    vparams = init_params(vmodel, jax.random.PRNGKey(1))
    frozen = RLFrozen(ref_params=params, policy_model=vmodel, reward_fn=target_fraction)
    state = init_state(policy_model=vmodel, policy_params=vparams,
                       policy_tx=make_optimizer(OPTIM, vparams, total_steps=10), cfg=cfg)
    before = dict(TRACE_COUNTS)
    state, m, rows = iteration(state, frozen, prompts, cfg=cfg, with_samples=True)
    assert calls == ["k1"], calls  # one KL per iteration: the reward penalty and the metric share it
    assert set(rows) == {"prompt_ids", "prompt_mask", "response_ids", "response_mask", "scores"}
    np.testing.assert_array_equal(rows["prompt_ids"], prompts["prompt_ids"])
    np.testing.assert_allclose(float(jnp.mean(rows["scores"])), float(m["score_raw"]), rtol=1e-6)
    # the same program serves the call without samples: no new trace, no separate rollout program
    state, m = iteration(state, frozen, prompts, cfg=cfg)
    assert TRACE_COUNTS["ppo_iteration"] == before.get("ppo_iteration", 0) + 1
    assert TRACE_COUNTS.get("ppo_rollout", 0) == before.get("ppo_rollout", 0)


def test_the_learning_rate_scales_the_update_not_the_optimiser_state(parts):
    model, params, prompts, frozen = parts
    cfg = ReinforceConfig()
    state = init_state(policy_model=model, policy_params=params,
                       policy_tx=make_optimizer(OPTIM, params, total_steps=100), cfg=cfg)
    assert float(get_hyperparam(state.policy.opt_state, "learning_rate")) == 1.0  # set once, at init
    start = jax.tree_util.tree_map(np.asarray, state.policy.params)
    outs = []
    for lr in (1e-3, 2e-3):
        s = init_state(policy_model=model, policy_params=params,
                       policy_tx=make_optimizer(OPTIM, params, total_steps=100), cfg=cfg)
        s, _ = iteration(s, frozen, prompts, jax.random.PRNGKey(5), cfg=with_hparams(cfg, lr=lr))
        assert float(get_hyperparam(s.policy.opt_state, "learning_rate")) == 1.0
        outs.append(jax.tree_util.tree_map(lambda a, b: np.asarray(a) - b, s.policy.params, start))
    # the first Adam step has a fixed size per parameter: twice the rate moves twice as far
    for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
        np.testing.assert_allclose(2 * a, b, rtol=1e-4, atol=1e-7)


def test_hyperparameters_are_defined_once_and_traced():
    cfg = PPOConfig(batch_size=4, hparams=PPOHParams(kl_coef=0.3))
    # the config's only pytree leaves are its hyper-parameters; static fields are in the tree structure
    assert len(jax.tree_util.tree_leaves(cfg)) == len(jax.tree_util.tree_leaves(cfg.hparams))
    assert jax.tree_util.tree_structure(cfg) != jax.tree_util.tree_structure(cfg.replace(batch_size=8))
    assert jax.tree_util.tree_structure(cfg.replace(hparams=cfg.hparams.traced())) == \
        jax.tree_util.tree_structure(with_hparams(cfg, kl_coef=0.9).replace(hparams=cfg.hparams.traced()))
    assert cfg.kl_coef == cfg.hparams.kl_coef == 0.3  # read through the config
    # overrides may name a hyper-parameter with or without its section
    a = apply_overrides(PPOTrainConfig(), ["ppo.kl_coef=0.2"])
    b = apply_overrides(PPOTrainConfig(), ["ppo.hparams.kl_coef=0.2"])
    assert a == b and a.ppo.hparams.kl_coef == 0.2
    with pytest.raises(ConfigError, match="hyper-parameters: .*kl_coef"):
        apply_overrides(PPOTrainConfig(), ["ppo.klcoef=0.2"])
    with pytest.raises(ConfigError, match="ppo.top_p"):
        PPOConfig(hparams=PPOHParams(top_p=0.0)).validate()
    with pytest.raises(ConfigError, match="ppo.lr"):
        PPOConfig(hparams=PPOHParams(lr=-1.0)).validate()


def test_equal_optimisers_are_equal_without_a_cache():
    params = init_params(CausalLM(MODEL_CFG), jax.random.PRNGKey(0))
    a = make_optimizer(OPTIM, params, total_steps=10)
    b = make_optimizer(OPTIM, params, total_steps=10)
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != make_optimizer(OPTIM, params, total_steps=11)
    assert a != make_optimizer(OptimConfig(learning_rate=2e-3), params, total_steps=10)
