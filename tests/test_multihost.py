"""Two processes on 127.0.0.1 (gloo CPU collectives, 2 fake devices each) == one process with 4."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.training import distributed

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from rlhf_jax.training.distributed import init_distributed, is_main_process
    if nproc > 1:
        assert init_distributed(f"127.0.0.1:{port}", nproc, pid)
    import jax, jax.numpy as jnp, numpy as np
    from rlhf_jax.training import mesh as M
    from tests.test_training_toy import toy_state, toy_step, toy_batch

    assert jax.device_count() == 4 and jax.process_count() == nproc, (jax.devices(), nproc)
    mesh = M.make_mesh(data=2, fsdp=2)
    st = M.shard_state(mesh, toy_state())
    f = M.jit_step(toy_step, mesh, st, cfg=2)
    total = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(p)),
                    out_shardings=M.replicated(mesh))
    losses, norms = [], []
    for i in range(3):
        gb = toy_batch(i, b=16)
        per = 16 // nproc
        local = {k: v[pid * per:(pid + 1) * per] for k, v in gb.items()}   # this host's rows
        st, m = f(st, M.put_batch(mesh, local))
        losses.append(float(M.host_value(m["loss"])))
        norms.append(float(M.host_value(m["grad_norm"])))
    out = {"losses": losses, "norms": norms, "param_abs_sum": float(M.host_value(total(st.params))),
           "main": is_main_process(), "local_devices": jax.local_device_count()}
    print("RESULT", json.dumps(out), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _result(stdout: str) -> dict:
    line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices():
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), "2", str(port)], cwd=ROOT,
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    single = subprocess.run([sys.executable, "-c", SCRIPT, "0", "1", "0"], cwd=ROOT, env=_env(4),
                            capture_output=True, text=True, timeout=600)
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        outs.append(_result(out))
    assert single.returncode == 0, single.stderr[-4000:]
    ref = _result(single.stdout)
    assert [o["main"] for o in outs] == [True, False]
    assert [o["local_devices"] for o in outs] == [2, 2] and ref["local_devices"] == 4
    for o in outs:
        np.testing.assert_allclose(o["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(o["norms"], ref["norms"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(o["param_abs_sum"], ref["param_abs_sum"], rtol=1e-5)
    assert ref["losses"][0] != ref["losses"][-1]


def test_init_distributed_flags_and_env(monkeypatch):
    for k in ("RLHF_JAX_COORDINATOR", "RLHF_JAX_NUM_PROCESSES", "RLHF_JAX_PROCESS_ID",
              "RLHF_JAX_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.init_distributed() is False  # nothing asked: single process
    monkeypatch.setenv("RLHF_JAX_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="num_processes, process_id"):
        distributed.init_distributed()
    with pytest.raises(ValueError, match=r"process_id=3 not in \[0, 2\)"):
        distributed.init_distributed(num_processes=2, process_id=3)
    with pytest.raises(ValueError, match="local-device-ids"):
        distributed._parse_ids("0,x")
    assert distributed._parse_ids("0, 1") == [0, 1]
