"""LoRA in every trainer: SFT, reward model, DPO, GRPO and PPO (tiny, a few steps each).

Each run checks what LoRA promises: the base never moves and has no optimiser state, the adapters
(and a scalar head) train, the reference is the base with the adapters off (first-step KL / DPO
margin exactly 0, no reference params held), and the export is the merged model plus the adapters
in PEFT's format, which rebuild the same logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.config import ConfigError, apply_overrides, load_config_file
from rlhf_jax.models import lora
from rlhf_jax.rl import trainer as rl_trainer
from rlhf_jax.rl.dpo import DPOTrainConfig, train_dpo
from rlhf_jax.data import load_tokenizer
from rlhf_jax.tasks import get_task
from rlhf_jax.training import reward as reward_mod
from rlhf_jax.training.common import build_model
from rlhf_jax.training import sft as sft_mod

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["task=sort", "model.name=task", "model.hidden_size=32", "model.intermediate_size=64",
         "data.batch_size=4", "data.max_length=32", "log.progress=false", "checkpoint.every=0", "eval_batches=1"]


def _metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _array_sizes(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree) if np.ndim(x) > 0)


def _assert_frozen_base(params, initial, opt_state):
    """The base equals its start; the optimiser holds moments of the trainable leaves only."""
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           {k: v for k, v in params["params"].items() if k not in lora.HEAD_KEYS},
                           {k: v for k, v in initial["params"].items() if k not in lora.HEAD_KEYS})
    trainable = _array_sizes(params["lora"]) + _array_sizes(
        {k: v for k, v in params["params"].items() if k in lora.HEAD_KEYS})
    assert _array_sizes(opt_state) == 2 * trainable
    assert float(jnp.abs(params["lora"]["model"]["layers_0"]["attn"]["q_proj"]["b"]).max()) > 0


def _export_matches(export_dir, lora_model, params):
    """The merged export and base + the exported PEFT adapter both give the run's own logits."""
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 20, (2, 7)), jnp.int32)
    ours = lora_model.apply(params, ids)
    m, p = models.from_pretrained(export_dir)
    np.testing.assert_allclose(m.apply(p, ids), ours, atol=1e-4)
    cfg, ad = lora.load_peft_adapter(Path(export_dir) / "adapter", lora_model.config)
    assert cfg.rank == lora_model.lora.rank and cfg.scale == pytest.approx(lora_model.lora.scale)
    np.testing.assert_allclose(lora.wrap(lora_model.model, cfg).apply({"params": params["params"], "lora": ad}, ids),
                               ours, atol=1e-5)


def test_sft_and_reward_with_lora(tmp_path):
    cfg = apply_overrides(sft_mod.SFTConfig(), SMALL + [f"out_dir={tmp_path / 'sft'}", "steps=3", "eval_every=0",
                                                        "model.lora_rank=4", "optim.learning_rate=1e-2"])
    res = sft_mod.train_sft(cfg)
    task = get_task("sort")
    start = build_model(cfg.model, task=task, tokenizer=load_tokenizer(task.tokenizer_dir), head=None,
                        rng=jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1))[1]  # what train_sft started from
    _assert_frozen_base(res.state.params, start, res.state.opt_state)
    _export_matches(res.export_dir, res.model, res.state.params)

    rcfg = apply_overrides(reward_mod.RewardConfig(), SMALL + [
        f"out_dir={tmp_path / 'rm'}", "steps=2", "eval_every=0", "model.lora_rank=2", "data.pack=false",
        f"model.path={res.export_dir}", "optim.learning_rate=1e-2"])
    rres = reward_mod.train_reward(rcfg)
    p = rres.state.params
    assert set(p) == {"params", "lora"} and "score" in p["params"]
    _, start = models.from_pretrained(res.export_dir, head="scalar", rng=jax.random.PRNGKey(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, p["params"]["model"], start["params"]["model"])
    assert _array_sizes(rres.state.opt_state) == 2 * (_array_sizes(p["lora"]) + _array_sizes(p["params"]["score"]))
    # the export is the merged scalar model: same rewards as the run's LoRA model
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 20, (2, 7)), jnp.int32)
    m, mp = models.from_pretrained(rres.export_dir, head="scalar")
    np.testing.assert_allclose(m.apply(mp, ids), rres.model.apply(p, ids), atol=1e-4)


