"""The Hydra entry point: composition, in-process training runs and the real CLI (subprocess)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from omegaconf import DictConfig, open_dict

from fne_lightning.train import train

from conftest import TINY_OVERRIDES
from helpers import run_entry_point

FNE_KEYS = {"pos_mean", "pos_std", "neg_mean", "neg_std", "flagged_rate", "cutdown_rate", "sampled_sim",
            "hardest_sim", "sampled_fn_rate", "hardest_fn_rate"}


def test_fast_dev_run(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.trainer.fast_dev_run = True
    metrics = train(cfg)
    assert "train/loss" in metrics
    assert (Path(cfg.paths.output_dir) / "metrics.json").is_file()


def test_short_run_learns_and_writes_metrics(cfg: DictConfig) -> None:
    # Three epochs of VSE0 (the warm-up loss) so losses are comparable across epochs.
    with open_dict(cfg):
        cfg.trainer.max_epochs = 3
        cfg.loss.warmup_epochs = 3
        cfg.logger = {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": cfg.paths.output_dir,
                              "name": "csv", "version": ""}}
    metrics = train(cfg)
    rows = list(csv.DictReader(open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")))
    epoch_loss = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(epoch_loss) == 3 and epoch_loss[-1] < 0.8 * epoch_loss[0], epoch_loss
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", "t2i_medr", "rsum"):
        assert f"test/{key}" in written
    # The synthetic benchmark declares extra positives: multi-positive metrics are reported.
    assert {"test/i2t_map_at_r", "test/t2i_rprecision", "test/t2i_any_r1"} <= written.keys()


def test_diagnostics_are_logged_on_logging_steps_and_averaged_over_every_step(cfg: DictConfig) -> None:
    """``fne/<k>_step`` only where the loggers write (every ``log_every_n_steps``), ``fne/<k>_epoch``
    the mean over all steps of the epoch: the same means as a run that logs every step."""
    def run(every: int, *callbacks: L.Callback) -> tuple[list[dict[str, str]], dict[str, float]]:
        out = Path(cfg.paths.output_dir) / f"every{every}-{len(callbacks)}"
        run_cfg = cfg.copy()
        with open_dict(run_cfg):
            run_cfg.paths.output_dir = str(out)
            run_cfg.trainer.log_every_n_steps = every
            run_cfg.logger = {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(out),
                                      "name": "csv", "version": ""}}
        metrics = train(run_cfg, callbacks=list(callbacks))
        return list(csv.DictReader(open(out / "csv" / "metrics.csv"))), metrics

    rows, metrics = run(1)
    rows3, metrics3 = run(3)
    # 160 pairs / 16: 10 steps an epoch, 2 epochs (the first one VSE0 warm-up, the second FNE).
    steps = [r for r in rows if r.get("fne/pos_mean_step")]
    assert len(steps) == 20
    for epoch, key in ((0, "fne/sampled_fn_rate"), (0, "fne/pos_mean"), (1, "fne/sampled_sim"), (1, "fne/fn_base_rate")):
        values = [float(r[f"{key}_step"]) for r in steps if int(r["epoch"]) == epoch]
        epoch_row = next(r for r in rows if r.get(f"{key}_epoch") and int(r["epoch"]) == epoch)
        assert len(values) == 10 and np.std(values) > 0  # the steps differ: a real mean
        assert float(epoch_row[f"{key}_epoch"]) == pytest.approx(np.mean(values))
    logged = [int(r["step"]) for r in rows3 if r.get("fne/pos_mean_step")]
    assert logged == [s for s in range(20) if (s + 1) % 3 == 0]  # Lightning's logging steps
    for key in ("fne/sampled_sim", "fne/fn_base_rate", "fne/pos_mean", "train/loss"):
        assert metrics3[key] == pytest.approx(metrics[key], rel=1e-6), key

    # A callback that stops the run off a logging step (as max_time does) makes Lightning write that
    # step: it carries that step's diagnostics, not those of the last logging step. Monitors see the
    # plain keys (the epoch's means), as self.log(on_step=True, on_epoch=True) left them.
    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step == 5:  # batch 4 of epoch 0 (steps are counted after the update)
                trainer.should_stop = True

        def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            self.keys = set(trainer.callback_metrics)

    stop = StopAt()
    rows_stop, _ = run(3, stop)
    logged = {int(r["step"]): r for r in rows_stop if r.get("fne/pos_mean_step")}
    assert sorted(logged) == [2, 4]
    every_step = {int(r["step"]): r for r in steps}
    for key in ("fne/pos_mean_step", "fne/sampled_fn_rate_step"):
        assert float(logged[4][key]) == pytest.approx(float(every_step[4][key]))
    assert float(every_step[4]["fne/sampled_fn_rate_step"]) != float(every_step[2]["fne/sampled_fn_rate_step"])
    assert {"fne/pos_mean", "fne/pos_mean_epoch"} <= stop.keys


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_entry_point("train", *args, cwd=cwd, timeout=timeout)


def test_cli_trains_fne_logs_every_diagnostic_and_writes_metrics(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if o != "~logger"]
    proc = run_cli(*overrides, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/rsum"] > 0 and (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert "Image-to-text" in proc.stdout and "rsum" in proc.stdout
    # Every fne/ diagnostic reached the logger, and metrics.json has the last epoch's averages.
    header = next(csv.reader(open(run_dir / "csv" / "metrics.csv")))
    assert {f"fne/{k}_step" for k in FNE_KEYS} <= set(header)
    assert {f"fne/{k}" for k in FNE_KEYS} <= metrics.keys()
    # Quiet, single logs: each log line once, no library chatter at INFO (tests/test_recipes.py
    # shows the same lines appear, once, with verbose=true).
    from test_recipes import log_messages

    messages = [msg for _, msg in log_messages(proc.stdout + proc.stderr)]
    assert messages and len(messages) == len(set(messages)), messages
    assert not any("Tip" in m or "tokenizer" in m or "GPU available" in m for m in messages)


def test_help_and_cfg_job(tmp_path: Path) -> None:
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "experiment" in proc.stdout
    proc = run_cli("--cfg", "job", "loss.cutdown=0.3", cwd=tmp_path)
    assert proc.returncode == 0 and "cutdown: 0.3" in proc.stdout
