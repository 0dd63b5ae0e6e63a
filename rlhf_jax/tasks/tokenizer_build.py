"""Builds each task's Hugging Face tokenizer directory, offline, from its fixed vocabulary.

The tokenizer is a ``tokenizers`` WordLevel model over ``Task.vocab`` (id = position in the tuple)
with a whitespace pre-tokenizer, saved as a ``transformers.PreTrainedTokenizerFast`` directory with
``<bos>``/``<eos>``/``<pad>``/``<unk>`` set. No BOS/EOS is added automatically (the data layer
appends EOS where a format needs it). The committed files under ``rlhf_jax/tasks/assets/<task>/``
are the output of::

    python -m rlhf_jax.tasks.tokenizer_build            # rewrite the shipped directories
    python -m rlhf_jax.tasks.tokenizer_build --out DIR  # write them elsewhere (tests compare)
"""
from __future__ import annotations

import argparse
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from rlhf_jax.tasks.base import BOS, EOS, PAD, UNK, Task, assets_root
from rlhf_jax.tasks.registry import get_task, list_tasks


def build_tokenizer(task: Task, out_dir: str) -> list[str]:
    """Writes ``task``'s tokenizer directory into ``out_dir``; returns the file names written."""
    from transformers import PreTrainedTokenizerFast  # heavy (~1.7 s); only this script needs it

    tok = Tokenizer(models.WordLevel(vocab=dict(task.token_to_id), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # word-level: decoding joins words with single spaces
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=task.prompt_length + task.response_length + 8,
        clean_up_tokenization_spaces=False)
    os.makedirs(out_dir, exist_ok=True)
    return sorted(os.path.basename(f) for f in fast.save_pretrained(out_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=assets_root(), help="root directory (one folder per task)")
    args = parser.parse_args(argv)
    for name in list_tasks():
        files = build_tokenizer(get_task(name), os.path.join(args.out, name))
        print(f"{name}: {', '.join(files)} -> {os.path.join(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
