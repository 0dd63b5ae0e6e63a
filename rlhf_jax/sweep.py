"""Hyper-parameter sweeps: grids and random search over any config key.

Three ways to run the points of a sweep over an experiment config file:

* locally, one after another (the default): each point is the config with its
  overrides applied, run through the trainer that owns the config type;
* as launch commands (``--emit-commands FILE``): one ``rlhf-jax`` command line
  per point, for a cluster scheduler or a TPU pod (multi-host flags appended
  from ``--launch-suffix``);
* vmapped (``--vmap``, PPO/GRPO/RLOO configs): for models small enough, N seeds
  x M values of continuous hyper-parameters (β ``ppo.kl_coef``, ``ppo.lr``,
  ``ppo.clip_eps``, ``ppo.kl_target``, ...) run as ONE compiled program,
  ``jax.jit(jax.vmap(rl.make_train(...)))`` over the traced hyper-parameters
  (:func:`run_vmapped_sweep`); a grid key that is not traced is refused.

Results are collected into ``results.jsonl`` and ``results.csv`` in the sweep
directory: one row per point with its overrides and final metrics (trainer
results as ``train_metrics.<k>``/``eval_metrics.<k>``); ``--vmap`` adds the
per-iteration curves in ``curves.jsonl``. Every point's directory (and the sweep
directory) carries a ``run.json`` from :mod:`rlhf_jax.provenance`.

    rlhf-jax sweep experiments/sft_sort_tiny.py --grid optim.learning_rate=1e-3,3e-3 --seeds 2 --out runs/sw
    rlhf-jax sweep experiments/ppo_sort_tiny.py --vmap --grid ppo.kl_coef=0.01,0.05,0.2 --seeds 4 --out runs/kl
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import itertools
import json
import math
import random
import shlex
import time
import types
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhf_jax.config import ConfigError, apply_overrides, load_config_file, parse_override

# config class name -> (cli subcommand, "module:function" of its Python entry point)
TRAINERS: dict[str, tuple[str, str]] = {
    "SFTConfig": ("sft", "rlhf_jax.training.sft:train_sft"),
    "RewardConfig": ("reward", "rlhf_jax.training.reward:train_reward"),
    "PPOTrainConfig": ("ppo", "rlhf_jax.rl.trainer:train_ppo"),
    "GRPOTrainConfig": ("grpo", "rlhf_jax.rl.trainer:train_grpo"),
    "RLOOTrainConfig": ("rloo", "rlhf_jax.rl.trainer:train_rloo"),
    "DPOTrainConfig": ("dpo", "rlhf_jax.rl.trainer:train_dpo"),
    "PipelineConfig": ("pipeline", "rlhf_jax.pipeline:run_pipeline"),
}

# trainer config class name -> its algorithm section (the configs a --vmap sweep accepts)
VMAP_SECTIONS: dict[str, str] = {"PPOTrainConfig": "ppo", "GRPOTrainConfig": "grpo", "RLOOTrainConfig": "rloo"}

_DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One point: an index, a seed and the ``KEY=VALUE`` overrides that define it."""
    index: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        parts = []
        for o in self.overrides:
            key, _, value = o.partition("=")
            if "/" in value:  # a file or directory: its name says enough
                value = Path(value).stem
            parts.append(f"{key}-{value}".replace("/", "_"))
        return f"{self.index:03d}_" + "_".join(parts) if parts else f"{self.index:03d}"


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["a.b=1,2", "c=x"]`` -> ``{"a.b": ["1", "2"], "c": ["x"]}``."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, values = parse_override(spec)
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not items:
            raise ConfigError(f"--grid {spec!r}: no values after '='")
        if key in grid:
            raise ConfigError(f"--grid {spec!r}: key {key!r} given twice")
        grid[key] = items
    return grid


