"""Runs that continue where they stopped: ``resume=<run dir>`` into the same directory, CSV file,
W&B run and best score; SLURM's warning signal that checkpoints, requeues (a fake ``scontrol`` on
PATH records it) and a restart that resumes by itself; the SLURM run directory; exact two-process
resume after a real SIGTERM."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import stat
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from fne_lightning.errors import FNEError
from fne_lightning.utils.resume import resume_args, run_name, wandb_run_id

from conftest import TINY_OVERRIDES, compose_config
from helpers import offline_env, run_entry_point
from test_reliability import last_state, run

# 32 images x 5 captions / batch 16: 10 steps per epoch, 3 epochs. Interrupted at step 13 (epoch 1,
# batch 3), so the last epoch's averages (what metrics.json holds) are complete in both runs.
EPOCHS, STOP = 3, 13
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


class SignalAt(L.Callback):
    """Sends this process ``signum`` after step ``step`` (as SLURM does before a time limit)."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class RecordStart(L.Callback):
    """Writes the global step at which training starts (after any resume) to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, *args: object) -> None:
        Path(self.path).write_text(str(trainer.global_step))


class SigtermRankZero(L.Callback):
    """A real SIGTERM to global rank 0 after ``step`` (Lightning forwards it to the ranks it launched)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGTERM)


def with_callback(cfg: DictConfig, name: str, target: str, **kwargs: object) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.callbacks[name] = {"_target_": target, **kwargs}
    return cfg


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def assert_same_metrics(got: Path, want: Path) -> None:
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (got, want))
    assert a.keys() == b.keys()
    assert a["test/rsum"] > 0 and a["val/rsum_best"] > 0 and "fne/sampled_fn_rate" in a
    for key, value in b.items():
        assert a[key] == pytest.approx(value, abs=1e-6), key


