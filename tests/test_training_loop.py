"""Host loop: metrics files (JSONL + TensorBoard), NaN guard with the last good checkpoint intact."""
from __future__ import annotations

import functools
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.training import loop, steps
from rlhf_jax.training.checkpoint import CheckpointConfig, CheckpointManager
from rlhf_jax.training.configs import MeshConfig
from rlhf_jax.training.metrics import (LogConfig, MetricsWriter, NonFiniteError, Throughput,
                                       check_finite, read_jsonl)
from tests.test_training_toy import toy_batch, toy_state, toy_sum_fn


class ListIterator:
    """Minimal resumable iterator over a list of batches (what the loop needs)."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos >= len(self.batches):
            raise StopIteration
        self.pos += 1
        return self.batches[self.pos - 1]

    def state(self):
        return {"pos": self.pos}

    def restore(self, s):
        self.pos = int(s["pos"])


def scaled_step(state, batch, *, cfg, axis_name=None):
    """Toy step whose loss is multiplied by ``batch['scale'][0]`` (a NaN there poisons it)."""
    def fn(params, b, rng):
        total, sums = toy_sum_fn(params, b, rng, apply_fn=state.apply_fn)
        s = b["scale"][0]
        return total * s, {**sums, "loss": (sums["loss"][0] * s, sums["loss"][1])}
    return steps.update_step(state, batch, fn, micro_batches=cfg, axis_name=axis_name)


def _batches(n, nan_at=None):
    out = []
    for i in range(n):
        b = toy_batch(i)
        b["scale"] = np.full((8,), np.nan if i + 1 == nan_at else 1.0, np.float32)
        out.append(b)
    return out


def read_tfrecords(path):
    """Payloads of a TFRecord (TensorBoard event) file: ``uint64 length, uint32 crc, payload,
    uint32 crc`` records that must tile the file exactly (crc32c is not in the stdlib)."""
    data = path.read_bytes()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        payload = data[i + 12:i + 12 + n]
        assert len(payload) == n
        out.append(payload)
        i += 12 + n + 4
    assert i == len(data)
    return out


def _run(tmp_path, batches, total, mesh=MeshConfig(), resume=False, **kw):
    placement = loop.make_placement(mesh)
    keys = ("input_ids", "targets", "loss_mask", "scale")
    job = loop.Job(
        name="toy", state=toy_state(), make_step=lambda placed: loop.compile_step(placement, scaled_step, placed, cfg=2),
        batches=ListIterator(batches), prepare=lambda b: loop.put(placement, {k: b[k] for k in keys}),
        total_steps=total, config_dict={"toy": True}, placement=placement,
        tokens=lambda b, m: float(b["input_ids"].size), flops_per_token=100.0, **kw)
    res = loop.run(job, out_dir=tmp_path, ckpt_cfg=CheckpointConfig(every=2, keep=2),
                   log_cfg=LogConfig(every=1, progress=False), resume=resume)
    return res.state, res


def test_metrics_jsonl_and_tensorboard_files(tmp_path):
    _, res = _run(tmp_path, _batches(4), 4,
                  eval_every=2, eval_fn=lambda st: {"loss": 1.5, "accuracy": 0.25})
    recs = read_jsonl(res.metrics_path)
    train = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(math.isfinite(r["train/loss"]) and r["train/tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in recs if "eval/loss" in r] == [2, 4]
    # TensorBoard event file: a real TFRecord stream of Event protos with our scalars
    from tensorboardX.proto import event_pb2
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    tags = {}
    for payload in read_tfrecords(files[0]):
        ev = event_pb2.Event.FromString(payload)
        for v in ev.summary.value:
            tags.setdefault(v.tag, []).append((ev.step, v.simple_value))
    assert [s for s, _ in tags["train/loss"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in tags["train/loss"]], [r["train/loss"] for r in train],
                               rtol=1e-6)
    assert tags["eval/accuracy"] == [(2, 0.25), (4, 0.25)]
    assert (tmp_path / "config.json").exists() and (tmp_path / "run.json").exists()
    assert res.final_step == 4 and sorted(CheckpointManager(res.checkpoint_dir).all_steps()) == [2, 4]


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step 5"):
        _run(tmp_path, _batches(8, nan_at=5), 8)
    mgr = CheckpointManager(tmp_path / "checkpoints", CheckpointConfig(every=2, keep=2))
    assert mgr.latest_step() == 4
    restored = mgr.restore(toy_state())
    assert int(restored.state.step) == 4 and restored.data_state == {"pos": 4}
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored.state.params))
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert max(r["step"] for r in recs) == 4  # the poisoned step was never logged


def test_existing_run_needs_resume(tmp_path):
    from rlhf_jax.config import ConfigError
    _run(tmp_path, _batches(2), 2)
    with pytest.raises(ConfigError, match="--resume"):
        _run(tmp_path, _batches(2), 2)


def test_check_finite_names_step_and_metric():
    check_finite({"loss": 1.0, "grad_norm": 2.0}, 3)
    with pytest.raises(NonFiniteError, match="grad_norm = inf at step 7"):
        check_finite({"loss": 1.0, "grad_norm": float("inf")}, 7)


def test_writer_disabled_on_other_hosts(tmp_path):
    w = MetricsWriter(tmp_path / "x", enabled=False)
    w.write(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "x").exists()


def test_throughput_and_mfu():
    t = Throughput(flops_per_token=6.0, peak_flops=1e3, n_devices=2)
    t.add(1000)
    out = t.read()
    assert out["tokens_per_s"] > 0
    np.testing.assert_allclose(out["mfu"], out["tokens_per_s"] * 6.0 / 2e3, rtol=1e-9)
    assert "mfu" not in Throughput(6.0, None).read()


def test_pmap_mode_matches_jit_mode_and_resumes(tmp_path):
    _, a = _run(tmp_path / "jit", _batches(4), 4)
    _, b = _run(tmp_path / "pmap", _batches(4), 3, mesh=MeshConfig(mode="pmap"))
    # continue the pmap run to 4 steps from its checkpoint (restored, then replicated)
    _, c = _run(tmp_path / "pmap", _batches(4), 4, mesh=MeshConfig(mode="pmap"), resume=True)
    assert c.resumed_from == 3
    ja = [r["train/loss"] for r in read_jsonl(a.metrics_path) if "train/loss" in r]
    pb = [r["train/loss"] for r in read_jsonl(c.metrics_path) if "train/loss" in r]
    np.testing.assert_allclose(pb, ja, rtol=1e-6)
