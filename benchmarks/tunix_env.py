"""Tunix, the JAX peer, in its own virtual environment (it pins its own flax/orbax/grain stack).

``ensure_venv(path)`` makes ``path`` (default ``benchmarks/.venv-tunix``, git-ignored) with this
interpreter's base Python and ``pip install google-tunix==0.1.7`` into it, once;
``sampler_time(...)`` runs ``tunix_sampler.py`` there as a child process and parses its result.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.errors import NotAvailable

TUNIX_VERSION = "0.1.7"
SCRIPT = Path(__file__).resolve().parent / "tunix_sampler.py"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_version(venv: Path) -> str | None:
    """google-tunix's version inside ``venv``, or None if the venv or the package is missing."""
    py = _python(venv)
    if not py.exists():
        return None
    proc = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('google-tunix'))"],
        capture_output=True, text=True,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_venv(venv: Path, *, allow_install: bool) -> Path:
    """Returns the venv's python, creating the venv and installing google-tunix if needed."""
    have = installed_version(venv)
    if have == TUNIX_VERSION:
        return _python(venv)
    if not allow_install:
        raise NotAvailable(f"google-tunix=={TUNIX_VERSION} not found in {venv} (found {have}) and --no-install given")
    base = getattr(sys, "_base_executable", None) or sys.executable
    if not _python(venv).exists():
        print(f"[bench] creating Tunix's venv {venv}", file=sys.stderr, flush=True)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    print(f"[bench] installing google-tunix=={TUNIX_VERSION} into {venv} (a few minutes, once)",
          file=sys.stderr, flush=True)
    subprocess.run([str(_python(venv)), "-m", "pip", "install", "-q", f"google-tunix=={TUNIX_VERSION}"], check=True)
    have = installed_version(venv)
    if have != TUNIX_VERSION:
        raise RuntimeError(f"after pip install, {venv} holds google-tunix {have}, expected {TUNIX_VERSION}")
    return _python(venv)


def sampler_time(
    venv: Path,
    shape: dict[str, Any],
    prompt_ids: np.ndarray,
    *,
    new_tokens: int,
    reps: int,
    allow_install: bool,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Seconds per greedy ``Sampler`` call (B prompts, ``new_tokens`` each) in Tunix's venv."""
    py = ensure_venv(Path(venv), allow_install=allow_install)
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"shape": shape, "new_tokens": new_tokens, "reps": reps}))
        prompts = Path(tmp) / "prompts.npy"
        np.save(prompts, np.asarray(prompt_ids, np.int32))
        proc = subprocess.run([str(py), str(SCRIPT), str(spec), str(prompts)], capture_output=True, text=True,
                              timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TUNIX_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{SCRIPT.name} failed in {venv} (exit {proc.returncode}); stderr tail:\n{proc.stderr[-3000:]}"
        )
    result = json.loads(lines[-1][len("TUNIX_RESULT "):])
    if result["generated_lengths"] != [new_tokens]:
        raise RuntimeError(f"Tunix generated lengths {result['generated_lengths']}, expected all {new_tokens}")
    return result
