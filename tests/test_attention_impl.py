"""`ModelConfig.attention_impl`: the blocked attention equals `attention_core` (forward and gradients,
f32 on CPU) under every mask the model builds, whole models give the same loss and gradients with
either implementation, and the option is validated, resolved per platform and carried through
loading."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM, ScalarHeadModel, from_pretrained, init_params, save_pretrained, tiny_config
from rlhf_jax.models.transformer import (_block_plan, attention, attention_core, blocked_attention,
                                         resolve_attention_impl)


def _allowed(valid, t, window=None, segments=None):
    """The model's mask: causal over T = S slots, pads never keys, optional window and segments."""
    slot = jnp.arange(t)
    allowed = (slot[None, :] <= slot[:, None])[None] & valid[:, None, :]
    if window is not None:
        allowed &= (slot[:, None] - slot[None, :] < window)[None]
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]
    return allowed


def _qkv(seed, b, t, kh, g, d):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, kh, g, d))
    k = jax.random.normal(ks[1], (b, t, kh, d))
    v = jax.random.normal(ks[2], (b, t, kh, d))
    w = jax.random.normal(ks[3], (b, t, kh, g, d))  # a random cotangent
    return q, k, v, w


def _compare(q, k, v, w, allowed, block, causal, window):
    scale = q.shape[-1] ** -0.5
    ref = lambda q, k, v: jnp.sum(w * attention_core(q, k, v, allowed, scale))  # noqa: E731
    blk = lambda q, k, v: jnp.sum(w * blocked_attention(q, k, v, allowed, scale, block, causal, window))  # noqa: E731
    o_ref = attention_core(q, k, v, allowed, scale)
    o_blk = blocked_attention(q, k, v, allowed, scale, block, causal, window)
    assert np.all(np.isfinite(np.asarray(o_blk)))
    np.testing.assert_allclose(np.asarray(o_blk), np.asarray(o_ref), atol=1e-5, rtol=1e-5)
    g_ref = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.grad(blk, argnums=(0, 1, 2))(q, k, v)
    for name, a, b_ in zip("qkv", g_blk, g_ref):
        assert np.all(np.isfinite(np.asarray(a))), name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("t,block,groups,window,causal", [
    (24, 8, 1, None, True),     # T a multiple of the block
    (29, 8, 2, None, True),     # T not a multiple, GQA
    (29, 8, 1, 5, True),        # sliding window: tiles outside it skipped
    (21, 16, 2, 7, False),      # no tile skipped: every tile computed, masks alone decide
    (7, 8, 1, None, True),      # a single (padded) tile
])
def test_blocked_equals_xla_with_padding(t, block, groups, window, causal):
    b, kh, d = 3, 2, 8
    q, k, v, w = _qkv(t + block, b, t, kh, groups, d)
    valid = np.ones((b, t), bool)
    valid[0, :5] = False        # left padding: the first queries see no key at all (uniform rows)
    valid[1, t - 4:] = False    # right padding
    allowed = _allowed(jnp.asarray(valid), t, window)
    _compare(q, k, v, w, allowed, block, causal, window)


def test_blocked_equals_xla_packed_segments():
    b, t, kh, g, d = 2, 26, 2, 2, 8
    q, k, v, w = _qkv(5, b, t, kh, g, d)
    segments = jnp.asarray(np.array([[1] * 9 + [2] * 12 + [0] * 5, [1] * 4 + [2] * 4 + [3] * 18]))
    allowed = _allowed(segments != 0, t, segments=segments)
    _compare(q, k, v, w, allowed, 8, True, None)


def test_uniform_rows_match_and_rows_without_keys_do_not_nan():
    b, t, kh, g, d = 2, 16, 1, 1, 4
    q, k, v, w = _qkv(7, b, t, kh, g, d)
    allowed = jnp.zeros((b, t, t), bool).at[1].set(_allowed(jnp.ones((1, t), bool), t)[0])  # row 0: no key at all
    out = blocked_attention(q, k, v, allowed, 0.5, 8, True, None)
    np.testing.assert_allclose(np.asarray(out[0]), np.broadcast_to(np.asarray(v[0]).mean(0), out[0].shape), atol=1e-6)
    _compare(q, k, v, w, allowed, 8, True, None)


def test_block_plan_skips_tiles_above_the_diagonal_and_outside_the_window():
    plan = _block_plan(32, 32, 8, causal=True, window=None)
    assert [js for _, _, js in plan] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    plan = _block_plan(32, 32, 8, causal=True, window=9)  # query 16..23 reach back to slot 8 at most
    assert [js for _, _, js in plan] == [[0], [0, 1], [1, 2], [2, 3]]
    assert [js for _, _, js in _block_plan(20, 20, 8, causal=False, window=None)] == [[0, 1, 2]] * 3


