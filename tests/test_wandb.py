"""Weights & Biases tracking (the optional ``wandb`` extra): MetricsWriter logs the same scalars to an
offline W&B run under the run directory, and a missing wandb is a ConfigError naming ``log.wandb``."""
import glob
import importlib.util
import json
import struct
import time

import pytest

from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax.training.configs import RunConfig
from rlhf_jax.training.metrics import LogConfig, MetricsWriter


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb, with its own cache/config/data directories in tmp_path and no network."""
    pytest.importorskip("wandb")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return tmp_path


def _records(path):
    """The protobuf records of a ``.wandb`` file (a LevelDB-style log: 7-byte file header, 32 KiB
    blocks, each record chunk ``crc32 (4) | length (2) | type (1: full, 2: first, 3: middle, 4: last)``)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _complete_records(path, timeout=60.0):
    """The records once the run's ``exit`` record is on disk (W&B's service process writes the file)."""
    deadline = time.monotonic() + timeout
    while True:
        records = _records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _items(items):
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def test_metrics_writer_logs_to_an_offline_wandb_run(wandb_env):
    run_dir = wandb_env / "run"
    config = {"seed": 3, "task": "sort", "log": {"wandb": True, "wandb_mode": "offline",
                                                 "wandb_project": "rlhf_jax_test", "wandb_run_name": "t1"}}
    writer = MetricsWriter(run_dir, tensorboard=False, enabled=True, config=config)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "kl": 0.1 * step})
    writer.write(3, {"accuracy": 0.75}, prefix="eval")
    writer.write_text(3, "samples", "prompt <b> response")
    writer.close()
    writer.close()  # idempotent

    # the JSONL file is unchanged by wandb
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 3]

    runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs
    files = glob.glob(runs[0] + "/*.wandb")
    assert len(files) == 1
    records = _complete_records(files[0])
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2, 3], [r.WhichOneof("record_type") for r in records]
    assert history[0]["train/loss"] == 1.0 and history[1]["train/kl"] == pytest.approx(0.2)
    last = history[-1]
    assert last["train/loss"] == pytest.approx(1 / 3) and last["eval/accuracy"] == 0.75
    assert last["samples/_type"] == "html-file"  # write_text: an HTML panel
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["train/loss"] == pytest.approx(1 / 3) and summary["train/kl"] == pytest.approx(0.3)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "rlhf_jax_test" and run.display_name == "t1"
    run_config = _items(run.config.update)
    assert run_config["seed"] == 3 and run_config["log"]["wandb"] is True


def test_log_cfg_argument_and_disabled_writers(wandb_env):
    # log_cfg overrides the config's log section; a writer that is not process 0's logs nothing
    MetricsWriter(wandb_env / "off", tensorboard=False, enabled=True, config={"log": {"wandb": False}}).close()
    assert not (wandb_env / "off" / "wandb").exists()
    MetricsWriter(wandb_env / "other", tensorboard=False, enabled=False,
                  log_cfg=LogConfig(wandb=True)).close()
    assert not (wandb_env / "other").exists()
    w = MetricsWriter(wandb_env / "on", tensorboard=False, enabled=True,
                      log_cfg=LogConfig(wandb=True, wandb_mode="offline"), config={"seed": 0})
    w.write(5, {"loss": 2.0})
    w.close()
    assert glob.glob(str(wandb_env / "on" / "wandb" / "offline-run-*" / "*.wandb"))


def test_log_config_wandb_keys_and_validation(monkeypatch):
    cfg = apply_overrides(RunConfig(), ["log.wandb=true", "log.wandb_mode=disabled", "log.wandb_run_name=x"])
    assert cfg.log == LogConfig(wandb=True, wandb_mode="disabled", wandb_run_name="x")
    with pytest.raises(ConfigError, match="log.wandb_mode"):
        LogConfig(wandb_mode="sometimes").validate()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'log.wandb'.*pip install 'rlhf_jax\[wandb\]'"):
        LogConfig(wandb=True).validate()
    LogConfig(wandb=False).validate()  # no wandb needed when it is off


def test_a_trainer_run_with_log_wandb_writes_an_offline_run(wandb_env):
    from rlhf_jax.cli import main
    out = wandb_env / "sft"
    rc = main(["sft", "task=sort", "model.name=task", "model.hidden_size=32", "model.intermediate_size=64",
               "data.batch_size=4", "data.max_length=32", "steps=2", "eval_every=0", "eval_batches=1", "export=false",
               "log.progress=false", "log.tensorboard=false", "log.every=1", "log.wandb=true",
               "log.wandb_project=rlhf_jax_test", "--out", str(out)])
    assert rc == 0
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(runs) == 1, runs
    records = _complete_records(runs[0])
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2] and "train/loss" in history[0]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert _items(run.config.update)["steps"] == 2  # the run's resolved config
