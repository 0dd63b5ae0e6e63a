"""Host loops of the RL trainers: ``train_ppo``, ``train_grpo``, ``train_rloo``, ``train_dpo``.

Thin loops around the pure, jitted iterations (``ppo_iteration``, ``grpo_iteration``, ``dpo_step``):
prompts (or preference pairs) from the data layer → one compiled iteration → metrics (JSONL +
TensorBoard through ``training.MetricsWriter``) → checkpoint (``training.CheckpointManager``, with
the data iterator position, for an exact resume). With a Python reward on decoded text, the
iteration is split into the jitted rollout, host scoring and the jitted update.

Run directory: ``config.json``, ``run.json`` (config, git commit, versions, devices),
``metrics.jsonl``, ``tb/``, ``samples.jsonl`` (decoded completions every ``sample_every``
iterations), ``checkpoints/``, ``export/`` (the trained policy as a Hugging Face directory).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ConfigError, to_dict
from rlhf_jax.data import DataConfig
from rlhf_jax.rl.config import DPOConfig, DPOHParams, GRPOConfig, GRPOHParams, PPOConfig, PPOHParams
from rlhf_jax.rl.sweep import RLSetup
from rlhf_jax.training.checkpoint import CheckpointConfig, CheckpointManager
from rlhf_jax.training.configs import MeshConfig, ModelSection
from rlhf_jax.training.loop import TrainResult
from rlhf_jax.training.metrics import LogConfig, MetricsWriter, ProgressBar, check_finite, to_host_scalars
from rlhf_jax.training.optim import OptimConfig, make_optimizer

RL_OPTIM = OptimConfig(learning_rate=1e-5, schedule="constant", b2=0.999, max_grad_norm=1.0)


@dataclasses.dataclass(frozen=True)
class RewardSection:
    """Where scores come from.

    kind="gold": the embedded task's JAX gold reward (``task.gold_reward_jax``), inside the jitted
      iteration.
    kind="model": a reward model directory (``path``; ``ScalarHeadModel``, e.g. ``train_reward``'s
      export) scored at the last real token, inside the jitted iteration; its recorded
      normalisation shift is subtracted.
    kind="python": a Python function on decoded text, ``function = "module:name"`` with signature
      ``f(prompt: str, response: str) -> float`` (empty: the task's ``gold_reward_text``), run on the
      host between the jitted rollout and the jitted update.
    """
    kind: Literal["gold", "model", "python"] = "gold"
    path: str = ""
    function: str = ""


@dataclasses.dataclass(frozen=True)
class PPOTrainConfig:
    """A PPO run. ``ppo.batch_size`` prompts per iteration (``data.batch_size`` is ignored); prompts
    from ``data.path`` (``prompt`` format) or, when empty, the task's prompt records.

    ``policy``: the SFT policy (a HF directory in ``policy.path``, else the task's tiny config from
    scratch, ``policy.name="task"``); the reference is a frozen copy of it. ``value_init``: the value
    model's trunk comes from the policy ("policy") or the reward model ("reward"), with a fresh
    head (``ppo.value_model="shared"`` instead puts a value head on the policy's trunk).
    ``ppo.stop_token_ids`` empty means the tokenizer's EOS.
    """
    task: str = "sentiment"
    policy: ModelSection = ModelSection(name="task")
    value_init: Literal["policy", "reward"] = "policy"
    reward: RewardSection = RewardSection()
    data: DataConfig = DataConfig(batch_size=16, max_length=64)
    ppo: PPOConfig = PPOConfig()
    optim: OptimConfig = RL_OPTIM
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    iterations: int = 100
    sample_every: int = 10
    num_samples: int = 4
    seed: int = 0
    out_dir: str = "runs/ppo"
    export: bool = True
    resume: bool = False


@dataclasses.dataclass(frozen=True)
class GRPOTrainConfig:
    """A GRPO run (same sections as PPO; no value model). ``grpo.batch_size`` prompts × ``group_size``."""
    task: str = "sentiment"
    policy: ModelSection = ModelSection(name="task")
    reward: RewardSection = RewardSection()
    data: DataConfig = DataConfig(batch_size=8, max_length=64)
    grpo: GRPOConfig = GRPOConfig()
    optim: OptimConfig = RL_OPTIM
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    iterations: int = 100
    sample_every: int = 10
    num_samples: int = 4
    seed: int = 0
    out_dir: str = "runs/grpo"
    export: bool = True
    resume: bool = False


@dataclasses.dataclass(frozen=True)
class RLOOTrainConfig:
    """An RLOO run: ``rloo`` is a ``GRPOConfig`` with ``advantage="rloo"`` (k1 KL in the reward)."""
    task: str = "sentiment"
    policy: ModelSection = ModelSection(name="task")
    reward: RewardSection = RewardSection()
    data: DataConfig = DataConfig(batch_size=8, max_length=64)
    rloo: GRPOConfig = GRPOConfig(advantage="rloo", use_kl_loss=False, loss_aggregation="token-mean",
                                  kl_coef=0.05)
    optim: OptimConfig = RL_OPTIM
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    iterations: int = 100
    sample_every: int = 10
    num_samples: int = 4
    seed: int = 0
    out_dir: str = "runs/rloo"
    export: bool = True
    resume: bool = False


def algorithm_config(cfg) -> PPOConfig | GRPOConfig:
    """The algorithm section of a trainer config (``ppo``, ``grpo`` or ``rloo``)."""
    if isinstance(cfg, PPOTrainConfig):
        return cfg.ppo
    if isinstance(cfg, GRPOTrainConfig):
        return cfg.grpo
    if isinstance(cfg, RLOOTrainConfig):
        if cfg.rloo.advantage != "rloo":
            raise ConfigError(f"config key 'rloo.advantage': must be 'rloo', got {cfg.rloo.advantage!r}")
        return cfg.rloo
    raise ConfigError(f"expected a PPO/GRPO/RLOO trainer config, got {type(cfg).__name__}")


def _section_name(cfg) -> str:
    return {PPOTrainConfig: "ppo", GRPOTrainConfig: "grpo", RLOOTrainConfig: "rloo"}[type(cfg)]


# ---------------------------------------------------------------------------------------------
# Set-up: validation, tokenizer, models, reward source, prompts
# ---------------------------------------------------------------------------------------------

def validate_rl_config(cfg) -> None:
    """Every check that needs no model: fails before anything is built or compiled."""
    algo = algorithm_config(cfg)
    algo.validate(prefix=_section_name(cfg) + ".")
    if cfg.iterations < 1:
        raise ConfigError(f"config key 'iterations': must be >= 1, got {cfg.iterations}")
    if cfg.sample_every < 0 or cfg.num_samples < 0:
        raise ConfigError("config key 'sample_every'/'num_samples': must be >= 0")
    if cfg.mesh.mode != "jit":
        raise ConfigError(f"config key 'mesh.mode': the RL trainers run on a jit mesh, got {cfg.mesh.mode!r}")
    n = jax.device_count()
    data, fsdp = cfg.mesh.validate(n)
    rows = algo.batch_size if isinstance(algo, PPOConfig) else algo.rollout_size
    if rows % n or algo.minibatch_size % n:
        raise ConfigError(f"config key '{_section_name(cfg)}.batch_size': rollout rows {rows} and minibatch "
                          f"size {algo.minibatch_size} must be divisible by the {n} devices")
    cfg.optim.validate()
    cfg.checkpoint.validate()
    cfg.log.validate()
    cfg.policy.validate("policy.")
    if cfg.reward.kind not in ("gold", "model", "python"):
        raise ConfigError(f"config key 'reward.kind': expected gold|model|python, got {cfg.reward.kind!r}")
    if cfg.reward.kind == "model" and not cfg.reward.path:
        raise ConfigError("config key 'reward.path': reward.kind='model' needs a reward model directory")
    if cfg.reward.kind == "model":
        from rlhf_jax.training.common import check_path
        check_path("reward.path", cfg.reward.path, kind="dir")
    if cfg.reward.kind == "gold" and not cfg.task:
        raise ConfigError("config key 'reward.kind': 'gold' needs config key 'task' set")
    if cfg.reward.kind == "python" and not cfg.reward.function and not cfg.task:
        raise ConfigError("config key 'reward.function': empty and no task to take gold_reward_text from")
    if isinstance(cfg, PPOTrainConfig) and cfg.value_init == "reward" and cfg.reward.kind != "model":
        raise ConfigError("config key 'value_init': 'reward' needs reward.kind='model' (a reward model trunk)")


def resolve_python_reward(spec: str, task) -> Callable[[str, str, bool], float]:
    """``f(prompt, response, finished) -> float`` from ``"module:name"`` or the task's text gold reward."""
    if not spec:
        return lambda p, r, finished: task.gold_reward_text(p, r, finished=finished)
    mod, _, name = spec.partition(":")
    if not mod or not name:
        raise ConfigError(f"config key 'reward.function': expected 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config key 'reward.function': cannot load {spec!r}: {e}") from None
    return lambda p, r, finished: float(fn(p, r))


_OPTIMIZERS: dict = {}


def cached_optimizer(optim: OptimConfig, params, total_steps: int):
    """``training.make_optimizer`` memoised on (config, total steps, param shapes).

    The optimizer is a static part of the jitted iteration (``TrainState.tx``); handing every run of
    the same shape the same transformation object lets a second run in one process (a resume, a
    notebook rerun, a sequential sweep) reuse the compiled program instead of recompiling it.
    """
    shapes = tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in jax.tree_util.tree_leaves(params))
    key = (optim, int(total_steps), jax.tree_util.tree_structure(params), shapes)
    if key not in _OPTIMIZERS:
        _OPTIMIZERS[key] = make_optimizer(optim, params, total_steps=total_steps)
    return _OPTIMIZERS[key]


def _fresh_head_on(trunk_params: dict, scalar_model, rng) -> dict:
    """``ScalarHeadModel`` params: the given ``model/...`` trunk + a freshly initialised ``score`` head."""
    from rlhf_jax.models import init_params
    fresh = init_params(scalar_model, rng)
    return {"params": {**fresh["params"], "model": trunk_params["params"]["model"]}}


@dataclasses.dataclass
class _Built:
    setup: RLSetup
    tokenizer: Any
    tokenizer_dir: str
    task: Any
    python_reward: Callable | None
    algo: Any
    export_model: Any


def _build(cfg) -> _Built:
    from rlhf_jax import models
    from rlhf_jax.data import load_tokenizer
    from rlhf_jax.rl.ppo import PPOFrozen
    from rlhf_jax.training.common import build_model, get_task_or_none, resolve_tokenizer_dir

    validate_rl_config(cfg)
    algo = algorithm_config(cfg)
    task = get_task_or_none(cfg.task)
    tok_dir = resolve_tokenizer_dir(cfg.data.tokenizer, cfg.policy.path, task)
    if not tok_dir:
        raise ConfigError("config key 'data.tokenizer': empty (and neither policy.path nor task has a tokenizer)")
    tokenizer = load_tokenizer(tok_dir)
    stop = tuple(algo.stop_token_ids)
    if not stop and tokenizer.eos_token_id is not None:
        stop = (int(tokenizer.eos_token_id),)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    algo = dataclasses.replace(algo, stop_token_ids=stop, pad_token_id=int(pad))

    rng = jax.random.PRNGKey(cfg.seed)
    shared = isinstance(algo, PPOConfig) and algo.value_model == "shared"
    policy_model, policy_params, mconfig = build_model(cfg.policy, task=task, tokenizer=tokenizer,
                                                       head="value" if shared else None,
                                                       rng=jax.random.fold_in(rng, 1))
    p_len = _prompt_length(cfg, task, algo)
    if p_len + algo.max_new_tokens > mconfig.max_position_embeddings:
        raise ConfigError(f"config key '{_section_name(cfg)}.max_new_tokens': prompt length {p_len} + "
                          f"{algo.max_new_tokens} new tokens exceeds the model's max_position_embeddings "
                          f"{mconfig.max_position_embeddings}")
    ref_params = models.split_value_head(policy_params)[0] if shared else policy_params
    export_model = models.CausalLM(policy_model.config) if shared else policy_model

    reward_model = reward_params = reward_fn = None
    reward_shift = 0.0
    python_reward = None
    if cfg.reward.kind == "gold":
        reward_fn = task.gold_reward_jax
    elif cfg.reward.kind == "model":
        from rlhf_jax.training.reward import load_reward_shift
        reward_model, reward_params = models.from_pretrained(
            cfg.reward.path, dtype=jnp.dtype(cfg.policy.dtype), param_dtype=jnp.dtype(cfg.policy.param_dtype),
            head="scalar", rng=jax.random.fold_in(rng, 2))
        reward_shift = load_reward_shift(cfg.reward.path)
    else:
        python_reward = resolve_python_reward(cfg.reward.function, task)

    value_model = value_params = None
    if isinstance(algo, PPOConfig) and not shared:
        if cfg.value_init == "reward":
            value_model = models.ScalarHeadModel(reward_model.config)
            value_params = _fresh_head_on(reward_params, value_model, jax.random.fold_in(rng, 3))
        else:
            value_model = models.ScalarHeadModel(mconfig)
            value_params = _fresh_head_on(policy_params, value_model, jax.random.fold_in(rng, 3))

    if isinstance(algo, PPOConfig):
        updates = cfg.iterations * algo.ppo_epochs * algo.minibatches
    else:
        updates = cfg.iterations * algo.epochs * algo.minibatches
    policy_tx = cached_optimizer(dataclasses.replace(cfg.optim, learning_rate=algo.lr), policy_params, updates)
    value_tx = None
    if value_params is not None:
        value_lr = algo.value_lr if algo.value_lr is not None else algo.lr
        value_tx = cached_optimizer(dataclasses.replace(cfg.optim, learning_rate=value_lr), value_params, updates)
    frozen = PPOFrozen(ref_params=ref_params, reward_params=reward_params, reward_shift=reward_shift,
                       policy_model=policy_model, value_model=value_model, reward_model=reward_model,
                       reward_fn=reward_fn)
    setup = RLSetup(frozen=frozen, policy_model=policy_model, policy_params=policy_params, policy_tx=policy_tx,
                    prompts={}, value_model=value_model, value_params=value_params, value_tx=value_tx)
    return _Built(setup=setup, tokenizer=tokenizer, tokenizer_dir=tok_dir, task=task, python_reward=python_reward,
                  algo=algo, export_model=export_model)


def _prompt_length(cfg, task, algo) -> int:
    p = cfg.data.max_prompt_length or (task.prompt_length if task is not None else cfg.data.max_length)
    return int(p)


def _prompt_iterator(cfg, built: _Built, *, num_epochs: int | None = None):
    from rlhf_jax.data import make_iterator
    task, algo = built.task, built.algo
    p_len = _prompt_length(cfg, task, algo)
    src = None if cfg.data.path else task.prompt_records("train")
    if src is None and not cfg.data.path:
        raise ConfigError("config key 'data.path': empty and no task prompts")
    nproc, pid = jax.process_count(), jax.process_index()
    return make_iterator(cfg.data, "prompt", tokenizer=built.tokenizer, source=src, host_id=pid, num_hosts=nproc,
                         batch_size=algo.batch_size // nproc, max_prompt_length=p_len, buckets=(p_len,),
                         max_length=max(cfg.data.max_length, p_len + 1), seed=cfg.data.seed or cfg.seed,
                         num_epochs=num_epochs)


def build_setup(cfg, *, num_prompts: int = 0) -> RLSetup:
    """The :class:`RLSetup` of a trainer config, with a prompt POOL (for ``make_train`` sweeps).

    The pool holds the first ``num_prompts`` prompts of the data (default: 16 batches' worth)
    as ``[N, P]`` arrays; each iteration of a ``make_train`` run draws its batch from it on device.
    """
    built = _build(cfg)
    it = _prompt_iterator(cfg, built)
    want = num_prompts or 16 * built.algo.batch_size
    ids, masks = [], []
    while sum(len(x) for x in ids) < want:
        b = next(it)
        keep = np.asarray(b["example_mask"]) > 0
        ids.append(np.asarray(b["prompt_ids"])[keep])
        masks.append(np.asarray(b["prompt_mask"])[keep])
    prompts = {"prompt_ids": np.concatenate(ids)[:want], "prompt_mask": np.concatenate(masks)[:want]}
    return dataclasses.replace(built.setup, prompts=prompts, algo=built.algo)


# ---------------------------------------------------------------------------------------------
# The RL host loop
# ---------------------------------------------------------------------------------------------

def _decode(tokenizer, ids, mask) -> str:
    ids = [int(t) for t, m in zip(np.asarray(ids), np.asarray(mask)) if m]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _python_scores(built: _Built, rollout) -> np.ndarray:
    from rlhf_jax.rl.rollout import has_stop_token
    tok = built.tokenizer
    stopped = np.asarray(has_stop_token(rollout.response_ids, rollout.response_mask, built.algo.stop_token_ids))
    p_ids, p_mask = np.asarray(rollout.prompt_ids), np.asarray(rollout.prompt_mask)
    r_ids, r_mask = np.asarray(rollout.response_ids), np.asarray(rollout.response_mask)
    out = np.zeros((r_ids.shape[0],), np.float32)
    for i in range(r_ids.shape[0]):
        out[i] = built.python_reward(_decode(tok, p_ids[i], p_mask[i]), _decode(tok, r_ids[i], r_mask[i]),
                                     bool(stopped[i]))
    return out


def _place(mesh, state, frozen):
    from rlhf_jax.training import mesh as mesh_lib
    from rlhf_jax.rl.ppo import PPOState
    rep = mesh_lib.replicated(mesh)
    state = PPOState(policy=mesh_lib.shard_state(mesh, state.policy),
                     value=None if state.value is None else mesh_lib.shard_state(mesh, state.value),
                     kl_ctl=jax.device_put(state.kl_ctl, rep), rng=jax.device_put(state.rng, rep),
                     step=jax.device_put(state.step, rep))
    frozen = jax.device_put(frozen, mesh_lib.param_sharding(mesh, frozen))
    return state, frozen


def _init_state(cfg, built: _Built, algo):
    from rlhf_jax.rl.grpo import init_grpo_state
    from rlhf_jax.rl.ppo import init_ppo_state
    s = built.setup
    rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 10)
    if isinstance(algo, PPOConfig):
        return init_ppo_state(policy_model=s.policy_model, policy_params=s.policy_params, policy_tx=s.policy_tx,
                              value_model=s.value_model, value_params=s.value_params, value_tx=s.value_tx,
                              cfg=algo, hparams=PPOHParams.from_config(algo), rng=rng)
    return init_grpo_state(policy_model=s.policy_model, policy_params=s.policy_params, policy_tx=s.policy_tx,
                           cfg=algo, hparams=GRPOHParams.from_config(algo), rng=rng)


