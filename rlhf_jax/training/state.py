"""Immutable train state: one pytree in, one pytree out of every step."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Params + optimizer state + step + PRNG key of one trained model.

    ``apply_fn`` (the model's ``apply``) and ``tx`` (the optax transformation) are
    static: they are part of the tree structure, not leaves, so a jitted step
    taking the state compiles once per (model, optimiser). ``rng`` is a raw
    ``uint32[2]`` key; per-step keys are derived as ``fold_in(rng, step)``, so the
    key never needs threading and a resumed run draws the same numbers.
    Policy, value and reward models each get their own ``TrainState``.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: Any = struct.field(pytree_node=False)  # optax transformation (``training.make_optimizer``)

    @classmethod
    def create(cls, *, apply_fn: Callable, params: Any, tx: Any,
               rng: jax.Array | int = 0) -> "TrainState":
        if isinstance(rng, int):
            rng = jax.random.PRNGKey(rng)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jnp.asarray(rng), apply_fn=apply_fn, tx=tx)

    def apply_gradients(self, grads: Any, lr: jax.Array | float | None = None) -> "TrainState":
        """One optimiser update; ``step`` counts updates.

        ``lr``: when given, the optimiser's update is multiplied by it (``p ← p + lr · u``). The RL
        trainers build their optimiser with a unit learning rate and pass their traced rate here, so
        a sweep over the rate changes an argument of the update, never the optimiser state.
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        if lr is not None:
            updates = jax.tree_util.tree_map(lambda u: (jnp.asarray(lr, jnp.float32) * u).astype(u.dtype), updates)
        params = optax.apply_updates(self.params, updates)
        frozen = getattr(self.tx, "frozen", ())
        if any(frozen):  # frozen leaves (e.g. a LoRA base) pass through: no p + 0 write, never batched by vmap
            old, tree = jax.tree_util.tree_flatten(self.params)
            params = jax.tree_util.tree_unflatten(
                tree, [o if f else n for o, n, f in zip(old, jax.tree_util.tree_leaves(params), frozen)])
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)

    def step_rng(self) -> jax.Array:
        """The key for the current step: ``fold_in(rng, step)``."""
        return jax.random.fold_in(self.rng, self.step)

    def arrays(self) -> dict[str, Any]:
        """The leaves to checkpoint (everything but the static functions)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "rng": self.rng}

    def with_arrays(self, tree: dict[str, Any]) -> "TrainState":
        """Inverse of ``arrays()``: a state with restored leaves."""
        return self.replace(step=tree["step"], params=tree["params"],
                            opt_state=tree["opt_state"], rng=tree["rng"])
