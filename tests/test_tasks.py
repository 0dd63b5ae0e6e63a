"""Embedded tasks: gold reward (JAX on ids == Python on text, hand-computed values), generators,
simulated labeller statistics, tokenizer directories (load, ids, regeneration is byte-identical)."""
from __future__ import annotations

import filecmp
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.tasks import (SPLITS, bradley_terry_probability, get_task, list_tasks,
                            plackett_luce_ranks)
from rlhf_jax.tasks.tokenizer_build import build_tokenizer

TASKS = list_tasks()


def _batch(task, prompts, responses, *, finished=True, p_len=None, r_len=None, extra_pad=0):
    """Left-padded prompt ids and right-padded response ids (+EOS when finished; a bool or a list)."""
    if isinstance(finished, bool):
        finished = [finished] * len(prompts)
    p_ids = [task.encode(p) for p in prompts]
    r_ids = [task.encode(r) + ([task.eos_id] if f else []) for r, f in zip(responses, finished)]
    p_len = p_len or max(len(x) for x in p_ids) + extra_pad
    r_len = r_len or max(len(x) for x in r_ids) + extra_pad
    P = np.full((len(prompts), p_len), task.pad_id, np.int32)
    PM = np.zeros_like(P)
    R = np.full((len(prompts), r_len), task.pad_id, np.int32)
    RM = np.zeros_like(R)
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        P[i, p_len - len(p):] = p
        PM[i, p_len - len(p):] = 1
        R[i, :len(r)] = r
        RM[i, :len(r)] = 1
    return P, PM, R, RM


def _all_kinds_of_responses(task, n=64):
    recs = task.preference_records("validation", num=n)
    prompts, responses = [], []
    for rec in recs:
        for r in (rec["chosen"], rec["rejected"]):
            prompts.append(rec["prompt"])
            responses.append(r)
    for rec in task.sft_records("validation", num=n):
        prompts.append(rec["prompt"])
        responses.append(rec["completion"])
    # random word salad, including special words and empty responses
    rng = np.random.default_rng(0)
    for rec in task.prompt_records("validation", num=n):
        k = int(rng.integers(0, 12))
        words = [task.vocab[i] for i in rng.integers(4, task.vocab_size, size=k)]
        prompts.append(rec["prompt"])
        responses.append(" " + " ".join(words))
        prompts.append(rec["prompt"])
        responses.append(task.optimal_response(rec["prompt"]))
    return prompts, responses


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("finished", [True, False])
def test_gold_jax_equals_gold_text(name, finished):
    task = get_task(name)
    prompts, responses = _all_kinds_of_responses(task)
    want = np.array([task.gold_reward_text(p, r, finished=finished) for p, r in zip(prompts, responses)])
    P, PM, R, RM = _batch(task, prompts, responses, finished=finished, extra_pad=2)
    got = np.asarray(jax.jit(task.gold_reward_jax)(P, PM, R, RM))
    assert got.shape == (len(prompts),) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (got >= 0).all() and (got <= 1).all()
    assert len(set(np.round(want, 4))) > 5  # graded, not all-or-nothing
    # vmap over single rows gives the same numbers
    one = jax.jit(jax.vmap(lambda p, pm, r, rm: task.gold_reward_jax(p[None], pm[None], r[None], rm[None])[0]))
    np.testing.assert_allclose(np.asarray(one(P, PM, R, RM)), want, atol=1e-6)


