"""``rlhf-jax data``: validate, inspect and convert datasets.

    rlhf-jax data validate FILE... --format preference [--field-map prompt=question ...]
    rlhf-jax data inspect FILE --format sft [--tokenizer DIR --max-length 512] [-n 3]
    rlhf-jax data to-tfds [SPLIT=]FILE... --format preference --name my_prefs --data-dir DIR

``validate`` reads every row, prints each bad row (file:line: field: problem) and the counts, and
exits 1 if any row is bad. ``FILE`` may also be ``tfds:NAME`` (with ``--split``/``--data-dir``).
``to-tfds`` validates and writes an ``array_record`` TFDS dataset readable as ``tfds:NAME``.
"""
from __future__ import annotations

import argparse
import json
import sys

from rlhf_jax.data.errors import DataError, DataStats, Location
from rlhf_jax.data.formats import FORMATS, apply_field_map, detect_format, parse_field_map, parse_record
from rlhf_jax.data.sources import open_source, require_rows
from rlhf_jax.data.tfds_io import files_to_tfds
from rlhf_jax.data.tokenize import Encoder, TokenizeOptions, load_tokenizer, tokenize_record

_ACTIONS = ("validate", "inspect", "to-tfds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=_ACTIONS, help="what to do")
    parser.add_argument("files", nargs="+", help="JSONL/Parquet files, globs or tfds:NAME "
                        "(to-tfds: [SPLIT=]FILE, split defaults to train)")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                        help="record format (auto: guessed from the first row's fields)")
    parser.add_argument("--field-map", action="append", default=[], metavar="CANONICAL=COLUMN",
                        help="read field CANONICAL from column COLUMN (repeat the flag)")
    parser.add_argument("--split", default="train", help="TFDS split to read (tfds:NAME inputs)")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir (reading and to-tfds)")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="to-tfds: leave bad rows out (counted) instead of failing")
    parser.add_argument("--max-errors", type=int, default=20, help="validate: bad rows to print")
    parser.add_argument("--tokenizer", default=None, help="inspect: tokenizer directory")
    parser.add_argument("--max-length", type=int, default=512, help="inspect: max_length")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="inspect: prompt limit")
    parser.add_argument("-n", type=int, default=3, help="inspect: rows to show")
    parser.add_argument("--name", default=None, help="to-tfds: dataset name (lower_snake_case)")
    parser.add_argument("--overwrite", action="store_true", help="to-tfds: replace an existing one")


def _source(spec: str, args):
    """The source of ``spec``; an empty one is an error here as in the trainers' iterators."""
    return require_rows(open_source(spec, split=args.split, data_dir=args.data_dir))


def _format(args, src) -> str:
    if args.format != "auto":
        return args.format
    fmap = parse_field_map(args.field_map, key="--field-map")
    for i in range(len(src)):
        try:
            raw, _ = src.get(i)
        except DataError:
            continue
        return detect_format(apply_field_map(raw, fmap))
    raise DataError("no readable row to guess the format from; pass --format",
                    location=Location(src.name, 0, "file"), reason="unknown_format")


def _validate(args) -> int:
    fmap = parse_field_map(args.field_map, key="--field-map")
    total, bad = DataStats(), 0
    for spec in args.files:
        try:  # a file that cannot be read at all (missing, empty, not JSONL/Parquet) is bad too
            src = _source(spec, args)
            fmt = _format(args, src)
        except DataError as e:
            bad += 1
            print(f"error: {e}", file=sys.stderr)
            continue
        stats = DataStats()
        for i in range(len(src)):
            stats.rows += 1
            try:
                raw, loc = src.get(i)
                parse_record(raw, fmt, loc, fmap)
                stats.examples += 1
            except DataError as e:
                stats.skipped[e.reason] = stats.skipped.get(e.reason, 0) + 1
                bad += 1
                if bad <= args.max_errors:
                    print(f"error: {e}", file=sys.stderr)
        print(f"{src.name}: format {fmt}: {stats.rows} rows, {stats.examples} valid, "
              f"{stats.skipped_total} bad {json.dumps(stats.skipped, sort_keys=True)}")
        total.merge(stats)
    if bad > args.max_errors:
        print(f"... {bad - args.max_errors} more bad rows not shown", file=sys.stderr)
    return 1 if bad else 0


def _inspect(args) -> int:
    fmap = parse_field_map(args.field_map, key="--field-map")
    src = _source(args.files[0], args)
    fmt = _format(args, src)
    enc = opts = tok = None
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
        enc = Encoder(tok, append_eos=fmt != "prompt")
        opts = TokenizeOptions(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    print(f"{src.name}: {len(src)} rows, format {fmt}")
    for i in range(min(args.n, len(src))):
        raw, loc = src.get(i)
        rec = parse_record(raw, fmt, loc, fmap)
        print(f"--- {loc}")
        print(json.dumps(rec, ensure_ascii=False, indent=1))
        if enc is not None:
            ex, counts = tokenize_record(rec, fmt, enc, opts, loc)
            if ex is None:
                print(f"(dropped: {dict(counts)})")
                continue
            for key, val in ex.items():
                if key in ("ids", "chosen", "rejected"):
                    print(f"{key} ({len(val)} tokens): {tok.convert_ids_to_tokens([int(x) for x in val])}")
                elif key == "responses":
                    for k, s in enumerate(val):
                        print(f"responses[{k}] ({len(s)} tokens): "
                              f"{tok.convert_ids_to_tokens([int(x) for x in s])}")
                elif key == "loss":
                    print(f"loss tokens: {int(val.sum())}")
                else:
                    print(f"{key}: {val.tolist() if hasattr(val, 'tolist') else val}")
            if counts:
                print(f"truncation: {dict(counts)}")
    return 0


def _to_tfds(args) -> int:
    if not args.name or not args.data_dir:
        raise DataError("to-tfds needs --name and --data-dir", reason="config")
    by_split: dict[str, list[str]] = {}
    for item in args.files:
        split, _, path = item.rpartition("=") if "=" in item else ("train", "", item)
        by_split.setdefault(split or "train", []).append(path)
    fmt = args.format
    if fmt == "auto":
        first = next(iter(by_split.values()))[0]
        fmt = _format(args, _source(first, args))
    out, stats = files_to_tfds({s: ",".join(p) for s, p in by_split.items()}, args.name,
                               args.data_dir, fmt=fmt, field_map=args.field_map,
                               skip_bad_rows=args.skip_bad_rows, overwrite=args.overwrite)
    print(f"wrote {out} ({fmt}; {stats.examples} rows, {stats.skipped_total} skipped "
          f"{json.dumps(stats.skipped, sort_keys=True)}); read it as tfds:{args.name}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "validate":
            return _validate(args)
        if args.action == "inspect":
            return _inspect(args)
        return _to_tfds(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
