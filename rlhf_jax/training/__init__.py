"""rlhf_jax.training: train states, optimisers, meshes, steps, checkpoints, metrics, trainers.

Heavy trainer modules (``sft``, ``reward``) import the data layer; import them directly
(``from rlhf_jax.training.sft import train_sft``) or through the names below.
"""
from rlhf_jax.training.checkpoint import CheckpointConfig, CheckpointManager, Restored
from rlhf_jax.training.configs import MeshConfig, ModelSection
from rlhf_jax.training.distributed import init_distributed, is_main_process
from rlhf_jax.training.loop import TrainResult
from rlhf_jax.training.mesh import (batch_sharding, make_mesh, param_sharding, pmap_step, put_batch,
                                    replicate, shard_state, split_for_pmap, state_sharding,
                                    unreplicate)
from rlhf_jax.training.metrics import (LogConfig, MetricsWriter, NonFiniteError, ProgressBar,
                                       check_finite, read_jsonl)
from rlhf_jax.training.optim import (OptimConfig, current_learning_rate, decay_mask, get_hyperparam,
                                     make_optimizer, schedule_factor, set_hyperparam, trainable_mask)
from rlhf_jax.training.state import TrainState
from rlhf_jax.training.steps import accumulate_gradients, reduce_sums, update_step

_LAZY = {"SFTConfig": "sft", "SFTStepConfig": "sft", "sft_step": "sft", "train_sft": "sft",
         "RewardConfig": "reward", "RewardStepConfig": "reward", "reward_step": "reward",
         "train_reward": "reward", "load_reward_shift": "reward"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"rlhf_jax.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'rlhf_jax.training' has no attribute {name!r}")


__all__ = [
    "CheckpointConfig", "CheckpointManager", "Restored", "MeshConfig", "ModelSection",
    "init_distributed", "is_main_process", "TrainResult", "batch_sharding", "make_mesh",
    "param_sharding", "pmap_step", "put_batch", "replicate", "shard_state", "split_for_pmap",
    "state_sharding", "unreplicate", "LogConfig", "MetricsWriter", "NonFiniteError", "ProgressBar",
    "check_finite", "read_jsonl", "OptimConfig", "current_learning_rate", "decay_mask",
    "get_hyperparam", "make_optimizer", "schedule_factor", "set_hyperparam", "trainable_mask",
    "TrainState", "accumulate_gradients", "reduce_sums", "update_step", *_LAZY,
]
