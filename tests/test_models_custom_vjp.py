"""The hand-written backward passes of the model (``linear``, ``attention_core``) and of the
token log-prob loss equal JAX autodiff of the plain formulas."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import sft_loss
from rlhf_jax.models.transformer import attention_core, cpu_weight_grad_transposes_first, linear


def _plain_attention(q, k, v, allowed, scale):
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(allowed[:, None, None, :, :], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v)


@pytest.mark.parametrize("groups", [1, 2])
def test_attention_core_value_and_grads_match_autodiff(groups):
    b, t, kh, d = 2, 6, 2, 8
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, kh, groups, d))
    k = jax.random.normal(ks[1], (b, t, kh, d))
    v = jax.random.normal(ks[2], (b, t, kh, d))
    causal = jnp.tril(jnp.ones((t, t), bool))
    valid = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)  # row 0 left-padded: pad queries see nothing
    allowed = causal[None] & valid[:, None, :]
    w = jax.random.normal(ks[3], (b, t, kh, groups, d))
    f_custom = lambda q, k, v: jnp.sum(w * attention_core(q, k, v, allowed, 0.3))  # noqa: E731
    f_plain = lambda q, k, v: jnp.sum(w * _plain_attention(q, k, v, allowed, 0.3))  # noqa: E731
    np.testing.assert_allclose(f_custom(q, k, v), f_plain(q, k, v), rtol=1e-5)
    got = jax.grad(f_custom, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(f_plain, argnums=(0, 1, 2))(q, k, v)
    for g1, g2 in zip(got, want):
        assert np.all(np.isfinite(np.asarray(g1)))
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=2e-5, rtol=1e-4)


def test_linear_grads_match_autodiff_including_f32_output():
    ks = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(ks[0], (3, 5, 7))
    w = jax.random.normal(ks[1], (7, 4))
    g = jax.random.normal(ks[2], (3, 5, 4))
    for out_dtype in (None, jnp.float32):
        got = jax.grad(lambda x, w: jnp.sum(g * linear(x, w, out_dtype)), argnums=(0, 1))(x, w)
        want = jax.grad(lambda x, w: jnp.sum(g * jnp.einsum("btk,kn->btn", x, w)), argnums=(0, 1))(x, w)
        for a, b_ in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-5)
    # bf16 compute: gradients come back in the input dtypes
    gx, gw = jax.grad(lambda x, w: jnp.sum(linear(x, w, jnp.float32)), argnums=(0, 1))(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16


@pytest.mark.parametrize("k,n", [(8, 4096), (1024, 64), (16, 24)])
def test_linear_weight_grad_equals_autodiff_in_both_cpu_orientations(k, n):
    """On CPU the weight gradient of some kernel shapes contracts a copied-out ``x2ᵀ``
    (``cpu_weight_grad_transposes_first``): the same product as autodiff's, jitted and vmapped."""
    assert cpu_weight_grad_transposes_first(k, n) == ((k, n) != (16, 24))
    ks = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(ks[0], (2, 16, k))
    w = jax.random.normal(ks[1], (k, n)) / np.sqrt(k)
    g = jax.random.normal(ks[2], (2, 16, n))
    f = lambda x, w: jnp.sum(g * linear(x, w))  # noqa: E731
    ref = lambda x, w: jnp.sum(g * jnp.einsum("btk,kn->btn", x, w))  # noqa: E731
    got = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    want = jax.grad(ref, argnums=(0, 1))(x, w)
    for a, b_ in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-5)
    # vmapped over two kernels (a sweep's runs axis)
    ws = jnp.stack([w, 2 * w])
    got_v = jax.jit(jax.vmap(jax.grad(f, argnums=1), in_axes=(None, 0)))(x, ws)
    want_v = jnp.stack([jax.grad(ref, argnums=1)(x, wi) for wi in ws])
    np.testing.assert_allclose(np.asarray(got_v), np.asarray(want_v), rtol=1e-5, atol=1e-5)
    # the reoriented product is lowered for CPU only: another platform gets the plain contraction
    traced = jax.jit(jax.grad(f, argnums=1)).trace(x, w)
    for platform in ("cpu", "cuda", "tpu"):
        hlo = traced.lower(lowering_platforms=(platform,)).as_text()
        assert ("optimization_barrier" in hlo) == (platform == "cpu" and cpu_weight_grad_transposes_first(k, n))


def test_token_logprob_grad_matches_autodiff_and_ignores_nonfinite_padding():
    ks = jax.random.split(jax.random.key(2), 2)
    logits = jax.random.normal(ks[0], (2, 4, 11)) * 3
    targets = jax.random.randint(ks[1], (2, 4), 0, 11)
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)

    def plain(lg):
        lp = jax.nn.log_softmax(lg, axis=-1)
        nll = -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * mask) / jnp.sum(mask)

    got = jax.grad(lambda lg: sft_loss(lg, targets, mask)[0])(logits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.grad(plain)(logits)), atol=1e-6)
    bad = logits.at[0, 3].set(jnp.nan).at[0, 2, 0].set(jnp.inf)
    loss, _ = sft_loss(bad, targets, mask)
    g = jax.grad(lambda lg: sft_loss(lg, targets, mask)[0])(bad)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[0, 2:] == 0.0)
