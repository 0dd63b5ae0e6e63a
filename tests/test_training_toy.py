"""A self-contained toy LM + token loss for the generic training machinery, and its tests.

Other training tests (and their subprocess scripts) import ``ToyLM``,
``toy_sum_fn``, ``toy_batch`` and ``toy_step`` from here, so the machinery
(accumulation, meshes, pmap, multi-host) is tested independently of the real
models and losses.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.training import optim, steps
from rlhf_jax.training.state import TrainState

VOCAB, D, T = 32, 16, 8


class ToyLM(nn.Module):
    vocab: int = VOCAB
    d: int = D

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d, name="embed")(ids)
        x = nn.LayerNorm(name="ln")(x)
        x = jnp.tanh(nn.Dense(self.d * 2, name="mlp")(x))
        return nn.Dense(self.vocab, name="head")(x)


def toy_sum_fn(params, batch, rng, *, apply_fn):
    """Token cross-entropy summed over masked tokens; count = #tokens."""
    logits = apply_fn(params, batch["input_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), {"loss": (jnp.sum(nll * mask), jnp.sum(mask)),
                                 "seqs": (jnp.sum(jnp.any(mask > 0, -1)), jnp.float32(batch["input_ids"].shape[0]))}


def toy_step(state, batch, *, cfg, axis_name=None):
    """``cfg`` = micro-batch count (an int: static and hashable)."""
    fn = functools.partial(toy_sum_fn, apply_fn=state.apply_fn)
    return steps.update_step(state, batch, fn, micro_batches=cfg, axis_name=axis_name)


def toy_batch(seed, b=8, t=T, vocab=VOCAB):
    """Rows with DIFFERENT token counts, so an unweighted mean of means would differ."""
    r = np.random.RandomState(seed)
    ids = r.randint(0, vocab, size=(b, t)).astype(np.int32)
    lens = r.randint(1, t + 1, size=(b,))
    mask = (np.arange(t)[None, :] < lens[:, None]).astype(np.int32)
    return {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "loss_mask": mask}


def toy_state(seed=0, lr=1e-2, **optim_kw):
    model = ToyLM()
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, T), jnp.int32))
    ocfg = optim.OptimConfig(learning_rate=lr, warmup_steps=2, schedule="cosine",
                             weight_decay=0.01, **optim_kw)
    tx = optim.make_optimizer(ocfg, params, total_steps=10)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=seed)


def test_accumulation_equals_big_batch():
    """4 micro-batches with unequal token counts == one big batch, for loss, grads, params."""
    batch = toy_batch(0)
    s1, s4 = toy_state(), toy_state()
    f1 = jax.jit(functools.partial(toy_step, cfg=1))
    f4 = jax.jit(functools.partial(toy_step, cfg=4))
    for i in range(3):
        s1, m1 = f1(s1, toy_batch(i))
        s4, m4 = f4(s4, toy_batch(i))
        np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
        assert float(m1["count"]) == float(toy_batch(i)["loss_mask"].sum())
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s4.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # the naive mean of per-micro-batch means is a different number: the test can fail
    micro = steps.split_micro_batches(batch, 4)
    st = toy_state()
    means = [toy_sum_fn(st.params, jax.tree_util.tree_map(lambda x: x[i], micro), None,
                        apply_fn=st.apply_fn)[1]["loss"] for i in range(4)]
    naive = np.mean([float(s) / float(c) for s, c in means])
    _, m = jax.jit(functools.partial(toy_step, cfg=1))(toy_state(), batch)
    assert abs(naive - float(m["loss"])) > 1e-4


def test_loss_is_token_weighted_mean():
    st = toy_state()
    b = toy_batch(3)
    logits = st.apply_fn(st.params, b["input_ids"])
    nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]))
    want = (nll * b["loss_mask"]).sum() / b["loss_mask"].sum()
    _, m = jax.jit(functools.partial(toy_step, cfg=2))(st, b)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-6)


def test_step_compiles_once_and_donates():
    traces = []

    def counted(state, batch, *, cfg):
        traces.append(1)
        return toy_step(state, batch, cfg=cfg)

    f = jax.jit(functools.partial(counted, cfg=2), donate_argnums=0)
    st = toy_state()
    old = st.params["params"]["head"]["kernel"]
    for i in range(3):
        st, _ = f(st, toy_batch(i))
    assert len(traces) == 1
    assert int(st.step) == 3
    if jax.default_backend() != "cpu":  # CPU ignores donation
        assert old.is_deleted()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
