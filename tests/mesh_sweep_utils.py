"""A GRPO ``--vmap`` sweep of 4 runs on 8 fake CPU devices (mesh runs=4 x fsdp=2), in a subprocess.

``run_mesh_sweep_script(body, cfg, tmp_path)`` runs :data:`PREAMBLE` and then ``body``: the preamble
loads ``cfg`` (a tiny GRPO experiment, 2 iterations), traces the sweep program as the mesh places its
inputs (``hp, keys, inputs, frozen, shared`` = its arguments) and runs the sweep on one device (``one``)
and on the mesh (``res``) from one set-up (``setup``). ``body`` checks what its test is about and prints
one ``RESULT <json>`` line, which is returned as a dict.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PREAMBLE = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax
import numpy as np
from rlhf_jax import devices as devices_lib
from rlhf_jax.config import apply_overrides, load_config_file
from rlhf_jax.plan import trace_programs
from rlhf_jax.rl.trainer import build_setup
from rlhf_jax.sweeps import run_policy_params, run_vmapped_sweep
from rlhf_jax.training.configs import MeshConfig
assert jax.device_count() == 8
cfg = apply_overrides(load_config_file({cfg!r}), {overrides!r})
grid = {{"grpo.kl_coef": ["0.01", "0.02", "0.04", "0.08"]}}
mesh = MeshConfig(runs=4, fsdp=2)
with devices_lib.targeting(jax.devices(), abstract=True):
    _, (prog,) = trace_programs(cfg, "grpo", sweep={{"grid": grid, "seeds": 1, "mesh": mesh}})
hp, keys, inputs, frozen, shared = prog.args
setup = build_setup(cfg)
one = run_vmapped_sweep(cfg, grid, seeds=1, setup=setup)
res = run_vmapped_sweep(cfg, grid, seeds=1, setup=setup, mesh=mesh)
"""


def run_mesh_sweep_script(body: str, cfg: Path, tmp_path: Path) -> dict:
    """The ``RESULT`` dict that ``PREAMBLE + body`` prints, run with 8 fake CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    overrides = ["iterations=2", "grpo.batch_size=8", "grpo.max_new_tokens=6", f"out_dir={tmp_path / 'm'}"]
    script = PREAMBLE.format(root=str(ROOT), cfg=str(cfg), overrides=overrides) + body
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
