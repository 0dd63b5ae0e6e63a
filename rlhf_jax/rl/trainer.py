"""The online RL trainers (PPO, GRPO, RLOO, and every algorithm on the RL core): set-up and the job the
one training loop runs.

A trainer config = the shared run section (``training.RunConfig``) + the RL section (:class:`RLRunConfig`:
policy, reward source, optimiser, iterations, samples) + the algorithm's own section (``ppo``, ``grpo``,
``rloo``). :func:`train_rl` builds the models, the frozen reference/reward and the prompt iterator, and
hands ``training.loop.run`` a step that runs one fused iteration of the RL core (with a Python reward
on decoded text: the jitted rollout, the host scores, the jitted update).

Run directory: ``config.json``, ``run.json``, ``metrics.jsonl``, ``tb/``, ``samples.jsonl`` (decoded
completions every ``sample_every`` iterations, taken from the iteration's own output), ``checkpoints/``,
``export/`` (the trained policy as a Hugging Face directory).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import devices as devices_lib
from rlhf_jax import models
from rlhf_jax.config import ConfigError, to_dict
from rlhf_jax.models import lora
from rlhf_jax.data import DataConfig, load_tokenizer, make_iterator
from rlhf_jax.rl import core
from rlhf_jax.rl.core import RL_OPTIM
from rlhf_jax.rl.grpo import GRPOConfig, GRPOHParams
from rlhf_jax.rl.online_dpo import OnlineDPOConfig
from rlhf_jax.rl.ppo import PPOConfig
from rlhf_jax.rl.experience import has_stop_token, lm_view
from rlhf_jax.training import loop
from rlhf_jax.training import mesh as mesh_lib
from rlhf_jax.training.common import (build_model, check_path, export_model, get_task_or_none,
                                      require_tokenizer_dir)
from rlhf_jax.training.configs import ModelSection, RunConfig
from rlhf_jax.training.metrics import to_host_scalars
from rlhf_jax.training.optim import OptimConfig, make_optimizer, schedule_factor
from rlhf_jax.training.reward import is_reward_ensemble, load_reward_ensemble, load_reward_shift, member_params

@dataclasses.dataclass(frozen=True)
class RewardSection:
    """Where scores come from.

    kind="gold": the embedded task's JAX gold reward (``task.gold_reward_jax``), inside the jitted
      iteration.
    kind="model": a reward model directory (``path``; ``ScalarHeadModel``, e.g. ``train_reward``'s
      export) scored at the last real token, inside the jitted iteration; its recorded normalisation
      shift is ADDED (``reward = model_score + reward_shift``). An ENSEMBLE export (``train_reward`` with
      ``ensemble_size`` > 1, holding ``ensemble.json``) is scored member by member in one vmapped program,
      each member centred by its own shift, then aggregated by the algorithm's ``reward_aggregation``
      (mean | wco | uwo with ``uwo_lambda``).
    kind="jax": your JAX function of token ids, ``function = "path/to/file.py:fn"`` or ``"module:fn"``,
      ``fn(prompt_ids, prompt_mask, response_ids, response_mask[, tokenizer=]) -> [B]`` float scores,
      traced inside the jitted iteration (so it works in vmapped sweeps); when ``fn`` takes a
      ``tokenizer`` argument it gets the run's tokenizer (use it at trace time, e.g. to look up ids).
    kind="python": your Python function on decoded text, ``function = "path/to/file.py:fn"`` or
      ``"module:fn"``, ``fn(prompt: str, response: str) -> float`` (empty: the task's
      ``gold_reward_text``), run on the host between the jitted rollout and the jitted update.
    """
    kind: Literal["gold", "model", "jax", "python"] = "gold"
    path: str = ""
    function: str = ""
    param_dtype: str = ""  # storage dtype of the reward model's weights ("" = policy.param_dtype)


@dataclasses.dataclass(frozen=True)
class RLRunConfig(RunConfig):
    """The fields every online RL trainer shares (on top of the run section).

    ``policy``: the SFT policy (a HF directory in ``policy.path``, else the task's tiny config from
    scratch, ``policy.name="task"``); the reference is a frozen copy of it. ``reward``: the score
    source. ``optim``: the optimiser (its learning rate is the algorithm's traced ``lr``; the schedule
    runs over every update of the run). ``iterations``: rollouts + updates. Every ``sample_every``
    iterations ``num_samples`` decoded completions go to ``samples.jsonl``. Prompts come from
    ``data.path`` (``prompt`` format) or, when empty, the task's prompt records; the algorithm's
    ``batch_size`` prompts per iteration (``data.batch_size`` is not used). An empty
    ``stop_token_ids`` means the tokenizer's EOS.
    """
    task: str = "sentiment"
    data: DataConfig = DataConfig(batch_size=8, max_length=64)
    policy: ModelSection = ModelSection(name="task")
    reward: RewardSection = RewardSection()
    optim: OptimConfig = RL_OPTIM
    iterations: int = 100
    sample_every: int = 10
    num_samples: int = 4
    ref_param_dtype: str = ""  # storage dtype of the reference's copy of the weights ("" = policy.param_dtype;
    #                            a LoRA policy's reference is its own base: no copy)

    section: ClassVar[str] = ""

    @property
    def algorithm(self):
        """The algorithm section of this trainer config (``ppo``, ``grpo``, ``rloo``, ``online_dpo``)."""
        return getattr(self, self.section)


@dataclasses.dataclass(frozen=True)
class PPOTrainConfig(RLRunConfig):
    """A PPO run. ``value_init``: the value model's trunk comes from the policy ("policy") or the reward
    model ("reward"), with a fresh head (``ppo.value_model="shared"`` instead puts a value head on the
    policy's trunk). ``value_lora``: with a LoRA policy, the separate value model trains its own adapters of
    the policy's LoRA settings on a frozen trunk ("adapters") or all its weights ("full")."""
    data: DataConfig = DataConfig(batch_size=16, max_length=64)
    out_dir: str = "runs/ppo"
    value_init: Literal["policy", "reward"] = "policy"
    value_param_dtype: str = ""  # storage dtype of the separate value model's weights ("" = policy.param_dtype)
    value_lora: Literal["adapters", "full"] = "adapters"  # LoRA policy: the critic's own adapters, or full fine-tune
    ppo: PPOConfig = PPOConfig()

    section: ClassVar[str] = "ppo"


@dataclasses.dataclass(frozen=True)
class GRPOTrainConfig(RLRunConfig):
    """A GRPO run (no value model): ``grpo.batch_size`` prompts × ``group_size`` samples."""
    out_dir: str = "runs/grpo"
    grpo: GRPOConfig = GRPOConfig()

    section: ClassVar[str] = "grpo"


@dataclasses.dataclass(frozen=True)
class RLOOTrainConfig(RLRunConfig):
    """An RLOO run: ``rloo`` is a ``GRPOConfig`` with ``advantage="rloo"`` (k1 KL in the reward)."""
    out_dir: str = "runs/rloo"
    rloo: GRPOConfig = GRPOConfig(advantage="rloo", use_kl_loss=False, loss_aggregation="token-mean",
                                  hparams=GRPOHParams(kl_coef=0.05))

    section: ClassVar[str] = "rloo"


@dataclasses.dataclass(frozen=True)
class OnlineDPOTrainConfig(RLRunConfig):
    """An online DPO run: ``online_dpo.batch_size`` prompts, each sampled twice and judged by ``reward``
    (a reward model, the task's gold reward or a JAX function), the pairs trained with DPO's loss against
    the frozen SFT reference (``rlhf_jax.rl.online_dpo``)."""
    out_dir: str = "runs/online_dpo"
    online_dpo: OnlineDPOConfig = OnlineDPOConfig()

    section: ClassVar[str] = "online_dpo"


def algorithm_config(cfg: RLRunConfig):
    """The algorithm section of an online RL trainer config."""
    if not isinstance(cfg, RLRunConfig) or not cfg.section:
        raise ConfigError(f"expected a PPO/GRPO/RLOO/online-DPO trainer config, got {type(cfg).__name__}")
    algo = cfg.algorithm
    if cfg.section == "rloo" and algo.advantage != "rloo":
        raise ConfigError(f"config key 'rloo.advantage': must be 'rloo', got {algo.advantage!r}")
    return algo


# ---------------------------------------------------------------------------------------------
# Set-up: validation, tokenizer, models, reward source, prompts
# ---------------------------------------------------------------------------------------------

def validate_rl_config(cfg: RLRunConfig, *, devices_per_run: int | None = None) -> None:
    """Every check that needs no model: fails before anything is built or compiled. ``devices_per_run``:
    the devices one run's batches are split over (a vmapped sweep's ``data × fsdp``; default: all)."""
    algo = algorithm_config(cfg)
    algo.validate(prefix=cfg.section + ".")
    cfg.validate_run()
    if cfg.iterations < 1:
        raise ConfigError(f"config key 'iterations': must be >= 1, got {cfg.iterations}")
    if cfg.sample_every < 0 or cfg.num_samples < 0:
        raise ConfigError("config key 'sample_every'/'num_samples': must be >= 0")
    if cfg.mesh.mode != "jit":
        raise ConfigError(f"config key 'mesh.mode': the RL trainers run on a jit mesh, got {cfg.mesh.mode!r}")
    cfg.mesh.validate(devices_lib.device_count() if devices_per_run is None else devices_per_run)
    n = devices_lib.device_count() if devices_per_run is None else devices_per_run
    prompts = core.prompt_batch(algo)
    if prompts % n:
        raise ConfigError(f"config key '{cfg.section}.batch_size': the {prompts} prompts of an iteration are split "
                          f"over the {n} devices (data x fsdp) and must be divisible by {n}")
    if algo.rollout_size % n or algo.minibatch_size % n:
        raise ConfigError(f"config key '{cfg.section}.batch_size': rollout rows {algo.rollout_size} and minibatch "
                          f"size {algo.minibatch_size} must be divisible by the {n} devices")
    cfg.optim.validate()
    cfg.policy.validate("policy.")
    check_path("data.path", cfg.data.path)
    if not cfg.data.path and get_task_or_none(cfg.task) is None:
        raise ConfigError("config key 'data.path': empty and no 'task' given; no prompts to train on")
    if cfg.reward.kind not in ("gold", "model", "jax", "python"):
        raise ConfigError(f"config key 'reward.kind': expected gold|model|jax|python, got {cfg.reward.kind!r}")
    if cfg.reward.kind == "model" and not cfg.reward.path:
        raise ConfigError("config key 'reward.path': reward.kind='model' needs a reward model directory")
    if cfg.reward.kind == "model":
        check_path("reward.path", cfg.reward.path, kind="dir")
    if cfg.reward.kind == "gold" and not cfg.task:
        raise ConfigError("config key 'reward.kind': 'gold' needs config key 'task' set")
    if cfg.reward.kind == "python" and not cfg.reward.function and not cfg.task:
        raise ConfigError("config key 'reward.function': empty and no task to take gold_reward_text from")
    if cfg.reward.kind == "jax" and not cfg.reward.function:
        raise ConfigError("config key 'reward.function': reward.kind='jax' needs 'path/to/file.py:fn' or 'module:fn'")
    if cfg.reward.kind in ("jax", "python") and cfg.reward.function:
        load_function(cfg.reward.function, "reward.function")
    if cfg.reward.kind == "python" and core.dynamic_rounds(algo) > 1:
        raise ConfigError(f"config key '{cfg.section}.dynamic_sampling_rounds': dynamic sampling scores every "
                          "round inside the compiled iteration; it needs reward.kind gold, model or jax, not python")
    for key, value in (("reward.param_dtype", cfg.reward.param_dtype), ("ref_param_dtype", cfg.ref_param_dtype),
                       ("value_param_dtype", getattr(cfg, "value_param_dtype", ""))):
        if value not in ("", "float32", "bfloat16", "float16"):
            raise ConfigError(f"config key {key!r}: expected ''|float32|bfloat16|float16, got {value!r}")
    chunk = cfg.policy.logits_chunk
    if chunk and algo.max_new_tokens % chunk:
        raise ConfigError(f"config key 'policy.logits_chunk': {chunk} does not divide "
                          f"{cfg.section}.max_new_tokens={algo.max_new_tokens}")
    if isinstance(cfg, PPOTrainConfig) and cfg.value_lora not in ("adapters", "full"):
        raise ConfigError(f"config key 'value_lora': expected adapters|full, got {cfg.value_lora!r}")
    if isinstance(cfg, PPOTrainConfig) and cfg.value_init == "reward" and cfg.reward.kind != "model":
        raise ConfigError("config key 'value_init': 'reward' needs reward.kind='model' (a reward model trunk)")


def load_function(spec: str, key: str) -> Callable:
    """The function named by ``"path/to/file.py:fn"`` or ``"module:fn"``; a ConfigError names ``key``."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(f"config key {key!r}: expected 'path/to/file.py:function' or 'module:function', "
                          f"got {spec!r}")
    if target.endswith(".py") or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"config key {key!r}: {str(path)!r} is not a file")
        module_spec = importlib.util.spec_from_file_location(f"_rlhf_fn_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file failed to import: name it, keep the cause chained
            raise ConfigError(f"config key {key!r}: {path} does not import: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"config key {key!r}: cannot import {target!r} ({e}); give a file path "
                              "('path/to/file.py:fn') or put the module on PYTHONPATH") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config key {key!r}: {target!r} has no function {name!r}")
    return fn


def resolve_python_reward(spec: str, task) -> Callable[[str, str, bool], float]:
    """``f(prompt, response, finished) -> float`` from ``reward.function`` or the task's text gold reward."""
    if not spec:
        return lambda p, r, finished: task.gold_reward_text(p, r, finished=finished)
    fn = load_function(spec, "reward.function")
    return lambda p, r, finished: float(fn(p, r))


def resolve_jax_reward(spec: str, tokenizer) -> Callable:
    """``reward_fn(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]`` from ``reward.function``
    (given the run's tokenizer when it takes a ``tokenizer`` argument)."""
    fn = load_function(spec, "reward.function")
    if "tokenizer" in inspect.signature(fn).parameters:
        return functools.partial(fn, tokenizer=tokenizer)
    return fn


def _cast(params, dtype: str):
    """Floating leaves of ``params`` stored in ``dtype`` (the models cast to their compute dtype)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _fresh_head_on(trunk_params: dict, scalar_model, rng) -> dict:
    """``ScalarHeadModel`` params: the given ``model/...`` trunk + a freshly initialised ``score`` head."""
    fresh = models.init_params(scalar_model, rng)
    return {"params": {**fresh["params"], "model": trunk_params["params"]["model"]}}


@dataclasses.dataclass
class _Built:
    setup: core.RLSetup
    tokenizer: Any
    tokenizer_dir: str
    task: Any
    python_reward: Callable | None
    algo: Any
    export_model: Any
    model_configs: dict


def resolve_stop_and_pad(algo, tokenizer):
    """The algorithm config with an empty ``stop_token_ids`` filled by the tokenizer's EOS, and its pad."""
    stop = tuple(algo.stop_token_ids)
    if not stop and tokenizer.eos_token_id is not None:
        stop = (int(tokenizer.eos_token_id),)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    return algo.replace(stop_token_ids=stop, pad_token_id=int(pad))


def resolved_algorithm(cfg: RLRunConfig):
    """The algorithm section as the trainer runs it (stop/pad ids from the tokenizer when not given),
    without building any model."""
    algo = algorithm_config(cfg)
    if algo.stop_token_ids:
        return algo
    task = get_task_or_none(cfg.task)
    return resolve_stop_and_pad(algo, load_tokenizer(require_tokenizer_dir(cfg.data.tokenizer, cfg.policy.path,
                                                                           task, "policy")))


def _reward_source(cfg: RLRunConfig, task, tokenizer, rng):
    """``(reward_model, reward_params, reward_shift, reward_fn, python_reward)`` of the reward section."""
    if cfg.reward.kind == "gold":
        return None, None, 0.0, task.gold_reward_jax, None
    if cfg.reward.kind == "jax":
        return None, None, 0.0, resolve_jax_reward(cfg.reward.function, tokenizer), None
    if cfg.reward.kind == "model" and is_reward_ensemble(cfg.reward.path):  # K members, each centred
        rm, rp, shifts = load_reward_ensemble(cfg.reward.path, dtype=jnp.dtype(cfg.policy.dtype),
                                              param_dtype=jnp.dtype(cfg.policy.param_dtype), rng=rng)
        return rm, rp, shifts, None, None
    if cfg.reward.kind == "model":
        rm, rp = models.from_pretrained(cfg.reward.path, dtype=jnp.dtype(cfg.policy.dtype),
                                        param_dtype=jnp.dtype(cfg.reward.param_dtype or cfg.policy.param_dtype),
                                        head="scalar", rng=rng)
        return rm, rp, load_reward_shift(cfg.reward.path), None, None
    return None, None, 0.0, None, resolve_python_reward(cfg.reward.function, task)


def _value_model(cfg: RLRunConfig, mconfig, policy_params, reward_model, reward_params, rng):
    if not isinstance(cfg, PPOTrainConfig) or cfg.ppo.value_model != "separate":
        return None, None
    if cfg.value_init == "reward":  # the reward model's trunk, trained with the policy's memory options
        vm = models.ScalarHeadModel(dataclasses.replace(
            reward_model.config, dtype=mconfig.dtype, remat=mconfig.remat, remat_policy=mconfig.remat_policy))
        return vm, _fresh_head_on(reward_params, vm, rng)
    vm = models.ScalarHeadModel(mconfig)
    return vm, _fresh_head_on(policy_params, vm, rng)


def _build(cfg: RLRunConfig, *, devices_per_run: int | None = None) -> _Built:
    validate_rl_config(cfg, devices_per_run=devices_per_run)
    task = get_task_or_none(cfg.task)
    tok_dir = require_tokenizer_dir(cfg.data.tokenizer, cfg.policy.path, task, "policy")
    tokenizer = load_tokenizer(tok_dir)
    algo = resolve_stop_and_pad(algorithm_config(cfg), tokenizer)
    rng = jax.random.PRNGKey(cfg.seed)
    shared = algo.value_mode == "shared"
    policy_model, policy_params, mconfig = build_model(cfg.policy, task=task, tokenizer=tokenizer,
                                                       head="value" if shared else None,
                                                       rng=jax.random.fold_in(rng, 1), prefix="policy.")
    p_len = _prompt_length(cfg, task)
    if p_len + algo.max_new_tokens > mconfig.max_position_embeddings:
        raise ConfigError(f"config key '{cfg.section}.max_new_tokens': prompt length {p_len} + "
                          f"{algo.max_new_tokens} new tokens exceeds the model's max_position_embeddings "
                          f"{mconfig.max_position_embeddings}")
    ref_params = models.split_value_head(policy_params)[0] if shared else policy_params
    if lora.is_lora_params(policy_params):  # the reference is the policy's own base, adapters off: no copy
        ref_params = None
    elif cfg.ref_param_dtype:
        ref_params = _cast(ref_params, cfg.ref_param_dtype)
    reward_model, reward_params, reward_shift, reward_fn, python_reward = _reward_source(
        cfg, task, tokenizer, jax.random.fold_in(rng, 2))
    ensemble = int(jnp.size(reward_shift)) if cfg.reward.kind == "model" and is_reward_ensemble(cfg.reward.path) else 0
    value_model, value_params = _value_model(cfg, mconfig, policy_params, reward_model,
                                             member_params(reward_params, 0) if ensemble else reward_params,
                                             jax.random.fold_in(rng, 3))
    if value_params is not None and getattr(cfg, "value_param_dtype", ""):
        value_params = _cast(value_params, cfg.value_param_dtype)
    if (value_model is not None and isinstance(policy_model, lora.LoraModel)
            and getattr(cfg, "value_lora", "adapters") == "adapters"):  # the critic gets its own adapters
        value_model = lora.wrap(value_model, policy_model.lora)
        value_params = {"params": value_params["params"],
                        "lora": lora.init_adapters(value_params, policy_model.lora, jax.random.fold_in(rng, 4))}
    updates = cfg.iterations * algo.epochs * algo.minibatches
    unit_rate = dataclasses.replace(cfg.optim, learning_rate=1.0)  # the traced lr scales every update
    policy_tx = make_optimizer(unit_rate, policy_params, total_steps=updates)
    value_tx = None if value_params is None else make_optimizer(unit_rate, value_params, total_steps=updates)
    frozen = core.RLFrozen(ref_params=ref_params, reward_params=reward_params, reward_shift=reward_shift,
                           policy_model=policy_model, value_model=value_model, reward_model=reward_model,
                           reward_fn=reward_fn, reward_ensemble=ensemble)
    setup = core.RLSetup(frozen=frozen, policy_model=policy_model, policy_params=policy_params,
                         policy_tx=policy_tx, prompts={}, value_model=value_model, value_params=value_params,
                         value_tx=value_tx, algo=algo)
    configs = {"policy": mconfig, "value": None if value_model is None else value_model.config,
               "reward": None if reward_model is None else reward_model.config}
    return _Built(setup=setup, tokenizer=tokenizer, tokenizer_dir=tok_dir, task=task, python_reward=python_reward,
                  algo=algo, export_model=models.CausalLM(policy_model.config) if shared and not
                  isinstance(policy_model, lora.LoraModel) else policy_model,
                  model_configs=configs)


def _prompt_length(cfg: RLRunConfig, task) -> int:
    """P: ``data.max_prompt_length``, else the task's prompt length for the task's own prompts, else
    ``data.max_length`` (your own prompts are never cut to an embedded task's budget)."""
    if cfg.data.max_prompt_length:
        return int(cfg.data.max_prompt_length)
    return int(task.prompt_length if task is not None and not cfg.data.path else cfg.data.max_length)


def _prompt_iterator(cfg: RLRunConfig, built: _Built, *, num_epochs: int | None = None, whole: bool = False):
    """The run's prompt batches: this process's rows of each global batch, or with ``whole`` the global
    batches themselves (what every process of a vmapped sweep holds: it places them itself)."""
    task, algo = built.task, built.algo
    p_len = _prompt_length(cfg, task)
    src = None if cfg.data.path else task.prompt_records("train")
    if src is None and not cfg.data.path:
        raise ConfigError("config key 'data.path': empty and no task prompts")
    nproc, pid = (1, 0) if whole else (jax.process_count(), jax.process_index())
    return make_iterator(cfg.data, "prompt", tokenizer=built.tokenizer, source=src, host_id=pid, num_hosts=nproc,
                         batch_size=core.prompt_batch(algo) // nproc, max_prompt_length=p_len, buckets=(p_len,),
                         max_length=max(cfg.data.max_length, p_len + 1), seed=cfg.data.seed or cfg.seed,
                         num_epochs=num_epochs)


def build_setup(cfg: RLRunConfig, *, num_prompts: int = 0, devices_per_run: int | None = None) -> core.RLSetup:
    """The :class:`~rlhf_jax.rl.core.RLSetup` of a trainer config, with a prompt POOL (for ``make_train``).

    The pool holds the first ``num_prompts`` prompts of the data (default: 16 batches' worth) as
    ``[N, P]`` arrays; each iteration of a ``make_train`` run draws its batch from it on device.
    """
    built = _build(cfg, devices_per_run=devices_per_run)
    it = _prompt_iterator(cfg, built, whole=True)
    want = num_prompts or 16 * core.prompt_batch(built.algo)
    ids, masks = [], []
    while sum(len(x) for x in ids) < want:
        b = next(it)
        keep = np.asarray(b["example_mask"]) > 0
        ids.append(np.asarray(b["prompt_ids"])[keep])
        masks.append(np.asarray(b["prompt_mask"])[keep])
    prompts = {"prompt_ids": np.concatenate(ids)[:want], "prompt_mask": np.concatenate(masks)[:want]}
    return dataclasses.replace(built.setup, prompts=prompts)


def export_policy(policy_model, policy_params, tokenizer_dir: str, export_dir: Path) -> str:
    """A trained policy as a Hugging Face directory (+ the run's tokenizer files); a value head that
    shares the policy's trunk is left out."""
    if isinstance(policy_model, lora.LoraModel):  # merged model + the adapters in PEFT format (export/adapter)
        if isinstance(policy_model.model, models.CausalLMWithValueHead):
            lm_params = models.split_value_head(lora.base_params(policy_params))[0]
            policy_model = lora.wrap(models.CausalLM(policy_model.config), policy_model.lora)
            policy_params = {"params": lm_params["params"], "lora": policy_params["lora"]}
        return export_model(Path(export_dir), policy_model, policy_params, tokenizer_dir)
    model, params = lm_view(policy_model, policy_params)
    return export_model(Path(export_dir), model, params, tokenizer_dir)


def state_key(seed: int) -> jax.Array:
    """The RL state's key of a run with ``seed`` (iteration keys are ``fold_in(key, iteration)``)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 10)


def seeded_frozen_params(cfg: RLRunConfig) -> str:
    """Why the params a run's optimiser freezes (a LoRA base: ``policy.lora_rank > 0``; ``optim.freeze``)
    depend on the run's seed, or "" when every seed of ``cfg`` starts from the same frozen params.

    A policy loaded from ``policy.path`` has the same base for every seed (only its adapters and fresh
    scalar heads, which train, are drawn from the seed); without ``policy.path`` the base is the task's
    tiny model initialised from the seed (``build_model``), and so is a critic built on the policy's trunk.
    A vmapped sweep holds the frozen params once for all its runs when this is ""; otherwise (several
    seeds, each its own base) it stacks them per run."""
    if not (cfg.policy.uses_lora or cfg.optim.freeze):
        return ""
    if not cfg.policy.path:
        return ("config key 'policy.path' is empty: each seed's frozen policy base is the task's model "
                "initialised from that seed")
    return ""


def seeded_reference_params(cfg: RLRunConfig) -> str:
    """Why the reference policy's params (``RLFrozen.ref_params``) depend on the run's seed, or "" when every
    seed of ``cfg`` has the same reference, or none (a LoRA run's reference is its own base, adapters off).

    A full fine-tune's reference is its initial policy (the language model; cast by ``ref_param_dtype``):
    loaded from ``policy.path`` it is the same for every seed (a fresh value head, drawn from the seed, is
    not part of it); without ``policy.path`` it is the task's tiny model initialised from the seed
    (``build_model``). A vmapped sweep holds the reference once for all its runs when this is "";
    otherwise (several seeds, each its own start) it stacks it per run."""
    if cfg.policy.uses_lora:
        return ""
    if not cfg.policy.path:
        return ("config key 'policy.path' is empty: each seed's reference policy is the task's model "
                "initialised from that seed")
    return ""


def run_inputs(cfg: RLRunConfig, seed: int, *, built: _Built | None = None,
               devices_per_run: int | None = None) -> dict[str, Any]:
    """What the trainer's run of ``cfg`` with ``seed`` starts from, as arrays: its initial policy and
    value params, its reference params and its prompt batches of every iteration in order (from the
    same data iterator), for ``core.make_train``'s ``run`` argument: a vmapped sweep then runs exactly
    the experiment that ``train_rl`` runs point by point (pair it with ``state_key(seed)``)."""
    cfg = dataclasses.replace(cfg, seed=seed)
    built = _build(cfg, devices_per_run=devices_per_run) if built is None else built
    it = _prompt_iterator(cfg, built, whole=True)  # the global batches, the same on every process
    batches = [next(it) for _ in range(cfg.iterations)]
    prompts = {k: np.stack([np.asarray(b[k]) for b in batches]) for k in ("prompt_ids", "prompt_mask")}
    s = built.setup
    out = {"prompts": prompts, "policy_params": s.policy_params, "ref_params": s.frozen.ref_params}
    if s.value_params is not None:
        out["value_params"] = s.value_params
    return out


# ---------------------------------------------------------------------------------------------
# The job the training loop runs
# ---------------------------------------------------------------------------------------------

def decode(tokenizer, ids, mask) -> str:
    ids = [int(t) for t, m in zip(np.asarray(ids), np.asarray(mask)) if m]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _python_scores(built: _Built, roll) -> np.ndarray:
    tok = built.tokenizer
    stopped = np.asarray(has_stop_token(roll.response_ids, roll.response_mask, built.algo.stop_token_ids))
    p_ids, p_mask = np.asarray(roll.prompt_ids), np.asarray(roll.prompt_mask)
    r_ids, r_mask = np.asarray(roll.response_ids), np.asarray(roll.response_mask)
    out = np.zeros((r_ids.shape[0],), np.float32)
    for i in range(r_ids.shape[0]):
        out[i] = built.python_reward(decode(tok, p_ids[i], p_mask[i]), decode(tok, r_ids[i], r_mask[i]),
                                     bool(stopped[i]))
    return out


def state_sharding(mesh, state: core.RLState) -> core.RLState:
    """Where an RL state lives on ``mesh``: the policy's and value model's params and optimiser state by the
    fsdp rule, the algorithm state, key and counter replicated."""
    rep = mesh_lib.replicated(mesh)
    return core.RLState(policy=mesh_lib.state_sharding(mesh, state.policy),
                        value=None if state.value is None else mesh_lib.state_sharding(mesh, state.value),
                        algo_state=jax.tree_util.tree_map(lambda _: rep, state.algo_state), rng=rep, step=rep)


def _place_state(mesh, state: core.RLState) -> core.RLState:
    return mesh_lib.place(state, state_sharding(mesh, state))


@dataclasses.dataclass(frozen=True)
class _Pinned:
    """The core's jitted iteration and update with the new state constrained to the input state's sharding,
    so the state never drifts between iterations (and a plan sees the real output layout)."""
    iteration: Callable
    update: Callable


def _pinned(shardings) -> _Pinned:
    keep = lambda st: jax.lax.with_sharding_constraint(st, shardings)  # noqa: E731

    def iteration(state, frozen, prompts, rng, cfg):
        new, metrics, rows = core.iteration_pure(state, frozen, prompts, rng, cfg)
        return keep(new), metrics, rows

    def update(state, frozen, roll, scores, rng, cfg):
        new, metrics = core.update_pure(state, frozen, roll, scores, rng, cfg)
        return keep(new), metrics
    return _Pinned(jax.jit(iteration, donate_argnums=(0,)), jax.jit(update, donate_argnums=(0,)))


def _rl_step(built: _Built, frozen: core.RLFrozen, pinned: _Pinned) -> Callable:
    """``step(state, prompts) -> (state, metrics, sample rows)``: one fused iteration, or rollout → host
    scores → update with a Python reward."""
    algo = built.algo
    hp = core.traced(algo)

    def step(state, prompts):
        t0 = time.perf_counter()
        if built.python_reward is None:
            state, m, rows = pinned.iteration(state, frozen, prompts, None, hp)
        else:
            roll = core.rollout(state, frozen, prompts, cfg=algo)
            scores = _python_scores(built, roll)
            state, m = pinned.update(state, frozen, roll, jnp.asarray(scores, jnp.float32), None, hp)
            rows = core.sample_rows(roll, jnp.asarray(scores))
        m = to_host_scalars(m)
        dt = time.perf_counter() - t0
        m["iteration_seconds"] = dt
        m["tokens_per_sec"] = m["num_tokens"] / dt
        return state, m, rows

    return step


def _rl_programs(built: _Built, frozen: core.RLFrozen, pinned: _Pinned, state, prompts) -> list[loop.Program]:
    """The compiled programs one iteration of :func:`_rl_step` runs (for a plan): the fused iteration, or
    the rollout and the update around a Python reward."""
    algo = built.algo
    hp = core.traced(algo)
    if built.python_reward is None:
        return [loop.Program(f"{algo.name}_iteration", pinned.iteration, (state, frozen, prompts, None, hp), {})]
    roll = jax.eval_shape(core.rollout_pure, state, frozen, prompts, None, hp)
    scores = jax.ShapeDtypeStruct((algo.rollout_size,), jnp.float32)
    return [loop.Program(f"{algo.name}_rollout", core._rollout_jit, (state, frozen, prompts, None, hp), {}),
            loop.Program(f"{algo.name}_update", pinned.update, (state, frozen, roll, scores, None, hp), {})]


def _sample_logger(cfg: RLRunConfig, built: _Built, path: Path) -> Callable:
    """``on_log`` hook: decodes ``num_samples`` rows of the iteration's output every ``sample_every``."""
    def on_log(step: int, metrics: dict, rows, writer) -> None:
        if not (cfg.sample_every and cfg.num_samples) or jax.process_index() != 0:
            return
        if step % cfg.sample_every and step != 1:
            return
        tok, n = built.tokenizer, min(cfg.num_samples, rows["response_ids"].shape[0])
        host = jax.tree_util.tree_map(lambda x: np.asarray(mesh_lib.host_value(x))[:n], rows)
        out = [{"step": step, "prompt": decode(tok, host["prompt_ids"][i], host["prompt_mask"][i]),
                "response": decode(tok, host["response_ids"][i], host["response_mask"][i]),
                "score": float(host["scores"][i])} for i in range(n)]
        with open(path, "a") as fh:
            for r in out:
                fh.write(json.dumps(r) + "\n")
        writer.write_text(step, "samples", "\n\n".join(f"{r['prompt']} -> {r['response']}" for r in out))

    return on_log


def iteration_flops_per_token(built: _Built, seq_len: int) -> float:
    """Model FLOPs of one iteration per sequence token (prompt + response): sampling and the rollout's
    forwards (policy, reference, value, reward model) plus ``epochs`` training passes (policy, value)."""
    return _iteration_flops(built.algo, built.model_configs, seq_len)


def run_flops(cfg: RLRunConfig, setup: core.RLSetup) -> float:
    """Model FLOPs of a whole run of ``cfg`` (``iterations`` iterations of ``setup``'s models), as
    :func:`iteration_flops_per_token` counts them."""
    algo = setup.algo
    f = setup.frozen
    configs = {"policy": setup.policy_model.config,
               "value": None if setup.value_model is None else setup.value_model.config,
               "reward": None if f.reward_model is None else f.reward_model.config}
    seq_len = _prompt_length(cfg, get_task_or_none(cfg.task)) + algo.max_new_tokens
    per_token = _iteration_flops(algo, configs, seq_len)
    if f.reward_ensemble:  # every member scores the rollout
        per_token += (f.reward_ensemble - 1) * models.flops_per_token(configs["reward"], seq_len, training=False,
                                                                      lm_head=False)
    return float(cfg.iterations * algo.rollout_size * seq_len * per_token)


def _iteration_flops(algo, cfgs: dict, seq_len: int) -> float:
    def fwd(c, head=True):
        return models.flops_per_token(c, seq_len, training=False, lm_head=head) if c is not None else 0.0

    def train(c, head=True):
        return models.flops_per_token(c, seq_len, training=True, lm_head=head) if c is not None else 0.0
    # the value and reward models are scalar-head models: no LM head (a shared-trunk value head rides on the
    # policy's forward, whose count has the head already)
    rollout = 2 * fwd(cfgs["policy"]) + (fwd(cfgs["policy"]) if algo.uses_ref else 0.0) + fwd(cfgs["value"], False) \
        + fwd(cfgs["reward"], False)
    return rollout + algo.epochs * (train(cfgs["policy"]) + train(cfgs["value"], False))


def train_rl(cfg: RLRunConfig) -> loop.TrainResult:
    """Any online RL trainer config (PPO, GRPO, RLOO, ...) through the one training loop."""
    built = _build(cfg)
    algo = built.algo
    placement = loop.make_placement(cfg.mesh)
    frozen = mesh_lib.place(built.setup.frozen, mesh_lib.param_sharding(placement.mesh, built.setup.frozen))
    s = built.setup
    state = core.init_state(policy_model=s.policy_model, policy_params=s.policy_params, policy_tx=s.policy_tx,
                            value_model=s.value_model, value_params=s.value_params, value_tx=s.value_tx, cfg=algo,
                            rng=state_key(cfg.seed))
    pinned = _pinned(state_sharding(placement.mesh, state))
    seq_len = _prompt_length(cfg, built.task) + algo.max_new_tokens
    updates = algo.epochs * algo.minibatches
    factor = schedule_factor(cfg.optim, cfg.iterations * updates)
    out_dir = Path(cfg.out_dir).absolute()

    job = loop.Job(
        name=cfg.section, state=state, batches=_prompt_iterator(cfg, built), total_steps=cfg.iterations,
        config_dict=to_dict(dataclasses.replace(cfg, **{cfg.section: algo})), placement=placement,
        make_step=lambda placed: _rl_step(built, frozen, pinned),
        prepare=lambda b: loop.put(placement, {k: b[k] for k in ("prompt_ids", "prompt_mask")}),
        place=lambda st: _place_state(placement.mesh, st), unplace=lambda st: st,
        tokens=lambda b, m: float(algo.rollout_size * seq_len),
        flops_per_token=iteration_flops_per_token(built, seq_len),
        lr_fn=lambda i: float(algo.hparams.lr) * float(factor(i * updates)),
        average_window=False, progress_keys=("score", "kl"), step_name="iteration",
        finite_keys=("loss", "policy_grad_norm", "value_grad_norm", "score", "kl"),
        on_log=_sample_logger(cfg, built, out_dir / "samples.jsonl"),
        export=(lambda st, out: export_policy(s.policy_model, st.policy.params, built.tokenizer_dir, out / "export"))
        if cfg.export else None,
        programs=lambda st, prompts: _rl_programs(built, frozen, pinned, st, prompts))
    result = loop.run(job, out_dir=out_dir, ckpt_cfg=cfg.checkpoint, log_cfg=cfg.log, resume=cfg.resume)
    return dataclasses.replace(result, model=built.export_model)


def _trainer(cls):
    def train(cfg):
        if not isinstance(cfg, cls):
            raise ConfigError(f"train_{cls.section} expects a {cls.__name__}, got {type(cfg).__name__}")
        return train_rl(cfg)
    train.__name__ = f"train_{cls.section}"
    train.__doc__ = f"{cls.section.upper()} from a ``{cls.__name__}`` (CLI: ``rlhf-jax {cls.section}``)."
    return train


train_ppo = _trainer(PPOTrainConfig)
train_grpo = _trainer(GRPOTrainConfig)
train_rloo = _trainer(RLOOTrainConfig)
train_online_dpo = _trainer(OnlineDPOTrainConfig)