def run_rl(cfg) -> TrainResult:
    """The shared PPO/GRPO/RLOO host loop (see the module docstring)."""
    from rlhf_jax.rl import grpo as grpo_lib
    from rlhf_jax.rl import ppo as ppo_lib
    from rlhf_jax.training import loop
    from rlhf_jax.training.common import export_model

    built = _build(cfg)
    algo = built.algo
    is_ppo = isinstance(algo, PPOConfig)
    hparams = PPOHParams.from_config(algo) if is_ppo else GRPOHParams.from_config(algo)
    out_dir = Path(cfg.out_dir).absolute()
    config_dict = to_dict(dataclasses.replace(cfg, **{_section_name(cfg): algo}))
    loop.run_record(out_dir, config_dict)
    placement = loop.make_placement(cfg.mesh)
    prompts_it = _prompt_iterator(cfg, built)
    state = _init_state(cfg, built, algo)
    ckpt = CheckpointManager(out_dir / "checkpoints", cfg.checkpoint)
    writer = progress = None
    try:
        latest = ckpt.latest_step()
        resumed_from = None
        if latest is not None and not cfg.resume:
            raise ConfigError(f"--out {str(out_dir)!r} already holds checkpoints (latest step {latest}); pass "
                              "--resume (resume=True) to continue it or choose another --out")
        if cfg.resume and latest is not None:
            restored = ckpt.restore(state)
            state = restored.state
            if restored.data_state:
                prompts_it.restore(restored.data_state)
            resumed_from = restored.step
            loop._truncate_metrics(out_dir / "metrics.jsonl", restored.step)
        state, frozen = _place(placement.mesh, state, built.setup.frozen)
        if is_ppo:
            iterate, rollout_fn, update_fn = ppo_lib.ppo_iteration, ppo_lib.ppo_rollout, ppo_lib.ppo_update
        else:
            iterate, rollout_fn, update_fn = (grpo_lib.grpo_iteration, grpo_lib.grpo_rollout,
                                              grpo_lib.grpo_update)
        writer = MetricsWriter(out_dir, tensorboard=cfg.log.tensorboard)
        start = resumed_from or 0
        progress = ProgressBar(cfg.iterations, start, enabled=cfg.log.progress, desc=_section_name(cfg))
        samples_path = out_dir / "samples.jsonl"
        last: dict = {}
        for it in range(start, cfg.iterations):
            t0 = time.perf_counter()
            batch = next(prompts_it)
            prompts = loop.put(placement, {k: batch[k] for k in ("prompt_ids", "prompt_mask")})
            want_samples = cfg.sample_every and cfg.num_samples and ((it + 1) % cfg.sample_every == 0 or it == 0)
            rollout = None
            if built.python_reward is None and not want_samples:
                state, m = iterate(state, frozen, prompts, cfg=algo, hparams=hparams)
            else:
                rollout = rollout_fn(state, frozen, prompts, cfg=algo, hparams=hparams)
                if built.python_reward is not None:
                    scores = _python_scores(built, rollout)
                else:
                    scores = ppo_lib.score_rollout(frozen, rollout, chunk=algo.minibatch_size)
                state, m = update_fn(state, frozen, rollout, scores, cfg=algo, hparams=hparams)
            m = to_host_scalars(m)
            dt = time.perf_counter() - t0
            done = it + 1
            check_finite(m, done)
            m["iteration_seconds"] = dt
            m["tokens_per_sec"] = m["num_tokens"] / dt
            m.update(prompts_it.stats.as_metrics())
            if done % cfg.log.every == 0 or done == cfg.iterations:
                writer.write(done, m, prefix="train")
            if rollout is not None and want_samples and jax.process_index() == 0:
                _log_samples(writer, samples_path, done, built, rollout, cfg.num_samples)
            progress.update(1, score=m["score"], kl=m["kl"])
            last = m
            if done != cfg.iterations:
                ckpt.save(done, state, data_state=prompts_it.state(), config=config_dict)
        if start < cfg.iterations or ckpt.latest_step() != cfg.iterations:
            ckpt.save(cfg.iterations, state, data_state=prompts_it.state(), config=config_dict, force=True)
        ckpt.wait()
        export_dir = None
        if cfg.export:
            params = state.policy.params
            if is_ppo and algo.value_model == "shared":
                from rlhf_jax.models import split_value_head
                params = split_value_head(params)[0]
            export_dir = export_model(out_dir / "export", built.export_model, params, built.tokenizer_dir)
        return TrainResult(out_dir=str(out_dir), checkpoint_dir=str(out_dir / "checkpoints"),
                           metrics_path=str(out_dir / "metrics.jsonl"), export_dir=export_dir,
                           final_step=cfg.iterations, resumed_from=resumed_from, train_metrics=last,
                           eval_metrics={}, extra={}, state=state, model=built.export_model)
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        ckpt.close()


