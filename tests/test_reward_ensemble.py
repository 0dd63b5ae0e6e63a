"""Reward-model ensembles: K members in one vmapped step equal K separate steps; the trainer exports
members + ensemble.json (each member centred); the RL core scores an ensemble export with the chosen
aggregation; config errors name the key."""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax.rl import GRPOConfig, GRPOHParams, PPOConfig, PPOHParams, PPOTrainConfig, RewardSection, train_ppo
from rlhf_jax.rl import experience as R
from rlhf_jax.rl.core import RLFrozen
from rlhf_jax.training import OptimConfig, TrainState, make_optimizer
from rlhf_jax.training import reward as reward_mod
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig, read_jsonl

CFG = models.tiny_config(vocab_size=64, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                         intermediate_size=64, max_position_embeddings=32)
RM_ARGS = ["task=sort", "model.name=task", "model.hidden_size=32", "model.intermediate_size=64",
           "data.batch_size=8", "data.max_length=32", "log.progress=false", "checkpoint.every=0",
           "eval_batches=1", "steps=3", "eval_every=3", "normalize=true", "calibration_batches=1",
           "optim.learning_rate=1e-3", "log.tensorboard=false"]


def _pairs(seed, b=4, t=12):
    r = np.random.RandomState(seed)
    ids = r.randint(3, 64, size=(b, t)).astype(np.int32)
    cm = (np.arange(t)[None] < r.randint(3, t + 1, size=(b, 1))).astype(np.int32)
    rm = (np.arange(t)[None] < r.randint(3, t + 1, size=(b, 1))).astype(np.int32)
    return {"chosen_ids": ids, "chosen_mask": cm, "rejected_ids": ids[::-1].copy(), "rejected_mask": rm,
            "margin": np.zeros((b,), np.float32), "example_mask": np.ones((b,), np.int32)}


def test_vmapped_ensemble_step_equals_separate_steps():
    model = models.ScalarHeadModel(CFG)
    params = [models.init_params(model, jax.random.PRNGKey(k)) for k in range(3)]
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, max_grad_norm=1.0), params[0], total_steps=10)
    rngs = [jax.random.PRNGKey(10 + k) for k in range(3)]
    ens = reward_mod.init_ensemble_state(model.apply, params, tx, rngs)
    batch = _pairs(0)
    step = jax.jit(functools.partial(reward_mod.ensemble_reward_step, cfg=reward_mod.RewardStepConfig(ensemble_size=3)))
    new, metrics = step(ens, batch)
    one = jax.jit(reward_mod.reward_step)
    losses = []
    for k in range(3):
        st = TrainState.create(apply_fn=model.apply, params=params[k], tx=tx, rng=rngs[k])
        st, m = one(st, batch)
        losses.append(float(m["loss"]))
        for a, b in zip(jax.tree_util.tree_leaves(st.params),
                        jax.tree_util.tree_leaves(reward_mod.member_params(new.params, k))):
            np.testing.assert_allclose(a, b, atol=5e-4)  # Adam: a step is ~lr=1e-2; float noise amplified on ~0 grads
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    # bootstrap: Poisson weights differ per member, so members see different losses than without
    boot = jax.jit(functools.partial(reward_mod.ensemble_reward_step,
                                     cfg=reward_mod.RewardStepConfig(ensemble_size=3, ensemble_bootstrap=True)))
    _, mb = boot(reward_mod.init_ensemble_state(model.apply, params, tx, rngs), _pairs(1, b=16))
    assert np.isfinite(float(mb["loss"])) and float(mb["accuracy_min"]) <= float(mb["accuracy_max"])


