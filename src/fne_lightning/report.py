"""Result tables: the standard retrieval table for the terminal and for markdown files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

DIRECTIONS = (("i2t", "Image-to-text"), ("t2i", "Text-to-image"))
STANDARD = (("r1", "R@1"), ("r5", "R@5"), ("r10", "R@10"), ("medr", "medr"), ("meanr", "meanr"))
MULTI = (("rprecision", "R-P"), ("map_at_r", "mAP@R"), ("any_r1", "R@1+"), ("any_r5", "R@5+"),
         ("any_r10", "R@10+"))


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}"


def table_rows(metrics: Mapping[str, float], prefix: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per direction) of the table for keys ``<prefix>/<dir>_<metric>``."""
    multi = any(f"{prefix}/i2t_{k}" in metrics for k, _ in MULTI)
    columns = STANDARD + (MULTI if multi else ())
    header = [prefix] + [name for _, name in columns]
    rows = [[label] + [_fmt(metrics.get(f"{prefix}/{d}_{k}")) for k, _ in columns] for d, label in DIRECTIONS]
    return header, rows


def format_table(metrics: Mapping[str, float], prefix: str = "test") -> str:
    """Fixed-width table of i2t and t2i R@1/5/10, medr, meanr (and multi-positive metrics), plus rsum."""
    header, rows = table_rows(metrics, prefix)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    out = [line(header), "-" * len(line(header))] + [line(r) for r in rows]
    out.append(f"rsum {_fmt(metrics.get(f'{prefix}/rsum'))}")
    return "\n".join(out)


def format_markdown(metrics: Mapping[str, float], prefix: str = "test") -> str:
    header, rows = table_rows(metrics, prefix)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append(f"\nrsum: **{_fmt(metrics.get(f'{prefix}/rsum'))}**")
    return "\n".join(out) + "\n"


def write_json(path: str | os.PathLike, data: Mapping[str, object]) -> None:
    """Write JSON atomically: a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(data), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
