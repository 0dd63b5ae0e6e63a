"""Vmapped sweeps: N seeds x M values of traced hyper-parameters of a PPO/GRPO/RLOO config as ONE
compiled program, ``jax.jit(jax.vmap(rl.make_train(...)))`` (:func:`run_vmapped_sweep`).

Only the continuous hyper-parameters the RL package traces (``ppo.kl_coef``, ``ppo.lr``,
``ppo.clip_eps``, ``ppo.kl_target``, ...; :func:`traced_keys`) may vary; a grid key that is not
traced is refused (:func:`vmap_values`). This module is the sweeps' one client of the RL package's
internals (``make_train``, ``stack_hparams``, ``sweep_keys``, ``build_setup``, the hyper-parameter
classes): everything else in :mod:`rlhf_jax.sweeps` goes through it.

The params a run's optimiser freezes -- a LoRA run's base (``policy.lora_rank > 0``, and its LoRA
critic's), ``optim.freeze`` -- are the same in every run, so the program holds them ONCE: they enter
unbatched (``in_axes=None``: an argument, not a constant baked into the program) and only the trainable
leaves (adapters, scalar heads), optimiser states, keys, prompts and hyper-parameters carry the runs
axis (:func:`split_frozen`); the final state holds each run's own leaves (:func:`run_policy_params`).
Likewise a full fine-tune's reference policy (``RLFrozen.ref_params``), the same in every run when the
runs start from one model (``policy.path``, or one seed): it is checked equal across the runs and passed
once, inside the program's unbatched ``frozen`` argument, instead of once per run.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import devices as devices_lib
from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax.evaluation import evaluate_policy
from rlhf_jax.models import lora
from rlhf_jax.provenance import write_run_record
from rlhf_jax.rl import hparam_fields, make_train, stack_hparams, with_hparams
from rlhf_jax.rl.trainer import (build_setup, export_policy, resolved_algorithm, run_flops, run_inputs,
                                 seeded_frozen_params, seeded_reference_params, state_key, validate_rl_config)
from rlhf_jax.sweeps.points import SweepPoint, expand_points
from rlhf_jax.sweeps.report import write_curves, write_results
from rlhf_jax.tasks import get_task
from rlhf_jax.training import loop
from rlhf_jax.training.distributed import barrier
from rlhf_jax.training import mesh as mesh_lib
from rlhf_jax.training.common import get_task_or_none, require_tokenizer_dir
from rlhf_jax.training.configs import MeshConfig

VMAP_SECTIONS: dict[str, str] = {"PPOTrainConfig": "ppo", "GRPOTrainConfig": "grpo", "RLOOTrainConfig": "rloo",
                                 "OnlineDPOTrainConfig": "online_dpo"}


def traced_keys(cfg: Any) -> list[str]:
    """The dotted config keys a ``--vmap`` sweep may vary for this trainer config."""
    name = type(cfg).__name__
    if name not in VMAP_SECTIONS:
        raise ConfigError(f"--vmap runs PPO/GRPO/RLOO/online-DPO trainer configs ({sorted(VMAP_SECTIONS)}); "
                          f"the config is a {name}: drop --vmap to run its points one after another")
    if cfg.reward.kind == "python":
        raise ConfigError("--vmap needs a reward computed inside the compiled program (reward.kind=gold|model|jax); "
                          "reward.kind=python runs on the host between two programs and cannot be vmapped: write "
                          "the reward as a JAX function of token ids and set reward.kind=jax "
                          "reward.function=path/to/file.py:fn (or drop --vmap)")
    section = VMAP_SECTIONS[name]
    return [f"{section}.{f}" for f in hparam_fields(getattr(cfg, section))]


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
        key = key.replace(".hparams.", ".")  # ppo.hparams.kl_coef is ppo.kl_coef
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


@dataclasses.dataclass(frozen=True)
class VmapSweepResult:
    """What :func:`run_vmapped_sweep` returns.

    rows: one results-table row per run (point), as written to ``results.jsonl``.
    history: ``{metric: [runs, iterations]}`` numpy arrays (the per-iteration curves).
    final_state: the stacked final ``RLState`` (leading axis = runs); :func:`unstack` one run. The
      frozen params every run shares (a LoRA base) are not in it (None leaves): ``shared`` holds them
      once, and :func:`run_policy_params` is run ``i``'s whole policy. A reference policy the runs share
      is ``setup.frozen.ref_params``.
    values: ``{hparam: [runs]}`` value of each varied hyper-parameter per run; seed_index ``[runs]``.
    setup, algo: the shared :class:`rlhf_jax.rl.RLSetup` and the resolved algorithm config.
    compile_seconds / run_seconds: lowering+compilation, and the execution of all runs.
    per_seed: ``{}`` when every run starts from the set-up's model (one seed, or ``policy.path``: the
      common case, nothing extra held). When several seeds each draw their own model (no ``policy.path``;
      ``rl.trainer.seeded_reference_params`` / ``seeded_frozen_params``): ``{"seeds": (s, ...), "policy_params":
      [S, ...], "ref_params": [S, ...] or None}`` -- each distinct seed's start policy and reference, as the
      program took them (:func:`run_start_params`, :func:`run_reference_params`).
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
    shared: dict = dataclasses.field(default_factory=dict)  # {"policy_params"|"value_params": frozen part}
    per_seed: dict = dataclasses.field(default_factory=dict)  # each seed's own start and reference, or {}

    @property
    def num_runs(self) -> int:
        return len(self.rows)