def test_trainer_exports_centred_members_and_ppo_scores_the_aggregate(tmp_path):
    cfg = apply_overrides(reward_mod.RewardConfig(), RM_ARGS + ["ensemble_size=2", "ensemble_bootstrap=true",
                                                                 f"out_dir={tmp_path / 'rm'}"])
    res = reward_mod.train_reward(cfg)
    meta = json.loads((tmp_path / "rm" / "export" / "ensemble.json").read_text())
    assert meta["members"] == ["member_0", "member_1"] and len(meta["reward_shift"]) == 2
    assert meta["reward_shift"][0] != meta["reward_shift"][1]            # each member its own centring
    assert len(read_jsonl(res.metrics_path)) >= 1
    model, stacked, shifts = reward_mod.load_reward_ensemble(res.export_dir)
    np.testing.assert_allclose(shifts, meta["reward_shift"], rtol=1e-6)

    r = np.random.RandomState(0)
    p_ids = jnp.asarray(r.randint(4, 20, size=(4, 6)), jnp.int32)
    p_mask = jnp.ones((4, 6), jnp.int32)
    r_ids = jnp.asarray(r.randint(4, 20, size=(4, 5)), jnp.int32)
    r_mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], jnp.int32)
    members = np.stack([np.asarray(R.reward_model_scores(model, reward_mod.member_params(stacked, k), p_ids, p_mask,
                                                         r_ids, r_mask)) + float(shifts[k]) for k in range(2)])
    frozen = RLFrozen(ref_params=None, reward_params=stacked, reward_shift=shifts, reward_model=model,
                      reward_ensemble=2)
    for how, lam, want in (("mean", 0.0, members.mean(0)), ("wco", 0.0, members.min(0)),
                           ("uwo", 2.0, members.mean(0) - 2.0 * members.var(0))):
        algo = PPOConfig(reward_aggregation=how, hparams=PPOHParams(uwo_lambda=lam))
        got = R.score_tokens(frozen, p_ids, p_mask, r_ids, r_mask, chunk=2, cfg=algo)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=how)
        grpo = GRPOConfig(reward_aggregation=how, hparams=GRPOHParams(uwo_lambda=lam))  # the same option in GRPO
        np.testing.assert_allclose(R.score_tokens(frozen, p_ids, p_mask, r_ids, r_mask, chunk=2, cfg=grpo), want,
                                   rtol=1e-5, atol=1e-5, err_msg=how)

    small = ModelSection(name="task", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2, head_dim=16)
    ppo = PPOTrainConfig(task="sort", policy=small, reward=RewardSection(kind="model", path=res.export_dir),
                         value_init="reward",
                         ppo=PPOConfig(batch_size=8, max_new_tokens=10, ppo_epochs=1, minibatches=2,
                                       reward_aggregation="uwo", hparams=PPOHParams(lr=1e-3, uwo_lambda=0.5)),
                         checkpoint=CheckpointConfig(every=0, async_save=False),
                         log=LogConfig(every=1, tensorboard=False, progress=False), iterations=1, sample_every=0,
                         out_dir=str(tmp_path / "ppo"), export=False)
    rows = read_jsonl(train_ppo(ppo).metrics_path)
    assert len(rows) == 1 and np.isfinite(rows[0]["train/score"])


@pytest.mark.parametrize("override,key", [
    ("ensemble_size=0", "ensemble_size"),
    ("num_labels=-1", "num_labels"),
])
def test_ensemble_config_errors(tmp_path, override, key):
    cfg = apply_overrides(reward_mod.RewardConfig(), RM_ARGS + [override, f"out_dir={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match=key):
        reward_mod.train_reward(cfg)
    assert not (tmp_path / "x").exists()


def test_bootstrap_needs_pairs_and_ppo_aggregation_is_checked(tmp_path):
    cfg = apply_overrides(reward_mod.RewardConfig(), RM_ARGS + ["format=ranking", "ensemble_size=2",
                                                                 "ensemble_bootstrap=true", f"out_dir={tmp_path / 'y'}"])
    with pytest.raises(ConfigError, match="ensemble_bootstrap"):
        reward_mod.train_reward(cfg)
    with pytest.raises(ConfigError, match=r"ppo\.reward_aggregation"):
        PPOConfig(reward_aggregation="max").validate()
    with pytest.raises(ConfigError, match=r"ppo\.uwo_lambda"):
        PPOConfig(hparams=PPOHParams(uwo_lambda=-1.0)).validate()
    assert dataclasses.replace(PPOConfig(), reward_aggregation="wco").validate().reward_aggregation == "wco"