def _log_samples(writer, path: Path, step: int, built: _Built, rollout, n: int) -> None:
    tok = built.tokenizer
    rows = []
    for i in range(min(n, rollout.response_ids.shape[0])):
        rows.append({"step": step, "prompt": _decode(tok, rollout.prompt_ids[i], rollout.prompt_mask[i]),
                     "response": _decode(tok, rollout.response_ids[i], rollout.response_mask[i])})
    with open(path, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    writer.write_text(step, "samples", "\n\n".join(f"{r['prompt']} -> {r['response']}" for r in rows))


def train_ppo(cfg: PPOTrainConfig) -> TrainResult:
    """PPO with a KL penalty from a config (CLI: ``rlhf-jax ppo``); returns paths and final metrics."""
    if not isinstance(cfg, PPOTrainConfig):
        raise ConfigError(f"train_ppo expects a PPOTrainConfig, got {type(cfg).__name__}")
    return run_rl(cfg)


def train_grpo(cfg: GRPOTrainConfig) -> TrainResult:
    """GRPO from a config (CLI: ``rlhf-jax grpo``)."""
    if not isinstance(cfg, GRPOTrainConfig):
        raise ConfigError(f"train_grpo expects a GRPOTrainConfig, got {type(cfg).__name__}")
    return run_rl(cfg)


def train_rloo(cfg: RLOOTrainConfig) -> TrainResult:
    """RLOO from a config (CLI: ``rlhf-jax rloo``)."""
    if not isinstance(cfg, RLOOTrainConfig):
        raise ConfigError(f"train_rloo expects a RLOOTrainConfig, got {type(cfg).__name__}")
    return run_rl(cfg)


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DPOTrainConfig:
    """A DPO run: the policy starts from ``policy`` (the SFT model), the reference is a frozen copy.

    Pairs from ``data.path`` (``preference`` format) or, when empty, the task's simulated-labeller
    pairs (``noise`` < 0: the task's default labeller noise). ``data.batch_size`` pairs per step.
    ``dpo.precompute_ref``: reference log-probs are computed once over the training set before the
    first step (looked up by example index), else by a reference forward pass in every step.
    Evaluation (implicit reward margin/accuracy on ``eval_path`` or the task's validation pairs)
    every ``eval_every`` steps over ``eval_batches`` batches.
    """
    task: str = "sentiment"
    policy: ModelSection = ModelSection(name="task")
    data: DataConfig = DataConfig(batch_size=8, max_length=64)
    noise: float = -1.0
    eval_path: str = ""
    eval_batches: int = 4
    eval_every: int = 50
    dpo: DPOConfig = DPOConfig()
    optim: OptimConfig = RL_OPTIM
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    steps: int = 100
    seed: int = 0
    out_dir: str = "runs/dpo"
    export: bool = True
    resume: bool = False


_PREF_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "chosen_loss_mask",
              "rejected_loss_mask", "example_mask")


