"""Training-input throughput: images/s after decoding and the training transform, from WebDataset
shards (``data=webdataset``) against the image folder they were written from (``data=karpathy``).

The same JPEG photos (crops of matplotlib's sample photo, 256-512 px on the long side, quality 90,
one caption each, as in CC3M), the same transform (the paper's: RandomResizedCrop to 224,
horizontal flip, RandAugment(2, 7)) and the same tokenizer (open_clip's BPE, 77 tokens). The shards
are written by ``make_shards``' writer. Each configuration times whole batches after a warm-up
(worker start-up excluded) and prints one JSON object; then a table.

    python benchmarks/bench_data.py                              # 1,024 photos, workers 0 and 2
    python benchmarks/bench_data.py --images 4096 --workers 0,2,4 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fne_lightning.datamodule import CaptionDataModule, ShardDataModule  # noqa: E402
from fne_lightning.make_shards import write_shards  # noqa: E402
from fne_lightning.models.encoders import ImageConfig  # noqa: E402

CLIP = ImageConfig(224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def write_photos(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG photos and a Karpathy JSON (one caption each, all in the train split)."""
    import matplotlib

    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    images = []
    for i in range(n):
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(256, 513))
        crop = photo.crop((x, y, x + cw, y + ch))
        crop.thumbnail((side, side))
        crop.save(root / "img" / f"{i}.jpg", format="JPEG", quality=90)
        images.append({"imgid": i, "split": "train", "filename": f"{i}.jpg", "filepath": "img",
                       "sentences": [{"raw": f"a photo of a woman in uniform, number {i}", "sentid": i}]})
    path = root / "dataset_photos.json"
    path.write_text(json.dumps({"images": images}))
    return path


def throughput(loader, batch: int, warmup: int, batches: int) -> tuple[float, int]:
    """(images/s, images timed) over ``batches`` batches after ``warmup`` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start, done = time.perf_counter(), 0
    for _ in range(batches):
        if next(it, None) is None:
            break
        done += 1
    elapsed = time.perf_counter() - start
    return done * batch / elapsed, done * batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--warmup", type=int, default=2, help="batches before timing")
    parser.add_argument("--shard-size", type=int, default=256)
    args = parser.parse_args()
    import open_clip
    import torch

    torch.set_num_threads(1)  # the loader's work is per sample; workers add the parallelism
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        annotations = write_photos(root / "folder", args.images)
        folder = CaptionDataModule(root=str(root / "folder"), annotations=str(annotations),
                                   splits={"train": ["train"], "val": ["train"], "test": ["train"]},
                                   batch_size=args.batch, num_workers=0, pin_memory=False)
        split = folder.load_split("train")
        index = write_shards(split, str(root / "folder"), root / "shards", args.shard_size, shuffle=True)
        shard_bytes = sum(p.stat().st_size for p in (root / "shards").glob("*.tar"))
        timed = args.images // args.batch - args.warmup
        for workers in (int(w) for w in args.workers.split(",")):
            for source in ("folder", "shards"):
                if source == "folder":
                    dm = CaptionDataModule(root=str(root / "folder"), annotations=str(annotations),
                                           splits={"train": ["train"], "val": ["train"], "test": ["train"]},
                                           batch_size=args.batch, num_workers=workers, pin_memory=False)
                else:
                    dm = ShardDataModule(train_shards=index["train_shards"], train_num_samples=args.images,
                                         eval=folder, batch_size=args.batch, num_workers=workers, pin_memory=False)
                dm.use_encoder(CLIP, tokenizer)
                rate, n = throughput(dm.train_dataloader(), args.batch, args.warmup, timed)
                row = {"source": source, "workers": workers, "images_per_s": round(rate, 1), "images_timed": n,
                       "batch": args.batch, "images": args.images, "cores": cores}
                if source == "shards":
                    row.update(shards=len(index["shards"]), shard_mb=round(shard_bytes / 1e6, 1))
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"\n{args.images:,} JPEG photos (256-512 px, {shard_bytes / 1e6:.1f} MB in {len(index['shards'])} shards), "
          f"batch {args.batch}, transform RandomResizedCrop(224) + flip + RandAugment(2, 7), {cores} CPU cores\n")
    print("| source | workers | images/s |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {'WebDataset shards' if r['source'] == 'shards' else 'image folder'} | {r['workers']} | "
              f"{r['images_per_s']:.1f} |")


if __name__ == "__main__":
    main()
