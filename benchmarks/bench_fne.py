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

``--parts contrastive`` (or ``fne,contrastive``) times the contrastive loss instead of (or besides)
FNE's triplet step: one call of ``InfoNCELoss`` (forward AND backward, both directions, the
statistics, the enqueue, the diagnostics) over the same inputs, B anchors against the batch's B
momentum features and a full queue of K (``memory_size=K``, ``queue_features=momentum``), with each
false-negative option against the plain queue (``infonce_queue``, the baseline):

- ``fne``: FNE's posterior weights each negative's term of the softmax denominator by ``1 - p_fn``;
- ``fne_exclude``: the same, candidates with ``p_fn > 0.5`` removed (``exclude=0.5``);
- ``distill``: ALBEF's momentum distillation (the momentum anchors' softmax over the same
  candidates mixed into the targets; ``alpha`` fully ramped up, 0.4);
- ``oracle``: the declared true matches removed from the negatives (``oracle_action=eliminate``);
  only with ``--positives`` (without declared positives the loss refuses the oracle). With
  ``--positives`` every row, the baseline included, also computes the diagnostics against them.

    python benchmarks/bench_fne.py --parts contrastive                          # both paper sizes
    python benchmarks/bench_fne.py --parts contrastive --sizes 32,8224,768 --positives 40   # + oracle

Prints one JSON object per size and device, then a table. Times are the best and the
median of ``--repeats`` runs after ``--warmup`` runs, alternating the two paths so that
background load hits both alike; ``ratio`` = fne_ms / hardest_ms (best). For the contrastive
rows ``<option>_ratio`` is the option's best over the baseline's best, and ``<option>_ratio_median``
the median over the rounds of the option's time over the baseline's in the same round.
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
from fne_lightning.losses import FNELoss, InfoNCELoss
from fne_lightning.utils.malloc import configure_like_training

