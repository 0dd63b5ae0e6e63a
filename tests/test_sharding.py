"""Sharded steps equal single-device steps: 8 fake CPU devices in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.training import mesh as mesh_lib

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import functools, json, sys
    import jax, numpy as np
    from rlhf_jax.training import mesh as M
    from tests.test_training_toy import toy_state, toy_step, toy_batch

    assert jax.device_count() == 8, jax.devices()
    STEPS = 3

    def leaves(state):
        return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state.params))]

    def run_single():
        dev = jax.devices()[0]
        st = jax.device_put(toy_state(), dev)
        f = jax.jit(functools.partial(toy_step, cfg=2), donate_argnums=0)
        losses = []
        for i in range(STEPS):
            st, m = f(st, jax.device_put(toy_batch(i, b=16), dev))
            losses.append(float(m["loss"]))
        return losses, leaves(st)

    def run_mesh(data, fsdp):
        mesh = M.make_mesh(data=data, fsdp=fsdp)
        st = M.shard_state(mesh, toy_state())
        f = M.jit_step(toy_step, mesh, st, cfg=2)
        losses = []
        for i in range(STEPS):
            st, m = f(st, M.put_batch(mesh, toy_batch(i, b=16)))
            losses.append(float(m["loss"]))
        specs = {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(st.params)}
        return losses, leaves(st), sorted(specs)

    def run_pmap():
        f = M.pmap_step(toy_step, cfg=2)
        st = M.replicate(toy_state())
        losses = []
        for i in range(STEPS):
            st, m = f(st, M.split_for_pmap(toy_batch(i, b=16)))
            losses.append(float(m["loss"][0]))
        return losses, leaves(M.unreplicate(st))

    l1, p1 = run_single()
    out = {"single": l1}
    for name, (data, fsdp) in {"4x2": (4, 2), "8x1": (8, 1), "2x4": (-1, 4)}.items():
        l, p, specs = run_mesh(data, fsdp)
        out[name] = l
        out[name + "_specs"] = specs
        out[name + "_maxdiff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p))
    l, p = run_pmap()
    out["pmap"] = l
    out["pmap_maxdiff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p))

    # the real tiny transformer and SFT step under fsdp (q/k/v kernels are [D, H, Dh])
    from rlhf_jax import models
    from rlhf_jax.training import OptimConfig, TrainState, make_optimizer
    from rlhf_jax.training.sft import SFTStepConfig, sft_step
    mc = models.tiny_config(vocab_size=64, hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16,
                            intermediate_size=64, max_position_embeddings=16)
    lm = models.CausalLM(mc)

    def lm_state():
        params = models.init_params(lm, jax.random.PRNGKey(0))
        tx = make_optimizer(OptimConfig(learning_rate=1e-2), params, total_steps=4)
        return TrainState.create(apply_fn=lm.apply, params=params, tx=tx, rng=0)

    def lm_batch(i):
        b = toy_batch(i, b=8, t=12, vocab=64)
        attn = np.ones_like(b["input_ids"])
        return {**b, "attention_mask": attn}

    def run_lm(mesh):
        st = lm_state() if mesh is None else M.shard_state(mesh, lm_state())
        f = (jax.jit(functools.partial(sft_step, cfg=SFTStepConfig(2))) if mesh is None
             else M.jit_step(sft_step, mesh, st, cfg=SFTStepConfig(2)))
        losses = []
        for i in range(2):
            b = lm_batch(i) if mesh is None else M.put_batch(mesh, lm_batch(i))
            st, m = f(st, b)
            losses.append(float(m["loss"]))
        return losses, leaves(st)

    l1, p1 = run_lm(None)
    l8, p8 = run_lm(M.make_mesh(data=4, fsdp=2))
    out["lm_single"], out["lm_4x2"] = l1, l8
    out["lm_maxdiff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p8))
    print("RESULT", json.dumps(out))
""")


def _run_8_devices(script: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_eight_devices_match_one_device():
    out = _run_8_devices(SCRIPT)
    for name in ("4x2", "8x1", "2x4", "pmap"):
        np.testing.assert_allclose(out[name], out["single"], atol=1e-5, rtol=1e-5, err_msg=name)
        assert out[name + "_maxdiff"] < 1e-5, (name, out[name + "_maxdiff"])
    np.testing.assert_allclose(out["lm_4x2"], out["lm_single"], atol=1e-5, rtol=1e-5)
    assert out["lm_maxdiff"] < 1e-4, out["lm_maxdiff"]
    # losses really change over the steps (the optimiser ran)
    assert out["single"][0] != out["single"][-1]
    # fsdp>1 really sharded parameters; fsdp=1 replicates them
    assert any("fsdp" in s for s in out["4x2_specs"]), out["4x2_specs"]
    assert all("fsdp" not in s for s in out["8x1_specs"]), out["8x1_specs"]


def test_fsdp_spec_rule():
    P = mesh_lib.P
    assert mesh_lib.fsdp_spec((32, 64), 2) == P(None, "fsdp")   # largest divisible dim
    assert mesh_lib.fsdp_spec((64, 30), 4) == P("fsdp", None)
    assert mesh_lib.fsdp_spec((6, 10), 4) == P()                 # nothing divisible: replicate
    assert mesh_lib.fsdp_spec((), 2) == P()
    assert mesh_lib.fsdp_spec((128,), 1) == P()
    assert mesh_lib.fsdp_spec((16, 16), 2, min_size=1024) == P()


def test_make_mesh_errors_and_axis_types():
    import jax
    m = mesh_lib.make_mesh()
    assert m.axis_names == ("runs", "data", "fsdp") and m.shape["runs"] == 1
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    assert mesh_lib.batch_size_multiple(m) == jax.device_count()
    with pytest.raises(ValueError, match="fsdp=3"):
        mesh_lib.make_mesh(data=-1, fsdp=3 if jax.device_count() % 3 else 5)
    with pytest.raises(ValueError, match="devices"):
        mesh_lib.make_mesh(data=2, fsdp=2 * jax.device_count())