def _preference_iterator(cfg: DPOTrainConfig, task, tokenizer, split: str, **kw):
    from rlhf_jax.data import make_iterator
    path = cfg.data.path if split == "train" else cfg.eval_path
    src = None
    if not path:
        if task is None:
            return None
        src = task.preference_records(split, None if cfg.noise < 0 else cfg.noise)
    nproc, pid = jax.process_count(), jax.process_index()
    return make_iterator(cfg.data, "preference", tokenizer=tokenizer, source=src, host_id=pid, num_hosts=nproc,
                         batch_size=cfg.data.batch_size // nproc, seed=cfg.data.seed or cfg.seed, **kw)


def train_dpo(cfg: DPOTrainConfig) -> TrainResult:
    """DPO (sigmoid/hinge/IPO/robust) from a config (CLI: ``rlhf-jax dpo``)."""
    from rlhf_jax.data import load_tokenizer
    from rlhf_jax.rl.dpo import DPOFrozen, dpo_eval, dpo_step, init_dpo_state, precompute_reference_logps
    from rlhf_jax.training import loop
    from rlhf_jax.training.common import build_model, export_model, get_task_or_none, resolve_tokenizer_dir

    if not isinstance(cfg, DPOTrainConfig):
        raise ConfigError(f"train_dpo expects a DPOTrainConfig, got {type(cfg).__name__}")
    cfg.dpo.validate()
    if cfg.steps < 1:
        raise ConfigError(f"config key 'steps': must be >= 1, got {cfg.steps}")
    if cfg.mesh.mode != "jit":
        raise ConfigError(f"config key 'mesh.mode': DPO runs on a jit mesh, got {cfg.mesh.mode!r}")
    cfg.optim.validate()
    cfg.checkpoint.validate()
    cfg.log.validate()
    cfg.policy.validate("policy.")
    loop.validate_layout(cfg.mesh, cfg.data.batch_size, 1)
    task = get_task_or_none(cfg.task)
    if not cfg.data.path and task is None:
        raise ConfigError("config key 'data.path': empty and no 'task' given; nothing to train on")
    tok_dir = resolve_tokenizer_dir(cfg.data.tokenizer, cfg.policy.path, task)
    if not tok_dir:
        raise ConfigError("config key 'data.tokenizer': empty (and neither policy.path nor task has a tokenizer)")
    tokenizer = load_tokenizer(tok_dir)
    rng = jax.random.PRNGKey(cfg.seed)
    model, params, _ = build_model(cfg.policy, task=task, tokenizer=tokenizer, head=None,
                                   rng=jax.random.fold_in(rng, 1))
    algo = cfg.dpo
    hparams = DPOHParams.from_config(algo)
    tx = cached_optimizer(dataclasses.replace(cfg.optim, learning_rate=algo.lr), params, cfg.steps)
    state = init_dpo_state(model=model, params=params, tx=tx, cfg=algo, hparams=hparams,
                           rng=jax.random.fold_in(rng, 2))
    frozen = DPOFrozen(ref_params=params, model=model)
    train_it = _preference_iterator(cfg, task, tokenizer, "train")

    ref_table: dict[int, tuple[float, float]] = {}
    if algo.precompute_ref:
        once = _preference_iterator(cfg, task, tokenizer, "train", shuffle=False, num_epochs=1)
        for b in once:
            refs = precompute_reference_logps(model, params, b)
            for j, idx in enumerate(np.asarray(b["example_index"])):
                if idx >= 0:
                    ref_table[int(idx)] = (float(refs["ref_chosen_logp"][j]), float(refs["ref_rejected_logp"][j]))
        frozen = DPOFrozen(ref_params=None, model=model)

    def with_refs(b: dict) -> dict:
        out = {k: b[k] for k in _PREF_KEYS if k in b}
        if algo.precompute_ref:
            idx = np.asarray(b["example_index"])
            pairs = np.asarray([ref_table.get(int(i), (0.0, 0.0)) for i in idx], np.float32)
            out["ref_chosen_logp"], out["ref_rejected_logp"] = pairs[:, 0], pairs[:, 1]
        return out

    def evaluate(st) -> dict:
        it = _preference_iterator(cfg, task, tokenizer, "validation", shuffle=False, num_epochs=1)
        if it is None:
            return {}
        eval_frozen = DPOFrozen(ref_params=params, model=model)
        rows = []
        for n, b in enumerate(it):
            if n >= cfg.eval_batches:
                break
            m = to_host_scalars(dpo_eval(st.params, eval_frozen, {k: b[k] for k in _PREF_KEYS}, cfg=algo,
                                         hparams=hparams))
            rows.append(m)
        if not rows:
            return {}
        weights = np.asarray([r["num_pairs"] for r in rows])
        return {k: float(np.average([r[k] for r in rows], weights=weights)) for k in rows[0] if k != "num_pairs"}

    out_dir = Path(cfg.out_dir).absolute()
    config_dict = to_dict(cfg)
    loop.run_record(out_dir, config_dict)
    ckpt = CheckpointManager(out_dir / "checkpoints", cfg.checkpoint)
    writer = progress = None
    try:
        latest = ckpt.latest_step()
        resumed_from = None
        if latest is not None and not cfg.resume:
            raise ConfigError(f"--out {str(out_dir)!r} already holds checkpoints (latest step {latest}); pass "
                              "--resume (resume=True) to continue it or choose another --out")
        if cfg.resume and latest is not None:
            restored = ckpt.restore(state)
            state = restored.state
            if restored.data_state:
                train_it.restore(restored.data_state)
            resumed_from = restored.step
            loop._truncate_metrics(out_dir / "metrics.jsonl", restored.step)
        writer = MetricsWriter(out_dir, tensorboard=cfg.log.tensorboard)
        start = resumed_from or 0
        progress = ProgressBar(cfg.steps, start, enabled=cfg.log.progress, desc="dpo")
        last, last_eval = {}, {}
        window: list[dict] = []
        for i in range(start, cfg.steps):
            batch = with_refs(next(train_it))
            state, m = dpo_step(state, frozen, batch, cfg=algo, hparams=hparams)
            m = to_host_scalars(m)
            done = i + 1
            check_finite(m, done)
            window.append(m)
            if done % cfg.log.every == 0 or done == cfg.steps:
                last = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
                writer.write(done, last, prefix="train")
                window = []
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                last_eval = evaluate(state)
                if last_eval:
                    writer.write(done, last_eval, prefix="eval")
            progress.update(1, loss=m["loss"])
            if done != cfg.steps:
                ckpt.save(done, state, data_state=train_it.state(), config=config_dict)
        if start < cfg.steps or ckpt.latest_step() != cfg.steps:
            ckpt.save(cfg.steps, state, data_state=train_it.state(), config=config_dict, force=True)
        ckpt.wait()
        export_dir = export_model(out_dir / "export", model, state.params, tok_dir) if cfg.export else None
        return TrainResult(out_dir=str(out_dir), checkpoint_dir=str(out_dir / "checkpoints"),
                           metrics_path=str(out_dir / "metrics.jsonl"), export_dir=export_dir, final_step=cfg.steps,
                           resumed_from=resumed_from, train_metrics=last, eval_metrics=last_eval, extra={},
                           state=state, model=model)
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        ckpt.close()
