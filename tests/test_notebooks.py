"""The notebooks: their cells are exactly what notebooks/build_notebooks.py generates, the committed
files carry the outputs of a tiny run (tables and inline plots, readable on GitHub), and they execute
top to bottom with the tiny budget (nbclient, the venv's python3 kernel), writing their runs and PNG
plots under $RLHF_NOTEBOOK_OUT/<name>/, never into the repository."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"

EXPECTED_PNGS = {
    "01_quickstart": ["run/training_curves.png", "run/reward_vs_kl.png"],
    "02_kl_ablation": ["reward_vs_kl_coef.png", "gold_vs_kl_frontier.png", "proxy_score_per_iteration.png"],
    "03_reward_model": ["accuracy_vs_data_size.png", "accuracy_vs_label_noise.png"],
    "04_overoptimisation": ["lab/overopt_curves.png", "lab/ensembles.png", "lab/rm_scaling.png"],
}


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(nb) -> str:
    return "".join(o.get("text", "") for o in _outputs(nb))


def _images(nb) -> list:
    return [o for o in _outputs(nb) if "image/png" in o.get("data", {})]


def test_notebooks_match_their_generator(tmp_path):
    import shutil
    shutil.copy(NB_DIR / "build_notebooks.py", tmp_path / "build_notebooks.py")
    subprocess.run([sys.executable, str(tmp_path / "build_notebooks.py")], check=True, capture_output=True)
    for name in EXPECTED_PNGS:
        fresh = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
        shipped = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        assert [c.source for c in fresh.cells] == [c.source for c in shipped.cells], \
            f"{name}: run python notebooks/build_notebooks.py --execute"


def test_committed_notebooks_carry_tiny_outputs():
    """Stored executed (build_notebooks.py --execute): every code cell ran, in order, without error, and
    the plots are inline."""
    for name, pngs in EXPECTED_PNGS.items():
        nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{name}: not executed"
        assert not [o for o in _outputs(nb) if o.get("output_type") == "error"], name
        assert "budget=tiny" in _text(nb), name
        assert len(_images(nb)) >= len(pngs), f"{name}: plots not stored inline"


def test_notebooks_import_only_the_library():
    """Cells call rlhf_jax; no training/evaluation code is defined in them; outputs go outside the repo."""
    for name in EXPECTED_PNGS:
        nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "from rlhf_jax" in code
        assert "def " not in code and "class " not in code and "jax.jit" not in code, name
        setup = nb.cells[1].source
        assert 'os.environ.get("RLHF_NOTEBOOK_BUDGET", "tiny")' in setup, name
        assert 'os.environ.get("RLHF_NOTEBOOK_OUT"' in setup and '"notebooks" / "outputs"' not in setup, name
    assert not (NB_DIR / "outputs").exists() or not subprocess.run(
        ["git", "ls-files", "notebooks/outputs"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def test_kl_ablation_sweeps_one_key_with_standard_errors():
    nb = nbformat.read(NB_DIR / "02_kl_ablation.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert code.count('SWEEP_KEY = "ppo.kl_coef"') == 1 and "parse_grid([f\"{SWEEP_KEY}=" in code
    assert "std(ddof=1) / np.sqrt(" in code and "errorbar(" in code
    text = _text(nb)
    assert "±" in text and "ppo.kl_coef" in text


def _execute(name: str, out: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    env_backup = dict(os.environ)
    os.environ.update(RLHF_NOTEBOOK_BUDGET="tiny", RLHF_NOTEBOOK_OUT=str(out), RLHF_REPO_ROOT=str(ROOT),
                      MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env_backup.get("PYTHONPATH", "")) if p)
    try:
        client = NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(NB_DIR)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_PNGS))
def test_notebook_executes_with_tiny_budget(name, tmp_path):
    before = sorted(p.name for p in NB_DIR.iterdir())
    nb = _execute(name, tmp_path)
    out = tmp_path / name
    for rel in EXPECTED_PNGS[name]:
        png = out / rel
        assert png.exists(), f"{name} did not write {png}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
    assert len(_images(nb)) >= len(EXPECTED_PNGS[name]), f"{name}: plots not shown inline"
    assert "budget=tiny" in _text(nb)
    assert sorted(p.name for p in NB_DIR.iterdir()) == before, "a notebook wrote into notebooks/"
    if name == "04_overoptimisation":  # the lab's results.json, from its tiny run
        import json
        res = json.loads((out / "lab" / "results.json").read_text())
        assert {"bon", "rl", "fits", "ensembles", "rm_scaling", "targets"} <= set(res)
        assert [r["n"] for r in res["bon"]] == [1, 2, 4, 8, 16] and res["bon"][0]["kl"] == 0.0
        assert set(res["rl"]) == {"0", "0.1"} and all({"iteration", "kl", "gold", "proxy"} <= set(r)
                                                      for rows in res["rl"].values() for r in rows)
        # RL points: held-out evaluations every `window` = 2 of the 6 iterations; the training windows kept aside
        assert all([r["iteration"] for r in rows] == [2, 4, 6] for rows in res["rl"].values())
        assert res["rl_eval"] == {"prompts": 8, "samples_per_prompt": 2, "every": 2, "temperature": 1.0,
                                  "split": "test"}
        assert set(res["rl_train_window"]) == {"0", "0.1"} and (
            [r["kl"] for r in res["rl"]["0"]] != [r["kl"] for r in res["rl_train_window"]["0"]])
        assert set(res["ensembles"]) == {"single", "mean", "uwo", "wco"}
        assert set(res["fits"]["bon"]) >= {"alpha", "beta", "r2"} and set(res["rm_scaling"]) == {
            "labels_64", "labels_256", "size_s", "size_m"}
        assert res["rm_scaling"]["size_s"]["num_params"] < res["rm_scaling"]["size_m"]["num_params"]
        assert {"peak_later_with_more_labels", "peak_later_with_larger_rm"} <= set(res["targets"])
        assert all(0.0 <= r["gold"] <= 1.0 for r in res["bon"])
        assert "Research targets" in (out / "lab" / "report.md").read_text()
