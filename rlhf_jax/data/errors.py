"""Errors and counters of the data layer.

Every problem with an input row is a :class:`DataError` that names where it came from (file, line
or row, field) and what was expected. Iterators built with ``skip_bad_rows=True`` catch exactly
these errors, count them by reason in :class:`DataStats` and keep the first few messages, so a
skipped row is never silently lost: the counts go into the run's metrics.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from rlhf_jax.errors import UserError

log = logging.getLogger("rlhf_jax.data")

_MAX_SAMPLES = 5  # messages kept per reason in DataStats.examples


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a raw record came from: ``path`` (a file or ``tfds:name/split``) and ``line``.

    ``line`` is the 1-based line number for JSONL and the 1-based row number for Parquet, TFDS and
    in-memory sources (``unit`` says which; ``"file"`` with line 0 for a whole-file problem).
    """

    path: str
    line: int
    unit: str = "line"

    def __str__(self) -> str:
        if self.unit == "file":  # the whole file (it is missing or unreadable)
            return self.path
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path} {self.unit} {self.line}"


class DataError(UserError, ValueError):
    """A bad input row (or a bad dataset). Carries ``path``, ``line``, ``field`` and ``reason``.

    ``reason`` is a short machine-readable kind (e.g. ``"malformed_json"``, ``"missing_field"``,
    ``"chosen_equals_rejected"``) used as the counter name when rows are skipped.
    """

    def __init__(self, message: str, *, location: Location | None = None, field: str | None = None,
                 reason: str = "bad_row"):
        self.location = location
        self.path = location.path if location else None
        self.line = location.line if location else None
        self.field = field
        self.reason = reason
        self.detail = message
        where = f"{location}: " if location else ""
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}{what}{message}")

    def at(self, location: Location) -> "DataError":
        """The same error attributed to ``location`` (used when a helper did not know it)."""
        return DataError(self.detail, location=location, field=self.field, reason=self.reason)


@dataclasses.dataclass
class DataStats:
    """Counts of what the pipeline read, kept, truncated, dropped and skipped.

    * ``rows``: raw rows read (every row the iterator consumed, good or bad);
    * ``examples``: rows that became training examples;
    * ``truncated_prompt`` / ``truncated_response``: examples cut to fit (``truncate_left``);
    * ``dropped_too_long``: examples dropped by ``truncation="drop"``;
    * ``dropped_no_loss_tokens``: SFT examples left without a supervised token after truncation;
    * ``skipped``: bad rows skipped (``skip_bad_rows=True``), by :attr:`DataError.reason`;
    * ``tokens`` / ``loss_tokens``: real tokens and supervised tokens emitted;
    * ``pad_tokens``: padding positions emitted in batches.

    ``as_metrics()`` flattens this into ``{"data/...": float}`` for the metrics writer;
    ``to_dict()``/``from_dict()`` make it part of an iterator's JSON state.
    """

    rows: int = 0
    examples: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0
    dropped_too_long: int = 0
    dropped_no_loss_tokens: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    pad_tokens: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    samples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def record_skip(self, err: DataError) -> None:
        self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
        kept = self.samples.setdefault(err.reason, [])
        if len(kept) < _MAX_SAMPLES:
            kept.append(str(err))
            log.warning("skipping bad row: %s", err)

    def merge(self, other: "DataStats") -> None:
        """Adds ``other``'s counts into this one."""
        for f in dataclasses.fields(self):
            if f.name in ("skipped", "samples"):
                continue
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for k, v in other.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        for k, msgs in other.samples.items():
            kept = self.samples.setdefault(k, [])
            kept.extend(msgs[: max(0, _MAX_SAMPLES - len(kept))])

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        out = {prefix + f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("skipped", "samples")}
        out[prefix + "skipped"] = float(self.skipped_total)
        for k, v in sorted(self.skipped.items()):
            out[f"{prefix}skipped/{k}"] = float(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataStats":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"DataStats.from_dict: unknown keys {sorted(unknown)}")
        d = dict(d)
        d["skipped"] = {str(k): int(v) for k, v in d.get("skipped", {}).items()}
        d["samples"] = {str(k): list(v) for k, v in d.get("samples", {}).items()}
        return cls(**d)
