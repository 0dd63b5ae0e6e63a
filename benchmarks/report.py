"""Result rows, the Markdown table and the JSON file of a benchmark run.

Every ratio is a speed-up of rlhf_jax over the peer (> 1 means ours is faster), whichever way the
metric points: ``ours/peer`` for rates, ``peer/ours`` for seconds. Rows without a peer (MFU, the
vmapped sweep) carry their own ratio, explained in ``note``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

STATUSES = ("ok", "not available", "error")


@dataclasses.dataclass
class Row:
    """One line of the table.

    ``status``: "ok" (measured), "not available" (a side could not be run: ``note`` says which and
    why), "error" (a side raised: ``note`` has the exception; the run exits non-zero).
    """

    item: str
    shape: str
    metric: str
    ours: float | None
    peer: float | None
    peer_name: str
    higher_is_better: bool
    target: float | None = None
    target_on: str = "ratio"
    status: str = "ok"
    note: str = ""
    probe_gflops: float | None = None
    ratio_override: float | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.target_on not in ("ratio", "ours"):
            raise ValueError(f"row {self.item}/{self.shape}: target_on must be 'ratio' or 'ours', got {self.target_on!r}")
        if self.status not in STATUSES:
            raise ValueError(f"row {self.item}/{self.shape}: status must be one of {STATUSES}, got {self.status!r}")

    @property
    def ratio(self) -> float | None:
        """Speed-up of ours over the peer (or the row's own ratio); None when a side is missing."""
        if self.ratio_override is not None:
            return self.ratio_override
        if self.ours is None or self.peer is None or self.ours <= 0 or self.peer <= 0:
            return None
        return self.ours / self.peer if self.higher_is_better else self.peer / self.ours

    @property
    def met(self) -> bool | None:
        """Whether the ratio (or, with ``target_on="ours"``, our value) reaches the target."""
        r = self.ratio if self.target_on == "ratio" else self.ours
        if self.target is None or r is None:
            return None
        return r >= self.target

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("ratio_override")
        d["ratio"] = self.ratio
        d["met"] = self.met
        return _jsonable(d)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return x.item()
    return x


def fmt_value(v: float | None) -> str:
    """Three significant figures, thousands separated; "—" for a missing value."""
    if v is None:
        return "—"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 1:
        return f"{v:.3g}" if a < 100 else f"{v:.0f}"
    return f"{v:.3g}"


def markdown_table(rows: list[Row]) -> str:
    """The Markdown table: one line per row, ratio as ``×``, target met as yes/no."""
    head = "| item | shape | metric | rlhf_jax | peer | peer value | ratio | target | met | probe GFLOP/s | note |"
    sep = "|" + "---|" * 11
    lines = [head, sep]
    for r in rows:
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}×"
        if r.target is None:
            target = "—"
        elif r.target_on == "ratio":
            target = f"≥ {r.target:g}×"
        else:
            target = f"ours ≥ {r.target:g}"
        met = {None: "—", True: "yes", False: "no"}[r.met]
        note = r.note if r.status == "ok" else f"**{r.status}**: {r.note}"
        note = note.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r.item} | {r.shape} | {r.metric} | {fmt_value(r.ours)} | {r.peer_name or '—'} | "
            f"{fmt_value(r.peer)} | {ratio} | {target} | {met} | {fmt_value(r.probe_gflops)} | {note} |"
        )
    return "\n".join(lines)


def render_markdown(result: dict[str, Any], rows: list[Row]) -> str:
    """The whole Markdown report: header (date, machine, command, probes) and the table."""
    m = result["machine"]
    p = result["probes"]
    lines = [
        f"# rlhf_jax benchmarks — {result['date']}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {m['cpu']} ({m['cores']} cores), JAX devices: {m['jax_device']}, "
        f"jax {m['versions'].get('jax')}, torch {m['versions'].get('torch')}, "
        f"transformers {m['versions'].get('transformers')}, trl {m['versions'].get('trl')}",
        f"- load average at start: {m.get('loadavg')}",
        f"- matmul peak (best of JAX/PyTorch probes): {p['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s; "
        f"copy bandwidth: {p['copy_bandwidth_bytes_per_s'] / 1e9:,.2f} GB/s",
        f"- compute dtype: {result['dtype']}; mode: {'quick' if result['quick'] else 'full'}"
        + ("" if result.get("complete", True) else " — **partial: the run was interrupted after these rows**"),
        "",
        "Ratio = speed-up of rlhf_jax over the peer (> 1: ours faster). 'probe' = a short JAX matmul "
        "probe run just before the row's item (the machine drifts; compare ratios, not absolutes).",
        "",
        markdown_table(rows),
        "",
    ]
    return "\n".join(lines)


def write_results(out_dir: str | os.PathLike, result: dict[str, Any], rows: list[Row]) -> tuple[Path, Path]:
    """Writes ``latest.json`` and ``latest.md`` into ``out_dir`` atomically; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(result)
    payload["rows"] = [r.to_dict() for r in rows]
    payload = _jsonable(payload)
    paths = []
    for name, text in (
        ("latest.json", json.dumps(payload, indent=2, sort_keys=False) + "\n"),
        ("latest.md", render_markdown(result, rows)),
    ):
        path = out / name
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]
