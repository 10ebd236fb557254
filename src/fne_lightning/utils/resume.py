"""Runs that continue where they stopped: in their own directory, and by themselves on SLURM.

* ``resume=<run dir>`` (:func:`resume_args`, applied to the command line before Hydra composes):
  the run's own overrides (``<run dir>/.hydra/overrides.yaml``) come first, then the user's, and
  ``hydra.run.dir`` is the run dir, so the resumed training writes into the same ``checkpoints/``,
  CSV file and W&B run, and ``ModelCheckpoint`` (which restores its best score only when its
  directory is unchanged) carries ``best.ckpt`` and ``val/rsum_best`` over.
* Under SLURM the default run directory is ``outputs/<task>/slurm-<job id>`` (:func:`run_name`),
  the same for a job and its requeued restarts; a restarted job (``SLURM_RESTART_COUNT`` >= 1)
  that finds ``checkpoints/last.ckpt`` there resumes from it (:func:`plan_resume`). Sweep jobs of
  ``hydra/launcher=slurm`` keep their sweep directory when submitit requeues them, so the same rule
  applies.
* :class:`~fne_lightning.callbacks.Requeue` turns SLURM's warning signal (``#SBATCH --signal=USR1@120``; submitit sends
  USR2) into: finish the batch in flight, write ``last.ckpt``, ``scontrol requeue`` the job, stop.

Why not Lightning's ``SLURMEnvironment(auto_requeue=True)`` alone: its handler saves
``hpc_ckpt_<n>.ckpt`` from inside the signal handler, i.e. at any point of a training step (after
the bank was written but before the optimizer stepped, say), so the restart is not the exact
continuation that ``last.ckpt`` at a step boundary is; and it does not stop the job, whose
remaining steps are then lost. The trainer is therefore given ``SLURMEnvironment(auto_requeue=False)``
(:func:`slurm_plugins`) and ``Requeue`` does the same requeue at the next step boundary.
Submitit's own handler of USR2 requeues and calls ``sys.exit`` from inside the handler with no
checkpoint; ``Requeue`` replaces it for the training loop.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from fne_lightning.errors import FNEError

log = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.ckpt"
# Overrides of the saved run that the resumed command must not repeat.
_NOT_CARRIED = ("hydra.run.dir", "resume", "ckpt_path")


def slurm_job_id() -> str | None:
    """The SLURM job id: ``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``; None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def restarted() -> bool:
    """Whether this SLURM job is a requeued restart (SLURM counts restarts in ``SLURM_RESTART_COUNT``)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) >= 1


def run_name(task_name: str = "train") -> str:
    """The run directory's name (``conf/hydra/default.yaml``): a timestamp, or ``slurm-<job id>`` under SLURM.

    Under SLURM a requeued job finds its run again by that name. A second run started in the
    same job (not a restart) gets ``slurm-<job id>_<timestamp>`` instead of the first run's
    directory.

    Args:
        task_name: the entry point (``train``, ``evaluate``, ...): runs live in
            ``outputs/<task_name>/``.
    """
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    job = slurm_job_id()
    if job is None:
        return stamp
    name = f"slurm-{job}"
    if not restarted() and (Path("outputs") / task_name / name).exists():
        return f"{name}_{stamp}"
    return name


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def resume_args(args: list[str]) -> list[str]:
    """The command line with ``resume=<run dir>`` expanded, for Hydra to compose.

    The run's own overrides come first, then the user's, then ``hydra.run.dir=<run dir>``
    (see :mod:`fne_lightning.utils.resume`).

    Args:
        args: the command-line overrides.

    Raises:
        FNEError: the directory holds no ``checkpoints/last.ckpt``, or ``ckpt_path`` is given too.
    """
    given = [a.split("=", 1)[1] for a in args if _key(a) == "resume" and "=" in a]
    if not given or given[-1] in ("null", "None", ""):
        return args
    run_dir = Path(os.path.expanduser(given[-1]))
    if not (run_dir / LAST).is_file():
        raise FNEError(f"resume={given[-1]!r}: no {LAST} in it (expected the directory of an earlier run)")
    if any(_key(a) == "ckpt_path" for a in args):
        raise FNEError(f"resume={given[-1]!r} and ckpt_path=...: give one (resume= continues the run in its own "
                       "directory, ckpt_path= starts a new run from the checkpoint)")
    saved: list[str] = []
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        saved = [str(o) for o in (yaml.safe_load(overrides_file.read_text()) or [])]
    keys = {_key(a) for a in args}
    carried = [o for o in saved if _key(o) not in keys and _key(o) not in _NOT_CARRIED]
    return [*carried, *[a for a in args if _key(a) != "hydra.run.dir"], f"hydra.run.dir={run_dir}"]


def plan_resume(cfg: Any) -> tuple[Path | None, str | None]:
    """The checkpoint this run starts from, if any.

    ``resume``, ``ckpt_path``, or a requeued SLURM job's own ``last.ckpt``.

    Args:
        cfg: the composed run config.

    Returns:
        ``(checkpoint, why)``: the file and a line to log (None for ``ckpt_path``), or
        ``(None, None)`` for a fresh run.

    Raises:
        FNEError: ``resume`` names another directory than this run's.
    """
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("resume"):
        run_dir = Path(os.path.expanduser(str(cfg.resume)))
        if run_dir.resolve() != out_dir.resolve():
            raise FNEError(f"resume={str(cfg.resume)!r}: the run directory is {out_dir}; continue a run with "
                           f"python -m fne_lightning.train resume=<its directory> (which sets hydra.run.dir)")
        return out_dir / LAST, f"resuming {out_dir} from {LAST}"
    if cfg.get("ckpt_path"):
        return Path(os.path.expanduser(str(cfg.ckpt_path))).absolute(), None
    if restarted() and (out_dir / LAST).is_file():
        return out_dir / LAST, f"requeued SLURM job {slurm_job_id()}: resuming {out_dir} from {LAST}"
    return None, None


def same_run(cfg: Any, ckpt: Path | None) -> bool:
    """Whether the run continues in the directory its checkpoint belongs to.

    Args:
        cfg: the composed run config.
        ckpt: the checkpoint the run starts from, or None.
    """
    return ckpt is not None and ckpt.resolve() == (Path(cfg.paths.output_dir) / LAST).resolve()


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the W&B run logged into ``run_dir`` (from ``wandb/latest-run``), if any.

    Args:
        run_dir: a run directory.
    """
    latest = run_dir / "wandb" / "latest-run"
    if not latest.exists():
        return None
    found = re.search(r"-([a-z0-9]+)$", os.path.realpath(latest))
    return found.group(1) if found else None


