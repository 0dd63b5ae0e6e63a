"""rlhf_jax.rl: the RL core and the algorithms on it, the preference methods, and their trainers.

* the core (``rlhf_jax.rl.core``): ``RLState``, ``RLFrozen``, ``init_state``, ``iteration`` (one jitted
  program: rollout, scoring, advantages, epochs × minibatches of updates), ``rollout`` + ``update`` (its
  two halves, for a Python reward), ``make_train`` / ``stack_hparams`` / ``sweep_keys`` (whole runs as a
  pure function for vmapped sweeps), ``RLSetup``;
* online algorithms, each a config class with its traced ``hparams``: ``PPOConfig``/``PPOHParams``
  (``rlhf_jax.rl.ppo``), ``GRPOConfig``/``GRPOHParams`` (GRPO, RLOO, DAPO, GSPO, CISPO, REINFORCE++,
  ``rlhf_jax.rl.grpo``), ``OnlineDPOConfig``/``OnlineDPOHParams`` (``rlhf_jax.rl.online_dpo``);
* preference optimisation: ``DPOConfig``/``DPOHParams``, ``dpo_step``, ``dpo_eval``,
  ``precompute_reference_logps`` (``rlhf_jax.rl.dpo``);
* trainers (through ``training.loop``): ``train_ppo``, ``train_grpo``, ``train_rloo``, ``train_online_dpo`` with
  their configs
  (``rlhf_jax.rl.trainer``), ``train_dpo`` / ``DPOTrainConfig`` (``rlhf_jax.rl.dpo``).
"""
from rlhf_jax.rl.core import (RL_OPTIM, TRACE_COUNTS, RLFrozen, RLSetup, RLState, hparam_fields, init_state,
                              iteration, make_train, rollout, sample_rows, stack_hparams, sweep_keys, update,
                              with_hparams)
from rlhf_jax.rl.dpo import (DPOConfig, DPOFrozen, DPOHParams, DPOTrainConfig, dpo_eval, dpo_step, init_dpo_state,
                             precompute_reference_logps, train_dpo)
from rlhf_jax.rl.grpo import GRPOConfig, GRPOHParams
from rlhf_jax.rl.online_dpo import OnlineDPOConfig, OnlineDPOHParams, preference_labels
from rlhf_jax.rl.ppo import PPOConfig, PPOHParams
from rlhf_jax.rl.experience import Rollout
from rlhf_jax.rl.trainer import (GRPOTrainConfig, OnlineDPOTrainConfig, PPOTrainConfig, RewardSection,
                                 RLOOTrainConfig, RLRunConfig, algorithm_config, build_setup, train_grpo,
                                 train_online_dpo, train_ppo, train_rl, train_rloo)

__all__ = [
    "RL_OPTIM", "TRACE_COUNTS", "RLFrozen", "RLSetup", "RLState", "hparam_fields", "init_state", "iteration",
    "make_train", "rollout", "sample_rows", "stack_hparams", "sweep_keys", "update", "with_hparams",
    "DPOConfig", "DPOFrozen", "DPOHParams", "DPOTrainConfig", "dpo_eval", "dpo_step", "init_dpo_state",
    "precompute_reference_logps", "train_dpo", "GRPOConfig", "GRPOHParams", "PPOConfig", "PPOHParams", "Rollout",
    "GRPOTrainConfig", "PPOTrainConfig", "RewardSection", "RLOOTrainConfig", "RLRunConfig", "algorithm_config",
    "build_setup", "train_grpo", "train_ppo", "train_rl", "train_rloo", "OnlineDPOConfig", "OnlineDPOHParams",
    "OnlineDPOTrainConfig", "preference_labels", "train_online_dpo",
]
