"""Batch iterators: deterministic order from a seed, per-host shards, exact mid-epoch resume.

Order. Epoch ``e`` visits the source's rows in ``permutation(N)`` drawn from
``numpy.random.default_rng([seed, e])`` (or ``0..N-1`` with ``shuffle=False``). Host ``h`` of ``n``
takes positions ``h, h+n, h+2n, ...`` of that order (:func:`host_rows`): the hosts' slices are
disjoint and together cover every row exactly once per epoch, and a host reads and tokenises only
its own rows.

Position. The iterator's whole state is ``(epoch, position)`` in its host slice, the first row not
yet consumed, plus the counters (``state()``, a small JSON-able dict). Batches are built only from
consumed rows; a row read to see whether it fits the current packed row but left for the next
batch is not consumed. So ``restore(state())`` continues with exactly the batches an uninterrupted
iterator would have produced.

Epochs. ``num_epochs=None`` repeats forever (training loops stop after a number of steps; all
hosts then stay in lock-step). With a finite ``num_epochs`` the last batch is filled with padding
rows (``example_mask`` 0 / ``segment_ids`` 0) unless ``drop_remainder``; then ``StopIteration``.

Bad rows raise :class:`DataError` (file, line, field); with ``skip_bad_rows=True`` they are
skipped and counted in ``iterator.stats`` (``data/skipped/<reason>`` in the metrics).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from rlhf_jax import devices as devices_lib
from rlhf_jax.config import ConfigError
from rlhf_jax.data import batching
from rlhf_jax.data.errors import DataError, DataStats, Location
from rlhf_jax.data.formats import check_format, parse_field_map, parse_record
from rlhf_jax.data.sources import MemorySource, RecordSource, open_source, require_rows
from rlhf_jax.data.tokenize import (TRUNCATION_POLICIES, Encoder, TokenizeOptions, load_tokenizer,
                                    tokenize_record)

STATE_VERSION = 1
PREFETCH = 64  # rows parsed and tokenised together (a speed-up only; see DataIterator._parse_ahead)


def epoch_order(num_rows: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global row order of ``epoch`` (identical on every host)."""
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_rows).astype(np.int64)


def host_rows(num_rows: int, *, seed: int, epoch: int, host_id: int = 0, num_hosts: int = 1,
              shuffle: bool = True) -> np.ndarray:
    """Source row indices host ``host_id`` of ``num_hosts`` reads in ``epoch``, in order."""
    if not 0 <= host_id < num_hosts:
        raise ValueError(f"host_id={host_id} not in [0, num_hosts={num_hosts})")
    return epoch_order(num_rows, seed=seed, epoch=epoch, shuffle=shuffle)[host_id::num_hosts]


def as_source(data, *, split: str = "train", data_dir: str | None = None) -> RecordSource:
    """A RecordSource from a source, path(s)/glob/``"tfds:NAME"``, or a list of dict records."""
    if isinstance(data, RecordSource):
        return data
    if isinstance(data, (list, tuple)) and (not data or isinstance(data[0], Mapping)):
        return MemorySource(data)
    return open_source(data, split=split, data_dir=data_dir)


@dataclasses.dataclass(frozen=True)
class DataSummary:
    """What the first ``read`` rows of a dataset become under the run's settings (see
    :meth:`DataIterator.summary`): examples, token lengths, and what was truncated, dropped or skipped."""
    name: str
    fmt: str
    total_rows: int
    read: int
    examples: int
    mean_tokens: float
    max_tokens: int
    limit: int
    truncated_prompt: int
    truncated_response: int
    dropped: int
    skipped: int

    @property
    def truncated(self) -> int:
        return self.truncated_prompt + self.truncated_response

    def line(self) -> str:
        pct = lambda n: f"{n} ({100.0 * n / max(self.read, 1):.0f}%)"  # noqa: E731
        return (f"data: {self.name} ({self.fmt}): {self.total_rows} rows; of the first {self.read}: "
                f"{self.examples} examples, {self.mean_tokens:.1f} tokens on average (max {self.max_tokens}, "
                f"limit {self.limit}), truncated prompts {pct(self.truncated_prompt)}, truncated responses "
                f"{pct(self.truncated_response)}, dropped {pct(self.dropped)}, skipped {pct(self.skipped)}")


