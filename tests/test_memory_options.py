"""Memory options: each gives the same loss (to tolerance) as the f32 / unchunked / no-remat baseline, and
its effect on the compiled program's bytes is what benchmarks/memory_options.py reports."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models
from rlhf_jax.config import ConfigError
from rlhf_jax.models import lora
from rlhf_jax.rl.experience import policy_forward
from rlhf_jax.training.optim import OptimConfig, make_optimizer, scale_by_adam_in
from rlhf_jax.training.state import TrainState


def _batch(b=2, p=5, n=8, vocab=128, seed=0):
    r = np.random.default_rng(seed)
    p_ids = jnp.asarray(r.integers(3, vocab, (b, p)), jnp.int32)
    p_mask = jnp.ones((b, p), jnp.int32).at[0, :2].set(0)
    r_ids = jnp.asarray(r.integers(3, vocab, (b, n)), jnp.int32)
    r_mask = jnp.ones((b, n), jnp.int32).at[1, 6:].set(0)
    return p_ids, p_mask, r_ids, r_mask


def test_adam_state_in_bf16_matches_f32():
    # the f32 instance of the low-precision Adam is optax's Adam
    g = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    ours, ref = scale_by_adam_in("float32", 0.9, 0.95, 1e-8), optax.scale_by_adam(0.9, 0.95, 1e-8)
    so, sr = ours.init(g), ref.init(g)
    for i in range(3):
        gi = jax.tree_util.tree_map(lambda x: x * (i + 1.0), g)
        uo, so = ours.update(gi, so)
        ur, sr = ref.update(gi, sr)
        np.testing.assert_allclose(uo["w"], ur["w"], rtol=1e-6)
    # a tiny model trained 5 steps with bf16 moments: same losses to 1e-3, half the optimiser bytes
    model = models.CausalLM(models.tiny_config())
    params = models.init_params(model, jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (4, 12)), jnp.int32)

    def loss(p):
        lp = jax.nn.log_softmax(model.apply(p, ids[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1))

    out = {}
    for dt in ("float32", "bfloat16"):
        tx = make_optimizer(OptimConfig(learning_rate=3e-3, state_dtype=dt), params, total_steps=5)
        st = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        step = jax.jit(lambda s: (s.apply_gradients(jax.grad(loss)(s.params)), loss(s.params)))
        losses = []
        for _ in range(5):
            st, lv = step(st)
            losses.append(float(lv))
        out[dt] = (losses, sum(x.nbytes for x in jax.tree_util.tree_leaves(st.opt_state)))
    np.testing.assert_allclose(out["bfloat16"][0], out["float32"][0], rtol=1e-3)
    assert out["float32"][0][-1] < out["float32"][0][0] - 0.05
    assert 0.49 < out["bfloat16"][1] / out["float32"][1] < 0.51
    with pytest.raises(ConfigError, match="optim.state_dtype"):
        OptimConfig(state_dtype="int8").validate()


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_policies_give_the_same_loss_and_gradients(policy):
    cfg = models.tiny_config()
    params = models.init_params(models.CausalLM(cfg), jax.random.PRNGKey(1))
    p_ids, p_mask, r_ids, r_mask = _batch()

    def loss(c):
        m = models.CausalLM(c)
        return lambda p: jnp.sum(policy_forward(m, p, p_ids, p_mask, r_ids, r_mask, 1.0)["logp"])

    base_l, base_g = jax.value_and_grad(loss(cfg))(params)
    l, g = jax.value_and_grad(loss(cfg.replace(remat=True, remat_policy=policy)))(params)
    np.testing.assert_allclose(l, base_l, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, base_g)
    with pytest.raises(ValueError, match="remat_policy"):
        cfg.replace(remat_policy="some")


@pytest.mark.parametrize("kind", ["lm", "value", "lora"])
def test_logits_chunk_gives_the_same_logp_entropy_values_and_gradients(kind):
    cfg = models.tiny_config()
    cls = models.CausalLMWithValueHead if kind == "value" else models.CausalLM
    params = models.init_params(cls(cfg), jax.random.PRNGKey(2))
    lcfg = lora.LoraConfig(rank=2)
    if kind == "lora":
        ad = lora.init_adapters(params, lcfg, jax.random.PRNGKey(3))
        ad = jax.tree_util.tree_map(lambda x: x + 0.01, ad)
        params = {"params": params["params"], "lora": ad}
    p_ids, p_mask, r_ids, r_mask = _batch()

    def run(c):
        m = cls(c) if kind != "lora" else lora.wrap(models.CausalLM(c), lcfg)

        def f(p):
            out = policy_forward(m, p, p_ids, p_mask, r_ids, r_mask, jnp.float32(0.7))
            return jnp.sum(out["logp"]) + 0.1 * jnp.sum(out["entropy"]) + jnp.sum(out.get("values", 0.0)), out
        (l, out), g = jax.value_and_grad(f, has_aux=True)(params)
        return out, g

    whole, g0 = run(cfg)
    parts, g1 = run(cfg.replace(logits_chunk=2))
    assert set(parts) == set(whole)
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g0)


def test_memory_analysis_shows_each_option_saving_bytes():
    from benchmarks import memory_options

    rows = {r["option"]: r for r in memory_options.measure(
        memory_options.SMALL, ["baseline", "logits_chunk", "remat_full", "state_bf16", "lora_r8"])}
    base = rows["baseline"]
    assert rows["logits_chunk"]["temp_bytes"] < base["temp_bytes"]
    assert rows["remat_full"]["temp_bytes"] < base["temp_bytes"]
    assert rows["state_bf16"]["argument_bytes"] < base["argument_bytes"]
    assert rows["lora_r8"]["argument_bytes"] < base["argument_bytes"]


def test_per_model_param_dtypes_reach_the_models(tmp_path):
    from pathlib import Path

    from rlhf_jax.config import apply_overrides, load_config_file
    from rlhf_jax.rl import trainer as rl_trainer

    root = Path(__file__).resolve().parents[1]
    cfg = apply_overrides(load_config_file(root / "experiments" / "ppo_sort_tiny.py"), [
        f"out_dir={tmp_path}", "ref_param_dtype=bfloat16", "value_param_dtype=bfloat16", "policy.logits_chunk=5"])
    s = rl_trainer._build(cfg).setup
    dts = lambda t: {x.dtype for x in jax.tree_util.tree_leaves(t)}  # noqa: E731
    assert dts(s.frozen.ref_params) == {jnp.dtype("bfloat16")}
    assert dts(s.value_params) == {jnp.dtype("bfloat16")} and dts(s.policy_params) == {jnp.dtype("float32")}
    # a bf16-stored reference gives the f32 reference's log-probs to bf16 rounding
    p_ids, p_mask, r_ids, r_mask = _batch(n=10, vocab=s.policy_model.config.vocab_size)
    f32 = policy_forward(s.policy_model, s.policy_params, p_ids, p_mask, r_ids, r_mask, 1.0)["logp"]
    b16 = policy_forward(s.policy_model, s.frozen.ref_params, p_ids, p_mask, r_ids, r_mask, 1.0)["logp"]
    np.testing.assert_allclose(b16, f32, atol=0.05)
    with pytest.raises(ConfigError, match="policy.logits_chunk"):
        rl_trainer.validate_rl_config(apply_overrides(cfg, ["policy.logits_chunk=3"]))
    with pytest.raises(ConfigError, match="ref_param_dtype"):
        rl_trainer.validate_rl_config(apply_overrides(cfg, ["ref_param_dtype=int8"]))


# ------------------------------------------------------------------ the loss's logits in chunks: SFT and DPO

def _sft_batch(b=3, t=11, vocab=None, seed=4):
    vocab = vocab or models.tiny_config().vocab_size
    r = np.random.default_rng(seed)
    ids = jnp.asarray(r.integers(3, vocab, (b, t)), jnp.int32)
    attn = jnp.ones((b, t), jnp.int32).at[2, 8:].set(0)
    loss_mask = attn.at[:, :3].set(0).at[0, -1].set(0)
    return {"input_ids": ids, "targets": jnp.roll(ids, -1, axis=1), "loss_mask": loss_mask, "attention_mask": attn}


@pytest.mark.parametrize("chunk", [1, 4, 11, 32])  # 4 and 32 do not divide T = 11: the tail is padded
@pytest.mark.parametrize("reduction", ["token", "sequence", "sum"])
def test_sft_loss_chunked_equals_sft_loss_values_metrics_and_gradients(chunk, reduction):
    from rlhf_jax.losses import sft_loss, sft_loss_chunked

    r = np.random.default_rng(5)
    hidden = jnp.asarray(r.normal(size=(3, 11, 16)), jnp.float32)
    w = jnp.asarray(r.normal(size=(16, 50)) * 0.3, jnp.float32)
    targets = jnp.asarray(r.integers(0, 50, (3, 11)), jnp.int32)
    mask = jnp.asarray(r.integers(0, 2, (3, 11)), jnp.float32).at[:, 0].set(1.0)

    def whole(h, w):
        return sft_loss(h @ w, targets, mask, reduction=reduction)

    def parts(h, w):
        return sft_loss_chunked(lambda x: x @ w, h, targets, mask, chunk=chunk, reduction=reduction)

    (l0, m0), g0 = jax.value_and_grad(whole, argnums=(0, 1), has_aux=True)(hidden, w)
    (l1, m1), g1 = jax.value_and_grad(parts, argnums=(0, 1), has_aux=True)(hidden, w)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for k in m0:
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_token_logprobs_refuses_a_bad_chunk_and_shapes():
    from rlhf_jax.losses import chunked_token_logprobs

    h, t, m = jnp.zeros((2, 4, 3)), jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4))
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        chunked_token_logprobs(lambda x: x, h, t, m, chunk=0)
    with pytest.raises(ValueError, match="targets"):
        chunked_token_logprobs(lambda x: x, h, t[:, :3], m, chunk=2)


@pytest.mark.parametrize("use_lora", [False, True])
def test_sft_step_with_logits_chunk_matches_the_whole_logits(use_lora):
    from rlhf_jax.training.sft import SFTStepConfig, sft_step, sft_sums

    cfg = models.tiny_config()
    params = models.init_params(models.CausalLM(cfg), jax.random.PRNGKey(6))
    model = models.CausalLM(cfg)
    if use_lora:
        lcfg = lora.LoraConfig(rank=2)
        ad = jax.tree_util.tree_map(lambda x: x + 0.01, lora.init_adapters(params, lcfg, jax.random.PRNGKey(7)))
        model, params = lora.wrap(model, lcfg), {"params": params["params"], "lora": ad}
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), params, total_steps=4)
    batch = _sft_batch()
    mets, grads = [], []
    for chunk in (0, 4):
        st = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        _, met = jax.jit(sft_step, static_argnames="cfg")(st, batch, cfg=SFTStepConfig(logits_chunk=chunk))
        mets.append(met)
        num = lambda p: sft_sums(p, batch, None, apply_fn=model.apply, logits_chunk=chunk)[0]  # noqa: E731
        grads.append(jax.grad(num)(params))
    for k in ("loss", "nll", "accuracy", "grad_norm"):
        np.testing.assert_allclose(mets[1][k], mets[0][k], rtol=1e-5, err_msg=k)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads[1], grads[0])


def test_sft_step_logits_chunk_lowers_the_compiled_temporaries():
    from rlhf_jax.training.sft import SFTStepConfig, sft_step

    cfg = models.tiny_config().replace(vocab_size=8192)
    model = models.CausalLM(cfg)
    params = models.init_params(model, jax.random.PRNGKey(8))
    tx = make_optimizer(OptimConfig(learning_rate=1e-3), params, total_steps=4)
    st = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    batch = _sft_batch(b=4, t=64, vocab=8192)
    temp = {}
    for chunk in (0, 16):
        c = jax.jit(sft_step, static_argnames="cfg").lower(st, batch, cfg=SFTStepConfig(logits_chunk=chunk)).compile()
        temp[chunk] = c.memory_analysis().temp_size_in_bytes
    logits_bytes = 4 * 64 * 8192 * 4
    assert temp[16] < temp[0] - logits_bytes, temp  # at least one whole [B, T, V] f32 buffer saved


def test_dpo_completion_logps_with_logits_chunk_match():
    from rlhf_jax.rl.dpo import completion_logps

    cfg = models.tiny_config()
    params = models.init_params(models.CausalLM(cfg), jax.random.PRNGKey(9))
    b = _sft_batch(seed=10)
    ids, mask, lmask = b["input_ids"], b["attention_mask"], b["loss_mask"]

    def f(c):
        return lambda p: completion_logps(models.CausalLM(c), p, ids, mask, lmask)[0]

    l0, g0 = jax.value_and_grad(lambda p: jnp.sum(f(cfg)(p)))(params)
    l1, g1 = jax.value_and_grad(lambda p: jnp.sum(f(cfg.replace(logits_chunk=3))(p)))(params)
    np.testing.assert_allclose(f(cfg.replace(logits_chunk=3))(params), f(cfg)(params), rtol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