def unstack(tree: Any, i: int) -> Any:
    """Run ``i`` of a pytree with a leading runs axis."""
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def run_policy_params(result: "VmapSweepResult", i: int) -> Any:
    """Run ``i``'s final policy params: its own (trainable) leaves joined with the frozen ones the runs share."""
    own = unstack(result.final_state.policy.params, i)
    shared = result.shared.get("policy_params")
    return own if shared is None else join_frozen(shared, own)


def _seed_slot(result: "VmapSweepResult", i: int) -> int | None:
    """Run ``i``'s row in ``result.per_seed`` (None when the runs share the set-up's start and reference)."""
    if not result.per_seed:
        return None
    return result.per_seed["seeds"].index(int(result.seed_index[i]))


def run_reference_params(result: "VmapSweepResult", i: int, policy_params: Any = None) -> Any:
    """The reference policy run ``i`` was trained against: its seed's own (``result.per_seed``) when the
    seeds draw their own models, else the one the runs share (``setup.frozen.ref_params``). A LoRA run's
    reference is its own base, adapters off (``lora.base_params`` of ``policy_params``, default: the run's
    final params; the ``setup.policy_model`` runs variables without adapters as the base)."""
    slot = _seed_slot(result, i)
    ref = result.setup.frozen.ref_params if slot is None else result.per_seed.get("ref_params")
    if ref is None:
        params = run_policy_params(result, i) if policy_params is None else policy_params
        return lora.base_params(params) if lora.is_lora_params(params) else None
    return ref if slot is None else unstack(ref, slot)


def run_start_params(result: "VmapSweepResult", i: int) -> Any:
    """The policy params run ``i`` STARTED from: its seed's own (``result.per_seed``) when the seeds draw
    their own models, else the set-up's (``setup.policy_params``; with ``policy.path`` only a run's fresh
    scalar head or LoRA adapters, which leave the start's sampling distribution unchanged, are drawn from
    its seed)."""
    slot = _seed_slot(result, i)
    if slot is None:
        return result.setup.policy_params
    own = unstack(result.per_seed["policy_params"], slot)
    shared = result.shared.get("policy_params")
    return own if shared is None else join_frozen(shared, own)


def _per_seed_starts(run_seeds: Sequence[int], inputs: dict) -> dict:
    """``VmapSweepResult.per_seed`` from the program's stacked run inputs: the start policy and reference of
    each distinct seed (its first run's), in order of first appearance."""
    seeds = tuple(dict.fromkeys(int(s) for s in run_seeds))
    first = np.asarray([list(map(int, run_seeds)).index(s) for s in seeds])
    take = lambda tree: jax.tree_util.tree_map(lambda x: x[first], tree)  # noqa: E731
    ref = inputs.get("ref_params")
    return {"seeds": seeds, "policy_params": take(inputs["policy_params"]),
            "ref_params": None if ref is None else take(ref)}


def _is_none(x) -> bool:
    return x is None


def frozen_mask(tx: Any) -> tuple[bool, ...]:
    """Per leaf of the params an optimiser was built for (``tree_leaves`` order): True where it freezes the
    leaf (``training.Optimizer.frozen``: a LoRA base, ``optim.freeze``); ``()`` when it trains every leaf."""
    mask = tuple(bool(f) for f in getattr(tx, "frozen", ()) or ())
    return mask if any(mask) else ()