PAPER_SIZES = "32,8224,768;128,65536,768"
# The options beyond the published rule (README, "Beyond the published rule"), each timed against
# the same hardest-negative step with --variants.
VARIANTS = {
    "estimated_prior": {"weighting": "complement", "prior": "estimated"},
    "exclude": {"exclude": 0.5},
    "online_batch": {"online_batch": True},
}
# The contrastive loss: InfoNCE with a queue of K momentum features (the baseline), and each of its
# false-negative options over the same inputs.
CONTRASTIVE = {
    "infonce_queue": {},
    "fne": {"false_negatives": "fne"},
    "fne_exclude": {"false_negatives": "fne", "exclude": 0.5},
    "distill": {"false_negatives": "distill"},
    "oracle": {"false_negatives": "oracle"},
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


def make_contrastive_loss(inputs: dict, **options: object) -> InfoNCELoss:
    """A ready `InfoNCELoss` with a full queue of K momentum features (the shared bank), the shared
    Gaussians (ready) and, with ``--positives``, the declared true matches; distillation's alpha at
    its ramped-up value (progress one epoch)."""
    bank: MemoryBank = inputs["bank"]
    loss = InfoNCELoss(embed_dim=bank.image_features.shape[1], memory_size=bank.size, **options)
    loss = loss.to(bank.image_features.device)
    loss.bank.load_state_dict(bank.state_dict())
    loss.stats.load_state_dict(inputs["stats"].state_dict())
    loss.set_generator(inputs["gen"])
    loss.set_progress(1.0)
    if inputs["pairs"] is not None:
        loss.positives.set_pairs(inputs["pairs"], num_texts=inputs["num_texts"])
    loss.check_setup()
    return loss


def step(loss: FNELoss | InfoNCELoss, inputs: dict) -> None:
    value, _ = loss(inputs["image"], inputs["text"], inputs["ids"], inputs["text_ids"],
                    inputs["momentum_image"], inputs["momentum_text"])
    value.backward()
    inputs["image"].grad = inputs["text"].grad = None
    for param in loss.parameters():  # InfoNCE's own logit scale
        param.grad = None


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


def bench_contrastive(batch: int, bank_size: int, dim: int, device: torch.device, warmup: int, repeats: int,
                      malloc: str = "train", positives: int = 0) -> dict:
    """One InfoNCE-with-queue loss call (forward and backward) per option, interleaved."""
    inputs = make_inputs(batch, bank_size, dim, device, positives=positives)
    names = [n for n in CONTRASTIVE if n != "oracle" or positives]
    losses = {name: make_contrastive_loss(inputs, **CONTRASTIVE[name]) for name in names}
    times: dict[str, list[float]] = {name: [] for name in losses}
    cpu: dict[str, list[float]] = {name: [] for name in losses}  # the process's CPU time, all threads
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start_cpu = time.process_time()
            elapsed = _timed(lambda name=name: step(losses[name], inputs), device)
            if i >= warmup:
                times[name].append(elapsed)
                cpu[name].append((time.process_time() - start_cpu) * 1e3)
    base, base_cpu = times["infonce_queue"], cpu["infonce_queue"]
    row: dict[str, object] = {"part": "contrastive", "batch": batch, "bank": bank_size, "dim": dim,
                              "device": str(device)}
    for name in names:
        row[f"{name}_ms"] = round(min(times[name]), 2)
        row[f"{name}_ms_median"] = round(statistics.median(times[name]), 2)
        row[f"{name}_cpu_ms"] = round(min(cpu[name]), 2)
        if name != "infonce_queue":
            row[f"{name}_ratio"] = round(min(times[name]) / min(base), 3)
            row[f"{name}_ratio_median"] = round(statistics.median(t / b for t, b in zip(times[name], base,
                                                                                         strict=True)), 3)
            # CPU time: what a loaded machine's descheduling does not inflate (with one thread, the work).
            row[f"{name}_cpu_ratio"] = round(min(cpu[name]) / min(base_cpu), 3)
    row.update({"options": names, "repeats": repeats, "threads": torch.get_num_threads(), "malloc": malloc,
                "positives": positives})
    return row


def profile_contrastive(batch: int, bank_size: int, dim: int, device: torch.device, top: int,
                        positives: int = 0) -> list[dict]:
    """Where one loss call's time goes: a ``torch.profiler`` table (top operators by self CPU
    time) of one call of each contrastive option, after one unprofiled call."""
    from torch.profiler import ProfilerActivity, profile

    inputs = make_inputs(batch, bank_size, dim, device, positives=positives)
    rows = []
    for name in (n for n in CONTRASTIVE if n != "oracle" or positives):
        loss = make_contrastive_loss(inputs, **CONTRASTIVE[name])
        step(loss, inputs)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            wall = _timed(lambda loss=loss: step(loss, inputs), device)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total_us = sum(e.self_cpu_time_total for e in events)
        for e in events[:top]:
            rows.append({"part": "profile", "option": name, "batch": batch, "bank": bank_size, "dim": dim,
                         "op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                         "share_pct": round(100 * e.self_cpu_time_total / total_us, 1), "calls": e.count,
                         "call_wall_ms": round(wall, 2), "ops_self_cpu_ms": round(total_us / 1e3, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=PAPER_SIZES, help="'B,K,D;B,K,D' (default: %(default)s)")
    parser.add_argument("--devices", default=None, help="comma-separated; default cpu (+ cuda if available)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="also time these options beyond the published rule (ratio to the same hardest step)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's, the cores); on a machine loaded beyond its "
                             "cores, 1 avoids the OpenMP threads waiting for each other")
    parser.add_argument("--malloc", default="train", choices=["train", "glibc"],
                        help="glibc's allocator thresholds as training sets them (conf/train.yaml `malloc`), "
                             "or glibc's defaults")
    parser.add_argument("--positives", type=int, default=0,
                        help="declare known positives (each caption: its own image and this many random ones), "
                             "so the step also computes the diagnostics against them (and the contrastive part "
                             "times the oracle); 0: none")
    parser.add_argument("--parts", default="fne",
                        help="comma-separated: fne (FNE's step against the hardest negative), contrastive "
                             "(InfoNCE with a queue and its false-negative options); default: %(default)s")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="with the contrastive part: also print a torch.profiler table, the top N operators "
                             "by self CPU time, of one call of each option at each size")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in ("fne", "contrastive") for p in parts):
        parser.error(f"--parts: expected fne and/or contrastive, got {args.parts!r}")
    configure_like_training(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] * torch.cuda.is_available())
    rows, contrastive = [], []
    for device in devices:
        for size in args.sizes.split(";"):
            b, k, d = (int(x) for x in size.split(","))
            if "fne" in parts:
                row = bench(b, k, d, torch.device(device), args.warmup, args.repeats, tuple(args.variants),
                            args.malloc, args.positives)
                print(json.dumps(row), flush=True)
                rows.append(row)
            if "contrastive" in parts:
                row = bench_contrastive(b, k, d, torch.device(device), args.warmup, args.repeats, args.malloc,
                                        args.positives)
                print(json.dumps(row), flush=True)
                contrastive.append(row)
                if args.profile:
                    profiled = profile_contrastive(b, k, d, torch.device(device), args.profile, args.positives)
                    for prow in profiled:
                        print(json.dumps(prow), flush=True)
                    print_profile(profiled)
    if contrastive:
        print_contrastive(contrastive)
    if not rows:
        return
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


