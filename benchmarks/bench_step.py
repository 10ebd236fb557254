"""Training throughput and peak memory of one training step: FNE vs VSE++ (FNE_SPEC sections 1-7).

Runs the real `RetrievalModule` in a real Lightning `Trainer` on random images and captions
(random init, no data or weights needed) and times the steps after a warm-up:

* ``vsepp``          VSE++ on in-batch online features (no momentum encoders);
* ``momentum_only``  VSE++ plus the momentum encoders' forward pass and EMA update (what FNE
                     needs before any of its own work);
* ``hardest_bank``   that plus the memory bank: VSE++ over the batch's and the bank's momentum
                     candidates (``FNELoss(selection="hardest")``: the two anchor-bank products,
                     the statistics, the hardest search and the enqueue, none of FNE's weighting
                     or sampling), the cost of any method that scores a bank of this size;
* ``fne``            the full FNE step: momentum forward, statistics, bank, weights, sampling,
                     diagnostics.

FNE's own overhead is ``(fne - momentum_only) / fne`` of the step time (target: <= 5% on a
GPU with the paper's model shape). Each row's ``over_vsepp`` is its step over the VSE++ step of the
same round (median over the rounds). Prints one JSON object per (loss, precision) and a table.

    python benchmarks/bench_step.py                     # GPU: f30k_vse shape, fp32 and bf16-mixed
    python benchmarks/bench_step.py --device cpu        # CPU: the tiny model (keeps the script alive)

The paper's shape is ViT-B/16 at 384 px plus BERT-base (`fne-vit-b16-384-bert`), which needs
`transformers` and the bert-base-uncased config; without them the script uses open_clip's
ViT-B-16 at 384 px with a 12-layer, 768-wide text transformer (the same compute shape) and
says so in its output.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fne_lightning.losses import FNELoss, VSELoss  # noqa: E402
from fne_lightning.models.encoders import DualEncoder  # noqa: E402
from fne_lightning.module import RetrievalModule  # noqa: E402
from fne_lightning.utils.malloc import configure_like_training  # noqa: E402


class MomentumOnly(VSELoss):
    """VSE++ that also runs the momentum encoders: the baseline FNE's own overhead is measured against."""

    requires_momentum = True


class RandomPairs(Dataset):
    def __init__(self, n: int, size: int, context: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.tokens = torch.randint(1, vocab, (n, context), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.tokens[i], i, i


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync(module)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


def encoder_for(args: argparse.Namespace) -> tuple[DualEncoder, str]:
    if args.model != "auto":
        return DualEncoder(args.model), args.model
    if args.device == "cpu":
        return DualEncoder("fne-tiny"), "fne-tiny"
    if importlib.util.find_spec("transformers") is not None:
        try:
            return DualEncoder("fne-vit-b16-384-bert"), "fne-vit-b16-384-bert"
        except Exception as err:  # bert config not reachable offline
            print(f"# fne-vit-b16-384-bert unavailable ({err}); using the open_clip equivalent", file=sys.stderr)
    return DualEncoder("ViT-B-16", image_size=384), "ViT-B-16@384 (BERT-base-sized text tower stand-in)"


def run(args: argparse.Namespace, loss_name: str, precision: str) -> dict[str, object]:
    torch.manual_seed(0)
    encoder, model_name = encoder_for(args)
    dim = encoder.embed_dim
    if loss_name == "fne":
        loss = FNELoss(embed_dim=dim, memory_size=args.bank, warmup_epochs=0)
    elif loss_name == "hardest_bank":
        loss = FNELoss(embed_dim=dim, memory_size=args.bank, warmup_epochs=0, selection="hardest")
    elif loss_name == "momentum_only":
        loss = MomentumOnly()
    else:
        loss = VSELoss()
    module = RetrievalModule(encoder, loss, optimizer=partial(torch.optim.Adam, lr=2e-5, fused=True))
    size = encoder.image_config.size
    context = int(encoder.tokenizer(["x"]).shape[-1])
    data = RandomPairs(args.batch * (args.steps + args.warmup), size, context, vocab=1000)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=precision, max_steps=args.steps + args.warmup,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=args.batch, drop_last=True))
    step = sorted(timer.times)[len(timer.times) // 2]  # median
    return {
        "loss": loss_name, "precision": precision, "device": args.device, "model": model_name,
        "batch": args.batch, "bank": args.bank if loss_name in ("fne", "hardest_bank") else 0,
        "step_ms": round(1e3 * step, 2), "samples_per_s": round(args.batch / step, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="auto")
    parser.add_argument("--batch", type=int, default=32, help="per step (the paper's is 32)")
    parser.add_argument("--bank", type=int, default=8224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precisions", default=None, help="default: 32-true,bf16-mixed on cuda; 32-true on cpu")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the three losses, interleaved; each loss's step time is the median over "
                             "the rounds (a shared CPU's load drifts: one round of each is noisy)")
    parser.add_argument("--malloc", default="train", choices=["train", "glibc"],
                        help="glibc's allocator thresholds as training sets them (conf/train.yaml `malloc`), "
                             "or glibc's defaults")
    args = parser.parse_args()
    configure_like_training(args.malloc)
    precisions = (args.precisions or ("32-true,bf16-mixed" if args.device == "cuda" else "32-true")).split(",")
    names = ("vsepp", "momentum_only", "hardest_bank", "fne")
    rows = []
    for precision in precisions:
        rounds = [{name: run(args, name, precision) for name in names} for _ in range(args.repeats)]
        by_loss = {}
        for name in names:
            times = sorted(r[name]["step_ms"] for r in rounds)
            by_loss[name] = {**rounds[0][name], "step_ms": times[len(times) // 2],
                             "samples_per_s": round(args.batch / times[len(times) // 2] * 1e3, 1),
                             "step_ms_rounds": [r[name]["step_ms"] for r in rounds]}
        overhead = 100 * (by_loss["fne"]["step_ms"] - by_loss["momentum_only"]["step_ms"]) / by_loss["fne"]["step_ms"]
        # Per round, so that the load one round ran under cancels out of the ratio.
        ratios = {name: sorted(r[name]["step_ms"] / r["vsepp"]["step_ms"] for r in rounds) for name in names}
        for name, row in by_loss.items():
            row["over_vsepp"] = round(ratios[name][len(rounds) // 2], 2)
            row["fne_overhead_pct"] = round(overhead, 1)
            row["fne_over_vsepp"] = round(ratios["fne"][len(rounds) // 2], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'precision':>11} {'loss':>14} {'step ms':>9} {'samples/s':>10} {'peak GB':>8} {'FNE overhead %':>15} "
          f"{'/ vsepp':>8} {'fne / vsepp':>12}")
    for r in rows:
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        print(f"{r['precision']:>11} {r['loss']:>14} {r['step_ms']:>9.2f} {r['samples_per_s']:>10.1f} "
              f"{mem:>8} {r['fne_overhead_pct']:>15.1f} {r['over_vsepp']:>8.2f} {r['fne_over_vsepp']:>12.2f}")
    print(f"\nmodel: {rows[0]['model']}, batch {rows[0]['batch']}, bank {args.bank}, device {args.device}")


if __name__ == "__main__":
    main()