@pytest.fixture
def logged(cfg: DictConfig) -> DictConfig:
    """The tiny config with the CSV logger and an offline W&B run."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.logger = OmegaConf.create({
            "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": "${paths.output_dir}",
                    "name": "csv", "version": ""},
            "wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "fne-test",
                      "save_dir": "${paths.output_dir}", "offline": True}})
    return cfg


@pytest.mark.slow
def test_a_run_resumed_in_its_own_directory_ends_as_the_uninterrupted_one(logged: DictConfig,
                                                                           tmp_path: Path) -> None:
    whole, part = tmp_path / "whole", tmp_path / "part"
    run(logged, whole, **{"trainer.max_epochs": EPOCHS})
    with pytest.raises(SystemExit) as stop:
        run(with_callback(logged, "preempt", "test_reliability.Preempt", step=STOP), part,
            **{"trainer.max_epochs": EPOCHS})
    assert stop.value.code == 143 and not (part / "metrics.json").exists()
    first_id = wandb_run_id(part)
    start = tmp_path / "start.txt"
    run(with_callback(logged, "start", f"{__name__}.RecordStart", path=str(start)), part,
        **{"trainer.max_epochs": EPOCHS, "resume": str(part)})  # the same directory
    assert start.read_text() == str(STOP + 1)  # the signal came after step 13: step 14 was in flight

    assert_same_metrics(part, whole)
    assert torch.load(part / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == \
        torch.load(whole / "checkpoints" / "best.ckpt", weights_only=True)["epoch"]
    # One CSV file with every step once, the steps before the stop kept, the same validation rows.
    rows, want = csv_rows(part), csv_rows(whole)
    assert [r["step"] for r in rows] == [r["step"] for r in want]
    assert [r["val/rsum"] for r in rows if r["val/rsum"]] == [r["val/rsum"] for r in want if r["val/rsum"]]
    # The W&B run continues: the resumed run logs under the first one's id.
    runs = sorted(p.name for p in (part / "wandb").glob("offline-run-*"))
    assert first_id and len(runs) == 2 and all(r.endswith(first_id) for r in runs)


def fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``scontrol`` on PATH that records its arguments (as SLURM would requeue the job)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


@pytest.mark.slow
def test_slurm_signal_checkpoints_requeues_and_the_restart_resumes_by_itself(
        cfg: DictConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    whole, job = tmp_path / "whole", tmp_path / "job"
    run(cfg, whole, **{"trainer.max_epochs": EPOCHS})
    calls = fake_scontrol(tmp_path, monkeypatch)
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(SystemExit) as stop:
        run(with_callback(cfg, "signal", f"{__name__}.SignalAt", step=STOP), job, **{"trainer.max_epochs": EPOCHS})
    assert stop.value.code == 0
    assert calls.read_text().split() == ["requeue", "4242"]
    assert f"requeued SLURM job 4242 at step {STOP + 1}" in capsys.readouterr().out  # the batch after the signal
    assert last_state(job)["global_step"] == STOP + 1 and not (job / "metrics.json").exists()
    assert not list(job.glob("hpc_ckpt_*.ckpt"))  # Lightning's own requeue is off

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what SLURM sets in the requeued job
    start = tmp_path / "start.txt"
    # The same command: nothing but SLURM's environment says that this is a restart.
    run(with_callback(cfg, "start", f"{__name__}.RecordStart", path=str(start)), job, **{"trainer.max_epochs": EPOCHS})
    assert start.read_text() == str(STOP + 1)
    assert_same_metrics(job, whole)
    assert calls.read_text().split() == ["requeue", "4242"]  # no second requeue


def test_the_slurm_run_directory_is_the_jobs_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    assert run_name("train")[:2] == "20"  # a timestamp outside SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert run_name("train") == "slurm-77"
    (tmp_path / "outputs" / "train" / "slurm-77").mkdir(parents=True)
    assert run_name("train").startswith("slurm-77_20")  # a second run inside the same job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert run_name("train") == "slurm-77"  # a requeued restart finds its run
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_name("train") == "slurm-70_3"


def test_resume_takes_the_runs_own_overrides_and_its_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "- experiment=synthetic\n- loss.cutdown=0.1\n- trainer.max_epochs=5\n- ckpt_path=/old/last.ckpt\n")
    args = resume_args([f"resume={run_dir}", "trainer.max_epochs=9"])
    assert args == ["experiment=synthetic", "loss.cutdown=0.1", f"resume={run_dir}", "trainer.max_epochs=9",
                    f"hydra.run.dir={run_dir}"]
    assert resume_args(["loss=vsepp"]) == ["loss=vsepp"]


@pytest.mark.parametrize(("args", "message"), [
    (["resume={empty}"], "resume='{empty}': no checkpoints/last.ckpt in it"),
    (["resume={run}", "ckpt_path=x.ckpt"], "resume='{run}' and ckpt_path=...: give one"),
])
def test_bad_resume_is_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    fill = {"run": tmp_path / "run", "empty": tmp_path / "empty"}
    args, message = [a.format(**fill) for a in args], message.format(**fill)
    with pytest.raises(FNEError, match="^" + re.escape(message)):
        resume_args(args)
    proc = run_entry_point("train", *args, cwd=tmp_path, env=offline_env())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr


@pytest.mark.slow
def test_two_process_resume_after_sigterm_equals_the_straight_run(cache_dir: Path, tmp_path: Path) -> None:
    """2 gloo processes, 5 steps per epoch: 12 steps straight against SIGTERM after step 7 (epoch 1,
    batch 2) and ``resume=`` to step 12: weights, momentum encoders, bank, statistics, both ranks'
    sampling streams and the validation metrics agree."""
    common = [o for o in TINY_OVERRIDES if o != "~logger"] + [
        "~logger", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"paths.cache_dir={cache_dir}",
        "test=false", "figures.enabled=false", "trainer.enable_progress_bar=false", "trainer.max_epochs=10",
        "+trainer.max_steps=12", "checkpoint.every_n_steps=100"]
    env = offline_env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = run_entry_point("train", *common, f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    part = tmp_path / "part"
    proc = run_entry_point("train", *common, f"hydra.run.dir={part}", "+callbacks.preempt._target_=test_resume.SigtermRankZero",
                           "+callbacks.preempt.step=7", cwd=tmp_path, env=env)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert last_state(part)["global_step"] == 8  # the batch after the signal
    proc = run_entry_point("train", f"resume={part}", "~callbacks.preempt", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = last_state(tmp_path / "straight"), last_state(part)
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["state_dict"].items():  # encoders, momentum encoders, bank, statistics
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert torch.equal(a["sampler_generator"], b["sampler_generator"])
    want, got = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight", part))
    assert got.keys() == want.keys() and want["val/rsum_best"] > 0
    for key, value in want.items():  # the best validation score and the last epoch's diagnostics
        assert got[key] == pytest.approx(value, abs=1e-6), key


# InfoNCE after the tiny config's VSE warm-up epoch (epoch 0), with its queue of 48 momentum features
# (loss.memory_size=48); with ALBEF's distillation, alpha ramps up over epoch 1, the epoch of the stop.
CONTRASTIVE = {"queue": ["loss=infonce"], "distill": ["loss=infonce", "loss.false_negatives=distill"]}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CONTRASTIVE))
def test_contrastive_run_resumed_after_sigterm_ends_as_the_uninterrupted_one(case: str, cache_dir: Path,
                                                                              tmp_path: Path) -> None:
    """3 epochs straight against a real SIGTERM after step 13 (epoch 1, batch 3) and ``resume=``:
    the same queue (features, ids, pointer), weights, momentum encoders and logit scale, the same
    loss and (``distill``) the same alpha logged at every step, and the same metrics."""
    cfg = compose_config([*TINY_OVERRIDES, *CONTRASTIVE[case]], cache_dir)
    with open_dict(cfg):
        cfg.logger = OmegaConf.create({"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger",
                                               "save_dir": "${paths.output_dir}", "name": "csv", "version": ""}})
    whole, part = tmp_path / "whole", tmp_path / "part"
    run(cfg, whole, **{"trainer.max_epochs": EPOCHS})
    with pytest.raises(SystemExit) as stop:
        run(with_callback(cfg, "preempt", "test_reliability.Preempt", step=STOP), part,
            **{"trainer.max_epochs": EPOCHS})
    assert stop.value.code == 143 and last_state(part)["global_step"] == STOP + 1
    run(cfg, part, **{"trainer.max_epochs": EPOCHS, "resume": str(part)})

    a, b = last_state(whole), last_state(part)
    assert a["global_step"] == b["global_step"] == EPOCHS * 10
    for key, value in a["state_dict"].items():  # encoders (the logit scale too), momentum encoders, queue
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    for key in ("loss.bank.image_ids", "loss.bank.text_ids", "loss.bank.ptr", "loss.bank.filled"):
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert int(a["state_dict"]["loss.bank.filled"]) == 48
    assert float(a["state_dict"]["encoder.model.logit_scale"]) != pytest.approx(math.log(1 / 0.07), abs=1e-6)

    # Every step once in the resumed run's CSV file, with the straight run's loss (and alpha).
    rows, want = csv_rows(part), csv_rows(whole)
    columns = ["train/loss_step"] + (["fne/alpha_step"] if case == "distill" else [])
    steps = lambda rs, col: {r["step"]: float(r[col]) for r in rs if r.get(col)}  # noqa: E731
    for column in columns:
        got, expected = steps(rows, column), steps(want, column)
        # The loss at all 30 steps, alpha at the 20 after the warm-up epoch.
        assert len(expected) == (30 if column == "train/loss_step" else 20) and got.keys() == expected.keys(), column
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, abs=1e-6), (column, step)
    if case == "distill":  # alpha rises from 0 over epoch 1 (steps 10-19), then stays at loss.alpha
        alpha = [v for _, v in sorted(steps(want, "fne/alpha_step").items(), key=lambda kv: int(kv[0]))]
        assert alpha[0] == 0 and all(x < y for x, y in zip(alpha[:9], alpha[1:10], strict=True))
        assert alpha[10:] == pytest.approx([0.4] * 10)

    got, expected = (json.loads((d / "metrics.json").read_text()) for d in (part, whole))
    assert got.keys() == expected.keys() and expected["test/rsum"] > 0 and "train/logit_scale" in expected
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
