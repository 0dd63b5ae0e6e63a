"""Optimisers: AdamW with warmup + cosine/linear decay, clipping, decay and trainable masks.

The peak learning rate and the weight decay are *traced* hyper-parameters
(``optax.inject_hyperparams``): they live in the optimizer state as arrays, so
a sweep changes them without recompiling, and ``jax.vmap`` can map over them
(``set_hyperparam(opt_state, "learning_rate", lr)``). The schedule is applied as
a separate multiplicative factor ``s(t) ∈ [0, 1]``, so the effective rate is

    lr(t) = peak_lr · s(t),  s(t) = t/W for t < W, then
            cosine:  m + (1-m)·½(1 + cos(π·(t-W)/(T-W)))
            linear:  1 - (1-m)·(t-W)/(T-W)
            constant: 1

with W warmup steps, T total steps, m = ``min_lr_ratio``. AdamW's decoupled weight
decay is scaled by the same factor, exactly as ``optax.adamw(schedule)`` does.

Parameter partitioning (LoRA-ready): ``trainable`` is a pytree of bools shaped
like the params (or a predicate on the key path); frozen leaves get a zero
update and no optimizer moments (``optax.multi_transform`` with ``set_to_zero``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.config import ConfigError
from rlhf_jax.models import lora

Schedule = Literal["cosine", "linear", "constant"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + schedule + clipping. ``total_steps`` = 0 means "the trainer's step count"."""
    learning_rate: float = 3e-4  # peak learning rate (traced: a sweep changes it without recompiling)
    schedule: Schedule = "cosine"  # decay after warmup: cosine|linear|constant
    warmup_steps: int = 0  # linear warmup from 0 to the peak rate over this many steps
    total_steps: int = 0  # schedule horizon (0 = the trainer's step count)
    min_lr_ratio: float = 0.1  # the rate decays to min_lr_ratio · peak
    b1: float = 0.9  # Adam β1
    b2: float = 0.95  # Adam β2
    eps: float = 1e-8  # Adam ε
    weight_decay: float = 0.0  # AdamW decoupled weight decay (not on biases, norms or embeddings)
    max_grad_norm: float = 1.0  # 0 disables clipping
    # regexes on the '/'-joined param path; matching leaves are frozen (LoRA-style partitioning)
    freeze: tuple[str, ...] = ()
    state_dtype: str = "float32"  # dtype Adam's moments are stored in (bfloat16 halves the optimiser state)

    def validate(self, prefix: str = "optim.") -> None:
        if not self.learning_rate >= 0:
            raise ConfigError(f"config key {prefix + 'learning_rate'!r}: must be >= 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ConfigError(f"config key {prefix + 'warmup_steps'!r}: must be >= 0, got {self.warmup_steps}")
        if self.total_steps < 0:
            raise ConfigError(f"config key {prefix + 'total_steps'!r}: must be >= 0, got {self.total_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config key {prefix + 'min_lr_ratio'!r}: must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"config key {prefix + 'max_grad_norm'!r}: must be >= 0, got {self.max_grad_norm}")
        if self.weight_decay < 0:
            raise ConfigError(f"config key {prefix + 'weight_decay'!r}: must be >= 0, got {self.weight_decay}")
        if self.state_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"config key {prefix + 'state_dtype'!r}: expected float32|bfloat16, got {self.state_dtype!r}")
        for i, pattern in enumerate(self.freeze):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"config key {prefix}freeze[{i}]: bad regex {pattern!r}: {e}") from None


