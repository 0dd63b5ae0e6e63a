"""generate_text and the `rlhf-jax generate` CLI on a tiny model with a word-level tokenizer."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from rlhf_jax.cli import main as cli_main
from rlhf_jax.generation import generate, generate_text, left_pad_sequences
from rlhf_jax.models import from_pretrained

from tests.hf_utils import make_hf_model

WORDS = [f"w{i}" for i in range(124)]  # + 4 specials = vocab 128, the tiny model's table


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import tokenizers
    import transformers

    path = tmp_path_factory.mktemp("gen_text") / "llama"
    make_hf_model("llama", path, seed=5)
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                                eos_token="[EOS]", unk_token="[UNK]")
    fast.save_pretrained(str(path))
    return str(path)


PROMPTS = ["w5 w9 w17", "w100", "w3 w4 w5 w6 w7 w8"]


def test_generate_text_matches_generate_on_token_ids(model_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model, params = from_pretrained(model_dir)
    texts, out, ids, mask = generate_text(model, params, tok, PROMPTS, max_new_tokens=6, greedy=True,
                                          return_output=True)
    seqs = [tok.encode(p) for p in PROMPTS]
    assert seqs[1] == [104]
    want_ids, want_mask = left_pad_sequences(seqs, 0)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    ref = generate(model, params, want_ids, want_mask, rng=None, max_new_tokens=6, greedy=True,
                   stop_token_ids=(2,), pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    for b, text in enumerate(texts):
        real = [t for t in np.asarray(ref.tokens)[b, : int(ref.lengths[b])] if t >= 4]
        assert text.split() == [WORDS[t - 4] for t in real]
    with pytest.raises(TypeError, match="list of strings"):
        generate_text(model, params, tok, "w1", max_new_tokens=2, greedy=True)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str"):
        generate_text(model, params, tok, ["w1", 3], max_new_tokens=2, greedy=True)


def test_cli_generate_writes_the_same_completions(model_dir, tmp_path, capsys):
    import transformers

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out_file = tmp_path / "out.jsonl"
    rc = cli_main(["generate", "--model", model_dir, "--prompts-file", str(prompts_file), "--max-new-tokens", "6",
                   "--greedy", "--out", str(out_file)])
    assert rc == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model, params = from_pretrained(model_dir)
    want = generate_text(model, params, tok, PROMPTS, max_new_tokens=6, greedy=True)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == want
    assert all(1 <= r["n_tokens"] <= 6 for r in rows)
    assert ">>> w100" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1"}\n{"text": "w2"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: expected a string field 'prompt'"):
        cli_main(["generate", "--model", model_dir, "--prompts-file", str(bad)])
    with pytest.raises(SystemExit, match="is not a directory"):
        cli_main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "w1"])
