"""Data sources: round trips of every format through JSONL, Parquet and TFDS (array_record, no
TensorFlow), reading prepared TFDS datasets by name with a field map, every bad-input case
(raise with file/line/field, or skip and count), and the `rlhf-jax data` CLI."""
from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax import data
from rlhf_jax.cli import main as cli_main
from rlhf_jax.data import DataError
from tests.test_data_utils import make_tokenizer

U = lambda c: {"role": "user", "content": c}          # noqa: E731
A = lambda c: {"role": "assistant", "content": c}     # noqa: E731

# canonical records of every format and layout (what parse_record returns for them)
RECORDS = {
    "sft": [
        {"prompt": "hello world", "completion": "the cat sat"},
        {"prompt": "what is two ?", "completion": "two"},
        {"prompt": "red", "completion": "blue sky é ü 日本"},
    ],
    "sft_messages": [
        {"messages": [U("hi"), A("yes")]},
        {"messages": [{"role": "system", "content": "tell me"}, U("what is it ?"), A("a cat"),
                      U("good"), A("yes")]},
    ],
    "sft_conversational_pairs": [
        {"prompt": [U("hello")], "completion": [A("yes")]},
        {"prompt": [{"role": "system", "content": "good"}, U("red ?")], "completion": [A("no")]},
    ],
    "preference": [
        {"prompt": "hello", "chosen": "yes", "rejected": "no", "margin": 0.0},
        {"prompt": "what is two plus two ?", "chosen": "four", "rejected": "five", "margin": 1.5},
    ],
    "preference_messages": [
        {"prompt": [U("hello")], "chosen": [A("yes")], "rejected": [A("no")], "margin": 0.25},
        {"prompt": [U("red ?"), A("no"), U("blue ?")], "chosen": [A("yes")],
         "rejected": [A("no no")], "margin": 0.0},
    ],
    "ranking": [
        {"prompt": "hello", "responses": ["yes", "no", "hi"], "ranks": [2, 0, 1]},
        {"prompt": "red", "responses": ["blue", "green"], "ranks": [1, 0]},
    ],
    "ranking_messages": [
        {"prompt": [U("hello")], "responses": [[A("yes")], [A("no")]], "ranks": [0, 1]},
    ],
    "prompt": [{"prompt": "hello world"}, {"prompt": "what is two plus two ?"}],
    "prompt_messages": [{"prompt": [U("hello")]}, {"prompt": [U("hi"), A("yes"), U("no ?")]}],
}
FMT = {k: k.split("_")[0] for k in RECORDS}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), bos=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every record set as JSONL, Parquet and a TFDS dataset (one data_dir for all)."""
    root = tmp_path_factory.mktemp("files")
    tfds_dir = root / "tfds"
    out = {}
    for key, rows in RECORDS.items():
        name = f"rt_{key}"
        data.write_tfds_dataset({"train": rows, "test": rows[:1]}, name, tfds_dir)
        out[key] = {"jsonl": write_jsonl(root / f"{key}.jsonl", rows),
                    "parquet": write_parquet(root / f"{key}.parquet", rows),
                    "tfds": f"tfds:{name}"}
    return out, str(tfds_dir)


@pytest.mark.parametrize("key", list(RECORDS))
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "tfds"])
def test_round_trip(files, key, kind):
    paths, tfds_dir = files
    recs, stats = data.read_records(str(paths[key][kind]), FMT[key], data_dir=tfds_dir)
    assert recs == RECORDS[key]
    assert stats.examples == len(RECORDS[key]) and stats.skipped_total == 0


@pytest.mark.parametrize("key", ["sft", "sft_messages", "sft_conversational_pairs",
                                 "preference_messages", "ranking", "prompt"])
def test_same_batches_from_every_source(files, tok, key):
    paths, tfds_dir = files
    kw = dict(batch_size=2, max_length=32, seed=4, num_epochs=1, data_dir=tfds_dir)
    batches = {kind: list(data.DataIterator(str(paths[key][kind]), FMT[key], tok, **kw))
               for kind in ("jsonl", "parquet", "tfds")}
    ref = list(data.DataIterator(RECORDS[key], FMT[key], tok, **kw))
    assert ref
    for kind, bs in batches.items():
        assert len(bs) == len(ref), kind
        for a, b in zip(bs, ref):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{kind}:{k}")


def test_tfds_split_and_metadata(files):
    paths, tfds_dir = files
    src = data.TfdsSource("rt_ranking_messages", split="test", data_dir=tfds_dir)
    assert len(src) == 1
    rec, loc = src.get(0)
    assert rec == RECORDS["ranking_messages"][0] and str(loc) == "tfds:rt_ranking_messages/test row 1"
    with pytest.raises(DataError, match="no split 'validation'"):
        data.TfdsSource("rt_sft", split="validation", data_dir=tfds_dir)
    with pytest.raises(DataError, match="cannot open TFDS dataset"):
        data.TfdsSource("no_such_dataset", data_dir=tfds_dir)


def test_tfds_without_tensorflow(files):
    assert "tensorflow" not in sys.modules


def test_prepared_tfds_dataset_read_by_name_with_field_map(tmp_path, tok):
    rows = [{"question": "hello", "good": "yes", "bad": "no", "id": 7},
            {"question": "red ?", "good": "blue", "bad": "green", "id": 8}]
    spec = {"question": "text", "good": "text", "bad": "text", "id": "int"}
    out = data.write_tfds_dataset({"train": rows}, "qa_pairs", tmp_path, spec)
    assert (tmp_path / "qa_pairs" / "1.0.0").is_dir() and str(out).endswith("qa_pairs/1.0.0")
    fmap = ("prompt=question", "chosen=good", "rejected=bad")
    recs, _ = data.read_records("tfds:qa_pairs", "preference", data_dir=str(tmp_path),
                                field_map=fmap)
    assert recs[1] == {"prompt": "red ?", "chosen": "blue", "rejected": "green", "margin": 0.0}
    # plain tfds reads it too (strings come back as bytes)
    import tensorflow_datasets as tfds

    raw = tfds.data_source("qa_pairs", data_dir=str(tmp_path), split="train")[0]
    assert raw["question"] == b"hello" and raw["id"] == 7
    # a missing mapped column names the canonical field and the column
    with pytest.raises(DataError) as e:
        data.read_records("tfds:qa_pairs", "preference", data_dir=str(tmp_path),
                          field_map=("prompt=question", "chosen=best", "rejected=bad"))
    assert "chosen" in str(e.value) and "best" in str(e.value) and e.value.reason == "missing_field"
    it = data.preference_batches("tfds:qa_pairs", tok, batch_size=2, max_length=16, num_epochs=1,
                                 data_dir=str(tmp_path), field_map=fmap, shuffle=False)
    assert next(it)["example_mask"].tolist() == [1, 1]


class TinyPrefs(data.RecordsBuilder):
    """A project builder, defined the way the tasks package defines its datasets."""

    name = "tiny_prefs_for_test"
    FEATURES = {"prompt": "text", "chosen": "text", "rejected": "text", "margin": "float"}

    def split_records(self):
        gen = lambda n: ({"prompt": f"what is {w} ?", "chosen": w, "rejected": "no", "margin": 1.0}
                         for w in ["one", "two", "three", "four"][:n])
        return {"train": lambda: gen(4), "test": lambda: gen(2)}


def test_project_builder_registers_and_reads_by_name(tmp_path):
    import tensorflow_datasets as tfds

    TinyPrefs(data_dir=tmp_path).download_and_prepare()
    assert "tiny_prefs_for_test" in tfds.list_builders(with_community_datasets=False)
    recs, _ = data.read_records("tfds:tiny_prefs_for_test", "preference", split="test",
                                data_dir=str(tmp_path))
    assert [r["chosen"] for r in recs] == ["one", "two"]
    assert len(data.TfdsSource("tiny_prefs_for_test", data_dir=tmp_path)) == 4


def test_files_to_tfds_validates_and_counts(tmp_path):
    good = RECORDS["preference"]
    path = write_jsonl(tmp_path / "p.jsonl", good + [{"prompt": "x", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError) as e:
        data.files_to_tfds({"train": str(path)}, "conv_prefs", tmp_path / "d", fmt="preference")
    assert e.value.line == 3 and e.value.reason == "chosen_equals_rejected"
    out, stats = data.files_to_tfds({"train": str(path)}, "conv_prefs", tmp_path / "d",
                                    fmt="preference", skip_bad_rows=True)
    assert stats.skipped == {"chosen_equals_rejected": 1} and stats.examples == 2
    recs, _ = data.read_records("tfds:conv_prefs", "preference", data_dir=str(tmp_path / "d"))
    assert recs == good


def test_infer_features_spec():
    spec = data.infer_features_spec([
        {"a": "x", "b": 1, "c": [1, 2], "d": [U("hi")], "e": [[A("y")]], "f": 1, "g": "s"},
        {"a": "y", "b": 2, "c": [], "d": [A("ok")], "e": [[A("n")]], "f": 2.5, "g": [U("m")]},
    ])
    assert spec == {"a": "text", "b": "int", "c": "int_list", "d": "messages", "e": "json",
                    "f": "float", "g": "json"}


# --- bad input ------------------------------------------------------------------------------

GOOD_PREF = {"prompt": "hello", "chosen": "yes", "rejected": "no"}
GOOD_RANK = {"prompt": "hello", "responses": ["yes", "no"], "ranks": [0, 1]}

# (format, bad JSONL line as bytes, reason, field named in the error)
BAD = {
    "malformed_json": ("preference", b'{"prompt": "hello", "chosen": "yes"', "malformed_json", None),
    "not_an_object": ("preference", b'["hello", "yes", "no"]', "malformed_json", None),
    "missing_field": ("preference", b'{"prompt": "hello", "chosen": "yes"}', "missing_field", "rejected"),
    "null_field": ("sft", b'{"prompt": "hello", "completion": null}', "missing_field", "completion"),
    "mistyped_field": ("preference", b'{"prompt": "hello", "chosen": 3, "rejected": "no"}',
                       "wrong_type", "chosen"),
    "mistyped_margin": ("preference", b'{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "1"}',
                        "wrong_type", "margin"),
    "mixed_kinds": ("preference", b'{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], '
                    b'"rejected": "c"}', "wrong_type", "chosen"),
    "bad_message": ("sft", b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}',
                    "missing_field", "messages[0].content"),
    "empty_chosen": ("preference", b'{"prompt": "hello", "chosen": "  ", "rejected": "no"}',
                     "empty_field", "chosen"),
    "empty_rejected": ("preference", b'{"prompt": "hello", "chosen": "yes", "rejected": ""}',
                       "empty_field", "rejected"),
    "empty_hh_response": ("preference", b'{"chosen": "Human: hi Assistant: yes", '
                          b'"rejected": "Human: hi Assistant: yes no"}', "empty_field", "chosen"),
    "chosen_equals_rejected": ("preference", b'{"prompt": "hello", "chosen": "yes", "rejected": "yes"}',
                               "chosen_equals_rejected", "rejected"),
    "hh_identical": ("preference", b'{"chosen": "Human: hi Assistant: yes", '
                     b'"rejected": "Human: hi Assistant: yes"}', "chosen_equals_rejected", "rejected"),
    "rank_ties": ("ranking", b'{"prompt": "a", "responses": ["b", "c", "d"], "ranks": [0, 1, 1]}',
                  "rank_ties", "ranks"),
    "rank_length_mismatch": ("ranking", b'{"prompt": "a", "responses": ["b", "c"], "ranks": [0, 1, 2]}',
                             "length_mismatch", "ranks"),
    "rank_too_few": ("ranking", b'{"prompt": "a", "responses": ["b"], "ranks": [0]}',
                     "too_few_responses", "responses"),
    "rank_not_int": ("ranking", b'{"prompt": "a", "responses": ["b", "c"], "ranks": [0, "x"]}',
                     "wrong_type", "ranks[1]"),
    "rank_duplicate_response": ("ranking", b'{"prompt": "a", "responses": ["b", "b"], "ranks": [0, 1]}',
                                "duplicate_response", "responses[1]"),
    "non_utf8": ("preference", b'{"prompt": "hello", "chosen": "caf\xe9", "rejected": "no"}',
                 "non_utf8", "chosen"),
    "lone_surrogate": ("preference", b'{"prompt": "\\udcff", "chosen": "a", "rejected": "b"}',
                       "non_utf8", "prompt"),
    "no_assistant_turn": ("sft", b'{"messages": [{"role": "user", "content": "hi"}]}',
                          "no_assistant_turn", "messages"),
}


def _bad_file(tmp_path, fmt, bad_line):
    good = {"preference": GOOD_PREF, "ranking": GOOD_RANK,
            "sft": {"prompt": "hello", "completion": "yes"}}[fmt]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\n\n" + bad_line + b"\n" + json.dumps(good).encode() + b"\n")
    return path                                                # the bad row is on line 3


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_naming_file_line_field(tmp_path, case):
    fmt, line, reason, field = BAD[case]
    path = _bad_file(tmp_path, fmt, line)
    with pytest.raises(DataError) as e:
        data.read_records(str(path), fmt)
    err = e.value
    assert err.reason == reason and err.path == str(path) and err.line == 3
    assert str(err).startswith(f"{path}:3: ")
    if field is not None:
        assert err.field == field and f"field {field!r}" in str(err)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_skipped_and_counted(tmp_path, tok, case):
    fmt, line, reason, _ = BAD[case]
    path = _bad_file(tmp_path, fmt, line)
    recs, stats = data.read_records(str(path), fmt, skip_bad_rows=True)
    assert len(recs) == 2 and stats.rows == 3 and stats.skipped == {reason: 1}
    it = data.DataIterator(str(path), fmt, tok, batch_size=2, max_length=32, num_epochs=1,
                           skip_bad_rows=True)
    batches = list(it)
    assert it.stats.examples == 2 and it.stats.skipped == {reason: 1} and it.stats.rows == 3
    assert it.stats.as_metrics()[f"data/skipped/{reason}"] == 1.0
    assert str(path) in it.stats.samples[reason][0]
    assert len(batches) == 1


def test_prompt_longer_than_maximum(tmp_path, tok):
    path = _bad_file(tmp_path, "preference", json.dumps(
        {"prompt": "one two three four five six seven", "chosen": "yes", "rejected": "no"}).encode())
    kw = dict(batch_size=2, max_length=16, max_prompt_length=4, truncation="error", num_epochs=1)
    with pytest.raises(DataError) as e:
        list(data.preference_batches(str(path), tok, **kw))
    assert (e.value.line, e.value.field, e.value.reason) == (3, "prompt", "too_long")
    assert str(path) in str(e.value)
    it = data.preference_batches(str(path), tok, skip_bad_rows=True, **kw)
    list(it)
    assert it.stats.skipped == {"too_long": 1} and it.stats.examples == 2


def test_non_utf8_in_parquet_binary_column(tmp_path):
    table = pa.table({"prompt": pa.array([b"hello", b"caf\xe9"], pa.binary()),
                      "chosen": ["yes", "yes"], "rejected": ["no", "no"]})
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError) as e:
        data.read_records(str(path), "preference")
    assert (e.value.line, e.value.field, e.value.reason) == (2, "prompt", "non_utf8")
    assert "row 2" in str(e.value)
    recs, stats = data.read_records(str(path), "preference", skip_bad_rows=True)
    assert recs[0]["prompt"] == "hello" and stats.skipped == {"non_utf8": 1}


def test_non_utf8_in_parquet_string_column(tmp_path):
    # pyarrow validates UTF-8 when building arrays but not when reading files other tools wrote
    raw = pa.array([b"hello", b"red", b"caf\xe9"], pa.binary())
    bad = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    path = tmp_path / "bad_string.parquet"
    pq.write_table(pa.table({"prompt": bad}), path)
    with pytest.raises(DataError) as e:
        data.read_records(str(path), "prompt")
    assert (e.value.line, e.value.field, e.value.reason) == (3, "prompt", "non_utf8")
    recs, stats = data.read_records(str(path), "prompt", skip_bad_rows=True)
    assert recs == [{"prompt": "hello"}, {"prompt": "red"}] and stats.skipped == {"non_utf8": 1}


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_records(str(tmp_path / "nope.jsonl"), "sft")
    with pytest.raises(DataError, match="unknown file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        data.read_records(str(tmp_path / "x.csv"), "sft")
    with pytest.raises(DataError, match="matches no file"):
        data.read_records(str(tmp_path / "*.parquet"), "sft")
    with pytest.raises(DataError, match="unknown format"):
        data.read_records([{"prompt": "a"}], "pairs")


def test_glob_and_multiple_files(tmp_path):
    write_jsonl(tmp_path / "a-1.jsonl", RECORDS["sft"][:2])
    write_jsonl(tmp_path / "a-2.jsonl", RECORDS["sft"][2:])
    recs, _ = data.read_records(str(tmp_path / "a-*.jsonl"), "sft")
    assert recs == RECORDS["sft"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError) as e:
        data.read_records(f"{tmp_path / 'a-1.jsonl'},{bad}", "sft")
    assert e.value.path == str(bad) and e.value.line == 2


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_validate_inspect_to_tfds(tmp_path, capsys, files):
    paths, _ = files
    assert cli_main(["data", "validate", str(paths["preference"]["jsonl"]), "--format", "preference"]) == 0
    assert "2 valid, 0 bad" in capsys.readouterr().out
    bad = _bad_file(tmp_path, "ranking", BAD["rank_ties"][1])
    assert cli_main(["data", "validate", str(bad)]) == 1              # format guessed
    cap = capsys.readouterr()
    assert f"{bad}:3: field 'ranks'" in cap.err and '"rank_ties": 1' in cap.out
    tok_dir = tmp_path / "tok"
    make_tokenizer(tok_dir)
    assert cli_main(["data", "inspect", str(paths["sft_messages"]["parquet"]), "--format", "sft",
                     "--tokenizer", str(tok_dir), "-n", "1"]) == 0
    assert "loss tokens: 2" in capsys.readouterr().out                 # "yes" + <|im_end|>
    src = tmp_path / "qa.jsonl"
    write_jsonl(src, [{"q": "hello", "a": "yes"}, {"q": "red", "a": "blue"}])
    assert cli_main(["data", "to-tfds", f"train={src}", f"test={src}", "--format", "sft",
                     "--field-map", "prompt=q", "--field-map", "completion=a", "--name", "qa_sft",
                     "--data-dir", str(tmp_path / "d")]) == 0
    assert "tfds:qa_sft" in capsys.readouterr().out
    recs, _ = data.read_records("tfds:qa_sft", "sft", split="test", data_dir=str(tmp_path / "d"))
    assert recs[1] == {"prompt": "red", "completion": "blue"}
    assert cli_main(["data", "to-tfds", str(src), "--format", "sft", "--name", "Bad-Name",
                     "--data-dir", str(tmp_path / "d")]) == 1
    assert "lower_snake_case" in capsys.readouterr().err


def test_hh_transcripts_through_jsonl_parquet_and_tfds(tmp_path):
    base = "\n\nHuman: what is two plus two ?\n\nAssistant:"
    raw = [{"chosen": base + " four", "rejected": base + " five", "margin": 1},
           {"chosen": [U("hi"), A("yes")], "rejected": [U("hi"), A("no")]}]
    want = [{"prompt": base, "chosen": " four", "rejected": " five", "margin": 1.0},
            {"prompt": [U("hi")], "chosen": [A("yes")], "rejected": [A("no")], "margin": 0.0}]
    jl = write_jsonl(tmp_path / "hh.jsonl", raw)
    pq_path = write_parquet(tmp_path / "hh.parquet", raw[:1])
    assert data.read_records(str(jl), "preference")[0] == want
    assert data.read_records(str(pq_path), "preference")[0] == want[:1]
    data.files_to_tfds({"train": str(jl)}, "hh_mixed", tmp_path / "d", fmt="preference")
    assert data.read_records("tfds:hh_mixed", "preference", data_dir=str(tmp_path / "d"))[0] == want
