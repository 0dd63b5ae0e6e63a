"""A vmapped sweep's held-out evaluation uses each run's OWN reference and start policy.

Several seeds without ``policy.path`` each draw their own model (the task's tiny model initialised from the
seed), so their references differ: ``evaluate_runs`` must measure run ``i``'s KL against its seed's
reference, not the set-up's (the first seed's), and ``evaluate_starts`` evaluates each seed's own start.
One seed, or seeds over one saved model, keep nothing extra (``VmapSweepResult.per_seed`` is empty). A LoRA
run's reference is its own base (stacked per run when each seed draws its own), adapters off.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.config import apply_overrides, load_config_file
from rlhf_jax.data import load_tokenizer
from rlhf_jax.evaluation import evaluate_policy
from rlhf_jax.models import lora
from rlhf_jax.rl.trainer import run_inputs
from rlhf_jax.sweeps import (evaluate_runs, evaluate_start, evaluate_starts, run_policy_params,
                             run_reference_params, run_start_params, run_vmapped_sweep)
from rlhf_jax.tasks import get_task
from rlhf_jax.training.common import build_model

ROOT = Path(__file__).resolve().parents[1]
GRPO_TINY = ROOT / "experiments" / "grpo_sort_tiny.py"
GRPO_LORA = ROOT / "experiments" / "grpo_lora_sort_tiny.py"
# 1 iteration of 4 prompts x 6 tokens with a tiny model: the smallest real GRPO program
GRPO_SMALL = ["iterations=1", "grpo.batch_size=4", "grpo.max_new_tokens=6", "policy.hidden_size=16",
              "policy.head_dim=8", "policy.intermediate_size=32"]
EVAL = {"num_prompts": 8, "batch_size": 8}


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _kl(res, cfg, params, ref) -> float:
    """``evaluate_policy``'s KL of ``params`` to ``ref`` with the sweep's model, reward and EVAL's prompts."""
    task = get_task(cfg.task)
    prompts = [r["prompt"] for r in task.prompt_records("test", num=EVAL["num_prompts"])]
    fz = res.setup.frozen
    return evaluate_policy(task, res.setup.policy_model, params, ref, fz.reward_model, fz.reward_params,
                           prompts=prompts, seed=0, temperature=float(res.algo.temperature),
                           batch_size=EVAL["batch_size"], reward_shift=float(fz.reward_shift))["kl"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """GRPO on the sort task against a (random) learned reward model, the policy drawn from the seed."""
    task = get_task("sort")
    base = apply_overrides(load_config_file(GRPO_TINY), GRPO_SMALL)
    rm, rp, _ = build_model(base.policy, task=task, tokenizer=load_tokenizer(task.tokenizer_dir), head="scalar",
                            rng=jax.random.PRNGKey(7))
    path = tmp_path_factory.mktemp("rm") / "export"
    models.save_pretrained(path, rm, rp)
    return apply_overrides(base, ["reward.kind=model", f"reward.path={path}"])


@pytest.mark.slow
def test_seeds_drawing_their_own_model_are_evaluated_against_their_own_reference(cfg):
    res = run_vmapped_sweep(cfg, {"grpo.kl_coef": ["0.01"]}, seeds=2)
    assert list(res.seed_index) == [0, 1] and res.per_seed["seeds"] == (0, 1)
    own = [run_inputs(cfg, s) for s in (0, 1)]  # what train_rl starts each seed from
    for i in (0, 1):
        assert _leaves_equal(run_reference_params(res, i), own[i]["ref_params"])
        assert _leaves_equal(run_start_params(res, i), own[i]["policy_params"])
    assert not _leaves_equal(own[1]["ref_params"], res.setup.frozen.ref_params)  # the seeds' models differ

    evals = evaluate_runs(res, cfg, **EVAL)
    kl = functools.partial(_kl, res, cfg)
    right = kl(run_policy_params(res, 1), own[1]["ref_params"])
    wrong = kl(run_policy_params(res, 1), res.setup.frozen.ref_params)
    print({"run1_kl": evals[1]["kl"], "own_reference": right, "setup_reference": wrong})
    assert evals[1]["kl"] == pytest.approx(right, abs=1e-5)
    # another seed's random model: KL 0.29 against it vs 0.004 against the run's own (measured 2026-12-06)
    assert abs(evals[1]["kl"] - wrong) > 0.1
    assert evals[0]["kl"] == pytest.approx(kl(run_policy_params(res, 0), own[0]["ref_params"]), abs=1e-5)

    # every seed's start is its reference (fp32, no policy.path): KL 0, and the two starts sample differently
    starts = evaluate_starts(res, cfg, **EVAL)
    assert [s["seed"] for s in starts] == [0, 1] and [s["overrides"] for s in starts] == [["start"]] * 2
    assert all(s["kl"] == pytest.approx(0.0, abs=1e-5) for s in starts)
    assert starts[0]["proxy_reward"] != starts[1]["proxy_reward"]
    assert evaluate_start(res, cfg, **EVAL) == starts[0]  # the one-row form: the first seed's start


@pytest.mark.slow
def test_one_seed_keeps_nothing_per_seed(cfg):
    res = run_vmapped_sweep(cfg, {"grpo.kl_coef": ["0.01", "0.1"]}, seeds=1)
    assert res.per_seed == {}
    for i in (0, 1):
        assert run_reference_params(res, i) is res.setup.frozen.ref_params
        assert run_start_params(res, i) is res.setup.policy_params
    (start,) = evaluate_starts(res, cfg, **EVAL)
    assert start["kl"] == pytest.approx(0.0, abs=1e-5) and start["seed"] == cfg.seed
    assert [e["grpo.kl_coef"] for e in evaluate_runs(res, cfg, **EVAL)] == pytest.approx([0.01, 0.1])


@pytest.mark.slow
def test_lora_seeds_drawing_their_own_base_are_evaluated_against_their_own_base(cfg):
    lcfg = apply_overrides(load_config_file(GRPO_LORA), GRPO_SMALL[:3] + ["reward.kind=model",
                                                                         f"reward.path={cfg.reward.path}"])
    res = run_vmapped_sweep(lcfg, {"grpo.kl_coef": ["0.01"]}, seeds=2)
    assert res.shared == {} and res.per_seed["ref_params"] is None  # each seed's base stacked, no ref copy
    base = [lora.base_params(run_inputs(lcfg, s)["policy_params"]) for s in (0, 1)]
    assert not _leaves_equal(base[0], base[1])
    for i in (0, 1):  # the frozen base comes back untouched in the run's final params
        assert _leaves_equal(run_reference_params(res, i), base[i])
    evals = evaluate_runs(res, lcfg, **EVAL)
    for i in (0, 1):
        assert evals[i]["kl"] == pytest.approx(_kl(res, lcfg, run_policy_params(res, i), base[i]), abs=1e-5)
    starts = evaluate_starts(res, lcfg, **EVAL)  # adapters start at b = 0: each start is its base
    assert [s["seed"] for s in starts] == [0, 1] and all(s["kl"] == pytest.approx(0.0, abs=1e-5) for s in starts)
