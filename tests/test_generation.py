"""generate(): parity with transformers, log-prob consistency, stops, buckets, no recompilation, mesh."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.generation import generate, response_mask, truncate_after_stop
from rlhf_jax.generation.engine import _generate
from rlhf_jax.models import from_pretrained

from tests.hf_utils import left_padded_batch, load_hf_model, make_hf_model

N_NEW = 8
EOS = 2
PAD = 0
LENGTHS = (3, 7, 5, 1)  # left-padded to width 7 (prompt bucket 16)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_models")
    return {fam: make_hf_model(fam, root / fam, seed=3) for fam in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def prompts():
    return left_padded_batch(np.random.default_rng(0), LENGTHS, max(LENGTHS), 128, pad_token_id=PAD)


@pytest.fixture(scope="module")
def llama(hf_dirs):
    return from_pretrained(hf_dirs["llama"])


def _hf_greedy(path, ids, mask, n_new):
    import torch

    model = load_hf_model(path)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            do_sample=False, max_new_tokens=n_new, eos_token_id=EOS, pad_token_id=PAD,
        )
    new = out[:, ids.shape[1]:].numpy()
    # transformers stops when every row has finished; the remaining columns are padding
    return np.pad(new, ((0, 0), (0, n_new - new.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_matches_transformers_generate(family, hf_dirs, prompts):
    ids, mask = prompts
    model, params = from_pretrained(hf_dirs[family])
    out = generate(model, params, ids, mask, rng=None, max_new_tokens=N_NEW, greedy=True,
                   stop_token_ids=(EOS,), pad_token_id=PAD)
    want = _hf_greedy(hf_dirs[family], ids, mask, N_NEW)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(response_mask(want, (EOS,))))
    # the rows must actually differ, or left padding would not be exercised
    assert len({tuple(r) for r in want.tolist()}) == len(LENGTHS)


def _recompute_logprobs(model, params, ids, mask, out, temperature):
    """Full forward (no cache) over prompt + response; logp of each response token at T."""
    full_ids = jnp.concatenate([jnp.asarray(ids), out.tokens], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask), out.mask], axis=1)
    logits = jax.jit(model.apply)(params, full_ids, full_mask)
    p = ids.shape[1]
    resp_logits = logits[:, p - 1:-1] / temperature  # logits[t] predicts token t + 1
    logp = jax.nn.log_softmax(resp_logits, axis=-1)
    return jnp.take_along_axis(logp, out.tokens[..., None], axis=-1)[..., 0] * out.mask


def test_logprobs_equal_full_forward_recomputation(llama, prompts):
    model, params = llama
    ids, mask = prompts
    for temperature, top_k, top_p, seed in [(0.7, 20, 0.9, 0), (1.3, 0, 1.0, 1)]:
        out = generate(model, params, ids, mask, rng=jax.random.key(seed), max_new_tokens=N_NEW,
                       temperature=temperature, top_k=top_k, top_p=top_p, stop_token_ids=(EOS,), pad_token_id=PAD)
        want = _recompute_logprobs(model, params, ids, mask, out, temperature)
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(want), atol=1e-5, rtol=0)
        assert np.all(np.asarray(out.logprobs)[np.asarray(out.mask) == 0] == 0.0)
        assert np.all(np.asarray(out.logprobs)[np.asarray(out.mask) == 1] < 0.0)


def test_knobs_are_traced_inside_an_outer_jit_and_top_k_1_is_greedy(llama, prompts):
    model, params = llama
    ids, mask = prompts
    traces = []

    @jax.jit
    def rollout(params, ids, mask, key, temperature, top_k, top_p):
        traces.append(1)
        out = generate(model, params, ids, mask, rng=key, max_new_tokens=N_NEW, temperature=temperature,
                       top_k=top_k, top_p=top_p, stop_token_ids=(EOS,), pad_token_id=PAD)
        return out.tokens, out.logprobs

    greedy = generate(model, params, ids, mask, rng=None, max_new_tokens=N_NEW, greedy=True, temperature=0.8,
                      stop_token_ids=(EOS,), pad_token_id=PAD)
    outs = {}
    for t, k, p in [(0.8, 1, 1.0), (1.0, 0, 1.0), (0.5, 7, 0.8), (0.8, 1, 0.3), (0.8, 1, 1.0)]:
        outs[(t, k, p)] = rollout(params, ids, mask, jax.random.key(11), jnp.float32(t), jnp.int32(k), jnp.float32(p))
    assert len(traces) == 1
    for key in [(0.8, 1, 1.0), (0.8, 1, 0.3)]:  # top-k = 1 is greedy whatever the key and top_p
        np.testing.assert_array_equal(np.asarray(outs[key][0]), np.asarray(greedy.tokens))
        # 1e-5: the top-level program is compiled with the CPU decode options (another dot kernel)
        np.testing.assert_allclose(np.asarray(outs[key][1]), np.asarray(greedy.logprobs), atol=1e-5)
    assert not np.array_equal(np.asarray(outs[(1.0, 0, 1.0)][0]), np.asarray(greedy.tokens))

    # direct calls: Python floats/ints for the knobs reuse one compiled program too
    n_programs = _generate._cache_size()
    for t, k, p in [(0.9, 0, 1.0), (1.1, 5, 0.95), (0.6, 3, 0.5)]:
        a = generate(model, params, ids, mask, rng=jax.random.key(2), max_new_tokens=N_NEW, temperature=t,
                     top_k=k, top_p=p, stop_token_ids=(EOS,), pad_token_id=PAD)
        b = generate(model, params, ids, mask, rng=jax.random.key(2), max_new_tokens=N_NEW, temperature=t,
                     top_k=k, top_p=p, stop_token_ids=(EOS,), pad_token_id=PAD)
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))  # deterministic in the key
    assert _generate._cache_size() - n_programs <= 1


def test_stop_mask_first_token_and_never(llama, prompts):
    model, params = llama
    ids, mask = prompts
    free = generate(model, params, ids, mask, rng=None, max_new_tokens=N_NEW, greedy=True,
                    stop_token_ids=(EOS,), pad_token_id=PAD)
    free_tokens = np.asarray(free.tokens)
    stop = int(free_tokens[0, 0])  # row 0 stops at its very first token
    assert stop not in (EOS, PAD)
    stops = (EOS, stop)
    out = generate(model, params, ids, mask, rng=None, max_new_tokens=N_NEW, greedy=True, pad_token_id=PAD,
                   stop_token_ids=stops)
    want_tokens, want_mask = truncate_after_stop(free_tokens, stops, PAD)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want_tokens))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(want_mask))
    np.testing.assert_array_equal(np.asarray(out.mask)[0], [1] + [0] * (N_NEW - 1))
    np.testing.assert_array_equal(np.asarray(out.tokens)[0], [stop] + [PAD] * (N_NEW - 1))
    assert bool(out.stopped[0])
    never = [b for b in range(len(LENGTHS)) if not set(stops) & set(free_tokens[b].tolist())]
    assert never, "expected at least one row that never emits a stop token"
    for b in never:
        assert np.all(np.asarray(out.mask)[b] == 1) and not bool(out.stopped[b])
        np.testing.assert_array_equal(np.asarray(out.tokens)[b], free_tokens[b])
    kept = np.asarray(out.mask) == 1
    np.testing.assert_allclose(np.asarray(out.logprobs)[kept], np.asarray(free.logprobs)[kept], atol=1e-6)
    assert np.all(np.asarray(out.logprobs)[~kept] == 0.0)


def test_extra_left_padding_and_buckets(llama, prompts):
    model, params = llama
    ids, mask = prompts
    greedy = dict(rng=None, max_new_tokens=N_NEW, greedy=True, stop_token_ids=(EOS,), pad_token_id=PAD)
    base = generate(model, params, ids, mask, **greedy)
    n_programs = _generate._cache_size()
    # widths 7..16 all land in the 16-bucket: no new program, same tokens
    for extra in (2, 9):
        wide_ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=PAD)
        wide_mask = np.pad(mask, ((0, 0), (extra, 0)))
        out = generate(model, params, wide_ids, wide_mask, **greedy)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(base.tokens))
    assert _generate._cache_size() == n_programs
    # the 32-bucket: a new program, same tokens (pad slots are masked, positions count real tokens)
    wide_ids = np.pad(ids, ((0, 0), (20, 0)), constant_values=PAD)
    wide_mask = np.pad(mask, ((0, 0), (20, 0)))
    out = generate(model, params, wide_ids, wide_mask, **greedy)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(base.tokens))
    assert _generate._cache_size() == n_programs + 1
    with pytest.raises(ValueError, match="exceeds the largest prompt bucket"):
        generate(model, params, ids, mask, prompt_buckets=(4,), **greedy)


def test_bad_arguments_raise_clear_errors(llama, prompts):
    model, params = llama
    ids, mask = prompts
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, ids, mask, rng=None, greedy=True, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"prompt_ids and prompt_mask must both be \[B, P\]"):
        generate(model, params, ids, mask[:, 1:], rng=None, greedy=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="rng is required"):
        generate(model, params, ids, mask, rng=None, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"stop_token_ids\[0\]"):
        generate(model, params, ids, mask, rng=None, greedy=True, max_new_tokens=2, stop_token_ids=["x"])
    with pytest.raises(TypeError, match="CausalLM"):
        generate(object(), params, ids, mask, rng=None, greedy=True, max_new_tokens=2)


_MESH_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from rlhf_jax.generation import generate
    from rlhf_jax.models import from_pretrained
    from tests.hf_utils import left_padded_batch

    assert jax.device_count() == 8, jax.devices()
    model, params = from_pretrained(sys.argv[1])
    ids, mask = left_padded_batch(np.random.default_rng(1), [3, 7, 5, 1, 6, 2, 7, 4], 7, 128)
    kw = dict(max_new_tokens=6, temperature=0.9, top_k=10, top_p=0.9, stop_token_ids=(2,), pad_token_id=0)
    run = jax.jit(lambda p, i, m, k: generate(model, p, i, m, rng=k, **kw))
    key = jax.random.key(4)

    one = jax.devices()[0]
    ref = run(jax.device_put(params, one), jax.device_put(ids, one), jax.device_put(mask, one), key)

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))
    def param_sharding(x):  # FSDP-style: first dim divisible by 2 over fsdp, as training leaves params
        dims = [i for i, d in enumerate(x.shape) if d % 2 == 0]
        spec = [None] * x.ndim
        if dims:
            spec[dims[0]] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    sharded_params = jax.tree.map(lambda x: jax.device_put(x, param_sharding(x)), params)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    out = run(sharded_params, jax.device_put(ids, batch), jax.device_put(mask, batch), key)
    assert len(out.tokens.sharding.device_set) == 8, out.tokens.sharding
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    print("MESH_OK", np.asarray(out.tokens).tolist())
    """
)


