"""Exact resume, preemption, atomic checkpoints and non-finite steps, with real training runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from fne_lightning.errors import FNEError
from fne_lightning.train import train

from conftest import TINY_OVERRIDES
from helpers import start_entry_point

# 32 images x 5 captions / batch 16 = 10 steps per epoch; 26 steps end mid-epoch 2 and the
# interrupted run stops at step 13, mid-epoch 1 (batch 3): the hard case for a resume. With two
# warm-up epochs it stops where the lazy momentum forward is skipped (all but the last 3 warm-up
# steps), so the resumed run must find its place in the warm-up again.
STEPS, HALF = 26, 13
WARMUP = {"loss.warmup_epochs": 2}


def run(cfg: DictConfig, out: Path, **overrides: object) -> dict[str, float]:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.trainer.max_epochs = 10
        cfg.trainer.enable_progress_bar = False
        cfg.figures.enabled = False
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, force_add=True)
    out.mkdir(parents=True, exist_ok=True)
    return train(cfg)


def last_state(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


class Preempt(L.Callback):
    """Sends this process a real SIGTERM after a given step, as SLURM does before preemption."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_resume_mid_epoch_is_exact(cfg: DictConfig, tmp_path: Path) -> None:
    whole = run(cfg, tmp_path / "whole", **{"trainer.max_steps": STEPS, **WARMUP})
    preempted = cfg.copy()
    with open_dict(preempted):
        preempted.callbacks.preempt = {"_target_": f"{__name__}.Preempt", "step": HALF}
    with pytest.raises(SystemExit) as stop:
        run(preempted, tmp_path / "first", **{"trainer.max_steps": STEPS, **WARMUP})
    assert stop.value.code == 143
    first = last_state(tmp_path / "first")
    # The signal arrives after step 13's hooks ran: the batch after it is the one in flight.
    assert first["global_step"] == HALF + 1 and first["epoch"] == 1
    resumed = run(cfg, tmp_path / "resumed", **{"trainer.max_steps": STEPS, **WARMUP,
                                                "ckpt_path": str(tmp_path / "first" / "checkpoints" / "last.ckpt")})

    a, b = last_state(tmp_path / "whole"), last_state(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == STEPS
    for key, value in a["state_dict"].items():  # encoders, momentum encoders, bank, statistics
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    for key in ("loss.bank.filled", "loss.bank.ptr", "loss.bank.image_ids", "loss.stats.pos_count"):
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert torch.equal(a["sampler_generator"], b["sampler_generator"])
    assert b["state_dict"]["loss.stats.pos_count"] > 0  # not reset by the resume mid-epoch
    for key, value in whole.items():
        if key.startswith(("test/", "val/")):
            assert resumed[key] == pytest.approx(value, abs=1e-6), key


class PoisonBatch(L.Callback):
    """Fills one training batch with NaN (as a corrupt input or a diverged step would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


def with_poison(cfg: DictConfig, step: int) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.callbacks.poison = {"_target_": f"{__name__}.PoisonBatch", "step": step}
        cfg.checkpoint.every_n_steps = 4
    return cfg


def test_nonfinite_stops_naming_the_step_and_keeps_the_last_good_checkpoint(cfg: DictConfig, tmp_path: Path) -> None:
    with pytest.raises(FNEError, match=r"non-finite features at step 6 \(epoch 0, batch 6\)"):
        run(with_poison(cfg, step=6), tmp_path, **{"trainer.max_steps": 12})
    last = last_state(tmp_path)
    assert last["global_step"] == 4  # the checkpoint before the bad step, untouched by the failure
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nonfinite_skip_drops_the_batch_before_it_reaches_bank_or_weights(cfg: DictConfig, tmp_path: Path) -> None:
    metrics = run(with_poison(cfg, step=6), tmp_path, **{"trainer.max_steps": 12, "nonfinite": "skip"})
    assert metrics["train/skipped_batches"] == 1 and metrics["test/rsum"] > 0
    state = last_state(tmp_path)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return start_entry_point("train", *args, cwd=cwd)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_sigterm_stops_with_a_checkpoint_and_the_run_resumes_to_the_end(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = [*TINY_OVERRIDES, f"paths.cache_dir={cache_dir}", "trainer.max_epochs=4", "checkpoint.every_n_steps=3",
              "trainer.enable_progress_bar=false", "figures.enabled=false"]
    proc = cli(*common, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for(run_dir / "checkpoints" / "last.ckpt", proc)  # training is under way
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM at step" in out and "Traceback" not in err
    stopped = last_state(run_dir)
    assert 3 <= stopped["global_step"] < 40
    assert not (run_dir / "metrics.json").exists()

    resumed_dir = tmp_path / "resumed"
    proc = cli(*common, f"hydra.run.dir={resumed_dir}", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
               cwd=tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert last_state(resumed_dir)["global_step"] == 40  # 4 epochs of 10 steps
    assert json.loads((resumed_dir / "metrics.json").read_text())["test/rsum"] > 0


def test_a_crash_while_writing_never_leaves_a_broken_last_checkpoint(cache_dir: Path, tmp_path: Path) -> None:
    # last.ckpt is rewritten after every step; SIGKILL (no handler can run) lands at random
    # moments, often during a write. Whatever is on disk afterwards must load.
    run_dir = tmp_path / "run"
    for delay in (0.3, 1.1, 2.3):
        proc = cli(*TINY_OVERRIDES, f"paths.cache_dir={cache_dir}", "trainer.max_epochs=50",
                   "checkpoint.every_n_steps=1", "trainer.enable_progress_bar=false", "figures.enabled=false",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
        wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        ckpt = last_state(run_dir)
        assert ckpt["global_step"] >= 1 and "loss.bank.image_features" in ckpt["state_dict"]
