"""glibc's allocator settings for training on a CPU (config key ``malloc``).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a request above its mmap
threshold with a fresh mapping (the dynamic threshold grows to at most 32 MB), and returns memory
freed at the top of its heap to the system once more than the trim threshold is free. Either way a
buffer of the next step is new memory whose every 4 KiB page faults in, zero-filled by the kernel,
on first touch. FNE's step at the paper's large size forms a dozen (128, 65,664) fp32 temporaries
(34 MB each) per direction, so with glibc's defaults it spent more time in page faults than in its
elementwise passes. Raising both thresholds keeps freed buffers in the heap for the next step: the
same tensors and results, fewer faults. The cost is that memory freed after a peak stays with the
process (up to the trim threshold) instead of going back to the system. Measured in docs:
journal/2026-12-02-glibc-allocator (and results/speed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from typing import Any

from fne_lightning.errors import check

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# mallopt takes a C int of bytes.
MAX_MB = (2**31 - 1) >> 20


def check_settings(settings: Any, key: str = "malloc") -> tuple[int, int] | None:
    """Check a ``malloc`` config node.

    Args:
        settings: the node (``mmap_threshold_mb``, ``trim_threshold_mb``), or None.
        key: how errors name it.

    Returns:
        ``(mmap_threshold_mb, trim_threshold_mb)``, or None for None.

    Raises:
        FNEError: a value that is not a whole number of MB in range.
    """
    if settings is None:
        return None
    values = []
    for name in ("mmap_threshold_mb", "trim_threshold_mb"):
        value = settings.get(name) if hasattr(settings, "get") else None
        check(isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_MB, f"{key}.{name}",
              f"an integer number of MB in [1, {MAX_MB}] (or {key}=null for glibc's defaults)", value)
        values.append(value)
    return values[0], values[1]


def configure_malloc(settings: Any, key: str = "malloc") -> bool:
    """Apply a ``malloc`` config node to this process with ``mallopt(3)``.

    Processes forked later (data loader workers) inherit it.

    Args:
        settings: ``mmap_threshold_mb`` and ``trim_threshold_mb``; None leaves glibc's defaults.
        key: how errors name it.

    Returns:
        True when applied; False for None, or where the C library is not glibc (macOS, musl,
        Windows), whose allocators these settings do not describe.
    """
    thresholds = check_settings(settings, key)
    if thresholds is None:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.debug("%s: not glibc (%s %s), left as it is", key, platform.system(), platform.libc_ver()[0] or "?")
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = True
    for param, mb in zip((M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), thresholds, strict=True):
        applied &= bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(mb << 20)))
    if not applied:
        log.warning("%s: glibc's mallopt refused mmap_threshold_mb=%d / trim_threshold_mb=%d; its defaults stay",
                    key, *thresholds)
    return applied


def configure_like_training(choice: str) -> bool:
    """Set the allocator as a training run would, for benchmarks outside ``fne_lightning.train``.

    Args:
        choice: ``"train"`` applies the ``malloc`` node of ``conf/train.yaml`` (what a training
            run uses), ``"glibc"`` leaves glibc's defaults.

    Returns:
        Whether settings were applied (:func:`configure_malloc`).
    """
    check(choice in ("train", "glibc"), "--malloc", "train or glibc", choice)
    if choice == "glibc":
        return False
    from omegaconf import OmegaConf

    from fne_lightning.utils.config import config_dir

    return configure_malloc(OmegaConf.load(f"{config_dir()}/train.yaml").get("malloc"))
