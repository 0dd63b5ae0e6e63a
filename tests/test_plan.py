"""``rlhf-jax plan``: the trainers' programs compiled ahead of time for a target's devices from abstract
shapes, checked on 8 fake CPU devices (no libtpu needed) against the same programs compiled from real
arrays, and the FLOP count against a hand count; the CLI's JSON and its errors; nothing is written."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from rlhf_jax import devices as devices_lib
from rlhf_jax.config import ConfigError
from rlhf_jax.plan import parse_topology_name, topology
from rlhf_jax.training import loop
from rlhf_jax.training.configs import MeshConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = r"""
import dataclasses, json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from rlhf_jax import models, plan
from rlhf_jax.config import load_config_file
from rlhf_jax.data import load_tokenizer
from rlhf_jax.training import loop, sft
from rlhf_jax.training.common import build_model, get_task_or_none, resolve_tokenizer_dir
from rlhf_jax.training.optim import make_optimizer
from rlhf_jax.training.state import TrainState
assert jax.device_count() == 8
topo = plan.topology("cpu:8")
out = {{}}

# 1. SFT: the plan's program (abstract build) == the trainer's program compiled from real arrays
cfg = load_config_file({root!r} + "/experiments/sft_sort_tiny.py")
cfg = dataclasses.replace(cfg, out_dir={out!r} + "/sft", mesh=dataclasses.replace(cfg.mesh, data=4, fsdp=2),
                          data=dataclasses.replace(cfg.data, batch_size=16))
rep = plan.plan(cfg, topo)
assert [p["name"] for p in rep["programs"]] == ["sft_step"], rep["programs"]
assert rep["mesh"] == {{"runs": 1, "data": 4, "fsdp": 2}}, rep["mesh"]
task = get_task_or_none(cfg.task)
tok_dir = resolve_tokenizer_dir(cfg.data.tokenizer, cfg.model.path, task)
tok = load_tokenizer(tok_dir)
placement = loop.make_placement(cfg.mesh)
model, params, mconfig = build_model(cfg.model, task=task, tokenizer=tok, head=None,
                                     rng=jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1))
state = TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(cfg.optim, params, total_steps=cfg.steps),
                          rng=jax.random.PRNGKey(0))
placed = loop.place_state(placement, state)
step = loop.compile_step(placement, sft.sft_step, placed, cfg=sft.SFTStepConfig(cfg.micro_batches, cfg.reduction))
it = sft.make_iterator(dataclasses.replace(cfg.data, tokenizer=tok_dir), "sft", tokenizer=tok,
                       source=task.sft_records("train"), host_id=0, num_hosts=1, batch_size=16, seed=0)
batch = loop.put(placement, {{k: v for k, v in next(it).items() if k in sft.SFT_BATCH_KEYS}})
real = plan.memory_bytes(step.lower(placed, batch).compile())
got = rep["programs"][0]
out["sft_real"] = real
out["sft_plan"] = {{k: got[k] for k in real}}
# the hand count: 6 N + 6 L H Dh T per token (PaLM, causal attention halved), N = matmul params (no input embedding)
c = mconfig
n = c.num_layers * (c.hidden_size * c.num_heads * c.head_dim + 2 * c.hidden_size * c.num_kv_heads * c.head_dim
                    + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size) \
    + c.hidden_size * c.vocab_size
T = cfg.data.max_length
out["sft_hand_flops"] = (6 * n + 6 * c.num_layers * c.num_heads * c.head_dim * T) * 16 * T
out["sft_model_flops"] = got["model_flops_per_device"] * rep["num_devices"]
out["sft_compiler_flops"] = got["compiler_flops"]

# 2. GRPO: the fused iteration, from the trainer's own set-up
g = load_config_file({root!r} + "/experiments/grpo_sort_tiny.py")
g = dataclasses.replace(g, out_dir={out!r} + "/grpo")
rep_g = plan.plan(g, topo)
out["grpo"] = [(p["name"], p["fits"], p["per_device_bytes"] > 0, p["flops"] > 0) for p in rep_g["programs"]]

# 3. a vmapped sweep of 8 runs over runs=4 x fsdp=2
from rlhf_jax.training.configs import MeshConfig
rep_s = plan.plan(g, topo, sweep={{"grid": {{"grpo.lr": ["1e-4", "2e-4"]}}, "seeds": 4,
                                  "mesh": MeshConfig(runs=4, fsdp=2)}})
