"""LoRA adapters (rlhf_jax.models.lora): the merge, the wrapper, frozen base, PEFT files both ways."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.config import ConfigError
from rlhf_jax.models import lora
from rlhf_jax.training.optim import OptimConfig, make_optimizer
from rlhf_jax.training.state import TrainState

from tests.hf_utils import hf_logits, left_padded_batch, load_hf_model, make_hf_model


def _tiny(rng=0):
    model = models.CausalLM(models.tiny_config())
    return model, models.init_params(model, jax.random.PRNGKey(rng))


def _random_b(adapters, key, std=0.05):
    """Adapters with a non-zero B (a fresh adapter is the identity)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    out = [x if path[-1].key == "a" else std * jax.random.normal(jax.random.fold_in(key, i), x.shape)
           for i, (path, x) in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(tree, out)


def test_merge_is_w_plus_scaled_ab_and_fresh_adapters_are_identity():
    model, params = _tiny()
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    ad = lora.init_adapters(params, cfg, jax.random.PRNGKey(1))
    paths = lora.adapter_paths(ad)
    # default targets: q/k/v/o + gate/up/down on both layers
    assert len(paths) == 2 * 7
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 9)), jnp.int32)
    wm = lora.wrap(model, cfg)
    np.testing.assert_array_equal(wm.apply({"params": params["params"], "lora": ad}, ids), model.apply(params, ids))
    ad = _random_b(ad, jax.random.PRNGKey(2))
    merged = lora.merge(params, ad, cfg)["params"]
    q = ad["model"]["layers_1"]["attn"]["o_proj"]
    w = params["params"]["model"]["layers_1"]["attn"]["o_proj"]["kernel"]  # [H, Dh, D]: two input axes
    np.testing.assert_allclose(merged["model"]["layers_1"]["attn"]["o_proj"]["kernel"],
                               w + (cfg.scale * q["a"] @ q["b"]).reshape(w.shape), rtol=1e-6, atol=1e-7)
    assert q["a"].shape == (w.shape[0] * w.shape[1], 4) and q["b"].shape == (4, w.shape[2])
    out = wm.apply({"params": params["params"], "lora": ad}, ids)
    np.testing.assert_allclose(out, model.apply(lora.merge(params, ad, cfg), ids), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out - model.apply(params, ids)))) > 1e-3  # the adapters do something
    # adapters off = the base exactly
    np.testing.assert_array_equal(wm.apply(lora.base_params({"params": params["params"], "lora": ad}), ids),
                                  model.apply(params, ids))
    assert cfg.scale == 2.0 and lora.LoraConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0


def test_targets_regex_and_bad_config_name_the_key():
    _, params = _tiny()
    ad = lora.init_adapters(params, lora.LoraConfig(rank=2, targets=(r"layers_0/attn/(q|v)_proj",)),
                            jax.random.PRNGKey(0))
    assert [p[1:3] for p in lora.adapter_paths(ad)] == [("layers_0", "attn")] * 2
    with pytest.raises(ConfigError, match="lora_targets"):
        lora.init_adapters(params, lora.LoraConfig(rank=2, targets=("nothing_here",)), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="lora_rank"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="lora_targets"):
        lora.LoraConfig(targets=("(",))


