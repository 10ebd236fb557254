"""Cost of FNE negative selection against the hardest negative, per training step.

FNE (Li et al., ACM MM 2023, arXiv 2308.04380; FNE_SPEC sections 3, 5-7) samples each
anchor's negative from batch + bank candidates with weights from hardness, the
false-negative posterior and the cut-down. The published implementation loops over
anchors with `.item()` (~50x and ~240x the hardest-negative step at the two sizes
below); ours is whole-tensor (`fne_lightning.fne.negatives`).

Both paths run the project's own loss, `FNELoss`, for one step, forward AND backward
(anchors require grad), both directions (i2t, t2i), over the same candidates:
``fne`` is ``selection="sample"`` (posterior weights, cut-down, inverse-CDF sampling),
``hardest`` is ``selection="hardest"`` (the hardest valid negative over batch + bank,
i.e. VSE++ over the bank). Each step also updates the similarity statistics, enqueues
the batch and computes the diagnostics, alike in both paths:

- scores: online anchors (B, D) vs [B momentum features; K bank slots] -> (B, B + K),
  computed without autograd; only the B chosen negatives are re-scored with gradient,
- valid: candidate image id != anchor image id, and the bank slot was written,
- hinge ``relu(margin + s_neg - s_pos)`` masked by has_negative, mean.

Inputs are ready: random unit features with planted structure (matched pairs ~0.6,
others ~0.1), a full bank, and Gaussians set to pos N(0.6, 0.1^2), neg N(0.1, 0.1^2).

    python benchmarks/bench_fne.py                       # both paper sizes, CPU (+ cuda)
    python benchmarks/bench_fne.py --sizes 32,1024,64    # smoke run
    python benchmarks/bench_fne.py --sizes 128,1024,128 --positives 40   # the default run's step

``--positives R`` declares known positives as the synthetic benchmark does (5 captions per image,
each matching its own image and R random others: with 40, about 1% of the candidates, and a
packed table of 4,608 x 23,040 pairs at the default recipe's size, as there: 4,000 x 20,000), so
both paths also compute the diagnostics against them (FN rates, base rate, AUCs, flagged
precision). Meant for small sizes: the table grows with the square of B + K.

Prints one JSON object per size and device, then a table. Times are the best and the
median of ``--repeats`` runs after ``--warmup`` runs, alternating the two paths so that
background load hits both alike; ``ratio`` = fne_ms / hardest_ms (best).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fne_lightning.fne.bank import MemoryBank
from fne_lightning.fne.stats import SimilarityStats
from fne_lightning.losses import FNELoss
from fne_lightning.utils.malloc import configure_like_training

PAPER_SIZES = "32,8224,768;128,65536,768"
# The options beyond the published rule (README, "Beyond the published rule"), each timed against
# the same hardest-negative step with --variants.
VARIANTS = {
    "estimated_prior": {"weighting": "complement", "prior": "estimated"},
    "exclude": {"exclude": 0.5},
    "online_batch": {"online_batch": True},
}


def _features(ids: Tensor, parts: dict[str, Tensor], gen: torch.Generator) -> Tensor:
    # A shared direction (cos 0.1 between any two features), a per-image part (0.5) and
    # noise (0.4). Image parts and noise live in few dimensions so that scores spread
    # like a trained model's: other images ~0.1 +- 0.2, same image ~0.6 +- 0.15.
    noise = torch.randn(ids.shape[0], parts["rank"], generator=gen, device=parts["common"].device)
    x = (
        0.1**0.5 * parts["common"]
        + 0.5**0.5 * parts["image"][ids]
        + 0.4**0.5 * F.normalize(noise, dim=1) @ parts["basis"][: parts["rank"]]
    )
    return F.normalize(x, dim=1)


def make_inputs(batch: int, bank_size: int, dim: int, device: torch.device, seed: int = 0,
                positives: int = 0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    n_images, rank = 4 * (batch + bank_size), min(dim, 16)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, device=device))[0].T  # orthonormal rows
    image = torch.randn(n_images, rank, generator=gen, device=device)
    parts = {
        "common": basis[-1],
        "image": F.normalize(image, dim=1) @ basis[rank : 2 * rank],
        "basis": basis,
        "rank": rank,
    }
    ids = torch.randint(0, n_images, (batch,), generator=gen, device=device)
    bank = MemoryBank(bank_size, dim).to(device)
    bank_ids = torch.randint(0, n_images, (bank_size,), generator=gen, device=device)
    # Some bank slots show batch images: they are positives, masked out of the candidates.
    bank_ids[: batch // 2] = ids[: batch // 2]
    bank.enqueue(
        _features(bank_ids, parts, gen),
        _features(bank_ids, parts, gen),
        bank_ids,
        torch.arange(bank_size, device=device),
    )
    stats = SimilarityStats().to(device)
    for prefix, mean, std in (("pos", 0.6, 0.1), ("neg", 0.1, 0.1)):
        getattr(stats, f"{prefix}_count").fill_(1000.0)
        getattr(stats, f"{prefix}_mean").fill_(mean)
        getattr(stats, f"{prefix}_m2").fill_(999.0 * std**2)
    pairs, text_ids, bank_text_ids = None, torch.arange(batch, device=device) + bank_size, None
    if positives:
        # A dataset's id space: 5 captions per image (caption 5i + c describes image i), each also
        # matching `positives` random images; the batch's and the bank's captions are some of them.
        n_texts = 5 * n_images
        own = torch.arange(n_texts, device=device) // 5
        extra = torch.randint(0, n_images, (n_texts, positives), generator=gen, device=device)
        images = torch.cat([own[:, None], extra], 1)
        texts = torch.arange(n_texts, device=device)[:, None].expand_as(images)
        pairs = torch.stack([images.reshape(-1), texts.reshape(-1)], 1)
        text_ids = 5 * ids + torch.randint(0, 5, (batch,), generator=gen, device=device)
        bank_text_ids = 5 * bank_ids + torch.randint(0, 5, (bank_size,), generator=gen, device=device)
    if bank_text_ids is not None:
        bank.text_ids.copy_(bank_text_ids)
    return {
        "pairs": pairs,
        "num_texts": 5 * n_images,
        "image": _features(ids, parts, gen).requires_grad_(),
        "text": _features(ids, parts, gen).requires_grad_(),
        "momentum_image": _features(ids, parts, gen),
        "momentum_text": _features(ids, parts, gen),
        "ids": ids,
        "text_ids": text_ids,
        "bank": bank,
        "stats": stats,
        "gen": gen,
    }


def make_loss(inputs: dict, selection: str, **options: object) -> FNELoss:
    """A ready `FNELoss`: full bank and Gaussians copied from the shared inputs."""
    bank: MemoryBank = inputs["bank"]
    loss = FNELoss(embed_dim=bank.image_features.shape[1], memory_size=bank.size, selection=selection,
                   warmup_epochs=0, **options).to(bank.image_features.device)
    loss.bank.load_state_dict(bank.state_dict())
    loss.stats.load_state_dict(inputs["stats"].state_dict())
    loss.generator = inputs["gen"]
    if inputs["pairs"] is not None:
        loss.positives.set_pairs(inputs["pairs"], num_texts=inputs["num_texts"])
    return loss


def step(loss: FNELoss, inputs: dict) -> None:
    value, _ = loss(inputs["image"], inputs["text"], inputs["ids"], inputs["text_ids"],
                    inputs["momentum_image"], inputs["momentum_text"])
    value.backward()
    inputs["image"].grad = inputs["text"].grad = None


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def bench(batch: int, bank_size: int, dim: int, device: torch.device, warmup: int, repeats: int,
          variants: tuple[str, ...] = (), malloc: str = "train", positives: int = 0) -> dict:
    inputs = make_inputs(batch, bank_size, dim, device, positives=positives)
    losses = {"fne": make_loss(inputs, "sample"), "hardest": make_loss(inputs, "hardest"),
              **{v: make_loss(inputs, "sample", **VARIANTS[v]) for v in variants}}
    times: dict[str, list[float]] = {name: [] for name in losses}
    for i in range(warmup + repeats):
        for select in list(losses) if i % 2 == 0 else list(losses)[::-1]:
            elapsed = _timed(lambda select=select: step(losses[select], inputs), device)
            if i >= warmup:
                times[select].append(elapsed)
    fne, hardest = min(times["fne"]), min(times["hardest"])
    extra = {f"{v}_ms": round(min(times[v]), 2) for v in variants}
    extra.update({f"{v}_ratio": round(min(times[v]) / hardest, 2) for v in variants})
    return {
        "batch": batch,
        "bank": bank_size,
        "dim": dim,
        "device": str(device),
        "fne_ms": round(fne, 2),
        "hardest_ms": round(hardest, 2),
        "ratio": round(fne / hardest, 2),
        "fne_ms_median": round(statistics.median(times["fne"]), 2),
        "hardest_ms_median": round(statistics.median(times["hardest"]), 2),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "malloc": malloc,
        "positives": positives,
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=PAPER_SIZES, help="'B,K,D;B,K,D' (default: %(default)s)")
    parser.add_argument("--devices", default=None, help="comma-separated; default cpu (+ cuda if available)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="also time these options beyond the published rule (ratio to the same hardest step)")
    parser.add_argument("--malloc", default="train", choices=["train", "glibc"],
                        help="glibc's allocator thresholds as training sets them (conf/train.yaml `malloc`), "
                             "or glibc's defaults")
    parser.add_argument("--positives", type=int, default=0,
                        help="declare known positives (each caption: its own image and this many random ones), "
                             "so the step also computes the diagnostics against them; 0: none")
    args = parser.parse_args()
    configure_like_training(args.malloc)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] * torch.cuda.is_available())
    rows = []
    for device in devices:
        for size in args.sizes.split(";"):
            b, k, d = (int(x) for x in size.split(","))
            row = bench(b, k, d, torch.device(device), args.warmup, args.repeats, tuple(args.variants), args.malloc,
                        args.positives)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'device':>8} {'B':>5} {'K':>7} {'D':>5} {'fne ms':>9} {'hardest ms':>11} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['device']:>8} {r['batch']:>5} {r['bank']:>7} {r['dim']:>5} "
            f"{r['fne_ms']:>9.2f} {r['hardest_ms']:>11.2f} {r['ratio']:>6.2f}"
        )
    if args.variants:
        print(f"\n{'B':>5} {'K':>7} " + " ".join(f"{v + ' ms (ratio)':>26}" for v in args.variants))
        for r in rows:
            print(f"{r['batch']:>5} {r['bank']:>7} "
                  + " ".join(f"{r[v + '_ms']:>17.2f} ({r[v + '_ratio']:.2f})" for v in args.variants))


if __name__ == "__main__":
    main()