def test_sharded_batch_on_8_devices_equals_one_device(hf_dirs):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, hf_dirs["llama"]], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "MESH_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_segmented_cache_growth_gives_the_same_rollout(llama, prompts, monkeypatch):
    """Growing the cache in segments (SEGMENT_STEPS) changes only how much cache each step reads."""
    from rlhf_jax.generation import engine
    from rlhf_jax.models import grow_cache, init_cache

    model, params = llama
    ids, mask = prompts
    ids, mask = engine.left_pad_to(ids, mask, 16, PAD)
    kw = dict(max_new_tokens=N_NEW, greedy=False, stop_token_ids=(EOS,), pad_token_id=PAD)
    args = (model, params, ids, mask, jax.random.key(5), jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    outs = {}
    for seg in (N_NEW, 3, 1):
        monkeypatch.setattr(engine, "SEGMENT_STEPS", seg)
        outs[seg] = jax.jit(engine.decode_program, static_argnames=("model",) + tuple(kw))(*args, **kw)
    assert engine.segment_ends(N_NEW, 3) == tuple(range(3, N_NEW, 3))
    for seg in (3, 1):
        np.testing.assert_array_equal(np.asarray(outs[seg].tokens), np.asarray(outs[N_NEW].tokens))
        np.testing.assert_array_equal(np.asarray(outs[seg].mask), np.asarray(outs[N_NEW].mask))
        np.testing.assert_allclose(np.asarray(outs[seg].logprobs), np.asarray(outs[N_NEW].logprobs), atol=1e-5)

    cache = init_cache(model.config, 2, 4)
    grown = grow_cache(cache, 9)
    assert grown.max_len == 9 and grown.mask.shape == (2, 9) and int(grown.index) == 0
    with pytest.raises(ValueError, match="below the cache's 4 slots"):
        grow_cache(cache, 3)


def test_tied_head_copy_gives_the_same_rollout(hf_dirs, prompts, monkeypatch):
    """On CPU a tied model's decode loop reads a [D, V] copy of the embedding (CausalLM.output_kernel)."""
    from rlhf_jax.generation import engine
    from rlhf_jax.models import CausalLM

    model, params = from_pretrained(hf_dirs["gpt2"])
    assert model.config.tie_word_embeddings
    kernel = engine._decode_output_kernel(model, params)
    emb = params["params"]["model"]["embed"]["embedding"]
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(emb).T)
    h = jax.random.normal(jax.random.key(0), (2, 3, model.config.hidden_size))
    np.testing.assert_allclose(np.asarray(model.apply(params, h, method=CausalLM.logits_from_hidden)),
                               np.asarray(jnp.einsum("btd,dv->btv", h, kernel)), atol=1e-5, rtol=1e-5)
    llama_model, llama_params = from_pretrained(hf_dirs["llama"])
    if not llama_model.config.tie_word_embeddings:  # untied: the plain LM head, no copy
        assert engine._decode_output_kernel(llama_model, llama_params) is None
        np.testing.assert_array_equal(np.asarray(llama_model.apply(llama_params, method=CausalLM.output_kernel)),
                                      np.asarray(llama_params["params"]["lm_head"]["kernel"]))

    ids, mask = prompts
    ids, mask = engine.left_pad_to(ids, mask, 16, PAD)
    kw = dict(max_new_tokens=N_NEW, greedy=False, stop_token_ids=(EOS,), pad_token_id=PAD)
    args = (params, ids, mask, jax.random.key(7), jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))

    def run():  # a fresh function each time: jit's trace cache is keyed by the function
        return jax.jit(lambda *a: engine.decode_program(model, *a, **kw))(*args)

    copied = run()
    calls = []
    monkeypatch.setattr(engine, "_decode_output_kernel", lambda m, p: calls.append(1))  # -> None
    plain = run()
    assert calls, "the second program must be traced anew, with the plain tied head"
    np.testing.assert_array_equal(np.asarray(copied.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(np.asarray(copied.logprobs), np.asarray(plain.logprobs), atol=1e-5)
