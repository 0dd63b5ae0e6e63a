"""rlhf_jax.rl: PPO with a KL penalty, GRPO, RLOO and DPO on the shared rollout machinery.

Public API (see docs/DESIGN.md, section "RL"):

* configs: ``PPOConfig``/``PPOHParams``, ``GRPOConfig``/``GRPOHParams``, ``DPOConfig``/``DPOHParams``;
* PPO: ``PPOState``, ``PPOFrozen``, ``init_ppo_state``, ``ppo_iteration`` (one jitted program),
  ``ppo_rollout`` + ``ppo_update`` (the two halves, for a Python reward), ``ppo_iteration_pure``;
* GRPO/RLOO: ``init_grpo_state``, ``grpo_iteration``, ``rloo_iteration``, ``grpo_rollout``, ``grpo_update``;
* DPO: ``DPOFrozen``, ``init_dpo_state``, ``dpo_step``, ``dpo_eval``, ``precompute_reference_logps``;
* sweeps: ``make_train`` (pure ``train(hparams, rng)`` for ``jax.jit(jax.vmap(train))``),
  ``RLSetup``, ``stack_hparams``, ``sweep_keys``;
* host loops: ``train_ppo``, ``train_grpo``, ``train_rloo``, ``train_dpo`` (``rlhf_jax.rl.trainer``).
"""
from rlhf_jax.rl.config import (DPOConfig, DPOHParams, GRPOConfig, GRPOHParams, PPOConfig, PPOHParams,
                                static_part)
from rlhf_jax.rl.dpo import DPOFrozen, dpo_eval, dpo_step, init_dpo_state, precompute_reference_logps
from rlhf_jax.rl.grpo import (grpo_iteration, grpo_iteration_pure, grpo_rollout, grpo_update, init_grpo_state,
                              rloo_iteration)
from rlhf_jax.rl.ppo import (TRACE_COUNTS, PPOFrozen, PPOState, init_ppo_state, ppo_iteration,
                             ppo_iteration_pure, ppo_rollout, ppo_update)
from rlhf_jax.rl.rollout import Rollout
from rlhf_jax.rl.sweep import RLSetup, make_train, stack_hparams, sweep_keys


def __getattr__(name):
    # The host loops pull in data/tasks/checkpointing; import them lazily.
    if name in ("train_ppo", "train_grpo", "train_rloo", "train_dpo"):
        from rlhf_jax.rl import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'rlhf_jax.rl' has no attribute {name!r}")
