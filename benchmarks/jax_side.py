"""Our side of every item, through rlhf_jax's public functions only (no re-implementation here).

Each function raises ``NotAvailable`` naming the missing piece when the library in this tree does
not (yet) provide what the item needs; everything else it raises is a real error.
"""
from __future__ import annotations

import importlib
import time
from typing import Any

import numpy as np

from benchmarks.errors import NotAvailable
from benchmarks.timing import time_calls


def need(module: str, *names: str) -> Any:
    """``module.name`` for each name (a tuple if several); NotAvailable if absent from this tree."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # the package is still being written: the row says so, with the reason
        raise NotAvailable(f"{module} cannot be imported ({type(e).__name__}: {e})") from e
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise NotAvailable(f"{module} has no {', '.join(missing)} in this tree")
    out = tuple(getattr(mod, n) for n in names)
    return out if len(out) > 1 else out[0]


def block(tree: Any) -> Any:
    import jax

    return jax.block_until_ready(tree)


# The model option our side runs with, as a user sets it (``model.attention_impl``): "auto" picks the
# blocked attention on CPU for rows of >= 2 blocks and cuDNN's kernel on a GPU (docs/USAGE.md).
ATTENTION_IMPL = "auto"


def model_config(shape: dict[str, Any], dtype: str, attention_impl: str = ATTENTION_IMPL,
                 param_dtype: str = "float32"):
    """``ModelConfig.from_hf(shape)`` with compute ``dtype``, ``attention_impl`` and storage ``param_dtype``."""
    ModelConfig = need("rlhf_jax.models", "ModelConfig")
    return ModelConfig.from_hf(shape, dtype=dtype, attention_impl=attention_impl, param_dtype=param_dtype)


def build(shape: dict[str, Any], *, head: str = "causal", dtype: str = "float32", seed: int = 0,
          attention_impl: str = ATTENTION_IMPL, param_dtype: str = "float32"):
    """``(module, params)`` with random weights: ``CausalLM`` or ``ScalarHeadModel`` (head="scalar")."""
    import jax

    cfg = model_config(shape, dtype, attention_impl, param_dtype)
    CausalLM, ScalarHeadModel, init_params = need("rlhf_jax.models", "CausalLM", "ScalarHeadModel", "init_params")
    module = CausalLM(cfg) if head == "causal" else ScalarHeadModel(cfg)
    return module, init_params(module, jax.random.PRNGKey(seed))


def flops_per_token(shape: dict[str, Any], seq_len: int, *, training: bool = True) -> float:
    """The library's MFU numerator (``rlhf_jax.models.flops_per_token``, PaLM convention)."""
    fpt = need("rlhf_jax.models", "flops_per_token")
    return fpt(model_config(shape, "float32"), seq_len, training=training)


