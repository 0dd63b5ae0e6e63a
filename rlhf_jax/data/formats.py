"""Record formats: validation and normalisation of raw rows.

Four formats (``FORMATS``), each accepting the layouts the field uses and normalising them to one
canonical dict (what ``parse_record`` returns, what the TFDS writer stores, what the tokeniser
reads). ``T`` below is either a string or a list of chat messages ``[{"role", "content"}, ...]``
(only ``role`` and ``content`` are kept).

* ``"sft"``: ``{"prompt": T, "completion": T}`` (prompt and completion both strings or both
  message lists), ``{"messages": [...]}`` (loss on assistant turns) or ``{"text": str}`` (loss on
  every token; normalised to ``prompt=""``). Canonical: ``{"prompt", "completion"}`` or
  ``{"messages"}``.
* ``"preference"``: ``{"prompt": T, "chosen": T, "rejected": T, "margin"?: number}`` (TRL explicit
  prompt) or ``{"chosen": T, "rejected": T, "margin"?}`` full transcripts (Anthropic-HH): the
  shared prefix becomes the prompt (see :func:`split_shared_prefix`). Canonical:
  ``{"prompt", "chosen", "rejected", "margin"}`` with ``margin`` 0.0 when absent.
* ``"ranking"``: ``{"prompt": T, "responses": [T, ...], "ranks": [int, ...]}``, K >= 2 distinct
  responses, K distinct integer ranks, lower rank = preferred (InstructGPT labelling).
* ``"prompt"``: ``{"prompt": T}`` or ``{"messages": [...]}``. Canonical: ``{"prompt": T}``.

``field_map`` maps canonical names to the columns that hold them (``{"prompt": "question"}``).
Every problem raises :class:`DataError` naming location, field (and mapped column) and reason.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from rlhf_jax.data.errors import DataError, Location

FORMATS = ("sft", "preference", "ranking", "prompt")

HH_ASSISTANT_MARKER = "\n\nAssistant:"


def apply_field_map(raw: Mapping[str, Any], field_map: Mapping[str, str] | None) -> dict[str, Any]:
    """Renames source columns to canonical names: ``field_map = {canonical: column}``.

    All renames happen at once (so ``{"chosen": "rejected", "rejected": "chosen"}`` swaps); a
    canonical field whose column is absent keeps a same-named field if the row has one (so
    applying a map twice is harmless), else it is missing and the parser names both."""
    if not field_map:
        return dict(raw)
    columns = set(field_map.values())
    out = {k: v for k, v in raw.items() if k not in columns}
    for canonical, column in field_map.items():
        if column in raw:
            out[canonical] = raw[column]
        elif canonical in raw:
            out[canonical] = raw[canonical]
    return out


# every field a format reads (the canonical names a field_map may map to a column)
CANONICAL_FIELDS = ("prompt", "completion", "messages", "text", "chosen", "rejected", "margin",
                    "responses", "ranks")


def parse_field_map(items: Mapping[str, str] | tuple[str, ...] | list[str] | None, *,
                    key: str = "data.field_map") -> dict[str, str]:
    """``("prompt=question", "chosen=answer_a")`` or a dict -> ``{canonical: column}``.

    A malformed entry (no ``=``, an empty side, a name no format reads, a repeated name) is a
    DataError naming ``key`` (the config key or command-line flag it came from) and the entry."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    pairs = items.items() if isinstance(items, Mapping) else [_field_map_pair(it, key) for it in items]
    out: dict[str, str] = {}
    for k, v in pairs:
        k, v = str(k).strip(), str(v).strip()
        entry = f"{key} entry {k + '=' + v!r}"
        if not k or not v:
            raise DataError(f"{entry}: expected CANONICAL=COLUMN with both names non-empty "
                            "(e.g. prompt=question)", reason="bad_field_map")
        if k not in CANONICAL_FIELDS:
            swapped = f"; did you mean {v}={k}?" if v in CANONICAL_FIELDS else ""
            raise DataError(f"{entry}: {k!r} is not a field any format reads; expected "
                            f"CANONICAL=COLUMN with CANONICAL one of {list(CANONICAL_FIELDS)}{swapped}",
                            reason="bad_field_map")
        if k in out:
            raise DataError(f"{entry}: {k!r} is mapped twice ({k}={out[k]} and {k}={v})",
                            reason="bad_field_map")
        out[k] = v
    return out


def _field_map_pair(item: Any, key: str) -> tuple[str, str]:
    if not isinstance(item, str) or "=" not in item:
        raise DataError(f"{key} entry {item!r}: expected a field map entry CANONICAL=COLUMN "
                        "(e.g. prompt=question)", reason="bad_field_map")
    k, v = item.split("=", 1)
    return k, v


