"""Data layer: formats, tokenisation, chat-template masking, packing, batching, order, shards,
resume. Sources (JSONL/Parquet/TFDS), bad input and the CLI are in test_data_sources.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.config import apply_overrides
from rlhf_jax.data import DataError
from rlhf_jax.data.tokenize import Encoder
from tests.test_data_utils import make_tokenizer

PAD, BOS, EOS, IM_START, IM_END = 0, 1, 2, 4, 5
U = lambda c: {"role": "user", "content": c}          # noqa: E731
A = lambda c: {"role": "assistant", "content": c}     # noqa: E731


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), bos=True)


def ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


SFT = [
    {"prompt": "hello world", "completion": "the cat sat"},
    {"prompt": "what is two plus two ?", "completion": "four"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
    {"text": "a dog sat on the mat"},
    {"prompt": "tell me about the sea", "completion": "blue and green"},
    {"prompt": "red", "completion": "blue"},
    {"prompt": "one two three", "completion": "four five six seven"},
]


# --- tokenisation and SFT layout -----------------------------------------------------------

def test_sft_prompt_completion_hand_checked(tok):
    it = data.sft_batches([SFT[0]], tok, batch_size=1, seq_len=8, pack=False, shuffle=False,
                          num_epochs=1, buckets=(8,))
    b = next(it)
    p, c = ids(tok, "hello world", True), ids(tok, "the cat sat")
    assert p[0] == BOS
    seq = p + c + [EOS]                                   # BOS hello world the cat sat EOS
    assert b["input_ids"][0].tolist() == seq + [PAD]
    assert b["targets"][0].tolist() == seq[1:] + [PAD, PAD]
    # loss on targets "the", "cat", "sat", EOS: predicted at positions 2..5
    assert b["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert b["attention_mask"][0].tolist() == [1] * 7 + [0]
    assert b["positions"][0].tolist() == list(range(7)) + [0]
    assert b["segment_ids"][0].tolist() == [1] * 7 + [0]
    assert all(v.dtype == np.int32 for k, v in b.items() if k != "example_index")
    assert it.stats.loss_tokens == 4 and it.stats.tokens == 7 and it.stats.pad_tokens == 1


def test_chat_template_loss_only_on_assistant_tokens(tok):
    msgs = [{"role": "system", "content": "tell me"},
            {"role": "user", "content": "hello cat"},
            {"role": "assistant", "content": "the mat"},
            {"role": "user", "content": "what is it ?"},
            {"role": "assistant", "content": "red sky"}]
    enc = Encoder(tok)
    full_ids, mask = enc.conversation(msgs)
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert full_ids == ids(tok, rendered)
    supervised = [t for t, m in zip(full_ids, mask) if m]
    # exactly the two assistant contents, each with its end-of-turn token
    assert supervised == ids(tok, "the mat") + [IM_END] + ids(tok, "red sky") + [IM_END]
    # and the role headers/user/system tokens are not supervised
    toks = tok.convert_ids_to_tokens(full_ids)
    for t, m in zip(toks, mask):
        if t in ("system", "user", "assistant", "<|im_start|>", "hello", "tell", "what"):
            assert m == 0
    # in a batch the targets of loss positions are exactly those tokens, in order
    b = next(data.sft_batches([{"messages": msgs}], tok, batch_size=1, seq_len=32, shuffle=False,
                              num_epochs=1))
    sel = b["targets"][0][b["loss_mask"][0] == 1].tolist()
    assert sel == supervised


def test_generation_prompt_not_in_the_rendered_answer(tmp_path):
    # like DeepSeek-R1: the generation prompt opens a block that rendered answers do not contain
    t = make_tokenizer(tmp_path / "t")
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant"
                       "\nI{% endif %}")
    msgs = [U("hello"), A("the cat"), U("what ?"), A("red sky")]
    full, mask = Encoder(t).conversation(msgs)
    assert [i for i, m in zip(full, mask) if m] == \
        ids(t, "the cat") + [IM_END] + ids(t, "red sky") + [IM_END]


def test_conversation_prefix_instability_is_an_error(tmp_path):
    t = make_tokenizer(tmp_path / "t")
    # a template that writes the number of messages first is not prefix-stable
    t.chat_template = ("{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                       "{{ m['content'] }}<|im_end|>{% endfor %}")
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    with pytest.raises(DataError, match="prefix-stable") as e:
        next(data.sft_batches([rec], t, batch_size=1, seq_len=32, num_epochs=1))
    assert e.value.field == "messages[1]" and e.value.line == 1


def test_messages_need_a_chat_template(tmp_path):
    t = make_tokenizer(tmp_path / "t", chat_template=False)
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    with pytest.raises(DataError, match="chat_template"):
        next(data.sft_batches([rec], t, batch_size=1, seq_len=32, num_epochs=1))


# --- packing --------------------------------------------------------------------------------

def _unpacked(tok, rec, L=32):
    b = next(data.sft_batches([rec], tok, batch_size=1, seq_len=L, pack=False, num_epochs=1,
                              buckets=(L,)))
    n = int(b["attention_mask"][0].sum())
    return {k: b[k][0, :n] for k in ("input_ids", "targets", "loss_mask", "positions")}


def test_packing_keeps_documents_apart(tok):
    L = 16
    it = data.sft_batches(SFT, tok, batch_size=2, seq_len=L, shuffle=False, num_epochs=1)
    batches = list(it)
    singles = [_unpacked(tok, r) for r in SFT]
    seen = []
    for b in batches:
        assert b["input_ids"].shape == (2, L)
        for row in range(2):
            seg = b["segment_ids"][row]
            assert (b["attention_mask"][row] == (seg > 0)).all()
            # padding only at the end of a row
            n = int((seg > 0).sum())
            assert (seg[:n] > 0).all() and (seg[n:] == 0).all()
            for s in range(1, int(seg.max()) + 1):
                pos = np.nonzero(seg == s)[0]
                assert (np.diff(pos) == 1).all()                   # contiguous
                piece = {k: b[k][row, pos] for k in ("input_ids", "targets", "loss_mask", "positions")}
                assert piece["positions"].tolist() == list(range(len(pos)))
                # the last token of a document predicts nothing: the next document's first token
                # is not its target
                assert piece["loss_mask"][-1] == 0 and piece["targets"][-1] == PAD
                match = [i for i, sgl in enumerate(singles)
                         if sgl["input_ids"].tolist() == piece["input_ids"].tolist()]
                assert len(match) == 1
                sgl = singles[match[0]]
                for k in piece:
                    assert piece[k].tolist() == sgl[k].tolist(), k
                seen.append(match[0])
            # the attention pattern segment_ids implies is block-diagonal causal
            allowed = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0) & \
                (np.arange(L)[None, :] <= np.arange(L)[:, None])
            for q in range(L):
                for k_ in np.nonzero(allowed[q])[0]:
                    assert seg[k_] == seg[q]
    assert sorted(seen) == list(range(len(SFT)))                   # every document exactly once
    assert it.stats.examples == len(SFT)
    # packing is padding-free except at row ends: far fewer rows than documents
    assert sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches) < len(SFT)


# --- preferences, rankings, prompts -----------------------------------------------------------

def test_preference_batch_layout(tok):
    recs = [{"prompt": "hello", "chosen": "yes", "rejected": "no no", "margin": 0.5},
            {"prompt": "what is two plus two ?", "chosen": "four", "rejected": "five"}]
    b = next(data.preference_batches(recs, tok, batch_size=3, max_length=32, shuffle=False,
                                     num_epochs=1))
    L = 16  # smallest default bucket
    assert b["chosen_ids"].shape == (3, L) == b["rejected_ids"].shape
    p0 = ids(tok, "hello", True)
    c0 = p0 + ids(tok, "yes") + [EOS]
    r0 = p0 + ids(tok, "no no") + [EOS]
    assert b["chosen_ids"][0].tolist() == c0 + [PAD] * (L - len(c0))
    assert b["rejected_ids"][0].tolist() == r0 + [PAD] * (L - len(r0))
    assert b["chosen_mask"][0].tolist() == [1] * len(c0) + [0] * (L - len(c0))
    assert b["chosen_loss_mask"][0].tolist() == [0] * len(p0) + [1, 1] + [0] * (L - len(c0))
    assert b["rejected_loss_mask"][0].sum() == 3
    np.testing.assert_array_equal(b["margin"], np.array([0.5, 0.0, 0.0], np.float32))
    assert b["example_mask"].tolist() == [1, 1, 0] and b["example_index"].tolist() == [0, 1, -1]
    assert b["chosen_mask"][2].sum() == 0 and b["rejected_mask"][2].sum() == 0


def test_hh_transcripts_shared_prefix_becomes_prompt(tok):
    chosen = "\n\nHuman: what is two plus two ?\n\nAssistant: four\n\nHuman: yes ?\n\nAssistant: yes four"
    rejected = "\n\nHuman: what is two plus two ?\n\nAssistant: four\n\nHuman: yes ?\n\nAssistant: no five"
    recs, _ = data.read_records([{"chosen": chosen, "rejected": rejected, "margin": 2}], "preference")
    rec = recs[0]
    assert rec["prompt"] == chosen[: chosen.rindex("Assistant:") + len("Assistant:")]
    assert rec["chosen"] == " yes four" and rec["rejected"] == " no five" and rec["margin"] == 2.0
    # the shared prefix ends inside a word: still cut at the last Assistant marker
    recs, _ = data.read_records([{"chosen": chosen + " good", "rejected": chosen + "s"}], "preference")
    assert recs[0]["prompt"].endswith("Assistant:") and recs[0]["chosen"] == " yes four good"
    # without any marker: TRL's character rule (a trailing space goes to the responses)
    assert data.split_shared_prefix("the cat sat", "the cat ran") == ("the cat", " sat", " ran")
    # message lists: the shared leading messages
    u = {"role": "user", "content": "hi"}
    a1, a2 = {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}
    recs, _ = data.read_records([{"chosen": [u, a1], "rejected": [u, a2]}], "preference")
    assert recs[0] == {"prompt": [u], "chosen": [a1], "rejected": [a2], "margin": 0.0}
    b = next(data.preference_batches([{"chosen": [u, a1], "rejected": [u, a2]}], tok,
                                     batch_size=1, max_length=32, num_epochs=1))
    prompt_text = tok.apply_chat_template([u], tokenize=False, add_generation_prompt=True)
    p = ids(tok, prompt_text)
    assert b["chosen_ids"][0, :len(p)].tolist() == p
    assert b["chosen_ids"][0][b["chosen_loss_mask"][0] == 1].tolist() == \
        ids(tok, "yes") + [IM_END, EOS]


def test_ranking_batch(tok):
    recs = [{"prompt": "hello", "responses": ["yes", "no", "hi"], "ranks": [3, 1, 2]},
            {"prompt": "red", "responses": ["blue", "green"], "ranks": [0, 1]}]
    b = next(data.ranking_batches(recs, tok, batch_size=2, max_length=16, num_responses=4,
                                  shuffle=False, num_epochs=1))
    assert b["response_ids"].shape == (2, 4, 16)
    assert b["ranks"].tolist() == [[2, 0, 1, 0], [0, 1, 0, 0]]      # 0 = best
    assert b["rank_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    seq = ids(tok, "hello", True) + ids(tok, "no") + [EOS]
    assert b["response_ids"][0, 1, :len(seq)].tolist() == seq
    assert b["response_mask"][0, 3].sum() == 0
    assert b["response_loss_mask"][0, 1].sum() == 2
    assert data.normalized_ranks([10, -3, 7]).tolist() == [2, 0, 1]


def test_prompt_batch_left_padded(tok):
    u = [{"role": "user", "content": "hello"}]
    recs = [{"prompt": "hello world"}, {"messages": u}, {"prompt": "red"}]
    b = next(data.prompt_batches(recs, tok, batch_size=4, max_prompt_length=8, buckets=(8,),
                                 shuffle=False, num_epochs=1))
    p0 = ids(tok, "hello world", True)
    assert b["prompt_ids"][0].tolist() == [PAD] * (8 - len(p0)) + p0
    assert b["prompt_mask"][0].tolist() == [0] * (8 - len(p0)) + [1] * len(p0)
    chat = ids(tok, tok.apply_chat_template(u, tokenize=False, add_generation_prompt=True))
    assert b["prompt_ids"][1, 8 - len(chat):].tolist() == chat
    assert chat[-2:] == [IM_START, ids(tok, "assistant")[0]]        # ends with the generation prompt
    assert b["prompt_mask"][3].sum() == 0 and b["example_mask"].tolist() == [1, 1, 1, 0]


def test_static_shapes_from_buckets(tok):
    recs = [{"prompt": " ".join(["hello"] * n)} for n in range(1, 30)]
    it = data.prompt_batches(recs, tok, batch_size=3, max_prompt_length=32, seed=1, num_epochs=2)
    shapes = {b["prompt_ids"].shape for b in it}
    assert shapes <= {(3, 16), (3, 32)} and len(shapes) == 2


# --- truncation ---------------------------------------------------------------------------

def test_truncation_policies(tok):
    long_prompt = " ".join(["one", "two", "three", "four", "five", "six"])
    rec = {"prompt": long_prompt, "completion": "yes no yes no yes"}
    # truncate_left: prompt keeps its LAST max_prompt_length tokens, response cut on the right
    it = data.sft_batches([rec], tok, batch_size=1, seq_len=8, pack=False, max_prompt_length=4,
                          num_epochs=1, buckets=(8,))
    b = next(it)
    p = ids(tok, long_prompt, True)[-4:]
    assert b["input_ids"][0].tolist() == p + ids(tok, "yes no yes no")
    assert it.stats.truncated_prompt == 1 and it.stats.truncated_response == 1
    assert it.stats.as_metrics()["data/truncated_prompt"] == 1.0
    # drop: dropped and counted, the next example still comes
    it = data.sft_batches([rec, SFT[5]], tok, batch_size=1, seq_len=8, max_prompt_length=4,
                          truncation="drop", num_epochs=1, shuffle=False)
    b = list(it)
    assert len(b) == 1 and it.stats.dropped_too_long == 1 and it.stats.examples == 1
    # error: names file, line and field
    with pytest.raises(DataError) as e:
        next(data.sft_batches([SFT[5], rec], tok, batch_size=2, seq_len=8, max_prompt_length=4,
                              truncation="error", num_epochs=1, shuffle=False))
    assert e.value.field == "prompt" and e.value.line == 2 and e.value.reason == "too_long"
    assert "more than the maximum 4" in str(e.value)
    # prompts format: truncated from the left to max_prompt_length
    it = data.prompt_batches([{"prompt": long_prompt}], tok, batch_size=1, max_prompt_length=3,
                             num_epochs=1)
    assert next(it)["prompt_ids"][0].tolist() == ids(tok, long_prompt, True)[-3:]
    assert it.stats.truncated_prompt == 1


# --- order, shards, resume ------------------------------------------------------------------

PROMPTS = [{"prompt": w} for w in ("hello world red blue green yes no what is two plus one three "
                                   "four five six seven eight nine ten good bad").split()]


def _indices(it):
    out = []
    for b in it:
        out += [int(i) for i, m in zip(b["example_index"], b["example_mask"]) if m]
    return out


def test_order_is_deterministic_from_the_seed(tok):
    mk = lambda seed: data.prompt_batches(PROMPTS, tok, batch_size=4, max_prompt_length=4,
                                          seed=seed, num_epochs=2)
    a, b, c = _indices(mk(0)), _indices(mk(0)), _indices(mk(1))
    assert a == b and a != c
    n = len(PROMPTS)
    assert sorted(a[:n]) == list(range(n)) and sorted(a[n:]) == list(range(n))
    assert a[:n] != a[n:]                                      # reshuffled each epoch
    assert _indices(data.prompt_batches(PROMPTS, tok, batch_size=4, max_prompt_length=4,
                                        shuffle=False, num_epochs=1)) == list(range(n))


@pytest.mark.parametrize("num_hosts", [2, 3])
def test_host_shards_are_disjoint_and_cover_the_epoch(tok, num_hosts):
    n = len(PROMPTS)
    for epoch in range(2):
        parts = [data.host_rows(n, seed=5, epoch=epoch, host_id=h, num_hosts=num_hosts)
                 for h in range(num_hosts)]
        allrows = np.concatenate(parts)
        assert len(allrows) == n and sorted(allrows.tolist()) == list(range(n))
    got = [_indices(data.prompt_batches(PROMPTS, tok, batch_size=3, max_prompt_length=4, seed=5,
                                        num_epochs=1, host_id=h, num_hosts=num_hosts))
           for h in range(num_hosts)]
    for i in range(num_hosts):
        for j in range(i):
            assert not set(got[i]) & set(got[j])
    assert sorted(sum(got, [])) == list(range(n))
    # each host reads only its own rows
    reads = []

    class Spy(data.MemorySource):
        def get(self, index):
            reads.append(index)
            return super().get(index)

    list(data.prompt_batches(Spy(PROMPTS), tok, batch_size=3, max_prompt_length=4, seed=5,
                             num_epochs=1, host_id=1, num_hosts=num_hosts))
    assert sorted(reads) == sorted(got[1])


def test_resume_mid_epoch_yields_exactly_the_rest(tok):
    mk = lambda: data.prompt_batches(PROMPTS, tok, batch_size=3, max_prompt_length=4, seed=2,
                                     num_epochs=1)
    full = _indices(mk())
    it = mk()
    first = _indices([next(it), next(it)])
    state = json.loads(json.dumps(it.state()))                  # JSON-able
    rest = _indices(mk().restore(state))
    assert first + rest == full and len(first) == 6
    assert state["position"] == 6 and state["epoch"] == 0


def test_resume_packed_sft_matches_uninterrupted(tok):
    recs = SFT * 3
    mk = lambda: data.sft_batches(recs, tok, batch_size=2, seq_len=16, seed=3, num_epochs=2,
                                  skip_bad_rows=True)
    full = list(mk())
    for cut in (1, 2, len(full) - 1):
        it = mk()
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(it.state()))
        resumed = mk().restore(state)
        rest = list(resumed)
        assert len(rest) == len(full) - cut
        for a, b in zip(rest, full[cut:]):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        assert resumed.stats.to_dict() == _drain_stats(mk())


def _drain_stats(it):
    list(it)
    return it.stats.to_dict()


def test_restore_rejects_a_foreign_state(tok):
    it = data.prompt_batches(PROMPTS, tok, batch_size=3, max_prompt_length=4, seed=2)
    state = it.state()
    other = data.prompt_batches(PROMPTS, tok, batch_size=3, max_prompt_length=4, seed=3)
    with pytest.raises(DataError, match="seed"):
        other.restore(state)
    with pytest.raises(DataError, match="not a data iterator state"):
        other.restore({"epoch": 0})


def test_infinite_iterator_rolls_over_epochs(tok):
    it = data.prompt_batches(PROMPTS, tok, batch_size=4, max_prompt_length=4, seed=0)
    got = _indices([next(it) for _ in range(12)])
    n = len(PROMPTS)
    assert sorted(got[:n]) == list(range(n)) and it.epoch >= 1
    assert len(got) == 48                                      # no padding rows when repeating


def test_empty_source_is_an_error(tok, tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        data.prompt_batches(str(tmp_path / "e.jsonl"), tok, batch_size=2, max_prompt_length=4)


def test_all_rows_bad_is_an_error_not_a_hang(tok):
    it = data.prompt_batches([{"prompt": 3}], tok, batch_size=2, max_prompt_length=4,
                             skip_bad_rows=True)
    with pytest.raises(DataError, match="no usable example"):
        next(it)


# --- config ----------------------------------------------------------------------------------

def test_data_config_overrides_and_make_iterator(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"question": r["prompt"]}) + "\n" for r in PROMPTS))
    cfg = apply_overrides(data.DataConfig(), [f"path={path}", "batch_size=5", "max_length=8",
                                              "field_map=prompt=question", "num_epochs=1",
                                              "buckets=8"])
    assert cfg.field_map == ("prompt=question",) and cfg.buckets == (8,)
    it = data.make_iterator(cfg, "prompt", tokenizer=tok, host_id=1, num_hosts=2)
    b = next(it)
    assert b["prompt_ids"].shape == (5, 8)
    assert sorted(_indices([b] + list(it))) == sorted(
        data.host_rows(len(PROMPTS), seed=0, epoch=0, host_id=1, num_hosts=2).tolist())


def test_read_ahead_changes_nothing(tok, monkeypatch):
    from rlhf_jax.data import iterators

    recs = SFT * 4 + [{"prompt": "one", "completion": "two"}] * 3
    mk = lambda: list(data.sft_batches(recs, tok, batch_size=2, seq_len=16, seed=1, num_epochs=2))
    ref = mk()
    monkeypatch.setattr(iterators, "PREFETCH", 1)                  # one row at a time, unbatched
    one = mk()
    assert len(ref) == len(one)
    for a, b in zip(ref, one):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_bad_row_raises_only_when_reached(tok):
    recs = [{"prompt": "hello"}, {"prompt": "red"}, {"prompt": 7}, {"prompt": "blue"}]
    it = data.prompt_batches(recs, tok, batch_size=2, max_prompt_length=4, shuffle=False)
    first = next(it)                                               # rows 1-2 are fine
    assert first["example_index"].tolist() == [0, 1]
    with pytest.raises(DataError) as e:
        next(it)
    assert (e.value.line, e.value.field, e.value.reason) == (3, "prompt", "wrong_type")


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_finite_multi_host_iterators_stay_in_lock_step(tok, drop_remainder):
    recs = PROMPTS[:9]                                             # hosts get 5 and 4 rows
    its = [data.prompt_batches(recs, tok, batch_size=2, max_prompt_length=4, seed=1, num_epochs=1,
                               host_id=h, num_hosts=2, drop_remainder=drop_remainder)
           for h in range(2)]
    got = [list(it) for it in its]
    assert len(got[0]) == len(got[1]) == (2 if drop_remainder else 3)
    idx = [_indices(g) for g in got]
    assert not set(idx[0]) & set(idx[1])
    if not drop_remainder:
        assert sorted(idx[0] + idx[1]) == list(range(9))           # nothing lost
        assert got[1][-1]["example_mask"].sum() == 0               # host 1 pads its last batch
    else:
        assert len(idx[0]) == len(idx[1]) == 4


def test_prefetch_iterator_matches_and_resumes(tok):
    mk = lambda: data.sft_batches(SFT * 3, tok, batch_size=2, seq_len=16, seed=3, num_epochs=2)
    direct = mk()
    pre = data.PrefetchIterator(mk(), size=2)
    for _ in range(3):
        a, b = next(direct), next(pre)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # the state is that of the last batch handed out, not of the batches queued behind it
    assert pre.state() == direct.state() and pre.stats.examples == direct.stats.examples
    rest_direct = list(direct)
    rest_resumed = list(data.PrefetchIterator(mk().restore(pre.state())))
    pre.close()
    assert len(rest_direct) == len(rest_resumed)
    for a, b in zip(rest_direct, rest_resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    bad = data.PrefetchIterator(data.prompt_batches([{"prompt": "hi"}, {"prompt": 3}], tok,
                                                    batch_size=1, max_prompt_length=4,
                                                    shuffle=False))
    next(bad)
    with pytest.raises(DataError, match="expected a string"):
        next(bad)


def test_field_map_renames_at_once():
    from rlhf_jax.data.formats import apply_field_map

    row = {"a": "x", "b": "y", "keep": 1}
    assert apply_field_map(row, {"chosen": "b", "rejected": "a"}) == {"chosen": "y", "rejected": "x",
                                                                     "keep": 1}
    swapped = apply_field_map({"chosen": "x", "rejected": "y"}, {"chosen": "rejected",
                                                                 "rejected": "chosen"})
    assert swapped == {"chosen": "y", "rejected": "x"}
    once = apply_field_map(row, {"prompt": "a"})
    assert apply_field_map(once, {"prompt": "a"}) == once == {"prompt": "x", "b": "y", "keep": 1}
    recs, _ = data.read_records([{"q": "hello", "good": "yes", "bad": "no"}], "preference",
                                field_map=("prompt=q", "chosen=good", "rejected=bad"))
    assert recs == [{"prompt": "hello", "chosen": "yes", "rejected": "no", "margin": 0.0}]
    with pytest.raises(DataError, match="field map entry"):
        data.parse_field_map(("prompt",))