def schedule_factor(cfg: OptimConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """``s(t)``: the multiplicative schedule in [0, 1] (see the module docstring)."""
    total = max(int(cfg.total_steps or total_steps), 1)
    warm = int(cfg.warmup_steps)
    m = float(cfg.min_lr_ratio)
    decay_len = max(total - warm, 1)

    def factor(count):
        t = jnp.asarray(count, jnp.float32)
        warm_f = jnp.where(warm > 0, jnp.minimum((t + 1.0) / max(warm, 1), 1.0), 1.0)
        frac = jnp.clip((t - warm) / decay_len, 0.0, 1.0)
        if cfg.schedule == "cosine":
            decay = m + (1.0 - m) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif cfg.schedule == "linear":
            decay = 1.0 - (1.0 - m) * frac
        else:
            decay = jnp.ones_like(t)
        return jnp.where(t < warm, warm_f, decay)

    return factor


def path_str(path) -> str:
    """'/'-joined names of a key path (dict keys, attribute names, indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


_NO_DECAY = re.compile(r"(^|/)(bias|scale|embedding|wte|wpe|embed_tokens|ln_\w*|\w*norm\w*)(/|$)",
                       re.IGNORECASE)


def decay_mask(params) -> Any:
    """True where weight decay applies: matrices (ndim >= 2) that are not embeddings or norms.

    Biases and norm scales (ndim 1) and embedding tables (path names ``embedding``,
    ``wte``, ``wpe``, ``embed_tokens``) are never decayed.
    """
    def rule(path, leaf):
        name = path_str(path)
        return bool(getattr(leaf, "ndim", 0) >= 2 and not _NO_DECAY.search(name))
    return jax.tree_util.tree_map_with_path(rule, params)


def trainable_mask(params, freeze: tuple[str, ...] = ()) -> Any:
    """True on trainable leaves: those whose path matches none of the ``freeze`` regexes."""
    pats = [re.compile(p) for p in freeze]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(path_str(path)) for p in pats), params)


@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
    """An optax transformation that is equal to every other one built from the same inputs.

    ``make_optimizer`` returns one. ``TrainState.tx`` is a static part of a jitted step, so two
    runs whose optimisers are built from equal configs (same ``OptimConfig``, horizon and parameter
    structure) hit the same compiled program: no process-wide cache of optimiser objects is needed.
    ``init``/``update`` are those of the wrapped ``optax.GradientTransformation``.
    """
    key: tuple
    tx: optax.GradientTransformation
    # per leaf of the params (tree_leaves order): True where the leaf is frozen (``TrainState.apply_gradients``
    # then passes it through untouched: no write, and under ``jax.vmap`` it stays unbatched)
    frozen: tuple[bool, ...] = ()

    def init(self, params):
        return self.tx.init(params)

    def update(self, updates, state, params=None):
        return self.tx.update(updates, state, params)

    def __eq__(self, other) -> bool:
        return isinstance(other, Optimizer) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def _structure_key(params, trainable) -> tuple:
    """What the masks are built from: every leaf's path, rank and trainable flag."""
    ranks = jax.tree_util.tree_map_with_path(lambda p, x: (path_str(p), int(getattr(x, "ndim", 0))), params)
    return (tuple(jax.tree_util.tree_leaves(ranks, is_leaf=lambda x: isinstance(x, tuple))),
            tuple(bool(t) for t in jax.tree_util.tree_leaves(trainable)))


def scale_by_adam_in(state_dtype, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                     ) -> optax.GradientTransformation:
    """Adam's bias-corrected ``m̂ / (sqrt(v̂) + eps)`` with the moments STORED in ``state_dtype`` (e.g.
    bfloat16) and every step computed in float32 (each moment is read, updated in f32, rounded once)."""
    dt = jnp.dtype(state_dtype)
    f32 = jnp.float32

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), dt)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree_util.tree_map(zeros, params),
                                      nu=jax.tree_util.tree_map(zeros, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        mu = jax.tree_util.tree_map(lambda g, m: b1 * m.astype(f32) + (1 - b1) * g.astype(f32), updates, state.mu)
        nu = jax.tree_util.tree_map(lambda g, v: b2 * v.astype(f32) + (1 - b2) * jnp.square(g.astype(f32)),
                                    updates, state.nu)
        c1 = 1 - jnp.asarray(b1, f32) ** count.astype(f32)
        c2 = 1 - jnp.asarray(b2, f32) ** count.astype(f32)
        out = jax.tree_util.tree_map(lambda g, m, v: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype),
                                     updates, mu, nu)
        cast = lambda t: jax.tree_util.tree_map(lambda x: x.astype(dt), t)  # noqa: E731
        return out, optax.ScaleByAdamState(count=count, mu=cast(mu), nu=cast(nu))

    return optax.GradientTransformation(init, update)


def _adamw_in(learning_rate, b1, b2, eps, weight_decay, mask, state_dtype) -> optax.GradientTransformation:
    """``optax.adamw`` with its moments stored in ``state_dtype``."""
    return optax.chain(scale_by_adam_in(state_dtype, b1, b2, eps),
                       optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))