class _Ctx:
    """Location + field naming for one record."""

    def __init__(self, location: Location, field_map: Mapping[str, str] | None):
        self.location = location
        self.field_map = field_map or {}

    def name(self, field: str) -> str:
        head = field.split("[")[0].split(".")[0]
        column = self.field_map.get(head)
        return f"{field} (column {column!r})" if column and column != head else field

    def error(self, field: str | None, message: str, reason: str) -> DataError:
        return DataError(message, location=self.location, field=self.name(field) if field else None,
                         reason=reason)


def _type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _require(rec: Mapping[str, Any], field: str, ctx: _Ctx) -> Any:
    if field not in rec or rec[field] is None:
        present = sorted(rec)
        raise ctx.error(field, f"missing required field (the row has {present})", "missing_field")
    return rec[field]


def _text(value: Any, field: str, ctx: _Ctx) -> str:
    if not isinstance(value, str):
        raise ctx.error(field, f"expected a string, got {_type_name(value)}", "wrong_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ctx.error(field, "not valid Unicode (lone surrogate); text must be UTF-8",
                        "non_utf8") from None
    return value


def _messages(value: Any, field: str, ctx: _Ctx) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise ctx.error(field, f"expected a list of messages, got {_type_name(value)}", "wrong_type")
    if not value:
        raise ctx.error(field, "empty message list", "empty_field")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise ctx.error(f"{field}[{i}]", f"expected a message dict with 'role' and 'content', "
                            f"got {_type_name(m)}", "wrong_type")
        for key in ("role", "content"):
            if key not in m or m[key] is None:
                raise ctx.error(f"{field}[{i}].{key}", "missing required field", "missing_field")
        role = _text(m["role"], f"{field}[{i}].role", ctx)
        if not role.strip():
            raise ctx.error(f"{field}[{i}].role", "empty role", "empty_field")
        content = _text(m["content"], f"{field}[{i}].content", ctx)
        out.append({"role": role, "content": content})
    return out


def _text_or_messages(value: Any, field: str, ctx: _Ctx) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return _text(value, field, ctx)
    if isinstance(value, list):
        return _messages(value, field, ctx)
    raise ctx.error(field, f"expected a string or a list of messages, got {_type_name(value)}",
                    "wrong_type")


def is_empty(value: str | list[dict[str, str]]) -> bool:
    """A response with no content: blank text, no messages, or only blank message contents."""
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def _nonempty(value, field: str, ctx: _Ctx):
    if is_empty(value):
        raise ctx.error(field, "empty response", "empty_field")
    return value


def _same_kind(prompt, others: dict[str, Any], ctx: _Ctx) -> None:
    kind = isinstance(prompt, str)
    for name, v in others.items():
        if isinstance(v, str) != kind:
            raise ctx.error(name, f"is a {'string' if isinstance(v, str) else 'message list'} but "
                            f"'prompt' is a {'string' if kind else 'message list'}; use one kind "
                            "per row", "wrong_type")


def _margin(rec: Mapping[str, Any], ctx: _Ctx) -> float:
    m = rec.get("margin")
    if m is None:
        return 0.0
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        raise ctx.error("margin", f"expected a number, got {_type_name(m)}", "wrong_type")
    if not math.isfinite(float(m)):
        raise ctx.error("margin", f"expected a finite number, got {m!r}", "wrong_type")
    return float(m)


