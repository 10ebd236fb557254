"""Result tables: the standard retrieval table for the terminal and for markdown files, and the
rich end-of-run summary (:func:`print_summary`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

DIRECTIONS = (("i2t", "Image-to-text"), ("t2i", "Text-to-image"))
STANDARD = (("r1", "R@1"), ("r5", "R@5"), ("r10", "R@10"), ("medr", "medr"), ("meanr", "meanr"))
MULTI = (("rprecision", "R-P"), ("map_at_r", "mAP@R"), ("any_r1", "R@1+"), ("any_r5", "R@5+"),
         ("any_r10", "R@10+"))


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}"


def table_rows(metrics: Mapping[str, float], prefix: str,
               title: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per direction) of the retrieval table, as formatted strings.

    Args:
        metrics: logged metrics with keys ``<prefix>/<dir>_<metric>`` (e.g. ``test/i2t_r1``).
        prefix: the stage whose metrics are shown (``test``, ``val``, ``test_1k``).
        title: the header's first cell (default: the prefix).

    Returns:
        ``(header, rows)``; the multi-positive columns only when ``metrics`` has them, ``-`` for
        a missing value.
    """
    multi = any(f"{prefix}/i2t_{k}" in metrics for k, _ in MULTI)
    columns = STANDARD + (MULTI if multi else ())
    header = [title or prefix] + [name for _, name in columns]
    rows = [[label] + [_fmt(metrics.get(f"{prefix}/{d}_{k}")) for k, _ in columns] for d, label in DIRECTIONS]
    return header, rows


def format_table(metrics: Mapping[str, float], prefix: str = "test", title: str | None = None) -> str:
    """Fixed-width text table of i2t and t2i R@1/5/10, medr, meanr (and multi-positive metrics), plus rsum.

    Args:
        metrics: as for :func:`table_rows`.
        prefix: as for :func:`table_rows`.
        title: as for :func:`table_rows`.
    """
    header, rows = table_rows(metrics, prefix, title)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    out = [line(header), "-" * len(line(header))] + [line(r) for r in rows]
    out.append(f"rsum {_fmt(metrics.get(f'{prefix}/rsum'))}")
    return "\n".join(out)


def format_markdown(metrics: Mapping[str, float], prefix: str = "test", title: str | None = None) -> str:
    """The table of :func:`format_table` as Markdown, with rsum in bold below it.

    Args:
        metrics: as for :func:`table_rows`.
        prefix: as for :func:`table_rows`.
        title: as for :func:`table_rows`.
    """
    header, rows = table_rows(metrics, prefix, title)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append(f"\nrsum: **{_fmt(metrics.get(f'{prefix}/rsum'))}**")
    return "\n".join(out) + "\n"


# Published protocols (keys <stage>_<protocol>/<dir>_<metric>) and the columns of their table.
PROTOCOLS = (("eccv", "ECCV Caption"), ("cxc", "CxC"), ("coco5k", "COCO 5K"), ("coco1k", "COCO 1K"))
PROTOCOL_COLUMNS = (("map_at_r", "mAP@R"), ("rprecision", "R-P"), ("r1", "R@1"), ("r5", "R@5"), ("r10", "R@10"))


def protocol_rows(metrics: Mapping[str, float], stage: str = "test",
                  title: str = "eccv_caption protocols") -> tuple[list[str], list[list[str]]]:
    """Header and rows of the published protocols' table: one row per protocol and direction
    (``ECCV Caption i2t``, ...) with mAP@R, R-P, R@1, R@5, R@10, ``-`` where a protocol has none.

    Args:
        metrics: metrics with keys ``<stage>_<protocol>/<dir>_<metric>`` (``test_eccv/i2t_r1``).
        stage: the stage (``test``).
        title: the header's first cell.

    Returns:
        ``(header, rows)``; no rows when ``metrics`` has no protocol keys.
    """
    header = [title] + [name for _, name in PROTOCOL_COLUMNS]
    rows = []
    for proto, label in PROTOCOLS:
        for d, _ in DIRECTIONS:
            values = [metrics.get(f"{stage}_{proto}/{d}_{k}") for k, _ in PROTOCOL_COLUMNS]
            if any(v is not None for v in values):
                rows.append([f"{label} {d}"] + [_fmt(v) for v in values])
    return header, rows


