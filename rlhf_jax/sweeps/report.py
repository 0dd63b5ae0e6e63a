"""A sweep's tables on disk: ``results.jsonl``/``results.csv`` (one row per point) and, for a
vmapped sweep, ``curves.jsonl`` (one line per run and iteration)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlhf_jax.evaluation import write_jsonl
from rlhf_jax.sweeps.points import SweepPoint


def write_results(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """``results.jsonl`` (the rows as they are) and ``results.csv`` (columns ``point``, ``overrides``,
    then the rest sorted; a list value is written space-separated) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "results.jsonl", rows)
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k != "point", k != "overrides", k))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (" ".join(v) if isinstance(v, list) else v) for k, v in row.items()})


def write_curves(path: Path, points: Sequence[SweepPoint], seed_index: Sequence[int],
                 history: Mapping[str, Any], iterations: int) -> str:
    """``curves.jsonl``: per run ``i`` and iteration ``t`` (1-based) the point, seed and
    ``history[k][i, t - 1]`` of every metric ``k``."""
    return write_jsonl(path, ({"point": point.index, "seed": int(seed_index[i]), "iteration": t + 1,
                               **{k: float(v[i, t]) for k, v in history.items()}}
                              for i, point in enumerate(points) for t in range(iterations)))
