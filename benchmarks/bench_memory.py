"""Memory over a long run: host RSS and GPU memory per epoch must stay flat (no leak).

The published FNE code keeps autograd graphs in its running statistics, so memory grows every
step. This trains the synthetic experiment (FNE from the first epoch after a 1-epoch warm-up,
by default) through the real module and Trainer and records, at every epoch end after garbage
collection, the process's resident memory and, on a GPU, the allocated and peak memory.
Prints one JSON object per epoch, a table, and a summary with the growth from the second
epoch (the first one allocates caches) to the last.

    python benchmarks/bench_memory.py                       # 20 epochs, CPU or GPU
    python benchmarks/bench_memory.py --epochs 3 data.num_train=200   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import lightning as L
import psutil
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fne_lightning.train import build  # noqa: E402
from fne_lightning.utils.config import config_dir  # noqa: E402


class MemoryLog(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.process = psutil.Process()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        gc.collect()
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step,
               "rss_mb": round(self.process.memory_info().rss / 2**20, 1)}
        if module.device.type == "cuda":
            row["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
            row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            torch.cuda.reset_peak_memory_stats()
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=["loss.warmup_epochs=1", f"trainer.max_epochs={args.epochs}",
                                              "~logger", *args.overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = out
            cfg.figures.enabled = False
        L.seed_everything(int(cfg.seed))
        module, datamodule = build(cfg)
        log = MemoryLog()
        trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=args.epochs, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, callbacks=[log])
        trainer.fit(module, datamodule=datamodule)
    rows = log.rows
    print(f"\n{'epoch':>5} {'step':>6} {'RSS MB':>8}" + (f" {'CUDA MB':>8} {'peak MB':>8}" if "cuda_peak_mb" in rows[0] else ""))
    for r in rows:
        cuda = f" {r['cuda_allocated_mb']:>8.1f} {r['cuda_peak_mb']:>8.1f}" if "cuda_peak_mb" in r else ""
        print(f"{r['epoch']:>5} {r['step']:>6} {r['rss_mb']:>8.1f}{cuda}")
    ref = rows[1] if len(rows) > 1 else rows[0]
    summary = {"epochs": len(rows), "device": str(module.device), "rss_growth_mb": round(rows[-1]["rss_mb"] - ref["rss_mb"], 1)}
    if "cuda_allocated_mb" in ref:
        summary["cuda_growth_mb"] = round(rows[-1]["cuda_allocated_mb"] - ref["cuda_allocated_mb"], 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