def split_frozen(params: Any, mask: Sequence[bool]) -> tuple[Any, Any]:
    """``(frozen, trainable)``: two copies of ``params``' tree, each with None at the other one's leaves
    (``mask`` from :func:`frozen_mask`); :func:`join_frozen` puts them back together."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    if len(leaves) != len(mask):
        raise ValueError(f"split_frozen: the params have {len(leaves)} leaves, the optimiser's frozen mask "
                         f"{len(mask)}: the mask belongs to another model")
    return (tree.unflatten([x if f else None for x, f in zip(leaves, mask)]),
            tree.unflatten([None if f else x for x, f in zip(leaves, mask)]))


def join_frozen(frozen: Any, trainable: Any) -> Any:
    """Inverse of :func:`split_frozen` (``trainable`` may also be whole params: its frozen leaves are ignored)."""
    return jax.tree_util.tree_map(lambda f, t: t if f is None else f, frozen, trainable, is_leaf=_is_none)


def _drop_frozen(params: Any, frozen: Any) -> Any:
    """``params`` with None at the leaves ``frozen`` holds (what a vmapped run hands back: its own leaves)."""
    return jax.tree_util.tree_map(lambda f, p: p if f is None else None, frozen, params, is_leaf=_is_none)


def _history_to_host(history: dict) -> dict:
    return {k: np.asarray(v) for k, v in history.items()}


def seed_values(base_cfg: Any, seed_index: Sequence[int], seeds: int) -> list[int]:
    """The ``seed`` of each run: the sequential sweep's ``seed=s`` override (``s`` = the seed index) when
    there are several seeds, else the config's own seed (as ``expand_points`` does)."""
    return [int(s) for s in seed_index] if seeds > 1 else [int(base_cfg.seed)] * len(seed_index)


def shared_frozen_params(setup: Any) -> dict:
    """The frozen part (:func:`split_frozen`) of the setup's initial policy and value params, for the ones
    whose optimiser freezes leaves: ``{"policy_params": ..., "value_params": ...}`` (``{}`` for full
    fine-tunes). A vmapped sweep holds these once for all its runs."""
    out = {}
    for key, tx in (("policy_params", setup.policy_tx), ("value_params", setup.value_tx)):
        params = getattr(setup, key)
        mask = frozen_mask(tx) if params is not None else ()
        if mask:
            out[key] = split_frozen(params, mask)[0]
    return out


def _first_difference(shared: Any, own: Any) -> str | None:
    """The path of the first leaf where ``own`` is not exactly ``shared`` (shape, dtype or any value; a
    different tree structure is ``"<tree structure>"``), or None when they are equal."""
    flat, tree = jax.tree_util.tree_flatten_with_path(shared)
    if jax.tree_util.tree_structure(own) != tree:
        return "<tree structure>"
    for (path, a), b in zip(flat, jax.tree_util.tree_leaves(own)):
        if (np.shape(a) != np.shape(b) or jnp.dtype(a.dtype) != jnp.dtype(b.dtype)
                or not bool(jnp.array_equal(a, b))):
            return jax.tree_util.keystr(path)
    return None


def _check_same_frozen(shared: Any, frozen: Any, key: str, seed: int) -> None:
    """ConfigError unless a run's frozen params are exactly the sweep's shared ones (skipped in a plan)."""
    if devices_lib.abstract():
        return
    where = _first_difference(shared, frozen)
    if where is not None:
        raise ConfigError(f"--vmap: the frozen {key.split('_')[0]} leaf {where} of the run with seed {seed} differs "
                          f"from the one the sweep's runs share; a vmapped sweep holds the frozen params (a LoRA "
                          f"base) once: start every run from the same model (policy.path), or drop --vmap")


def _check_same_reference(shared: Any, ref: Any, seed: int) -> None:
    """ConfigError unless a run's reference params are exactly the sweep's shared ones (skipped in a plan)."""
    if devices_lib.abstract():
        return
    where = _first_difference(shared, ref)
    if where is not None:
        raise ConfigError(f"--vmap: the reference policy's params (leaf {where}) of the run with seed {seed} differ "
                          f"from the reference the sweep's runs share (the set-up's frozen.ref_params); a vmapped "
                          f"sweep holds one reference for all its runs: start every run from the same model "
                          f"(policy.path, ref_param_dtype), or drop --vmap")


