"""Whole training runs as one pure function, for ``jax.vmap`` sweeps (PureJaxRL style).

    train = make_train(cfg, setup)                  # static: shapes, iterations, models
    final_state, history = jax.jit(jax.vmap(train))(hparams_N, rngs_N)

``train(hparams, rng) -> (final_state, metrics_history)`` initialises the state from the setup's
params (the same SFT/reference start for every run), then ``lax.scan``s ``num_iterations``
iterations of :func:`~rlhf_jax.rl.ppo.ppo_iteration_pure` (or the GRPO/RLOO iteration). Each
iteration draws ``batch_size`` prompts from the setup's prompt pool with
``fold_in(rng, iteration)``, so a run is a pure function of ``(hparams, rng)``: N seeds × M values
of a continuous hyper-parameter (β, lr, clip range, KL target, temperature, ...) run as ONE
compiled program when ``hparams`` leaves and ``rng`` carry a leading axis of N·M.
``metrics_history`` is a dict of ``[num_iterations]`` arrays (``[runs, num_iterations]`` under vmap).

Use :func:`stack_hparams` to build the stacked hyper-parameters and :func:`sweep_keys` for keys.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.rl.config import GRPOConfig, GRPOHParams, PPOConfig, PPOHParams

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RLSetup:
    """Everything a run starts from (not traced per run; closed over by ``train``).

    frozen: ``PPOFrozen`` (reference params, reward model or reward function, static modules).
    policy_model/policy_params/policy_tx: the policy's module, initial params, optax transformation.
    value_model/value_params/value_tx: the separate value model (None for shared heads / GRPO).
    algo: set by ``trainer.build_setup``: the algorithm section with its stop/pad ids resolved.
    prompts: ``{"prompt_ids": [N_pool, P], "prompt_mask": [N_pool, P]}`` left-padded prompt pool.
    """
    frozen: Any
    policy_model: Any
    policy_params: Any
    policy_tx: Any
    prompts: dict
    value_model: Any = None
    value_params: Any = None
    value_tx: Any = None
    algo: Any = None  # the resolved algorithm config (stop/pad ids from the tokenizer) of a trainer config


def sample_prompt_batch(prompts: dict, batch_size: int, key: Array) -> dict:
    """``batch_size`` distinct rows of the pool (with replacement only if the pool is smaller)."""
    n = prompts["prompt_ids"].shape[0]
    idx = jax.random.choice(key, n, (batch_size,), replace=n < batch_size)
    return {k: jnp.asarray(v)[idx] for k, v in prompts.items()}


def make_train(cfg, setup: RLSetup | None = None, *, num_iterations: int | None = None
               ) -> Callable[[Any, Array], tuple[Any, dict]]:
    """A pure ``train(hparams, rng) -> (final_state, metrics_history)``.

    Args:
      cfg: a ``PPOConfig``/``GRPOConfig`` (then ``setup`` and ``num_iterations`` are required), or a
        trainer config (``PPOTrainConfig``/``GRPOTrainConfig``/``RLOOTrainConfig`` from
        ``rlhf_jax.rl.trainer``), from which the setup (models, reward source, prompt pool) and the
        iteration count (``cfg.iterations``) are built.
      setup: an :class:`RLSetup`; built from a trainer config when omitted.
      num_iterations: iterations per run (default ``cfg.iterations`` of a trainer config).

    The returned function is un-jitted: wrap it in ``jax.jit`` (single run) or
    ``jax.jit(jax.vmap(train))`` (a sweep). Hyper-parameters are ``PPOHParams``/``GRPOHParams``.
    """
    from rlhf_jax.rl.grpo import grpo_iteration_pure, init_grpo_state
    from rlhf_jax.rl.ppo import init_ppo_state, ppo_iteration_pure

    algo = cfg
    if not isinstance(cfg, (PPOConfig, GRPOConfig)):
        from rlhf_jax.rl.trainer import algorithm_config, build_setup
        setup = build_setup(cfg) if setup is None else setup
        algo = setup.algo if setup.algo is not None else algorithm_config(cfg)
        num_iterations = cfg.iterations if num_iterations is None else num_iterations
    if setup is None or num_iterations is None:
        raise ValueError("make_train(PPOConfig|GRPOConfig, ...) needs setup= and num_iterations=")
    algo.validate()
    prompts = {k: jnp.asarray(v) for k, v in setup.prompts.items()}
    is_ppo = isinstance(algo, PPOConfig)

    def train(hparams, rng):
        if is_ppo:
            state = init_ppo_state(policy_model=setup.policy_model, policy_params=setup.policy_params,
                                   policy_tx=setup.policy_tx, value_model=setup.value_model,
                                   value_params=setup.value_params, value_tx=setup.value_tx, cfg=algo,
                                   hparams=hparams, rng=rng)
        else:
            state = init_grpo_state(policy_model=setup.policy_model, policy_params=setup.policy_params,
                                    policy_tx=setup.policy_tx, cfg=algo, hparams=hparams, rng=rng)

        def one_iteration(state, it):
            key = jax.random.fold_in(rng, it)
            batch = sample_prompt_batch(prompts, algo.batch_size, jax.random.fold_in(key, 0))
            if is_ppo:
                return ppo_iteration_pure(state, setup.frozen, batch, jax.random.fold_in(key, 1), cfg=algo,
                                          hparams=hparams)
            return grpo_iteration_pure(state, setup.frozen, batch, jax.random.fold_in(key, 1), cfg=algo,
                                       hparams=hparams)

        return jax.lax.scan(one_iteration, state, jnp.arange(num_iterations))

    return train


def stack_hparams(cfg, values: dict[str, Any] | None = None, *, num_seeds: int = 1) -> tuple[Any, Any]:
    """Stacked hyper-parameters of a grid ``values`` × ``num_seeds`` seeds.

    ``values`` maps hyper-parameter names to lists (their Cartesian product is the grid); every other
    field keeps the config's value. Returns ``(hparams with a leading axis of num_points · num_seeds,
    seed_index [runs] int32)``; points vary slowest, seeds fastest. Example: β ∈ {0.01, 0.1} × 3
    seeds -> 6 runs.
    """
    import itertools
    cls = {PPOConfig: PPOHParams, GRPOConfig: GRPOHParams}[type(cfg)]
    values = dict(values or {})
    names = list(values)
    grid = list(itertools.product(*(list(values[n]) for n in names))) or [()]
    runs = [cls.from_config(cfg, **dict(zip(names, point))) for point in grid for _ in range(num_seeds)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *runs)
    seeds = np.tile(np.arange(num_seeds, dtype=np.int32), len(grid))
    return stacked, jnp.asarray(seeds)


def sweep_keys(base_seed: int, seed_index: Array) -> Array:
    """One PRNG key per run: ``fold_in(PRNGKey(base_seed), seed_index[i])`` (points share seeds)."""
    base = jax.random.PRNGKey(base_seed)
    return jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.asarray(seed_index))
