"""rlhf_jax.models: HF save/load round trips, heads, sharded checkpoints, errors, FLOP/param counts."""

import functools
import json
import os
import shutil

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from safetensors.numpy import load_file, save_file

from rlhf_jax.models import (
    CausalLM,
    CausalLMWithValueHead,
    CheckpointError,
    ModelConfig,
    ScalarHeadModel,
    UnsupportedModelError,
    check_tokenizer_compat,
    count_params,
    flops_per_token,
    from_pretrained,
    init_cache,
    init_params,
    last_token_values,
    save_pretrained,
    split_value_head,
    tiny_config,
)
from tests.hf_utils import FAMILIES, hf_logits, left_padded_batch, load_hf_model, make_hf_model


@functools.lru_cache(maxsize=None)
def fwd(model, method=None):
    """`jax.jit(model.apply)` (cached per module): eager Flax compiles every op on first use, far slower."""
    return jax.jit(model.apply if method is None else functools.partial(model.apply, method=method))

T = 10


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_io")
    return {f: make_hf_model(f, root / f, seed=10 + FAMILIES.index(f)) for f in FAMILIES}


def _batch(seed=0):
    return left_padded_batch(np.random.default_rng(seed), [T, 6, 3], T, 128)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_transformers(hf_dirs, tmp_path, family):
    """from_pretrained -> save_pretrained -> transformers loads -> the original model's logits."""
    src = hf_dirs[family]
    model, params = from_pretrained(src)
    out_dir = save_pretrained(tmp_path / "saved", model, params)
    ids, mask = _batch(1)
    ref = hf_logits(src, ids, mask)
    hf_reloaded = load_hf_model(out_dir)
    assert type(hf_reloaded).__name__ == type(load_hf_model(src)).__name__
    got = hf_logits(hf_reloaded, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-5, rtol=0)
    # and the saved directory reads back to identical params
    _, params2 = from_pretrained(out_dir)
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    # parameter count equals transformers' count
    assert count_params(params) == hf_reloaded.num_parameters()


