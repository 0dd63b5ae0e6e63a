"""SFT and reward-model trainers on the real tiny models: steps, config errors, export, normalisation."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax.losses import bradley_terry_loss, ranking_loss, sft_loss
from rlhf_jax.training import make_optimizer, OptimConfig, TrainState
from rlhf_jax.training import sft as sft_mod, reward as reward_mod
from rlhf_jax.training.metrics import read_jsonl

CFG = models.tiny_config(vocab_size=64, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                         intermediate_size=64, max_position_embeddings=32)


def _state(model, lr=1e-2):
    params = models.init_params(model, jax.random.PRNGKey(0))
    tx = make_optimizer(OptimConfig(learning_rate=lr, max_grad_norm=1.0), params, total_steps=10)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=0)


def _sft_batch(seed, b=4, t=16):
    r = np.random.RandomState(seed)
    ids = r.randint(3, 64, size=(b, t)).astype(np.int32)
    lens = r.randint(4, t + 1, size=(b,))
    attn = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    loss = attn.copy()
    loss[:, :2] = 0  # a 2-token "prompt"
    loss[np.arange(b), lens - 1] = 0  # the last real token predicts nothing
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": loss,
            "attention_mask": attn, "positions": np.maximum(np.cumsum(attn, 1) - 1, 0).astype(np.int32),
            "segment_ids": attn.copy()}


def test_sft_step_loss_and_accumulation():
    model = models.CausalLM(CFG)
    st = _state(model)
    b = _sft_batch(0)
    logits = jax.jit(model.apply)(st.params, b["input_ids"], attention_mask=b["attention_mask"],
                                  positions=b["positions"], segment_ids=b["segment_ids"])
    want, _ = sft_loss(logits, b["targets"], b["loss_mask"])
    f1 = jax.jit(functools.partial(sft_mod.sft_step, cfg=sft_mod.SFTStepConfig(1)))
    f2 = jax.jit(functools.partial(sft_mod.sft_step, cfg=sft_mod.SFTStepConfig(2)))
    s1, m1 = f1(st, b)
    s2, m2 = f2(st, b)
    np.testing.assert_allclose(m1["loss"], want, rtol=1e-6)
    np.testing.assert_allclose(m2["loss"], want, rtol=1e-6)
    assert float(m1["count"]) == b["loss_mask"].sum()
    for x, y in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
        np.testing.assert_allclose(x, y, atol=1e-5)  # Adam amplifies ~1e-7 grad noise
    s3, m3 = f1(s1, b)
    assert float(m3["loss"]) < float(m1["loss"])  # it learns


def test_reward_step_pairs_and_rankings_match_losses():
    model = models.ScalarHeadModel(CFG)
    st = _state(model)
    r = np.random.RandomState(1)
    ids = r.randint(3, 64, size=(4, 12)).astype(np.int32)
    cm = (np.arange(12)[None] < np.array([[5], [12], [7], [9]])).astype(np.int32)
    rm = (np.arange(12)[None] < np.array([[8], [3], [12], [6]])).astype(np.int32)
    batch = {"chosen_ids": ids, "chosen_mask": cm, "rejected_ids": ids[::-1].copy(), "rejected_mask": rm,
             "margin": np.array([0.0, 0.5, 0.0, 1.0], np.float32),
             "example_mask": np.array([1, 1, 1, 0], np.int32)}  # last pair is padding
    seq_rewards = jax.jit(functools.partial(reward_mod.sequence_rewards, model.apply))
    rc = seq_rewards(st.params, ids, cm)
    rr = seq_rewards(st.params, batch["rejected_ids"], rm)
    want, met = bradley_terry_loss(rc, rr, margin=batch["margin"], center_coef=0.01,
                                   mask=batch["example_mask"])
    cfg = reward_mod.RewardStepConfig(micro_batches=2, center_coef=0.01)
    _, m = jax.jit(functools.partial(reward_mod.reward_step, cfg=cfg))(st, batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], met["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(m["margin"], met["margin"], rtol=1e-5)
    assert float(m["count"]) == 3.0
    # rankings: K = 3, the second prompt has only 2 responses
    rids = r.randint(3, 64, size=(2, 3, 10)).astype(np.int32)
    rmask = np.ones((2, 3, 10), np.int32)
    rmask[:, :, 8:] = 0
    ranks = np.array([[2, 0, 1], [1, 0, 0]], np.int32)
    rank_mask = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
    rb = {"response_ids": rids, "response_mask": rmask, "ranks": ranks, "rank_mask": rank_mask}
    rew = seq_rewards(st.params, rids.reshape(6, 10), rmask.reshape(6, 10)).reshape(2, 3)
    want_r, _ = ranking_loss(rew, ranks, rank_mask)
    _, mr = jax.jit(functools.partial(reward_mod.reward_step, cfg=reward_mod.RewardStepConfig(2)))(st, rb)
    np.testing.assert_allclose(mr["loss"], want_r, rtol=1e-5)
    rew = np.asarray(rew)
    want_margin = ((rew[0, 1] - rew[0, 0]) + (rew[1, 1] - rew[1, 0])) / 2
    np.testing.assert_allclose(mr["margin"], want_margin, rtol=1e-5)


SFT_ARGS = ["task=sort", "model.name=task", "model.hidden_size=32", "model.intermediate_size=64",
            "data.batch_size=4", "data.max_length=32", "log.progress=false", "checkpoint.every=0",
            "eval_batches=1"]


def _sft_cfg(tmp_path, *extra):
    return apply_overrides(sft_mod.SFTConfig(), SFT_ARGS + [f"out_dir={tmp_path}", *extra])


@pytest.mark.parametrize("override,key", [
    (["data.batch_sise=4"], "data.batch_sise"),
    (["optim.learning_rate=fast"], "optim.learning_rate"),
    (["steps=1.5"], "steps"),
])
def test_override_errors_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _sft_cfg(tmp_path, *override)


@pytest.mark.parametrize("override,key", [
    (["data.path=/nonexistent/train.jsonl"], "data.path"),
    (["model.path=/nonexistent/model"], "model.path"),
    (["data.tokenizer=/nonexistent/tok"], "data.tokenizer"),
    (["mesh.data=2"], "mesh.data"),
    (["micro_batches=3"], "micro_batches"),
    (["task=nope"], "task"),
    (["steps=0"], "steps"),
])
def test_bad_values_fail_before_anything_is_built(tmp_path, monkeypatch, override, key):
    def boom(*a, **k):
        raise AssertionError("build_model called before validation finished")
    monkeypatch.setattr(sft_mod, "build_model", boom)
    monkeypatch.setattr(reward_mod, "build_model", boom)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        sft_mod.train_sft(_sft_cfg(tmp_path / "run", *override))
    rcfg = apply_overrides(reward_mod.RewardConfig(),
                           [a for a in SFT_ARGS] + [f"out_dir={tmp_path / 'rm'}", *override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        reward_mod.train_reward(rcfg)
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_devices(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(ConfigError, match=r"'data\.batch_size'.*8 devices"):
        sft_mod.train_sft(_sft_cfg(tmp_path, "data.batch_size=4"))


def test_sft_cli_trains_evaluates_and_exports(tmp_path):
    from rlhf_jax.cli import main
    out = tmp_path / "sft"
    rc = main(["sft", *SFT_ARGS, "steps=4", "eval_every=2", "optim.learning_rate=1e-2",
               "optim.warmup_steps=0", "log.every=1", "--out", str(out)])
    assert rc == 0
    recs = read_jsonl(out / "metrics.jsonl")
    train = [r for r in recs if "train/loss" in r]
    evals = [r for r in recs if "eval/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    # the data layer's counters reach the run's metrics, and grow as training reads more
    assert train[-1]["train/data/examples"] >= train[0]["train/data/examples"] > 0
    assert "train/data/truncated_prompt" in train[-1] and "train/data/skipped" in train[-1]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] + 0.5
    assert json.loads((out / "config.json").read_text())["steps"] == 4
    # the export is a HF directory our loader (and transformers) reads, with the same logits
    model, params = models.from_pretrained(str(out / "export"))
    assert (out / "export" / "tokenizer.json").exists() or (out / "export" / "tokenizer_config.json").exists()
    from rlhf_jax.training.checkpoint import CheckpointManager
    cfg = _sft_cfg(out)
    tx = make_optimizer(cfg.optim, params, total_steps=4)
    template = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=0)
    restored = CheckpointManager(out / "checkpoints").restore(template)
    assert restored.step == 4
    ids = jnp.arange(3, 13, dtype=jnp.int32)[None]
    np.testing.assert_allclose(model.apply(params, ids), model.apply(restored.state.params, ids),
                               atol=1e-6)


def test_reward_trainer_normalises_on_calibration_set(tmp_path):
    out = tmp_path / "rm"
    cfg = apply_overrides(reward_mod.RewardConfig(), SFT_ARGS + [
        "steps=2", "eval_every=2", "normalize=true", "calibration_batches=1", "micro_batches=2",
        "optim.learning_rate=1e-3", f"out_dir={out}", "data.pack=false"])
    res = reward_mod.train_reward(cfg)
    assert set(res.eval_metrics) >= {"loss", "accuracy", "margin"}
    shift = res.extra["reward_shift"]
    assert reward_mod.load_reward_shift(res.export_dir) == pytest.approx(shift)
    # calibration responses score mean 0 after the shift, with the exported model
    from rlhf_jax.data import load_tokenizer, make_iterator
    from rlhf_jax.tasks import get_task
    task = get_task("sort")
    model, params = models.from_pretrained(res.export_dir, head="scalar")
    it = make_iterator(cfg.data, "sft", tokenizer=load_tokenizer(task.tokenizer_dir),
                       source=task.sft_records("validation"), batch_size=4, shuffle=False,
                       num_epochs=1, pack=False)
    b = next(it)
    r = reward_mod.sequence_rewards(model.apply, params, b["input_ids"], b["attention_mask"])
    assert abs(float(jnp.mean(r)) + shift) < 1e-4
    assert abs(shift) > 1e-6
    # the shift is in the final checkpoint too
    from rlhf_jax.training.checkpoint import CheckpointManager
    tx = make_optimizer(cfg.optim, params, total_steps=2)
    template = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=0)
    rest = CheckpointManager(out / "checkpoints").restore(
        template, extra_template={"reward_shift": jnp.float32(0)})
    assert float(rest.extra["reward_shift"]) == pytest.approx(shift, rel=1e-6)