def test_base_is_frozen_only_adapters_get_optimiser_state_and_updates():
    model, params = _tiny()
    cfg = lora.LoraConfig(rank=2)
    wm = lora.wrap(model, cfg)
    var = {"params": params["params"], "lora": lora.init_adapters(params, cfg, jax.random.PRNGKey(1))}
    tx = make_optimizer(OptimConfig(learning_rate=1e-2), var, total_steps=10)
    st = TrainState.create(apply_fn=wm.apply, params=var, tx=tx)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(st.opt_state) if x.ndim > 0)
    n_lora = sum(x.size for x in jax.tree_util.tree_leaves(var["lora"]))
    assert n_state == 2 * n_lora  # Adam moments of the adapters only
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 8)), jnp.int32)

    def loss(p):
        return jnp.mean(jax.nn.log_softmax(wm.apply(p, ids))[..., 5])

    g = jax.grad(loss)(var)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(g["params"]))
    assert float(jnp.abs(g["lora"]["model"]["layers_0"]["attn"]["q_proj"]["b"]).max()) > 0
    st2 = st.apply_gradients(g)
    jax.tree_util.tree_map(np.testing.assert_array_equal, st2.params["params"], var["params"])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_round_trip_logits(tmp_path, family):
    """Our adapter -> PEFT files -> peft.PeftModel logits == ours; a PEFT adapter -> ours == peft's."""
    import peft
    import torch

    base_dir = make_hf_model(family, tmp_path / "base")
    model, params = models.from_pretrained(base_dir)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, rslora=family == "qwen2")
    ad = _random_b(lora.init_adapters(params, cfg, jax.random.PRNGKey(3)), jax.random.PRNGKey(4))
    ids, mask = left_padded_batch(np.random.default_rng(0), [7, 5], 8, 128)
    ours = np.asarray(lora.wrap(model, cfg).apply({"params": params["params"], "lora": ad}, ids,
                                                  attention_mask=mask))
    out = lora.save_peft_adapter(tmp_path / "adapter", model.config, cfg, ad)
    meta = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert meta["r"] == 4 and meta["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(load_hf_model(base_dir), out)
    pm.eval()
    theirs = hf_logits(pm, ids, mask)
    m = mask.astype(bool)
    assert np.abs(ours - np.asarray(hf_logits(base_dir, ids, mask))).max() > 1e-3
    np.testing.assert_allclose(ours[m], theirs[m], atol=1e-4, rtol=0)

    # the other way: a PEFT-made adapter (random B) loads as our starting point
    torch.manual_seed(0)
    pcfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False)
    pm2 = peft.get_peft_model(load_hf_model(base_dir), pcfg)
    pm2.eval()
    pm2.save_pretrained(tmp_path / "peft_made")
    lcfg, ad2 = lora.load_peft_adapter(tmp_path / "peft_made", model.config)
    assert lcfg.rank == 2 and lcfg.alpha == 6 and len(lora.adapter_paths(ad2)) == 3 * 2
    ours2 = np.asarray(lora.wrap(model, lcfg).apply({"params": params["params"], "lora": ad2}, ids,
                                                    attention_mask=mask))
    np.testing.assert_allclose(ours2[m], hf_logits(pm2, ids, mask)[m], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_modules_to_save_train_a_copy_and_round_trip_through_peft(tmp_path, tied):
    """lora_modules_to_save: the embedding (and an untied LM head) train as copies in the adapter tree; the base
    keeps the originals (adapters off = the starting model); PEFT's modules_to_save files both ways."""
    import peft

    base_dir = make_hf_model("llama", tmp_path / "base", tie_word_embeddings=tied)
    model, params = models.from_pretrained(base_dir)
    mods = ("embed_tokens",) if tied else ("embed_tokens", "lm_head")
    cfg = lora.LoraConfig(rank=2, alpha=4.0, modules_to_save=mods)
    ad = lora.init_adapters(params, cfg, jax.random.PRNGKey(5))
    assert set(ad["modules"]) == ({"model"} if tied else {"model", "lm_head"})
    assert lora.missing_modules(params, lora.LoraConfig(modules_to_save=("lm_head",))) == (["lm_head"] if tied else [])
    ids, mask = left_padded_batch(np.random.default_rng(1), [7, 5], 8, 128)
    lm = lora.wrap(model, cfg)
    base_logits = np.asarray(model.apply(params, ids, attention_mask=mask))
    np.testing.assert_allclose(np.asarray(lm.apply({"params": params["params"], "lora": ad}, ids, attention_mask=mask)),
                               base_logits, atol=1e-6)  # fresh copies + zero B: the base model

    # the copies get gradients and optimiser state; the base originals get neither
    var = {"params": params["params"], "lora": ad}
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), var, total_steps=2)
    st = TrainState.create(apply_fn=lm.apply, params=var, tx=tx)
    g = jax.grad(lambda v: jnp.sum(lm.apply(v, ids, attention_mask=mask)[:, -1, :5]))(var)
    assert float(jnp.abs(g["lora"]["modules"]["model"]["embed"]["embedding"]).max()) > 0
    assert float(jnp.abs(g["params"]["model"]["embed"]["embedding"]).max()) == 0
    st2 = st.apply_gradients(grads=g)
    np.testing.assert_array_equal(st2.params["params"]["model"]["embed"]["embedding"],
                                  params["params"]["model"]["embed"]["embedding"])
    trained = _random_b(st2.params["lora"], jax.random.PRNGKey(6))
    trained["modules"] = jax.tree_util.tree_map(lambda x: x + 0.05, st2.params["lora"]["modules"])
    ours = np.asarray(lm.apply({"params": params["params"], "lora": trained}, ids, attention_mask=mask))
    m = mask.astype(bool)
    assert np.abs(ours - base_logits)[m].max() > 1e-3

    out = lora.save_peft_adapter(tmp_path / "adapter", model.config, cfg, trained)
    meta = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert sorted(meta["modules_to_save"]) == sorted(mods) and meta["ensure_weight_tying"] == tied
    pm = peft.PeftModel.from_pretrained(load_hf_model(base_dir), out)
    pm.eval()
    np.testing.assert_allclose(ours[m], hf_logits(pm, ids, mask)[m], atol=1e-4, rtol=0)
    lcfg, back = lora.load_peft_adapter(out, model.config)
    assert lcfg.modules_to_save == mods
    again = np.asarray(lora.wrap(model, lcfg).apply({"params": params["params"], "lora": back}, ids, attention_mask=mask))
    np.testing.assert_allclose(again, ours, atol=1e-5)

    # a PEFT-made adapter with modules_to_save loads too
    pcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=list(mods),
                           ensure_weight_tying=tied, init_lora_weights=False)
    pm2 = peft.get_peft_model(load_hf_model(base_dir), pcfg)
    import torch
    with torch.no_grad():
        pm2.base_model.model.model.embed_tokens.modules_to_save["default"].weight.mul_(1.1)
    pm2.eval()
    pm2.save_pretrained(tmp_path / "peft_made")
    lcfg2, ad2 = lora.load_peft_adapter(tmp_path / "peft_made", model.config)
    assert set(lcfg2.modules_to_save) == set(mods)
    ours2 = np.asarray(lora.wrap(model, lcfg2).apply({"params": params["params"], "lora": ad2}, ids,
                                                     attention_mask=mask))
    np.testing.assert_allclose(ours2[m], hf_logits(pm2, ids, mask)[m], atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="lora_modules_to_save"):
        lora.LoraConfig(modules_to_save=("norm",))


