"""rlhf_jax.models: logits parity with transformers, left/right padding, KV cache, packed rows."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rlhf_jax.models import (
    CausalLM,
    from_pretrained,
    init_cache,
    positions_from_segments,
)
from tests.hf_utils import FAMILIES, hf_logits, left_padded_batch, load_hf_model, make_hf_model


@functools.lru_cache(maxsize=None)
def fwd(model, method=None):
    """`jax.jit(model.apply)` (cached per module): eager Flax compiles every op on first use, far slower."""
    return jax.jit(model.apply if method is None else functools.partial(model.apply, method=method))

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
    ids = np.random.default_rng(1).integers(0, 128, size=(3, T)).astype(np.int32)
    ref = hf_logits(hf, ids)
    # an all-ones mask keeps one compiled shape per family (mask=None is checked in test_hidden_states...)
    out = fwd(model)(params, ids, attention_mask=np.ones_like(ids))
    assert out.dtype == jnp.float32 and out.shape == (3, T, 128)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.5  # logits are O(1): the tolerance is meaningful


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_parity_left_padding(loaded, family):
    hf, model, params = loaded[family]
    ids, mask = left_padded_batch(np.random.default_rng(2), [T, 7, 1], T, 128)
    ref = hf_logits(hf, ids, mask)
    out = np.asarray(fwd(model)(params, ids, attention_mask=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)
    if family in ("gpt2", "llama"):  # padding is invisible: the 7-token row equals that row run alone
        alone = np.asarray(fwd(model)(params, ids[1:2, T - 7:]))
        np.testing.assert_allclose(out[1, T - 7:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_logits_parity_right_padding(loaded, family):
    hf, model, params = loaded[family]
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 128, size=(3, T)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    ref = hf_logits(hf, ids, mask)
    out = np.asarray(fwd(model)(params, ids, attention_mask=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)


def test_hidden_states_feed_logits(loaded):
    _, model, params = loaded["llama"]
    ids = np.arange(3, 3 + 3 * T, dtype=np.int32).reshape(3, T)
    h = fwd(model, CausalLM.hidden_states)(params, ids)
    assert h.shape == (3, T, 64)
    logits = np.asarray(h) @ np.asarray(params["params"]["lm_head"]["kernel"])
    np.testing.assert_allclose(logits, np.asarray(fwd(model)(params, ids)), atol=1e-5)  # mask=None
    ones = np.asarray(fwd(model)(params, ids, attention_mask=np.ones_like(ids)))
    np.testing.assert_allclose(logits, ones, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral_swa", "qwen3"])
def test_kv_cache_decode_matches_full_forward(loaded, family):
    """Prefill of a left-padded prompt, then one-token steps: every position equals the full pass."""
    _, model, params = loaded[family]
    cfg = model.config
    ids, mask = left_padded_batch(np.random.default_rng(4), [T, 9, 2], T, 128)
    full = np.asarray(fwd(model)(params, ids, attention_mask=mask))
    prompt = 5
    cache = init_cache(cfg, batch=3, max_len=T + 3)
    assert len(cache.k) == len(cache.v) == cfg.num_layers and cache.max_len == T + 3
    assert cache.k[0].shape == (3, cfg.num_kv_heads, T + 3, cfg.head_dim) and cache.k[0].dtype == jnp.float32
    logits, cache = fwd(model)(params, ids[:, :prompt], mask[:, :prompt], cache=cache)
    steps = [np.asarray(logits)]
    step = jax.jit(lambda p, i, m, c: fwd(model)(p, i, m, cache=c))
    for t in range(prompt, T):
        logits, cache = step(params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    inc = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(inc[real], full[real], atol=2e-5, rtol=0)
    assert int(cache.index) == T
    np.testing.assert_array_equal(np.asarray(cache.mask)[:, :T], mask)
    assert not np.asarray(cache.mask)[:, T:].any()


def test_kv_cache_chunked_prefill_and_explicit_positions(loaded):
    _, model, params = loaded["llama"]
    ids, mask = left_padded_batch(np.random.default_rng(5), [T, 4, 9], T, 128)
    full = np.asarray(fwd(model)(params, ids, attention_mask=mask))
    cache = init_cache(model.config, 3, T)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    h = T // 2
    a, cache = fwd(model)(params, ids[:, :h], mask[:, :h], positions=pos[:, :h], cache=cache)
    b, cache = fwd(model)(params, ids[:, h:], mask[:, h:], positions=pos[:, h:], cache=cache)
    inc = np.concatenate([np.asarray(a), np.asarray(b)], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(inc[real], full[real], atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "mistral_swa"])
def test_packed_segments_equal_separate_forwards(loaded, family):
    """Packed rows (3 documents per row) equal each document run alone (as a right-padded row)."""
    _, model, params = loaded[family]
    rng = np.random.default_rng(6)
    lengths = [[4, 5, 3], [9, 3], [2, 8]]  # mistral_swa: the 9-token document exceeds the window of 8
    packed = np.zeros((3, T), np.int32)
    seg = np.zeros((3, T), np.int32)
    docs = []
    for r, ls in enumerate(lengths):
        o = 0
        for i, n in enumerate(ls):
            d = rng.integers(3, 128, size=n).astype(np.int32)
            packed[r, o:o + n] = d
            seg[r, o:o + n] = i + 1
            docs.append((r, o, d))
            o += n
    pos = np.asarray(positions_from_segments(jnp.asarray(seg)))
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2])
    if family == "gpt2":  # the data layer's batch: mask, positions and segment ids all given
        out = fwd(model)(params, packed, attention_mask=(seg > 0).astype(np.int32), positions=pos, segment_ids=seg)
    else:  # positions default to the index within each segment, mask to segment_ids != 0
        out = fwd(model)(params, packed, segment_ids=seg)
    out = np.asarray(out)
    for chunk in (docs[:3], docs[3:6]):
        rows = np.zeros((3, T), np.int32)
        rows_mask = np.zeros((3, T), np.int32)
        for i, (_, _, d) in enumerate(chunk):
            rows[i, :len(d)] = d
            rows_mask[i, :len(d)] = 1
        alone = np.asarray(fwd(model)(params, rows, attention_mask=rows_mask))
        for i, (r, o, d) in enumerate(chunk):
            np.testing.assert_allclose(out[r, o:o + len(d)], alone[i, :len(d)], atol=1e-5, rtol=0)


def test_bf16_compute_with_f32_params_close_to_f32(hf_dirs):
    model32, p32 = from_pretrained(hf_dirs["llama"])
    model16, p16 = from_pretrained(hf_dirs["llama"], dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
    ids = np.random.default_rng(7).integers(0, 128, size=(3, T)).astype(np.int32)
    ones = np.ones_like(ids)
    a = np.asarray(fwd(model32)(p32, ids, attention_mask=ones))
    b = fwd(model16)(p16, ids, attention_mask=ones)
    assert b.dtype == jnp.float32
    err = np.abs(a - np.asarray(b)).max()
    assert 0 < err < 0.1 * np.abs(a).max()  # bf16 rounding happened, but the result is close
    h = jax.eval_shape(functools.partial(model16.apply, method=CausalLM.hidden_states), p16, ids)
    assert h.dtype == jnp.bfloat16


def test_bf16_params(hf_dirs):
    model, params = from_pretrained(hf_dirs["qwen2"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ref_model, ref = from_pretrained(hf_dirs["qwen2"])
    ids = np.arange(3, 3 + 3 * T, dtype=np.int32).reshape(3, T)
    ones = np.ones_like(ids)
    np.testing.assert_allclose(np.asarray(fwd(model)(params, ids, attention_mask=ones)),
                               np.asarray(fwd(ref_model)(ref, ids, attention_mask=ones)), atol=0.15)


def test_remat_same_loss_and_grads(loaded):
    _, model, params = loaded["llama"]
    cfg = model.config
    ids = np.random.default_rng(8).integers(0, cfg.vocab_size, size=(2, 8)).astype(np.int32)

    def loss(p, model):
        logits = model.apply(p, ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l0, g0 = vg(params, CausalLM(cfg))
    l1, g1 = vg(params, CausalLM(cfg.replace(remat=True)))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6)
