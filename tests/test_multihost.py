"""Two processes on 127.0.0.1 (gloo CPU collectives, 2 fake devices each) == one process with 4."""
from __future__ import annotations

import json
import os
import shlex
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


SWEEP_SCRIPT = textwrap.dedent("""
    import json, sys
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from rlhf_jax.training.distributed import init_distributed
    if nproc > 1:
        assert init_distributed(f"127.0.0.1:{port}", nproc, pid)
    import jax, numpy as np
    from rlhf_jax.sweeps.vmapped import run_vmapped_sweep
    from rlhf_jax.training.configs import MeshConfig
    from tests.test_rl_trainer import MESH_PPO, ppo_cfg
    assert jax.device_count() == 8 and jax.process_count() == nproc
    cfg = ppo_cfg(out + "/unused", iterations=2, ppo=MESH_PPO)
    res = run_vmapped_sweep(cfg, {"ppo.kl_coef": ["0.01", "0.5"]}, seeds=4, out_dir=out,
                            mesh=MeshConfig(runs=4, fsdp=2))
    params = jax.tree_util.tree_leaves(jax.device_get(res.final_state.policy.params))
    print("RESULT", json.dumps({"history": {k: np.asarray(v).tolist() for k, v in res.history.items()},
                                "param_sums": [float(np.abs(p).sum()) for p in params]}), flush=True)
""")


@pytest.mark.slow
def test_vmapped_sweep_two_processes_of_four_devices_match_one_of_eight(tmp_path):
    """The runs of a vmapped sweep spread over 2 hosts x 4 devices (runs=4, fsdp=2) give the same curves
    and final policies as on one host with 8; only process 0 writes the sweep's files."""
    port = _free_port()
    multi = tmp_path / "multi"
    logs = [(open(tmp_path / f"p{i}.out", "w+"), open(tmp_path / f"p{i}.err", "w+")) for i in range(2)]
    # (output to files, not pipes: a process blocked on a full pipe would miss the shutdown barrier)
    procs = [subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, str(i), "2", str(port), str(multi)], cwd=ROOT,
                              env=_env(4), stdout=logs[i][0], stderr=logs[i][1], text=True) for i in range(2)]
    outs = []
    for p, (out, err) in zip(procs, logs):
        p.wait(timeout=900)
        out.seek(0), err.seek(0)
        assert p.returncode == 0, err.read()[-4000:]
        outs.append(_result(out.read()))
    single = subprocess.run([sys.executable, "-c", SWEEP_SCRIPT, "0", "1", "0", str(tmp_path / "single")], cwd=ROOT,
                            env=_env(8), capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-4000:]
    ref = _result(single.stdout)
    for o in outs:  # both processes hold the gathered results
        assert sorted(o["history"]) == sorted(ref["history"])
        for k, v in ref["history"].items():
            np.testing.assert_allclose(np.asarray(o["history"][k]), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(o["param_sums"], ref["param_sums"], rtol=1e-5)
    written = sorted(p.name for p in multi.iterdir())
    assert written == sorted(p.name for p in (tmp_path / "single").iterdir()), written
    assert "results.jsonl" in written
    rows = [json.loads(line) for line in (multi / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8  # written once (by process 0), one row per run


FAKE_SRUN = """#!/bin/bash
# stands in for SLURM's srun on one machine: the step's $SLURM_NTASKS tasks as local processes
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p" || exit 1; done
"""


@pytest.mark.slow
def test_emitted_slurm_array_script_runs_a_point_as_a_two_process_job(tmp_path):
    """``sweep --emit-commands F --emit-format slurm`` writes an sbatch array script; array task 1 run
    through a stand-in ``srun`` (2 local processes, SLURM's variables) trains point 1 as one 2-host job
    (``--distributed-auto``), and process 0 writes its run directory."""
    out, script = tmp_path / "sweep", tmp_path / "sweep.sbatch"
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sweep", "experiments/sft_sort_tiny.py",
                        "--grid", "optim.learning_rate=1e-3,2e-3", "--out", str(out), "--emit-commands", str(script),
                        "--emit-format", "slurm", "steps=2", "eval_every=0", "data.batch_size=8", "mesh.data=-1"],
                       cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and "--distributed-auto" in text and "srun " in text
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(FAKE_SRUN)
    (bindir / "srun").chmod(0o755)
    env = dict(_env(2), PATH=f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID=str(_free_port() % 4096), SLURM_STEP_NODELIST="127.0.0.1",
               SLURM_NTASKS="2", SLURM_STEP_NUM_NODES="1", SLURM_PROCID="0", SLURM_LOCALID="0")
    log = tmp_path / "job.log"
    with open(log, "w") as fh:
        job = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                             timeout=900)
    assert job.returncode == 0, log.read_text()[-4000:]
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(runs) == 1, runs  # only point 1 ran
    run_json = json.loads((out / runs[0] / "run.json").read_text())
    assert run_json["devices"]["process_count"] == 2 and run_json["devices"]["count"] == 4, run_json["devices"]
    assert (out / runs[0] / "metrics.jsonl").read_text().strip()


def test_emitted_tpu_vm_script_runs_each_point_on_all_workers(tmp_path):
    script = tmp_path / "sweep_tpu.sh"
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sweep", "experiments/sft_sort_tiny.py",
                        "--grid", "optim.learning_rate=1e-3,2e-3", "--out", "runs/sweep", "--emit-commands",
                        str(script), "--emit-format", "tpu-vm", "--tpu", "my-v5p-64", "--zone", "us-east5-a",
                        "--workdir", "/home/me/rlhf_jax"], cwd=ROOT, env=_env(1), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in script.read_text().splitlines() if line.startswith("gcloud")]
    assert len(lines) == 2
    for line in lines:
        argv = shlex.split(line)
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p-64"]
        assert "--zone=us-east5-a" in argv and "--worker=all" in argv
        remote = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
        assert remote.startswith("cd /home/me/rlhf_jax && rlhf-jax sft --config experiments/sft_sort_tiny.py")
        assert remote.endswith("--distributed-auto")
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sweep", "experiments/sft_sort_tiny.py",
                        "--grid", "optim.learning_rate=1e-3", "--emit-commands", "-", "--emit-format", "tpu-vm"],
                       cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--tpu NAME and --zone ZONE" in r.stderr
