"""Checkpoints: exact round trip, keep-last-K / every-N, and a SIGKILLed SFT run resumed exactly."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.training.checkpoint import CheckpointConfig, CheckpointManager
from rlhf_jax.training.metrics import read_jsonl
from tests.test_training_toy import toy_batch, toy_state, toy_step

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_is_exact_and_keeps_last_k(tmp_path):
    st = toy_state(freeze=("embed",))
    f = jax.jit(functools.partial(toy_step, cfg=1))
    extra = {"kl_ctl": {"beta": jnp.float32(0.1), "target": jnp.float32(6.0)}}
    with CheckpointManager(tmp_path, CheckpointConfig(every=2, keep=2)) as mgr:
        saved = {}
        for i in range(5):
            st, _ = f(st, toy_batch(i))
            step = int(st.step)
            if mgr.save(step, st, data_state={"epoch": 0, "position": step}, config={"lr": 0.01},
                        extra=extra):
                saved[step] = jax.device_get(st.arrays())
        assert sorted(saved) == [2, 4]  # every N steps only
        assert mgr.save(5, st, data_state={"epoch": 0, "position": 5}, config={"lr": 0.01},
                        extra=extra, force=True)
        mgr.wait()
        assert mgr.all_steps() == [4, 5]  # keep the last 2
        fresh = toy_state(freeze=("embed",))
        r = mgr.restore(fresh, extra_template=extra)
        assert r.step == 5 and r.data_state == {"epoch": 0, "position": 5} and r.config == {"lr": 0.01}
        for a, b in zip(jax.tree_util.tree_leaves(r.state.arrays()), jax.tree_util.tree_leaves(st.arrays())):
            np.testing.assert_array_equal(a, b)
        assert float(r.extra["kl_ctl"]["beta"]) == pytest.approx(0.1)
        r4 = mgr.restore(fresh, step=4)
        for a, b in zip(jax.tree_util.tree_leaves(r4.state.arrays()), jax.tree_util.tree_leaves(saved[4])):
            np.testing.assert_array_equal(a, b)
        # the restored state keeps training exactly like the original
        s1, m1 = f(r.state, toy_batch(9))
        s2, m2 = f(st, toy_batch(9))
        assert float(m1["loss"]) == float(m2["loss"])
        with pytest.raises(FileNotFoundError, match="step 3"):
            mgr.restore(fresh, step=3)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        CheckpointManager(tmp_path / "empty").restore(toy_state())


def _sft_cmd(out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_jax.cli", "sft", "task=sort", "model.name=task",
            f"steps={steps}", "data.batch_size=4", "data.max_length=32", "checkpoint.every=5",
            "checkpoint.keep=2", "log.every=1", "eval_every=0", "export=false",
            "log.progress=false", "optim.warmup_steps=3", "--out", str(out), *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _train_records(path: Path) -> dict[int, dict]:
    out = {}
    for r in read_jsonl(path):
        if "train/loss" in r:
            out[r["step"]] = r
    return out


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    steps = 20
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.Popen(_sft_cmd(full, steps), cwd=ROOT, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_sft_cmd(killed, steps), cwd=ROOT, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 500
    while time.time() < deadline and victim.poll() is None:
        done = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if done and max(done) >= 5:
            break
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(_train_records(killed / "metrics.jsonl"))
    assert killed_at < steps
    resumed = subprocess.run(_sft_cmd(killed, steps, "--resume"), cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ref.wait(timeout=500) == 0, ref.stderr.read()[-3000:]
    a, b = _train_records(full / "metrics.jsonl"), _train_records(killed / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    # the resumed run really restarted from a checkpoint, not from scratch
    run = (killed / "run.json").read_text()
    assert '"resume": true' in run
    assert a[steps]["train/loss"] < a[1]["train/loss"]