def test_peft_errors_name_the_file(tmp_path):
    cfg = models.tiny_config()
    with pytest.raises(models.CheckpointError, match="adapter_config.json"):
        lora.load_peft_adapter(tmp_path, cfg)
    (tmp_path / "adapter_config.json").write_text("{bad")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(models.CheckpointError, match="line 1"):
        lora.load_peft_adapter(tmp_path, cfg)
    with pytest.raises(models.UnsupportedModelError, match="gpt2"):
        lora.save_peft_adapter(tmp_path / "x", models.tiny_config(arch="gpt2"), lora.LoraConfig(), {})


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("head", [None, "scalar", "value"])
def test_unmerged_training_forward_equals_the_merged_model(remat, head):
    """LoraModel.apply adds (x·a)·(s·b) in every targeted Linear (lora_variables); generation and export use
    merge(). Both must be the same function, also through nn.remat (the "lora" collection is lifted) and for
    the scalar-head and value-head models; and the adapters must change the output (never silently dropped)."""
    cfg = models.tiny_config(remat=remat)
    cls = {None: models.CausalLM, "scalar": models.ScalarHeadModel, "value": models.CausalLMWithValueHead}[head]
    m = cls(cfg)
    p = models.init_params(m, jax.random.PRNGKey(0))
    lc = lora.LoraConfig(rank=2, alpha=6.0)
    ad = _random_b(lora.init_adapters(p, lc, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
    v = {"params": p["params"], "lora": ad}
    ids = jnp.asarray(np.random.default_rng(3).integers(3, 100, (2, 6)), jnp.int32)
    flat = lambda out: jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(out)])  # noqa: E731
    unmerged = flat(lora.wrap(m, lc).apply(v, ids))
    mm, mp = lora.merged(lora.wrap(m, lc), v)
    np.testing.assert_allclose(unmerged, flat(mm.apply(mp, ids)), atol=1e-5)
    assert float(jnp.abs(unmerged - flat(m.apply(p, ids))).max()) > 1e-3
