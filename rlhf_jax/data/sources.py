"""Random-access record sources: JSONL, Parquet, prepared TFDS datasets, in-memory lists.

The TFDS *writers* (builders, conversion) live in ``tfds_io``; :class:`TfdsSource` reads here and,
like :class:`ParquetSource` with pyarrow, imports ``tensorflow_datasets`` only when constructed.

A source is a sequence of raw records: ``len(src)`` and ``src.get(i) -> (dict, Location)``.
Random access is what makes shuffling from a seed, per-host sharding (a host parses only its own
rows) and exact mid-epoch resume simple: the iterator only has to remember an index.

Raw records are plain dicts of Python values (``str``, numbers, lists, dicts); the format layer
(``formats.py``) validates them. Reading problems that are about a single row (malformed JSON,
non-UTF-8 bytes, a line that is not a JSON object) raise :class:`DataError` from ``get`` so they
can be skipped and counted like any other bad row.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rlhf_jax.data.errors import DataError, Location
from rlhf_jax.data.formats import apply_field_map, parse_field_map


class RecordSource:
    """Base class: ``name``, ``__len__``, ``get(i) -> (record, location)``."""

    name: str = "<source>"

    def __len__(self) -> int:
        raise TypeError(f"{type(self).__name__} must define __len__")

    def get(self, index: int) -> tuple[dict[str, Any], Location]:
        raise TypeError(f"{type(self).__name__} must define get")

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")


def _find_bad_text(value: Any, path: str = "") -> str | None:
    """Path of the first string in ``value`` holding undecodable bytes (lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "<value>"
        return None
    if isinstance(value, Mapping):
        for k, v in value.items():
            bad = _find_bad_text(v, f"{path}.{k}" if path else str(k))
            if bad:
                return bad
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _find_bad_text(v, f"{path}[{i}]")
            if bad:
                return bad
    return None


def _json_type(obj: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number")


def _array_hint(text: str) -> str:
    """A hint for a line that opens a JSON array: a ``.json`` file holding one array of rows."""
    return (" (this line starts a JSON array: write one object per line (JSONL), not an array of "
            "objects)") if text.lstrip().startswith("[") else ""


def parse_json_line(raw: bytes, location: Location) -> dict[str, Any]:
    """Decodes one JSONL line (strict UTF-8) into a dict, or raises DataError naming the field."""
    try:
        text = raw.decode("utf-8")
        non_utf8 = False
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="surrogateescape")
        non_utf8 = True
        utf8_error = e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if non_utf8:
            raise DataError(f"non-UTF-8 bytes (byte {utf8_error.start}: {utf8_error.reason}) in a "
                            f"line that is not valid JSON either", location=location,
                            reason="non_utf8") from None
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno}); expected one JSON object "
                        f"per line{_array_hint(text)}", location=location,
                        reason="malformed_json") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object per line, got {_json_type(obj)}{_array_hint(text)}",
                        location=location, reason="malformed_json")
    bad = _find_bad_text(obj)
    if bad is not None:
        what = (f"non-UTF-8 bytes (byte {utf8_error.start} of the line)" if non_utf8
                else "a string that is not valid Unicode (lone surrogate escape)")
        raise DataError(f"{what}; text must be UTF-8", location=location, field=bad,
                        reason="non_utf8")
    return obj


