"""Benchmark the retrieval metric against the bare similarity matmul and a per-query argsort.

COCO-5K-sized random embeddings (5,000 images, 25,000 captions, a few images with 6 or 7
captions and some with 4, D = 1024, seeded). Prints one JSON line, then a table:

    python benchmarks/bench_eval.py                       # full size, CPU
    python benchmarks/bench_eval.py --images 500 --captions 2500 --dim 64   # smoke run
    python benchmarks/bench_eval.py --device cuda
    python benchmarks/bench_eval.py --protocol            # + ECCV Caption's protocol (pip install eccv-caption)

metric_s: ``retrieval_scores`` (standard metrics, no positives); matmul_s: ``I @ T.T`` alone;
argsort_s: the classic evaluation (full matrix, ``torch.argsort`` per row in both directions);
max_abs_diff: the largest difference between the two metric dicts (must be 0).

``--protocol``: instead, the cost of ``protocol=eccv`` (ECCV Caption's mAP@R / R-Precision / R@1,
CxC's and COCO 5K / 1K R@K, as the eccv_caption package computes them) on a COCO 5K test split
made from the package's own ids (its 5,000 images and 25,000 captions, plus 10 captions outside
the protocol as in Karpathy's split; D = 1024; captions near their image and the images the
protocol's files list as their positives, so that R@1 is 40-60%): metric_s is ``retrieval_scores``
alone, protocol_s the same call with ``protocol=...`` (one pass, the protocol's metrics from the
same matrix), standalone_s the protocol alone on a given matrix without the ranks it reuses;
overhead = protocol_s / metric_s - 1. The split's size is the protocol's (``--images`` and
``--captions`` do not apply); ``--threads 1 --cpu-time`` measures the process's CPU time of one
thread, which other jobs on a shared machine disturb least.
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
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    warmup: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Best wall time (or ``clock``'s) of each function over ``repeats`` rounds (after one warm-up
    call each).

    The functions take turns within a round, so a slow spell of a shared machine hits all alike.
    """
    for fn in fns.values() if warmup else ():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], clock() - start)
    return best


def protocol_data(dim: int, seed: int = 0, noise: float = 0.3) -> tuple[Tensor, Tensor, Tensor, object]:
    """The COCO 5K test split of the eccv_caption package's ids in Karpathy's order (its
    ``coco_test_ids.npy``: images in order, each with its captions; 10 images with a 6th caption
    outside the protocol), its features and its protocol."""
    from fne_lightning.data.protocols import build_eccv_protocol, eccv_directory, read_eccv_files

    files = read_eccv_files(eccv_directory(None))
    gen = torch.Generator().manual_seed(seed)
    owner = files.positives["coco5k/t2i"]
    image_ids = list(dict.fromkeys(owner[c][0] for c in files.caption_ids))
    image_index = {c: i for i, c in enumerate(image_ids)}
    sixth = set(torch.randperm(len(image_ids), generator=gen)[:10].tolist())
    text_to_image, caption_index = [], {}
    for c in files.caption_ids:
        i = image_index[owner[c][0]]
        if text_to_image and text_to_image[-1] != i and text_to_image[-1] in sixth:
            text_to_image.append(text_to_image[-1])  # the previous image's 6th caption
        caption_index[c] = len(text_to_image)
        text_to_image.append(i)
    text_to_image = torch.tensor(text_to_image + ([text_to_image[-1]] if text_to_image[-1] in sixth else []))
    images, texts = protocol_features(files, image_index, caption_index, text_to_image, dim, noise, gen)
    return images, texts, text_to_image, build_eccv_protocol(files, image_index, caption_index)


