"""What users get wrong with data files, model directories and generation arguments.

One table of bad inputs: each must fail as a ``rlhf_jax.errors.UserError`` (the CLI prints it as one
or two lines, exit 2) whose message names the file (and line/field) or the argument, and what was
expected; reading a bad input never changes it. Data files go through the trainers' path
(``make_iterator`` + the first batch) and, where the file itself is bad, through
``rlhf-jax data validate`` too, which must refuse it the same way. Inputs that are fine (a byte-order
mark, CRLF line ends, trailing blank lines, a directory of shards) must work.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data import DataConfig, load_tokenizer, make_iterator
from rlhf_jax.data import cli as data_cli
from rlhf_jax.errors import UserError
from rlhf_jax.generation import GenerationArgumentError, generate, generate_text
from rlhf_jax.models import CausalLM, from_pretrained, init_params, save_pretrained, tiny_config
from rlhf_jax.tasks import get_task

TOK_DIR = get_task("sort").tokenizer_dir

SFT = [{"prompt": "3 1 2 ->", "completion": " 1 2 3"}, {"prompt": "2 1 ->", "completion": " 1 2"},
       {"prompt": "5 4 ->", "completion": " 4 5"}]
PREF = [{"prompt": "3 1 2 ->", "chosen": " 1 2 3", "rejected": " 3 2 1"},
        {"prompt": "2 1 ->", "chosen": " 1 2", "rejected": " 2 1"}]
RANK = [{"prompt": "3 1 2 ->", "responses": [" 1 2 3", " 3 2 1", " 2 1 3"], "ranks": [0, 2, 1]}]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK_DIR)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A valid tiny model directory (and the model) to break."""
    config = tiny_config()
    model = CausalLM(config)
    params = init_params(model, jax.random.PRNGKey(0))
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    save_pretrained(path, model, params)
    return path, model, params


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    setup: Callable  # (tmp_path, ctx) -> the failing call (no arguments); setup writes the inputs
    expect: tuple[str, ...]  # regexes the message must match (file/line/field or argument, expected value)
    error: type = UserError
    validate: tuple[str, ...] | None = None  # `data validate` args (files relative to tmp_path), if it applies


@dataclasses.dataclass
class Ctx:
    tok: object
    model_dir: str
    model: object
    params: dict


