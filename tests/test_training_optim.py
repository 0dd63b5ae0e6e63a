"""Optimiser: schedule values, decay and trainable masks, traced (vmappable) learning rate."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.training import optim
from rlhf_jax.training.state import TrainState
from tests.test_training_toy import ToyLM, T, toy_batch, toy_state, toy_step


def test_schedule_factor_hand_values():
    cfg = optim.OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    f = optim.schedule_factor(cfg, total_steps=14)
    got = [float(f(t)) for t in (0, 1, 3, 4, 9, 14, 20)]
    want = [0.25, 0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), 0.1, 0.1]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    lin = optim.schedule_factor(optim.OptimConfig(schedule="linear", min_lr_ratio=0.0), 10)
    np.testing.assert_allclose([float(lin(t)) for t in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-7)
    const = optim.schedule_factor(optim.OptimConfig(schedule="constant", warmup_steps=2), 10)
    np.testing.assert_allclose([float(const(t)) for t in (0, 1, 2, 9)], [0.5, 1.0, 1.0, 1.0])


def test_adamw_update_matches_optax_with_schedule():
    """Our chain (clip off) == optax.adamw with the schedule lr(t) = peak * s(t), decay masked."""
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.ones((3,))}
    cfg = optim.OptimConfig(learning_rate=0.1, warmup_steps=2, weight_decay=0.3, max_grad_norm=0.0,
                            schedule="linear", min_lr_ratio=0.0)
    ours = optim.make_optimizer(cfg, params, total_steps=5)
    sched = lambda t: 0.1 * optim.schedule_factor(cfg, 5)(t)  # noqa: E731
    ref = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.3,
                      mask={"w": True, "b": False})
    s1, s2 = ours.init(params), ref.init(params)
    p1 = p2 = params
    for t in range(4):
        g = jax.tree_util.tree_map(lambda x: jnp.sin(x * (t + 1)), p1)
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_decay_mask_excludes_norms_biases_embeddings():
    params = ToyLM().init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))
    mask = optim.decay_mask(params)["params"]
    assert mask["mlp"]["kernel"] and mask["head"]["kernel"]
    assert not mask["mlp"]["bias"] and not mask["ln"]["scale"] and not mask["ln"]["bias"]
    assert not mask["embed"]["embedding"]


def test_frozen_leaves_do_not_move_and_have_no_moments():
    st = toy_state(freeze=("embed", "ln/"))
    f = jax.jit(functools.partial(toy_step, cfg=1))
    st2, _ = f(st, toy_batch(0))
    st2, _ = f(st2, toy_batch(1))
    p0, p2 = st.params["params"], st2.params["params"]
    np.testing.assert_array_equal(p0["embed"]["embedding"], p2["embed"]["embedding"])
    np.testing.assert_array_equal(p0["ln"]["scale"], p2["ln"]["scale"])
    assert not np.allclose(p0["head"]["kernel"], p2["head"]["kernel"])
    # no Adam moments are allocated for frozen leaves
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(st.opt_state))
    full = toy_state()
    n_full = sum(x.size for x in jax.tree_util.tree_leaves(full.opt_state))
    n_embed = p0["embed"]["embedding"].size + p0["ln"]["scale"].size + p0["ln"]["bias"].size
    assert n_full - n_state == 2 * n_embed
    # the learning rate is still reachable through the partition
    assert float(optim.get_hyperparam(st.opt_state, "learning_rate")) == pytest.approx(1e-2)


def test_learning_rate_is_traced_and_vmappable():
    """Changing lr does not retrace; vmap over two lrs == two separate runs."""
    traces = []

    def step(state, batch, lr):
        traces.append(1)
        state = state.replace(opt_state=optim.set_hyperparam(state.opt_state, "learning_rate", lr))
        return toy_step(state, batch, cfg=1)

    f = jax.jit(step)
    base = toy_state()
    batch = toy_batch(0)
    a, _ = f(base, batch, 1e-2)
    b, _ = f(base, batch, 3e-2)
    assert len(traces) == 1
    assert not np.allclose(a.params["params"]["head"]["kernel"], b.params["params"]["head"]["kernel"])
    vm = jax.jit(jax.vmap(step, in_axes=(None, None, 0)))(base, batch, jnp.array([1e-2, 3e-2]))[0]
    for i, ref in enumerate((a, b)):
        for x, y in zip(jax.tree_util.tree_leaves(ref.params),
                        jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda v: v[i], vm.params))):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_clipping_bounds_the_update_direction():
    """clip_by_global_norm rescales to the bound (hand case), and the step reports grad_norm
    BEFORE clipping (it exceeds a tiny max_grad_norm)."""
    tx = optax.clip_by_global_norm(0.5)
    g = {"a": jnp.array([3.0, 4.0])}
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["a"], [0.3, 0.4], rtol=1e-6)
    st = toy_state(max_grad_norm=1e-3)
    _, m = jax.jit(functools.partial(toy_step, cfg=1))(st, toy_batch(0))
    assert float(m["grad_norm"]) > 1e-2  # unclipped norm


def test_optim_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        optim.OptimConfig(min_lr_ratio=2.0).validate()
    with pytest.raises(ConfigError, match="optim.freeze"):
        optim.OptimConfig(freeze=("(",)).validate()
    params = {"a": jnp.ones(2)}
    with pytest.raises(ValueError, match="every parameter is frozen"):
        optim.make_optimizer(optim.OptimConfig(freeze=("a",)), params, total_steps=1)


def test_train_state_create_and_apply():
    model = ToyLM()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))
    st = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.5), rng=3)
    g = jax.tree_util.tree_map(jnp.ones_like, params)
    st2 = st.apply_gradients(g)
    assert int(st2.step) == 1 and int(st.step) == 0
    np.testing.assert_allclose(st2.params["params"]["head"]["bias"],
                               params["params"]["head"]["bias"] - 0.5)
    np.testing.assert_array_equal(st.rng, jax.random.PRNGKey(3))
    assert not np.array_equal(st.step_rng(), st2.step_rng())