def print_contrastive(rows: list[dict]) -> None:
    names = [n for n in CONTRASTIVE if any(f"{n}_ms" in r for r in rows)]
    print(f"\n{'device':>8} {'B':>5} {'K':>7} {'D':>5} " + " ".join(f"{n + ' ms (ratio)':>25}" for n in names)
          + "   ratio = best / infonce_queue's best [median of the rounds' ratios]")
    for r in rows:
        cells = []
        for n in names:
            if f"{n}_ms" not in r:
                cells.append(f"{'-':>25}")
            elif n == "infonce_queue":
                cells.append(f"{r[n + '_ms']:>25.2f}")
            else:
                cells.append(f"{r[n + '_ms']:>9.2f} ({r[n + '_ratio']:.2f} [{r[n + '_ratio_median']:.2f}])")
        print(f"{r['device']:>8} {r['batch']:>5} {r['bank']:>7} {r['dim']:>5} " + " ".join(cells))
    print("\nCPU time of the process (best), ms (ratio to infonce_queue's):")
    for r in rows:
        cells = [f"{n} {r[n + '_cpu_ms']:.1f}" + (f" ({r[n + '_cpu_ratio']:.2f})" if n != "infonce_queue" else "")
                 for n in names if f"{n}_cpu_ms" in r]
        print(f"{r['device']:>8} {r['batch']:>5} {r['bank']:>7} {r['dim']:>5}  " + ", ".join(cells))
    if not any("oracle_ms" in r for r in rows):
        print("(no oracle row: it needs declared true matches, --positives R)")


def print_profile(rows: list[dict]) -> None:
    for option in dict.fromkeys(r["option"] for r in rows):
        mine = [r for r in rows if r["option"] == option]
        r0 = mine[0]
        print(f"\n{option} (B={r0['batch']}, K={r0['bank']}, D={r0['dim']}): one call {r0['call_wall_ms']:.1f} ms "
              f"wall under the profiler, {r0['ops_self_cpu_ms']:.1f} ms in operators")
        print(f"{'operator':<40} {'self ms':>9} {'share %':>8} {'calls':>6}")
        for r in mine:
            print(f"{str(r['op'])[:40]:<40} {r['self_cpu_ms']:>9.2f} {r['share_pct']:>8.1f} {r['calls']:>6}")


if __name__ == "__main__":
    main()
