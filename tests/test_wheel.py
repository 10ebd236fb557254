"""The package as a user installs it: a wheel built from the tree, installed into a fresh virtual
environment outside the repository, whose console scripts train, evaluate and export from a
working directory that is not the repository.

The dependencies (torch etc., several GB) cannot be installed again in a test: the new
environment sees this interpreter's site-packages through a ``.pth`` line, and only the wheel is
installed into it (``--no-deps``). A directory added by a ``.pth`` line gets no ``.pth`` processing
of its own, so the editable install of this environment (a ``.pth`` naming the repository's
``src/``) does not leak into it; the tests check that, and that the configs are the packaged ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES
from helpers import offline_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["fne-train", "fne-evaluate", "fne-export", "fne-make-shards", "fne-convert-positives"]
# Seconds each step took (printed at the end of the module, shown with -s or -rA).
TIMES: dict[str, float] = {}


def run(cmd: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300,
        step: str | None = None) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if step:
        TIMES[step] = time.monotonic() - start
    return proc


def outside_env(venv: Path) -> dict[str, str]:
    """:func:`helpers.offline_env` as if ``venv`` were activated, with nothing of the repository on
    the import path (no ``PYTHONPATH``)."""
    env = offline_env(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    for key in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the tree: without build isolation when hatchling is importable here (no index
    needed), else with it (pip fetches hatchling from the index, a few seconds)."""
    out = tmp_path_factory.mktemp("dist")
    isolated = importlib.util.find_spec("hatchling") is None
    cmd = [sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "-w", out]
    proc = run(cmd if isolated else [*cmd, "--no-build-isolation"], cwd=out, step="build wheel")
    if proc.returncode != 0 and isolated and "installing build dependencies" in proc.stdout + proc.stderr:
        pytest.skip(f"hatchling is not installed and pip could not fetch it: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = out.glob("fne_lightning-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment outside the repository with the wheel installed, seeing this
    interpreter's site-packages (the dependencies) through a ``.pth`` file."""
    root = tmp_path_factory.mktemp("venv") / "env"
    assert not root.is_relative_to(REPO)
    start = time.monotonic()
    # No pip of its own: this environment's pip is importable there through the .pth file.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root], check=True)
    python = root / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "_fne_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    proc = run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=root.parent,
               env=outside_env(root))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    TIMES["create venv, install wheel"] = time.monotonic() - start
    return root


