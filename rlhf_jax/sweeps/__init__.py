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

Modules: :mod:`~rlhf_jax.sweeps.points` (points of a grid/random search, launch commands),
:mod:`~rlhf_jax.sweeps.sequential` (one run after another through the config's trainer),
:mod:`~rlhf_jax.sweeps.vmapped` (one ``jax.vmap`` program; the only user of the RL package's
sweep internals), :mod:`~rlhf_jax.sweeps.report` (the tables on disk) and
:mod:`~rlhf_jax.sweeps.cli` (``rlhf-jax sweep``). Evaluation and plots of a sweep's results live in
:mod:`rlhf_jax.evaluation` (shared with the pipeline).

    rlhf-jax sweep experiments/sft_sort_tiny.py --grid optim.learning_rate=1e-3,3e-3 --seeds 2 --out runs/sw
    rlhf-jax sweep experiments/ppo_sort_tiny.py --vmap --grid ppo.kl_coef=0.01,0.05,0.2 --seeds 4 --out runs/kl
"""
from rlhf_jax.sweeps.points import SweepPoint, expand_points, launch_command, parse_grid, parse_random
from rlhf_jax.sweeps.report import write_curves, write_results
from rlhf_jax.sweeps.sequential import TRAINERS, final_metrics, run_sequential, trainer_for
from rlhf_jax.sweeps.vmapped import (VMAP_SECTIONS, VmapSweepResult, evaluate_runs, evaluate_start,
                                     evaluate_starts, run_policy_params, run_reference_params, run_separately,
                                     run_start_params, run_vmapped_sweep, traced_keys, unstack, vmap_values)

__all__ = [
    "SweepPoint", "expand_points", "launch_command", "parse_grid", "parse_random",
    "write_curves", "write_results",
    "TRAINERS", "final_metrics", "run_sequential", "trainer_for",
    "VMAP_SECTIONS", "VmapSweepResult", "evaluate_runs", "evaluate_start", "evaluate_starts",
    "run_policy_params", "run_reference_params", "run_separately", "run_start_params", "run_vmapped_sweep", "traced_keys", "unstack", "vmap_values",
]