def read_csv_rows(path: Path, before_step: int) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a Lightning ``metrics.csv`` logged before ``before_step``.

    The steps a resumed run repeats are dropped. Lightning's CSV writer deletes an existing file
    when it starts, so a resumed run reads it first and :func:`restore_csv_rows` puts these back.

    Args:
        path: the ``metrics.csv`` file.
        before_step: the global step the run resumes at.

    Returns:
        ``(header, rows)``; empty when there is no file.
    """
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < before_step]
        return list(reader.fieldnames or []), rows


def restore_csv_rows(logger: Any, header: list[str], rows: list[dict[str, str]]) -> None:
    """Write the rows kept by :func:`read_csv_rows` back into a CSVLogger's file, before it logs anything.

    Its writer is told the columns, so it appends to them.

    Args:
        logger: the run's ``CSVLogger``.
        header: the columns read.
        rows: the rows read.
    """
    if not header:
        return
    writer = logger.experiment  # creating the writer deletes the old file
    with open(writer.metrics_file_path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=header)
        out.writeheader()
        out.writerows(rows)
    writer.metrics_keys = sorted(header)


def slurm_plugins() -> list[Any]:
    """The trainer's plugins: ``[SLURMEnvironment(auto_requeue=False)]`` under SLURM, else ``[]``.

    Why not Lightning's auto-requeue: see :mod:`fne_lightning.utils.resume`.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