def write(tmp, name: str, content: str | bytes) -> str:
    path = os.path.join(tmp, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return path


def first_batch(path: str, fmt: str, ctx: Ctx, **data):
    """What a trainer does with ``data.path=path``: build the iterator, take the first batch."""
    cfg = DataConfig(**{**dict(path=path, tokenizer=TOK_DIR, batch_size=2, max_length=32), **data})
    it = make_iterator(cfg, fmt, tokenizer=ctx.tok if data.get("tokenizer") is None else None)
    return next(it)


def data_case(id: str, fmt: str, files: dict[str, str | bytes], expect, *, path: str | None = None,
              validate: bool = True, **data) -> Case:
    """A data file case: ``files`` are written under tmp_path; ``path`` defaults to the first one."""
    target = path or next(iter(files))

    def setup(tmp, ctx):
        for name, content in files.items():
            write(tmp, name, content)
        kw = {k: v.format(tmp=tmp) if isinstance(v, str) else v for k, v in data.items()}
        return lambda: first_batch(os.path.join(tmp, target), fmt, ctx, **kw)

    return Case(id, setup, tuple(expect), validate=(target, "--format", fmt) if validate else None)


def model_case(id: str, breaks: Callable[[str], None], expect, error=UserError, **kw) -> Case:
    """A model directory case: a copy of the valid tiny model directory, broken by ``breaks(dir)``."""

    def setup(tmp, ctx):
        path = os.path.join(tmp, "model")
        shutil.copytree(ctx.model_dir, path)
        breaks(path)
        return lambda: from_pretrained(path, **kw)

    return Case(id, setup, tuple(expect), error)


def gen_case(id: str, expect, *, prompt=((5, 6, 7),), mask=None, **kw) -> Case:
    """A ``generate`` call on the tiny model with one bad argument."""

    def setup(tmp, ctx):
        ids = np.asarray(prompt, np.int32)
        m = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
        args = dict(rng=jax.random.key(0), max_new_tokens=4)
        args.update(kw)
        return lambda: generate(ctx.model, ctx.params, ids, m, **args)

    return Case(id, setup, tuple(expect), GenerationArgumentError)


def edit_config(**changes) -> Callable[[str], None]:
    def breaks(path):
        f = os.path.join(path, "config.json")
        with open(f) as fh:
            cfg = json.load(fh)
        cfg.update(changes)
        with open(f, "w") as fh:
            json.dump(cfg, fh, indent=2)
    return breaks


def truncate(path):
    f = os.path.join(path, "model.safetensors")
    blob = open(f, "rb").read()
    open(f, "wb").write(blob[: len(blob) // 2])


def pickle_only(path):
    os.remove(os.path.join(path, "model.safetensors"))
    write(path, "pytorch_model.bin", b"PK\x03\x04 a torch pickle")


def config_syntax_error(path):
    f = os.path.join(path, "config.json")
    text = open(f).read()
    open(f, "w").write(text.replace('"hidden_size": 64,', '"hidden_size": 64', 1))


def sharded_missing_shard(path):
    write(path, "model.safetensors.index.json",
          json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    os.remove(os.path.join(path, "model.safetensors"))


def run_generate_text(prompts, **kw):
    def setup(tmp, ctx):
        return lambda: generate_text(ctx.model, ctx.params, ctx.tok, prompts, max_new_tokens=2, **kw)
    return setup


CASES = [
    # --- data files (trainers' iterator, and `data validate`) -----------------------------------
    data_case("empty-file", "sft", {"empty.jsonl": ""}, [r"empty\.jsonl", "no rows", "empty"]),
    data_case("blank-lines-only", "sft", {"blank.jsonl": "\n  \r\n\n"}, [r"blank\.jsonl", "no rows"]),
    data_case("bom-only", "sft", {"bom.jsonl": b"\xef\xbb\xbf\r\n"}, [r"bom\.jsonl", "no rows"]),
    data_case("malformed-json-line-3", "sft",
              {"bad.jsonl": jsonl(SFT[:2]) + '{"prompt": "1 ->", "completion": " 1"\n'},
              [r"bad\.jsonl:3:", "malformed JSON", "one JSON object per line"]),
    data_case("missing-field", "sft", {"sft.jsonl": jsonl([{"prompt": "2 1 ->"}] + SFT)},
              [r"sft\.jsonl:1:", "'completion'", "missing required field"]),
    data_case("wrong-type-field", "sft", {"sft.jsonl": jsonl([SFT[0], {"prompt": 7, "completion": " 1"}])},
              [r"sft\.jsonl:2:", "'prompt'", "expected a string or a list of messages, got int"]),
    data_case("preference-file-as-sft", "sft", {"pref.jsonl": jsonl(PREF)},
              [r"pref\.jsonl:1:", "'completion'", "missing required field"]),
    data_case("chosen-equals-rejected", "preference",
              {"pref.jsonl": jsonl([PREF[0], {"prompt": "2 1 ->", "chosen": " 1 2", "rejected": " 1 2"}])},
              [r"pref\.jsonl:2:", "'rejected'", "chosen and rejected are identical"]),
    data_case("empty-chosen", "preference",
              {"pref.jsonl": jsonl([{"prompt": "2 1 ->", "chosen": "  ", "rejected": " 2 1"}])},
              [r"pref\.jsonl:1:", "'chosen'", "empty response"]),
    data_case("margin-not-a-number", "preference",
              {"pref.jsonl": jsonl([{**PREF[0], "margin": "high"}])},
              [r"pref\.jsonl:1:", "'margin'", "expected a number, got str"]),
    data_case("ranking-missing-rank", "ranking",
              {"rank.jsonl": jsonl([{**RANK[0], "ranks": [0, 1]}])},
              [r"rank\.jsonl:1:", "'ranks'", "2 ranks for 3 responses"]),
    data_case("ranking-tied-ranks", "ranking",
              {"rank.jsonl": jsonl([{**RANK[0], "ranks": [0, 1, 1]}])},
              [r"rank\.jsonl:1:", "'ranks'", r"ties are not allowed \(rank\(s\) \[1\]"]),
    data_case("ranking-one-response", "ranking",
              {"rank.jsonl": jsonl([{"prompt": "1 ->", "responses": [" 1"], "ranks": [0]}])},
              [r"rank\.jsonl:1:", "'responses'", "K >= 2"]),
    data_case("conversation-without-assistant", "sft",
              {"chat.jsonl": jsonl([{"messages": [{"role": "user", "content": "2 1 ->"}]}])},
              [r"chat\.jsonl:1:", "'messages'", "no assistant turn"]),
    data_case("csv-content-in-jsonl", "sft", {"data.jsonl": "prompt,completion\n2 1 ->, 1 2\n"},
              [r"data\.jsonl:1:", "malformed JSON", "one JSON object per line"]),
    data_case("csv-file", "sft", {"data.csv": "prompt,completion\n2 1 ->, 1 2\n"},
              [r"data\.csv", r"unknown file type '\.csv'", r"\.jsonl", "convert CSV"]),
    data_case("json-array-file", "sft", {"data.json": json.dumps(SFT, indent=1)},
              [r"data\.json:1:", "JSON array", "one JSON object per line"]),
    data_case("non-utf8-bytes", "sft",
              {"latin1.jsonl": '{"prompt": "caf\xe9 ->", "completion": " 1"}\n'.encode("latin-1")},
              [r"latin1\.jsonl:1:", "'prompt'", "non-UTF-8", "must be UTF-8"]),
    data_case("not-parquet", "sft", {"train.parquet": "prompt,completion\n2 1 ->, 1 2\n"},
              [r"train\.parquet", "cannot read as Parquet"]),
    data_case("utf16-file", "sft", {"utf16.jsonl": jsonl(SFT).encode("utf-16")},
              [r"utf16\.jsonl", "UTF-16", "save it as UTF-8"]),
    data_case("directory-without-shards", "sft", {"shards/readme.txt": "data comes later"},
              [r"shards", r"\.jsonl", "found none", "readme.txt"], path="shards"),
    data_case("missing-file", "sft", {"other.jsonl": jsonl(SFT)}, [r"nope\.jsonl", "no such file"],
              path="nope.jsonl"),
    data_case("glob-matches-nothing", "sft", {"a.jsonl": jsonl(SFT)},
              [r"train-\*\.jsonl", "matches no file"], path="train-*.jsonl"),
    data_case("all-rows-bad-but-skipped", "prompt", {"p.jsonl": jsonl([{"prompt": 1}, {"prompt": ""}])},
              [r"p\.jsonl", "no usable example", "wrong_type"], validate=False, skip_bad_rows=True,
              num_epochs=1),
    # --- data settings -------------------------------------------------------------------------
    data_case("field-map-without-equals", "sft", {"sft.jsonl": jsonl(SFT)},
              ["data.field_map", "'prompt'", "CANONICAL=COLUMN"], validate=False, field_map=("prompt",)),
    data_case("field-map-reversed", "sft", {"sft.jsonl": jsonl(SFT)},
              ["data.field_map", "'question' is not a field", "did you mean prompt=question"],
              validate=False, field_map=("question=prompt",)),
    data_case("batch-size-zero", "sft", {"sft.jsonl": jsonl(SFT)}, [r"data\.batch_size=0", ">= 1"],
              validate=False, batch_size=0),
    data_case("unknown-truncation", "sft", {"sft.jsonl": jsonl(SFT)},
              [r"data\.truncation='cut'", "truncate_left"], validate=False, truncation="cut"),
    data_case("bucket-below-max-length", "sft", {"sft.jsonl": jsonl(SFT)},
              [r"data\.buckets=\(8,\)", ">= the maximum length 32"], validate=False, buckets=(8,)),
    data_case("tokenizer-dir-without-tokenizer", "sft", {"sft.jsonl": jsonl(SFT), "tok/notes.txt": "x"},
              ["tokenizer directory", "tok'", "tokenizer.json"], validate=False, tokenizer="{tmp}/tok"),
    # --- model directories -----------------------------------------------------------------------
    model_case("pickle-only", pickle_only,
               [r"pytorch_model\.bin", "never read, only safetensors", "safe_serialization=True"]),
    model_case("truncated-safetensors", truncate, [r"model[/\\]model\.safetensors", "truncated or corrupt"]),
    model_case("config-syntax-error", config_syntax_error,
               [r"config\.json", r"invalid JSON at line \d+ column \d+", "delimiter"]),
    model_case("missing-config", lambda p: os.remove(os.path.join(p, "config.json")),
               [r"model: no config\.json", "model.safetensors"]),
    model_case("unsupported-architecture", edit_config(model_type="bert", architectures=["BertModel"]),
               [r"config\.json", "unsupported model_type 'bert'", "supported"]),
    model_case("shape-mismatch", edit_config(intermediate_size=256),
               ["gate_proj.weight", r"\[128, 64\]", r"\[256, 64\]"]),
    model_case("config-field-wrong-type", edit_config(hidden_size="sixty-four"),
               [r"config\.json", "'hidden_size'", "positive integer", "sixty-four"]),
    model_case("config-heads-do-not-divide", edit_config(num_key_value_heads=3),
               [r"config\.json", "num_kv_heads=3"]),
    model_case("index-lists-missing-shard", sharded_missing_shard,
               [r"model\.safetensors\.index\.json", "model-00001-of-00002.safetensors", "missing"]),
    Case("model-dir-does-not-exist", lambda tmp, ctx: lambda: from_pretrained(os.path.join(tmp, "no-model")),
         ("no-model does not exist", "config.json")),
    model_case("index-syntax-error", lambda p: write(p, "model.safetensors.index.json", '{"weight_map": {'),
               [r"model\.safetensors\.index\.json", r"invalid JSON at line 1 column \d+", "weight_map"]),
    # --- generation arguments ---------------------------------------------------------------------
    gen_case("temperature-zero", ["temperature", "> 0", "got 0", "greedy=True"], temperature=0.0),
    gen_case("temperature-negative", ["temperature", "> 0", "-0.5"], temperature=-0.5),
    gen_case("temperature-zero-greedy", ["temperature", "> 0"], temperature=0.0, greedy=True),
    gen_case("temperature-nan", ["temperature", "finite"], temperature=float("nan")),
    gen_case("top-p-zero", ["top_p", r"\(0, 1\]", "got 0"], top_p=0.0),
    gen_case("top-p-above-one", ["top_p", r"\(0, 1\]", "1.5"], top_p=1.5),
    gen_case("top-k-negative", ["top_k", ">= 0", "-1"], top_k=-1),
    gen_case("max-new-tokens-zero", ["max_new_tokens", ">= 1", "got 0"], max_new_tokens=0),
    gen_case("prompt-plus-new-tokens-too-long", ["prompt length 3", "max_new_tokens 62",
                                                 "max_position_embeddings 64"], max_new_tokens=62),
    gen_case("row-without-prompt-token", ["prompt_mask row 1", "no real token"],
             prompt=((5, 6), (0, 0)), mask=((1, 1), (0, 0))),
    gen_case("token-id-outside-vocab", [r"prompt_ids\[0, 1\] = 500", "vocab_size 128"], prompt=((5, 500),)),
    gen_case("negative-stop-token", [r"stop_token_ids\[0\]", ">= 0"], stop_token_ids=(-2,)),
    gen_case("sampling-without-rng", ["rng is required"], rng=None),
    gen_case("pad-id-outside-vocab", ["pad_token_id", r"\[0, vocab_size=128\)", "999"], pad_token_id=999),
    Case("generate-text-no-prompts", run_generate_text([]), ("prompts is empty",), GenerationArgumentError),
    Case("generate-text-empty-prompt", run_generate_text(["3 1 ->", ""]),
         (r"prompts\[1\] encodes to no tokens",), GenerationArgumentError),
    Case("generate-text-top-p-zero", run_generate_text(["3 1 ->"], top_p=0.0), ("top_p",),
         GenerationArgumentError),
]


def _hashes(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_the_table_is_big_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.fixture
def ctx(tok, tiny):
    return Ctx(tok, *tiny)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_a_user_error_naming_it(case, tmp_path, ctx):
    call = case.setup(str(tmp_path), ctx)
    before, model_before = _hashes(tmp_path), _hashes(ctx.model_dir)
    with pytest.raises(UserError) as info:
        call()
    err, message = info.value, str(info.value)
    assert isinstance(err, case.error), f"{type(err).__name__}: {err}"
    for pattern in case.expect:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    assert len(message.splitlines()) <= 2, message
    # reading a bad input never changes it (nor the valid model it was copied from)
    assert _hashes(tmp_path) == before
    assert _hashes(ctx.model_dir) == model_before


VALIDATE_CASES = [c for c in CASES if c.validate is not None]


def _validate(tmp, *argv) -> int:
    parser = argparse.ArgumentParser()
    data_cli.add_arguments(parser)
    args = parser.parse_args(["validate", *[os.path.join(tmp, a) if i == 0 else a for i, a in enumerate(argv)]])
    return data_cli.run(args)


@pytest.mark.parametrize("case", VALIDATE_CASES, ids=lambda c: c.id)
def test_data_validate_agrees_with_the_trainers(case, tmp_path, ctx, capsys):
    """``rlhf-jax data validate`` refuses every file the trainers refuse, with the same message."""
    call = case.setup(str(tmp_path), ctx)
    before = _hashes(tmp_path)
    with pytest.raises(UserError) as info:
        call()
    capsys.readouterr()
    assert _validate(str(tmp_path), *case.validate) != 0
    err = capsys.readouterr().err
    assert str(info.value) in err, err
    assert _hashes(tmp_path) == before


# --- inputs that are fine --------------------------------------------------------------------------

GOOD_FILES = {
    "bom.jsonl": b"\xef\xbb\xbf" + jsonl(SFT).encode(),
    "crlf.jsonl": jsonl(SFT).replace("\n", "\r\n").encode(),
    "bom-crlf-trailing-blanks.jsonl": b"\xef\xbb\xbf" + jsonl(SFT).replace("\n", "\r\n").encode() + b"\r\n\r\n \n",
    "shards/part-0.jsonl": jsonl(SFT[:2]).encode(),
}


@pytest.mark.parametrize("name", list(GOOD_FILES), ids=lambda n: n.split("/")[0])
def test_fine_inputs_work_in_trainers_and_validate(name, tmp_path, ctx, capsys):
    path = write(str(tmp_path), name, GOOD_FILES[name])
    if name.startswith("shards/"):
        write(str(tmp_path), "shards/part-1.jsonl", jsonl(SFT[2:]))
        write(str(tmp_path), "shards/README.md", "not data")
        path = os.path.dirname(path)
    before = _hashes(tmp_path)
    batch = first_batch(path, "sft", ctx, pack=False, num_epochs=1)
    assert batch["example_mask"].sum() == 2
    cfg = DataConfig(path=path, batch_size=8, max_length=32, pack=False, num_epochs=1)
    (batch,) = list(make_iterator(cfg, "sft", tokenizer=ctx.tok))
    assert batch["example_mask"].sum() == 3  # every row read, the blank ones ignored
    assert _validate(str(tmp_path), os.path.relpath(path, tmp_path)) == 0
    assert "3 rows, 3 valid, 0 bad" in capsys.readouterr().out
    assert _hashes(tmp_path) == before


def test_first_row_with_bom_is_parsed_like_the_others(tmp_path, tok):
    path = write(str(tmp_path), "bom.jsonl", b"\xef\xbb\xbf" + jsonl(SFT).encode())
    with_bom = list(make_iterator(DataConfig(path=path, pack=False, num_epochs=1, shuffle=False, max_length=32),
                                  "sft", tokenizer=tok))
    plain = list(make_iterator(DataConfig(path=write(str(tmp_path), "plain.jsonl", jsonl(SFT)), pack=False,
                                          num_epochs=1, shuffle=False, max_length=32), "sft", tokenizer=tok))
    np.testing.assert_array_equal(with_bom[0]["input_ids"], plain[0]["input_ids"])


def test_config_json_with_bom_loads(tmp_path, tiny):
    path, model, params = tiny
    copy = str(tmp_path / "model")
    shutil.copytree(path, copy)
    f = os.path.join(copy, "config.json")
    text = open(f, "rb").read()
    open(f, "wb").write(b"\xef\xbb\xbf" + text)
    loaded, loaded_params = from_pretrained(copy)
    assert loaded.config == model.config


def test_traced_arguments_are_not_value_checked(tiny):
    """Inside an outer jit the hyper-parameters are tracers: generate checks only shapes then."""
    _, model, params = tiny
    ids, mask = jnp.asarray([[5, 6, 7]], jnp.int32), jnp.ones((1, 3), jnp.int32)

    @jax.jit
    def sample(temperature, top_p, ids, mask):
        return generate(model, params, ids, mask, rng=jax.random.key(0), max_new_tokens=3,
                        temperature=temperature, top_p=top_p).tokens

    assert sample(0.7, 0.9, ids, mask).shape == (1, 3)
    with pytest.raises(GenerationArgumentError, match=r"must both be \[B, P\]"):
        sample(0.7, 0.9, ids, mask[:, :2])


def test_generate_cli_refuses_chat_without_template(tmp_path, tiny, capsys):
    from rlhf_jax.generation import cli as gen_cli

    parser = argparse.ArgumentParser()
    gen_cli.add_arguments(parser)
    args = parser.parse_args(["--model", tiny[0], "--tokenizer", TOK_DIR, "--prompt", "3 1 ->", "--chat"])
    with pytest.raises(GenerationArgumentError, match="--chat needs a tokenizer with a chat template"):
        gen_cli.run(args)
