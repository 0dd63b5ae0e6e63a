"""TensorFlow Datasets without TensorFlow: array_record datasets written and read in pure Python.

Writing: :class:`RecordsBuilder` is a generic ``tfds.core.GeneratorBasedBuilder`` whose examples
are plain dicts; :func:`write_tfds_dataset` prepares one from ``{split: records}`` in one call,
and :func:`files_to_tfds` turns a user's JSONL/Parquet files into a validated TFDS dataset. Files
are ``array_record`` (random access, no TF needed), example order is kept
(``disable_shuffling``).

Reading: :class:`TfdsSource` (defined in ``sources`` beside the other record sources, so
``open_source("tfds:NAME")`` needs no import of this module; re-exported here) opens any prepared dataset in a ``data_dir`` by name through
``tfds.data_source`` (a project builder, a converted file, or a dataset someone else prepared in
``array_record`` format), decodes TFDS values (bytes -> str, ``Sequence({...})`` dict-of-lists ->
list of dicts, numpy -> Python) and renames columns with a field map.

Feature specs are small dicts ``{field: kind}`` with kinds ``"text"``, ``"int"``, ``"float"``,
``"text_list"``, ``"int_list"``, ``"messages"`` (``Sequence({"role": Text, "content": Text})``) and
``"json"`` (any JSON value stored as text, e.g. a list of message lists, which TFDS cannot store
without TensorFlow; decoded back on reading). A ``tfds.features.FeaturesDict`` works too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import types
from typing import Any, Callable, Iterable, Mapping

import numpy as np

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from rlhf_jax.data.errors import DataError, DataStats
from rlhf_jax.data.iterators import read_records
from rlhf_jax.data.sources import TfdsSource  # the reader lives with the other sources; re-exported

__all__ = ["FEATURE_KINDS", "RecordsBuilder", "TfdsSource", "files_to_tfds", "infer_features_spec",
           "write_tfds_dataset"]

FEATURE_KINDS = ("text", "int", "float", "text_list", "int_list", "messages", "json")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _feature(kind: str):
    if kind == "text":
        return tfds.features.Text()
    if kind == "int":
        return tfds.features.Scalar(np.int64)
    if kind == "float":
        return tfds.features.Scalar(np.float64)
    if kind == "text_list":
        return tfds.features.Sequence(tfds.features.Text())
    if kind == "int_list":
        return tfds.features.Sequence(np.int64)
    if kind == "messages":
        return tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})
    if kind == "json":
        return tfds.features.Text()
    raise DataError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}",
                    reason="bad_features")


def _kind_of(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "json"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            return "text_list"
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return "int_list"
        if value and all(isinstance(v, Mapping) and set(v) == {"role", "content"}
                         and all(isinstance(x, str) for x in v.values()) for v in value):
            return "messages"
    return "json"


def infer_features_spec(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The feature kind of every field over all ``records`` (mixed kinds fall back to JSON;
    ints mixed with floats become float). Every record must have the same fields."""
    spec: dict[str, str] = {}
    fields = None
    for i, rec in enumerate(records):
        if fields is None:
            fields = set(rec)
        elif set(rec) != fields:
            raise DataError(f"record {i} has fields {sorted(rec)} but the first has {sorted(fields)}",
                            reason="bad_features")
        for k, v in rec.items():
            kind = _kind_of(v)
            old = spec.get(k)
            if old is None or old == kind:
                spec[k] = kind
            elif {old, kind} == {"int", "float"}:
                spec[k] = "float"
            elif {old, kind} <= {"text_list", "int_list", "messages", "json"} and (
                    v == [] or spec[k] == "json"):
                spec[k] = old if v == [] else "json"
            else:
                spec[k] = "json"
    return spec