def stacked_run_inputs(base_cfg: Any, seeds: Sequence[int], *, devices_per_run: int | None = None,
                       setup: Any = None, share_frozen: bool = True, share_reference: bool = True
                       ) -> tuple[Any, Any, dict]:
    """``(keys [R], run inputs with a leading R axis, shared)`` of runs with these seeds (each distinct
    seed's set-up is built once): exactly what ``train_rl`` starts each run from (``rl.trainer.run_inputs``).

    With ``setup`` and ``share_frozen``, the leaves its optimisers freeze (a LoRA base) are not stacked:
    ``shared`` (:func:`shared_frozen_params` of ``setup``) holds them once, every run's own frozen leaves
    must equal them (a ConfigError otherwise) and its inputs hold None there. With ``setup`` and
    ``share_reference``, the reference policy's params are not stacked either: every run's must equal
    ``setup.frozen.ref_params`` exactly (a ConfigError otherwise; neither check runs in a plan) and the
    inputs have no ``"ref_params"``: the program reads the setup's (:func:`_shared_frozen`). Without
    ``setup`` nothing is shared (``shared`` is ``{}``, every run's reference is stacked)."""
    shared = shared_frozen_params(setup) if setup is not None and share_frozen else {}
    masks = {"policy_params": frozen_mask(setup.policy_tx), "value_params": frozen_mask(setup.value_tx)} \
        if shared else {}
    one_ref = setup is not None and share_reference
    by_seed = {}
    for s in sorted(set(seeds)):
        run = run_inputs(base_cfg, s, devices_per_run=devices_per_run)
        for key in shared:
            frozen, run[key] = split_frozen(run[key], masks[key])
            _check_same_frozen(shared[key], frozen, key, s)  # this seed's copy of the base is then dropped
        if one_ref:  # this seed's copy of the reference is dropped once it is checked equal to the setup's
            _check_same_reference(setup.frozen.ref_params, run.pop("ref_params"), s)
        by_seed[s] = run
    inputs = jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                                    *[by_seed[s] for s in seeds])
    return jnp.stack([state_key(s) for s in seeds]), inputs, shared


def run_separately(base_cfg: Any, runs: Sequence[tuple[dict[str, float], int]], *, setup: Any = None
                   ) -> list[tuple[Any, dict]]:
    """Points of a ``--vmap`` sweep run one at a time: ``jax.jit(make_train(...))(hparams, key, run)``.

    ``runs``: ``[(values, seed), ...]`` such as ``({"kl_coef": 0.1}, 1)``. Each run gets the same
    hyper-parameters (``with_hparams(algo, **values).hparams``), state key and run inputs (the
    trainer's initial params and prompt batches for that seed) as its slot in
    :func:`run_vmapped_sweep`, so the results agree up to float reassociation; this is the reference the
    vmapped program is tested against. One jitted program serves all runs (the hyper-parameters are
    traced). Returns ``[(final_state, history on the host), ...]``.
    """
    traced_keys(base_cfg)
    validate_rl_config(base_cfg)
    algo = resolved_algorithm(base_cfg)
    setup = build_setup(base_cfg) if setup is None else setup
    train = jax.jit(make_train(algo, setup, num_iterations=base_cfg.iterations))
    out = []
    for values, seed in runs:
        hp = with_hparams(algo, **values).hparams.traced()
        final, history = train(hp, state_key(seed), run_inputs(base_cfg, seed))
        out.append((final, _history_to_host(jax.device_get(history))))
    return out