def _adamw_chain(cfg: OptimConfig, total_steps: int, mask) -> optax.GradientTransformation:
    if cfg.state_dtype == "float32":
        adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
            mask=mask)
    else:
        adamw = optax.inject_hyperparams(_adamw_in, static_args=("mask", "state_dtype"))(
            learning_rate=cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
            mask=mask, state_dtype=cfg.state_dtype)
    return optax.chain(*(
        ([optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []) + [
            adamw,
            optax.scale_by_schedule(schedule_factor(cfg, total_steps)),
        ]))


def make_optimizer(cfg: OptimConfig, params, *, total_steps: int,
                   trainable: Any | None = None) -> Optimizer:
    """AdamW with clipping, decay mask, injected lr/weight-decay and a schedule factor.

    Args:
      cfg: the optimiser section.
      params: a params pytree (or its abstract shapes); only its structure and
        ranks are used, to build the decay and trainable masks.
      total_steps: horizon of the schedule when ``cfg.total_steps`` is 0.
      trainable: optional bool pytree shaped like ``params``; defaults to
        ``trainable_mask(params, cfg.freeze)``.

    The RL trainers build it with ``learning_rate=1`` and scale each update by their traced
    rate (``TrainState.apply_gradients(grads, lr)``), so the rate never has to be written
    into the optimiser state.
    """
    cfg.validate()
    dmask = decay_mask(params)
    if trainable is None:
        trainable = trainable_mask(params, cfg.freeze)
        if lora.is_lora_params(params):  # a LoRA model trains its adapters (and scalar heads) only
            trainable = jax.tree_util.tree_map(lambda a, b: bool(a and b), trainable, lora.trainable_mask(params))
    key = (cfg, int(total_steps), jax.tree_util.tree_structure(params), _structure_key(params, trainable))
    leaves = jax.tree_util.tree_leaves(trainable)
    if all(leaves):
        return Optimizer(key, _adamw_chain(cfg, total_steps, dmask))
    if not any(leaves):
        raise ValueError("optim.freeze: every parameter is frozen; nothing to train")
    # Frozen leaves' decay mask would be applied to a masked tree, so rebuild the
    # adamw mask over the trainable subtree only.
    train_tx = _adamw_chain(cfg, total_steps, lambda p: _masked_like(p, dmask))
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable)
    return Optimizer(key, optax.multi_transform({"train": train_tx, "freeze": optax.set_to_zero()}, labels),
                     frozen=tuple(not t for t in leaves))


def _masked_like(masked_tree, full_mask):
    """The part of ``full_mask`` at the positions of ``masked_tree`` (MaskedNode elsewhere)."""
    return jax.tree_util.tree_map(
        lambda m, d: m if isinstance(m, optax.MaskedNode) else d,
        masked_tree, full_mask, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def _is_hp_state(x) -> bool:
    # optax.InjectHyperparamsState / InjectStatefulHyperparamsState (the class differs by version)
    return isinstance(x, tuple) and hasattr(x, "_fields") and "hyperparams" in x._fields


def _hyperparam_states(opt_state):
    return [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_hp_state) if _is_hp_state(s)]


def has_hyperparam(opt_state, name: str) -> bool:
    """Whether the optimiser state carries the injected hyper-parameter ``name``."""
    states = _hyperparam_states(opt_state)
    return bool(states) and name in states[0].hyperparams


def get_hyperparam(opt_state, name: str) -> jax.Array:
    """The traced hyper-parameter ``name`` (e.g. ``learning_rate``, the PEAK rate)."""
    states = _hyperparam_states(opt_state)
    if not states:
        raise KeyError("optimizer state has no injected hyper-parameters")
    if name not in states[0].hyperparams:
        raise KeyError(f"unknown hyper-parameter {name!r}; have {sorted(states[0].hyperparams)}")
    return states[0].hyperparams[name]


def set_hyperparam(opt_state, name: str, value) -> Any:
    """A copy of ``opt_state`` with the injected hyper-parameter ``name`` set to ``value``.

    ``value`` may be a tracer (inside ``jax.vmap``/``jax.jit``): nothing recompiles.
    """
    found = []

    def upd(s):
        if _is_hp_state(s):
            if name not in s.hyperparams:
                raise KeyError(f"unknown hyper-parameter {name!r}; have {sorted(s.hyperparams)}")
            found.append(True)
            hp = dict(s.hyperparams)
            hp[name] = jnp.asarray(value, dtype=jnp.asarray(hp[name]).dtype)
            return s._replace(hyperparams=hp)
        return s

    out = jax.tree_util.tree_map(upd, opt_state, is_leaf=_is_hp_state)
    if not found:
        raise KeyError("optimizer state has no injected hyper-parameters")
    return out


def current_learning_rate(cfg: OptimConfig, opt_state, step, total_steps: int) -> jax.Array:
    """Effective rate ``peak_lr · s(step)`` of the update made at ``step``."""
    return get_hyperparam(opt_state, "learning_rate") * schedule_factor(cfg, total_steps)(step)
