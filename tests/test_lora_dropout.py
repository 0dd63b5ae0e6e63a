"""LoRA dropout (PEFT's ``lora_B(lora_A(dropout(x))) · s``): the formula on one Linear, the deterministic
forwards unchanged, independent masks per module, the supervised steps' keys (reproducible, exact
resume), the config errors, and ``lora_dropout`` through PEFT adapter files."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.config import ConfigError, apply_overrides, load_config_file
from rlhf_jax.models import lora
from rlhf_jax.models.architecture import CheckpointError
from rlhf_jax.models.transformer import Linear
from rlhf_jax.pipeline import PipelineConfig
from rlhf_jax.rl import dpo as dpo_mod
from rlhf_jax.training import reward as reward_mod
from rlhf_jax.training import sft as sft_mod
from rlhf_jax.training.common import add_lora
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.optim import OptimConfig, make_optimizer
from rlhf_jax.training.state import TrainState

from tests.hf_utils import hf_logits, left_padded_batch, load_hf_model, make_hf_model

SMALL = ["task=sort", "model.name=task", "model.hidden_size=32", "model.intermediate_size=64",
         "data.batch_size=4", "data.max_length=32", "log.progress=false", "log.every=1", "log.tensorboard=false",
         "eval_batches=1"]


def _rand(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


def _linear_vars(k, n, r, key, p):
    ks = jax.random.split(key, 3)
    return {"params": {"kernel": _rand(ks[0], (k, n), 0.3)},
            "lora": {"a": _rand(ks[1], (k, r), 0.3), "b": _rand(ks[2], (r, n), 0.3),
                     "dropout": jnp.asarray(p, jnp.float32)}}


def test_one_linear_matches_the_numpy_formula_with_the_mask_extracted():
    k, n, r, p = 6, 6, 3, 0.4
    x = _rand(jax.random.PRNGKey(0), (2, 5, k)) + 3.0  # no exact zeros: the probe's zeros are the mask's
    key = jax.random.PRNGKey(7)
    lin = Linear(features=n)
    # the probe: W = 0, a = b = I, so the output is the dropped-out input itself, x·m/(1-p)
    probe = {"params": {"kernel": jnp.zeros((k, n))},
             "lora": {"a": jnp.eye(k), "b": jnp.eye(k), "dropout": jnp.asarray(p, jnp.float32)}}
    dropped = np.asarray(lin.apply(probe, x, rngs={"dropout": key}))
    mask = dropped != 0
    assert 0.3 < 1 - mask.mean() < 0.5  # about p of the units dropped
    np.testing.assert_allclose(dropped[mask], np.asarray(x)[mask] / (1 - p), rtol=1e-6)
    # the mask depends on the key and the shape only: the same key on real weights uses it
    v = _linear_vars(k, n, r, jax.random.PRNGKey(1), p)
    got = np.asarray(lin.apply(v, x, rngs={"dropout": key}))
    xs, w, a, b = (np.asarray(t, np.float64) for t in (x, v["params"]["kernel"], v["lora"]["a"], v["lora"]["b"]))
    want = xs @ w + ((xs * mask / (1 - p)) @ a) @ b  # PEFT: base(x) + lora_B(lora_A(dropout(x))) (s folded in b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # no key: the deterministic forward, x·W + (x·a)·b
    np.testing.assert_allclose(np.asarray(lin.apply(v, x)), xs @ w + (xs @ a) @ b, rtol=1e-5, atol=1e-5)
    assert np.abs(got - np.asarray(lin.apply(v, x))).max() > 1e-2


def test_the_expectation_over_masks_is_the_deterministic_adapter_path():
    k, n, r, p = 8, 4, 2, 0.3
    x = _rand(jax.random.PRNGKey(0), (3, k))
    v = _linear_vars(k, n, r, jax.random.PRNGKey(1), p)
    v["params"]["kernel"] = jnp.zeros((k, n))  # the adapter path alone
    lin = Linear(features=n)
    outs = jax.vmap(lambda key: lin.apply(v, x, rngs={"dropout": key}))(
        jax.random.split(jax.random.PRNGKey(2), 20000))
    det = np.asarray(lin.apply(v, x))
    mean = np.asarray(outs.mean(0))
    # the standard error of the mean over 20000 masks is ~0.004 of these values' scale
    np.testing.assert_allclose(mean, det, atol=0.03 * np.abs(det).max())
    assert float(jnp.std(outs, axis=0).min()) > 1e-3  # the masks do vary


class _Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Linear(features=4, name="first")(x), Linear(features=4, name="second")(x)


def test_each_linear_draws_its_own_mask():
    x = _rand(jax.random.PRNGKey(0), (4, 8))
    one = _linear_vars(8, 4, 2, jax.random.PRNGKey(1), 0.5)
    v = {c: {"first": one[c], "second": one[c]} for c in ("params", "lora")}  # the same weights twice
    y1, y2 = _Two().apply(v, x, rngs={"dropout": jax.random.PRNGKey(3)})
    d1, d2 = _Two().apply(v, x)
    np.testing.assert_array_equal(d1, d2)
    assert np.abs(np.asarray(y1 - y2)).max() > 1e-3


def _tiny(remat=False):
    model = models.CausalLM(models.tiny_config(remat=remat))
    return model, models.init_params(model, jax.random.PRNGKey(0))


def _random_b(adapters, key, std=0.1):
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    out = [x if path[-1].key == "a" else std * jax.random.normal(jax.random.fold_in(key, i), x.shape)
           for i, (path, x) in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.mark.parametrize("remat", [False, True])
def test_rate_zero_and_no_key_forwards_are_unchanged_and_the_keyed_one_differs(remat):
    model, params = _tiny(remat)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 9)), jnp.int32)
    cfg0 = lora.LoraConfig(rank=4, alpha=8.0)
    ad = _random_b(lora.init_adapters(params, cfg0, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
    var = {"params": params["params"], "lora": ad}
    key = {"dropout": jax.random.PRNGKey(5)}
    # today's unmerged forward, built by hand: the lora collection of a/b only
    plain = model.apply(lora.lora_variables(var, ad, cfg0), ids)
    q = ("lora", "model", "layers_0", "attn", "q_proj")
    get = lambda v: v[q[0]][q[1]][q[2]][q[3]][q[4]]  # noqa: E731
    assert set(get(lora.lora_variables(var, ad, dataclasses.replace(cfg0, dropout=0.3)))) == {"a", "b"}
    assert set(get(lora.lora_variables(var, ad, dataclasses.replace(cfg0, dropout=0.3), dropout=True))) == {
        "a", "b", "dropout"}
    assert set(get(lora.lora_variables(var, ad, cfg0, dropout=True))) == {"a", "b"}  # rate 0: nothing to drop
    np.testing.assert_array_equal(lora.wrap(model, cfg0).apply(var, ids), plain)
    np.testing.assert_array_equal(lora.wrap(model, cfg0).apply(var, ids, rngs=key), plain)  # rate 0: key unused
    wd = lora.wrap(model, dataclasses.replace(cfg0, dropout=0.3))
    np.testing.assert_array_equal(wd.apply(var, ids), plain)  # no key: eval/generation/scoring
    np.testing.assert_array_equal(lora.merged(wd, var)[0].apply(lora.merged(wd, var)[1], ids),
                                  lora.merged(lora.wrap(model, cfg0), var)[0].apply(
                                      lora.merged(lora.wrap(model, cfg0), var)[1], ids))
    np.testing.assert_array_equal(wd.apply(lora.base_params(var), ids, rngs=key),
                                  model.apply(params, ids))  # adapters off (the reference): the base exactly
    a = wd.apply(var, ids, rngs=key)
    assert float(jnp.abs(a - plain).max()) > 1e-3
    np.testing.assert_array_equal(wd.apply(var, ids, rngs=key), a)  # same key, same masks
    b = wd.apply(var, ids, rngs={"dropout": jax.random.PRNGKey(6)})
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_remat_recomputes_the_same_masks():
    """nn.remat recomputes the layer in the backward pass: the same masks as the forward (values and
    gradients equal those of the model without remat)."""
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 9)), jnp.int32)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.3)
    out = []
    for remat in (False, True):
        model, params = _tiny(remat)
        ad = _random_b(lora.init_adapters(params, cfg, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
        wd = lora.wrap(model, cfg)
        loss = lambda ad_: jnp.mean(wd.apply({"params": params["params"], "lora": ad_}, ids,  # noqa: E731
                                             rngs={"dropout": jax.random.PRNGKey(5)}) ** 2)
        out.append(jax.value_and_grad(loss)(ad))
    (v0, g0), (v1, g1) = out
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7), g1, g0)


def test_config_errors_name_the_key():
    ok = ModelSection(lora_rank=4, lora_dropout=0.1)
    ok.validate(lora_dropout_ok=True)
    with pytest.raises(ConfigError, match=r"'model\.lora_dropout'.*RL trainers.*importance ratio 1"):
        ok.validate()  # the RL trainers' check
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"'model\.lora_dropout'.*\[0, 1\)"):
            ModelSection(lora_rank=4, lora_dropout=bad).validate(lora_dropout_ok=True)
    with pytest.raises(ConfigError, match=r"'policy\.lora_dropout'.*lora_dropout needs LoRA"):
        ModelSection(lora_dropout=0.1).validate("policy.", lora_dropout_ok=True)
    with pytest.raises(ConfigError, match="lora_dropout"):
        lora.LoraConfig(rank=2, dropout=1.0)
    # the trainers: SFT refuses dropout without LoRA before building anything; DPO accepts it with LoRA
    with pytest.raises(ConfigError, match="lora_dropout needs LoRA"):
        sft_mod.validate_sft_config(apply_overrides(sft_mod.SFTConfig(), SMALL + ["model.lora_dropout=0.1"]))
    sft_mod.validate_sft_config(apply_overrides(sft_mod.SFTConfig(), SMALL + ["model.lora_dropout=0.1",
                                                                             "model.lora_rank=4"]))
    dpo_cfg = dpo_mod.DPOTrainConfig(task="sort", policy=ModelSection(name="task", lora_rank=4, lora_dropout=0.1))
    dpo_mod.validate_dpo_config(dpo_cfg)
    with pytest.raises(ConfigError, match="lora_dropout needs LoRA"):
        dpo_mod.validate_dpo_config(dataclasses.replace(dpo_cfg, policy=ModelSection(name="task", lora_dropout=0.1)))
    # the pipeline: its SFT and reward stages take it, its PPO stage refuses it
    apply_overrides(PipelineConfig(), ["sft.model.lora_rank=4", "sft.model.lora_dropout=0.1",
                                       "reward.model.lora_rank=2", "reward.model.lora_dropout=0.05"]).validate()
    with pytest.raises(ConfigError, match=r"'ppo\.policy\.lora_dropout'.*RL trainers"):
        apply_overrides(PipelineConfig(), ["ppo.policy.lora_rank=4", "ppo.policy.lora_dropout=0.1"]).validate()


def test_peft_files_carry_lora_dropout_and_lora_path_precedence(tmp_path):
    model, params = _tiny()
    cfg = lora.LoraConfig(rank=2, alpha=4.0, dropout=0.1)
    ad = lora.init_adapters(params, cfg, jax.random.PRNGKey(1))
    out = lora.save_peft_adapter(tmp_path / "ad", model.config, cfg, ad)
    meta = json.loads((Path(out) / "adapter_config.json").read_text())
    assert meta["lora_dropout"] == 0.1
    lcfg, _ = lora.load_peft_adapter(out, model.config)
    assert lcfg.dropout == 0.1 and lcfg.rank == 2
    # lora_path: lora_dropout 0 takes the adapter's, a non-zero one replaces it, a trainer without dropout gets 0
    got = lambda section, ok: add_lora(section, model, params, jax.random.PRNGKey(0), lora_dropout_ok=ok)[0].lora  # noqa: E731
    assert got(ModelSection(lora_path=out), True).dropout == 0.1
    assert got(ModelSection(lora_path=out, lora_dropout=0.05), True).dropout == 0.05
    assert got(ModelSection(lora_path=out), False).dropout == 0.0
    with pytest.raises(ConfigError, match="RL trainers"):
        got(ModelSection(lora_path=out, lora_dropout=0.05), False)
    assert got(ModelSection(lora_rank=2, lora_dropout=0.2), True).dropout == 0.2
    # a PEFT file without the key is PEFT's default 0; a bad value names the file and key
    del meta["lora_dropout"]
    (Path(out) / "adapter_config.json").write_text(json.dumps(meta))
    assert lora.load_peft_adapter(out, model.config)[0].dropout == 0.0
    meta["lora_dropout"] = 1.0
    (Path(out) / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: lora_dropout 1\.0"):
        lora.load_peft_adapter(out, model.config)


def _losses(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def _sft_cfg(out, *extra):
    return apply_overrides(sft_mod.SFTConfig(), SMALL + [
        f"out_dir={out}", "steps=8", "eval_every=0", "export=false", "model.lora_rank=4", "model.lora_alpha=8",
        "optim.learning_rate=3e-2", "optim.schedule=constant", "optim.total_steps=8", "checkpoint.every=4",
        "checkpoint.async_save=false", *extra])


def test_sft_with_dropout_trains_reproduces_and_resumes_exactly(tmp_path):
    sft_mod.train_sft(_sft_cfg(tmp_path / "a", "model.lora_dropout=0.3"))
    full = _losses(tmp_path / "a")
    assert len(full) == 8 and np.mean(full[2:]) < full[0] - 0.08  # it trains (2.82 -> 2.70 on 2026-12-06)
    sft_mod.train_sft(_sft_cfg(tmp_path / "n"))
    none = _losses(tmp_path / "n")
    assert full[0] == pytest.approx(none[0], abs=1e-6)  # b = 0 at the start: the dropped adapters add nothing
    assert abs(full[2] - none[2]) > 1e-4  # the masks change the gradients, hence the later losses
    # the same seed stopped at step 4 and resumed: the same losses (the same masks at the same steps)
    sft_mod.train_sft(_sft_cfg(tmp_path / "b", "model.lora_dropout=0.3", "steps=4"))
    res = sft_mod.train_sft(_sft_cfg(tmp_path / "b", "model.lora_dropout=0.3", "resume=true"))
    assert res.resumed_from == 4
    np.testing.assert_allclose(_losses(tmp_path / "b"), full, rtol=1e-6)


def test_reward_and_dpo_steps_use_the_step_key():
    model, params = _tiny()
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (4, 9)), jnp.int32)
    mask = jnp.ones_like(ids)
    lmask = mask.at[:, :4].set(0)
    batch = {"chosen_ids": ids[:2], "chosen_mask": mask[:2], "chosen_loss_mask": lmask[:2],
             "rejected_ids": ids[2:], "rejected_mask": mask[2:], "rejected_loss_mask": lmask[2:]}
    cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    var = {"params": params["params"],
           "lora": _random_b(lora.init_adapters(params, cfg, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))}
    tx = make_optimizer(OptimConfig(learning_rate=1e-3), var, total_steps=4)
    dcfg = dpo_mod.DPOConfig(precompute_ref=False)
    frozen = dpo_mod.DPOFrozen(ref_params=None, model=lora.wrap(model, cfg))

    def dpo_metrics(m, step=0):
        st = TrainState.create(apply_fn=m.apply, params=var, tx=tx, rng=3).replace(step=jnp.asarray(step))
        return dpo_mod.dpo_step_pure(st, dpo_mod.DPOFrozen(ref_params=None, model=m), batch, dcfg)[1]

    a, again = dpo_metrics(frozen.model), dpo_metrics(frozen.model)
    det = dpo_metrics(lora.wrap(model, dataclasses.replace(cfg, dropout=0.0)))
    later = dpo_metrics(frozen.model, step=1)
    assert float(a["policy_chosen_logp"]) == float(again["policy_chosen_logp"])
    for other in (det, later):
        assert abs(float(a["policy_chosen_logp"]) - float(other["policy_chosen_logp"])) > 1e-4
    # the reference log-probs (adapters off) and the evaluation never drop out
    ref = dpo_mod._reference_logps_impl(frozen.model, lora.base_params(var), batch)
    np.testing.assert_array_equal(ref["ref_chosen_logp"],
                                  dpo_mod._reference_logps_impl(model, params, batch)["ref_chosen_logp"])
    ev = dpo_mod.dpo_eval_pure(var, frozen, batch, dcfg)
    np.testing.assert_array_equal(ev["chosen_reward"], dpo_mod.dpo_eval_pure(
        var, dpo_mod.DPOFrozen(ref_params=None, model=det_model(model, cfg)), batch, dcfg)["chosen_reward"])

    # the reward model: the step's loss depends on the step's key, its evaluation does not
    smodel = models.ScalarHeadModel(models.tiny_config())
    sparams = models.init_params(smodel, jax.random.PRNGKey(0))
    svar = {"params": sparams["params"],
            "lora": _random_b(lora.init_adapters(sparams, cfg, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))}
    rbatch = {"chosen_ids": ids[:2], "chosen_mask": mask[:2], "rejected_ids": ids[2:], "rejected_mask": mask[2:]}
    wrapped = lora.wrap(smodel, cfg)
    sums = lambda m, rng: reward_mod.reward_sums(svar, rbatch, rng, apply_fn=m.apply)[1]["chosen_reward"][0]  # noqa: E731
    k = jax.random.PRNGKey(4)
    assert float(sums(wrapped, k)) == float(sums(wrapped, k))
    assert abs(float(sums(wrapped, k)) - float(sums(det_model(smodel, cfg), k))) > 1e-4
    np.testing.assert_array_equal(sums(wrapped, None), sums(det_model(smodel, cfg), None))


def det_model(model, cfg):
    """The same LoRA model without dropout."""
    return lora.wrap(model, dataclasses.replace(cfg, dropout=0.0))


def test_peft_reads_our_lora_dropout_and_we_read_peft_s(tmp_path):
    """Our adapter with lora_dropout 0.1 -> peft.PeftModel (its config says 0.1; in eval mode its logits
    are our no-key logits); a PEFT-made adapter with lora_dropout 0.05 loads with dropout 0.05."""
    import peft
    import torch

    base_dir = make_hf_model("llama", tmp_path / "base")
    model, params = models.from_pretrained(base_dir)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    ad = _random_b(lora.init_adapters(params, cfg, jax.random.PRNGKey(3)), jax.random.PRNGKey(4))
    ids, mask = left_padded_batch(np.random.default_rng(0), [7, 5], 8, 128)
    ours = np.asarray(lora.wrap(model, cfg).apply({"params": params["params"], "lora": ad}, ids, attention_mask=mask))
    out = lora.save_peft_adapter(tmp_path / "adapter", model.config, cfg, ad)
    pm = peft.PeftModel.from_pretrained(load_hf_model(base_dir), out)
    assert pm.peft_config["default"].lora_dropout == pytest.approx(0.1)
    pm.eval()
    m = mask.astype(bool)
    np.testing.assert_allclose(ours[m], hf_logits(pm, ids, mask)[m], atol=1e-4, rtol=0)

    torch.manual_seed(0)
    pm2 = peft.get_peft_model(load_hf_model(base_dir), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.05,
                                                                      target_modules=["q_proj", "v_proj"]))
    pm2.save_pretrained(tmp_path / "peft_made")
    assert lora.load_peft_adapter(tmp_path / "peft_made", model.config)[0].dropout == pytest.approx(0.05)


def test_reward_and_dpo_trainers_run_with_lora_dropout_and_export_it(tmp_path):
    root = Path(__file__).resolve().parents[1]
    rcfg = apply_overrides(reward_mod.RewardConfig(), SMALL + [
        f"out_dir={tmp_path / 'rm'}", "steps=2", "eval_every=0", "checkpoint.every=0", "data.pack=false",
        "model.lora_rank=2", "model.lora_dropout=0.1", "optim.learning_rate=1e-2"])
    rres = reward_mod.train_reward(rcfg)
    assert rres.model.lora.dropout == 0.1 and np.isfinite(_losses(tmp_path / "rm")).all()
    cfg = apply_overrides(load_config_file(root / "experiments" / "dpo_sentiment_tiny.py"), [
        f"out_dir={tmp_path / 'dpo'}", "steps=2", "eval_every=0", "policy.lora_rank=4", "policy.lora_dropout=0.1",
        "policy.path=", "policy.name=task", "policy.hidden_size=32", "policy.intermediate_size=64", "log.every=1",
        "log.progress=false", "log.tensorboard=false", "checkpoint.every=0", "data.batch_size=4", "dpo.lr=1e-2"])
    res = dpo_mod.train_dpo(cfg)
    meta = json.loads((Path(res.export_dir) / "adapter" / "adapter_config.json").read_text())
    assert meta["lora_dropout"] == 0.1


def test_sft_step_with_micro_batches_and_pmap_draws_per_micro_batch_and_device_keys():
    """The keyed forward inside the gradient-accumulation scan and under pmap (the device index folded in)."""
    model, params = _tiny()
    cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    var = {"params": params["params"],
           "lora": _random_b(lora.init_adapters(params, cfg, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))}
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (4, 9)), jnp.int32)
    batch = {"input_ids": ids, "targets": ids, "loss_mask": jnp.ones_like(ids), "attention_mask": jnp.ones_like(ids)}
    tx = make_optimizer(OptimConfig(learning_rate=1e-3), var, total_steps=4)

    def loss(m, micro, pmap=False):
        st = TrainState.create(apply_fn=m.apply, params=var, tx=tx, rng=3)
        step = functools.partial(sft_mod.sft_step, cfg=sft_mod.SFTStepConfig(micro_batches=micro))
        if pmap:
            rep = jax.tree_util.tree_map(lambda x: x[None], (st, batch))
            return float(jax.pmap(functools.partial(step, axis_name="d"), axis_name="d")(*rep)[1]["loss"][0])
        return float(jax.jit(step)(st, batch)[1]["loss"])

    wd, det = lora.wrap(model, cfg), det_model(model, cfg)
    for micro in (1, 2):
        assert loss(wd, micro) == loss(wd, micro)
        assert abs(loss(wd, micro) - loss(det, micro)) > 1e-4
    assert abs(loss(wd, 2) - loss(wd, 1)) > 1e-6  # each micro-batch its own key
    assert abs(loss(wd, 1, pmap=True) - loss(wd, 1)) > 1e-6  # under pmap the device index is folded in
    assert loss(det, 1, pmap=True) == pytest.approx(loss(det, 1), rel=1e-6)