def _encode(rec: Mapping[str, Any], spec: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for k, kind in spec.items():
        v = rec[k]
        out[k] = json.dumps(v, ensure_ascii=False) if kind == "json" else v
    return out


class RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder whose examples are plain dicts, written as ``array_record`` in order.

    Project builders subclass it (subclasses register under ``name`` like any TFDS builder)::

        class ArithPrefs(RecordsBuilder):
            name = "arith_prefs"
            VERSION = tfds.core.Version("1.0.0")
            FEATURES = {"prompt": "text", "chosen": "text", "rejected": "text", "margin": "float"}

            def split_records(self):
                return {"train": make_pairs("train"), "test": make_pairs("test")}

        ArithPrefs(data_dir=d).download_and_prepare()
        src = TfdsSource("arith_prefs", split="train", data_dir=d)

    ``split_records()`` returns ``{split: iterable of dicts (or a zero-argument callable giving
    one)}``; ``FEATURES`` is a kind spec (see module doc) or a ``FeaturesDict``.
    """

    VERSION = tfds.core.Version("1.0.0")
    FEATURES: Mapping[str, str] | Any = {}
    DESCRIPTION = "Records written by rlhf_jax."

    def __init__(self, *, data_dir: str | os.PathLike | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(data_dir=os.fspath(data_dir) if data_dir else None, **kwargs)

    def split_records(self) -> Mapping[str, Iterable[Mapping[str, Any]] | Callable[[], Iterable]]:
        raise DataError(f"{type(self).__name__} must define split_records()", reason="bad_builder")

    def _kind_spec(self) -> dict[str, str] | None:
        return dict(self.FEATURES) if isinstance(self.FEATURES, Mapping) else None

    def _info(self):
        spec = self._kind_spec()
        if spec is not None:
            features = tfds.features.FeaturesDict({k: _feature(v) for k, v in spec.items()})
            json_fields = sorted(k for k, v in spec.items() if v == "json")
        else:
            features, json_fields = self.FEATURES, []
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, features=features,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(rlhf_jax_json_fields=json_fields))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(recs) for split, recs in self.split_records().items()}

    def _generate_examples(self, records):
        spec = self._kind_spec()
        recs = records() if callable(records) else records
        for i, rec in enumerate(recs):
            yield i, (_encode(rec, spec) if spec is not None else rec)


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name or ""):
        raise DataError(f"TFDS dataset name {name!r}: use lower_snake_case (letters, digits, _)",
                        reason="bad_name")


def write_tfds_dataset(records_by_split: Mapping[str, Iterable[Mapping[str, Any]]], name: str,
                       data_dir: str | os.PathLike, features_spec=None, *, version: str = "1.0.0",
                       description: str = "", overwrite: bool = False) -> str:
    """Writes ``{split: records}`` as TFDS dataset ``name`` (``array_record``) under ``data_dir``.

    ``features_spec``: kind spec or FeaturesDict; inferred from the records when None. Returns the
    dataset directory (``data_dir/name/version``). An existing dataset is kept unless
    ``overwrite``."""
    _check_name(name)
    records_by_split = {s: list(r() if callable(r) else r) for s, r in records_by_split.items()}
    if features_spec is None:
        features_spec = infer_features_spec(r for recs in records_by_split.values() for r in recs)
    data_dir = os.fspath(data_dir)
    out_dir = os.path.join(data_dir, name, version)
    if overwrite and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)

    def body(ns):
        ns.update(name=name, VERSION=tfds.core.Version(version), FEATURES=features_spec,
                  DESCRIPTION=description or f"{name}: records written by rlhf_jax",
                  split_records=lambda self: records_by_split, __module__=__name__)

    cls = types.new_class(f"_Records_{name}", (RecordsBuilder,), {"skip_registration": True}, body)
    builder = cls(data_dir=data_dir)
    with _quiet():
        builder.download_and_prepare()
    return out_dir


class _quiet:
    """Turns TFDS progress bars off for a block (they flood test logs)."""

    def __enter__(self):
        self._was = tqdm_utils._active
        tfds.disable_progress_bar()

    def __exit__(self, *exc):
        if self._was:
            tfds.enable_progress_bar()


def files_to_tfds(files_by_split: Mapping[str, Any], name: str, data_dir: str | os.PathLike, *,
                  fmt: str, field_map=None, skip_bad_rows: bool = False, overwrite: bool = False,
                  version: str = "1.0.0") -> tuple[str, DataStats]:
    """Converts JSONL/Parquet files (``{split: path(s)}``) into TFDS dataset ``name``.

    Every row is validated in format ``fmt`` and stored in its canonical form (so bad rows fail
    here, naming file and line, or are skipped and counted). Returns (dataset dir, stats)."""
    _check_name(name)
    stats = DataStats()
    by_split = {}
    for split, paths in files_by_split.items():
        recs, st = read_records(paths, fmt, field_map=field_map, skip_bad_rows=skip_bad_rows)
        stats.merge(st)
        if not recs:
            raise DataError(f"split {split!r}: no valid rows in {paths}", reason="empty_dataset")
        by_split[split] = recs
    out = write_tfds_dataset(by_split, name, data_dir, version=version, overwrite=overwrite,
                             description=f"{fmt} records converted by rlhf_jax from "
                             f"{ {k: str(v) for k, v in files_by_split.items()} }")
    return out, stats
