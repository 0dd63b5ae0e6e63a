"""Sweep expansion, validation and launch-command emission (no training here)."""
import dataclasses
import subprocess
import sys

import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.sweep import expand_points, final_metrics, parse_grid, parse_random


def test_grid_times_seeds_is_deterministic_and_complete():
    grid = parse_grid(["ppo.kl_coef=0.01,0.05", "optim.lr=1e-4,3e-4,1e-3"])
    pts = expand_points(grid, seeds=2)
    assert len(pts) == 2 * 3 * 2
    combos = {tuple(p.overrides) for p in pts}
    assert len(combos) == 12
    assert pts[0].overrides == ("ppo.kl_coef=0.01", "optim.lr=1e-4", "seed=0")
    assert pts[1].overrides == ("ppo.kl_coef=0.01", "optim.lr=1e-4", "seed=1")
    assert expand_points(grid, seeds=2) == pts


def test_random_search_in_range_and_reproducible():
    specs = parse_random(["optim.lr=loguniform:1e-5:1e-3", "ppo.epochs=int:1:4", "x=choice:a:b"])
    pts = expand_points({}, random_specs=specs, num_samples=20, sweep_seed=3)
    assert len(pts) == 20
    for p in pts:
        d = dict(o.split("=", 1) for o in p.overrides)
        assert 1e-5 <= float(d["optim.lr"]) <= 1e-3
        assert 1 <= int(d["ppo.epochs"]) <= 4
        assert d["x"] in ("a", "b")
    assert expand_points({}, random_specs=specs, num_samples=20, sweep_seed=3) == pts
    assert expand_points({}, random_specs=specs, num_samples=20, sweep_seed=4) != pts


@pytest.mark.parametrize("bad", [["lr"], ["lr="], ["lr=1", "lr=2"]])
def test_bad_grid_specs(bad):
    with pytest.raises(ConfigError):
        parse_grid(bad)


@pytest.mark.parametrize("bad", ["lr=normal:0:1", "lr=loguniform:0:1", "lr=uniform:2:1", "lr=choice"])
def test_bad_random_specs(bad):
    with pytest.raises(ConfigError):
        parse_random([bad])


def test_final_metrics_flattens_nested_results():
    @dataclasses.dataclass
    class R:
        metrics: dict
        steps: int
        path: str
    flat = final_metrics(R(metrics={"loss": 0.5, "eval": {"acc": 0.75}}, steps=3, path="x"))
    assert flat == {"metrics.loss": 0.5, "metrics.eval.acc": 0.75, "steps": 3.0}


def test_emit_commands_validates_keys_first(tmp_path):
    cfg = tmp_path / "exp.py"
    cfg.write_text(
        "import dataclasses\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class SFTConfig:\n    seed: int = 0\n    lr: float = 0.1\n"
        "def get_config():\n    return SFTConfig()\n")
    ok = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sweep", str(cfg), "--grid", "lr=0.1,0.2",
                         "--seeds", "2", "--emit-commands", "-", "--out", "runs/x",
                         "--launch-suffix=--coordinator=$COORD", "--config.lr=0.3"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"rlhf-jax sft --config {cfg} --out runs/x/000_lr-0.1_seed-0 lr=0.1 seed=0")
    assert lines[3].startswith(f"rlhf-jax sft --config {cfg} --out runs/x/003_lr-0.2_seed-1 lr=0.2 seed=1")
    assert lines[0].endswith("--coordinator=$COORD")
    for args in (["--grid", "lrr=0.1"], ["--config.seed=x"]):
        bad = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sweep", str(cfg), *args,
                              "--emit-commands", "-"], capture_output=True, text=True)
        assert bad.returncode != 0 and args[-1].split("=")[0].split(".")[-1] in bad.stderr
