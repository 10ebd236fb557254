"""glibc's allocator settings (``malloc`` in conf/train.yaml, ``utils/malloc.py``)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from fne_lightning.errors import FNEError
from fne_lightning.utils.malloc import MAX_MB, check_settings, configure_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh interpreter (the settings are process-wide): bytes glibc holds in mmapped chunks while
# a 40 MiB tensor lives, with glibc's defaults and then with the settings applied.
PROBE = """
import ctypes, json, torch
from fne_lightning.utils.malloc import configure_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_while_alive():
    before = libc.mallinfo2().hblkhd
    x = torch.empty(10 * 2**20)  # 40 MiB of float32
    during = libc.mallinfo2().hblkhd
    del x
    return during - before

out = {"default": mmapped_while_alive()}
out["applied"] = configure_malloc({"mmap_threshold_mb": 256, "trim_threshold_mb": 1024})
out["tuned"] = mmapped_while_alive()
print(json.dumps(out))
"""


@pytest.mark.parametrize("value", [0, -1, MAX_MB + 1, "64", True, None, 1.5])
def test_bad_thresholds_name_the_key(value: object) -> None:
    with pytest.raises(FNEError, match=r"^malloc\.trim_threshold_mb=.*: expected an integer number of MB"):
        check_settings({"mmap_threshold_mb": 64, "trim_threshold_mb": value})


def test_null_leaves_glibc_alone() -> None:
    assert check_settings(None) is None
    assert configure_malloc(None) is False
    assert check_settings({"mmap_threshold_mb": 256, "trim_threshold_mb": MAX_MB}) == (256, MAX_MB)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_buffers_below_the_threshold_come_from_the_heap() -> None:
    """glibc's default serves a 40 MiB buffer (above its largest dynamic threshold, 32 MiB) with a
    mapping of its own, whose pages fault in afresh each time; with the settings it comes from the
    heap, which keeps freed memory for the next buffer."""
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["applied"] is True
    assert out["default"] >= 40 * 2**20
    assert out["tuned"] == 0


def test_benchmarks_read_the_training_setting_without_importing_the_entry_point() -> None:
    """utils/malloc.py finds conf/ through utils/config.py, a lower floor: applying training's setting
    outside a run neither imports ``fne_lightning.train`` (the old import cycle) nor Lightning."""
    probe = ("import json, sys; from fne_lightning.utils.malloc import configure_like_training; "
             "applied = configure_like_training('train'); "
             "print(json.dumps([applied, 'fne_lightning.train' in sys.modules, 'lightning' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    applied, imported_train, imported_lightning = json.loads(out.stdout.strip().splitlines()[-1])
    assert applied is GLIBC
    assert not imported_train and not imported_lightning