def test_dpo_with_lora_reference_is_the_base(tmp_path):
    cfg = apply_overrides(load_config_file(ROOT / "experiments" / "dpo_sentiment_tiny.py"), [
        f"out_dir={tmp_path}", "steps=2", "eval_every=0", "policy.lora_rank=4", "policy.path=", "policy.name=task",
        "policy.hidden_size=32", "policy.intermediate_size=64", "log.every=1", "log.progress=false",
        "checkpoint.every=0", "data.batch_size=4", "dpo.lr=1e-2"])
    assert isinstance(cfg, DPOTrainConfig)
    res = train_dpo(cfg)
    rows = [r for r in _metrics(tmp_path) if "train/chosen_reward" in r]
    assert len(rows) == 2
    first = rows[0]
    # B = 0 at the start: the policy IS the reference (the base with the adapters off)
    assert abs(first["train/reward_margin"]) < 1e-5 and abs(first["train/chosen_reward"]) < 1e-5
    assert abs(rows[-1]["train/chosen_reward"]) > 1e-3
    assert lora.is_lora_params(res.state.params)
    assert (Path(res.export_dir) / "adapter" / "adapter_model.safetensors").is_file()


def test_grpo_lora_tiny_experiment_end_to_end(tmp_path):
    cfg = apply_overrides(load_config_file(ROOT / "experiments" / "grpo_lora_sort_tiny.py"), [
        f"out_dir={tmp_path}", "iterations=3", "log.every=1"])
    built = rl_trainer._build(cfg)
    assert built.setup.frozen.ref_params is None  # the reference is read from the policy's own base
    res = rl_trainer.train_grpo(cfg)
    rows = _metrics(tmp_path)
    # zero-initialised adapters: the policy is its base at the first iteration (KL 0 up to float rounding:
    # the sampled log-probs and the reference forward are separate computations in the program)
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["train/first_ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    pol = res.state.policy
    _assert_frozen_base(pol.params, built.setup.policy_params, pol.opt_state)
    _export_matches(res.export_dir, res.model, pol.params)


def test_ppo_lora_critic_has_its_own_adapters(tmp_path):
    cfg = apply_overrides(load_config_file(ROOT / "experiments" / "ppo_lora_sort_tiny.py"), [
        f"out_dir={tmp_path}", "iterations=2", "log.every=1"])
    built = rl_trainer._build(cfg)
    res = rl_trainer.train_ppo(cfg)
    rows = _metrics(tmp_path)
    assert rows[0]["train/kl"] == 0.0 and np.isfinite(rows[-1]["train/value_loss"])
    _assert_frozen_base(res.state.policy.params, built.setup.policy_params, res.state.policy.opt_state)
    v = res.state.value
    assert isinstance(built.setup.value_model, lora.LoraModel)
    _assert_frozen_base(v.params, built.setup.value_params, v.opt_state)
    assert float(jnp.abs(v.params["params"]["score"]["kernel"] - built.setup.value_params["params"]["score"]["kernel"]
                         ).max()) > 0


def test_ppo_lora_policy_with_a_fully_trained_critic(tmp_path):
    # value_lora=full: the policy trains adapters, the critic all its weights (a plain tree, every leaf moves)
    cfg = apply_overrides(load_config_file(ROOT / "experiments" / "ppo_lora_sort_tiny.py"), [
        f"out_dir={tmp_path}", "iterations=2", "log.every=1", "value_lora=full"])
    built = rl_trainer._build(cfg)
    assert isinstance(built.setup.policy_model, lora.LoraModel)
    assert not isinstance(built.setup.value_model, lora.LoraModel) and not lora.is_lora_params(built.setup.value_params)
    res = rl_trainer.train_ppo(cfg)
    _assert_frozen_base(res.state.policy.params, built.setup.policy_params, res.state.policy.opt_state)
    v = res.state.value
    q = v.params["params"]["model"]["layers_0"]["attn"]["q_proj"]["kernel"]
    q0 = built.setup.value_params["params"]["model"]["layers_0"]["attn"]["q_proj"]["kernel"]
    assert float(jnp.abs(q - q0).max()) > 0
    assert _array_sizes(v.opt_state) >= 2 * _array_sizes(v.params)
    with pytest.raises(ConfigError, match="value_lora"):
        rl_trainer._build(apply_overrides(cfg, ["value_lora=some"]))


def test_lora_config_errors_name_the_key(tmp_path):
    cfg = load_config_file(ROOT / "experiments" / "grpo_lora_sort_tiny.py")
    for override, key in ((["policy.lora_dropout=0.1"], "policy.lora_dropout"),
                          (["policy.lora_rank=-1"], "policy.lora_rank"),
                          ([f"policy.lora_path={tmp_path}"], "policy.lora_path"),
                          (["policy.lora_targets=[\"nope\"]"], "policy.lora_targets")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            c = apply_overrides(cfg, override + [f"out_dir={tmp_path / 'x'}"])
            rl_trainer._build(c)
    assert not (tmp_path / "x").exists()
