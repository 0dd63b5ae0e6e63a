"""RSFT (rejection-sampling fine-tuning): the SFT batch it builds, one iteration keeps the best sample,
the trainer end to end raises the gold reward, config errors; and reward-model ensemble scoring."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax.rl.rsft import RSFTConfig, RSFTHParams, RSFTTrainConfig, sft_batch_of, train_rsft
from rlhf_jax.rl.trainer import RewardSection
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig, read_jsonl
from rlhf_jax.training.optim import OptimConfig

SMALL = ModelSection(name="task", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2, head_dim=16)


def rsft_cfg(out, **kw):
    base = RSFTTrainConfig(task="sentiment", policy=SMALL, reward=RewardSection(kind="gold"),
                           rsft=RSFTConfig(batch_size=16, num_samples=8, max_new_tokens=10, sft_epochs=4),
                           optim=OptimConfig(learning_rate=3e-3, schedule="constant", b2=0.999, max_grad_norm=1.0),
                           checkpoint=CheckpointConfig(every=0, async_save=False),
                           log=LogConfig(every=1, tensorboard=False, progress=False), iterations=16,
                           sample_every=0, out_dir=str(out), export=False)
    return dataclasses.replace(base, **kw)


def test_sft_batch_puts_the_loss_on_the_response_only():
    p_ids = jnp.array([[0, 5, 6], [7, 8, 9]])
    p_mask = jnp.array([[0, 1, 1], [1, 1, 1]])
    r_ids = jnp.array([[11, 12, 2], [13, 2, 0]])
    r_mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    b = sft_batch_of(p_ids, p_mask, r_ids, r_mask)
    np.testing.assert_array_equal(b["input_ids"][0], [0, 5, 6, 11, 12, 2])
    # position t predicts token t+1: the last prompt position predicts the first response token
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["targets"][1, 2:4], [13, 2])


def test_rsft_trainer_raises_gold_and_keeps_the_best(tmp_path):
    res = train_rsft(rsft_cfg(tmp_path / "run"))
    rows = read_jsonl(res.metrics_path)
    assert [r["step"] for r in rows] == list(range(1, 17))
    score = np.array([r["train/score"] for r in rows])
    best = np.array([r["train/best_score"] for r in rows])
    assert np.all(best >= score - 1e-6)           # the kept sample is each prompt's best
    assert score[-4:].mean() > score[:4].mean() + 0.15, score  # gold rises (0.15 -> 0.5 seen)
    assert rows[-1]["train/kl"] > 0.0              # the policy moved away from its start


def test_rsft_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"rsft\.num_samples"):
        train_rsft(rsft_cfg(tmp_path / "a", rsft=RSFTConfig(num_samples=1)))
    with pytest.raises(ConfigError, match=r"reward\.kind"):
        train_rsft(rsft_cfg(tmp_path / "b", reward=RewardSection(kind="python")))
    with pytest.raises(ConfigError, match=r"rsft\.temperature"):
        train_rsft(rsft_cfg(tmp_path / "c", rsft=RSFTConfig(hparams=RSFTHParams(temperature=0.0))))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    cfg = apply_overrides(rsft_cfg(tmp_path / "d"), ["rsft.temperature=0.5"])
    assert cfg.rsft.hparams.temperature == 0.5


def test_ensemble_aggregations_hand_computed():
    s = jnp.array([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    np.testing.assert_allclose(losses.aggregate_ensemble(s, "mean"), [2.0, 0.0, 1.0])
    np.testing.assert_allclose(losses.aggregate_ensemble(s, "wco"), [1.0, 0.0, 0.0])
    # uwo: mean - λ·var (ddof 0): var = (1, 0, 1)
    np.testing.assert_allclose(losses.aggregate_ensemble(s, "uwo", 0.5), [1.5, 0.0, 0.5])
    # λ traced and vmappable: λ = 0 is the mean
    lam = jnp.array([0.0, 2.0])
    got = jax.vmap(lambda l: losses.aggregate_ensemble(s, "uwo", l))(lam)
    np.testing.assert_allclose(got, [[2.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    with pytest.raises(ValueError, match="mean, wco|'mean', 'wco'"):
        losses.aggregate_ensemble(s, "max")
