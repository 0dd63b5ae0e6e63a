"""Sampling filters, stop handling, bucketing and the decode loop on crafted distributions.

These tests need no transformer: the decode loop is driven by a crafted step function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.generation import bucketing, decode, sampling, stopping


# Jitted once per shape: top_k/top_p/temperature are traced, so the many cases below share a program.
filter_logits = jax.jit(sampling.filter_logits)
sample_tokens = jax.jit(sampling.sample_tokens, static_argnames="greedy")


def _probs_to_logits(p):
    return jnp.log(jnp.asarray(p, jnp.float32))


# ---------------------------------------------------------------- filters


def test_top_k_keeps_exactly_k_largest():
    logits = jnp.asarray([[0.1, 2.0, -1.0, 3.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = np.asarray(filter_logits(logits, top_k=2, top_p=1.0))
    np.testing.assert_array_equal(np.isfinite(out), [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]])
    # kept values unchanged
    np.testing.assert_allclose(out[0, [1, 3]], [2.0, 3.0])
    # k <= 0 and k >= V disable the filter
    for k in (0, -1, 5, 9):
        np.testing.assert_array_equal(np.asarray(filter_logits(logits, top_k=k)), np.asarray(logits))


def test_top_p_hand_computed_nucleus():
    # sorted probabilities 0.5, 0.3, 0.1, 0.06, 0.04 (shuffled positions)
    p = [[0.1, 0.5, 0.04, 0.3, 0.06]]
    logits = _probs_to_logits(p)
    # (values away from the cumulative-mass boundaries 0.5, 0.8, 0.9, 0.96, where f32 rounding decides)
    cases = {0.3: [0, 1, 0, 0, 0], 0.45: [0, 1, 0, 0, 0], 0.6: [0, 1, 0, 1, 0], 0.75: [0, 1, 0, 1, 0],
             0.85: [1, 1, 0, 1, 0], 0.95: [1, 1, 0, 1, 1], 0.99: [1, 1, 1, 1, 1]}
    for top_p, keep in cases.items():
        out = filter_logits(logits, top_k=0, top_p=top_p)
        np.testing.assert_array_equal(np.isfinite(np.asarray(out)), [keep], err_msg=f"top_p={top_p}")
    # a tiny top_p still keeps the most likely token
    out = filter_logits(logits, top_k=0, top_p=1e-6)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), [[0, 1, 0, 0, 0]])


def test_top_k_then_top_p_renormalises_after_top_k():
    # top-3 of (0.4, 0.3, 0.2, 0.1) renormalised: 4/9, 3/9, 2/9. top_p=0.7: mass before 3rd = 7/9 >= 0.7 -> drop it.
    logits = _probs_to_logits([[0.3, 0.1, 0.4, 0.2]])
    out = filter_logits(logits, top_k=3, top_p=0.7)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), [[1, 0, 1, 0]])
    # at top_p=0.75 the 3rd is kept without top-k (mass before it 0.7) but not after top-3 (7/9)
    out = filter_logits(logits, top_k=0, top_p=0.75)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), [[1, 0, 1, 1]])
    out = filter_logits(logits, top_k=3, top_p=0.75)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), [[1, 0, 1, 0]])


def test_filters_match_transformers_logits_processors():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(32, 50)).astype(np.float32) * 2.0
    for k, p in [(5, 1.0), (0, 0.5), (0, 0.9), (10, 0.8), (1, 0.9), (0, 0.3)]:
        t = torch.from_numpy(logits.copy())
        if k > 0:
            t = TopKLogitsWarper(top_k=k)(None, t)
        if p < 1.0:
            t = TopPLogitsWarper(top_p=p)(None, t)
        want = np.isfinite(t.numpy())
        got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), top_k=k, top_p=p)))
        np.testing.assert_array_equal(got, want, err_msg=f"top_k={k} top_p={p}")


# ---------------------------------------------------------------- sampling


def test_top_p_sampling_never_leaves_the_nucleus():
    probs = np.array([0.45, 0.25, 0.15, 0.1, 0.05], np.float32)
    logits = jnp.tile(_probs_to_logits(probs)[None], (4096, 1))
    tokens, logprobs = sample_tokens(jax.random.key(0), logits, temperature=1.0, top_p=0.65)
    tokens = np.asarray(tokens)
    # nucleus for 0.65: {0 (mass before 0), 1 (mass before 0.45)}; token 2 has mass before 0.70
    assert set(np.unique(tokens)) == {0, 1}
    frac0 = np.mean(tokens == 0)
    assert abs(frac0 - 0.45 / 0.70) < 0.03, frac0
    # log-probs are the unfiltered temperature-scaled ones
    np.testing.assert_allclose(np.asarray(logprobs), np.log(probs)[tokens], rtol=1e-5, atol=1e-6)


def test_top_k_sampling_frequencies_and_temperature():
    probs = np.array([0.1, 0.4, 0.2, 0.3], np.float32)
    logits = jnp.tile(_probs_to_logits(probs)[None], (8192, 1))
    tokens, logprobs = sample_tokens(jax.random.key(1), logits, temperature=0.5, top_k=2)
    tokens = np.asarray(tokens)
    assert set(np.unique(tokens)) == {1, 3}
    # at T=0.5 the probabilities are squared then renormalised: .16/.25 vs .09/.25
    assert abs(np.mean(tokens == 1) - 0.16 / 0.25) < 0.03
    tempered = np.log(probs ** 2 / np.sum(probs ** 2))
    np.testing.assert_allclose(np.asarray(logprobs), tempered[tokens], rtol=1e-5, atol=1e-6)


def test_plain_sampling_frequencies():
    probs = np.array([0.6, 0.3, 0.1], np.float32)
    logits = jnp.tile(_probs_to_logits(probs)[None], (8192, 1))
    tokens, _ = sample_tokens(jax.random.key(2), logits)
    freq = np.bincount(np.asarray(tokens), minlength=3) / 8192
    np.testing.assert_allclose(freq, probs, atol=0.02)


def test_top_k_one_equals_greedy():
    logits = jax.random.normal(jax.random.key(3), (64, 97)) * 3.0
    greedy_tok, greedy_lp = sample_tokens(jax.random.key(0), logits, temperature=0.7, greedy=True)
    for seed in range(3):
        tok, lp = sample_tokens(jax.random.key(seed), logits, temperature=0.7, top_k=1)
        np.testing.assert_array_equal(np.asarray(tok), np.asarray(greedy_tok))
        np.testing.assert_allclose(np.asarray(lp), np.asarray(greedy_lp), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(greedy_tok), np.argmax(np.asarray(logits), -1))
    want = jax.nn.log_softmax(logits / 0.7, -1)[jnp.arange(64), greedy_tok]
    np.testing.assert_allclose(np.asarray(greedy_lp), np.asarray(want), rtol=0, atol=1e-6)


def test_sampling_does_not_retrace_when_knobs_change():
    traces = []

    @jax.jit
    def f(key, logits, t, k, p):
        traces.append(1)
        return sampling.sample_tokens(key, logits, temperature=t, top_k=k, top_p=p)

    logits = jax.random.normal(jax.random.key(0), (4, 11))
    for t, k, p in [(1.0, 0, 1.0), (0.5, 3, 1.0), (2.0, 0, 0.9), (0.9, 5, 0.5)]:
        f(jax.random.key(1), logits, jnp.float32(t), jnp.int32(k), jnp.float32(p))
    assert len(traces) == 1


# ---------------------------------------------------------------- stopping and bucketing


def test_response_mask_first_token_stop_and_never_stop():
    tokens = jnp.asarray([[2, 5, 6, 2], [5, 6, 7, 8], [5, 9, 6, 9], [5, 6, 2, 2]])
    mask = stopping.response_mask(tokens, (2, 9))
    np.testing.assert_array_equal(np.asarray(mask), [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(stopping.response_mask(tokens, ())), np.ones((4, 4)))
    trunc, _ = stopping.truncate_after_stop(tokens, (2,), pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(trunc)[0], [2, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(trunc)[3], [5, 6, 2, 0])


def test_normalize_stop_ids_validates():
    assert stopping.normalize_stop_ids([5, 2, 5]) == (2, 5)
    assert stopping.normalize_stop_ids(7) == (7,)
    assert stopping.normalize_stop_ids(None) == ()
    with pytest.raises(ValueError, match=r"stop_token_ids\[1\]"):
        stopping.normalize_stop_ids([1, "x"])
    with pytest.raises(ValueError, match="must be >= 0"):
        stopping.normalize_stop_ids([-1])


def test_buckets():
    assert [bucketing.bucket_length(n) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 128]
    assert bucketing.bucket_length(10, (8, 12, 24)) == 12
    with pytest.raises(ValueError, match="exceeds the largest prompt bucket 24"):
        bucketing.bucket_length(25, (8, 12, 24))
    ids, mask = bucketing.left_pad_sequences([[5, 6, 7], [8]], pad_token_id=0, buckets=(4, 8))
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    ids2, mask2 = bucketing.left_pad_to(jnp.asarray(ids), jnp.asarray(mask), 6, pad_token_id=1)
    np.testing.assert_array_equal(np.asarray(ids2), [[1, 1, 0, 5, 6, 7], [1, 1, 0, 0, 0, 8]])
    np.testing.assert_array_equal(np.asarray(mask2), [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        bucketing.left_pad_sequences([[1], []], 0)


# ---------------------------------------------------------------- decode loop (crafted model)

V = 12
STOP = 2
PAD = 0


def _run_scripted(script, max_new_tokens, stop_token_ids=(STOP,)):
    """Greedy decode of a 'model' that makes token script[b, t] overwhelmingly likely at step t.

    Returns the output and the number of model steps the loop ran.
    """
    script = jnp.asarray(script, jnp.int32)

    def logits_at(t):
        return jax.nn.one_hot(script[:, t], V) * 30.0

    def step(carry, last_tokens):
        t, calls = carry
        return logits_at(t), (t + 1, calls + 1)

    @jax.jit
    def run():
        out, (_, calls) = decode.decode_loop(step, (jnp.int32(1), jnp.int32(0)), logits_at(0), rng=jax.random.key(0),
                                             max_new_tokens=max_new_tokens, greedy=True,
                                             stop_token_ids=stop_token_ids, pad_token_id=PAD)
        return out, calls

    out, calls = run()
    return out, int(calls)


def test_decode_loop_stop_handling_and_early_exit():
    script = [[STOP, 5, 6, 7, 8, 9],   # stops at its first token
              [5, 6, 7, 8, 9, 10],     # never stops
              [5, 6, STOP, 7, 8, 9]]   # stops at t = 2
    out, calls = _run_scripted(script, 6)
    np.testing.assert_array_equal(np.asarray(out.tokens), [[STOP, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10],
                                                           [5, 6, STOP, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(out.mask), [[1, 0, 0, 0, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(out.stopped), [True, False, True])
    np.testing.assert_array_equal(np.asarray(out.lengths), [1, 6, 3])
    lp = np.asarray(out.logprobs)
    assert np.all(lp[np.asarray(out.mask) == 0] == 0.0)
    want = float(jax.nn.log_softmax(jax.nn.one_hot(0, V) * 30.0)[0])
    np.testing.assert_allclose(lp[np.asarray(out.mask) == 1], want, rtol=1e-6)
    assert calls == 5  # N - 1 model steps when some row never stops

    # every row stops early -> the loop exits early
    script = [[STOP, 5, 6, 7, 8, 9], [5, STOP, 7, 8, 9, 10]]
    out, calls = _run_scripted(script, 6)
    assert calls == 1
    np.testing.assert_array_equal(np.asarray(out.mask), [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])

    # without stop ids nothing stops; N = 1 runs no model step at all
    out, calls = _run_scripted(script, 6, stop_token_ids=())
    assert calls == 5
    np.testing.assert_array_equal(np.asarray(out.tokens), script)
    np.testing.assert_array_equal(np.asarray(out.stopped), [False, False])
    out, calls = _run_scripted(script, 1)
    assert calls == 0
    np.testing.assert_array_equal(np.asarray(out.tokens), [[STOP], [5]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        _run_scripted(script, 0)


def test_decode_loop_sampling_is_deterministic_in_the_key():
    logits = jax.random.normal(jax.random.key(0), (8, V))

    def step(carry, last):
        return logits + jax.nn.one_hot(last, V), carry

    run_jit = jax.jit(lambda k: decode.decode_loop(step, (), logits, rng=k, max_new_tokens=10)[0].tokens)

    def run(key):
        return np.asarray(run_jit(key))

    a, b, c = run(jax.random.key(5)), run(jax.random.key(5)), run(jax.random.key(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_inverse_cdf_hits_only_positive_weights_in_proportion():
    # V = 600 spans three 256-blocks (the last one padded); positive weights in blocks 0 and 2 only
    w = np.zeros((1, 600), np.float32)
    w[0, [3, 10, 550, 599]] = [1.0, 3.0, 2.0, 2.0]
    u = np.concatenate([(np.arange(8000) + 0.5) / 8000, [0.0, np.nextafter(np.float32(1), np.float32(0))]])
    idx = jax.jit(jax.vmap(lambda ui: sampling._inverse_cdf(jnp.asarray(w), ui[None])[0]))(jnp.asarray(u, jnp.float32))
    idx = np.asarray(idx)
    assert set(np.unique(idx)) == {3, 10, 550, 599}
    freq = np.array([np.mean(idx[:8000] == i) for i in (3, 10, 550, 599)])
    np.testing.assert_allclose(freq, [1 / 8, 3 / 8, 2 / 8, 2 / 8], atol=1e-3)
    assert idx[-2] == 3 and idx[-1] == 599  # u = 0 and the largest u < 1


def test_keep_threshold_with_ties_and_negative_logits():
    z = jnp.asarray([[-3.0, -1.0, -1.0, -2.0, -jnp.inf], [0.5, -0.0, 0.0, -0.5, 2.0]])
    out = np.isfinite(np.asarray(filter_logits(z, top_k=2)))
    np.testing.assert_array_equal(out, [[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]])  # tied 2nd place kept
    out = np.isfinite(np.asarray(filter_logits(z, top_k=3)))
    np.testing.assert_array_equal(out, [[0, 1, 1, 1, 0], [1, 1, 1, 0, 1]])