def split_shared_prefix(chosen, rejected):
    """Anthropic-HH full transcripts -> ``(prompt, chosen_response, rejected_response)``.

    Strings: the prompt is the longest common prefix cut back to the end of its last
    ``"\\n\\nAssistant:"`` marker (so it ends where the final assistant turn starts). Without the
    marker it is the longest common character prefix, minus a trailing space (TRL's
    ``extract_prompt`` rule). Message lists: the longest run of identical leading messages.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):
        k = chosen.rfind(HH_ASSISTANT_MARKER, 0, n)
        if k >= 0:
            n = k + len(HH_ASSISTANT_MARKER)
        elif n > 0 and chosen[n - 1] == " " and n < limit:
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def parse_sft(rec: Mapping[str, Any], ctx: _Ctx) -> dict[str, Any]:
    if rec.get("messages") is not None:
        msgs = _messages(rec["messages"], "messages", ctx)
        if not any(m["role"] == "assistant" for m in msgs):
            raise ctx.error("messages", "no assistant turn: nothing to learn from", "no_assistant_turn")
        if msgs[0]["role"] == "assistant":
            raise ctx.error("messages[0].role", "the conversation starts with an assistant turn; "
                            "the turn before it defines where the answer starts", "bad_conversation")
        return {"messages": msgs}
    if "completion" not in rec and rec.get("text") is not None:
        text = _nonempty(_text(rec["text"], "text", ctx), "text", ctx)
        return {"prompt": "", "completion": text}
    prompt = _text_or_messages(_require(rec, "prompt", ctx), "prompt", ctx)
    completion = _text_or_messages(_require(rec, "completion", ctx), "completion", ctx)
    _same_kind(prompt, {"completion": completion}, ctx)
    _nonempty(completion, "completion", ctx)
    return {"prompt": prompt, "completion": completion}


def parse_preference(rec: Mapping[str, Any], ctx: _Ctx) -> dict[str, Any]:
    chosen = _text_or_messages(_require(rec, "chosen", ctx), "chosen", ctx)
    rejected = _text_or_messages(_require(rec, "rejected", ctx), "rejected", ctx)
    margin = _margin(rec, ctx)
    if rec.get("prompt") is not None:
        prompt = _text_or_messages(rec["prompt"], "prompt", ctx)
        _same_kind(prompt, {"chosen": chosen, "rejected": rejected}, ctx)
    else:
        _same_kind(chosen, {"rejected": rejected}, ctx)
        if chosen == rejected:
            raise ctx.error("rejected", "chosen and rejected are identical", "chosen_equals_rejected")
        prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
        if isinstance(prompt, list) and not prompt:
            raise ctx.error("chosen", "chosen and rejected message lists share no leading message, so "
                            "there is no prompt; give an explicit 'prompt'", "missing_field")
    _nonempty(chosen, "chosen", ctx)
    _nonempty(rejected, "rejected", ctx)
    if chosen == rejected:
        raise ctx.error("rejected", "chosen and rejected are identical", "chosen_equals_rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin}


def parse_ranking(rec: Mapping[str, Any], ctx: _Ctx) -> dict[str, Any]:
    prompt = _text_or_messages(_require(rec, "prompt", ctx), "prompt", ctx)
    responses = _require(rec, "responses", ctx)
    ranks = _require(rec, "ranks", ctx)
    if not isinstance(responses, list):
        raise ctx.error("responses", f"expected a list, got {_type_name(responses)}", "wrong_type")
    if not isinstance(ranks, list):
        raise ctx.error("ranks", f"expected a list of integers, got {_type_name(ranks)}", "wrong_type")
    if len(responses) < 2:
        raise ctx.error("responses", f"a ranking needs K >= 2 responses, got {len(responses)}",
                        "too_few_responses")
    if len(ranks) != len(responses):
        raise ctx.error("ranks", f"{len(ranks)} ranks for {len(responses)} responses",
                        "length_mismatch")
    resp = []
    for i, r in enumerate(responses):
        r = _text_or_messages(r, f"responses[{i}]", ctx)
        _same_kind(prompt, {f"responses[{i}]": r}, ctx)
        resp.append(_nonempty(r, f"responses[{i}]", ctx))
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int):
            if isinstance(r, float) and r.is_integer():
                ranks = list(ranks)
                ranks[i] = int(r)
                continue
            raise ctx.error(f"ranks[{i}]", f"expected an integer, got {r!r}", "wrong_type")
    ranks = [int(r) for r in ranks]
    if len(set(ranks)) != len(ranks):
        dup = sorted({r for r in ranks if ranks.count(r) > 1})
        raise ctx.error("ranks", f"ties are not allowed (rank(s) {dup} repeated in {ranks})", "rank_ties")
    for i in range(len(resp)):
        for j in range(i):
            if resp[i] == resp[j]:
                raise ctx.error(f"responses[{i}]", f"identical to responses[{j}] but ranked "
                                "differently", "duplicate_response")
    return {"prompt": prompt, "responses": resp, "ranks": ranks}


def parse_prompt(rec: Mapping[str, Any], ctx: _Ctx) -> dict[str, Any]:
    if rec.get("prompt") is None and rec.get("messages") is not None:
        return {"prompt": _messages(rec["messages"], "messages", ctx)}
    prompt = _text_or_messages(_require(rec, "prompt", ctx), "prompt", ctx)
    if is_empty(prompt):
        raise ctx.error("prompt", "empty prompt", "empty_field")
    return {"prompt": prompt}


_PARSERS: dict[str, Callable[[Mapping[str, Any], _Ctx], dict[str, Any]]] = {
    "sft": parse_sft, "preference": parse_preference, "ranking": parse_ranking, "prompt": parse_prompt,
}


def detect_format(rec: Mapping[str, Any]) -> str:
    """Guesses the format of a row from its keys (``messages`` alone counts as SFT)."""
    keys = set(rec)
    if "responses" in keys or "ranks" in keys:
        return "ranking"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if keys & {"completion", "messages", "text"}:
        return "sft"
    if "prompt" in keys:
        return "prompt"
    raise DataError(f"cannot tell the format from the fields {sorted(keys)}", reason="unknown_format")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {FORMATS}", reason="unknown_format")
    return fmt


def parse_record(raw: Mapping[str, Any], fmt: str, location: Location,
                 field_map: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Validates one raw row in format ``fmt`` and returns its canonical dict (see module doc)."""
    ctx = _Ctx(location, field_map)
    rec = apply_field_map(raw, field_map)
    return _PARSERS[check_format(fmt)](rec, ctx)
