"""The researcher's path: rewards written as a file's function (Python on text, JAX on token ids, the
JAX one inside the compiled iteration and so in vmapped sweeps), a Python reward refused by --vmap
before anything is built, own prompts never cut to an embedded task's budget, and the start-of-run
data summary with its truncation warning."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from rlhf_jax.cli import main
from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax.rl import RewardSection
from rlhf_jax.rl.trainer import _prompt_length, load_function, train_ppo
from rlhf_jax.sweeps import run_vmapped_sweep, vmap_values
from rlhf_jax.tasks import get_task
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.metrics import read_jsonl
from tests.test_rl_trainer import ppo_cfg

REWARDS = textwrap.dedent('''
    import jax.numpy as jnp

    def has_nine(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer):
        nine = tokenizer.convert_tokens_to_ids("9")   # used at trace time
        return jnp.any((response_ids == nine) & (response_mask > 0), axis=1).astype(jnp.float32)

    def text_nines(prompt, response):
        words = response.split()
        return sum(w == "9" for w in words) / max(len(words), 1)
''')


@pytest.fixture()
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def test_function_specs_name_the_key():
    with pytest.raises(ConfigError, match="reward.function.*no_such_file.py.*not a file"):
        load_function("no_such_file.py:fn", "reward.function")
    with pytest.raises(ConfigError, match="reward.function.*cannot import 'no_such_module_xyz'"):
        load_function("no_such_module_xyz:fn", "reward.function")
    with pytest.raises(ConfigError, match="reward.function.*has no function 'nope'"):
        load_function("json:nope", "reward.function")
    assert load_function("json:dumps", "reward.function") is json.dumps


def test_jax_reward_from_a_file_runs_inside_the_iteration_and_in_a_vmapped_sweep(tmp_path, rewards_file):
    reward = RewardSection(kind="jax", function=f"{rewards_file}:has_nine")
    result = train_ppo(ppo_cfg(tmp_path / "jax", reward=reward, iterations=1, sample_every=1, num_samples=8))
    samples = [json.loads(x) for x in (tmp_path / "jax" / "samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:  # the score of every logged row is the function of its response
        assert s["score"] == float("9" in s["response"].split())
    assert 0.0 <= result.train_metrics["score"] <= 1.0
    # the same reward inside a vmapped sweep (two values of beta, one program)
    cfg = ppo_cfg(tmp_path / "vm", reward=reward, iterations=1)
    out = run_vmapped_sweep(cfg, {"ppo.kl_coef": ["0.0", "0.5"]})
    assert out.num_runs == 2 and np.all(np.isfinite(out.history["score"]))


def test_python_reward_from_a_file_and_refused_by_vmap(tmp_path, rewards_file):
    cfg = ppo_cfg(tmp_path / "py", reward=RewardSection(kind="python", function=f"{rewards_file}:text_nines"),
                  iterations=1)
    with pytest.raises(ConfigError, match="reward.kind=python.*cannot be vmapped.*reward.kind=jax"):
        vmap_values(cfg, {"ppo.kl_coef": ["0.1"]})  # refused before anything is built
    assert 0.0 <= train_ppo(cfg).train_metrics["score"] <= 1.0


def test_own_prompts_are_not_cut_to_the_tasks_prompt_length(tmp_path):
    task = get_task("sort")
    long = "sort " + " ".join(str(i % 10) for i in range(14)) + " :"
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": long}) + "\n" for _ in range(8)))
    base = ppo_cfg(tmp_path / "own")
    assert _prompt_length(base, task) == task.prompt_length  # the task's own prompts: its budget
    own = apply_overrides(base, [f"data.path={path}", "data.max_length=40"])
    assert _prompt_length(own, task) == 40 > len(long.split()) + 1


def test_data_summary_and_truncation_warning_at_start(tmp_path, capsys):
    args = ["sft", "task=sort", "model.name=task", "model.hidden_size=32", "model.intermediate_size=64",
            "data.batch_size=4", "log.progress=false", "log.tensorboard=false", "steps=1", "export=false",
            "eval_every=0", "eval_batches=1"]
    assert main([*args, "data.max_length=64", "--out", str(tmp_path / "fits")]) == 0
    err = capsys.readouterr().err
    assert "data: " in err and "truncated responses 0 (0%)" in err and "warning" not in err, err
    assert main([*args, "data.max_length=12", "data.pack=false", "--out", str(tmp_path / "cut")]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "are truncated to fit 12 tokens" in err, err
    rows = [r for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if "train/loss" in r]
    assert rows[-1]["train/data/truncated_response"] > 0  # and the counters are in the metrics


def test_a_vmapped_sweep_is_the_sequential_sweep_of_the_same_grid(tmp_path):
    """Same prompts in the same order, same initial params and keys: the vmapped program's runs equal
    the trainer's runs point by point (float tolerance), and --save-policies keeps each policy."""
    from rlhf_jax.sweeps import expand_points, run_sequential
    cfg = ppo_cfg(tmp_path / "base", iterations=2, checkpoint=CheckpointConfig(every=0, async_save=False))
    grid = {"ppo.kl_coef": ["0.0", "0.5"]}
    vm = run_vmapped_sweep(cfg, grid, seeds=2, out_dir=tmp_path / "vmap", save_policies=True)
    seq = run_sequential("", cfg, expand_points(grid, seeds=2), tmp_path / "seq")
    assert [r["overrides"] for r in seq] == [r["overrides"] for r in vm.rows]
    for a, b in zip(vm.rows, seq):
        assert "error" not in b, b
        for k in ("score", "kl", "policy_loss", "value_loss", "entropy"):
            assert a[f"train_metrics.{k}"] == pytest.approx(b[f"train_metrics.{k}"], rel=1e-4, abs=1e-5), (k, a, b)
    for row in vm.rows:
        name = f"{row['point']:03d}_" + "_".join(o.replace("=", "-") for o in row["overrides"])
        assert (tmp_path / "vmap" / name / "export" / "model.safetensors").exists(), name
