"""Where the time of one training step goes: a ``torch.profiler`` table of one FNE step and of
one VSE0 warm-up step of the default recipe's shape (tiny model, batch 128, bank 1,024).

Runs the real `RetrievalModule` in a real Lightning `Trainer` on random inputs, profiles one step
(forward, loss, backward, optimizer step, EMA) after a few unprofiled ones, and prints one JSON
object per (phase, operator) for the top operators by self CPU time, then the tables.

    python benchmarks/profile_step.py                 # both phases, top 12 operators
    python benchmarks/profile_step.py --batch 32 --bank 8224
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import RandomPairs  # noqa: E402

from fne_lightning.losses import FNELoss  # noqa: E402
from fne_lightning.models.encoders import DualEncoder  # noqa: E402
from fne_lightning.module import RetrievalModule  # noqa: E402


class ProfileOneStep(L.Callback):
    """Profiles batch ``at`` (forward through EMA update) and keeps the profiler's averages."""

    def __init__(self, at: int) -> None:
        self.at, self.prof, self.averages, self.wall_ms, self._start = at, None, None, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False)
            self.prof.__enter__()
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.at and self.prof is not None:
            self.wall_ms = 1e3 * (time.perf_counter() - self._start)
            self.prof.__exit__(None, None, None)
            self.averages = self.prof.key_averages()


def profile_phase(args: argparse.Namespace, warmup: bool) -> tuple[float, float, list[dict[str, object]]]:
    torch.manual_seed(0)
    encoder = DualEncoder("fne-tiny")
    # warmup_epochs=1 keeps the whole (one-epoch) run in the VSE0 warm-up; 0 runs FNE itself.
    loss = FNELoss(embed_dim=encoder.embed_dim, memory_size=args.bank, warmup_epochs=int(warmup),
                   warmup_loss="vse0", min_pos_samples=8)
    module = RetrievalModule(encoder, loss, optimizer=partial(torch.optim.Adam, lr=5e-4, fused=True), momentum=0.9)
    size, context = encoder.image_config.size, int(encoder.tokenizer(["x"]).shape[-1])
    data = RandomPairs(args.batch * (args.at + 1), size, context, vocab=1000)
    timer = ProfileOneStep(args.at)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.at + 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=args.batch, drop_last=True))
    events = sorted(timer.averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in timer.averages)
    phase = "vse0_warmup" if warmup else "fne"
    rows = [{"phase": phase, "op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
             "share_pct": round(100 * e.self_cpu_time_total / total_us, 1), "calls": e.count}
            for e in events[:args.top]]
    return timer.wall_ms, total_us / 1e3, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bank", type=int, default=1024)
    parser.add_argument("--at", type=int, default=12, help="index of the profiled step (earlier ones warm up)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    tables = []
    for warmup in (False, True):
        wall_ms, total_ms, rows = profile_phase(args, warmup)
        for row in rows:
            print(json.dumps({**row, "step_wall_ms": round(wall_ms, 2), "ops_self_cpu_ms": round(total_ms, 2)}),
                  flush=True)
        tables.append((rows[0]["phase"], wall_ms, total_ms, rows))
    for phase, wall_ms, total_ms, rows in tables:
        # Wall time not spent inside any operator: Python, Lightning's loop and hooks, the profiler.
        print(f"\n{phase}: step {wall_ms:.1f} ms wall, {total_ms:.1f} ms in operators, "
              f"{wall_ms - total_ms:.1f} ms outside them (Python, Lightning; batch {args.batch}, bank {args.bank}, "
              f"{torch.get_num_threads()} threads)")
        print(f"{'operator':<40} {'self ms':>9} {'share %':>8} {'calls':>6}")
        for r in rows:
            print(f"{str(r['op'])[:40]:<40} {r['self_cpu_ms']:>9.2f} {r['share_pct']:>8.1f} {r['calls']:>6}")


if __name__ == "__main__":
    main()