def test_wheel_contents(wheel: Path) -> None:
    """The configs, the open_clip model configs and the console scripts are in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    confs = {f"fne_lightning/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert "fne_lightning/conf/train.yaml" in confs and len(confs) > 20
    assert confs <= names, sorted(confs - names)
    models = REPO / "src" / "fne_lightning" / "models" / "model_configs"
    jsons = {f"fne_lightning/models/model_configs/{p.name}" for p in models.glob("*.json")}
    assert jsons and jsons <= names, sorted(jsons - names)
    sources = {f"fne_lightning/{p.relative_to(REPO / 'src' / 'fne_lightning').as_posix()}"
               for p in (REPO / "src" / "fne_lightning").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[console_scripts]" in text
    for script in SCRIPTS:
        assert f"{script} = fne_lightning." in text


def test_installed_package_is_the_wheel(venv: Path, tmp_path: Path) -> None:
    """In the new environment, fne_lightning, its metadata and its configs are the installed ones
    (not the repository's), the console scripts exist, and pip check finds the wheel's
    requirements met by the dependencies it sees."""
    env = outside_env(venv)
    probe = (
        "import importlib.metadata as md, json, sys, fne_lightning\n"
        "from fne_lightning.utils.config import config_dir\n"
        "dist = md.distribution('fne-lightning')\n"
        "print(json.dumps({'file': fne_lightning.__file__, 'conf': config_dir(), 'path': sys.path,\n"
        "                  'dist': str(dist.locate_file('')),\n"
        "                  'scripts': sorted(e.name for e in dist.entry_points if e.group == 'console_scripts')}))\n"
    )
    proc = run([venv / "bin" / "python", "-c", probe], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    site = Path(found["file"]).resolve().parents[1]
    assert site.is_relative_to(venv.resolve()) and Path(found["file"]) == site / "fne_lightning" / "__init__.py"
    assert Path(found["conf"]) == site / "fne_lightning" / "conf"
    assert (Path(found["conf"]) / "train.yaml").is_file()
    assert str(REPO / "src") not in found["path"], found["path"]
    assert Path(found["dist"]).resolve() == site
    assert found["scripts"] == sorted(SCRIPTS)
    assert all((venv / "bin" / s).is_file() for s in SCRIPTS)
    # The two scripts the end-to-end test below does not run start and find their arguments.
    proc = run(["fne-make-shards", "--cfg", "job", "split=test", "out_dir=shards"], cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "out_dir: shards" in proc.stdout, proc.stderr[-3000:]
    proc = run(["fne-convert-positives", "--help"], cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "--karpathy" in proc.stdout, proc.stderr[-3000:]

    # pip check reads what the new environment sees: its own fne-lightning (first on sys.path)
    # and the dependencies of this one. Other packages' problems are not this test's business.
    proc = run([venv / "bin" / "python", "-m", "pip", "check"], cwd=tmp_path, env=env, step="pip check")
    print(f"pip check (rc {proc.returncode}): {proc.stdout.strip()} {proc.stderr.strip()}")
    assert "fne-lightning" not in (proc.stdout + proc.stderr).lower().replace("_", "-"), proc.stdout

    # Configs of one's own beside the packaged ones: the example of docs/guides/install.md.
    (mine,) = re.findall(r"^```yaml\n(.*?)^```", (REPO / "docs" / "guides" / "install.md").read_text(), re.S | re.M)
    exp = tmp_path / "my_conf" / "experiment"
    exp.mkdir(parents=True)
    (exp / "mine.yaml").write_text(mine)
    proc = run(["fne-train", "experiment=mine", "hydra.searchpath=[file://my_conf]", "--cfg", "job"],
               cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_epochs: 8" in proc.stdout and "fne_lightning.losses.VSELoss" in proc.stdout


def test_console_scripts_outside_the_repository(venv: Path, tmp_path: Path) -> None:
    """fne-train (the default experiment, shrunk), fne-evaluate of its best checkpoint (the test
    scores training reported) and fne-export, from a working directory outside the repository."""
    env, cwd, run_dir = outside_env(venv), tmp_path / "work", tmp_path / "run"
    cwd.mkdir()
    cache = f"paths.cache_dir={tmp_path / 'cache'}"

    proc = run(["fne-train", *TINY_OVERRIDES, "trainer.max_epochs=1", cache, f"hydra.run.dir={run_dir}"],
               cwd=cwd, env=env, step="fne-train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    assert ckpt.is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    trained = json.loads((run_dir / "metrics.json").read_text())
    hydra_cfg = (run_dir / ".hydra" / "hydra.yaml").read_text()
    assert f"path: {venv.resolve()}" in hydra_cfg and f"path: {REPO}" not in hydra_cfg  # packaged conf/

    proc = run(["fne-evaluate", f"ckpt_path={ckpt}", cache, f"hydra.run.dir={tmp_path / 'eval'}"],
               cwd=cwd, env=env, step="fne-evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    shared = {k for k in trained.keys() & evaluated.keys() if k.startswith("test/")}
    assert "test/rsum" in shared
    assert {k: evaluated[k] for k in shared} == pytest.approx({k: trained[k] for k in shared}, abs=1e-4)

    export = tmp_path / "export"
    proc = run(["fne-export", f"ckpt_path={ckpt}", f"out_dir={export}", f"hydra.run.dir={tmp_path / 'export_run'}"],
               cwd=cwd, env=env, step="fne-export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (export / "open_clip_config.json").is_file() and (export / "open_clip_model.safetensors").is_file()
    assert "model_cfg" in json.loads((export / "open_clip_config.json").read_text())
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))
