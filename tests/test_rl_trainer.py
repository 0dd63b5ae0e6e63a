"""The RL host loops on an embedded task: run directory contents, exact resume, the Python-reward
path, DPO end to end, the CLI, and config errors raised before anything compiles."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax.rl import (DPOTrainConfig, GRPOConfig, GRPOHParams, GRPOTrainConfig, PPOConfig, PPOHParams,
                         PPOTrainConfig, RewardSection, train_dpo, train_grpo, train_ppo)
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig, read_jsonl
from rlhf_jax.training.optim import OptimConfig

SMALL = ModelSection(name="task", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2, head_dim=16)
LOG = LogConfig(every=1, tensorboard=False, progress=False)


def ppo_cfg(out, **kw):
    base = PPOTrainConfig(task="sort", policy=SMALL,
                          ppo=PPOConfig(batch_size=8, max_new_tokens=10, ppo_epochs=2, minibatches=2,
                                        hparams=PPOHParams(lr=1e-3)),
                          checkpoint=CheckpointConfig(every=2, keep=5, async_save=False), log=LOG, iterations=4,
                          sample_every=0, out_dir=str(out), export=False,
                          # a fixed schedule horizon: the 2- and 4-iteration runs share one optimizer (one compile)
                          optim=OptimConfig(learning_rate=1e-3, schedule="constant", total_steps=16, b2=0.999))
    return dataclasses.replace(base, **kw)


def test_train_ppo_writes_run_and_resumes_exactly(tmp_path):
    full = train_ppo(ppo_cfg(tmp_path / "full"))
    rows = read_jsonl(full.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("train/score", "train/kl", "train/kl_coef", "train/entropy", "train/clipfrac", "train/approx_kl",
                "train/value_loss", "train/explained_variance", "train/ratio_mean", "train/ratio_max",
                "train/response_length", "train/stop_fraction", "train/tokens_per_sec", "train/non_score_reward"):
        assert key in rows[0], key
    assert 0.0 <= rows[0]["train/score"] <= 1.0  # the sort task's gold reward
    run = json.loads((tmp_path / "full" / "run.json").read_text())
    assert run["config"]["ppo"]["stop_token_ids"] == [2]  # the tokenizer's EOS

    # a run stopped after 2 iterations and resumed reproduces iterations 3 and 4
    train_ppo(ppo_cfg(tmp_path / "part", iterations=2))
    resumed = train_ppo(ppo_cfg(tmp_path / "part", resume=True))
    assert resumed.resumed_from == 2
    again = read_jsonl(resumed.metrics_path)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(rows, again):
        for k in ("train/score", "train/kl", "train/value_loss", "train/policy_loss"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {k}")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train_ppo(ppo_cfg(tmp_path / "part"))


def test_python_reward_path_logs_samples_and_exports(tmp_path):
    cfg = ppo_cfg(tmp_path / "py", reward=RewardSection(kind="python"), iterations=2, sample_every=1,
                  num_samples=2, export=True, checkpoint=CheckpointConfig(every=0, async_save=False))
    result = train_ppo(cfg)
    rows = read_jsonl(result.metrics_path)
    assert len(rows) == 2 and all(0.0 <= r["train/score"] <= 1.0 for r in rows)
    samples = [json.loads(line) for line in (tmp_path / "py" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and samples[0]["prompt"].startswith("sort")
    assert (tmp_path / "py" / "export" / "config.json").exists()


def test_grpo_trainer_and_dpo_trainer_run(tmp_path):
    g = train_grpo(GRPOTrainConfig(task="sort", policy=SMALL,
                                   grpo=GRPOConfig(batch_size=4, group_size=4, max_new_tokens=10,
                                                   hparams=GRPOHParams(lr=1e-3)),
                                   checkpoint=CheckpointConfig(every=0, async_save=False), log=LOG, iterations=2,
                                   sample_every=0, out_dir=str(tmp_path / "grpo"), export=False))
    assert len(read_jsonl(g.metrics_path)) == 2
    d = train_dpo(apply_overrides(DPOTrainConfig(task="sort", policy=SMALL, log=LOG, out_dir=str(tmp_path / "dpo"),
                                                 export=False),
                                  ["steps=3", "data.batch_size=4", "eval_batches=1", "dpo.lr=1e-3",
                                   "checkpoint.async_save=false"]))
    assert d.final_step == 3
    assert {"reward_margin", "reward_accuracy", "loss"} <= set(d.eval_metrics)


def test_config_errors_before_compiling(tmp_path):
    with pytest.raises(ConfigError, match="ppo.minibatches"):
        train_ppo(ppo_cfg(tmp_path / "x", ppo=PPOConfig(batch_size=6, minibatches=4)))
    with pytest.raises(ConfigError, match="reward.path"):
        train_ppo(ppo_cfg(tmp_path / "x", reward=RewardSection(kind="model")))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        train_ppo(ppo_cfg(tmp_path / "x", ppo=PPOConfig(batch_size=8, max_new_tokens=200)))
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(PPOTrainConfig(), ["ppo.beta=0.1"])


def test_cli_runs_ppo(tmp_path, capsys):
    from rlhf_jax.cli import main
    rc = main(["ppo", "task=sort", "iterations=1", "sample_every=0", "export=false", "log.progress=false",
               "log.tensorboard=false", "policy.hidden_size=32", "policy.intermediate_size=64", "policy.num_heads=2",
               "policy.num_kv_heads=2", "policy.head_dim=16", "ppo.batch_size=8", "ppo.max_new_tokens=10",
               "ppo.ppo_epochs=2", "ppo.minibatches=2", "ppo.lr=0.001", "optim.total_steps=16", "checkpoint.async_save=false",
               "--out", str(tmp_path / "cli")])
    assert rc == 0
    assert "ppo: 1 steps" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "cli" / "metrics.jsonl")) == 1


def test_make_train_from_a_trainer_config_vmaps_over_beta(tmp_path):
    import jax

    from rlhf_jax.rl import build_setup, make_train, stack_hparams, sweep_keys
    cfg = ppo_cfg(tmp_path / "sweep", iterations=2)
    setup = build_setup(cfg, num_prompts=16)
    assert setup.prompts["prompt_ids"].shape == (16, 8) and setup.algo.stop_token_ids == (2,)
    train = make_train(setup.algo, setup, num_iterations=cfg.iterations)
    hp, seeds = stack_hparams(setup.algo, {"kl_coef": [0.0, 0.5]}, num_seeds=1)
    _, hist = jax.jit(jax.vmap(train))(hp, sweep_keys(0, seeds))
    assert hist["score"].shape == (2, 2)
    np.testing.assert_allclose(hist["kl_coef"][:, 0], [0.0, 0.5])
    assert np.all(np.isfinite(hist["value_loss"]))


# every rollout row and minibatch must split over all 8 devices (the batch is sharded over data x fsdp)
MESH_PPO = PPOConfig(batch_size=16, max_new_tokens=10, ppo_epochs=2, minibatches=2, hparams=PPOHParams(lr=1e-3))
MESH_SCRIPT = r"""
import dataclasses, json, sys
sys.path.insert(0, {tests!r})
import jax
from test_rl_trainer import ppo_cfg
from rlhf_jax.rl.trainer import train_ppo
from rlhf_jax.training.configs import MeshConfig
from rlhf_jax.training.metrics import read_jsonl
assert jax.device_count() == 8
from test_rl_trainer import MESH_PPO
res = train_ppo(dataclasses.replace(ppo_cfg({out!r}, iterations=2, ppo=MESH_PPO), mesh=MeshConfig(data=4, fsdp=2)))
print("RESULT", json.dumps(read_jsonl(res.metrics_path)))
"""


def test_train_ppo_on_a_4x2_mesh_matches_one_device(tmp_path):
    """The RL trainer's placement (batch over `data`, params over `fsdp`) changes nothing but the layout."""
    import os
    import pathlib
    import subprocess
    import sys

    one = read_jsonl(train_ppo(ppo_cfg(tmp_path / "one", iterations=2, ppo=MESH_PPO)).metrics_path)
    tests = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(tests.parent))
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT.format(tests=str(tests), out=str(tmp_path / "mesh"))],
                          cwd=tests.parent, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mesh = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert [r["step"] for r in mesh] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(one, mesh):
        for k in ("train/score", "train/kl", "train/value_loss", "train/policy_loss", "train/clipfrac"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=f"step {a['step']} {k}")