@pytest.mark.parametrize("name", TASKS)
def test_gold_ignores_padding_and_tokens_after_eos(name):
    task = get_task(name)
    gold = jax.jit(task.gold_reward_jax)
    prompts, responses = _all_kinds_of_responses(task, n=16)
    P, PM, R, RM = _batch(task, prompts, responses)
    base = np.asarray(gold(P, PM, R, RM))
    # more left padding on prompts, more right padding on responses
    P2, PM2, R2, RM2 = _batch(task, prompts, responses, extra_pad=5)
    np.testing.assert_allclose(np.asarray(gold(P2, PM2, R2, RM2)), base, atol=1e-6)
    # garbage ids (even outside the vocabulary) behind the mask or after EOS change nothing
    rng = np.random.default_rng(1)
    junk = rng.integers(0, task.vocab_size + 7, size=R2.shape)
    R3 = np.where(RM2 == 1, R2, junk)
    np.testing.assert_allclose(np.asarray(gold(P2, PM2, R3, np.ones_like(RM2))), base,
                               atol=1e-6)
    P3 = np.where(PM2 == 1, P2, rng.integers(0, task.vocab_size, size=P2.shape))
    np.testing.assert_allclose(np.asarray(gold(P3, PM2, R3, RM2)), base, atol=1e-6)


def test_sentiment_hand_computed():
    task = get_task("sentiment")
    p = "review movie plot :"
    cases = [
        # sentiment clip((2-0)/2)=1, relevance .6+.4=1, form 1
        (" plot is great and actor is superb", True, 1.0),
        # repetition: one distinct positive -> .5; aspect only -> .6; form 1
        (" plot is great and plot is great", True, 0.5 * 0.5 + 0.3 * 0.6 + 0.2),
        # 1 pos - 1 neg -> 0; off-topic noun: .6 - .5 = .1; form 1
        (" plot is great and room is awful", True, 0.3 * 0.1 + 0.2),
        # two words: form 0; sentiment 1 ("nice" is not in the vocabulary); no aspect
        (" great superb nice", True, 0.5 * 1.0 + 0.2),
        (" great superb", True, 0.5 * 1.0),
        # not finished: form 0
        (" the plot is great", False, 0.5 * 0.5 + 0.3 * 0.6),
        # 13 words: too long
        (" plot is great and actor is superb and scene is very very lovely", True, 0.5 + 0.3),
        ("", True, 0.0),
    ]
    for response, finished, want in cases:
        assert task.gold_reward_text(p, response, finished=finished) == pytest.approx(want), response
    P, PM, R, RM = _batch(task, [p] * len(cases), [c[0] for c in cases], finished=[c[1] for c in cases])
    np.testing.assert_allclose(np.asarray(jax.jit(task.gold_reward_jax)(P, PM, R, RM)),
                               [c[2] for c in cases], atol=1e-6)
    # a literal <eos> ends the text response
    assert task.gold_reward_text(p, " the plot is great <eos> awful", finished=False) == \
        pytest.approx(0.5 * 0.5 + 0.3 * 0.6 + 0.2)


def test_sort_hand_computed():
    task = get_task("sort")
    p = "sort 3 1 3 0 :"  # target 0 1 3 3
    cases = [(" 0 1 3 3", 1.0), (" 0 1 3", 3 / 4), (" 0 1 3 3 3", 4 / 5), (" 3 1 3 0", 2 / 4),
              (" 1 3 3", 1 / 4), (" 1 1 1 1", 1 / 4), (" 0 sort 3 3", 3 / 4), ("", 0.0)]
    for response, want in cases:
        assert task.gold_reward_text(p, response) == pytest.approx(want), response
    P, PM, R, RM = _batch(task, [p] * len(cases), [c[0] for c in cases])
    np.testing.assert_allclose(np.asarray(jax.jit(task.gold_reward_jax)(P, PM, R, RM)),
                               [c[1] for c in cases], atol=1e-6)


def test_arith_hand_computed():
    task = get_task("arith")
    p = "add 3 4 2 :"  # running sums 3 7 9
    cases = [(" 3 7 9", True, 1.0), (" 3 7 8", True, 1 / 3), (" 3 9", True, 1 / 6 + 0.5), (" 9", True, 0.5),
             (" 3 7 9 9", True, 0.375 + 0.5), (" 4 8 10", True, 0.0), (" 3 add 9", True, 1 / 3 + 0.5),
             ("", True, 0.0), (" 3 7 9", False, 0.5)]
    for response, finished, want in cases:
        assert task.gold_reward_text(p, response, finished=finished) == pytest.approx(want), response
    P, PM, R, RM = _batch(task, [p] * len(cases), [c[0] for c in cases], finished=[c[1] for c in cases],
                          extra_pad=2)
    np.testing.assert_allclose(np.asarray(jax.jit(task.gold_reward_jax)(P, PM, R, RM)),
                               [c[2] for c in cases], atol=1e-6)
    assert task.optimal_response("add 5 5 5 5 5 :") == " 5 10 15 20 25"