def _existing_file(path: str | os.PathLike) -> str:
    """``path`` as a string, or a DataError naming it when there is no such file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("no such file", location=Location(path, 0, "file"), reason="missing_file")
    return path


UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # what Windows PowerShell's `>` writes


def text_start(path: str, head: bytes) -> int:
    """Offset of the text in a file starting with ``head``: 3 after a UTF-8 byte-order mark
    (skipped, as Windows editors write one), else 0. A UTF-16 file is a :class:`DataError`."""
    if head.startswith(UTF8_BOM):
        return len(UTF8_BOM)
    if head.startswith(_UTF16_BOMS):
        raise DataError(f"the file is UTF-16 encoded (byte-order mark {head[:2].hex(' ').upper()}); "
                        "save it as UTF-8", location=Location(path, 0, "file"), reason="non_utf8")
    return 0


class JsonlSource(RecordSource):
    """One JSON object per line. Blank lines are ignored; line numbers are the file's own.

    A leading UTF-8 byte-order mark is skipped and CRLF line ends are accepted."""

    def __init__(self, path: str | os.PathLike):
        self.path = self.name = _existing_file(path)
        self._offsets: list[int] = []
        self._lines: list[int] = []
        self._handle = None
        with open(self.path, "rb") as f:
            offset = text_start(self.path, f.read(len(UTF8_BOM)))
            f.seek(offset)
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    if not self._lines and line.lstrip().startswith(b"["):
                        raise DataError("the file holds a JSON array; expected JSONL, one JSON object per "
                                        "line (convert with: jq -c '.[]' FILE)",
                                        location=Location(self.path, lineno), reason="malformed_json")
                    self._offsets.append(offset)
                    self._lines.append(lineno)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def __del__(self):
        if getattr(self, "_handle", None) is not None:
            self._handle.close()

    def get(self, index: int) -> tuple[dict[str, Any], Location]:
        self._check_index(index)
        loc = Location(self.path, self._lines[index])
        if self._handle is None or self._handle.closed:
            self._handle = open(self.path, "rb")
        self._handle.seek(self._offsets[index])
        raw = self._handle.readline()
        return parse_json_line(raw.rstrip(b"\r\n"), loc), loc


def _decode_bytes(value: Any, location: Location, path: str = "") -> Any:
    """Decodes ``bytes`` (binary Parquet columns, TFDS text) to ``str`` recursively, strictly."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"non-UTF-8 bytes (byte {e.start}: {e.reason}); text must be UTF-8",
                            location=location, field=path or None, reason="non_utf8") from None
    if isinstance(value, Mapping):
        return {k: _decode_bytes(v, location, f"{path}.{k}" if path else str(k))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decode_bytes(v, location, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


class ParquetSource(RecordSource):
    """A Parquet file (the HF datasets export) read through pyarrow.

    The table is loaded (memory-mapped, columnar) on first access and rows are converted one at a
    time, so a shuffled order costs no repeated row-group decoding. Files larger than memory are
    better converted to TFDS (``rlhf-jax data to-tfds``), whose array_record files are read
    record by record."""

    def __init__(self, path: str | os.PathLike):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = self.name = _existing_file(path)
        try:
            self._file = pq.ParquetFile(self.path, memory_map=True)
        except (pa.ArrowException, OSError) as e:  # ArrowInvalid / OSError on a broken file
            raise DataError(f"cannot read as Parquet: {e}", location=Location(self.path, 0, "file"),
                            reason="bad_file") from e
        self._len = self._file.metadata.num_rows
        self._table = None

    def __len__(self) -> int:
        return self._len

    def get(self, index: int) -> tuple[dict[str, Any], Location]:
        self._check_index(index)
        if self._table is None:
            self._table = self._file.read()
        loc = Location(self.path, index + 1, "row")
        one = self._table.slice(index, 1)
        try:
            row = one.to_pylist()[0]
        except UnicodeDecodeError:
            # a string column holds bytes that are not UTF-8 (pyarrow does not check on read):
            # find the column to name it
            row = {}
            for name in one.column_names:
                try:
                    row[name] = one.column(name)[0].as_py()
                except UnicodeDecodeError as e:
                    raise DataError(f"non-UTF-8 bytes (byte {e.start}: {e.reason}) in a string "
                                    "column; text must be UTF-8", location=loc, field=name,
                                    reason="non_utf8") from None
        return _decode_bytes(row, loc), loc


class MemorySource(RecordSource):
    """Records already in memory (e.g. the embedded tasks' generators), named for error messages."""

    def __init__(self, records: Sequence[Mapping[str, Any]], name: str = "<records>"):
        self._records = list(records)
        self.name = name

    def __len__(self) -> int:
        return len(self._records)

    def get(self, index: int) -> tuple[dict[str, Any], Location]:
        self._check_index(index)
        loc = Location(self.name, index + 1, "row")
        rec = self._records[index]
        if not isinstance(rec, Mapping):
            raise DataError(f"expected a dict record, got {type(rec).__name__}", location=loc,
                            reason="malformed_record")
        return _decode_bytes(dict(rec), loc), loc


class ConcatSource(RecordSource):
    """Several sources read as one (e.g. ``data-*.jsonl``)."""

    def __init__(self, sources: Sequence[RecordSource]):
        if not sources:
            raise DataError("no input files", reason="missing_file")
        self._sources = list(sources)
        self._starts = [0]
        for s in self._sources:
            self._starts.append(self._starts[-1] + len(s))
        self.name = ",".join(s.name for s in self._sources)

    def __len__(self) -> int:
        return self._starts[-1]

    def get(self, index: int) -> tuple[dict[str, Any], Location]:
        self._check_index(index)
        k = bisect.bisect_right(self._starts, index) - 1
        return self._sources[k].get(index - self._starts[k])


def require_rows(source: RecordSource) -> RecordSource:
    """``source``, or a DataError naming it when it has no rows (an empty file, or one holding
    only blank lines): the trainers and ``rlhf-jax data validate`` refuse it alike."""
    if len(source) == 0:
        raise DataError("no rows: the data is empty (an empty file, or only blank lines)",
                        location=Location(source.name, 0, "file"), reason="empty_dataset")
    return source


def _to_python(value: Any) -> Any:
    """numpy arrays/scalars -> Python lists/scalars, recursively."""
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()] if value.ndim else _to_python(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value


def _sequence_of_dicts(feature) -> bool:
    import tensorflow_datasets as tfds

    return (isinstance(feature, tfds.features.Sequence)
            and isinstance(feature.feature, tfds.features.FeaturesDict))


def _unstack(d: Mapping[str, list]) -> list[dict[str, Any]]:
    """A ``Sequence({...})`` value (dict of equal-length lists) -> list of dicts."""
    n = len(next(iter(d.values()))) if d else 0
    return [{k: d[k][i] for k in d} for i in range(n)]


class TfdsSource(RecordSource):
    """Rows of a prepared TFDS dataset (``array_record``) read with ``tfds.data_source``.

    ``name`` as in ``tfds.builder`` (``"name"``, ``"name/config:1.0.0"``); ``field_map``
    (``{canonical: column}``) is applied to every row (format parsers apply it too, so either
    place works). Text comes back as ``str``; a row that is not UTF-8 raises DataError."""

    def __init__(self, name: str, *, split: str = "train", data_dir: str | os.PathLike | None = None,
                 field_map=None):
        import tensorflow_datasets as tfds

        data_dir = os.fspath(data_dir) if data_dir else None
        self.name = f"tfds:{name}/{split}"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError and friends
            raise DataError(f"cannot open TFDS dataset {name!r} in data_dir {data_dir!r}: {e}",
                            location=Location(self.name, 0, "file"), reason="missing_file") from e
        splits = list(builder.info.splits.keys())
        if split not in splits and "[" not in split:
            raise DataError(f"no split {split!r}; the dataset has {splits}",
                            location=Location(self.name, 0, "file"), reason="missing_file")
        try:
            self._ds = builder.as_data_source(split=split)
        except Exception as e:
            raise DataError(f"cannot read TFDS dataset {name!r} as a data source (it must be "
                            f"prepared in array_record format): {e}",
                            location=Location(self.name, 0, "file"), reason="bad_file") from e
        meta = builder.info.metadata or {}
        self._json_fields = set(meta.get("rlhf_jax_json_fields", []) or [])
        features = builder.info.features
        self._stacked = {k for k, f in features.items() if _sequence_of_dicts(f)} if features else set()
        self._field_map = parse_field_map(field_map)

    def __len__(self) -> int:
        return len(self._ds)

    def get(self, index: int) -> tuple[dict[str, Any], Location]:
        self._check_index(index)
        loc = Location(self.name, index + 1, "row")
        row = _decode_bytes(_to_python(self._ds[int(index)]), loc)
        for k in self._stacked:
            if isinstance(row.get(k), Mapping):
                row[k] = _unstack(row[k])
        for k in self._json_fields:
            if k in row and isinstance(row[k], str):
                try:
                    row[k] = json.loads(row[k])
                except json.JSONDecodeError as e:
                    raise DataError(f"stored JSON is malformed: {e.msg}", location=loc, field=k,
                                    reason="malformed_json") from None
        return apply_field_map(row, self._field_map), loc


def open_file(path: str | os.PathLike) -> RecordSource:
    """A JSONL (``.jsonl``/``.json``/``.ndjson``) or Parquet (``.parquet``/``.pq``) file."""
    p = os.fspath(path)
    lower = p.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return JsonlSource(p)
    if lower.endswith((".parquet", ".pq")):
        return ParquetSource(p)
    ext = os.path.splitext(p)[1]
    hint = (" (convert CSV/TSV to JSONL, e.g. pandas.read_csv(f).to_json(out, orient='records', "
            "lines=True))") if ext.lower() in (".csv", ".tsv") else ""
    raise DataError(f"unknown file type {ext or '(no extension)'!r}; expected "
                    f"{'/'.join(SHARD_SUFFIXES)}{hint}", location=Location(p, 0, "file"),
                    reason="bad_file")


SHARD_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".pq")


def directory_shards(path: str) -> list[str]:
    """The data files directly in directory ``path`` (``SHARD_SUFFIXES``, sorted by name), or a
    DataError naming the directory when it holds none."""
    names = sorted(os.listdir(path))
    shards = [os.path.join(path, n) for n in names
              if n.lower().endswith(SHARD_SUFFIXES) and os.path.isfile(os.path.join(path, n))]
    if shards:
        return shards
    if "dataset_info.json" in names or any(n.endswith(".array_record") or ".array_record-" in n
                                          for n in names):
        hint = "; this looks like a TFDS dataset: pass tfds:NAME with data.data_dir (--data-dir)"
    else:
        shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        hint = f"; it holds {shown}" if names else "; it is empty"
    raise DataError(f"a directory of data shards must hold {'/'.join(SHARD_SUFFIXES)} files, found "
                    f"none{hint}", location=Location(path, 0, "file"), reason="missing_file")


def expand_paths(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Comma-separated paths, globs and directories of shards (or a list of them) -> file paths.

    A glob's matches are sorted; a directory stands for its data files (``directory_shards``)."""
    if isinstance(spec, (str, os.PathLike)):
        parts = [s.strip() for s in os.fspath(spec).split(",") if s.strip()]
    else:
        parts = [os.fspath(s) for s in spec]
    out: list[str] = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            matches = sorted(glob.glob(part))
            if not matches:
                raise DataError("the pattern matches no file", location=Location(part, 0, "file"),
                                reason="missing_file")
            out.extend(matches)
        elif os.path.isdir(part):
            out.extend(directory_shards(part))
        else:
            out.append(part)
    if not out:
        raise DataError(f"no input files in {spec!r}", reason="missing_file")
    return out


def open_source(spec: str | os.PathLike | Sequence[str] | RecordSource, *, split: str = "train",
                data_dir: str | None = None) -> RecordSource:
    """Opens ``spec``: a source object, file path(s)/globs, or ``"tfds:NAME"`` (+ ``split``,
    ``data_dir``; ``NAME`` may carry ``/config`` and ``:version`` as in ``tfds.builder``)."""
    if isinstance(spec, RecordSource):
        return spec
    if isinstance(spec, str) and spec.startswith("tfds:"):
        return TfdsSource(spec[len("tfds:"):], split=split, data_dir=data_dir)
    files = expand_paths(spec)
    sources = [open_file(p) for p in files]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)