def test_sharded_checkpoints_both_ways(hf_dirs, tmp_path):
    hf = load_hf_model(hf_dirs["llama"])
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "hf_sharded" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "hf_sharded") if f.endswith(".safetensors")]) > 1
    model, params = from_pretrained(tmp_path / "hf_sharded")
    _, ref_params = from_pretrained(hf_dirs["llama"])
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)

    save_pretrained(tmp_path / "ours_sharded", model, params, max_shard_bytes=40_000)
    files = os.listdir(tmp_path / "ours_sharded")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    ids, mask = _batch(2)
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(tmp_path / "ours_sharded", ids, mask)[real],
                               hf_logits(hf, ids, mask)[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama_tied", "qwen3"])
def test_reward_model_from_lm_checkpoint_and_seq_cls_round_trip(hf_dirs, tmp_path, family):
    lm_model, lm_params = from_pretrained(hf_dirs[family])
    rm, rm_params = from_pretrained(hf_dirs[family], head="scalar", rng=jax.random.PRNGKey(3))
    assert isinstance(rm, ScalarHeadModel)
    # trunk loaded from the LM, head fresh with std 1/sqrt(D+1)
    jax.tree.map(np.testing.assert_array_equal, rm_params["params"]["model"], lm_params["params"]["model"])
    w = np.asarray(rm_params["params"]["score"]["kernel"])
    assert w.shape == (64, 1) and 0.03 < w.std() < 0.3
    ids, mask = _batch(3)
    values = fwd(rm)(rm_params, ids, mask)
    assert values.shape == (3, T) and values.dtype == jnp.float32
    h = fwd(lm_model, CausalLM.hidden_states)(lm_params, ids, mask)
    np.testing.assert_allclose(np.asarray(values), np.asarray(h) @ w[:, 0], atol=1e-5)
    rewards = np.asarray(last_token_values(values, mask))
    np.testing.assert_allclose(rewards, np.asarray(values)[:, -1], atol=0)  # left padding: last slot

    saved = save_pretrained(tmp_path / "rm", rm, rm_params)
    cfg = json.load(open(os.path.join(saved, "config.json")))
    assert cfg["architectures"][0].endswith("ForSequenceClassification") and cfg["num_labels"] == 1
    hf_rm = load_hf_model(saved, cls="AutoModelForSequenceClassification")
    import torch

    with torch.no_grad():
        hf_scores = hf_rm(input_ids=torch.from_numpy(ids.astype(np.int64)),
                          attention_mask=torch.from_numpy(mask.astype(np.int64)),
                          position_ids=torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits
    np.testing.assert_allclose(hf_scores[:, 0].numpy(), rewards, atol=1e-4)
    rm2, rm_params2 = from_pretrained(saved, head="scalar", rng=jax.random.PRNGKey(99))
    jax.tree.map(np.testing.assert_array_equal, rm_params, rm_params2)  # head loaded, not re-drawn
    with pytest.raises(CheckpointError, match="head='scalar'") if family == "qwen3" else _null():
        from_pretrained(saved)  # an untied seq-cls checkpoint has no lm_head


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_value_head_model_save_load(hf_dirs, tmp_path):
    model, params = from_pretrained(hf_dirs["llama"], head="value", rng=jax.random.PRNGKey(5))
    assert isinstance(model, CausalLMWithValueHead)
    ids, mask = _batch(4)
    logits, values = fwd(model)(params, ids, mask)
    lm_params, head = split_value_head(params)
    lm_model, ref_params = from_pretrained(hf_dirs["llama"])
    jax.tree.map(np.testing.assert_array_equal, lm_params, ref_params)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(fwd(lm_model)(lm_params, ids, mask)), atol=1e-6)
    h = np.asarray(fwd(lm_model, CausalLM.hidden_states)(lm_params, ids, mask))
    hv = head["params"]["value_head"]
    np.testing.assert_allclose(np.asarray(values), h @ np.asarray(hv["kernel"])[:, 0] + np.asarray(hv["bias"])[0],
                               atol=1e-5)
    saved = save_pretrained(tmp_path / "pv", model, params)
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(saved, ids, mask)[real], np.asarray(logits)[real], atol=1e-4)
    _, params2 = from_pretrained(saved, head="value", rng=jax.random.PRNGKey(77))
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_gpt2_checkpoint_without_wrapper_prefix(hf_dirs, tmp_path):
    """Old hub GPT-2 files name tensors `h.0...`, `wte.weight` (no `transformer.` prefix)."""
    d = tmp_path / "bare"
    shutil.copytree(hf_dirs["gpt2"], d)
    tensors = load_file(d / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, d / "model.safetensors",
              metadata={"format": "pt"})
    _, params = from_pretrained(d)
    _, ref = from_pretrained(hf_dirs["gpt2"])
    jax.tree.map(np.testing.assert_array_equal, params, ref)


# ---- errors ----------------------------------------------------------------------------------
def test_missing_weight_names_key(hf_dirs, tmp_path):
    d = tmp_path / "missing"
    shutil.copytree(hf_dirs["llama"], d)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing weight 'model\.layers\.1\.self_attn\.k_proj\.weight'.*\[32, 64\]"):
        from_pretrained(d)


def test_shape_mismatch_names_key_and_both_shapes(hf_dirs, tmp_path):
    d = tmp_path / "mismatch"
    shutil.copytree(hf_dirs["llama"], d)
    cfg = json.load(open(d / "config.json"))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError,
                       match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[128, 64\].*implies \[96, 64\]"):
        from_pretrained(d)


def test_weights_the_config_does_not_describe_are_refused(hf_dirs, tmp_path):
    d = tmp_path / "extra_layer"
    shutil.copytree(hf_dirs["qwen2"], d)
    cfg = json.load(open(d / "config.json"))
    cfg["num_hidden_layers"] = 1
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"not described by .*config\.json: 'model\.layers\.1\."):
        from_pretrained(d)


