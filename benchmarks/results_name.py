"""Names of stored benchmark results: ``<benchmark>_<YYYY-MM-DD>_<machine>.<ext>``.

As timm names its benchmark files by hardware: a number means nothing without the machine it was
measured on, and machines of one kind differ (docs: results/speed). ``machine`` is the GPU's name
when the benchmark ran on one (``nvidia-h100-80gb-hbm3``), else ``cpu-<cores>core``.
"""

from __future__ import annotations

import datetime
import os
import re


def machine_kind(device: str = "cpu") -> str:
    """``cpu-2core`` on this project's CPU machines; the GPU's name, as a slug, on a CUDA device."""
    if device.startswith("cuda"):
        import torch

        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}core"


def result_name(benchmark: str, ext: str, device: str = "cpu", date: datetime.date | None = None) -> str:
    """``<benchmark>_<date>_<machine>.<ext>``, today's date unless given."""
    return f"{benchmark}_{(date or datetime.date.today()).isoformat()}_{machine_kind(device)}.{ext}"
