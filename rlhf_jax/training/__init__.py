"""rlhf_jax.training: train states, optimisers, meshes, steps, checkpoints, metrics, trainers."""
from rlhf_jax.training.mesh import (batch_sharding, make_mesh, pmap_step, put_batch, shard_state,
                                    state_sharding)
from rlhf_jax.training.optim import (OptimConfig, decay_mask, get_hyperparam, make_optimizer,
                                     set_hyperparam, trainable_mask)
from rlhf_jax.training.state import TrainState
from rlhf_jax.training.steps import accumulate_gradients, update_step
from rlhf_jax.training.distributed import init_distributed
