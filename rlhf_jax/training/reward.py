"""Reward model (Bradley–Terry): pure step, trainer ``train_reward(cfg)``, ``rlhf-jax reward``.

docs/MATH.md §2. The reward of a sequence is the scalar head at its last real token.
Pairwise batches (``chosen_ids/chosen_mask/rejected_ids/rejected_mask [B, L]``,
``margin [B]``): ``-log σ(r_c - r_r - m) + c·(r_c + r_r)²`` averaged over pairs;
chosen and rejected go through ONE forward pass of ``[2B, L]``. K-wise ranking
batches (``response_ids/response_mask [B, K, L]``, ``ranks/rank_mask [B, K]``):
all ordered pairs of a prompt, averaged within the prompt, prompts weighted
equally. Micro-batches and devices carry (sum, count) of pairs or prompts.

After training, optional normalisation: ``shift = -mean r`` over a calibration
set of reference (SFT/demonstration) responses, so they score mean 0. The shift
is recorded in the final checkpoint's ``extra`` item, in
``export/reward_normalization.json`` and in the result; a user of the model adds it.

    rlhf-jax reward --config experiments/reward_sorting.py --out runs/rm
    rlhf-jax reward task=sort model.name=task format=ranking steps=200 --out runs/rm
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ConfigError
from rlhf_jax.data import DataConfig, load_tokenizer, make_iterator
from rlhf_jax.losses import bradley_terry_loss, ranking_loss
from rlhf_jax.models import last_token_values, lora
from rlhf_jax.training import loop, steps
from rlhf_jax import models
from rlhf_jax.training.common import (build_model, check_path, export_model, get_task_or_none, resolve_tokenizer_dir,
                                      run_supervised, validate_supervised)
from rlhf_jax.training.configs import ModelSection, RunConfig
from rlhf_jax.training.optim import OptimConfig, make_optimizer
from rlhf_jax.training.sft import run_eval
from rlhf_jax.training.state import TrainState

PAIR_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "margin", "example_mask")
RANK_KEYS = ("response_ids", "response_mask", "ranks", "rank_mask")


@dataclasses.dataclass(frozen=True)
class RewardConfig(RunConfig):
    """A reward-model run (the shared run section, :class:`RunConfig`, plus the fields below).
    ``format``: ``preference`` (pairs) or ``ranking`` (K-wise).

    Data: ``data.path`` in that format, or the embedded ``task``'s simulated labels
    (``label_noise``; ``ranking_k`` responses per prompt for rankings). Evaluation
    every ``eval_every`` steps on ``eval_path`` (or the task's validation split):
    held-out loss, accuracy and margin. ``normalize``: shift rewards so the
    calibration responses (``calibration_path``, an ``sft``-format file of
    prompt + reference response, or the task's validation demonstrations) score
    mean 0 (each member of an ensemble gets its own shift: reward centring).

    Ensembles: ``ensemble_size`` K > 1 trains K reward models in ONE vmapped program (members differ
    by their initialisation seed; ``ensemble_bootstrap`` also weights every training pair of member
    k by an independent Poisson(1) draw, the online bootstrap; preference format only). Metrics are
    member means; the export holds ``member_<k>/`` Hugging Face directories and ``ensemble.json``
    (members, shifts), which ``reward.path`` of the RL trainers accepts. ``num_labels``: train on
    only the first ``num_labels`` of the task's training pairs/rankings (0 = all; the label-count
    axis of the over-optimisation study).
    """
    data: DataConfig = DataConfig(batch_size=8, max_length=128, pack=False)
    out_dir: str = "runs/reward"
    format: Literal["preference", "ranking"] = "preference"
    label_noise: float = -1.0          # < 0: the task's default labeller noise
    ranking_k: int = 4
    model: ModelSection = ModelSection()
    eval_path: str = ""
    eval_batches: int = 4
    optim: OptimConfig = OptimConfig(learning_rate=1e-4)
    steps: int = 100
    micro_batches: int = 1
    center_coef: float = 0.0
    use_margin: bool = True
    eval_every: int = 50
    normalize: bool = False
    calibration_path: str = ""
    calibration_batches: int = 8
    ensemble_size: int = 1
    ensemble_bootstrap: bool = False
    num_labels: int = 0


@dataclasses.dataclass(frozen=True)
class RewardStepConfig:
    """Static step options (hashable; part of the compiled program's identity). ``ensemble_size`` > 1:
    the state is K stacked members (:func:`ensemble_reward_step`); ``ensemble_bootstrap``: Poisson(1)
    pair weights per member."""
    micro_batches: int = 1
    center_coef: float = 0.0
    use_margin: bool = True
    ensemble_size: int = 1
    ensemble_bootstrap: bool = False


def sequence_rewards(apply_fn, params, ids, mask, *, dropout_rng=None) -> jax.Array:
    """``r[b]`` = scalar head at the last real token of row ``b``; ``ids, mask [N, L]``. ``dropout_rng``: the
    forward's ``"dropout"`` key (a LoRA model with ``lora_dropout`` > 0 uses it; None = deterministic)."""
    kw = {} if dropout_rng is None else {"rngs": {"dropout": dropout_rng}}
    values = apply_fn(params, ids, attention_mask=mask, **kw)
    return last_token_values(values, mask)


def reward_sums(params, batch: dict, rng, *, apply_fn, center_coef: float = 0.0,
                use_margin: bool = True, axis_name: str | None = None):
    """``(loss_sum, sums)`` for a pairwise or ranking (micro-)batch (chosen by its keys). ``rng`` (the
    training step's key; None in evaluation) gives the forward's LoRA dropout key (``lora.dropout_key``)."""
    drop = None if rng is None else lora.dropout_key(rng, axis_name)
    if "chosen_ids" in batch:
        b = batch["chosen_ids"].shape[0]
        ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        r = sequence_rewards(apply_fn, params, ids, mask, dropout_rng=drop)
        rc, rr = r[:b], r[b:]
        pair_mask = batch.get("example_mask")
        if pair_mask is None:
            pair_mask = jnp.ones((b,), jnp.float32)
        margin = batch.get("margin") if use_margin else None
        loss, met = bradley_terry_loss(rc, rr, margin=margin, center_coef=center_coef,
                                       mask=pair_mask)
        n = met["num_pairs"]
        total = loss * n
        return total, {"loss": (total, n), "accuracy": (met["accuracy"] * n, n),
                       "margin": (met["margin"] * n, n),
                       "chosen_reward": (met["chosen_reward"] * n, n),
                       "rejected_reward": (met["rejected_reward"] * n, n)}
    bsz, k, length = batch["response_ids"].shape
    r = sequence_rewards(apply_fn, params, batch["response_ids"].reshape(bsz * k, length),
                         batch["response_mask"].reshape(bsz * k, length), dropout_rng=drop).reshape(bsz, k)
    loss, met = ranking_loss(r, batch["ranks"], batch["rank_mask"])
    n = met["num_prompts"]
    total = loss * n
    # margin: mean reward of the best-ranked minus the worst-ranked response per prompt
    rm = batch["rank_mask"] > 0
    ranks = batch["ranks"]
    top = jnp.min(jnp.where(rm, ranks, jnp.iinfo(jnp.int32).max), -1, keepdims=True)
    bottom = jnp.max(jnp.where(rm, ranks, jnp.iinfo(jnp.int32).min), -1, keepdims=True)
    best = jnp.sum(jnp.where(rm & (ranks == top), r, 0.0), -1)
    worst = jnp.sum(jnp.where(rm & (ranks == bottom), r, 0.0), -1)
    has = (jnp.sum(rm, -1) >= 2).astype(jnp.float32)
    return total, {"loss": (total, n), "accuracy": (met["accuracy"] * n, n),
                   "margin": (jnp.sum((best - worst) * has), jnp.sum(has))}


def reward_step(state: TrainState, batch: dict, *, cfg: RewardStepConfig = RewardStepConfig(),
                axis_name: str | None = None):
    """One reward-model update on a pairwise or ranking batch; pure. Metrics: ``loss``,
    ``accuracy`` (chosen scored higher / pairs ordered right), ``margin`` (mean r_c − r_r;
    best − worst for rankings), ``count`` (pairs or prompts), ``grad_norm``. ``cfg``: a
    ``RewardStepConfig`` or anything with ``micro_batches``, ``center_coef``, ``use_margin``
    (e.g. the trainer's ``RewardConfig``)."""
    fn = functools.partial(reward_sums, apply_fn=state.apply_fn, center_coef=cfg.center_coef,
                           use_margin=cfg.use_margin, axis_name=axis_name)
    return steps.update_step(state, batch, fn, micro_batches=cfg.micro_batches, axis_name=axis_name)


def ensemble_reward_step(state: TrainState, batch: dict, *, cfg: RewardStepConfig = RewardStepConfig(),
                         axis_name: str | None = None):
    """One update of K reward models at once: ``state`` is a :class:`TrainState` whose leaves carry a
    leading member axis (:func:`init_ensemble_state`); every member sees the same batch (with
    ``cfg.ensemble_bootstrap``: its pairs weighted by Poisson(1) draws from the member's own key). Pure,
    one compiled program (``jax.vmap`` of :func:`reward_step`). Metrics are member means, plus
    ``accuracy_min``/``accuracy_max`` over members."""
    def one(st):
        b = batch
        if cfg.ensemble_bootstrap:
            if "chosen_ids" not in batch:
                raise ValueError("ensemble_reward_step: bootstrap weights need pairwise (preference) batches")
            n = batch["chosen_ids"].shape[0]
            w = jax.random.poisson(jax.random.fold_in(st.step_rng(), 17), 1.0, (n,)).astype(jnp.float32)
            base = batch.get("example_mask")
            b = {**batch, "example_mask": w if base is None else base.astype(jnp.float32) * w}
        return reward_step(st, b, cfg=cfg, axis_name=axis_name)

    new_state, metrics = jax.vmap(one)(state)
    out = {k: jnp.mean(v) for k, v in metrics.items()}
    if "accuracy" in metrics:
        out["accuracy_min"] = jnp.min(metrics["accuracy"])
        out["accuracy_max"] = jnp.max(metrics["accuracy"])
    return new_state, out


def init_ensemble_state(apply_fn, member_params: list, tx, rngs) -> TrainState:
    """A :class:`TrainState` of K members stacked on a leading axis (each its own optimiser state,
    step and key), from K param trees."""
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *member_params)
    return jax.vmap(lambda p, r: TrainState.create(apply_fn=apply_fn, params=p, tx=tx, rng=r))(
        stacked, jnp.stack(list(rngs)))


def member_params(stacked, k: int):
    """Member ``k``'s params of a stacked ensemble tree."""
    return jax.tree_util.tree_map(lambda x: x[k], stacked)


def reward_eval_sums(params, batch: dict, *, apply_fn, use_margin: bool = True) -> dict:
    _, sums = reward_sums(params, batch, None, apply_fn=apply_fn, center_coef=0.0,
                          use_margin=use_margin)
    return sums


def calibration_shift(apply_fn, params, batches, placement=None) -> tuple[float, int]:
    """``(-mean r, n)`` over the sequences of SFT-format batches (each row's real tokens).

    Packed rows are not allowed here (one sequence per row); pass ``pack=False`` batches.
    """
    f = jax.jit(lambda p, ids, m: sequence_rewards(apply_fn, p, ids, m))
    total, n = 0.0, 0
    for b in batches:
        mask = np.asarray(b["attention_mask"])
        keep = mask.sum(-1) > 0
        if "example_mask" in b:
            keep &= np.asarray(b["example_mask"]) > 0
        r = np.asarray(jax.device_get(f(params, b["input_ids"], mask)))
        total += float(r[keep].sum())
        n += int(keep.sum())
    if n == 0:
        raise ValueError("reward normalisation: the calibration set has no sequence")
    return -total / n, n


def validate_reward_config(cfg: RewardConfig) -> None:
    task = validate_supervised(cfg, RewardConfig)
    if cfg.calibration_batches < 1:
        raise ConfigError("config key 'calibration_batches': must be >= 1")
    if cfg.ranking_k < 2:
        raise ConfigError(f"config key 'ranking_k': must be >= 2, got {cfg.ranking_k}")
    if cfg.label_noise > 1.0:
        raise ConfigError("config key 'label_noise': must be <= 1 (negative = task default)")
    if cfg.center_coef < 0:
        raise ConfigError(f"config key 'center_coef': must be >= 0, got {cfg.center_coef}")
    if cfg.data.pack:
        raise ConfigError("config key 'data.pack': reward models take one sequence per row; "
                          "set data.pack=false")
    if isinstance(cfg.ensemble_size, bool) or not isinstance(cfg.ensemble_size, int) or cfg.ensemble_size < 1:
        raise ConfigError(f"config key 'ensemble_size': expected an integer >= 1, got {cfg.ensemble_size!r}")
    if cfg.ensemble_bootstrap and cfg.format != "preference":
        raise ConfigError("config key 'ensemble_bootstrap': bootstrap weights need format='preference' "
                          f"(pairs), got format={cfg.format!r}")
    if cfg.ensemble_size > 1 and cfg.mesh.mode != "jit":
        raise ConfigError(f"config key 'mesh.mode': an ensemble (ensemble_size > 1) trains on a jit mesh, "
                          f"got {cfg.mesh.mode!r}")
    if cfg.num_labels < 0:
        raise ConfigError(f"config key 'num_labels': must be >= 0 (0 = all), got {cfg.num_labels}")
    if cfg.num_labels and cfg.data.path:
        raise ConfigError("config key 'num_labels': limits the task's simulated labels; with data.path "
                          "set, cut your own file instead")
    check_path("calibration_path", cfg.calibration_path)
    if cfg.normalize and not cfg.calibration_path and task is None:
        raise ConfigError("config key 'calibration_path': normalize=true needs a calibration set "
                          "(an sft-format file) or a task")


def train_reward(cfg: RewardConfig) -> loop.TrainResult:
    """Trains a scalar-head reward model; returns paths, final metrics and (if asked) the shift."""
    validate_reward_config(cfg)
    task = get_task_or_none(cfg.task)
    tok_dir = resolve_tokenizer_dir(cfg.data.tokenizer, cfg.model.path, task)
    tokenizer = load_tokenizer(tok_dir)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tok_dir))
    placement = loop.make_placement(cfg.mesh)
    rng = jax.random.PRNGKey(cfg.seed)
    K = cfg.ensemble_size
    built = [build_model(cfg.model, task=task, tokenizer=tokenizer, head="scalar",
                         rng=jax.random.fold_in(rng, 1) if k == 0 else jax.random.fold_in(jax.random.fold_in(rng, 1), k),
                         lora_dropout_ok=True)
             for k in range(K)]
    model, params, mconfig = built[0]
    fmt = cfg.format
    noise = None if cfg.label_noise < 0 else cfg.label_noise

    def records(split):
        num = cfg.num_labels if (cfg.num_labels and split == "train") else None
        if fmt == "preference":
            return task.preference_records(split, noise=noise, num=num)
        return task.ranking_records(split, k=cfg.ranking_k, noise=noise, num=num)

    nproc, pid = jax.process_count(), jax.process_index()
    per_host = cfg.data.batch_size // nproc
    kw = {"num_responses": cfg.ranking_k} if fmt == "ranking" and not cfg.data.num_responses else {}
    train_it = make_iterator(cfg.data, fmt, tokenizer=tokenizer,
                             source=None if cfg.data.path else records("train"),
                             host_id=pid, num_hosts=nproc, batch_size=per_host,
                             seed=cfg.data.seed or cfg.seed, **kw)

    def eval_iter():
        src = cfg.eval_path or (records("validation") if task is not None else None)
        if src is None:
            return None
        return make_iterator(cfg.data, fmt, tokenizer=tokenizer, source=src, host_id=pid,
                             num_hosts=nproc, batch_size=per_host, shuffle=False, num_epochs=1, **kw)

    batch_keys = PAIR_KEYS if fmt == "preference" else RANK_KEYS
    eval_one = functools.partial(reward_eval_sums, apply_fn=model.apply, use_margin=cfg.use_margin)
    if K == 1:
        eval_jit = jax.jit(eval_one)
    else:  # the members' sums added: the metrics are member means
        eval_jit = jax.jit(lambda p, b: jax.tree_util.tree_map(lambda x: jnp.sum(x, 0),
                                                               jax.vmap(eval_one, in_axes=(0, None))(p, b)))

    def eval_fn(st):
        return run_eval(placement, st.params, eval_iter, eval_jit, batch_keys, cfg.eval_batches)

    def final_extra(st):
        if not cfg.normalize:
            return None, {}
        src = cfg.calibration_path or task.sft_records("validation")
        it = make_iterator(cfg.data, "sft", tokenizer=tokenizer, source=src, host_id=0, num_hosts=1,
                           batch_size=per_host, shuffle=False, num_epochs=1, pack=False)
        params = loop.host_params(st.params)
        batches = [b for _, b in zip(range(cfg.calibration_batches), it)]
        if K > 1:  # reward centring: each member its own shift
            got = [calibration_shift(model.apply, member_params(params, k), batches) for k in range(K)]
            shifts = [g[0] for g in got]
            return {"reward_shift": jnp.asarray(shifts, jnp.float32)}, {"reward_shift": shifts,
                                                                        "calibration_size": got[0][1]}
        shift, n = calibration_shift(model.apply, params, batches)
        return {"reward_shift": jnp.float32(shift)}, {"reward_shift": shift, "calibration_size": n}

    def tokens(b):
        key = "chosen_ids" if fmt == "preference" else "response_ids"
        return float(b[key].size * (2 if fmt == "preference" else 1))

    step_cfg = RewardStepConfig(cfg.micro_batches, cfg.center_coef, cfg.use_margin, K, cfg.ensemble_bootstrap)
    state = export_fn = None
    if K > 1:
        tx = make_optimizer(cfg.optim, params, total_steps=cfg.steps)
        base = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2)
        state = init_ensemble_state(model.apply, [b[1] for b in built], tx,
                                    [jax.random.fold_in(base, k) for k in range(K)])

        def export_members(st, out):
            return export_ensemble(out / "export", model, loop.host_params(st.params), K, tok_dir)
        export_fn = export_members
    result = run_supervised(cfg, name="reward", model=model, mconfig=mconfig, params=params, placement=placement,
                            step_fn=reward_step if K == 1 else ensemble_reward_step, step_cfg=step_cfg,
                            batches=train_it, batch_keys=batch_keys, eval_fn=eval_fn, tokenizer_dir=tok_dir,
                            tokens=tokens, final_extra=final_extra, state=state, export=export_fn)
    if result.export_dir and jax.process_index() == 0:
        shifts = result.extra.get("reward_shift", 0.0 if K == 1 else [0.0] * K)
        dirs = [Path(result.export_dir)] if K == 1 else [Path(result.export_dir) / f"member_{k}" for k in range(K)]
        for k, d in enumerate(dirs):
            norm = {"reward_shift": shifts if K == 1 else shifts[k], "normalized": bool(cfg.normalize),
                    "calibration_size": result.extra.get("calibration_size", 0),
                    "usage": "reward = model_score + reward_shift"}
            (d / "reward_normalization.json").write_text(json.dumps(norm, indent=2) + "\n")
        if K > 1:
            meta = {"ensemble_size": K, "members": [f"member_{k}" for k in range(K)], "reward_shift": shifts,
                    "bootstrap": bool(cfg.ensemble_bootstrap),
                    "usage": "member k's reward = its model score + reward_shift[k]"}
            (Path(result.export_dir) / ENSEMBLE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return result


ENSEMBLE_FILE = "ensemble.json"


def export_ensemble(export_dir: Path, model, stacked_params, size: int, tokenizer_dir: str) -> str:
    """K members as ``export_dir/member_<k>/`` Hugging Face directories (``ensemble.json`` is written by
    :func:`train_reward` once the shifts are known)."""
    for k in range(size):
        export_model(Path(export_dir) / f"member_{k}", model, member_params(stacked_params, k), tokenizer_dir)
    return str(export_dir)


def is_reward_ensemble(path: str | Path) -> bool:
    """Whether ``path`` is an ensemble export (holds ``ensemble.json``)."""
    return (Path(path) / ENSEMBLE_FILE).is_file()


def load_reward_ensemble(path: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32, rng=None):
    """``(model, stacked_params [K, ...], shifts [K] float32)`` of an ensemble export; a CheckpointError
    or ConfigError names the file when it is malformed."""
    meta_path = Path(path) / ENSEMBLE_FILE
    try:
        meta = json.loads(meta_path.read_text())
        members, shifts = list(meta["members"]), [float(x) for x in meta["reward_shift"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"config key 'reward.path': {meta_path} is not a valid ensemble file "
                          f"(needs 'members' and 'reward_shift' lists): {e}") from None
    if len(members) < 1 or len(members) != len(shifts):
        raise ConfigError(f"config key 'reward.path': {meta_path}: {len(members)} members but {len(shifts)} shifts")
    loaded = [models.from_pretrained(str(Path(path) / m), dtype=dtype, param_dtype=param_dtype, head="scalar",
                                     rng=rng) for m in members]
    model = loaded[0][0]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[p for _, p in loaded])
    return model, stacked, jnp.asarray(shifts, jnp.float32)


def load_reward_shift(export_dir: str | Path) -> float:
    """The shift recorded by ``train_reward`` in an export directory (0.0 if none was recorded)."""
    p = Path(export_dir) / "reward_normalization.json"
    if not p.exists():
        return 0.0
    return float(json.loads(p.read_text())["reward_shift"])