def test_unsupported_architecture(hf_dirs, tmp_path):
    d = tmp_path / "gemma"
    shutil.copytree(hf_dirs["llama"], d)
    cfg = json.load(open(d / "config.json"))
    cfg["model_type"] = "gemma"
    cfg["architectures"] = ["GemmaForCausalLM"]
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(UnsupportedModelError, match=r"config\.json.*unsupported model_type 'gemma'"):
        from_pretrained(d)
    with pytest.raises(UnsupportedModelError, match="rope_type 'yarn'"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        ModelConfig(arch="bert")


def test_pickle_checkpoints_are_refused(hf_dirs, tmp_path):
    d = tmp_path / "pickle"
    os.makedirs(d)
    shutil.copy(os.path.join(hf_dirs["llama"], "config.json"), d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never read"):
        from_pretrained(d)
    with pytest.raises(ValueError, match="head must be"):
        from_pretrained(hf_dirs["llama"], head="policy")


def test_check_tokenizer_compat():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def tok(n):
        vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(n - 2)}}
        t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")

    cfg = tiny_config(vocab_size=128)
    check_tokenizer_compat(cfg, tok(100))  # a padded embedding table is fine
    check_tokenizer_compat(cfg, tok(128))
    with pytest.raises(ValueError, match=r"tokenizer has 129 tokens.*vocab_size=128"):
        check_tokenizer_compat(cfg, tok(129))


def test_bad_inputs_raise_clear_errors():
    cfg = tiny_config()
    model = CausalLM(cfg)
    params = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))  # errors come at trace time
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \[2, 4\]"):
        jax.eval_shape(model.apply, params, jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="input_ids: expected an integer array"):
        jax.eval_shape(model.apply, params, jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids .* cannot be combined with a KV cache"):
        jax.eval_shape(lambda p: model.apply(p, jnp.zeros((2, 4), jnp.int32), segment_ids=jnp.ones((2, 4), jnp.int32),
                                             cache=init_cache(cfg, 2, 8)), params)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_config(num_heads=4, num_kv_heads=3)


# ---- small pure helpers ----------------------------------------------------------------------
def test_last_token_values_hand_computed():
    v = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0], [0.5, 0.5, 0.5, 0.5]])
    m = jnp.array([[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(last_token_values(v, m)), [4.0, 6.0, 10.0, 0.0])


def test_flops_per_token_hand_computed():
    cfg = tiny_config(vocab_size=100, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
                      intermediate_size=16)
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; mlp 3*8*16 = 384; head 8*100 = 800
    n = 2 * (192 + 384) + 800
    assert flops_per_token(cfg, 10) == 6 * n + 6 * 2 * 2 * 4 * 10
    assert flops_per_token(cfg, 10, training=False) == 2 * n + 2 * 2 * 2 * 4 * 10
    assert flops_per_token(cfg, 10, lm_head=False) == 6 * (n - 800) + 6 * 2 * 2 * 4 * 10  # a scalar-head model
    params = jax.eval_shape(lambda k: init_params(CausalLM(cfg), k), jax.random.PRNGKey(0))  # shapes only, no compile
    # matmul params = all params minus input embedding and norms (tied=False: lm_head counted once)
    norms = 2 * (2 * 8) + 8
    assert count_params(params) - count_params(params, exclude=("embed",)) == 100 * 8
    assert count_params(params, exclude=("embed",)) - norms == n


def test_config_hf_round_trip_and_hashable():
    for arch in ("gpt2", "llama", "mistral", "qwen2", "qwen3"):
        cfg = tiny_config(arch=arch, rope_scaling=None if arch == "gpt2" else {"rope_type": "linear", "factor": 2.0})
        back = ModelConfig.from_hf(cfg.to_hf())
        assert back == cfg and hash(back) == hash(cfg)
    cfg = tiny_config(dtype=jnp.bfloat16)
    assert cfg.dtype == "bfloat16" and cfg.compute_dtype == jnp.bfloat16


def test_bf16_params_save_and_load(hf_dirs, tmp_path):
    model, params = from_pretrained(hf_dirs["llama"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    saved = save_pretrained(tmp_path / "bf16", model, params)
    assert json.load(open(os.path.join(saved, "config.json")))["dtype"] == "bfloat16"
    assert load_file(os.path.join(saved, "model.safetensors"))["model.norm.weight"].dtype.name == "bfloat16"
    _, params2 = from_pretrained(saved, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
                 params, params2)
    _, params32 = from_pretrained(hf_dirs["llama"])
    _, params_up = from_pretrained(saved)  # bf16 file read into f32 params: the rounded f32 weights
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-3),
                 params32, params_up)
