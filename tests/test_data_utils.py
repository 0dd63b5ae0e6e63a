"""Helpers shared by the data-layer tests (no tests here): a tiny word-level HF tokenizer."""
from __future__ import annotations

import os

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ("user assistant system hello hi world the a cat dog sat on mat red blue green yes no "
         "what is two plus one three four five six seven eight nine ten good bad answer question "
         "Human Assistant : ? . , ! I you it tell me about sky sea sun").split()


def make_tokenizer(path, *, bos: bool = False, chat_template: bool = True):
    """A word-level `PreTrainedTokenizerFast` saved to `path` and reloaded with AutoTokenizer.

    ids: <pad>=0 <s>=1 </s>=2 <unk>=3 <|im_start|>=4 <|im_end|>=5, then WORDS in order, then "\\n".
    With `bos=True` the post-processor prepends <s> (like Llama) when special tokens are added.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(),
    ])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))
