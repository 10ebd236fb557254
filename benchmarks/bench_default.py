"""Wall time of the default run (``make train``) by phase: set-up, each epoch's training and
validation, figures, the final test, and the whole run.

Runs ``fne_lightning.train.train`` on the composed default config (``experiment=synthetic`` unless
overridden), exactly as ``python -m fne_lightning.train`` does, with a timing callback added;
the synthetic data cache is filled first and not timed. Prints one JSON object per phase, the
run's test rsum and false-negative rates, and a table.

    python benchmarks/bench_default.py                       # the default experiment
    python benchmarks/bench_default.py loss=vsepp            # any overrides
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fne_lightning.callbacks import RetrievalFigures  # noqa: E402
from fne_lightning.train import train  # noqa: E402
from fne_lightning.utils.config import config_dir  # noqa: E402


class PhaseTimer(L.Callback):
    """Seconds per phase; validation runs inside a training epoch and is taken out of it."""

    def __init__(self, start: float) -> None:
        self.start, self.rows, self._t = start, [], {}

    def _row(self, phase: str, seconds: float, **extra: object) -> None:
        self.rows.append({"phase": phase, "seconds": round(seconds, 2), **extra})

    def on_train_start(self, trainer, module) -> None:
        self._row("set-up (data, model, trainer)", time.perf_counter() - self.start)

    def on_train_epoch_start(self, trainer, module) -> None:
        self._t["epoch"], self._t["val_total"] = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, module) -> None:
        self._t["val"] = time.perf_counter()

    def on_validation_end(self, trainer, module) -> None:
        if trainer.state.fn == "fit":
            self._t["val_total"] += time.perf_counter() - self._t["val"]

    def on_train_epoch_end(self, trainer, module) -> None:
        total = time.perf_counter() - self._t["epoch"]
        epoch = trainer.current_epoch
        kind = "warm-up" if module.in_warmup() else "loss"
        self._row(f"epoch {epoch} train ({kind})", total - self._t["val_total"], epoch=epoch,
                  steps=trainer.num_training_batches)
        self._row(f"epoch {epoch} validation (incl. figures)", self._t["val_total"], epoch=epoch)

    def on_test_start(self, trainer, module) -> None:
        self._t["test"] = time.perf_counter()

    def on_test_end(self, trainer, module) -> None:
        self._row("test (best checkpoint)", time.perf_counter() - self._t["test"])


def timed_figures(timer: PhaseTimer, figures: RetrievalFigures) -> None:
    """Wrap the figures callback's drawing so its time is reported on its own."""
    draw = figures._draw

    def wrapped(*args, **kwargs):
        t = time.perf_counter()
        draw(*args, **kwargs)
        timer.rows.append({"phase": "figures", "seconds": round(time.perf_counter() - t, 2)})

    figures._draw = wrapped


def main() -> None:
    overrides = sys.argv[1:]
    out = Path(tempfile.mkdtemp(prefix="bench_default_"))
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "trainer.enable_progress_bar=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    # Fill the synthetic cache first (rendered once per machine, not part of a run's time).
    from hydra.utils import instantiate

    instantiate(cfg.data, shuffle_seed=0).prepare_data()
    start = time.perf_counter()
    timer = PhaseTimer(start)
    original_init = RetrievalFigures.__init__

    def init_and_time(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        timed_figures(timer, self)

    RetrievalFigures.__init__ = init_and_time
    metrics = train(cfg, callbacks=[timer])
    total = time.perf_counter() - start
    figures = sum(r["seconds"] for r in timer.rows if r["phase"] == "figures")
    rows = [r for r in timer.rows if r["phase"] != "figures"]
    rows.append({"phase": "figures (all epochs, inside validation)", "seconds": round(figures, 2)})
    rows.append({"phase": "whole run", "seconds": round(total, 2)})
    info = {"cores": os.cpu_count(), "threads": torch.get_num_threads(), "overrides": overrides,
            "test_rsum": round(metrics.get("test/rsum", float("nan")), 2),
            "sampled_fn_rate": metrics.get("fne/sampled_fn_rate"), "hardest_fn_rate": metrics.get("fne/hardest_fn_rate")}
    for row in rows:
        print(json.dumps({**row, **info}), flush=True)
    print(f"\n{'phase':<44} {'seconds':>8}")
    for row in rows:
        print(f"{row['phase']:<44} {row['seconds']:>8.2f}")
    print(f"\n{info}")


if __name__ == "__main__":
    main()
