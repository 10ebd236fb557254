"""Sweep results: one table per Hydra multirun (``-m ...`` or ``hparams_search=...``).

:class:`SweepSummary` is a Hydra callback (``hydra.callbacks`` in ``conf/hydra/default.yaml``)
that writes ``<sweep dir>/sweep_results.csv`` and ``sweep_results.md``: one row per job with
its overrides, best validation rsum, test rsum and false-negative rates, read from the
``metrics.json`` that every job writes into its own directory. The files are rewritten after
every job, so they are there while a long sweep runs and after a job fails (Hydra's basic
sweeper raises at the end of a batch with a failed job and then never reaches
``on_multirun_end``). A job without ``metrics.json`` is a row with status ``failed`` and empty
results.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fne_lightning.utils.report import atomic_write

log = logging.getLogger(__name__)

RESULTS = "sweep_results"
# (metrics.json key, markdown header); the CSV also carries every other metric after these.
COLUMNS = (("val/rsum_best", "best val rsum"), ("test/rsum", "test rsum"),
           ("fne/sampled_fn_rate", "sampled FN rate"), ("fne/hardest_fn_rate", "hardest FN rate"))


def _job_sort_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def collect_jobs(sweep_dir: Path, output_subdir: str = ".hydra") -> list[dict[str, Any]]:
    """Every job directory under ``sweep_dir`` (it holds ``<output_subdir>/overrides.yaml``), in
    job order: ``{"job", "dir", "overrides" (list), "metrics" (dict, empty if none), "status"}``."""
    jobs = []
    for overrides_file in sweep_dir.glob(f"**/{output_subdir}/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text(encoding="utf-8")) or []
        metrics_file = job_dir / "metrics.json"
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metrics = {}
        jobs.append({"job": job_dir.relative_to(sweep_dir).as_posix(), "dir": str(job_dir),
                     "overrides": [str(o) for o in overrides], "metrics": metrics,
                     "status": "ok" if metrics else "failed"})
    return sorted(jobs, key=lambda j: _job_sort_key(j["job"]))


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def varying_keys(jobs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (or is missing in some), in first-seen order."""
    owns = [dict(_split(o) for o in job["overrides"]) for job in jobs]
    keys = dict.fromkeys(key for own in owns for key in own)
    return [key for key in keys if len({own.get(key) for own in owns}) > 1]


def _cell(value: Any, digits: int | None = None) -> str:
    """CSV cells keep full precision; markdown cells (``digits``) are rounded."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}" if digits and isinstance(value, float) else str(value)


def write_results(sweep_dir: str | os.PathLike, output_subdir: str = ".hydra") -> tuple[Path, Path] | None:
    """Write ``sweep_results.csv`` and ``.md`` into ``sweep_dir``; None when it holds no job yet."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir, output_subdir)
    if not jobs:
        return None
    swept = varying_keys(jobs)
    main_keys = [k for k, _ in COLUMNS]
    extra = sorted({k for j in jobs for k in j["metrics"]} - set(main_keys))

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["job", "status", *swept, *main_keys, "overrides", *extra, "dir"])
    for j in jobs:
        own = dict(_split(o) for o in j["overrides"])
        writer.writerow([j["job"], j["status"], *(own.get(k, "") for k in swept),
                         *(_cell(j["metrics"].get(k)) for k in main_keys), " ".join(j["overrides"]),
                         *(_cell(j["metrics"].get(k)) for k in extra), j["dir"]])
    csv_path = sweep_dir / f"{RESULTS}.csv"
    _write(csv_path, buf.getvalue())

    best = max((j for j in jobs if j["metrics"].get("val/rsum_best") is not None),
               key=lambda j: j["metrics"]["val/rsum_best"], default=None)
    common = [o for o in jobs[0]["overrides"] if _split(o)[0] not in swept]
    lines = [f"# Sweep results: {sweep_dir}", "",
             f"{len(jobs)} jobs, {sum(j['status'] == 'ok' for j in jobs)} finished"
             + (f"; best val rsum: job {best['job']}" if best else "") + ".",
             f"Common overrides: `{' '.join(common)}`" if common else "No common overrides.", "",
             "| job | overrides | " + " | ".join(name for _, name in COLUMNS) + " | status |",
             "|---|---|" + "---:|" * len(COLUMNS) + "---|"]
    for j in jobs:
        own = [o for o in j["overrides"] if _split(o)[0] in swept] or j["overrides"]
        values = [j["metrics"].get(k) for k in main_keys]
        cells = [f"{100 * v:.1f}%" if v is not None and "fn_rate" in k else _cell(v, 5)
                 for v, k in zip(values, main_keys, strict=True)]
        row = [j["job"], " ".join(f"`{o}`" for o in own), *cells, j["status"]]
        if j is best:
            row = [f"**{c}**" if c else c for c in row]
        lines.append("| " + " | ".join(row) + " |")
    md_path = sweep_dir / f"{RESULTS}.md"
    _write(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def _write(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def _sweep_dir(config: DictConfig) -> Path:
    """The sweep directory of a job: its output directory minus ``hydra.sweep.subdir``."""
    out = Path(config.hydra.runtime.output_dir)
    depth = len(Path(str(config.hydra.sweep.subdir)).parts)
    return out.parents[depth - 1] if depth else out


class SweepSummary(Callback):
    """Hydra callback: (re)writes the sweep results after every multirun job and at the end."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None  # as the jobs saw it (hydra.sweep.dir may hold ${now:})

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        self.sweep_dir = _sweep_dir(config)
        try:
            written = write_results(self.sweep_dir, str(config.hydra.output_subdir or ".hydra"))
        except Exception as err:  # a summary must never fail the sweep
            log.warning("could not write the sweep results: %s", err)
            return
        if written and job_return.status == JobStatus.FAILED:
            log.warning("job failed; its row in %s has no results", written[0])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir or Path(config.hydra.sweep.dir)
        written = write_results(sweep_dir, str(config.hydra.output_subdir or ".hydra")) if sweep_dir.is_dir() else None
        if written:
            log.info("sweep results: %s and %s", *written)
            print(f"\nsweep results: {written[0]}\n\n{written[1].read_text(encoding='utf-8')}")