out["sweep"] = {{"mesh": rep_s["mesh"], "names": [p["name"] for p in rep_s["programs"]], "runs": rep_s["sweep"]["runs"]}}
print("RESULT", json.dumps(out))
"""


def _run(script: str, tmp_path, timeout=900):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_plan_matches_real_compile_and_hand_flops_on_8_cpu_devices(tmp_path):
    res = _run(SCRIPT.format(root=str(ROOT), out=str(tmp_path)), tmp_path)
    # the same program: every byte count of the memory analysis agrees
    assert res["sft_plan"] == res["sft_real"], res
    assert res["sft_plan"]["argument_bytes"] > 0
    # model FLOPs are the hand count; the compiler's own count of this loop-free step is of its size (above
    # it by the elementwise work -- Adam over each device's shard, softmax, norms -- large for a tiny model)
    assert res["sft_model_flops"] == pytest.approx(res["sft_hand_flops"], rel=1e-9)
    ratio = res["sft_compiler_flops"] * 8 / res["sft_model_flops"]
    assert 0.9 < ratio < 2.0, ratio
    assert res["grpo"] == [["grpo_iteration", True, True, True]], res["grpo"]
    assert res["sweep"] == {"mesh": {"runs": 4, "data": 1, "fsdp": 2}, "names": ["sweep_vmapped"], "runs": 8}
    assert not (tmp_path / "sft").exists() and not (tmp_path / "grpo").exists()  # a plan writes no run


def test_cli_json_keys_and_nothing_written(tmp_path):
    out_json = tmp_path / "plan.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the command asks for the fake devices itself
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "plan", "--config", str(ROOT / "experiments/sft_sort_tiny.py"),
                        "--topology", "cpu:4", "--json", str(out_json), f"out_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out_json.read_text())
    assert rep["topology"] == "cpu:4" and rep["num_devices"] == 4
    prog = rep["programs"][0]
    for key in ("name", "per_device_bytes", "hbm_bytes_per_device", "fits", "flops", "roofline_seconds"):
        assert key in prog, key
    assert prog["name"] == "sft_step" and prog["fits"] is True and prog["roofline_seconds"] > 0
    assert "sft_step" in r.stdout and "fits" in r.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v9x-16"], "unknown accelerator 'v9x'"),
    (["--topology", "v5p-3"], "TensorCores"),
    (["--topology", "cpu:8", "data.batch_size=12"], "'data.batch_size'"),
    (["--topology", "cpu:8", "--mesh", "runs=2"], "--vmap-grid"),
])
def test_cli_errors_name_what_is_wrong(tmp_path, argv, message):
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "plan", "--config",
                        str(ROOT / "experiments/sft_sort_tiny.py"), *argv, f"out_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_tpu_topology_without_libtpu_says_how_to_get_it():
    import importlib.util
    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed here: the TPU path is exercised by the README's plans")
    with pytest.raises(ConfigError, match=r"rlhf_jax\[plan\]"):
        topology("v5e-16")


def test_topology_names():
    assert parse_topology_name("v5p-64") == ("v5p", 64)
    assert parse_topology_name("v5litepod-16") == ("v5e", 16)
    assert parse_topology_name("cpu:8") == ("cpu", 8)
    with pytest.raises(ConfigError, match="expected a TPU slice"):
        parse_topology_name("sixteen")


def test_targeting_decides_device_count_and_platform():
    devs = jax.devices()[:1]
    with devices_lib.targeting(devs * 1, abstract=True):
        assert devices_lib.device_count() == 1 and devices_lib.abstract()
        assert devices_lib.platform() == devs[0].platform
        with pytest.raises(ConfigError, match="pmap is not planned"):
            loop.make_placement(MeshConfig(mode="pmap", data=-1, fsdp=1))
    assert not devices_lib.abstract() and devices_lib.target() is None


def test_a_program_the_compiler_refuses_for_memory_is_reported_as_not_fitting():
    from rlhf_jax import plan as plan_lib
    topo = plan_lib.Topology(name="v5p-16", platform="tpu", devices=tuple(jax.devices()[:1]), device_kind="TPU v5",
                             hbm_bytes_per_device=95 * 2 ** 30, peak_flops_per_device=459e12,
                             hbm_bandwidth_per_device=2.765e12, source="test")
    prog = loop.Program("ppo_iteration", None, (), {}, model_flops=4.59e14)
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(359.34G) exceeds available HBM (95.74G).")
    rep = plan_lib._refused_report(prog, topo, 4.59e14, msg, 1.0)
    assert rep["fits"] is False and rep["per_device_bytes"] == pytest.approx(359.34 * 2 ** 30)
    assert rep["roofline_seconds"] == pytest.approx(1.0) and rep["compiler_refused"].startswith("RESOURCE_EXHAUSTED")
    text = plan_lib.format_report({"trainer": "ppo", "topology": "v5p-16", "num_devices": 1, "device_kind": "TPU v5",
                                   "num_processes": 1, "mesh": {"runs": 1, "data": 1, "fsdp": 1},
                                   "hbm_bytes_per_device": 95 * 2 ** 30, "peak_flops_per_device": 459e12,
                                   "hbm_bandwidth_per_device": 2.765e12, "device_figures": "test",
                                   "programs": [{**rep, "advice": ["x"]}], "notes": []})
    assert "NO" in text and "the compiler refused it" in text and ">= 359.34" in text


def test_a_plan_compiles_the_largest_bucket_not_the_first_batch(tmp_path):
    """Preference batches are padded to the shortest bucket that fits them; a plan compiles the longest
    (``data.max_length``), whatever the data's lengths: its model FLOPs count max_length tokens per row."""
    from rlhf_jax import models, plan as plan_lib
    from rlhf_jax.config import apply_overrides, load_config_file
    cfg = apply_overrides(load_config_file(str(ROOT / "experiments/reward_sentiment_tiny.py")),
                          ["model.path=", "model.name=task", "data.max_length=128", "model.max_position_embeddings=128",
                           f"out_dir={tmp_path / 'run'}"])
    rep = plan_lib.plan(cfg, topology("cpu:1"))
    prog = rep["programs"][0]
    from rlhf_jax.tasks import get_task
    mconfig = get_task("sentiment").model_config(max_position_embeddings=128)
    per_token = models.flops_per_token(mconfig, 128, training=True, lm_head=False)  # a scalar-head model
    assert prog["model_flops_per_device"] == pytest.approx(per_token * cfg.data.batch_size * 2 * 128, rel=1e-9)
    assert not (tmp_path / "run").exists()