def _example_tokens(ex: dict) -> int:
    """The longest sequence of an example (SFT/prompt ids, chosen/rejected, the ranked responses)."""
    seqs = [ex[k] for k in ("ids", "chosen", "rejected") if k in ex] + list(ex.get("responses", ()))
    return max((len(x) for x in seqs), default=0)


class DataIterator:
    """Static-shape batches of one format from a record source (see the module doc).

    Args:
      source: a RecordSource, path(s), ``"tfds:NAME"`` or a list of dicts.
      fmt: ``"sft" | "preference" | "ranking" | "prompt"``.
      tokenizer: a Hugging Face tokenizer (``load_tokenizer(dir)``).
      batch_size: rows per batch on this host.
      max_length: sequence length (SFT row length when packing; the largest bucket otherwise).
      max_prompt_length: prompt limit (prompt format: the prompt length ``P``).
      truncation: ``"truncate_left" | "drop" | "error"`` (see ``tokenize.py``).
      pack: SFT only; pack several examples per row (``[B, max_length]`` always).
      buckets: allowed padded lengths (default: powers of two up to the maximum, and the maximum).
      num_responses: rankings only; static K (default: the largest K in each batch).
      field_map: ``{canonical: column}`` or ``("canonical=column", ...)``.
      skip_bad_rows, seed, shuffle, num_epochs, host_id, num_hosts, drop_remainder: as above.
    """

    def __init__(self, source, fmt: str, tokenizer, *, batch_size: int, max_length: int,
                 max_prompt_length: int | None = None, truncation: str = "truncate_left",
                 append_eos: bool = True, pack: bool = True, buckets: Sequence[int] | None = None,
                 num_responses: int | None = None, field_map=None, skip_bad_rows: bool = False,
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 host_id: int = 0, num_hosts: int = 1, drop_remainder: bool = False,
                 split: str = "train", data_dir: str | None = None):
        self.fmt = check_format(fmt)
        self.source = as_source(source, split=split, data_dir=data_dir)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; need >= 1")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs={num_epochs}; need >= 1 or None (repeat forever)")
        if not 0 <= host_id < num_hosts:
            raise ValueError(f"host_id={host_id} not in [0, num_hosts={num_hosts})")
        self.opts = TokenizeOptions(max_length=max_length, max_prompt_length=max_prompt_length,
                                    truncation=truncation, append_eos=append_eos)
        self.encoder = Encoder(tokenizer, append_eos=append_eos and fmt != "prompt")
        self.batch_size = int(batch_size)
        self.pack = bool(pack) and fmt == "sft"
        top = self.opts.prompt_limit(prompt_only=True) if fmt == "prompt" else max_length
        self.buckets = tuple(sorted(buckets)) if buckets else batching.length_buckets(top)
        if max(self.buckets) < top:
            raise ValueError(f"largest bucket {max(self.buckets)} < maximum length {top}")
        if devices_lib.abstract():  # a plan compiles the worst case: every batch at the largest bucket
            self.buckets = (max(self.buckets),)
        self.num_responses = num_responses
        self.field_map = parse_field_map(field_map)
        self.skip_bad_rows = skip_bad_rows
        self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
        self.host_id, self.num_hosts = int(host_id), int(num_hosts)
        self.drop_remainder = drop_remainder
        self.num_rows = len(require_rows(self.source))
        self.stats = DataStats()
        self._epoch, self._pos = 0, 0
        self._order_epoch, self._order = -1, np.zeros((0,), np.int64)
        self._pending = None  # (epoch, pos, example, counts) read but not consumed
        self._parsed: dict = {}  # (epoch, pos) -> (record, location, error), read ahead
        self._good_in_epoch = 0
        self._batches = 0
        self._finished = False

    def summary(self, max_rows: int = 2048) -> DataSummary:
        """Reads the first ``max_rows`` rows of the source (file order) through the same parsing and
        tokenisation as the batches, without moving this iterator: the start-of-run report."""
        read = min(self.num_rows, max_rows)
        counts: dict[str, int] = {}
        lengths, skipped = [], 0
        for row in range(read):
            try:
                raw, loc = self.source.get(row)
                ex, c = tokenize_record(parse_record(raw, self.fmt, loc, self.field_map), self.fmt, self.encoder,
                                        self.opts, loc)
            except DataError:
                if not self.skip_bad_rows:
                    raise
                skipped += 1
                continue
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
            if ex is not None:
                lengths.append(_example_tokens(ex))
        limit = self.opts.prompt_limit(prompt_only=True) if self.fmt == "prompt" else self.opts.max_length
        return DataSummary(name=self.source.name, fmt=self.fmt, total_rows=self.num_rows, read=read,
                           examples=len(lengths), mean_tokens=float(np.mean(lengths)) if lengths else 0.0,
                           max_tokens=max(lengths, default=0), limit=int(limit),
                           truncated_prompt=counts.get("truncated_prompt", 0),
                           truncated_response=counts.get("truncated_response", 0),
                           dropped=counts.get("dropped_too_long", 0) + counts.get("dropped_no_loss_tokens", 0),
                           skipped=skipped)

    # --- order ----------------------------------------------------------------------------
    def _rows(self) -> np.ndarray:
        if self._order_epoch != self._epoch:
            self._order = host_rows(self.num_rows, seed=self.seed, epoch=self._epoch,
                                    host_id=self.host_id, num_hosts=self.num_hosts,
                                    shuffle=self.shuffle)
            self._order_epoch = self._epoch
        return self._order

    def _roll_epoch(self) -> bool:
        """At the end of the host slice: start the next epoch (True) or report the end (False)."""
        if self._good_in_epoch == 0 and len(self._rows()):  # finite or not: nothing to train on
            raise DataError(f"no usable example in a whole epoch on host {self.host_id}/{self.num_hosts} "
                            f"({len(self._rows())} rows; skipped {self.stats.skipped}, dropped "
                            f"{self.stats.dropped_too_long}); the first problems: "
                            f"{[m for ms in self.stats.samples.values() for m in ms][:2]}",
                            location=Location(self.source.name, 0, "file"), reason="empty_dataset")
        if self.num_epochs is not None and self._epoch + 1 >= self.num_epochs:
            return False
        self._epoch, self._pos, self._good_in_epoch = self._epoch + 1, 0, 0
        return True

    # --- examples -------------------------------------------------------------------------
    def _parse_ahead(self) -> None:
        """Parses the next ``PREFETCH`` rows of the host slice and batch-tokenises their text.

        Only a speed-up: results are looked up by (epoch, position), errors are raised (or
        counted) when their row is reached, and nothing beyond this host's slice is read."""
        rows = self._rows()
        stop = min(len(rows), self._pos + PREFETCH)
        self._parsed = {}
        recs = []
        for pos in range(self._pos, stop):
            try:
                raw, loc = self.source.get(int(rows[pos]))
                rec = parse_record(raw, self.fmt, loc, self.field_map)
                self._parsed[(self._epoch, pos)] = (rec, loc, None)
                recs.append(rec)
            except DataError as e:
                self._parsed[(self._epoch, pos)] = (None, None, e)
        self.encoder.prefetch(recs)

    def _read(self, row: int):
        """Parses and tokenises source row ``row``: ``(example | None, counts, skip_error)``."""
        key = (self._epoch, self._pos)
        if key not in self._parsed:
            self._parse_ahead()
        rec, loc, err = self._parsed.pop(key)
        try:
            if err is not None:
                raise err
            ex, counts = tokenize_record(rec, self.fmt, self.encoder, self.opts, loc)
        except DataError as e:
            if not self.skip_bad_rows:
                raise
            return None, {}, e
        if ex is not None:
            ex["index"] = int(row)
        return ex, counts, None

    def _peek(self):
        """The next usable example without consuming it (None at the end of the data).

        Unusable rows (dropped or skipped) on the way are consumed and counted."""
        while True:
            if self._pending is not None and self._pending[:2] == (self._epoch, self._pos):
                return self._pending[2]
            rows = self._rows()
            if self._pos >= len(rows):
                if not self._roll_epoch():
                    return None
                continue
            ex, counts, err = self._read(rows[self._pos])
            if ex is None:
                self._apply(counts, err)
                self._pos += 1
                continue
            self._pending = (self._epoch, self._pos, ex, counts)
            return ex

    def _consume(self):
        _, _, ex, counts = self._pending
        self._pending = None
        self._apply(counts, None)
        self.stats.examples += 1
        self._good_in_epoch += 1
        self._pos += 1
        return ex

    def _apply(self, counts, err) -> None:
        self.stats.rows += 1
        if err is not None:
            self.stats.record_skip(err)
        for k, v in counts.items():
            setattr(self.stats, k, getattr(self.stats, k) + v)

    # --- batches --------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._finished:
            raise StopIteration
        batch = self._next_packed() if self.pack else self._next_rows()
        if batch is None:
            self._finished = True
            raise StopIteration
        return batch

    def _next_packed(self):
        """First-fit packing of consecutive examples into the B rows of one batch.

        Each example goes into the first row with room; the batch is complete when the next
        example fits in no row (it then starts the next batch) or every row is full. The examples
        of a batch are consecutive in the epoch order, so the resume position stays one index."""
        L, B = self.opts.max_length, self.batch_size
        rows: list[list[dict]] = [[] for _ in range(B)]
        used = [0] * B
        ended = False
        while min(used) < L:
            ex = self._peek()
            if ex is None:
                ended = True
                break
            n = len(ex["ids"])
            b = next((i for i in range(B) if used[i] + n <= L), None)
            if b is None:
                break
            rows[b].append(self._consume())
            used[b] += n
        rows = [r for r in rows if r]
        if not rows or (ended and len(rows) < B and self.drop_remainder):
            return None
        batch = batching.sft_batch(rows, B, L, self.encoder.pad_id)
        self._count_tokens(batch["attention_mask"], batch["loss_mask"])
        return batch

    def lockstep_batches(self) -> int | None:
        """Batches every host yields from a finite multi-host iterator of one example per row.

        Hosts' slices differ by at most one row per epoch, so a host could end a batch earlier
        than another and leave it waiting in a collective. Hosts therefore all stop after
        ``ceil(epochs * ceil(N/n) / B)`` batches (a host that runs out first adds all-padding
        batches), or ``floor(epochs * floor(N/n) / B)`` with ``drop_remainder``. None when it
        does not apply (one host, infinite, or packed)."""
        if self.num_hosts == 1 or self.num_epochs is None or self.pack:
            return None
        n, h, B, E = self.num_rows, self.num_hosts, self.batch_size, self.num_epochs
        if self.drop_remainder:
            return (E * (n // h)) // B
        return -(-E * -(-n // h) // B)

    def _next_rows(self):
        B = self.batch_size
        target = self.lockstep_batches()
        if target is not None and self._batches >= target:
            return None
        examples = []
        while len(examples) < B:
            if self._peek() is None:
                break
            examples.append(self._consume())
        # below the lock-step count a batch is always emitted (all padding if this host ran out)
        if target is None and (not examples or (len(examples) < B and self.drop_remainder)):
            return None
        self._batches += 1
        pad = self.encoder.pad_id
        if self.fmt == "sft":
            longest = max([len(ex["ids"]) for ex in examples] + [1])
            L = batching.fit_bucket(longest, self.buckets)
            batch = batching.sft_batch([[ex] for ex in examples], B, L, pad)
            example_mask, index = batching.row_info(examples, B)
            batch.update(example_mask=example_mask, example_index=index)
            self._count_tokens(batch["attention_mask"], batch["loss_mask"])
        elif self.fmt == "preference":
            batch = batching.preference_batch(examples, B, self.buckets, pad)
            self._count_tokens(np.concatenate([batch["chosen_mask"], batch["rejected_mask"]]),
                               np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]]))
        elif self.fmt == "ranking":
            batch = batching.ranking_batch(examples, B, self.buckets, pad, self.num_responses)
            self._count_tokens(batch["response_mask"], batch["response_loss_mask"])
        else:
            batch = batching.prompt_batch(examples, B, self.buckets, pad)
            self._count_tokens(batch["prompt_mask"], None)
        return batch

    def _count_tokens(self, attention, loss) -> None:
        real = int(attention.sum())
        self.stats.tokens += real
        self.stats.pad_tokens += int(attention.size - real)
        if loss is not None:
            self.stats.loss_tokens += int(loss.sum())

    # --- resume ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    def state(self) -> dict[str, Any]:
        """Small JSON-able position: store it in the checkpoint, give it to :meth:`restore`."""
        return {"version": STATE_VERSION, "format": self.fmt, "epoch": self._epoch,
                "position": self._pos, "seed": self.seed, "shuffle": self.shuffle,
                "host_id": self.host_id, "num_hosts": self.num_hosts, "num_rows": self.num_rows,
                "good_in_epoch": self._good_in_epoch, "finished": self._finished,
                "batches": self._batches,
                "stats": self.stats.to_dict()}

    def restore(self, state: Mapping[str, Any]) -> "DataIterator":
        """Continues from ``state`` (from :meth:`state` of an iterator over the same data/options)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise DataError(f"not a data iterator state (version {STATE_VERSION}): {state!r}",
                            reason="bad_state")
        for key, mine in (("format", self.fmt), ("seed", self.seed), ("shuffle", self.shuffle),
                          ("host_id", self.host_id), ("num_hosts", self.num_hosts),
                          ("num_rows", self.num_rows)):
            if state.get(key) != mine:
                raise DataError(f"cannot restore: the saved state has {key}={state.get(key)!r} but "
                                f"this iterator has {key}={mine!r}", reason="bad_state")
        self._epoch, self._pos = int(state["epoch"]), int(state["position"])
        self._good_in_epoch = int(state.get("good_in_epoch", 0))
        self._batches = int(state.get("batches", 0))
        self._finished = bool(state.get("finished", False))
        self._pending = None
        self._parsed = {}
        self.stats = DataStats.from_dict(state["stats"])
        return self


class PrefetchIterator:
    """Runs a :class:`DataIterator` ``size`` batches ahead in a background thread.

    Tokenising and packing then overlap with the training step. ``state()`` and ``stats`` are
    those of the last batch *returned* (not of the batches waiting in the queue), so a checkpoint
    taken between steps resumes exactly; to resume, ``restore`` the inner iterator before
    wrapping it. An exception in the worker (e.g. a DataError) is raised by ``next``.
    """

    _END = object()

    def __init__(self, iterator: DataIterator, size: int = 2):
        if size < 1:
            raise ValueError(f"size={size}; need >= 1")
        self._it = iterator
        self._queue: "queue.Queue" = queue.Queue(maxsize=size)
        self._state = iterator.state()
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, name="rlhf_jax-data", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for batch in self._it:
                if not self._put((batch, self._it.state())):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        batch, self._state = item
        return batch

    def state(self) -> dict[str, Any]:
        return self._state

    @property
    def stats(self) -> DataStats:
        return DataStats.from_dict(self._state["stats"])

    def close(self) -> None:
        """Stops the worker thread (batches still queued are discarded)."""
        self._stop.set()
        self._done = True
        self._thread.join(timeout=5)


# --- convenience constructors -------------------------------------------------------------

def sft_batches(source, tokenizer, *, batch_size: int, seq_len: int, pack: bool = True, **kw) -> DataIterator:
    """SFT batches ``input_ids, targets, loss_mask, attention_mask, positions, segment_ids [B, L]``."""
    return DataIterator(source, "sft", tokenizer, batch_size=batch_size, max_length=seq_len,
                        pack=pack, **kw)


def preference_batches(source, tokenizer, *, batch_size: int, max_length: int, **kw) -> DataIterator:
    """Preference batches ``chosen_ids/chosen_mask/rejected_ids/rejected_mask [B,L], margin [B]``."""
    return DataIterator(source, "preference", tokenizer, batch_size=batch_size,
                        max_length=max_length, **kw)


def ranking_batches(source, tokenizer, *, batch_size: int, max_length: int, **kw) -> DataIterator:
    """Ranking batches ``response_ids/response_mask [B,K,L], ranks/rank_mask [B,K]``."""
    return DataIterator(source, "ranking", tokenizer, batch_size=batch_size,
                        max_length=max_length, **kw)


def prompt_batches(source, tokenizer, *, batch_size: int, max_prompt_length: int, **kw) -> DataIterator:
    """Left-padded prompt batches ``prompt_ids/prompt_mask [B,P]`` with ``P <= max_prompt_length``
    (pass ``buckets=(P,)`` for a single static shape)."""
    return DataIterator(source, "prompt", tokenizer, batch_size=batch_size,
                        max_length=max_prompt_length, max_prompt_length=max_prompt_length, **kw)


def read_records(source, fmt: str, *, field_map=None, skip_bad_rows: bool = False,
                 split: str = "train", data_dir: str | None = None
                 ) -> tuple[list[dict[str, Any]], DataStats]:
    """Every row of ``source`` validated into its canonical record (no tokenisation)."""
    check_format(fmt)
    src = as_source(source, split=split, data_dir=data_dir)
    fmap = parse_field_map(field_map)
    out, stats = [], DataStats()
    for i in range(len(src)):
        stats.rows += 1
        try:
            raw, loc = src.get(i)
            out.append(parse_record(raw, fmt, loc, fmap))
            stats.examples += 1
        except DataError as e:
            if not skip_bad_rows:
                raise
            stats.record_skip(e)
    return out, stats


# --- config -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data section of a trainer config (all fields overridable as ``data.KEY=VALUE``).

    ``path``: file(s) (comma-separated, globs) or ``"tfds:NAME"``; ``field_map``:
    ``("prompt=question", ...)``; ``max_prompt_length``/``num_responses``/``num_epochs``: 0 means
    unset; ``buckets``: empty means the default powers of two."""

    path: str = ""
    split: str = "train"
    data_dir: str = ""
    field_map: tuple[str, ...] = ()
    tokenizer: str = ""
    batch_size: int = 8
    max_length: int = 512
    max_prompt_length: int = 0
    truncation: str = "truncate_left"
    append_eos: bool = True
    pack: bool = True
    buckets: tuple[int, ...] = ()
    num_responses: int = 0
    skip_bad_rows: bool = False
    shuffle: bool = True
    seed: int = 0
    num_epochs: int = 0
    drop_remainder: bool = False


def make_iterator(cfg: DataConfig, fmt: str, *, tokenizer=None, source=None, host_id: int = 0,
                  num_hosts: int = 1, **overrides) -> DataIterator:
    """A DataIterator from a :class:`DataConfig` (``tokenizer`` defaults to ``cfg.tokenizer``;
    ``source`` to ``cfg.path``; keyword ``overrides`` replace iterator arguments)."""
    if tokenizer is None:
        if not cfg.tokenizer:
            raise DataError("data.tokenizer is empty: give a tokenizer directory", reason="config")
        tokenizer = load_tokenizer(cfg.tokenizer)
    if source is None:
        if not cfg.path:
            raise DataError("data.path is empty: give a file, a glob or tfds:NAME", reason="config")
        source = cfg.path
    kw = dict(batch_size=cfg.batch_size, max_length=cfg.max_length,
              max_prompt_length=cfg.max_prompt_length or None, truncation=cfg.truncation,
              append_eos=cfg.append_eos, pack=cfg.pack, buckets=cfg.buckets or None,
              num_responses=cfg.num_responses or None, field_map=cfg.field_map,
              skip_bad_rows=cfg.skip_bad_rows, seed=cfg.seed, shuffle=cfg.shuffle,
              num_epochs=cfg.num_epochs or None, host_id=host_id, num_hosts=num_hosts,
              drop_remainder=cfg.drop_remainder, split=cfg.split,
              data_dir=os.path.expanduser(cfg.data_dir) if cfg.data_dir else None)
    kw.update(overrides)
    _check_iterator_settings(kw, fmt)
    return DataIterator(source, fmt, tokenizer, **kw)


def _check_iterator_settings(kw: Mapping[str, Any], fmt: str) -> None:
    """ConfigError naming ``data.<key>`` for a data setting no iterator can use."""
    def bad(key: str, expected: str):
        return ConfigError(f"data.{key}={kw[key]!r}: expected {expected}")

    if kw["batch_size"] < 1:
        raise bad("batch_size", "an integer >= 1 (rows per batch on each host)")
    if kw["max_length"] < 2:
        raise bad("max_length", "an integer >= 2 (tokens of prompt + response)")
    if kw["max_prompt_length"] is not None and kw["max_prompt_length"] < 0:
        raise bad("max_prompt_length", "an integer >= 1, or 0 for the default")
    if kw["truncation"] not in TRUNCATION_POLICIES:
        raise bad("truncation", f"one of {list(TRUNCATION_POLICIES)}")
    if kw["num_responses"] is not None and kw["num_responses"] < 2:
        raise bad("num_responses", "an integer >= 2 (responses per ranking), or 0 for each batch's largest")
    if kw["num_epochs"] is not None and kw["num_epochs"] < 0:
        raise bad("num_epochs", "an integer >= 1, or 0 to repeat forever")
    buckets = kw["buckets"] or ()
    top = (kw["max_prompt_length"] or kw["max_length"]) if fmt == "prompt" else kw["max_length"]
    if buckets and (min(buckets) < 1 or max(buckets) < top):
        raise bad("buckets", f"padded lengths >= 1 whose largest is >= the maximum length {top} "
                  "(or empty for powers of two)")