@pytest.mark.parametrize("name", TASKS)
def test_records_formats_and_determinism(name):
    task = get_task(name)
    sft = task.sft_records("train", num=50)
    assert sft == task.sft_records("train", num=50)
    assert sft != task.sft_records("train", num=50, seed=1)
    assert sft != task.sft_records("test", num=50)
    for rec in sft:
        assert set(rec) == {"prompt", "completion"}
        assert rec["completion"].startswith(" ") and not rec["prompt"].endswith(" ")
        assert "<eos>" not in rec["completion"]
        ids = task.encode(rec["prompt"] + rec["completion"])
        assert ids == task.encode(rec["prompt"]) + task.encode(rec["completion"])
        assert task.unk_id not in ids
        assert len(task.encode(rec["prompt"])) <= task.prompt_length
        assert len(task.encode(rec["completion"])) + 1 <= task.response_length
    pairs = task.preference_records("train", num=50)
    assert all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in pairs)
    ranks = task.ranking_records("train", k=4, num=20)
    for r in ranks:
        assert set(r) == {"prompt", "responses", "ranks"}
        assert len(r["responses"]) == 4 and sorted(r["ranks"]) == [0, 1, 2, 3]
    prompts = task.prompt_records("test", num=30)
    assert all(set(r) == {"prompt"} for r in prompts)
    assert [r["prompt"] for r in prompts] == [r["prompt"] for r in task.prompt_records("test", num=30)]


@pytest.mark.parametrize("name", TASKS)
def test_sft_demonstrations_leave_headroom(name):
    task = get_task(name)
    recs = task.sft_records("train", num=2000)
    gold = np.array([task.gold_reward_text(r["prompt"], r["completion"]) for r in recs])
    assert 0.4 <= gold.mean() <= 0.65, gold.mean()
    assert gold.std() > 0.1
    best = [task.gold_reward_text(r["prompt"], task.optimal_response(r["prompt"])) for r in recs[:200]]
    assert min(best) == 1.0


@pytest.mark.parametrize("name", TASKS)
def test_labeller_pairs_are_noise_independent_and_bt_distributed(name):
    task = get_task(name)
    n = 3000
    gold = task.preference_records("train", noise=0.0, num=n, with_gold=True)
    noisy = task.preference_records("train", noise=0.1, num=n, with_gold=True)
    # the noiseless order is exactly the gold order, never a tie
    assert all(r["chosen_gold"] > r["rejected_gold"] for r in gold)
    # the same pairs: only the labels differ
    same_pair = [{r["chosen"], r["rejected"]} == {s["chosen"], s["rejected"]} and r["prompt"] == s["prompt"]
                 for r, s in zip(gold, noisy)]
    assert all(same_pair)
    agree = np.array([r["chosen"] == s["chosen"] for r, s in zip(gold, noisy)], float)
    # expected agreement: mean over pairs of sigma(|Δg| / τ)
    p = np.array([bradley_terry_probability(r["chosen_gold"], r["rejected_gold"], 0.1) for r in gold])
    assert 0.6 < p.mean() < 0.99  # the labels are noisy but informative
    se = math.sqrt((p * (1 - p)).sum()) / n
    assert abs(agree.mean() - p.mean()) < 4 * se + 1e-3, (agree.mean(), p.mean())
    # more noise, more disagreement with gold
    very = task.preference_records("train", noise=1.0, num=n)
    agree_very = np.mean([r["chosen"] == s["chosen"] for r, s in zip(gold, very)])
    assert agree_very < agree.mean() - 0.1


