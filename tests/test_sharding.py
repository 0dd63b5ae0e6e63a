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
    assert m.axis_names == ("data", "fsdp")
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    assert mesh_lib.batch_size_multiple(m) == jax.device_count()
    with pytest.raises(ValueError, match="fsdp=3"):
        mesh_lib.make_mesh(data=-1, fsdp=3 if jax.device_count() % 3 else 5)
    with pytest.raises(ValueError, match="devices"):
        mesh_lib.make_mesh(data=2, fsdp=2 * jax.device_count())