def parse_random(specs: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """``["optim.lr=loguniform:1e-5:1e-3", "x=choice:a:b"]`` -> distributions."""
    out: dict[str, tuple[str, list[str]]] = {}
    for spec in specs:
        key, body = parse_override(spec)
        kind, *args = body.split(":")
        if kind not in _DISTRIBUTIONS:
            raise ConfigError(f"--random {spec!r}: distribution must be one of {_DISTRIBUTIONS}")
        if kind in ("uniform", "loguniform", "int"):
            if len(args) != 2:
                raise ConfigError(f"--random {spec!r}: {kind} takes LOW:HIGH")
            try:
                lo, hi = float(args[0]), float(args[1])
            except ValueError:
                raise ConfigError(f"--random {spec!r}: LOW and HIGH must be numbers") from None
            if not lo < hi or (kind == "loguniform" and lo <= 0):
                raise ConfigError(f"--random {spec!r}: need 0 < LOW < HIGH for loguniform, LOW < HIGH otherwise")
        elif not args:
            raise ConfigError(f"--random {spec!r}: choice needs at least one option")
        out[key] = (kind, args)
    return out


def _sample(kind: str, args: list[str], rng: random.Random) -> str:
    if kind == "choice":
        return rng.choice(args)
    lo, hi = float(args[0]), float(args[1])
    if kind == "uniform":
        return repr(rng.uniform(lo, hi))
    if kind == "loguniform":
        return repr(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return str(rng.randint(int(lo), int(hi)))


def expand_points(grid: dict[str, list[str]], *, random_specs: dict[str, tuple[str, list[str]]] | None = None,
                  num_samples: int = 0, seeds: int = 1, seed_key: str = "seed",
                  sweep_seed: int = 0) -> list[SweepPoint]:
    """All grid combinations (x random samples) x seeds, in a deterministic order."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    keys = list(grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]
    if random_specs:
        if num_samples < 1:
            raise ConfigError("--random needs --num-samples >= 1")
        rng = random.Random(sweep_seed)
        sampled = []
        for combo in combos:
            for _ in range(num_samples):
                extra = {k: _sample(kind, args, rng) for k, (kind, args) in random_specs.items()}
                sampled.append({**combo, **extra})
        combos = sampled
    points = []
    for combo in combos:
        for s in range(seeds):
            overrides = [f"{k}={v}" for k, v in combo.items()]
            if seeds > 1 or seed_key in combo:
                overrides = [o for o in overrides if not o.startswith(seed_key + "=")]
                overrides.append(f"{seed_key}={combo.get(seed_key, 0) if seeds == 1 else s}")
            points.append(SweepPoint(len(points), tuple(overrides)))
    return points


def trainer_for(cfg: Any) -> tuple[str, Callable[[Any], Any]]:
    """The (subcommand, entry point) that runs a config of this type."""
    name = type(cfg).__name__
    if name not in TRAINERS:
        raise ConfigError(f"no trainer runs a {name}; sweepable config types: {sorted(TRAINERS)}")
    command, target = TRAINERS[name]
    module, func = target.split(":")
    return command, getattr(importlib.import_module(module), func)


def launch_command(config_path: str, command: str, point: SweepPoint, out_dir: str,
                   suffix: str = "") -> str:
    args = ["rlhf-jax", command, "--config", config_path, "--out", f"{out_dir}/{point.name}",
            *point.overrides]
    line = " ".join(shlex.quote(a) for a in args)
    return f"{line} {suffix}".strip()


def final_metrics(result: Any) -> dict[str, float]:
    """Flattens whatever a trainer returned into ``{name: number}``.

    A dataclass (e.g. ``training.TrainResult``) is read field by field WITHOUT deep-copying (its
    ``state``/``model`` fields hold whole parameter trees and are skipped, like every value that
    is neither a number, a scalar array nor a dict); dicts are flattened with dotted names, so
    ``TrainResult.train_metrics["score"]`` becomes ``"train_metrics.score"``.
    """
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    if hasattr(result, "_asdict"):
        result = result._asdict()
    flat: dict[str, float] = {}

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(x, bool):
            flat[prefix] = float(x)
        elif isinstance(x, (int, float)):
            flat[prefix] = float(x)
        elif hasattr(x, "shape") and getattr(x, "shape", None) == () and hasattr(x, "dtype"):
            flat[prefix] = float(x)

    walk("", result)
    return flat


def write_results(rows: list[dict[str, Any]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k != "point", k != "overrides", k))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (" ".join(v) if isinstance(v, list) else v) for k, v in row.items()})


def run_sequential(config_path: str, base_cfg: Any, points: list[SweepPoint], out_dir: Path,
                   *, out_key: str = "out_dir", stop_on_error: bool = False) -> list[dict[str, Any]]:
    """Runs each point through its trainer in this process, one after another.

    Every point is validated before the first one runs. Point ``i`` runs in
    ``out_dir/<point.name>`` (its ``out_key`` field is set to that), and after it finishes its
    ``run.json`` is (re)written by :func:`rlhf_jax.provenance.write_run_record` with the sweep
    point and its final metrics under ``extra``. A point that raises is recorded with its
    ``error`` and the sweep goes on (``stop_on_error=False``) or re-raises at once; the caller sees
    failures in the rows (``run`` exits non-zero).
    """
    from rlhf_jax.provenance import write_run_record
    _, train = trainer_for(base_cfg)
    # Validate every point before running any, so a typo fails in seconds, not hours.
    cfgs = [apply_overrides(base_cfg, p.overrides) for p in points]
    write_run_record(out_dir, base_cfg, extra={"sweep": {
        "mode": "sequential", "config_path": config_path,
        "points": [{"point": p.index, "overrides": list(p.overrides)} for p in points]}})
    rows = []
    for point, cfg in zip(points, cfgs):
        run_dir = out_dir / point.name
        if any(f.name == out_key for f in dataclasses.fields(cfg)):
            cfg = dataclasses.replace(cfg, **{out_key: str(run_dir)})
        t0 = time.time()
        row: dict[str, Any] = {"point": point.index, "overrides": list(point.overrides), "out_dir": str(run_dir)}
        try:
            result = train(cfg)
        except Exception as e:  # recorded in the table and the run record, then re-raised or reported
            row.update(wall_seconds=round(time.time() - t0, 3), error=f"{type(e).__name__}: {e}")
            rows.append(row)
            write_results(rows, out_dir)
            write_run_record(run_dir, cfg, extra={"sweep_point": row})
            if stop_on_error:
                raise
            continue
        row.update(wall_seconds=round(time.time() - t0, 3), **final_metrics(result))
        rows.append(row)
        write_run_record(run_dir, cfg, extra={"sweep_point": row})
        write_results(rows, out_dir)  # keep partial results if a later point dies
    return rows


# ------------------------------------------------------------------------------- vmapped sweeps

def traced_keys(cfg: Any) -> list[str]:
    """The dotted config keys a ``--vmap`` sweep may vary for this trainer config."""
    from rlhf_jax.rl.config import GRPO_HPARAM_FIELDS, PPO_HPARAM_FIELDS
    name = type(cfg).__name__
    if name not in VMAP_SECTIONS:
        raise ConfigError(f"--vmap runs PPO/GRPO/RLOO trainer configs ({sorted(VMAP_SECTIONS)}); "
                          f"the config is a {name}: drop --vmap to run its points one after another")
    section = VMAP_SECTIONS[name]
    fields = PPO_HPARAM_FIELDS if section == "ppo" else GRPO_HPARAM_FIELDS
    return [f"{section}.{f}" for f in fields]


def vmap_values(base_cfg: Any, grid: dict[str, list[str]]) -> dict[str, list[float]]:
    """Validates a ``--vmap`` grid: ``{"ppo.kl_coef": ["0.01", "0.1"]}`` -> ``{"kl_coef": [0.01, 0.1]}``.

    Every key must be a traced (continuous) hyper-parameter of the config's algorithm section and
    every value a number the config accepts; anything else -- a static field such as
    ``ppo.batch_size``, ``optim.learning_rate`` (the RL trainers take ``<section>.lr``), the seed
    (use ``--seeds``) -- is refused with a ConfigError naming the key, before anything is built.
    """
    allowed = traced_keys(base_cfg)
    if not grid:
        raise ConfigError(f"--vmap needs at least one --grid over a traced hyper-parameter: {allowed}")
    out: dict[str, list[float]] = {}
    for key, raw in grid.items():
        if key not in allowed:
            hint = ""
            if key.split(".")[-1] in ("seed",):
                hint = " (vary seeds with --seeds N)"
            elif key.startswith("optim."):
                hint = f" (the learning rate of an RL trainer is {allowed[0].split('.')[0]}.lr)"
            raise ConfigError(f"--vmap: grid key {key!r} is not a traced hyper-parameter of "
                              f"{type(base_cfg).__name__}{hint}; --vmap can vary only {allowed} -- "
                              f"drop --vmap to sweep {key!r} with one run per point")
        vals = []
        for v in raw:
            apply_overrides(base_cfg, [f"{key}={v}"])  # type check, names the key on error
            try:
                vals.append(float(v))
            except ValueError:
                raise ConfigError(f"--vmap: grid key {key!r}: {v!r} is not a number") from None
        out[key.split(".", 1)[1]] = vals
    return out


def resolved_algorithm(cfg: Any) -> Any:
    """The algorithm section as the trainer runs it: empty ``stop_token_ids`` -> the tokenizer's EOS,
    ``pad_token_id`` -> the tokenizer's pad (the rule of ``rl.trainer``'s set-up)."""
    from rlhf_jax.rl.trainer import algorithm_config
    algo = algorithm_config(cfg)
    if algo.stop_token_ids:
        return algo
    from rlhf_jax.data import load_tokenizer
    from rlhf_jax.training.common import get_task_or_none, resolve_tokenizer_dir
    tok_dir = resolve_tokenizer_dir(cfg.data.tokenizer, cfg.policy.path, get_task_or_none(cfg.task))
    if not tok_dir:
        raise ConfigError("config key 'data.tokenizer': empty (and neither policy.path nor task has a tokenizer)")
    tok = load_tokenizer(tok_dir)
    stop = (int(tok.eos_token_id),) if tok.eos_token_id is not None else ()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stop[0] if stop else 0)
    return dataclasses.replace(algo, stop_token_ids=stop, pad_token_id=int(pad))


@dataclasses.dataclass(frozen=True)
class VmapSweepResult:
    """What :func:`run_vmapped_sweep` returns.

    rows: one results-table row per run (point), as written to ``results.jsonl``.
    history: ``{metric: [runs, iterations]}`` numpy arrays (the per-iteration curves).
    final_state: the stacked final ``PPOState`` (leading axis = runs); :func:`unstack` one run.
    values: ``{hparam: [runs]}`` value of each varied hyper-parameter per run; seed_index ``[runs]``.
    setup, algo: the shared :class:`rlhf_jax.rl.RLSetup` and the resolved algorithm config.
    compile_seconds / run_seconds: lowering+compilation, and the execution of all runs.
    """
    rows: list
    history: dict
    final_state: Any
    values: dict
    seed_index: Any
    setup: Any
    algo: Any
    compile_seconds: float
    run_seconds: float

    @property
    def num_runs(self) -> int:
        return len(self.rows)


def unstack(tree: Any, i: int) -> Any:
    """Run ``i`` of a pytree with a leading runs axis."""
    import jax
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def _history_to_host(history: dict) -> dict:
    import numpy as np
    return {k: np.asarray(v) for k, v in history.items()}


def run_separately(base_cfg: Any, runs: Sequence[tuple[dict[str, float], int]], *, setup: Any = None
                   ) -> list[tuple[Any, dict]]:
    """Points of a ``--vmap`` sweep run one at a time: ``jax.jit(make_train(...))(hparams, key)``.

    ``runs``: ``[(values, seed_index), ...]`` such as ``({"kl_coef": 0.1}, 1)``. Each run gets the
    same hyper-parameters (``XHParams.from_config(algo, **values)``) and key
    (``fold_in(PRNGKey(cfg.seed), seed_index)``) as its slot in :func:`run_vmapped_sweep`, so the
    results agree up to float reassociation; this is the reference the vmapped program is tested
    against and the "N sequential runs" of the throughput benchmark. One jitted program serves all
    runs (the hyper-parameters are traced). Returns ``[(final_state, history on the host), ...]``.
    """
    import jax
    import jax.numpy as jnp

    from rlhf_jax.rl import make_train, sweep_keys
    from rlhf_jax.rl.config import GRPOHParams, PPOConfig, PPOHParams
    from rlhf_jax.rl.trainer import build_setup, validate_rl_config
    traced_keys(base_cfg)
    validate_rl_config(base_cfg)
    algo = resolved_algorithm(base_cfg)
    setup = build_setup(base_cfg) if setup is None else setup
    train = jax.jit(make_train(algo, setup, num_iterations=base_cfg.iterations))
    cls = PPOHParams if isinstance(algo, PPOConfig) else GRPOHParams
    out = []
    for values, seed_index in runs:
        hp = cls.from_config(algo, **values)
        key = sweep_keys(base_cfg.seed, jnp.asarray([seed_index], jnp.int32))[0]
        final, history = train(hp, key)
        out.append((final, _history_to_host(jax.device_get(history))))
    return out


def run_vmapped_sweep(base_cfg: Any, grid: dict[str, list[str]], *, seeds: int = 1,
                      out_dir: str | Path | None = None, setup: Any = None,
                      config_path: str = "") -> VmapSweepResult:
    """N seeds x M hyper-parameter values of a PPO/GRPO/RLOO config as ONE compiled program.

    ``grid`` maps traced keys (``ppo.kl_coef``, ``ppo.lr``, ``ppo.clip_eps``, ``ppo.kl_target``,
    ...; see :func:`traced_keys`) to value strings; their Cartesian product x ``seeds`` gives
    ``R = M·N`` runs, points slowest and seeds fastest (the order of :func:`expand_points`). All runs
    start from the same set-up (policy, reference, reward, prompt pool: ``build_setup(base_cfg)``)
    and differ only in the traced hyper-parameters ``hp [R]`` and keys
    ``fold_in(PRNGKey(cfg.seed), seed_index [R])``::

        train = rl.make_train(algo, setup, num_iterations=cfg.iterations)
        final, history = jax.jit(jax.vmap(train))(hp, keys)        # history: {k: [R, iterations]}

    Writes into ``out_dir`` (when given): ``results.jsonl``/``results.csv`` (one row per run:
    overrides, seed, the varied values and the LAST iteration's metrics as ``train_metrics.<k>``,
    plus ``curve_mean.<k>`` over the last quarter of iterations), ``curves.jsonl`` (one line per run
    and iteration) and ``run.json`` (provenance + the sweep's grid and timings).
    """
    import jax
    import numpy as np

    from rlhf_jax.provenance import write_run_record
    from rlhf_jax.rl import make_train, stack_hparams, sweep_keys
    from rlhf_jax.rl.trainer import build_setup, validate_rl_config

    values = vmap_values(base_cfg, grid)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    validate_rl_config(base_cfg)
    points = expand_points(grid, seeds=seeds)
    algo = resolved_algorithm(base_cfg)
    setup = build_setup(base_cfg) if setup is None else setup
    train = make_train(algo, setup, num_iterations=base_cfg.iterations)
    hp, seed_index = stack_hparams(algo, values, num_seeds=seeds)
    keys = sweep_keys(base_cfg.seed, seed_index)
    t0 = time.time()
    compiled = jax.jit(jax.vmap(train)).lower(hp, keys).compile()
    t1 = time.time()
    final, history = compiled(hp, keys)
    history = _history_to_host(jax.device_get(history))
    t2 = time.time()
    runs = len(points)
    per_run = {name: np.asarray(getattr(hp, name)).tolist() for name in values}
    seed_index = np.asarray(seed_index)
    iters = base_cfg.iterations
    tail = max(1, iters // 4)
    rows = []
    for i, point in enumerate(points):
        row: dict[str, Any] = {"point": point.index, "overrides": list(point.overrides),
                               "seed": int(seed_index[i]), "iterations": iters,
                               "wall_seconds": round((t2 - t1) / runs, 4)}
        for name in values:
            row[f"{VMAP_SECTIONS[type(base_cfg).__name__]}.{name}"] = float(per_run[name][i])
        for k, v in history.items():
            row[f"train_metrics.{k}"] = float(v[i, -1])
            row[f"curve_mean.{k}"] = float(np.mean(v[i, -tail:]))
        rows.append(row)
    result = VmapSweepResult(rows=rows, history=history, final_state=final, values=per_run,
                             seed_index=seed_index, setup=setup, algo=algo,
                             compile_seconds=t1 - t0, run_seconds=t2 - t1)
    if out_dir is not None:
        out = Path(out_dir)
        write_results(rows, out)
        with open(out / "curves.jsonl", "w") as f:
            for i, point in enumerate(points):
                for t in range(iters):
                    f.write(json.dumps({"point": point.index, "seed": int(seed_index[i]), "iteration": t + 1,
                                        **{k: float(v[i, t]) for k, v in history.items()}}, sort_keys=True) + "\n")
        write_run_record(out, base_cfg, extra={"sweep": {
            "mode": "vmap", "config_path": config_path, "grid": {k: list(v) for k, v in grid.items()},
            "seeds": seeds, "runs": runs, "iterations": iters,
            "compile_seconds": round(t1 - t0, 3), "run_seconds": round(t2 - t1, 3),
            "runs_per_second": runs / max(t2 - t1, 1e-9)}})
    return result


def evaluate_runs(result: VmapSweepResult, base_cfg: Any, *, num_prompts: int = 128, split: str = "test",
                  temperature: float | None = None, seed: int = 0, batch_size: int = 128) -> list[dict[str, Any]]:
    """Held-out gold reward, proxy reward and KL to the start policy of every run's FINAL policy.

    For each run: ``rlhf_jax.pipeline.evaluate_policy`` on ``num_prompts`` prompts of the task's
    ``split`` (one sample each at the run's sampling temperature), scoring with the task's gold
    reward, the sweep's reward model (``reward.kind="model"``; proxy = its score minus the recorded
    shift; with another reward kind the proxy column repeats gold) and
    ``KL(π‖π_ref) = mean_prompts Σ_t log π(y_t) − log π_ref(y_t)``. Returns one dict per run
    (``point``, the varied values, ``gold_reward``, ``proxy_reward``, ``kl`` and their standard errors).
    """
    from rlhf_jax.pipeline import evaluate_policy
    from rlhf_jax.tasks import get_task
    if not getattr(base_cfg, "task", ""):
        raise ConfigError("config key 'task': evaluate_runs needs an embedded task for the gold reward")
    task = get_task(base_cfg.task)
    prompts = [r["prompt"] for r in task.prompt_records(split, num=num_prompts)]
    frozen = result.setup.frozen
    reward_model, reward_params = frozen.reward_model, frozen.reward_params
    if reward_model is None:
        raise ConfigError("evaluate_runs needs reward.kind='model' (a learned proxy reward); "
                          f"the config has reward.kind={base_cfg.reward.kind!r}")
    out = []
    for i, row in enumerate(result.rows):
        params = unstack(result.final_state.policy.params, i)
        temp = temperature if temperature is not None else (
            float(result.values["temperature"][i]) if "temperature" in result.values else float(result.algo.temperature))
        ev = evaluate_policy(task, result.setup.policy_model, params, frozen.ref_params, reward_model,
                             reward_params, prompts=prompts, seed=seed, temperature=temp,
                             batch_size=batch_size, reward_shift=float(frozen.reward_shift))
        ev.pop("samples", None)
        keep = {k: v for k, v in row.items() if k in ("point", "seed", "overrides") or
                k.startswith(VMAP_SECTIONS[type(base_cfg).__name__] + ".")}
        out.append({**keep, **ev})
    return out


# ------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment config file (a Python file with get_config())")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="grid over a config key (repeatable)")
    parser.add_argument("--random", action="append", default=[], metavar="KEY=DIST:A:B",
                        help="random search: uniform:LO:HI, loguniform:LO:HI, int:LO:HI, choice:A:B")
    parser.add_argument("--num-samples", type=int, default=0, help="random samples per grid point")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per point (0..N-1)")
    parser.add_argument("--seed-key", default="seed", help="config key holding the seed")
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the random search")
    parser.add_argument("--out", default="runs/sweep", help="sweep directory")
    parser.add_argument("--emit-commands", metavar="FILE",
                        help="write one launch command per point to FILE ('-' for stdout) instead of running")
    parser.add_argument("--launch-suffix", default="",
                        help="appended to each emitted command (e.g. multi-host flags)")
    parser.add_argument("--vmap", action="store_true",
                        help="PPO/GRPO/RLOO: run seeds x values of traced hyper-parameters as ONE vmapped program")
    parser.add_argument("--stop-on-error", action="store_true",
                        help="sequential sweeps: stop at the first failing point instead of going on")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to every point")
    # `sweep CONFIG --grid a=1,2 steps=2`: the overrides may come after the options, which plain
    # parse_args cannot split from the CONFIG positional; intermixed parsing can.
    parser.parse_args = parser.parse_intermixed_args


def run(args: argparse.Namespace) -> int:
    base = apply_overrides(load_config_file(args.config), args.overrides)
    grid = parse_grid(args.grid)
    random_specs = parse_random(args.random)
    out_dir = Path(args.out)
    if args.vmap:
        if random_specs:
            raise ConfigError("--vmap takes --grid values only (no --random)")
        if args.emit_commands:
            raise ConfigError("--vmap runs one program here; it cannot be combined with --emit-commands")
        vmap_values(base, grid)  # refuse non-traced keys before the heavy imports
        res = run_vmapped_sweep(base, grid, seeds=args.seeds, out_dir=out_dir, config_path=args.config)
        print(f"{res.num_runs} vmapped runs in one program (compile {res.compile_seconds:.1f} s, "
              f"run {res.run_seconds:.1f} s) -> {out_dir / 'results.csv'}")
        return 0
    points = expand_points(grid, random_specs=random_specs, num_samples=args.num_samples,
                           seeds=args.seeds, seed_key=args.seed_key, sweep_seed=args.sweep_seed)
    for p in points:  # validate all points before anything runs or is emitted
        apply_overrides(base, p.overrides)
    if args.emit_commands:
        command, _ = TRAINERS.get(type(base).__name__, (None, None))
        if command is None:
            raise ConfigError(f"no rlhf-jax subcommand runs a {type(base).__name__}")
        lines = [launch_command(args.config, command, p, str(out_dir), args.launch_suffix)
                 for p in points]
        text = "\n".join(lines) + "\n"
        if args.emit_commands == "-":
            print(text, end="")
        else:
            Path(args.emit_commands).write_text(text)
            print(f"{len(lines)} commands -> {args.emit_commands}")
        return 0
    rows = run_sequential(args.config, base, points, out_dir, stop_on_error=args.stop_on_error)
    failed = [r for r in rows if "error" in r]
    print(f"{len(rows)} points -> {out_dir / 'results.csv'}"
          + (f"; {len(failed)} FAILED: " + "; ".join(f"point {r['point']}: {r['error']}" for r in failed)
             if failed else ""))
    return 1 if failed else 0


def evaluate_start(result: VmapSweepResult, base_cfg: Any, **kw) -> dict[str, Any]:
    """:func:`evaluate_runs`' numbers for the policy every run STARTED from (KL 0 to the reference
    when the start is the reference, as with an SFT policy)."""
    start = dataclasses.replace(result, rows=[{"point": -1, "overrides": ["start"]}],
                                final_state=_StartState(result.setup.policy_params))
    return evaluate_runs(start, base_cfg, **kw)[0]


@dataclasses.dataclass(frozen=True)
class _StartState:
    """A one-run stand-in for a stacked final state: ``.policy.params`` with a leading axis of 1."""
    params: Any

    @property
    def policy(self):
        import jax
        import jax.numpy as jnp
        return types.SimpleNamespace(params=jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], self.params))


def write_jsonl(path: str | Path, records: Sequence[dict]) -> str:
    """Writes ``records`` one JSON object per line (a data file a sweep point can point at)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    return str(path)


# ------------------------------------------------------------------------------- plots of a sweep

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_series(rows: Sequence[dict], *, x: str, y: str | Sequence[str], path: str | Path,
                group: str | None = None, title: str = "", xlabel: str = "", ylabel: str = "",
                logx: bool = False, start: dict | None = None, annotate: str | None = None) -> str:
    """A line plot of results-table rows saved as PNG: ``y`` (one or several columns) against ``x``,
    one line per distinct value of ``group`` (rows sorted by ``x``). ``start``: a row drawn as a
    black star (e.g. the SFT policy at KL 0). ``annotate``: a column written next to each point."""
    plt = _pyplot()
    ys = [y] if isinstance(y, str) else list(y)
    for col in [x, *ys] + ([group] if group else []):
        if not any(col in r for r in rows):
            raise KeyError(f"plot_series: no row has column {col!r}; columns: {sorted({k for r in rows for k in r})}")
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get(group) if group else None, []).append(r)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = ["o-", "s--", "^-.", "d:"]
    for gi, (g, rs) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0]))):
        rs = sorted(rs, key=lambda r: r[x])
        for yi, col in enumerate(ys):
            label = " ".join(p for p in ((col if len(ys) > 1 else ""), (f"{group}={g}" if group else "")) if p)
            ax.plot([r[x] for r in rs], [r[col] for r in rs], styles[yi % len(styles)], label=label or col,
                    color=f"C{gi if group else yi}" if group else f"C{yi}", alpha=0.9 if yi == 0 else 0.7)
            if annotate:
                for r in rs:
                    ax.annotate(f"{r[annotate]:g}" if isinstance(r[annotate], float) else str(r[annotate]),
                                (r[x], r[col]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    if start is not None:
        for yi, col in enumerate(ys):
            ax.plot([start[x]], [start[col]], "*", color=f"C{yi}" if not group else "k", markeredgecolor="k",
                    markersize=13, label=f"start: {col}" if len(ys) > 1 else "start")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or (ys[0] if len(ys) == 1 else "value"))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def plot_curves(result: VmapSweepResult, metric: str, path: str | Path, *, label: str | None = None,
                title: str = "") -> str:
    """Per-iteration ``metric`` of every run of a vmapped sweep (one line per run) as PNG; runs
    that share the varied values share a colour (seeds are the spread)."""
    plt = _pyplot()
    if metric not in result.history:
        raise KeyError(f"plot_curves: no metric {metric!r}; have {sorted(result.history)}")
    names = list(result.values)
    label = label or (names[0] if names else None)
    keys = [tuple(result.values[n][i] for n in names) for i in range(result.num_runs)]
    colours = {k: f"C{j}" for j, k in enumerate(dict.fromkeys(keys))}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    seen = set()
    for i, k in enumerate(keys):
        lab = ", ".join(f"{n}={v:g}" for n, v in zip(names, k)) if k not in seen else None
        seen.add(k)
        h = result.history[metric][i]
        ax.plot(range(1, len(h) + 1), h, color=colours[k], label=lab, alpha=0.85)
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per iteration ({result.num_runs} runs, one program)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
