"""Common Lightning knobs with every loss: partial validation, mid-epoch validation, gradient
accumulation (the bank and the statistics see every micro-batch, the EMA follows the optimizer),
and the refusal of a local multirun sweep of DDP runs."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
from omegaconf import DictConfig, open_dict

import fne_lightning.module as module_file
from fne_lightning.train import build, train

from conftest import TINY_OVERRIDES, compose_config
from helpers import run_entry_point

LOSSES = {"fne": [], "vsepp": ["loss=vsepp"], "vse0": ["loss=vse0"]}
STEPS_PER_EPOCH = 10  # 32 images x 5 captions / batch 16


def tiny(loss: str, cache_dir: Path, out: Path, *overrides: str) -> DictConfig:
    base = TINY_OVERRIDES if loss == "fne" else [o for o in TINY_OVERRIDES if not o.startswith("loss.")]
    cfg = compose_config([*base, *LOSSES[loss], "loss.warmup_epochs=0", "figures.enabled=false",
                          "trainer.enable_progress_bar=false", *overrides], cache_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.logger = {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(out),
                              "name": "csv", "version": ""}}
    return cfg


def val_rows(out: Path) -> list[dict[str, str]]:
    return [r for r in csv.DictReader(open(out / "csv" / "metrics.csv")) if r.get("val/rsum")]


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_partial_validation_scores_the_part_seen(loss: str, cache_dir: Path, tmp_path: Path) -> None:
    cfg = tiny(loss, cache_dir, tmp_path, "+trainer.limit_val_batches=0.5", "data.eval_batch_size=4")
    metrics = train(cfg)
    # The checkpoint monitor found val/rsum; the test (whole split) is unaffected.
    assert metrics["val/rsum_best"] > 0 and (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert metrics["test/rsum"] > 0 and len(val_rows(tmp_path)) == cfg.trainer.max_epochs


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_mid_epoch_validation(loss: str, cache_dir: Path, tmp_path: Path) -> None:
    metrics = train(tiny(loss, cache_dir, tmp_path, "+trainer.val_check_interval=0.5"))
    rows = val_rows(tmp_path)
    assert len(rows) == 4  # twice in each of 2 epochs
    assert sorted(int(r["step"]) for r in rows) == [4, 9, 14, 19]  # after 5 and 10 batches of each epoch
    assert metrics["val/rsum_best"] == pytest.approx(max(float(r["val/rsum"]) for r in rows))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_accumulation_steps_the_ema_per_optimizer_step_and_fills_the_bank_per_batch(
        loss: str, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(loss, cache_dir, tmp_path)
    ema_calls: list[int] = []
    real_ema = module_file.ema_update
    monkeypatch.setattr(module_file, "ema_update", lambda *a: (ema_calls.append(1), real_ema(*a)))
    L.seed_everything(0)
    module, datamodule = build(cfg)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == STEPS_PER_EPOCH // 2
    if loss == "fne":
        assert len(ema_calls) == STEPS_PER_EPOCH // 2  # one EMA update per optimizer step
        bank = module.loss.bank
        assert int(bank.ptr) == STEPS_PER_EPOCH * cfg.data.batch_size % bank.size  # every micro-batch enqueued
        assert int(module.loss.stats.pos_count) > 0
    else:
        assert module.momentum_encoder is None and not ema_calls


def test_a_local_sweep_of_ddp_runs_is_refused_at_once(tmp_path: Path) -> None:
    proc = run_entry_point("train", "-m", "trainer=ddp", "trainer.devices=2", "loss.cutdown=0.1,0.2",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "hydra/launcher=slurm" in errors[0] and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("metrics.json"))