def run_vmapped_sweep(base_cfg: Any, grid: dict[str, list[str]], *, seeds: int = 1,
                      out_dir: str | Path | None = None, setup: Any = None,
                      config_path: str = "", save_policies: bool = False,
                      mesh: MeshConfig | None = None, share_reference: bool = True) -> VmapSweepResult:
    """N seeds x M hyper-parameter values of a PPO/GRPO/RLOO config as ONE compiled program.

    ``grid`` maps traced keys (``ppo.kl_coef``, ``ppo.lr``, ``ppo.clip_eps``, ``ppo.kl_target``,
    ...; see :func:`traced_keys`) to value strings; their Cartesian product x ``seeds`` gives
    ``R = M·N`` runs, points slowest and seeds fastest (the order of :func:`expand_points`). Run ``i``
    is the sequential sweep's point ``i`` exactly: the same initial params, the same prompts in the same
    order (the data iterator of its seed), the same keys (``rl.trainer.run_inputs``, ``state_key``);
    only the traced hyper-parameters ``hp [R]`` differ inside one program::

        train = rl.make_train(algo, setup, num_iterations=cfg.iterations)
        final, history = jax.jit(jax.vmap(train))(hp, keys, inputs)   # history: {k: [R, iterations]}

    Writes into ``out_dir`` (when given): ``results.jsonl``/``results.csv`` (one row per run:
    overrides, seed, the varied values and the LAST iteration's metrics as ``train_metrics.<k>``,
    plus ``curve_mean.<k>`` over the last quarter of iterations), ``curves.jsonl`` (one line per run
    and iteration), ``run.json`` (provenance + the sweep's grid and timings) and, with
    ``save_policies``, each run's final policy as a Hugging Face directory ``<point>/export``.

    The frozen params every run shares -- the reward model, a LoRA base (policy's and critic's), a full
    fine-tune's reference policy -- enter the program once, unbatched (``inputs`` hold each run's
    trainable leaves only; each run's base and reference are checked equal to the shared ones, a
    ConfigError otherwise). With several seeds and a model drawn from the seed (no ``policy.path``: the
    task model initialised per seed) the runs' bases and references differ, and they are stacked per run
    like any other param (a note is printed); the result then keeps each distinct seed's start policy and
    reference (``VmapSweepResult.per_seed``) so that :func:`evaluate_runs` measures every run against its
    own. ``share_reference=False`` stacks the reference per run even
    when the runs share it (the layout before it was shared: a baseline to compare against).

    ``mesh`` (default: the config's ``mesh`` section when it sets any key, else one device) lays the
    program out on a ``(runs, data, fsdp)`` device mesh (:func:`sweep_mesh`): ``hp``, ``keys`` and
    ``inputs`` are split over ``runs`` along their leading runs axis, each run's params over ``fsdp``
    (``P("runs", *fsdp_spec)``) and its prompt batches over ``(data, fsdp)``; the frozen params every
    run shares (reward model, LoRA base, reference) are sharded over ``fsdp`` and replicated over
    ``runs``. ``R`` must be a multiple of ``mesh.runs``. Results are gathered to the host; process 0
    writes them.
    """
    values = vmap_values(base_cfg, grid)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    why = seeded_frozen_params(base_cfg) if seeds > 1 else ""
    why_ref = seeded_reference_params(base_cfg) if seeds > 1 else ""
    stacked = [what for what, w in (("the frozen params", why), ("the reference policy", why_ref)) if w]
    if stacked and jax.process_index() == 0:  # each seed its own model: stacked per run, as any other param
        print(f"[sweep] --vmap --seeds {seeds}: {why or why_ref}; {' and '.join(stacked)} "
              f"{'are' if why else 'is'} stacked once per run (set policy.path to hold one copy for all runs)",
              flush=True)
    points = expand_points(grid, seeds=seeds)
    device_mesh = sweep_mesh(base_cfg, mesh, num_runs=len(points), seeds=seeds)
    # the trainers' checks, on one run's layout (its data x fsdp devices; mesh.runs is the sweep's business)
    run_devices = 1 if device_mesh is None else mesh_lib.batch_size_multiple(device_mesh)
    run_cfg = dataclasses.replace(base_cfg, mesh=MeshConfig())  # one run's view: the sweep owns the mesh
    validate_rl_config(run_cfg, devices_per_run=run_devices)
    algo = resolved_algorithm(run_cfg)
    setup = build_setup(run_cfg, devices_per_run=run_devices) if setup is None else setup
    hp, seed_index = stack_hparams(algo, values, num_seeds=seeds)
    run_seeds = seed_values(base_cfg, np.asarray(seed_index), seeds)
    keys, inputs, shared = stacked_run_inputs(run_cfg, run_seeds, devices_per_run=run_devices, setup=setup,
                                              share_frozen=not why, share_reference=share_reference and not why_ref)
    if devices_lib.abstract() and device_mesh is None:
        raise ConfigError("plan of a vmapped sweep: give its mesh (--mesh runs=R,data=D,fsdp=F, or the config's "
                          "mesh section)")
    frozen = _shared_frozen(setup, inputs)
    packed, unpack = _pack_shared(frozen, shared)
    final, history, compile_seconds, run_seconds, placed = _compile_and_run(
        _train_with_frozen(algo, setup, base_cfg.iterations, unpack), hp, keys, inputs, frozen, packed,
        device_mesh, model_flops=len(points) * run_flops(run_cfg, setup))
    shared = unpack(*placed) if shared else {}  # as placed on the mesh, beside the final state's leaves
    if shared and jax.process_count() > 1:
        shared = mesh_lib.gather_to_host(shared)
    per_run = {name: np.asarray(getattr(hp, name)).tolist() for name in values}
    seed_index = np.asarray(run_seeds)
    rows = _result_rows(base_cfg, points, per_run, seed_index, history, run_seconds)
    per_seed = _per_seed_starts(run_seeds, inputs) if why or why_ref else {}  # each seed its own model
    result = VmapSweepResult(rows=rows, history=history, final_state=final, values=per_run,
                             seed_index=seed_index, setup=setup, algo=algo,
                             compile_seconds=compile_seconds, run_seconds=run_seconds, shared=shared,
                             per_seed=per_seed)
    if out_dir is not None and jax.process_index() == 0:
        _write_outputs(Path(out_dir), base_cfg, grid, seeds, config_path, points, result)
        if save_policies:
            save_run_policies(result, base_cfg, points, Path(out_dir))
    return result


def save_run_policies(result: VmapSweepResult, base_cfg: Any, points: list[SweepPoint], out: Path) -> list[str]:
    """Each run's final policy as a Hugging Face directory ``out/<point name>/export``."""
    tok_dir = require_tokenizer_dir(base_cfg.data.tokenizer, base_cfg.policy.path, get_task_or_none(base_cfg.task),
                                    "policy")
    return [export_policy(result.setup.policy_model, run_policy_params(result, i), tok_dir,
                          out / point.name / "export") for i, point in enumerate(points)]