def protocol_features(files: object, image_index: dict[int, int], caption_index: dict[int, int],
                      text_to_image: Tensor, dim: int, noise: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Features with the protocol's structure (also tests/test_protocols.py's): random unit images;
    a caption is its image, plus every image the protocol's files (CxC, ECCV) list it as a positive
    of, plus noise, so that every metric is far from 0 and 1. Returns (N_img, D) and (N_txt, D)."""
    images = F.normalize(torch.randn(len(image_index), dim, generator=gen), dim=1)  # (N_img, D)
    pairs = {(image_index[i], caption_index[c]) for name in ("cxc/t2i", "eccv/t2i")
             for c, ims in files.positives[name].items() for i in ims}
    pairs |= {(image_index[i], caption_index[c]) for name in ("cxc/i2t", "eccv/i2t")
              for i, cs in files.positives[name].items() for c in cs if c in caption_index}
    pairs = torch.tensor(sorted(pairs))
    pairs = pairs[text_to_image[pairs[:, 1]] != pairs[:, 0]]
    mix = torch.zeros(len(text_to_image), dim).index_add_(0, pairs[:, 1], images[pairs[:, 0]])
    texts = F.normalize(images[text_to_image] + mix + noise * torch.randn(len(text_to_image), dim, generator=gen),
                        dim=1)
    return images, texts


def protocol_main(args: argparse.Namespace, device: torch.device) -> None:
    from fne_lightning.retrieval.protocols import protocol_scores

    images, texts, text_to_image, protocol = protocol_data(args.dim)
    images, texts, text_to_image = images.to(device), texts.to(device), text_to_image.to(device)
    protocol = protocol.to(device)
    with torch.inference_mode():
        ours = retrieval_scores(images, texts, text_to_image, chunk_size=args.chunk_size, protocol=protocol)
        sims = images @ texts.T
        alone = protocol_scores(sims, protocol)
        times = best_times(
            {
                "matmul": lambda: images @ texts.T,
                "metric": lambda: retrieval_scores(images, texts, text_to_image, chunk_size=args.chunk_size),
                "protocol": lambda: retrieval_scores(images, texts, text_to_image, chunk_size=args.chunk_size,
                                                     protocol=protocol),
                "standalone": lambda: protocol_scores(sims, protocol),
            },
            args.repeats,
            device,
            clock=time.process_time if args.cpu_time else time.perf_counter,
        )
    record = {
        "images": images.shape[0],
        "captions": texts.shape[0],
        "dim": args.dim,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "clock": "process CPU time" if args.cpu_time else "wall",
        **{f"{name}_s": round(t, 4) for name, t in times.items()},
        "overhead": round(times["protocol"] / times["metric"] - 1, 4),
        "reuse_max_abs_diff": max(abs(ours[k] - alone[k]) for k in alone),
        **{k: round(v, 4) for k, v in ours.items() if "/" in k},
    }
    print(json.dumps(record))
    print(f"\n{'':12}{'seconds':>10}{'x metric':>10}")
    for name in ("matmul", "metric", "protocol", "standalone"):
        print(f"{name:12}{times[name]:>10.3f}{times[name] / times['metric']:>10.3f}")
    print(f"\nprotocol adds {100 * record['overhead']:.1f}% to the metric; i2t / t2i:")
    for proto, metrics in (("eccv", ("map_at_r", "rprecision", "r1")), ("cxc", ("r1", "r5", "r10")),
                           ("coco5k", ("r1", "r5", "r10")), ("coco1k", ("r1", "r5", "r10"))):
        for m in metrics:
            print(f"{proto + '/' + m:20}{ours[f'{proto}/i2t_{m}']:>10.2f}{ours[f'{proto}/t2i_{m}']:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions", type=int, default=25000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (argsort: at most 3)")
    parser.add_argument("--chunk-size", type=int, default=None, help="images per chunk (default: automatic)")
    parser.add_argument("--protocol", action="store_true",
                        help="time protocol=eccv on the COCO 5K split of the eccv_caption package's ids instead")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="--protocol: time the process's CPU time, not wall time (with --threads 1, what other "
                             "jobs on a shared machine disturb least)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    if args.protocol:
        protocol_main(args, device)
        return

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
