"""rlhf_jax.models: logits parity with transformers, left/right padding, KV cache, packed rows."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rlhf_jax.models import (
    CausalLM,
    from_pretrained,
    init_cache,
    init_params,
    positions_from_segments,
    tiny_config,
)
from tests.hf_utils import FAMILIES, hf_logits, left_padded_batch, load_hf_model, make_hf_model

T = 12  # > mistral_swa's window of 8, so the window is exercised


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_hf_model(f, root / f, seed=FAMILIES.index(f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(hf_dirs):
    return {f: (load_hf_model(p),) + from_pretrained(p) for f, p in hf_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_parity_no_padding(loaded, family):
    hf, model, params = loaded[family]
    ids = np.random.default_rng(1).integers(0, 128, size=(2, T)).astype(np.int32)
    ref = hf_logits(hf, ids)
    out = model.apply(params, ids)
    assert out.dtype == jnp.float32 and out.shape == (2, T, 128)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.5  # logits are O(1): the tolerance is meaningful


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_parity_left_padding(loaded, family):
    hf, model, params = loaded[family]
    ids, mask = left_padded_batch(np.random.default_rng(2), [T, 7, 1], T, 128)
    ref = hf_logits(hf, ids, mask)
    out = np.asarray(model.apply(params, ids, attention_mask=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)
    # Padding is invisible: the 7-token row equals that row run alone without padding.
    alone = np.asarray(model.apply(params, ids[1:2, T - 7:]))
    np.testing.assert_allclose(out[1, T - 7:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_logits_parity_right_padding(loaded, family):
    hf, model, params = loaded[family]
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 128, size=(2, T)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    ref = hf_logits(hf, ids, mask)
    out = np.asarray(model.apply(params, ids, attention_mask=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)


def test_hidden_states_feed_logits(loaded):
    _, model, params = loaded["llama"]
    ids = np.arange(3, 3 + T, dtype=np.int32)[None]
    h = model.apply(params, ids, method=CausalLM.hidden_states)
    assert h.shape == (1, T, 64)
    logits = np.asarray(h) @ np.asarray(params["params"]["lm_head"]["kernel"])
    np.testing.assert_allclose(logits, np.asarray(model.apply(params, ids)), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama3", "mistral_swa", "qwen2", "qwen3"])
def test_kv_cache_decode_matches_full_forward(loaded, family):
    """Prefill of a left-padded prompt, then one-token steps: every position equals the full pass."""
    _, model, params = loaded[family]
    cfg = model.config
    ids, mask = left_padded_batch(np.random.default_rng(4), [T, 9, 2], T, 128)
    full = np.asarray(model.apply(params, ids, attention_mask=mask))
    prompt = 5
    cache = init_cache(cfg, batch=3, max_len=T + 3)
    logits, cache = model.apply(params, ids[:, :prompt], mask[:, :prompt], cache=cache)
    steps = [np.asarray(logits)]
    step = jax.jit(lambda p, i, m, c: model.apply(p, i, m, cache=c))
    for t in range(prompt, T):
        logits, cache = step(params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    inc = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(inc[real], full[real], atol=2e-5, rtol=0)
    assert int(cache.index) == T
    np.testing.assert_array_equal(np.asarray(cache.mask)[:, :T], mask)
    assert not np.asarray(cache.mask)[:, T:].any()


def test_kv_cache_chunked_prefill_and_explicit_positions():
    cfg = tiny_config(arch="llama")
    model = CausalLM(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    ids, mask = left_padded_batch(np.random.default_rng(5), [10, 4], 10, cfg.vocab_size)
    full = np.asarray(model.apply(params, ids, mask))
    cache = init_cache(cfg, 2, 10)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    a, cache = model.apply(params, ids[:, :6], mask[:, :6], positions=pos[:, :6], cache=cache)
    b, cache = model.apply(params, ids[:, 6:], mask[:, 6:], positions=pos[:, 6:], cache=cache)
    inc = np.concatenate([np.asarray(a), np.asarray(b)], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(inc[real], full[real], atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_packed_segments_equal_separate_forwards(arch):
    cfg = tiny_config(arch=arch, sliding_window=4 if arch == "mistral" else None)
    model = CausalLM(cfg)
    params = init_params(model, jax.random.PRNGKey(1))
    rng = np.random.default_rng(6)
    lengths = [4, 6, 3]
    docs = [rng.integers(3, cfg.vocab_size, size=n).astype(np.int32) for n in lengths]
    packed = np.zeros((1, 16), np.int32)
    seg = np.zeros((1, 16), np.int32)
    o = 0
    for i, d in enumerate(docs):
        packed[0, o:o + len(d)] = d
        seg[0, o:o + len(d)] = i + 1
        o += len(d)
    pos = np.asarray(positions_from_segments(jnp.asarray(seg)))
    np.testing.assert_array_equal(pos[0, :13], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2])
    out = np.asarray(model.apply(params, packed, attention_mask=(seg > 0).astype(np.int32),
                                 positions=pos, segment_ids=seg))
    # positions default to the index within each segment
    out_default = np.asarray(model.apply(params, packed, segment_ids=seg))
    np.testing.assert_allclose(out_default[0, :13], out[0, :13], atol=1e-6)
    o = 0
    for d in docs:
        alone = np.asarray(model.apply(params, d[None]))[0]
        np.testing.assert_allclose(out[0, o:o + len(d)], alone, atol=1e-5, rtol=0)
        o += len(d)


def test_bf16_compute_with_f32_params_close_to_f32(hf_dirs):
    model32, p32 = from_pretrained(hf_dirs["llama"])
    model16, p16 = from_pretrained(hf_dirs["llama"], dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
    ids = np.random.default_rng(7).integers(0, 128, size=(2, T)).astype(np.int32)
    a = np.asarray(model32.apply(p32, ids))
    b = model16.apply(p16, ids)
    assert b.dtype == jnp.float32
    err = np.abs(a - np.asarray(b)).max()
    assert 0 < err < 0.1 * np.abs(a).max()  # bf16 rounding happened, but the result is close
    h = model16.apply(p16, ids, method=CausalLM.hidden_states)
    assert h.dtype == jnp.bfloat16


def test_bf16_params(hf_dirs):
    model, params = from_pretrained(hf_dirs["qwen2"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ref_model, ref = from_pretrained(hf_dirs["qwen2"])
    ids = np.arange(3, 3 + T, dtype=np.int32)[None]
    np.testing.assert_allclose(np.asarray(model.apply(params, ids)), np.asarray(ref_model.apply(ref, ids)),
                               atol=0.15)


def test_remat_same_loss_and_grads():
    cfg = tiny_config(arch="llama")
    ids = np.random.default_rng(8).integers(0, cfg.vocab_size, size=(2, 8)).astype(np.int32)
    params = init_params(CausalLM(cfg), jax.random.PRNGKey(2))

    def loss(p, model):
        logits = model.apply(p, ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    l0, g0 = jax.value_and_grad(loss)(params, CausalLM(cfg))
    l1, g1 = jax.value_and_grad(loss)(params, CausalLM(cfg.replace(remat=True)))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6)