def sweep_mesh(base_cfg: Any, mesh: MeshConfig | None, *, num_runs: int, seeds: int = 1):
    """The device mesh of a vmapped sweep of ``num_runs`` runs, or None (one device, no shardings).

    ``mesh`` (``--mesh runs=4,fsdp=2``) or else the config's ``mesh`` section when it differs from the
    default; ``runs × data × fsdp`` must equal the devices and ``num_runs`` be a multiple of ``runs``.
    """
    if mesh is None:
        mesh = base_cfg.mesh if getattr(base_cfg, "mesh", MeshConfig()) != MeshConfig() else None
    if mesh is None:
        return None
    if mesh.mode != "jit":
        raise ConfigError(f"config key 'mesh.mode': a vmapped sweep runs on a jit mesh, got {mesh.mode!r}")
    runs, data, fsdp = mesh.resolve(devices_lib.device_count())
    if num_runs % runs:
        raise ConfigError(f"config key 'mesh.runs' (--mesh runs=): the sweep's {num_runs} runs (--seeds {seeds} x "
                          f"{num_runs // seeds} --grid points) do not split over mesh.runs={runs}; make the "
                          f"number of runs a multiple of {runs} or choose another mesh.runs")
    return mesh_lib.make_mesh(runs, data, fsdp)


def _shared_frozen(setup: Any, inputs: dict) -> Any:
    """The frozen pytree every run shares (an argument of the program, not a constant baked into it),
    the reference params with it unless they come per run (stacked) in ``inputs``."""
    return setup.frozen.replace(ref_params=None) if "ref_params" in inputs else setup.frozen


def _pack_shared(frozen: Any, shared: dict) -> tuple[dict, Callable[[Any, dict], dict]]:
    """``(shared as the program takes it, unpack)``: a critic's frozen leaves that ARE arrays the program
    already takes -- the policy's base (a critic on the policy's trunk, ``value_init="policy"``) or the
    reward model's trunk (``value_init="reward"``) -- are passed once; ``unpack(frozen, packed)`` puts them
    back inside the program."""
    if "value_params" not in shared:
        return shared, lambda fz, s: s
    source = {id(x): i for i, x in enumerate(jax.tree_util.tree_leaves((frozen, shared.get("policy_params"))))}
    leaves, tree = jax.tree_util.tree_flatten(shared["value_params"])
    alias = {j: source[id(x)] for j, x in enumerate(leaves) if id(x) in source}
    if not alias:
        return shared, lambda fz, s: s
    packed = {**shared, "value_params": tree.unflatten([None if j in alias else x for j, x in enumerate(leaves)])}

    def unpack(fz, s):
        src = jax.tree_util.tree_leaves((fz, s.get("policy_params")))
        own = tree.flatten_up_to(s["value_params"])
        return {**s, "value_params": tree.unflatten([src[alias[j]] if j in alias else x for j, x in enumerate(own)])}
    return packed, unpack


def _train_with_frozen(algo: Any, setup: Any, iterations: int, unpack: Callable[[Any, dict], dict] | None = None):
    """``make_train``'s ``train(hp, key, run)`` with the setup's frozen params and the frozen params the
    runs share (``shared``: :func:`shared_frozen_params`) as arguments: a run's own params are joined with
    ``shared`` where its state is built, and its final state is handed back without them (so ``jax.vmap``
    neither batches them in the carry nor stacks them in the output: ``TrainState.apply_gradients``
    passes frozen leaves through untouched). ``unpack``: :func:`_pack_shared`'s."""
    def train(hp, key, run, frozen, shared):
        shared = shared if unpack is None else unpack(frozen, shared)
        run = {**run, **{k: join_frozen(v, run[k]) for k, v in shared.items()}}
        final, history = make_train(algo, dataclasses.replace(setup, frozen=frozen),
                                    num_iterations=iterations)(hp, key, run)
        if "policy_params" in shared:
            final = final.replace(policy=final.policy.replace(
                params=_drop_frozen(final.policy.params, shared["policy_params"])))
        if "value_params" in shared:
            final = final.replace(value=final.value.replace(
                params=_drop_frozen(final.value.params, shared["value_params"])))
        return final, history
    return train


