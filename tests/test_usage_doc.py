"""docs/USAGE.md runs as written: every ```bash block, in order, in a fresh directory.

The directory holds only what the page assumes of the repository root: `.venv` (this
interpreter's environment) and `experiments/`. Nothing shrinks the commands: the sizes are the
page's own overrides.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "USAGE.md"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)


def _fake_root(tmp: Path) -> dict:
    """tmp/.venv/bin/{python,rlhf-jax} run this interpreter; the env lets it import this checkout."""
    bin_dir = tmp / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, args in (("python", ""), ("rlhf-jax", " -m rlhf_jax.cli")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}"{args} "$@"\n')
        shim.chmod(0o755)
    (tmp / "experiments").symlink_to(ROOT / "experiments")
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def test_usage_doc_blocks_are_found():
    blocks = bash_blocks(DOC.read_text())
    assert len(blocks) >= 10
    text = "\n".join(blocks)
    for needle in ("rlhf-jax sft", "rlhf-jax reward", "rlhf-jax ppo", "rlhf-jax grpo", "AutoModelForSequenceClassification", "rlhf-jax dpo",
                   "reward.kind=python", "reward.kind=jax", "--vmap", "--emit-commands", "--resume",
                   "AutoModelForCausalLM.from_pretrained"):
        assert needle in text, needle
    # what the doc runs is what a reader types: the README's launcher, no test-only prefixes
    for block in blocks:
        for line in block.splitlines():
            assert "RLHF_" not in line and "JAX_" not in line, line


@pytest.mark.slow
def test_usage_doc_runs(tmp_path):
    env = _fake_root(tmp_path)
    timings = []
    for i, block in enumerate(bash_blocks(DOC.read_text())):
        t0 = time.time()
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        timings.append(round(time.time() - t0, 1))
        print(f"block {i}: {timings[-1]} s", file=sys.stderr, flush=True)
        assert proc.returncode == 0, (f"docs/USAGE.md bash block {i} failed (rc {proc.returncode}):\n{block}\n"
                                      f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    print("block seconds:", timings)
    byo = tmp_path / "runs" / "byo"
    for run in ("sft", "reward", "ppo", "dpo", "grpo_python"):
        d = byo / run
        for name in ("config.json", "run.json", "metrics.jsonl", "export/config.json", "export/model.safetensors"):
            assert (d / name).exists(), f"{run}: no {name}"
    assert (byo / "ppo" / "samples.jsonl").exists()
    # the resumed SFT run continued to step 4
    steps = [json.loads(line)["step"] for line in (byo / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4, steps
    commands = (byo / "commands.txt").read_text().splitlines()
    assert len([c for c in commands if "rlhf-jax ppo" in c]) == 4, commands
