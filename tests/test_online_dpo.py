"""Online DPO on the RL core: preference labels and the loss by hand, pairs kept together in minibatches,
the on-policy ratio exactly 1, the judged reward rising on the tiny model, validation naming the key,
and the trainer through the CLI."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.cli import main as cli_main
from rlhf_jax.config import ConfigError
from rlhf_jax.rl import OnlineDPOConfig, OnlineDPOHParams, core, init_state, iteration, preference_labels
from rlhf_jax.training.optim import make_optimizer
from tests.test_grpo import OPTIM
from tests.test_grpo import parts  # noqa: F401  (the tiny target-fraction fixture)


def test_preference_labels_by_hand():
    s = jnp.asarray([0.2, 0.5, 1.0, 0.0, 0.3, 0.3])
    np.testing.assert_array_equal(preference_labels(s), [-1, 1, 1, -1, 0, 0])


def test_minibatch_loss_is_dpo_on_the_judged_pairs():
    cfg = OnlineDPOConfig(batch_size=3, max_new_tokens=2, hparams=OnlineDPOHParams(beta=0.5)).validate()
    rng = np.random.default_rng(0)
    logp = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    mask = jnp.asarray([[1, 1], [1, 0], [1, 1], [1, 1], [1, 0], [1, 1]], jnp.float32)
    scores = jnp.asarray([0.1, 0.9, 0.7, 0.2, 0.4, 0.4])  # pair 0: row 1 chosen, pair 1: row 0, pair 2: tie
    extra, m = cfg.advantages(None, None, scores, jnp.zeros((6, 2)))
    assert float(m["tie_fraction"]) == pytest.approx(1 / 3)
    batch = {"response_mask": mask, "ref_logp": ref * mask, "old_logp": logp * mask, **extra}
    loss, metrics = cfg.minibatch_loss({"logp": logp * mask, "entropy": jnp.zeros((6, 2))}, None, batch)
    seq, seq_ref = np.sum(np.asarray(logp * mask), 1), np.sum(np.asarray(ref * mask), 1)
    # by hand: the tie is dropped; -log σ(β[(π_c − ref_c) − (π_r − ref_r)]) averaged over the two pairs
    d = [(seq[1] - seq_ref[1]) - (seq[0] - seq_ref[0]), (seq[2] - seq_ref[2]) - (seq[3] - seq_ref[3])]
    want = np.mean([np.log1p(np.exp(-0.5 * x)) for x in d])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0)


def test_run_epochs_keeps_blocks_together():
    data = {"x": jnp.arange(12)}
    def step(carry, batch):
        return carry, {"x": batch["x"]}

    _, _, stacked = core.run_epochs(None, None, data, jax.random.PRNGKey(3), epochs=2, minibatches=3, step_fn=step,
                                    group=2)
    rows = np.asarray(stacked["x"]).reshape(-1, 2)
    assert np.all(rows[:, 0] % 2 == 0) and np.all(rows[:, 1] == rows[:, 0] + 1)
    for epoch in np.asarray(stacked["x"]):
        assert sorted(epoch.reshape(-1).tolist()) == list(range(12))
    _, _, plain = core.run_epochs(None, None, data, jax.random.PRNGKey(3), epochs=1, minibatches=3, step_fn=step)
    assert sorted(np.asarray(plain["x"]).reshape(-1).tolist()) == list(range(12))


def test_online_dpo_raises_the_judged_reward(parts):
    model, params, prompts, frozen = parts
    cfg = OnlineDPOConfig(batch_size=4, max_new_tokens=8, epochs=2, minibatches=2,
                          hparams=OnlineDPOHParams(beta=0.1, lr=2e-2))
    state = init_state(policy_model=model, policy_params=params,
                       policy_tx=make_optimizer(OPTIM, params, total_steps=1000), cfg=cfg)
    hist = []
    for _ in range(20):
        state, m = iteration(state, frozen, prompts, cfg=cfg)
        hist.append({k: float(v) for k, v in m.items()})
    assert all(h["first_ratio_mean"] == pytest.approx(1.0, abs=1e-6) for h in hist)
    first = np.mean([h["score"] for h in hist[:3]])
    last = np.mean([h["score"] for h in hist[-3:]])
    print(f"online DPO: target fraction {first:.3f} -> {last:.3f}, kl {hist[-1]['kl']:.3f}")
    assert last > first + 0.3
    assert hist[-1]["kl"] > 0


def test_online_dpo_config_errors_name_the_key():
    for kwargs, key in [(dict(loss_type="kto"), "online_dpo.loss_type"),
                        (dict(batch_size=3, minibatches=2), "online_dpo.minibatches"),
                        (dict(batch_size=0), "online_dpo.batch_size"),
                        (dict(hparams=OnlineDPOHParams(beta=0.0)), "online_dpo.beta"),
                        (dict(hparams=OnlineDPOHParams(label_smoothing=0.5)), "online_dpo.label_smoothing")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            OnlineDPOConfig(**kwargs).validate()


def test_online_dpo_cli_runs_and_writes_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["online_dpo", "--config", "experiments/online_dpo_sort_tiny.py", "iterations=2",
                   f"out_dir={out}", "log.every=1", "export=false", "online_dpo.batch_size=4"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "train/tie_fraction" in rows[0] and rows[0]["train/first_ratio_mean"] == 1.0
    assert cli_main(["online_dpo", "--config", "experiments/online_dpo_sort_tiny.py", "online_dpo.loss_type=kto",
                     f"out_dir={tmp_path / 'bad'}"]) == 2
    assert "online_dpo.loss_type" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
