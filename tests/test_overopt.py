"""The over-optimisation lab's pure pieces: Gao-form fits recover known curves, curves from windows and
from held-out checkpoint evaluations (``make_train(checkpoint_eval=...)`` with
``evaluation.heldout_eval_fn``, inside the vmapped program), and the command refuses bad input before
writing anything. (The lab end to end runs in tests/test_notebooks.py, notebook 04, tiny budget.)"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.cli import main
from rlhf_jax.evaluation import heldout_eval_fn
from rlhf_jax.models import CausalLM, ScalarHeadModel, init_params, tiny_config
from rlhf_jax.overopt import BUDGETS, RM_SIZES, checkpoint_rows, fit_gao, windowed
from rlhf_jax.rl import PPOConfig, PPOHParams, RLFrozen, RLSetup, init_state, make_train, stack_hparams, sweep_keys
from rlhf_jax.training.optim import OptimConfig, make_optimizer


def test_bon_fit_recovers_coefficients_and_peak():
    d = np.linspace(0.0, 3.0, 12)
    r = d * (0.8 - 0.25 * d)
    f = fit_gao(d, r, "bon")
    assert f["alpha"] == pytest.approx(0.8, abs=1e-9) and f["beta"] == pytest.approx(0.25, abs=1e-9)
    assert f["r2"] == pytest.approx(1.0) and f["peak_d"] == pytest.approx(0.8 / 0.5)
    assert f["peak_reward"] == pytest.approx(0.8 ** 2 / 1.0)


def test_rl_fit_recovers_coefficients_and_peak():
    d = np.linspace(0.1, 4.0, 15)
    r = d * (0.5 - 0.3 * np.log(d))
    f = fit_gao(d, r, "rl")
    assert f["alpha"] == pytest.approx(0.5, abs=1e-9) and f["beta"] == pytest.approx(0.3, abs=1e-9)
    # d* solves α − β log d − β = 0
    assert f["peak_d"] == pytest.approx(math.exp(0.5 / 0.3 - 1))
    assert f["r2"] == pytest.approx(1.0)


def test_fit_without_an_interior_peak_and_bad_input():
    d = np.linspace(0, 2, 6)
    f = fit_gao(d, 0.3 * d + 0.05 * d * d, "bon")       # convex: β < 0, no peak
    assert f["beta"] < 0 and f["peak_d"] is None
    with pytest.raises(ValueError, match="form must be"):
        fit_gao(d, d, "linear")
    with pytest.raises(ValueError, match="at least 2 points"):
        fit_gao([0.0, 1.0], [0.0, 1.0], "bon")


def test_windowed_means():
    hist = {"kl": np.array([[0.0, 2.0, 4.0, 4.0]]), "gold": np.array([[0.1, 0.3, 0.5, 0.7]]),
            "score_raw": np.array([[1.0, 1.0, 3.0, 5.0]])}
    rows = windowed(hist, 0, 2)
    assert [r["iteration"] for r in rows] == [2, 4]
    assert rows[0]["kl"] == pytest.approx(1.0) and rows[1]["sqrt_kl"] == pytest.approx(2.0)
    assert rows[1]["gold"] == pytest.approx(0.6) and rows[1]["proxy"] == pytest.approx(4.0)


def test_checkpoint_rows_take_the_evaluated_iterations():
    nan = float("nan")
    hist = {"eval/mask": np.array([[0.0, 1.0, 0.0, 1.0]]), "eval/kl": np.array([[nan, 0.25, nan, 4.0]]),
            "eval/gold": np.array([[nan, 0.6, nan, 0.4]]), "eval/proxy": np.array([[nan, 1.0, nan, 3.0]]),
            "eval/kl_se": np.array([[nan, 0.1, nan, 0.2]]), "eval/gold_se": np.array([[nan, 0.01, nan, 0.02]]),
            "eval/proxy_se": np.array([[nan, 0.3, nan, 0.4]])}
    rows = checkpoint_rows(hist, 0)
    assert [r["iteration"] for r in rows] == [2, 4]
    assert [r["sqrt_kl"] for r in rows] == pytest.approx([0.5, 2.0])
    assert rows[1]["gold"] == pytest.approx(0.4) and rows[1]["proxy"] == pytest.approx(3.0)
    assert rows[0]["gold_se"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="no held-out evaluation"):
        checkpoint_rows({**hist, "eval/mask": np.zeros((1, 4))}, 0)


TARGET = 3


def _target_fraction(prompt_ids, prompt_mask, response_ids, response_mask):
    m = response_mask.astype(jnp.float32)
    return jnp.sum((response_ids == TARGET) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def _gold(prompt_ids, prompt_mask, response_ids, response_mask):  # a different function than the proxy
    m = response_mask.astype(jnp.float32)
    return jnp.sum((response_ids == TARGET + 1) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def test_checkpoint_eval_runs_inside_the_vmapped_program_on_the_policy_of_that_iteration():
    mcfg = tiny_config(vocab_size=16, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                       intermediate_size=64, max_position_embeddings=64)
    optim = OptimConfig(learning_rate=1e-3, schedule="constant", b2=0.999, max_grad_norm=1.0)
    cfg = PPOConfig(batch_size=8, max_new_tokens=8, ppo_epochs=2, minibatches=2, hparams=PPOHParams(kl_coef=0.0, lr=3e-3))
    pm, vm = CausalLM(mcfg), ScalarHeadModel(mcfg)
    pp, vp = init_params(pm, jax.random.PRNGKey(0)), init_params(vm, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 16, (8, 4)).astype(np.int32)
    mask = np.ones((8, 4), np.int32)
    ids[:3, 0], mask[:3, 0] = 0, 0
    setup = RLSetup(frozen=RLFrozen(ref_params=pp, policy_model=pm, value_model=vm, reward_fn=_target_fraction),
                    policy_model=pm, policy_params=pp, policy_tx=make_optimizer(optim, pp, total_steps=100),
                    value_model=vm, value_params=vp, value_tx=make_optimizer(optim, vp, total_steps=100),
                    prompts={"prompt_ids": jnp.asarray(ids), "prompt_mask": jnp.asarray(mask)})
    held_ids, held_mask = rng.integers(4, 16, (4, 4)).astype(np.int32), np.ones((4, 4), np.int32)
    evaluate = heldout_eval_fn(held_ids, held_mask, gold_fn=_gold, samples_per_prompt=3)
    iters, every = 4, 2
    train = make_train(cfg, setup, num_iterations=iters, checkpoint_eval=(every, evaluate))
    hparams, seeds = stack_hparams(cfg, {"kl_coef": [0.0, 1.0]})
    keys = sweep_keys(0, seeds)
    final, hist = jax.jit(jax.vmap(train))(hparams, keys)
    np.testing.assert_array_equal(hist["eval/mask"], [[0, 1, 0, 1]] * 2)
    for k in ("kl", "gold", "proxy", "kl_se", "gold_se", "proxy_se", "response_length"):
        assert np.all(np.isnan(hist[f"eval/{k}"][:, ::2])) and np.all(np.isfinite(hist[f"eval/{k}"][:, 1::2])), k
    assert np.all(hist["eval/kl"][:, 1::2] > 0) and np.all(hist["eval/gold_se"][:, 1::2] > 0)
    # the last checkpoint is the final policy: evaluated again outside the program, with the run's eval key
    for run_i in range(2):
        state = jax.tree_util.tree_map(lambda x: x[run_i], final)
        rcfg = cfg.replace(hparams=jax.tree_util.tree_map(lambda x: x[run_i], hparams))
        ev = jax.jit(evaluate)(state, setup.frozen, rcfg, jax.random.fold_in(keys[run_i], iters))
        for k in ("kl", "gold", "proxy", "gold_se"):
            np.testing.assert_allclose(hist[f"eval/{k}"][run_i, -1], ev[k], rtol=1e-4, atol=1e-5, err_msg=k)
        # the KL is to the reference: the untrained policy is at exactly 0
        start = init_state(policy_model=pm, policy_params=pp, policy_tx=setup.policy_tx, value_model=vm,
                           value_params=vp, value_tx=setup.value_tx, cfg=rcfg, rng=keys[run_i])
        ev0 = jax.jit(evaluate)(start, setup.frozen, rcfg, jax.random.fold_in(keys[run_i], iters))
        assert float(ev0["kl"]) == pytest.approx(0.0, abs=1e-6)
    # the evaluation is a branch taken every `every` iterations, not computed (and selected) every iteration
    plain = make_train(cfg, setup, num_iterations=iters)
    conds = [str(jax.make_jaxpr(jax.vmap(t))(hparams, keys)).count(" cond[") for t in (plain, train)]
    assert conds[1] == conds[0] + 1, conds
    with pytest.raises(ValueError, match="checkpoint_eval every=5"):
        make_train(cfg, setup, num_iterations=iters, checkpoint_eval=(5, evaluate))


def test_heldout_eval_fn_refuses_bad_shapes():
    ids, mask = np.ones((3, 4), np.int32), np.ones((3, 4), np.int32)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        heldout_eval_fn(ids, mask, gold_fn=_gold, samples_per_prompt=0)
    with pytest.raises(ValueError, match="not divisible by chunk=4"):
        heldout_eval_fn(ids, mask, gold_fn=_gold, samples_per_prompt=2, chunk=4)


def test_budgets_fit_their_promises():
    for name, b in BUDGETS.items():
        assert b.bon_n & (b.bon_n - 1) == 0, name       # powers of two up to n
        assert len(b.label_counts) >= 2 and len(b.betas) >= 2 and b.ensemble_size >= 2, name
        assert b.rl_iterations >= 2 * b.window and b.rl_iterations % b.window == 0, name  # checkpoints to the end
        assert b.eval_samples >= 1 and set(b.rm_sizes) <= set(RM_SIZES), name
        assert len(b.rm_sizes) >= 2, name


def test_command_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("keep")
    assert main(["overopt", "--out", str(full), "--budget", "tiny"]) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in full.iterdir()) == ["x.txt"]
    assert main(["overopt", "--out", str(tmp_path / "new"), "--task", "nope"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["overopt", "--out", str(tmp_path / "new"), "--seed", "-1"]) == 2
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit):
        main(["overopt", "--out", str(tmp_path / "new"), "--budget", "huge"])
