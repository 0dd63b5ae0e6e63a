"""The ``runs`` mesh axis of vmapped sweeps: 8 runs (2 kl_coef values x 4 seeds) on one device, split over
``runs=8``, and over ``runs=4, fsdp=2`` (8 fake CPU devices) give the same curves and final policies;
``--mesh`` parsing and the layout errors; the trainers refuse ``mesh.runs > 1``."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.rl import train_ppo
from rlhf_jax.sweeps.cli import parse_mesh
from rlhf_jax.sweeps.vmapped import sweep_mesh
from rlhf_jax.training.configs import MeshConfig
from tests.test_rl_trainer import MESH_PPO, ppo_cfg

MESH_SWEEP_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
import jax
import numpy as np
from tests.test_rl_trainer import MESH_PPO, ppo_cfg
from rlhf_jax.rl.trainer import build_setup
from rlhf_jax.sweeps.vmapped import run_vmapped_sweep
from rlhf_jax.training.configs import MeshConfig
assert jax.device_count() == 8
cfg = ppo_cfg({out!r}, iterations=2, ppo=MESH_PPO)
setup = build_setup(cfg)  # built once, shared by the three layouts
grid = {{"ppo.kl_coef": ["0.01", "0.5"]}}
one = run_vmapped_sweep(cfg, grid, seeds=4, setup=setup)
ref_params = jax.tree_util.tree_leaves(jax.device_get(one.final_state.policy.params))
out = {{}}
for name, mesh in (("runs=8", MeshConfig(runs=8)), ("runs=4,fsdp=2", MeshConfig(runs=4, fsdp=2))):
    res = run_vmapped_sweep(cfg, grid, seeds=4, setup=setup, mesh=mesh)
    assert res.num_runs == 8 and sorted(res.history) == sorted(one.history)
    for k, v in one.history.items():
        assert res.history[k].shape == (8, 2), (k, res.history[k].shape)
        np.testing.assert_allclose(res.history[k], v, rtol=1e-5, atol=1e-6, err_msg=name + " " + k)
    leaves = jax.tree_util.tree_leaves(res.final_state.policy.params)
    specs = [tuple(x.sharding.spec) for x in leaves]
    assert all(s and s[0] == "runs" for s in specs), specs
    assert any("fsdp" in s for s in specs) == (name != "runs=8"), specs
    got = jax.tree_util.tree_leaves(jax.device_get(res.final_state.policy.params))
    for a, b in zip(got, ref_params):
        # Adam normalises the gradient, so a float-reassociation difference in a near-zero gradient moves
        # a weight by up to ~lr·1e-2: 2 of 16384 elements differ by 5.5e-6 on one machine, 2.5e-5 on
        # another; all but 0.1% of the elements must agree to 1e-5 and every one to 1e-4
        off = np.abs(a - b) > 1e-5 + 1e-5 * np.abs(b)
        assert off.mean() <= 1e-3, (name, int(off.sum()))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name + " params")
    out[name] = {{"history_max_abs": max(float(np.max(np.abs(res.history[k] - v))) for k, v in one.history.items()),
                 "params_max_abs": max(float(np.max(np.abs(a - b))) for a, b in zip(got, ref_params)),
                 "compile_seconds": res.compile_seconds}}
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
def test_sweep_over_runs_and_fsdp_meshes_matches_one_device(tmp_path):
    """One device vs runs=8 vs runs=4,fsdp=2 (8 fake CPU devices): curves and final params agree."""
    tests = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(tests.parent))
    proc = subprocess.run([sys.executable, "-c", MESH_SWEEP_SCRIPT.format(tests=str(tests), out=str(tmp_path / "m"))],
                          cwd=tests.parent, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    print(res)
    assert set(res) == {"runs=8", "runs=4,fsdp=2"}


def test_parse_mesh_flag():
    assert parse_mesh("runs=4,fsdp=2") == MeshConfig(runs=4, fsdp=2)
    assert parse_mesh("runs=8") == MeshConfig(runs=8)
    assert parse_mesh("runs=2, data=2, fsdp=2") == MeshConfig(runs=2, data=2, fsdp=2)
    for bad, match in (("runs=x", "not an integer"), ("pods=2", "expected"), ("runs=2,runs=4", "twice"),
                       ("4", "expected"), ("", "expected")):
        with pytest.raises(ConfigError, match="--mesh"):
            parse_mesh(bad)


def test_mesh_config_runs_layout():
    assert MeshConfig(runs=4, fsdp=2).resolve(8) == (4, 1, 2)
    assert MeshConfig(runs=8).resolve(8) == (8, 1, 1)
    assert MeshConfig(runs=2, fsdp=-1, data=2).resolve(8) == (2, 2, 2)
    assert MeshConfig().resolve(8) == (1, 8, 1) and MeshConfig().validate(8) == (8, 1)
    with pytest.raises(ConfigError, match="mesh.runs"):
        MeshConfig(runs=3).resolve(8)
    with pytest.raises(ConfigError, match="mesh.runs"):
        MeshConfig(runs=0).resolve(8)
    with pytest.raises(ConfigError, match="runs=2 x data=2 x fsdp=1"):
        MeshConfig(runs=2, data=2).resolve(8)
    with pytest.raises(ConfigError, match="mesh.runs.*vmapped sweep"):
        MeshConfig(runs=2).validate(2)


def test_sweep_mesh_checks_runs_divide_the_sweep(monkeypatch):
    cfg = ppo_cfg("unused", iterations=2, ppo=MESH_PPO)
    assert sweep_mesh(cfg, None, num_runs=8) is None  # no mesh given or configured: one device
    mesh = sweep_mesh(cfg, MeshConfig(runs=1), num_runs=3)
    assert mesh.axis_names == ("runs", "data", "fsdp") and mesh.shape["runs"] == 1
    with pytest.raises(ConfigError, match="mesh.mode"):
        sweep_mesh(cfg, MeshConfig(mode="pmap"), num_runs=2)
    monkeypatch.setattr(jax, "device_count", lambda: 8)  # the check comes before any mesh is built
    with pytest.raises(ConfigError, match=r"6 runs \(--seeds 3 x 2 --grid points\).*mesh.runs=4"):
        sweep_mesh(cfg, MeshConfig(runs=4, fsdp=2), num_runs=6, seeds=3)


def test_trainers_refuse_runs_axis(tmp_path):
    cfg = dataclasses.replace(ppo_cfg(tmp_path / "x", iterations=1), mesh=MeshConfig(runs=2))
    with pytest.raises(ConfigError, match="mesh.runs"):
        train_ppo(cfg)
