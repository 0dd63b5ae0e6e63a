"""Sweep expansion, validation and launch-command emission (no training here)."""
import dataclasses
import subprocess
import sys

import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.sweeps import expand_points, final_metrics, parse_grid, parse_random


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


# ------------------------------------------------------------------ real trainers (slow: they compile)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from rlhf_jax.config import apply_overrides, load_config_file  # noqa: E402
from rlhf_jax.sweeps import TRAINERS, run_separately, run_vmapped_sweep, trainer_for, vmap_values  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PPO_TINY = str(ROOT / "experiments" / "ppo_sort_tiny.py")
# 2 iterations of 4 prompts x 6 tokens, one epoch, one minibatch: the smallest real PPO program
PPO_SMALL = ["iterations=2", "ppo.batch_size=4", "ppo.minibatches=1", "ppo.ppo_epochs=1",
             "ppo.max_new_tokens=6", "policy.hidden_size=16", "policy.head_dim=8", "policy.intermediate_size=32"]


def test_trainers_table_names_real_entry_points():
    import importlib
    import inspect
    for name, (command, target) in TRAINERS.items():
        module, func = target.split(":")
        fn = getattr(importlib.import_module(module), func)
        assert callable(fn), target
        params = list(inspect.signature(fn).parameters)
        assert params and params[0] == "cfg", (target, params)
        from rlhf_jax.cli import COMMANDS
        assert command in COMMANDS
    cfg = load_config_file(PPO_TINY)
    command, fn = trainer_for(cfg)
    assert command == "ppo" and fn.__name__ == "train_ppo"


def test_vmap_refuses_keys_that_are_not_traced():
    cfg = load_config_file(PPO_TINY)
    for key, expect in (("ppo.batch_size", "ppo.batch_size"), ("optim.learning_rate", "ppo.lr"),
                        ("seed", "--seeds"), ("iterations", "iterations")):
        with pytest.raises(ConfigError, match="not a traced hyper-parameter") as e:
            vmap_values(cfg, {key: ["1", "2"]})
        assert key in str(e.value) and expect in str(e.value)
    with pytest.raises(ConfigError, match="ppo.kl_coef"):
        vmap_values(cfg, {"ppo.kl_coef": ["0.1", "big"]})
    assert vmap_values(cfg, {"ppo.kl_coef": ["0.1", "1"], "ppo.clip_eps": ["0.3"]}) == {
        "kl_coef": [0.1, 1.0], "clip_eps": [0.3]}
    sft = load_config_file(ROOT / "experiments" / "sft_sort_tiny.py")
    with pytest.raises(ConfigError, match="SFTConfig"):
        vmap_values(sft, {"optim.learning_rate": ["1e-3"]})


def test_vmap_cli_refuses_static_key_before_building(tmp_path, capsys):
    from rlhf_jax.cli import main
    rc = main(["sweep", PPO_TINY, "--vmap", "--grid", "ppo.batch_size=4,8", "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ppo.batch_size" in err and "not a traced hyper-parameter" in err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def vmapped(tmp_path_factory):
    out = tmp_path_factory.mktemp("vmap")
    cfg = apply_overrides(load_config_file(PPO_TINY), PPO_SMALL)
    res = run_vmapped_sweep(cfg, {"ppo.kl_coef": ["0.01", "0.5"]}, seeds=2, out_dir=out)
    return cfg, res, out


@pytest.mark.slow
def test_vmapped_points_equal_separate_runs(vmapped):
    import jax
    cfg, res, _ = vmapped
    assert [r["overrides"] for r in res.rows] == [["ppo.kl_coef=0.01", "seed=0"], ["ppo.kl_coef=0.01", "seed=1"],
                                                  ["ppo.kl_coef=0.5", "seed=0"], ["ppo.kl_coef=0.5", "seed=1"]]
    np.testing.assert_allclose(res.values["kl_coef"], [0.01, 0.01, 0.5, 0.5], rtol=1e-6)
    # two points (different beta AND different seed) run on their own, from the same set-up
    (f1, h1), (f2, h2) = run_separately(cfg, [({"kl_coef": 0.01}, 1), ({"kl_coef": 0.5}, 0)], setup=res.setup)
    for i, (final, hist) in ((1, (f1, h1)), (2, (f2, h2))):
        for k in ("score", "kl", "kl_coef", "policy_loss", "value_loss", "entropy"):
            np.testing.assert_allclose(res.history[k][i], hist[k], rtol=1e-4, atol=1e-5, err_msg=f"run {i} {k}")
        got = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x[i], res.final_state.policy.params))
        want = jax.tree_util.tree_leaves(final.policy.params)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # the traced beta really differs per run: same seed, different beta -> different policies
    np.testing.assert_allclose(res.history["kl_coef"][:, 0], [0.01, 0.01, 0.5, 0.5], rtol=1e-6)
    p0 = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x[0], res.final_state.policy.params))
    p2 = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x[2], res.final_state.policy.params))
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(p0, p2)) > 1e-7
    # different seeds draw different rollouts
    assert not np.allclose(res.history["kl"][0], res.history["kl"][1])


@pytest.mark.slow
def test_vmapped_sweep_writes_table_curves_and_run_record(vmapped):
    import json
    cfg, res, out = vmapped
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[3]["ppo.kl_coef"] == pytest.approx(0.5) and rows[3]["seed"] == 1
    assert rows[2]["train_metrics.kl"] == pytest.approx(float(res.history["kl"][2, -1]))
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["point", "overrides"] and "train_metrics.score" in header
    curves = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert len(curves) == 4 * 2 and {c["iteration"] for c in curves} == {1, 2}
    assert curves[3]["score"] == pytest.approx(float(res.history["score"][1, 1]))
    run = json.loads((out / "run.json").read_text())
    assert run["extra"]["sweep"]["mode"] == "vmap" and run["extra"]["sweep"]["runs"] == 4
    assert run["config"]["ppo"]["batch_size"] == 4 and run["config_type"] == "PPOTrainConfig"
    assert run["devices"]["count"] >= 1 and run["versions"]["jax"]


@pytest.mark.slow
def test_sequential_sweep_runs_real_trainer_and_collects_table(tmp_path, capsys):
    import json

    from rlhf_jax.cli import main
    cfg = str(ROOT / "experiments" / "sft_sort_tiny.py")
    out = tmp_path / "sw"
    rc = main(["sweep", cfg, "--grid", "optim.learning_rate=1e-3,3e-2", "--out", str(out), "steps=2",
               "eval_every=0", "eval_batches=1", "export=false", "data.batch_size=8", "data.max_length=16",
               "model.hidden_size=16", "model.head_dim=8", "model.intermediate_size=32",
               "checkpoint.async_save=false", "log.tensorboard=false", "log.every=1"])
    assert rc == 0, capsys.readouterr()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["overrides"] for r in rows] == [["optim.learning_rate=1e-3"], ["optim.learning_rate=3e-2"]]
    for r in rows:
        assert r["final_step"] == 2.0 and np.isfinite(r["train_metrics.loss"]) and "error" not in r
        run = json.loads((Path(r["out_dir"]) / "run.json").read_text())
        assert run["extra"]["sweep_point"]["point"] == r["point"]
        assert run["config"]["optim"]["learning_rate"] == float(r["overrides"][0].split("=")[1])
        assert (Path(r["out_dir"]) / "metrics.jsonl").exists()
    # the large learning rate moved the loss further in two steps
    assert rows[0]["train_metrics.loss"] != rows[1]["train_metrics.loss"]
    assert (out / "run.json").exists()