def _in_shardings(mesh: Any, hp: Any, keys: Any, inputs: dict, frozen: Any, shared: dict) -> tuple:
    """Runs over ``runs`` (leading axis of hp, keys, inputs), each run's params over ``fsdp``, its
    prompt batches ``[R, I, B, P]`` over ``(data, fsdp)``; the shared frozen params (reward model, LoRA
    base, a shared reference) over ``fsdp``, replicated over ``runs``."""
    by_run = mesh_lib.by_runs(mesh)
    run = {k: (mesh_lib.runs_batch_sharding(mesh, v, batch_axis=2) if k == "prompts"
               else mesh_lib.runs_sharding(mesh, v)) for k, v in inputs.items()}
    return (jax.tree_util.tree_map(lambda _: by_run, hp), jax.tree_util.tree_map(lambda _: by_run, keys), run,
            mesh_lib.param_sharding(mesh, frozen), mesh_lib.param_sharding(mesh, shared))


def _compile_and_run(train, hp: Any, keys: Any, inputs: Any, frozen: Any, shared: dict, mesh: Any = None, *,
                     model_flops: float | None = None) -> tuple[Any, dict, float, float, tuple]:
    """``jax.jit(jax.vmap(train))`` lowered and compiled (on ``mesh`` with :func:`_in_shardings`, else
    on one device), then run once: ``(final_state, history on the host, compile seconds, run seconds,
    (frozen, shared) as placed)``.
    ``frozen`` and ``shared`` enter unbatched (``in_axes=None``). In a plan (``rlhf_jax.devices.abstract()``)
    the program and its placed abstract inputs are handed back (``training.loop.Planned``) instead."""
    args = (hp, keys, inputs, frozen, shared)
    vmapped = jax.vmap(train, in_axes=(0, 0, 0, None, None))
    if mesh is None:
        jitted = jax.jit(vmapped)
    else:
        shardings = _in_shardings(mesh, *args)
        args = mesh_lib.place(args, shardings)
        jitted = jax.jit(vmapped, in_shardings=shardings)
    if devices_lib.abstract():
        raise loop.Planned([loop.Program("sweep_vmapped", jitted, args, {}, model_flops)], mesh)
    t0 = time.time()
    compiled = jitted.lower(*args).compile()
    barrier("rlhf_jax_sweep_compiled")  # every host starts the program together (see training.distributed)
    t1 = time.time()
    final, history = compiled(*args)
    history = _history_to_host(mesh_lib.gather_to_host(history))
    if jax.process_count() > 1:  # every process gets the whole stacked state (saved policies, evaluation)
        final = mesh_lib.gather_to_host(final)
    t2 = time.time()
    return final, history, t1 - t0, t2 - t1, args[3:]