def reward_flops_per_token(shape: dict[str, Any], seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token of a ``ScalarHeadModel`` at ``shape``: :func:`flops_per_token` less the LM head
    (``2·d·V`` a forward, ``6·d·V`` with the backward), which a scalar-head model does not run; its
    ``d x 1`` score head is negligible."""
    fpt = need("rlhf_jax.models", "flops_per_token")
    return fpt(model_config(shape, "float32"), seq_len, training=training, lm_head=False)


def _optimizer(params, *, weight_decay: float = 0.01):
    OptimConfig, make_optimizer = need("rlhf_jax.training.optim", "OptimConfig", "make_optimizer")
    cfg = OptimConfig(learning_rate=1e-5, schedule="constant", weight_decay=weight_decay, max_grad_norm=1.0)
    return make_optimizer(cfg, params, total_steps=1000)


def _train_state(module, params):
    TrainState = need("rlhf_jax.training.state", "TrainState")
    return TrainState.create(apply_fn=module.apply, params=params, tx=_optimizer(params), rng=0)


def _jitted_step(step_fn, cfg):
    import functools

    import jax

    return jax.jit(functools.partial(step_fn, cfg=cfg), donate_argnums=(0,))


def resolved_attention(shape: dict[str, Any], dtype: str, attention_impl: str, seq_len: int) -> str:
    """What ``attention_impl`` resolves to for a ``seq_len`` forward on this platform ("auto": cudnn on a GPU)."""
    resolve = need("rlhf_jax.models.transformer", "resolve_attention_impl")
    return resolve(model_config(shape, dtype, attention_impl), seq_len)


def _timed_step(step, state, dev_batch, *, reps: int, warmup: int) -> dict[str, Any]:
    """Compiles ``step`` for ``(state, dev_batch)`` ahead of time, then times it with the state donated.

    Returns the timing (compilation excluded), ``compile_s``, ``temp_bytes``: XLA's memory analysis
    of the compiled program (activations, logits and other scratch live at its peak; None where the
    backend reports none), and ``first_loss``: the loss of the first call (the initial weights on
    ``dev_batch``: equal across options that must not change the numbers, up to rounding).
    """
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first call's loss is recorded), got {warmup}")
    holder = {"state": state}
    t0 = time.perf_counter()
    compiled = step.lower(state, dev_batch).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    temp = None if ma is None else int(ma.temp_size_in_bytes)

    def call():
        holder["state"], metrics = compiled(holder["state"], dev_batch)
        return metrics

    first_loss = float(block(call())["loss"])
    if not np.isfinite(first_loss):
        raise RuntimeError(f"the step's first loss is {first_loss}")
    timing = time_calls(call, reps=reps, warmup=warmup - 1, sync=block)
    return {"timing": timing, "compile_s": compile_s, "temp_bytes": temp, "first_loss": first_loss}


def sft_step_time(shape: dict[str, Any], batch: dict[str, np.ndarray], *, dtype: str, reps: int,
                  warmup: int = 1, attention_impl: str = ATTENTION_IMPL, logits_chunk: int = 0) -> dict[str, Any]:
    """Seconds per ``rlhf_jax.training.sft_step`` (forward, backward, AdamW), jitted, state donated.

    ``logits_chunk > 0``: ``SFTStepConfig(logits_chunk=...)`` (the loss's head and cross-entropy that many
    positions at a time, never the whole ``[B, T, V]`` logits); NotAvailable where this tree's
    ``SFTStepConfig`` has no such field. Also returns ``compile_s``, ``temp_bytes`` (see ``_timed_step``)
    and ``attention`` (what ``attention_impl`` resolved to).
    """
    import dataclasses

    import jax.numpy as jnp

    sft_step, SFTStepConfig = need("rlhf_jax.training", "sft_step", "SFTStepConfig")
    step_kw = {}
    if logits_chunk:
        if "logits_chunk" not in {f.name for f in dataclasses.fields(SFTStepConfig)}:
            raise NotAvailable("rlhf_jax.training.SFTStepConfig has no logits_chunk field in this tree")
        step_kw["logits_chunk"] = logits_chunk
    module, params = build(shape, dtype=dtype, attention_impl=attention_impl)
    step = _jitted_step(sft_step, SFTStepConfig(**step_kw))
    # Unpacked rows, like the PyTorch loop: no segment ids, default positions (plain causal mask).
    dev_batch = {k: jnp.asarray(batch[k]) for k in ("input_ids", "targets", "loss_mask", "attention_mask")}
    out = _timed_step(step, _train_state(module, params), dev_batch, reps=reps, warmup=warmup)
    out["attention"] = resolved_attention(shape, dtype, attention_impl, batch["input_ids"].shape[1])
    return out


def reward_step_time(shape: dict[str, Any], batch: dict[str, np.ndarray], *, dtype: str, reps: int,
                     warmup: int = 1, attention_impl: str = ATTENTION_IMPL) -> dict[str, Any]:
    """Seconds per ``rlhf_jax.training.reward_step`` (Bradley-Terry pairs), jitted, state donated
    (with ``compile_s``, ``temp_bytes`` and ``attention`` as :func:`sft_step_time`)."""
    import jax.numpy as jnp

    reward_step, RewardStepConfig = need("rlhf_jax.training", "reward_step", "RewardStepConfig")
    module, params = build(shape, head="scalar", dtype=dtype, attention_impl=attention_impl)
    step = _jitted_step(reward_step, RewardStepConfig())
    dev_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    out = _timed_step(step, _train_state(module, params), dev_batch, reps=reps, warmup=warmup)
    out["attention"] = resolved_attention(shape, dtype, attention_impl, batch["chosen_ids"].shape[1])
    return out


def generate_time(shape: dict[str, Any], prompts: dict[str, np.ndarray], *, new_tokens: int, greedy: bool,
                  reps: int, dtype: str, warmup: int = 1, attention_impl: str = ATTENTION_IMPL) -> dict[str, Any]:
    """Seconds per ``rlhf_jax.generation.generate`` call (jitted), every row to full length."""
    import functools

    import jax
    import jax.numpy as jnp

    generate = need("rlhf_jax.generation", "generate")
    module, params = build(shape, dtype=dtype, attention_impl=attention_impl)
    # generate is itself one jitted program (top-level: it carries its own XLA:CPU options);
    # wrapping it in another jax.jit would inline it and drop them
    fn = functools.partial(generate, module, max_new_tokens=new_tokens, greedy=greedy,
                           stop_token_ids=(), pad_token_id=shape["pad_token_id"])
    ids, mask = jnp.asarray(prompts["prompt_ids"]), jnp.asarray(prompts["prompt_mask"])
    key = jax.random.PRNGKey(0)
    out = fn(params, ids, mask, rng=key)
    if out.tokens.shape != (ids.shape[0], new_tokens) or int(out.mask.sum()) != ids.shape[0] * new_tokens:
        raise RuntimeError(f"generate returned tokens {out.tokens.shape} with {int(out.mask.sum())} valid; "
                           f"expected {(ids.shape[0], new_tokens)} all valid")
    timing = time_calls(lambda: fn(params, ids, mask, rng=key).tokens, reps=reps, warmup=warmup, sync=block)
    return {"timing": timing}


def _frozen_models(shape: dict[str, Any], *, dtype: str, attention_impl: str, frozen_param_dtype: str):
    """Policy (float32 params), its reference and a reward model; the frozen two stored in
    ``frozen_param_dtype`` (what the trainers' ``ref_param_dtype`` / ``reward.param_dtype`` do: the
    reference is the policy's weights cast, the reward model is built in that dtype).
    Returns ``(policy, policy_params, ref_params, reward, reward_params)``."""
    import jax
    import jax.numpy as jnp

    policy, policy_params = build(shape, dtype=dtype, seed=0, attention_impl=attention_impl)
    reward, reward_params = build(shape, head="scalar", dtype=dtype, seed=1, attention_impl=attention_impl,
                                  param_dtype=frozen_param_dtype)
    ref_params = policy_params
    if jnp.dtype(frozen_param_dtype) != jnp.float32:
        ref_params = jax.tree_util.tree_map(lambda x: x.astype(frozen_param_dtype), policy_params)
    return policy, policy_params, ref_params, reward, reward_params


def _ppo_setup(shape: dict[str, Any], batch: int, *, response_length: int, epochs: int, minibatches: int,
               dtype: str, attention_impl: str = ATTENTION_IMPL, frozen_param_dtype: str = "float32") -> dict[str, Any]:
    """Four random models (policy, reference = the policy's weights, reward, value) and the config.

    Returns ``cfg`` (``rlhf_jax.rl.PPOConfig``: full-length responses, separate value model), the
    ``RLFrozen`` and the modules/params/optimizers of policy and value. ``frozen_param_dtype``: the
    storage dtype of the reference and reward weights (``_frozen_models``).
    """
    PPOConfig, PPOHParams, RLFrozen = need("rlhf_jax.rl", "PPOConfig", "PPOHParams", "RLFrozen")
    cfg = PPOConfig(batch_size=batch, max_new_tokens=response_length, ppo_epochs=epochs, minibatches=minibatches,
                    value_model="separate", stop_token_ids=(), pad_token_id=shape["pad_token_id"],
                    hparams=PPOHParams(temperature=1.0, kl_coef=0.05))
    policy, policy_params, ref_params, reward, reward_params = _frozen_models(
        shape, dtype=dtype, attention_impl=attention_impl, frozen_param_dtype=frozen_param_dtype)
    value, value_params = build(shape, head="scalar", dtype=dtype, seed=2, attention_impl=attention_impl)
    frozen = RLFrozen(ref_params=ref_params, reward_params=reward_params, policy_model=policy,
                       value_model=value, reward_model=reward)
    return dict(cfg=cfg, frozen=frozen, policy_model=policy, policy_params=policy_params,
                policy_tx=_optimizer(policy_params, weight_decay=0.0), value_model=value,
                value_params=value_params, value_tx=_optimizer(value_params, weight_decay=0.0))


def ppo_iteration_time(shape: dict[str, Any], prompts: dict[str, np.ndarray], *, response_length: int, epochs: int,
                       minibatches: int, iterations: int, dtype: str,
                       attention_impl: str = ATTENTION_IMPL) -> dict[str, Any]:
    """Seconds per PPO ``rlhf_jax.rl.iteration`` (rollout + reward + reference + value + updates).

    One compiled program per iteration, the state donated; the first call (compilation included)
    is reported apart and not in the median.
    """
    import jax
    import jax.numpy as jnp

    init_state, iteration = need("rlhf_jax.rl", "init_state", "iteration")
    if iterations < 2:
        raise ValueError(f"iterations must be >= 2 (the first compiles), got {iterations}")
    s = _ppo_setup(shape, prompts["prompt_ids"].shape[0], response_length=response_length, epochs=epochs,
                   minibatches=minibatches, dtype=dtype, attention_impl=attention_impl)
    copy = lambda t: jax.tree_util.tree_map(lambda x: x.copy(), t)  # noqa: E731 (the state is donated)
    state = init_state(policy_model=s["policy_model"], policy_params=copy(s["policy_params"]),
                       policy_tx=s["policy_tx"], value_model=s["value_model"],
                       value_params=copy(s["value_params"]), value_tx=s["value_tx"], cfg=s["cfg"], rng=0)
    dev_prompts = {k: jnp.asarray(v) for k, v in prompts.items()}
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        state, metrics = iteration(state, s["frozen"], dev_prompts, cfg=s["cfg"])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    timed = times[1:]
    return {"median_s": float(np.median(timed)), "best_s": float(np.min(timed)), "times_s": times,
            "first_call_s": times[0], "first_ratio_mean": float(metrics.get("first_ratio_mean", np.nan))}


def sweep_time(shape: dict[str, Any], prompts: dict[str, np.ndarray], *, n_runs: int, iterations: int,
               response_length: int, epochs: int, minibatches: int, dtype: str, reps: int = 1,
               attention_impl: str = ATTENTION_IMPL) -> dict[str, Any]:
    """Throughput of N PPO runs vmapped in one program vs the same N runs one after another.

    ``train = rlhf_jax.rl.make_train(cfg, setup, num_iterations=iterations)``; the N runs are
    ``stack_hparams``' grid of kl_coef values × seeds (2 values × N/2 seeds for even N, else N
    values × 1 seed) with ``sweep_keys``. Sequential: ``jax.jit(train)`` called once per run;
    vmapped: ``jax.jit(jax.vmap(train))`` called once. Compilation (one warm-up call each) is
    excluded. Returns PPO iterations per second both ways and ``speedup`` = t(sequential)/t(vmapped)
    (= N·t(one)/t(N vmapped), the issue's "≥ 0.7·N × the throughput of one").
    """
    import jax
    import jax.numpy as jnp

    make_train, RLSetup, stack_hparams, sweep_keys = need("rlhf_jax.rl", "make_train", "RLSetup", "stack_hparams",
                                                          "sweep_keys")
    s = _ppo_setup(shape, prompts["prompt_ids"].shape[0], response_length=response_length, epochs=epochs,
                   minibatches=minibatches, dtype=dtype, attention_impl=attention_impl)
    setup = RLSetup(frozen=s["frozen"], policy_model=s["policy_model"], policy_params=s["policy_params"],
                    policy_tx=s["policy_tx"], prompts={k: jnp.asarray(v) for k, v in prompts.items()},
                    value_model=s["value_model"], value_params=s["value_params"], value_tx=s["value_tx"])
    train = make_train(s["cfg"], setup, num_iterations=iterations)
    if n_runs % 2 == 0 and n_runs >= 2:
        grid, seeds = {"kl_coef": [0.02, 0.1]}, n_runs // 2
    else:
        grid, seeds = {"kl_coef": list(np.linspace(0.01, 0.1, n_runs))}, 1
    hparams, seed_index = stack_hparams(s["cfg"], grid, num_seeds=seeds)
    keys = sweep_keys(0, seed_index)
    if keys.shape[0] != n_runs:
        raise RuntimeError(f"stack_hparams gave {keys.shape[0]} runs, expected {n_runs}")
    one = jax.jit(train)
    many = jax.jit(jax.vmap(train))
    pick = lambda i: jax.tree_util.tree_map(lambda x: x[i], hparams)  # noqa: E731

    def sequential():
        return [one(pick(i), keys[i])[1] for i in range(n_runs)]

    t_seq = time_calls(sequential, reps=reps, warmup=1, sync=block)
    t_vm = time_calls(lambda: many(hparams, keys)[1], reps=reps, warmup=1, sync=block)
    total = n_runs * iterations
    return {
        "n_runs": n_runs,
        "iterations_per_run": iterations,
        "grid": {k: [float(v) for v in vals] for k, vals in grid.items()},
        "seeds": seeds,
        "sequential": t_seq,
        "vmapped": t_vm,
        "sequential_iters_per_s": total / t_seq.median,
        "vmapped_iters_per_s": total / t_vm.median,
        "speedup": t_seq.median / t_vm.median,
    }


def _grpo_setup(shape: dict[str, Any], prompts: int, *, group_size: int, response_length: int, epochs: int,
                minibatches: int, dtype: str, attention_impl: str = ATTENTION_IMPL,
                frozen_param_dtype: str = "float32") -> dict[str, Any]:
    """Random policy (reference = its weights) and reward model with ``rlhf_jax.rl.GRPOConfig``
    (``prompts`` x ``group_size`` full-length responses, no value model); same keys as ``_ppo_setup``."""
    GRPOConfig, GRPOHParams, RLFrozen = need("rlhf_jax.rl", "GRPOConfig", "GRPOHParams", "RLFrozen")
    cfg = GRPOConfig(batch_size=prompts, group_size=group_size, max_new_tokens=response_length, epochs=epochs,
                     minibatches=minibatches, stop_token_ids=(), pad_token_id=shape["pad_token_id"],
                     hparams=GRPOHParams(temperature=1.0, kl_coef=0.04))
    policy, policy_params, ref_params, reward, reward_params = _frozen_models(
        shape, dtype=dtype, attention_impl=attention_impl, frozen_param_dtype=frozen_param_dtype)
    frozen = RLFrozen(ref_params=ref_params, reward_params=reward_params, policy_model=policy,
                      reward_model=reward)
    return dict(cfg=cfg, frozen=frozen, policy_model=policy, policy_params=policy_params,
                policy_tx=_optimizer(policy_params, weight_decay=0.0), value_model=None, value_params=None,
                value_tx=None)


# metrics of an iteration that must be finite (the trainer's own check, rl.trainer's finite_keys)
RL_FINITE_KEYS = ("loss", "policy_grad_norm", "value_grad_norm", "score", "kl")


def rl_iteration_time(shape: dict[str, Any], prompts: dict[str, np.ndarray], *, algo: str, response_length: int,
                      epochs: int, minibatches: int, group_size: int = 1, iterations: int = 3,
                      rollout_reps: int = 2, dtype: str, attention_impl: str = ATTENTION_IMPL) -> dict[str, Any]:
    """The fused RL iteration (``rlhf_jax.rl.iteration``: one compiled program) and its rollout alone.

    ``algo``: "ppo" (policy, reference = the policy's weights, reward model, separate value model:
    ``_ppo_setup``) or "grpo" (policy, reference, reward model; ``prompts`` x ``group_size`` responses).
    The trained models keep float32 params; the frozen reference and reward model are stored in the
    compute ``dtype`` (bf16 on an accelerator: the trainers' ``ref_param_dtype`` / ``reward.param_dtype``,
    what a user sets to fit PPO's four 1B models on one GPU).
    ``iterations`` calls of the iteration with the state donated (the first compiles and is reported
    apart), then ``rollout_reps`` timed calls of ``rlhf_jax.rl.rollout`` (sampling + the policy,
    reference and value forwards; one untimed call compiles it) on the state reached.
    ``flops``: model FLOPs of one iteration as the trainers count them (``rlhf_jax.rl.trainer.run_flops``
    of a one-iteration run: sampling and every forward of the rollout, ``epochs`` training passes).
    ``rollout_share``: rollout seconds / iteration seconds (medians); the rest of the iteration is the
    reward-model forward, the advantages and the epochs x minibatches of updates.
    """
    import jax
    import jax.numpy as jnp

    init_state, iteration, rollout, RLSetup = need("rlhf_jax.rl", "init_state", "iteration", "rollout", "RLSetup")
    run_flops, PPOTrainConfig, GRPOTrainConfig = need("rlhf_jax.rl.trainer", "run_flops", "PPOTrainConfig",
                                                      "GRPOTrainConfig")
    DataConfig = need("rlhf_jax.data", "DataConfig")
    if iterations < 2:
        raise ValueError(f"iterations must be >= 2 (the first compiles), got {iterations}")
    n, prompt_len = prompts["prompt_ids"].shape
    if algo == "ppo":
        s = _ppo_setup(shape, n, response_length=response_length, epochs=epochs, minibatches=minibatches,
                       dtype=dtype, attention_impl=attention_impl, frozen_param_dtype=dtype)
        train_cfg = PPOTrainConfig
    elif algo == "grpo":
        s = _grpo_setup(shape, n, group_size=group_size, response_length=response_length, epochs=epochs,
                        minibatches=minibatches, dtype=dtype, attention_impl=attention_impl, frozen_param_dtype=dtype)
        train_cfg = GRPOTrainConfig
    else:
        raise ValueError(f"rl_iteration_time: algo must be 'ppo' or 'grpo', got {algo!r}")
    cfg, frozen = s["cfg"], s["frozen"]
    # init_state copies every leaf (the state is donated); the initial params are not needed after that
    # unless they are the frozen reference itself (float32 compute)
    state = init_state(policy_model=s["policy_model"], policy_params=s["policy_params"], policy_tx=s["policy_tx"],
                       value_model=s["value_model"], value_params=s.pop("value_params"), value_tx=s["value_tx"],
                       cfg=cfg, rng=0)
    if frozen.ref_params is not s["policy_params"]:
        s["policy_params"] = None
    dev_prompts = {k: jnp.asarray(v) for k, v in prompts.items()}
    setup = RLSetup(frozen=frozen, policy_model=s["policy_model"], policy_params=s["policy_params"],
                    policy_tx=s["policy_tx"], prompts=dev_prompts, value_model=s["value_model"],
                    value_tx=s["value_tx"], algo=cfg)
    run_cfg = train_cfg(task="", iterations=1, data=DataConfig(batch_size=n, max_length=prompt_len + response_length,
                                                                  max_prompt_length=prompt_len), **{algo: cfg})
    flops = float(run_flops(run_cfg, setup))
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        state, metrics = iteration(state, frozen, dev_prompts, cfg=cfg)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    values = {k: float(v) for k, v in metrics.items()}
    bad = {k: values[k] for k in RL_FINITE_KEYS if k in values and not np.isfinite(values[k])}
    if bad:
        raise RuntimeError(f"{algo} iteration at this shape gave non-finite metrics {bad}")
    roll = time_calls(lambda: rollout(state, frozen, dev_prompts, cfg=cfg), reps=rollout_reps, warmup=1, sync=block)
    median = float(np.median(times[1:]))
    return {"algo": algo, "median_s": median, "best_s": float(np.min(times[1:])), "times_s": times,
            "first_call_s": times[0], "rollout": roll, "rollout_s": roll.median,
            "rollout_share": roll.median / median, "flops": flops, "rollout_rows": cfg.rollout_size,
            "seq_len": prompt_len + response_length, "updates": cfg.epochs * cfg.minibatches,
            "metrics": {k: values[k] for k in ("loss", "score", "kl", "entropy") if k in values}}