def format_protocol_table(metrics: Mapping[str, float], stage: str = "test", markdown: bool = False) -> str:
    """The published protocols' table of :func:`protocol_rows`, fixed-width text or Markdown
    (empty when ``metrics`` has no protocol keys).

    Args:
        metrics: as for :func:`protocol_rows`.
        stage: as for :func:`protocol_rows`.
        markdown: a Markdown table instead of text.
    """
    header, rows = protocol_rows(metrics, stage)
    if not rows:
        return ""
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    return "\n".join([line(header), "-" * len(line(header))] + [line(r) for r in rows])


# Training numbers shown by `print_summary` when present: (key, label, format).
RUN_KEYS = (("val/rsum_best", "best val rsum", "number"),
            ("fne/sampled_fn_rate", "sampled negatives that truly match", "rate"),
            ("fne/hardest_fn_rate", "hardest negatives that truly match", "rate"),
            ("fne/fn_base_rate", "candidates that truly match (base rate)", "rate"),
            ("fne/flagged_rate", "candidates flagged as probable false negatives", "rate"),
            ("fne/flagged_precision", "flagged candidates that truly match", "rate"),
            ("fne/posterior_auc", "ROC AUC of p_fn (true matches vs negatives)", "auc"),
            ("fne/cutdown_rate", "candidates cut down", "rate"),
            ("fne/fn_mass", "push on negatives that falls on true matches", "rate"),
            ("train/logit_scale", "logit scale (1 / temperature)", "number"),
            ("train/logit_bias", "logit bias", "number"))


def print_summary(metrics: Mapping[str, float], files: Mapping[str, object] | None = None,
                  prefix: str | None = "test", title: str | None = None, console: object | None = None) -> None:
    """Print a run's end-of-run summary with rich.

    The retrieval table of ``prefix`` (the columns of :func:`format_table`, then rsum) and, when
    ``metrics`` has them, the published protocols' (:func:`protocol_rows`), the training numbers of ``RUN_KEYS`` that ``metrics`` has (last epoch's averages: the
    false-negative rates, the flagged share and precision, the posterior's AUC, ...), and the
    run's files.

    Args:
        metrics: logged metrics by key (``test/i2t_r1``, ``fne/sampled_fn_rate``, ...).
        files: label -> path or command; None entries are skipped.
        prefix: the stage of the retrieval table; None: no table.
        title: the table's title (default: the prefix).
        console: a ``rich.console.Console`` (default: stdout; when that is not a terminal, 160
            columns wide so that no column is squeezed in logs).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = Console()
        if not console.is_terminal and not console.is_jupyter:
            console = Console(width=max(console.width, 160))
    if prefix is not None and f"{prefix}/rsum" in metrics:
        header, rows = table_rows(metrics, prefix, title)
        table = Table(title=f"{title or prefix} results", title_justify="left",
                      caption=f"rsum {_fmt(metrics.get(f'{prefix}/rsum'))}", caption_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        header, rows = protocol_rows(metrics, prefix)
        if rows:  # published protocols (data.protocol)
            table = Table(title_justify="left")
            for i, name in enumerate(header):
                table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
            for row in rows:
                table.add_row(*row)
            console.print(table)
    run = Table(show_header=False, box=None)
    run.add_column(style="bold", no_wrap=True)
    run.add_column(overflow="fold")
    for key, label, kind in RUN_KEYS:
        if key in metrics:
            value = metrics[key]
            run.add_row(label, f"{100 * value:.1f}%" if kind == "rate" else f"{value:.3f}" if kind == "auc"
                        else _fmt(value))
    for label, value in (files or {}).items():
        if value is not None:
            run.add_row(label, Text(str(value)))  # Text: no markup or highlighting in paths
    if run.row_count:
        console.print(run)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Context manager: open ``path`` for writing through a temporary file renamed into place on success.

    A reader never sees a half-written file, and a failed write leaves no file behind.

    Args:
        path: the file to write.
        mode: the ``open`` mode (``"w"`` text in UTF-8, ``"wb"`` bytes).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Mapping[str, object]) -> None:
    """Write ``data`` as indented JSON with sorted keys, atomically (:func:`atomic_write`).

    Args:
        path: the file to write.
        data: a JSON-serialisable mapping.
    """
    with atomic_write(path) as f:
        json.dump(dict(data), f, indent=2, sort_keys=True)
        f.write("\n")
