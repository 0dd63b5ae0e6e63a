"""The algorithm family on the one RL core and the DPO step: GSPO, CISPO, REINFORCE++(-baseline), DAPO's
overlong punishment and zero-variance-group masking on the GRPO config; SimPO, ORPO, KTO on the DPO step.
Each raises the tiny target-fraction reward (or the preference margin), has on-policy first ratio 1,
compiles once across hyper-parameter values, and rejects bad settings naming the key."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM, init_params
from rlhf_jax.rl import (TRACE_COUNTS, DPOConfig, DPOFrozen, DPOHParams, GRPOConfig, GRPOHParams, dpo_step,
                         init_dpo_state, iteration, precompute_reference_logps, with_hparams)
from rlhf_jax.rl import dpo as dpo_module
from rlhf_jax.rl.grpo import group_advantages, overlong_punishment
from rlhf_jax.training.optim import make_optimizer
from tests.test_dpo import make_pairs
from tests.test_grpo import MODEL_CFG, OPTIM, _train as train_grpo_family
from tests.test_grpo import parts  # noqa: F401  (the tiny target-fraction fixture)


def _train(parts, cfg, n):
    return train_grpo_family(parts, cfg, n, iteration)[1]


def _rise(hist, key="score"):
    return np.mean([h[key] for h in hist[:3]]), np.mean([h[key] for h in hist[-3:]])


BASE = dict(batch_size=4, group_size=4, max_new_tokens=8, minibatches=2)


# Each compiled program costs most of a test's time on a CPU, so the options share two end-to-end runs.
@pytest.mark.parametrize("name,cfg", [
    ("gspo+overlong+mask_zero_std", GRPOConfig(**BASE, policy_loss="gspo", use_kl_loss=True, overlong_buffer=2,
                                               mask_zero_std_groups=True,
                                               hparams=GRPOHParams(kl_coef=0.01, lr=5e-3, clip_eps=3e-4,
                                                                   clip_eps_high=4e-4, overlong_penalty=0.1))),
    ("cispo+reinforce_pp_baseline", GRPOConfig(**BASE, policy_loss="cispo", advantage="reinforce_pp_baseline",
                                               use_kl_loss=False, loss_aggregation="token-mean",
                                               hparams=GRPOHParams(kl_coef=0.01, lr=5e-3, clip_eps_high=4.0))),
])
def test_critic_free_options_raise_reward_with_on_policy_ratio_one(parts, name, cfg):
    before = TRACE_COUNTS[f"{cfg.name}_iteration"]
    hist = _train(parts, cfg, 15)
    for h in hist:
        assert h["first_ratio_mean"] == pytest.approx(1.0, abs=1e-6) and h["first_clipfrac"] == 0.0, name
        assert np.isfinite(h["loss"]), name
    first, last = _rise(hist)
    print(f"{name}: score {first:.3f} -> {last:.3f}")
    assert last > first + 0.3, (name, first, last)
    # another hyper-parameter value runs the same compiled program
    _train(parts, with_hparams(cfg, lr=1e-3, kl_coef=0.05), 1)
    assert TRACE_COUNTS[f"{cfg.name}_iteration"] - before == 1, name
    if cfg.overlong_buffer:
        assert all(h["overlong_penalty_mean"] >= 0.0 for h in hist)
    if cfg.kl_in_reward:  # the reward is the score minus β·Σ k1 (the core's KL, with its mask)
        for h in hist[:1]:
            assert h["reward"] == pytest.approx(h["score"] - 0.01 * h["kl"] - h.get("overlong_penalty_mean", 0.0),
                                                abs=1e-4)


def test_overlong_punishment_and_zero_std_masking():
    lengths = jnp.asarray([4.0, 6.0, 7.0, 8.0])
    np.testing.assert_allclose(overlong_punishment(lengths, max_new_tokens=8, buffer=4, penalty=1.0),
                               [0.0, -0.5, -0.75, -1.0])
    cfg = GRPOConfig(batch_size=2, group_size=2, max_new_tokens=4, mask_zero_std_groups=True, overlong_buffer=2,
                     hparams=GRPOHParams(overlong_penalty=0.5)).validate()
    mask = jnp.ones((4, 4)).at[0, 2:].set(0.0)  # lengths 2, 4, 4, 4

    class Roll:
        response_mask = mask
    extra, m = cfg.advantages(None, Roll(), jnp.asarray([1.0, 1.0, 0.0, 1.0]), jnp.zeros((4, 4)))
    # row 0 unpenalised, rows 1-3 at full length get -0.5: group 0 becomes [1, 0.5], group 1 [-0.5, 0.5]
    assert float(m["overlong_penalty_mean"]) == pytest.approx(0.375)
    np.testing.assert_array_equal(extra["row_weight"], [1.0, 1.0, 1.0, 1.0])
    extra, m = cfg.advantages(None, Roll(), jnp.asarray([1.0, 1.5, 0.0, 1.0]), jnp.zeros((4, 4)))
    np.testing.assert_array_equal(extra["row_weight"], [0.0, 0.0, 1.0, 1.0])  # group 0: 1.0 and 1.5 - 0.5
    assert float(m["frac_zero_std_groups"]) == 0.5


def test_reinforce_pp_advantages_use_the_cores_kl():
    cfg = GRPOConfig(batch_size=2, group_size=2, max_new_tokens=3, advantage="reinforce_pp_baseline",
                     use_kl_loss=False).validate()
    rng = np.random.default_rng(0)
    mask = jnp.asarray([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], jnp.float32)
    logp, ref = (jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(2))
    kl_tok = losses.kl_estimate(logp, ref, estimator="k1", mask=mask)
    scores = jnp.asarray([1.0, 0.0, 0.5, 0.25])
    for advantage in ("reinforce_pp_baseline", "reinforce_pp"):
        adv, rewards = group_advantages(scores, kl_tok, cfg=cfg.replace(advantage=advantage),
                                        kl_coef=jnp.float32(0.1), mask=mask)
        expected, _ = losses.reinforce_pp_advantages(scores, mask, logp=logp, ref_logp=ref, kl_coef=0.1,
                                                     baseline=advantage == "reinforce_pp_baseline", group_size=2)
        assert adv.shape == (4, 3)
        np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rewards, scores - 0.1 * jnp.sum(kl_tok, axis=1), rtol=1e-6)
    # the plain variant's advantages differ from the baseline's (no group mean subtracted)
    assert not np.allclose(group_advantages(scores, kl_tok, cfg=cfg, kl_coef=jnp.float32(0.1), mask=mask)[0], adv)


def test_new_grpo_options_are_validated_naming_the_key():
    for kwargs, key in [
        (dict(policy_loss="ppo"), "grpo.policy_loss"),
        (dict(advantage="reinforce"), "grpo.advantage"),
        (dict(advantage="reinforce_pp"), "grpo.use_kl_loss"),  # REINFORCE++ folds the KL into the reward
        (dict(advantage="reinforce_pp", use_kl_loss=False, policy_loss="gspo"), "grpo.policy_loss"),
        (dict(overlong_buffer=-1), "grpo.overlong_buffer"),
        (dict(max_new_tokens=8, overlong_buffer=9), "grpo.overlong_buffer"),
        (dict(mask_zero_std_groups=1), "grpo.mask_zero_std_groups"),
        (dict(hparams=GRPOHParams(overlong_penalty=-1.0)), "grpo.overlong_penalty"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            GRPOConfig(**kwargs).validate()


# ---- offline preference: SimPO, ORPO, KTO on the DPO step ----

@pytest.fixture(scope="module")
def pref_parts():
    model = CausalLM(MODEL_CFG)
    return model, init_params(model, jax.random.PRNGKey(0)), make_pairs()


@pytest.mark.parametrize("cfg", [
    DPOConfig(loss_type="simpo", hparams=DPOHParams(beta=2.0, simpo_gamma=1.0, lr=3e-3)),
    DPOConfig(loss_type="orpo", hparams=DPOHParams(beta=0.1, lr=3e-3)),
    DPOConfig(loss_type="kto", hparams=DPOHParams(beta=0.1, lr=3e-3)),
], ids=lambda c: c.loss_type)
def test_preference_losses_raise_margin_and_accuracy(pref_parts, cfg):
    model, params, batch = pref_parts
    frozen = DPOFrozen(ref_params=None if not cfg.uses_ref else params, model=model)
    if cfg.uses_ref:
        batch = {**batch, **precompute_reference_logps(model, params, batch)}
    state = init_dpo_state(model=model, params=params, tx=make_optimizer(OPTIM, params, total_steps=100), cfg=cfg)
    n0 = dpo_module.TRACE_COUNTS["dpo_step"]
    hist = []  # each step's metrics are those of the params before its update
    for i in range(12):
        hp_cfg = cfg if i % 2 == 0 else with_hparams(cfg, lr=2e-3)  # traced: no retrace
        state, m = dpo_step(state, frozen, batch, cfg=hp_cfg)
        hist.append(m)
    assert dpo_module.TRACE_COUNTS["dpo_step"] - n0 == 1
    before, after = hist[0], hist[-1]
    print(f"{cfg.loss_type}: margin {float(before['reward_margin']):.3f} -> {float(after['reward_margin']):.3f}, "
          f"accuracy {float(before['reward_accuracy']):.2f} -> {float(after['reward_accuracy']):.2f}, "
          f"loss {float(before['loss']):.3f} -> {float(after['loss']):.3f}")
    assert float(after["reward_margin"]) > float(before["reward_margin"]) + 0.1
    assert float(after["reward_accuracy"]) == 1.0
    assert float(after["loss"]) < float(before["loss"])
    if cfg.loss_type == "orpo":
        assert float(after["nll"]) < float(before["nll"])  # ORPO also fits the chosen completions
    if cfg.loss_type == "kto":
        assert float(before["reward_margin"]) == pytest.approx(0.0, abs=1e-6)  # policy == reference
        assert float(before["kl"]) == pytest.approx(0.0, abs=1e-6)


def test_reference_free_losses_need_no_reference(pref_parts):
    model, params, batch = pref_parts
    cfg = DPOConfig(loss_type="simpo")
    assert not cfg.uses_ref and DPOConfig(loss_type="orpo").uses_ref is False and DPOConfig().uses_ref
    state = init_dpo_state(model=model, params=params, tx=make_optimizer(OPTIM, params, total_steps=10), cfg=cfg)
    _, m = dpo_step(state, DPOFrozen(None, model), batch, cfg=cfg)  # no ref params, no precomputed ref
    assert np.isfinite(float(m["loss"]))
    with pytest.raises(ValueError, match="kto_reference_point"):
        kto = DPOConfig(loss_type="kto")
        st = init_dpo_state(model=model, params=params, tx=make_optimizer(OPTIM, params, total_steps=10), cfg=kto)
        dpo_step(st, DPOFrozen(None, model), {**batch, **precompute_reference_logps(model, params, batch)}, cfg=kto)


def test_kto_mismatched_rows_pair_each_prompt_with_the_next_completion(pref_parts):
    _, _, batch = pref_parts
    ids, mask, lm = (np.asarray(x) for x in dpo_module.mismatched_rows(batch["chosen_ids"], batch["chosen_mask"],
                                                                        batch["chosen_loss_mask"]))
    src_ids, src_lm = np.asarray(batch["chosen_ids"]), np.asarray(batch["chosen_loss_mask"])
    for i in range(ids.shape[0]):
        j = (i + 1) % ids.shape[0]
        expected = list(src_ids[i][:3]) + list(src_ids[j][src_lm[j] > 0])
        assert list(ids[i][mask[i] > 0]) == expected
        assert list(ids[i][lm[i] > 0]) == list(src_ids[j][src_lm[j] > 0])


def test_new_dpo_options_are_validated_naming_the_key():
    for cfg, key in [
        (DPOConfig(loss_type="slic"), "dpo.loss_type"),
        (DPOConfig(loss_type="kto", kto_reference_point="batch"), "dpo.kto_reference_point"),
        (DPOConfig(hparams=DPOHParams(simpo_gamma=-1.0)), "dpo.simpo_gamma"),
        (DPOConfig(hparams=DPOHParams(kto_desirable_weight=-1.0)), "dpo.kto_desirable_weight"),
        (DPOConfig(hparams=DPOHParams(kto_undesirable_weight=-0.5)), "dpo.kto_undesirable_weight"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            cfg.validate()
