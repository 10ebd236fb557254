"""Benchmark the retrieval metric against the bare similarity matmul and a per-query argsort.

COCO-5K-sized random embeddings (5,000 images, 25,000 captions, a few images with 6 or 7
captions and some with 4, D = 1024, seeded). Prints one JSON line, then a table:

    python benchmarks/bench_eval.py                       # full size, CPU
    python benchmarks/bench_eval.py --images 500 --captions 2500 --dim 64   # smoke run
    python benchmarks/bench_eval.py --device cuda

metric_s: ``retrieval_scores`` (standard metrics, no positives); matmul_s: ``I @ T.T`` alone;
argsort_s: the classic evaluation (full matrix, ``torch.argsort`` per row in both directions);
max_abs_diff: the largest difference between the two metric dicts (must be 0).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fne_lightning.retrieval.metric import retrieval_scores


def caption_counts(images: int, captions: int, gen: torch.Generator) -> Tensor:
    """(images,) captions per image summing to ``captions``: even split, then ~2% of images
    hand a caption to another image (up to 7 each) so the counts are uneven."""
    counts = torch.full((images,), captions // images, dtype=torch.long)
    counts[: captions % images] += 1
    for _ in range(images // 50):
        donor, receiver = torch.randint(images, (2,), generator=gen).tolist()
        if donor != receiver and counts[donor] > 1 and counts[receiver] < 7:
            counts[donor] -= 1
            counts[receiver] += 1
    return counts


def make_data(images: int, captions: int, dim: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    counts = caption_counts(images, captions, gen)
    text_to_image = torch.repeat_interleave(torch.arange(images), counts)
    text_to_image = text_to_image[torch.randperm(captions, generator=gen)]  # (N_txt,) unsorted
    image_features = F.normalize(torch.randn(images, dim, generator=gen), dim=1)  # (N_img, D)
    # Own-pair cosine ~0.12 against ~0.03 noise: ranks spread from 0 to thousands, as in training.
    noise = torch.randn(captions, dim, generator=gen) * 8.0 / dim**0.5
    text_features = F.normalize(image_features[text_to_image] + noise, dim=1)  # (N_txt, D)
    return image_features, text_features, text_to_image


def summary(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    """The VSE++ evaluation code's formulas, in NumPy."""
    out = {f"{prefix}_r{k}": 100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    return out


def argsort_scores(image_features: Tensor, text_features: Tensor, text_to_image: Tensor) -> dict[str, float]:
    """The classic evaluation: sort every row of the full matrix, look up the ground truth."""
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    device = image_features.device
    sims = image_features @ text_features.T  # (N_img, N_txt)
    order = torch.argsort(sims, dim=1, descending=True)  # (N_img, N_txt) captions by rank
    position = torch.empty_like(order)  # (N_img, N_txt) rank of each caption
    position.scatter_(1, order, torch.arange(n_txt, device=device).expand(n_img, -1))
    del order
    own = position[text_to_image, torch.arange(n_txt, device=device)]  # (N_txt,)
    i2t = torch.full((n_img,), n_txt, device=device).scatter_reduce(0, text_to_image, own, "amin")
    del position
    order = torch.argsort(sims.T, dim=1, descending=True)  # (N_txt, N_img) images by rank
    t2i = (order == text_to_image[:, None]).int().argmax(1)  # (N_txt,)
    out = {**summary("i2t", i2t.cpu().numpy()), **summary("t2i", t2i.cpu().numpy())}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def best_times(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: bool = True
) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds (after one warm-up call each).

    The functions take turns within a round, so a slow spell of a shared machine hits all alike.
    """
    for fn in fns.values() if warmup else ():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions", type=int, default=25000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (argsort: at most 3)")
    parser.add_argument("--chunk-size", type=int, default=None, help="images per chunk (default: automatic)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)

    images, texts, text_to_image = (t.to(device) for t in make_data(args.images, args.captions, args.dim))
    with torch.inference_mode():
        ours = retrieval_scores(images, texts, text_to_image, chunk_size=args.chunk_size)
        theirs = argsort_scores(images, texts, text_to_image)
        times = best_times(
            {
                "metric": lambda: retrieval_scores(images, texts, text_to_image, chunk_size=args.chunk_size),
                "matmul": lambda: images @ texts.T,
            },
            args.repeats,
            device,
        )
        # ~20x slower than the rest: fewer rounds, and the call above was its warm-up.
        times.update(
            best_times(
                {"argsort": lambda: argsort_scores(images, texts, text_to_image)},
                min(args.repeats, 3),
                device,
                warmup=False,
            )
        )
    metric_s, matmul_s, argsort_s = times["metric"], times["matmul"], times["argsort"]
    record = {
        "images": args.images,
        "captions": args.captions,
        "dim": args.dim,
        "device": str(device),
        "metric_s": round(metric_s, 4),
        "matmul_s": round(matmul_s, 4),
        "argsort_s": round(argsort_s, 4),
        "ratio": round(metric_s / matmul_s, 3),
        "max_abs_diff": max(abs(ours[k] - theirs[k]) for k in theirs),
    }
    print(json.dumps(record))
    print(f"\n{'':10}{'seconds':>10}{'x matmul':>10}")
    for name in ("matmul", "metric", "argsort"):
        print(f"{name:10}{times[name]:>10.3f}{times[name] / matmul_s:>10.2f}")
    print(f"\n{'metric':12}{'ours':>12}{'argsort':>12}")
    for key, value in theirs.items():
        print(f"{key:12}{ours[key]:>12.4f}{value:>12.4f}")


if __name__ == "__main__":
    main()