def test_plackett_luce_statistics():
    rng = np.random.default_rng(0)
    g = np.array([0.3, 0.1, 0.0])
    tau = 0.1
    draws = np.array([plackett_luce_ranks(g, tau, rng) for _ in range(20000)])
    # top-1 frequency = softmax(g / tau)
    soft = np.exp(g / tau) / np.exp(g / tau).sum()
    np.testing.assert_allclose((draws == 0).mean(0), soft, atol=0.012)
    # pairwise (K=2) marginal of response 1 over response 2 equals the BT probability
    pair = np.array([plackett_luce_ranks([0.1, 0.0], tau, rng)[0] == 0 for _ in range(20000)])
    assert pair.mean() == pytest.approx(bradley_terry_probability(0.1, 0.0, tau), abs=0.012)
    assert plackett_luce_ranks([0.2, 0.5, 0.1], 0.0, rng) == [1, 0, 2]
    with pytest.raises(ValueError, match="noise"):
        plackett_luce_ranks([0.2, 0.5], -1.0, rng)


@pytest.mark.parametrize("name", TASKS)
def test_tokenizer_directory_loads_and_matches_task_ids(name, tmp_path):
    from transformers import AutoTokenizer

    task = get_task(name)
    tok = AutoTokenizer.from_pretrained(task.tokenizer_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == \
        (task.bos_id, task.eos_id, task.pad_id, task.unk_id)
    assert len(tok) == task.vocab_size
    rec = task.sft_records("test", num=5)[3]
    text = rec["prompt"] + rec["completion"]
    ids = tok(text)["input_ids"]
    assert ids == task.encode(text)  # no BOS/EOS added automatically
    assert tok.decode(ids) == text.strip() == task.decode(ids)
    assert tok.decode(ids + [task.eos_id, task.pad_id], skip_special_tokens=True) == text.strip()
    # regenerating the shipped directory gives byte-identical files
    files = build_tokenizer(task, str(tmp_path / name))
    shipped = sorted(os.listdir(task.tokenizer_dir))
    assert files == shipped
    match, mismatch, errors = filecmp.cmpfiles(task.tokenizer_dir, tmp_path / name, shipped, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_bad_arguments_raise_clear_errors():
    task = get_task("sentiment")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task.sft_records("dev")
    with pytest.raises(ValueError, match="noise"):
        task.preference_records("train", noise=-0.5, num=2)
    with pytest.raises(ValueError, match="k must be"):
        task.ranking_records("train", k=1, num=2)
    with pytest.raises(ValueError, match="expected prompt"):
        task.gold_reward_jax(jnp.zeros((2, 3), int), jnp.ones((2, 3)), jnp.zeros((3, 4), int), jnp.ones((3, 4)))
    assert set(SPLITS) == {"train", "validation", "test"}


@pytest.mark.parametrize("name", TASKS)
def test_model_config_is_tiny_and_matches_tokenizer(name):
    from rlhf_jax.models import CausalLM, init_params

    task = get_task(name)
    cfg = task.model_config()
    assert cfg.vocab_size == task.vocab_size
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (task.bos_id, task.eos_id, task.pad_id)
    assert cfg.hidden_size <= 64 and cfg.num_layers <= 2
    assert cfg.max_position_embeddings >= task.prompt_length + task.response_length
    assert task.model_config(num_layers=1).num_layers == 1
    model = CausalLM(cfg)
    params = init_params(model, jax.random.PRNGKey(0), seq_len=4)
    ids = jnp.asarray([task.encode(task.prompt_records("test", num=1)[0]["prompt"])])
    logits = model.apply(params, ids, jnp.ones_like(ids))
    assert logits.shape == ids.shape + (task.vocab_size,)
    with pytest.raises(ValueError, match="no field 'nonsense'"):
        task.model_config(nonsense=1)
