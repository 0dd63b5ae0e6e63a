"""DPO on a tiny preference set: the implicit reward margin and accuracy rise; precomputed reference
log-probs give the same step as on-the-fly ones; completion log-probs count only completion tokens."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import CausalLM, init_params, tiny_config
from rlhf_jax.rl import DPOConfig, DPOFrozen, DPOHParams, dpo_eval, dpo_step, init_dpo_state, precompute_reference_logps
from rlhf_jax.rl.dpo import completion_logps
from rlhf_jax.training.optim import OptimConfig, make_optimizer

MODEL_CFG = tiny_config(vocab_size=16, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                        intermediate_size=64, max_position_embeddings=64)
OPTIM = OptimConfig(learning_rate=1e-3, schedule="constant", b2=0.999, max_grad_norm=1.0)


def make_pairs(n=8, seed=0):
    """Right-padded prompt + completion rows; chosen completions repeat token 3, rejected use 5..9."""
    rng = np.random.default_rng(seed)
    L = 8
    batch = {k: np.zeros((n, L), np.int32) for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask",
                                                      "chosen_loss_mask", "rejected_loss_mask")}
    for i in range(n):
        prompt = list(rng.integers(10, 16, 3))
        for side, comp in (("chosen", [3] * int(rng.integers(2, 4)) + [1]),
                           ("rejected", list(rng.integers(5, 10, int(rng.integers(2, 4)))) + [1])):
            row = prompt + comp
            batch[f"{side}_ids"][i, :len(row)] = row
            batch[f"{side}_mask"][i, :len(row)] = 1
            batch[f"{side}_loss_mask"][i, len(prompt):len(row)] = 1
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def parts():
    model = CausalLM(MODEL_CFG)
    params = init_params(model, jax.random.PRNGKey(0))
    return model, params, make_pairs()


def test_dpo_raises_margin_and_accuracy(parts):
    model, params, batch = parts
    cfg = DPOConfig(loss_type="sigmoid", hparams=DPOHParams(beta=0.1, lr=3e-3), precompute_ref=True)
    frozen = DPOFrozen(ref_params=params, model=model)
    state = init_dpo_state(model=model, params=params, tx=make_optimizer(OPTIM, params, total_steps=100), cfg=cfg)
    batch = {**batch, **precompute_reference_logps(model, params, batch)}
    held_out = make_pairs(seed=1)
    before = dpo_eval(state.params, frozen, held_out, cfg=cfg)
    assert float(before["reward_margin"]) == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert float(before["loss"]) == pytest.approx(np.log(2.0), abs=1e-5)
    for _ in range(15):
        state, m = dpo_step(state, frozen, batch, cfg=cfg)
    after = dpo_eval(state.params, frozen, held_out, cfg=cfg)
    assert float(after["reward_margin"]) > 0.5
    assert float(after["reward_accuracy"]) == 1.0
    assert float(after["loss"]) < 0.5 * np.log(2.0)


def test_precomputed_reference_equals_on_the_fly(parts):
    model, params, batch = parts
    cfg = DPOConfig(loss_type="ipo", hparams=DPOHParams(beta=0.5, lr=1e-3))  # IPO also exercises the completion lengths
    frozen = DPOFrozen(ref_params=params, model=model)
    tx = make_optimizer(OPTIM, params, total_steps=100)
    s1, m1 = dpo_step(init_dpo_state(model=model, params=params, tx=tx, cfg=cfg), frozen, batch, cfg=cfg)
    pre = {**batch, **precompute_reference_logps(model, params, batch)}
    s2, m2 = dpo_step(init_dpo_state(model=model, params=params, tx=tx, cfg=cfg), DPOFrozen(None, model), pre,
                      cfg=cfg)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_completion_logps_sum_only_completion_tokens(parts):
    model, params, batch = parts
    logp, length = completion_logps(model, params, batch["chosen_ids"], batch["chosen_mask"],
                                    batch["chosen_loss_mask"])
    logits = model.apply(params, batch["chosen_ids"], attention_mask=batch["chosen_mask"])
    full = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok = jnp.take_along_axis(full, batch["chosen_ids"][:, 1:, None], axis=-1)[..., 0]
    expected = jnp.sum(tok * batch["chosen_loss_mask"][:, 1:], axis=1)
    np.testing.assert_allclose(logp, expected, rtol=1e-5)
    np.testing.assert_array_equal(length, np.asarray(batch["chosen_loss_mask"]).sum(1))


def test_missing_completion_mask_is_a_clear_error(parts):
    model, params, batch = parts
    bad = {k: v for k, v in batch.items() if k != "rejected_loss_mask"}
    with pytest.raises(KeyError, match="rejected_loss_mask"):
        precompute_reference_logps(model, params, bad)
