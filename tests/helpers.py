"""Shared test helpers: running the real entry points in a subprocess, and small datasets on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, open_dict
from PIL import Image

# Nothing reaches a hub or W&B's servers, and library warnings do not drown the output.
OFFLINE = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}


def offline_env(**extra: str) -> dict[str, str]:
    """The current environment (as monkeypatched) with :data:`OFFLINE` and ``extra`` set."""
    return {**os.environ, **OFFLINE, **extra}


def command(entry: str, *args: str) -> list[str]:
    """``python -m fne_lightning.<entry> args...`` with this interpreter."""
    return [sys.executable, "-m", f"fne_lightning.{entry}", *args]


def run_entry_point(entry: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
                    timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entry point (``train``, ``evaluate``, ``export``) to completion, output captured."""
    return subprocess.run(command(entry, *args), cwd=cwd, env=env or offline_env(), capture_output=True, text=True,
                          timeout=timeout)


def start_entry_point(entry: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start an entry point without waiting (e.g. to signal it), output captured."""
    return subprocess.Popen(command(entry, *args), cwd=cwd, env=env or offline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# Imported once by the fork server of :func:`run_forked`, so that its children start with them.
_FORK_LOCK = threading.Lock()
PRELOAD = ["torch", "lightning", "open_clip", "torchmetrics", "hydra", "fne_lightning.train"]


def _entry_child(entry: str, args: Sequence[str], cwd: str, env: dict[str, str], out: str, err: str,
                 status: str) -> None:
    """In a child of the fork server: ``python -m fne_lightning.<entry> args...`` as ``-m`` runs it,
    with its own working directory, environment and output files. The exit status the interpreter
    would give it (SystemExit's code, 1 for an uncaught exception) is also written to ``status``:
    under load the fork server can fail to report a child's exit code, and the parent then reads
    255 (CPython issue 140867)."""
    import runpy

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        with open(path, "wb") as f:
            os.dup2(f.fileno(), fd)
    module = f"fne_lightning.{entry}"
    sys.argv = [module, *args]
    code = 1  # an uncaught exception: its traceback goes to stderr, as with `python -m`
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
        raise
    finally:
        Path(status).write_text(str(code))


def _running(pid: int | None) -> bool:
    """Whether a process ``pid`` exists (a zombie not yet reaped counts)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else (a reused pid)
        return True
    return True


def run_forked(entry: str, *args: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """:func:`run_entry_point` in a process forked from a server that has imported :data:`PRELOAD`
    once (``multiprocessing``'s forkserver), instead of a new interpreter that imports them again
    (about 8 s of CPU each here). The run is otherwise the same: its own process, working directory,
    environment, stdout, stderr and exit status (SystemExit's code; 1 for an uncaught exception,
    whose traceback goes to stderr; recorded by the child itself, see :func:`_entry_child`). The server starts with the environment of the first call;
    libraries that read the environment when imported see that one, so every call must pass the
    same ``env``."""
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        out, err, status = f"{tmp}/stdout", f"{tmp}/stderr", Path(tmp) / "status"
        with _FORK_LOCK:  # concurrent callers: one at a time changes (and restores) the environment
            saved = dict(os.environ)
            os.environ.update(env)  # the server, if this call starts it, inherits the runs' environment
            try:
                child = ctx.Process(target=_entry_child, args=(entry, args, str(cwd), env, out, err, str(status)))
                child.start()
            finally:
                os.environ.clear()
                os.environ.update(saved)
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(command(entry, *args), timeout)
        read = lambda path: Path(path).read_text(errors="replace") if Path(path).exists() else ""  # noqa: E731
        # The child's own record of its exit status; the fork server's report when there is none
        # (killed by a signal, or died before it could write it). A lost report can also end the
        # join early: then wait for the child itself to be gone (it is the fork server's child,
        # so only its pid can be watched).
        deadline = time.monotonic() + 60
        while not status.is_file() and _running(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        code = int(status.read_text()) if status.is_file() else child.exitcode
        return subprocess.CompletedProcess(command(entry, *args), code, read(out), read(err))


def compose_task(task: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The composed config of entry point ``task`` (``train``, ``evaluate``, ``export``) writing into ``output_dir``."""
    from hydra import compose, initialize_config_dir

    from fne_lightning.utils.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(task, overrides=overrides)
    with open_dict(cfg):
        if "paths" in cfg:
            cfg.paths.output_dir = str(output_dir)
        else:  # export has no paths group
            cfg.paths = {"output_dir": str(output_dir)}
    return cfg


def train_tiny(output_dir: Path, cache_dir: Path, *overrides: str) -> dict[str, float]:
    """Train the shrunk config of ``conftest.TINY_OVERRIDES`` (plus ``overrides``) into ``output_dir``."""
    from fne_lightning.train import train

    from conftest import TINY_OVERRIDES, compose_config

    cfg = compose_config([*TINY_OVERRIDES, *overrides], cache_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return train(cfg)


def write_karpathy(root: Path, splits: Sequence[str], captions: Callable[[int, str], Sequence[str]],
                   image: Callable[[int], Image.Image], *, name: str = "dataset.json", folder: str = "img",
                   ext: str = "jpg", sentence_imgid: bool = False) -> Path:
    """A Karpathy JSON and its image files: image ``i`` is in ``splits[i]``, drawn by ``image(i)``
    into ``root/folder/i.ext``, with the captions ``captions(i, split)``; sentence ids count up
    from 0 over the file (``sentence_imgid``: each sentence also names its image's imgid)."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    images, sentid = [], 0
    for imgid, split in enumerate(splits):
        image(imgid).save(root / folder / f"{imgid}.{ext}")
        sentences = []
        for raw in captions(imgid, split):
            sentences.append({"raw": raw, "sentid": sentid, **({"imgid": imgid} if sentence_imgid else {})})
            sentid += 1
        images.append({"imgid": imgid, "split": split, "filename": f"{imgid}.{ext}", "filepath": folder,
                       "sentences": sentences})
    path = root / name
    path.write_text(json.dumps({"images": images}))
    return path