def _result_rows(base_cfg: Any, points: list[SweepPoint], per_run: dict[str, list], seed_index: np.ndarray,
                 history: dict, run_seconds: float) -> list[dict[str, Any]]:
    """One results-table row per run: overrides, seed, the varied values, the last iteration's
    metrics (``train_metrics.<k>``) and their mean over the last quarter (``curve_mean.<k>``)."""
    section = VMAP_SECTIONS[type(base_cfg).__name__]
    iters = base_cfg.iterations
    tail = max(1, iters // 4)
    rows = []
    for i, point in enumerate(points):
        row: dict[str, Any] = {"point": point.index, "overrides": list(point.overrides),
                               "seed": int(seed_index[i]), "iterations": iters,
                               "wall_seconds": round(run_seconds / len(points), 4)}
        for name in per_run:
            row[f"{section}.{name}"] = float(per_run[name][i])
        for k, v in history.items():
            row[f"train_metrics.{k}"] = float(v[i, -1])
            row[f"curve_mean.{k}"] = float(np.mean(v[i, -tail:]))
        rows.append(row)
    return rows


def _write_outputs(out: Path, base_cfg: Any, grid: dict[str, list[str]], seeds: int, config_path: str,
                   points: list[SweepPoint], result: VmapSweepResult) -> None:
    """``results.jsonl``/``results.csv``, ``curves.jsonl`` and ``run.json`` of a vmapped sweep."""
    write_results(result.rows, out)
    write_curves(out / "curves.jsonl", points, result.seed_index, result.history, base_cfg.iterations)
    write_run_record(out, base_cfg, extra={"sweep": {
        "mode": "vmap", "config_path": config_path, "grid": {k: list(v) for k, v in grid.items()},
        "seeds": seeds, "runs": result.num_runs, "iterations": base_cfg.iterations,
        "compile_seconds": round(result.compile_seconds, 3), "run_seconds": round(result.run_seconds, 3),
        "runs_per_second": result.num_runs / max(result.run_seconds, 1e-9)}})


def evaluate_runs(result: VmapSweepResult, base_cfg: Any, *, num_prompts: int = 128, split: str = "test",
                  temperature: float | None = None, seed: int = 0, batch_size: int = 128) -> list[dict[str, Any]]:
    """Held-out gold reward, proxy reward and KL to the reference of every run's FINAL policy.

    For each run: :func:`rlhf_jax.evaluation.evaluate_policy` on ``num_prompts`` prompts of the task's
    ``split`` (one sample each at the run's sampling temperature), scoring with the task's gold
    reward, the sweep's reward model (``reward.kind="model"``; proxy = its score minus the recorded
    shift; with another reward kind the proxy column repeats gold) and
    ``KL(π‖π_ref) = mean_prompts Σ_t log π(y_t) − log π_ref(y_t)`` against the run's OWN reference
    (:func:`run_reference_params`: its seed's model when the seeds draw their own, else the shared one).
    Returns one dict per run (``point``, ``seed``, the varied values, ``gold_reward``, ``proxy_reward``,
    ``kl`` and their standard errors).
    """
    items = [(row, run_policy_params(result, i), run_reference_params(result, i), _run_temperature(result, i))
             for i, row in enumerate(result.rows)]
    return _evaluate(result, base_cfg, items, num_prompts=num_prompts, split=split, temperature=temperature,
                     seed=seed, batch_size=batch_size)


def evaluate_starts(result: VmapSweepResult, base_cfg: Any, **kw) -> list[dict[str, Any]]:
    """:func:`evaluate_runs`' numbers for the policies the runs STARTED from, against their references
    (KL 0 when the start is the reference, as with an SFT policy or a model drawn from the seed): one dict
    per distinct seed (``point`` -1, ``overrides`` ``["start"]``, ``seed``) when the seeds draw their own
    models (``result.per_seed``), else one dict for the start every run shares (``seed``: the first run's).
    The sampling temperature is that of the seed's first run unless ``temperature`` is given."""
    firsts = list(dict.fromkeys(_seed_slot(result, i) for i in range(result.num_runs)))
    runs = [[_seed_slot(result, i) for i in range(result.num_runs)].index(s) for s in firsts]
    starts = [run_start_params(result, i) for i in runs]
    items = [({"point": -1, "overrides": ["start"], "seed": int(result.seed_index[i])}, start,
              run_reference_params(result, i, start), _run_temperature(result, i)) for i, start in zip(runs, starts)]
    return _evaluate(result, base_cfg, items, **kw)


def evaluate_start(result: VmapSweepResult, base_cfg: Any, **kw) -> dict[str, Any]:
    """The FIRST seed's row of :func:`evaluate_starts` -- the start every run shares when they start from
    one model (one seed, or ``policy.path``); when the seeds draw their own models it is only the first
    seed's start: use :func:`evaluate_starts` for every seed's."""
    first = dataclasses.replace(result, rows=result.rows[:1], seed_index=np.asarray(result.seed_index)[:1])
    return evaluate_starts(first, base_cfg, **kw)[0]


def _run_temperature(result: VmapSweepResult, i: int) -> float:
    """Run ``i``'s sampling temperature (a traced hyper-parameter when the grid varies it)."""
    if "temperature" in result.values:
        return float(result.values["temperature"][i])
    return float(result.algo.temperature)


def _evaluate(result: VmapSweepResult, base_cfg: Any, items: list, *, num_prompts: int = 128, split: str = "test",
              temperature: float | None = None, seed: int = 0, batch_size: int = 128) -> list[dict[str, Any]]:
    """:func:`rlhf_jax.evaluation.evaluate_policy` of each ``(row, policy params, reference params, run
    temperature)`` in ``items``: the row's point, seed, overrides and varied values with the numbers."""
    if not getattr(base_cfg, "task", ""):
        raise ConfigError("config key 'task': evaluate_runs needs an embedded task for the gold reward")
    task = get_task(base_cfg.task)
    prompts = [r["prompt"] for r in task.prompt_records(split, num=num_prompts)]
    frozen = result.setup.frozen
    reward_model, reward_params = frozen.reward_model, frozen.reward_params
    if reward_model is None:
        raise ConfigError("evaluate_runs needs reward.kind='model' (a learned proxy reward); "
                          f"the config has reward.kind={base_cfg.reward.kind!r}")
    section = VMAP_SECTIONS[type(base_cfg).__name__] + "."
    out = []
    for row, params, ref_params, run_temp in items:
        ev = evaluate_policy(task, result.setup.policy_model, params, ref_params, reward_model,
                             reward_params, prompts=prompts, seed=seed,
                             temperature=run_temp if temperature is None else temperature,
                             batch_size=batch_size, reward_shift=float(frozen.reward_shift))
        ev.pop("samples", None)
        keep = {k: v for k, v in row.items() if k in ("point", "seed", "overrides") or k.startswith(section)}
        out.append({**keep, **ev})
    return out