def _batch(vocab, b, t, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(3, vocab, (b, t)), jnp.int32)
    mask = np.ones((b, t), np.int32)
    mask[0, :6] = 0   # left-padded row
    mask[1, t - 9:] = 0  # right-padded row
    return ids, jnp.asarray(mask)


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("gpt2", {}), ("mistral", {"sliding_window": 11}),
                                        ("qwen3", {})])
def test_model_loss_and_grads_equal_across_impls(arch, extra):
    base = tiny_config(arch=arch, max_position_embeddings=64, **extra)
    ids, mask = _batch(base.vocab_size, 3, 45)
    results = {}
    for impl in ("xla", "blocked"):
        cfg = base.replace(attention_impl=impl, attention_block=16)
        model = CausalLM(cfg)
        params = init_params(model, jax.random.key(0))

        def loss(p):
            logp = jax.nn.log_softmax(model.apply(p, ids, mask)[:, :-1], axis=-1)
            nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

        results[impl] = jax.value_and_grad(loss)(params)
    (l0, g0), (l1, g1) = results["xla"], results["blocked"]
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b_ in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, rtol=1e-4)


def test_scalar_head_and_cached_decode_unchanged_by_the_option():
    base = tiny_config(max_position_embeddings=64)
    ids, mask = _batch(base.vocab_size, 2, 40, seed=1)
    vals = []
    for impl in ("xla", "blocked"):
        model = ScalarHeadModel(base.replace(attention_impl=impl, attention_block=8))
        params = init_params(model, jax.random.key(3))
        vals.append(np.asarray(model.apply(params, ids, mask)))
    np.testing.assert_allclose(vals[1], vals[0], atol=1e-5, rtol=1e-5)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="attention_impl.*'flash'"):
        tiny_config(attention_impl="flash")
    for bad in (0, 4, 8.0, True, "64"):
        with pytest.raises(ConfigError, match="attention_block"):
            tiny_config(attention_block=bad)
    assert tiny_config().attention_impl == "xla"  # today's behaviour stays the default


def test_resolve_per_platform():
    c = tiny_config(attention_block=64)
    assert resolve_attention_impl(c.replace(attention_impl="auto"), 512, "cpu") == "blocked"
    assert resolve_attention_impl(c.replace(attention_impl="auto"), 127, "cpu") == "xla"
    assert resolve_attention_impl(c.replace(attention_impl="auto"), 512, "tpu") == "xla"
    assert resolve_attention_impl(c.replace(attention_impl="auto", dtype="bfloat16"), 512, "gpu") == "cudnn"
    assert resolve_attention_impl(c.replace(attention_impl="auto"), 512, "gpu") == "xla"  # f32: not cuDNN's
    assert resolve_attention_impl(c.replace(attention_impl="blocked"), 8, "gpu") == "blocked"
    with pytest.raises(ConfigError, match="model.attention_impl.*needs a GPU"):
        resolve_attention_impl(c.replace(attention_impl="cudnn"), 512, "cpu")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_cudnn_on_cpu_raises_at_trace_time():
    cfg = tiny_config(attention_impl="cudnn")
    model = CausalLM(cfg)
    with pytest.raises(ConfigError, match="attention_impl"):
        init_params(model, jax.random.key(0), seq_len=4)


def test_attention_dispatch_follows_the_config():
    q, k, v, _ = _qkv(9, 1, 20, 1, 1, 8)
    allowed = _allowed(jnp.ones((1, 20), bool), 20)
    ref = attention_core(q, k, v, allowed, 0.3)
    for impl in ("xla", "blocked", "auto"):
        out = attention(q, k, v, allowed, 0.3, config=tiny_config(attention_impl=impl, attention_block=8), causal=True)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_option_round_trips_through_save_and_load(tmp_path):
    cfg = tiny_config(attention_impl="blocked", attention_block=32)
    model = CausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    save_pretrained(tmp_path, model, params)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert "attention_impl" not in hf and "attention_block" not in hf  # a framework option, not an HF field
    loaded, _ = from_pretrained(tmp_path, attention_impl="blocked", attention_block=32)
    assert loaded.config.attention_impl == "blocked" and loaded.config.attention_block == 32
    with pytest.raises(ConfigError, match="attention_impl"):
        from_pretrained(tmp_path, attention_impl="nope")


def test_model_section_keys_reach_the_model_config():
    from rlhf_jax.training.configs import ModelSection

    sec = ModelSection(attention_impl="blocked", attention_block=32)
    sec.validate("policy.")
    over = sec.size_overrides()
    assert tiny_config(**over).attention_impl == "blocked" and tiny_config(**over).attention_block == 32
    with pytest.raises(ConfigError, match="'policy.attention_impl'"):
        ModelSection(attention_impl="flash").validate("policy.")
    with pytest.raises(ConfigError, match="'model.attention_block'"):
        ModelSection(attention_block=4).validate()
