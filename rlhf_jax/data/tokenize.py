"""Tokenisation of canonical records with any Hugging Face tokenizer.

The tokenizer is duck-typed (``transformers.AutoTokenizer`` from a local directory is the usual
one): it is called as ``tok(text, add_special_tokens=..., return_offsets_mapping=...)`` and, for
message lists, ``tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``.

Conventions (TRL's):

* a string prompt is encoded with the tokenizer's special tokens (its BOS if it adds one), a
  response without (``add_special_tokens=False``), and ``eos_token_id`` is appended to every
  response unless it already ends with it (``append_eos``);
* message lists are rendered with the chat template: prompt = ``render(prompt, generation
  prompt)``, response = ``render(prompt + response)`` minus that prefix (the template must be
  prefix-stable, else :class:`DataError`); rendered text is encoded without extra special tokens
  (the template writes them);
* conversations (``{"messages"}``) are rendered once; the loss mask is 1 on the tokens of each
  assistant turn, found as the characters between ``render(messages[:i], generation prompt)`` and
  ``render(messages[:i+1])``, mapped to tokens through the fast tokenizer's offsets.

Truncation (``TokenizeOptions.truncation``), with ``L = max_length`` and ``P =
max_prompt_length or L - 1``:

* ``"truncate_left"``: a prompt longer than ``P`` keeps its last ``P`` tokens, then a response
  longer than ``L - len(prompt)`` keeps its first tokens; a conversation longer than ``L`` keeps
  its last ``L`` tokens (its end, where the answers are). Counted in ``truncated_prompt`` /
  ``truncated_response``.
* ``"drop"``: an example that would need any cut is dropped (``dropped_too_long``).
* ``"error"``: :class:`DataError` naming the field that is too long (skippable).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from rlhf_jax.data.errors import DataError, Location

TRUNCATION_POLICIES = ("truncate_left", "drop", "error")


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
    """``max_length``: tokens of prompt + response (the sequence length); ``max_prompt_length``:
    prompt tokens (``None`` -> ``max_length - 1`` for pairs, ``max_length`` for the prompt
    format); ``truncation``: one of ``TRUNCATION_POLICIES``; ``append_eos``: end responses with
    EOS."""

    max_length: int
    max_prompt_length: int | None = None
    truncation: str = "truncate_left"
    append_eos: bool = True

    def __post_init__(self):
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation={self.truncation!r}; expected one of {TRUNCATION_POLICIES}")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}; need at least 2 tokens")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length}; need >= 1 (or None)")

    def prompt_limit(self, *, prompt_only: bool = False) -> int:
        if prompt_only:
            return self.max_prompt_length or self.max_length
        return min(self.max_prompt_length or self.max_length - 1, self.max_length - 1)


class Counts(dict):
    """Per-example stat increments (keys of DataStats); applied when the example is consumed."""

    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


class _Drop(Exception):
    """The example is dropped (not an error); ``key`` is the DataStats counter."""

    def __init__(self, key: str):
        self.key = key


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad, else its EOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


class Encoder:
    """Wraps a tokenizer with the conventions above. ``encode_*`` raise DataError (no location)."""

    def __init__(self, tokenizer, *, append_eos: bool = True):
        self.tok = tokenizer
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        if append_eos and self.eos_id is None:
            raise DataError("the tokenizer has no eos_token_id but append_eos=True; set an EOS "
                            "token or pass append_eos=False", reason="tokenizer")
        self.append_eos = append_eos
        self.pad_id = pad_token_id(tokenizer)
        self._cache: dict[tuple[str, bool], list[int]] = {}

    # --- text -----------------------------------------------------------------------------
    def ids(self, text: str, *, special: bool) -> list[int]:
        hit = self._cache.pop((text, special), None)
        if hit is not None:
            return list(hit)
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def prefetch(self, records: Sequence[dict]) -> None:
        """Tokenises the plain-string fields of ``records`` in one batched call per kind.

        Purely a speed-up (one Rust batch instead of many Python round trips): :meth:`ids` then
        finds the results. The cache is replaced on every call, so it stays small."""
        want: dict[bool, list[str]] = {True: [], False: []}
        for rec in records:
            if not isinstance(rec.get("prompt"), str):
                continue
            want[True].append(rec["prompt"])
            for key in ("completion", "chosen", "rejected"):
                if isinstance(rec.get(key), str):
                    want[False].append(rec[key])
            want[False].extend(r for r in rec.get("responses", ()) if isinstance(r, str))
        self._cache = {}
        for special, texts in want.items():
            texts = list(dict.fromkeys(texts))
            if len(texts) > 1:
                out = self.tok(texts, add_special_tokens=special)["input_ids"]
                self._cache.update(((t, special), list(i)) for t, i in zip(texts, out))

    def _with_eos(self, ids: list[int]) -> list[int]:
        if self.append_eos and (not ids or ids[-1] != self.eos_id):
            ids = ids + [int(self.eos_id)]
        return ids

    def render(self, messages: list[dict], *, generation_prompt: bool, field: str = "messages") -> str:
        if not getattr(self.tok, "chat_template", None):
            raise DataError("message lists need a tokenizer with a chat_template; this tokenizer "
                            "has none", field=field, reason="chat_template")
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja errors (template raise_exception, bad roles)
            raise DataError(f"the chat template failed: {e}", field=field, reason="chat_template") from e
        if not isinstance(text, str):
            raise DataError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}",
                            field=field, reason="chat_template")
        return text

    # --- units ----------------------------------------------------------------------------
    def prompt(self, prompt) -> list[int]:
        """Prompt ids (a string with special tokens, messages rendered with a generation prompt)."""
        if isinstance(prompt, str):
            return self.ids(prompt, special=True)
        return self.ids(self.render(prompt, generation_prompt=True, field="prompt"), special=False)

    def prompt_response(self, prompt, response, field: str) -> tuple[list[int], list[int]]:
        """``(prompt_ids, response_ids)``; the response ends with EOS (``append_eos``)."""
        if isinstance(prompt, str):
            return self.ids(prompt, special=True), self._with_eos(self.ids(response, special=False))
        p_text = self.render(prompt, generation_prompt=True, field="prompt")
        full = self.render(list(prompt) + list(response), generation_prompt=False, field=field)
        if not full.startswith(p_text):
            raise DataError("the chat template is not prefix-stable: rendering prompt+response "
                            "does not start with the rendered prompt", field=field,
                            reason="chat_template")
        return (self.ids(p_text, special=False),
                self._with_eos(self.ids(full[len(p_text):], special=False)))

    def conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """``(ids, assistant_mask)`` of a whole conversation (mask 1 on assistant-turn tokens)."""
        full = self.render(messages, generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            end = self.render(messages[: i + 1], generation_prompt=False)
            before = self.render(messages[:i], generation_prompt=False)
            start = self.render(messages[:i], generation_prompt=True)
            if not full.startswith(start):
                # e.g. a generation prompt that opens a "<think>" block the rendered answer does
                # not have: the answer starts where the two renderings part
                start = os.path.commonprefix([start, end])
            if not (full.startswith(end) and full.startswith(before)
                    and len(before) <= len(start) <= len(end)):
                raise DataError(f"the chat template is not prefix-stable at message {i}: the "
                                "rendered conversation does not extend the rendering of its first "
                                "turns, so assistant tokens cannot be located",
                                field=f"messages[{i}]", reason="chat_template")
            spans.append((len(start), len(end)))
        try:
            enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError) as e:
            raise DataError(f"assistant-only loss needs a fast tokenizer with offsets: {e}",
                            reason="tokenizer") from e
        ids = list(enc["input_ids"])
        mask = []
        for a, b in enc["offset_mapping"]:
            inside = b > a and any(s <= a < e for s, e in spans)
            mask.append(1 if inside else 0)
        return ids, mask


# --- truncation ---------------------------------------------------------------------------

def _fit_prompt(prompt: list[int], limit: int, opts: TokenizeOptions, counts: Counts) -> list[int]:
    """The prompt under the truncation policy: kept, cut on the left to ``limit`` tokens, dropped or refused."""
    if len(prompt) <= limit:
        return prompt
    if opts.truncation == "error":
        raise DataError(f"prompt has {len(prompt)} tokens, more than the maximum {limit}",
                        field="prompt", reason="too_long")
    if opts.truncation == "drop":
        raise _Drop("dropped_too_long")
    counts["truncated_prompt"] = 1
    return prompt[len(prompt) - limit:]


def _fit_pair(prompt: list[int], response: list[int], opts: TokenizeOptions, counts: Counts,
              resp_field: str) -> tuple[list[int], list[int]]:
    """Applies the truncation policy to one prompt/response pair."""
    prompt = _fit_prompt(prompt, opts.prompt_limit(), opts, counts)
    room = opts.max_length - len(prompt)
    if len(response) > room:
        if opts.truncation == "error":
            raise DataError(f"prompt ({len(prompt)} tokens) + response ({len(response)} tokens) "
                            f"exceed max_length {opts.max_length}", field=resp_field,
                            reason="too_long")
        if opts.truncation == "drop":
            raise _Drop("dropped_too_long")
        response = response[:room]
        counts["truncated_response"] = 1
    return prompt, response


def _as_array(ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32)


def tokenize_sft(rec: dict, enc: Encoder, opts: TokenizeOptions, counts: Counts) -> dict[str, np.ndarray]:
    """-> ``{"ids" [n], "loss" [n]}``: ``loss[t]`` = 1 if token ``t`` is supervised (a completion or
    assistant token). The batcher turns it into next-token targets."""
    if "messages" in rec:
        ids, mask = enc.conversation(rec["messages"])
        if len(ids) > opts.max_length:
            if opts.truncation == "error":
                raise DataError(f"conversation has {len(ids)} tokens, more than max_length "
                                f"{opts.max_length}", field="messages", reason="too_long")
            if opts.truncation == "drop":
                raise _Drop("dropped_too_long")
            ids, mask = ids[-opts.max_length:], mask[-opts.max_length:]
            counts["truncated_prompt"] = 1
        # the first token has no predecessor, so it can never be a target
        if not any(mask[1:]):
            raise _Drop("dropped_no_loss_tokens")
        return {"ids": _as_array(ids), "loss": np.asarray(mask, np.int32)}
    prompt, response = enc.prompt_response(rec["prompt"], rec["completion"], "completion")
    prompt, response = _fit_pair(prompt, response, opts, counts, "completion")
    ids = prompt + response
    mask = [0] * len(prompt) + [1] * len(response)
    if not any(mask[1:]):
        raise _Drop("dropped_no_loss_tokens")
    return {"ids": _as_array(ids), "loss": np.asarray(mask, np.int32)}


def tokenize_preference(rec: dict, enc: Encoder, opts: TokenizeOptions, counts: Counts) -> dict[str, Any]:
    """-> ``{"prompt_len", "chosen" [n_c], "rejected" [n_r], "margin"}`` (prompt + response + EOS).

    The prompt is truncated once (shared by both sides), so both sequences start identically."""
    pc, rc = enc.prompt_response(rec["prompt"], rec["chosen"], "chosen")
    pr, rr = enc.prompt_response(rec["prompt"], rec["rejected"], "rejected")
    if pc != pr:
        raise DataError("the prompt tokenises differently before chosen and rejected",
                        field="prompt", reason="chat_template")
    c1, r1 = Counts(), Counts()
    p1, rc = _fit_pair(pc, rc, opts, c1, "chosen")
    _, rr = _fit_pair(pc, rr, opts, r1, "rejected")
    for k in set(c1) | set(r1):
        counts[k] = 1
    return {"prompt_len": len(p1), "chosen": _as_array(p1 + rc), "rejected": _as_array(p1 + rr),
            "margin": float(rec.get("margin", 0.0))}


def normalized_ranks(ranks: Sequence[int]) -> np.ndarray:
    """Distinct integer ranks (lower = preferred) -> 0..K-1 in the same order (0 = best)."""
    order = np.argsort(np.asarray(ranks), kind="stable")
    out = np.empty(len(ranks), np.int32)
    out[order] = np.arange(len(ranks), dtype=np.int32)
    return out


def tokenize_ranking(rec: dict, enc: Encoder, opts: TokenizeOptions, counts: Counts) -> dict[str, Any]:
    """-> ``{"prompt_len", "responses": [K arrays of prompt + response + EOS], "ranks" [K]}``."""
    prompt = None
    seqs = []
    for k, r in enumerate(rec["responses"]):
        p, resp = enc.prompt_response(rec["prompt"], r, f"responses[{k}]")
        if prompt is not None and p != prompt:
            raise DataError("the prompt tokenises differently between responses", field="prompt",
                            reason="chat_template")
        prompt = p
        c = Counts()
        p1, resp = _fit_pair(p, resp, opts, c, f"responses[{k}]")
        for key in c:
            counts[key] = 1
        seqs.append(_as_array(p1 + resp))
    return {"prompt_len": len(p1), "responses": seqs, "ranks": normalized_ranks(rec["ranks"])}


def tokenize_prompt(rec: dict, enc: Encoder, opts: TokenizeOptions, counts: Counts) -> dict[str, Any]:
    """-> ``{"ids" [n]}``: prompt ids (chat prompts end with the generation prompt)."""
    ids = _fit_prompt(enc.prompt(rec["prompt"]), opts.prompt_limit(prompt_only=True), opts, counts)
    return {"ids": _as_array(ids)}


TOKENIZERS = {"sft": tokenize_sft, "preference": tokenize_preference, "ranking": tokenize_ranking,
              "prompt": tokenize_prompt}


def tokenize_record(rec: dict, fmt: str, enc: Encoder, opts: TokenizeOptions, location: Location
                    ) -> tuple[dict[str, Any] | None, Counts]:
    """Tokenises a canonical record: ``(example, counts)``; ``example`` is None when dropped.

    Raises DataError (with ``location``) for rows that cannot be tokenised or are too long under
    ``truncation="error"``."""
    counts = Counts()
    try:
        return TOKENIZERS[fmt](rec, enc, opts, counts), counts
    except _Drop as d:
        counts = Counts()
        counts[d.key] = 1
        return None, counts
    except DataError as e:
        raise e.at(location) from None


def load_tokenizer(path: str):
    """``transformers.AutoTokenizer`` from a local directory (no hub access, no remote code)."""
    if not os.path.isdir(path):
        raise DataError(f"tokenizer directory {path!r} does not exist", reason="tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:  # no tokenizer files / an unrecognised tokenizer config
        raise DataError(f"tokenizer directory {path!r}: cannot load a Hugging Face tokenizer from it "
                        "(expected tokenizer.json or tokenizer_config.json + vocabulary files): "
                        f"{' '.join(str(e).split())[:300] or type(e).__name__}",
                        reason="tokenizer") from e
