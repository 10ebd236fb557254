"""Shard-writing entry point: ``python -m fne_lightning.make_shards data=<config> split=train out_dir=DIR``.

Writes one split of any dataset this package reads (``data=synthetic``, ``karpathy``, ``f30k``,
``coco``, ``albef``) as WebDataset shards (``wds.ShardWriter``) in img2dataset's layout, one
sample per caption, which ``data=webdataset`` then streams:

- ``<key>.<jpg|png|webp>``: the image file's bytes as stored (other formats re-encoded as PNG);
- ``<key>.txt``: the caption as annotated (training cleans it, as it cleans annotations);
- ``<key>.json``: ``image_id`` (the annotation's imgid / image_id), ``text_id`` (the caption's
  index in the split) and ``image`` (the path relative to the image root).

Shards are ``<split>-000000.tar``, ... of ``shard_size`` samples; ``<split>.json`` beside them
indexes them (names and sample counts) and gives the ``data.train_shards`` pattern. A split with
declared extra positives (the synthetic benchmark, a Karpathy JSON with ``.positives.json``) also
gets ``<split>.positives.json``, ``{"<image_id>": [text_id, ...]}`` in the shards' ids, which the
index names: training from the shards then reports the false-negative diagnostics, and
validation and test from them the multi-positive metrics. The index is
written last, so a directory with an index holds complete shards. Captions are shuffled (``seed``)
before writing unless ``shuffle=false``, so that every shard is a random sample of the split.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from fne_lightning.errors import FNEError, check, report_user_errors
from fne_lightning.utils.config import config_dir

log = logging.getLogger(__name__)

COPIED = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
RAW_CAPTIONS = {"lowercase": False, "strip_punctuation": False, "max_words": None}


def image_member(path: str) -> tuple[str, bytes]:
    """(extension, bytes) of an image file for a shard: JPEG/PNG/WebP as stored, others as PNG."""
    ext = COPIED.get(Path(path).suffix.lower())
    if ext is not None:
        return ext, Path(path).read_bytes()
    from fne_lightning.data.datasets import open_image

    out = io.BytesIO()
    open_image(path).save(out, format="PNG")
    return "png", out.getvalue()


def json_id(key: str) -> int | str:
    """An annotation's image key as the json's ``image_id``: an integer when it is one."""
    return int(key) if key.isdigit() else key


def shard_positives(split: Any) -> dict[str, list[int]] | None:
    """The split's declared positives in the shards' ids, ``{"<image_id>": [text_id, ...]}``, or None
    when it declares none (or its image ids are not integers, which the stream would hash)."""
    if split.positive_pairs is None:
        return None
    keys = split.image_keys or [str(i) for i in range(split.num_images)]
    if not all(isinstance(json_id(k), int) for k in keys):
        log.warning("the %s split's positives are not written: its image ids are not integers", split.name)
        return None
    out: dict[str, list[int]] = {}
    for i, j in split.positive_pairs.tolist():
        out.setdefault(str(json_id(keys[i])), []).append(int(j))
    return {k: sorted(v) for k, v in out.items()}


def write_shards(split: Any, image_root: str, out_dir: Path, shard_size: int, shuffle: bool = True,
                 seed: int = 0) -> dict[str, Any]:
    """Write ``split`` (a :class:`~fne_lightning.data.datasets.CaptionSplit`) into ``out_dir`` as
    shards of ``shard_size`` samples; returns the index that is also written to ``<split>.json``."""
    import numpy as np
    import webdataset as wds

    from fne_lightning.utils.report import write_json

    name = split.name
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.arange(split.num_texts)
    if shuffle:
        order = np.random.default_rng(seed).permutation(split.num_texts)
    width = max(9, len(str(split.num_texts)))
    counts: dict[str, int] = {}
    with wds.ShardWriter(str(out_dir / f"{name}-%06d.tar"), maxcount=shard_size, verbose=0) as writer:
        for j in order.tolist():
            i = int(split.text_to_image[j])
            path = split.image_paths[i]
            ext, data = image_member(path)
            image_key = split.image_keys[i] if split.image_keys else str(i)
            writer.write({
                "__key__": f"{j:0{width}d}",
                ext: data,
                "txt": split.captions[j],
                "json": {"image_id": json_id(image_key), "text_id": j, "image": os.path.relpath(path, image_root)},
            })
            shard = Path(writer.fname).name
            if shard not in counts:
                log.info("writing %s", out_dir / shard)
            counts[shard] = counts.get(shard, 0) + 1
    names = sorted(counts)
    last = len(names) - 1
    positives = shard_positives(split)
    if positives is not None:
        write_json(out_dir / f"{name}.positives.json", positives)
    index = {
        "split": name,
        "num_samples": int(split.num_texts),
        "num_images": int(split.num_images),
        "shards": [{"name": n, "num_samples": counts[n]} for n in names],
        # data.train_shards for these shards (brace expansion of the numbers written).
        "train_shards": str(out_dir / (f"{name}-{{000000..{last:06d}}}.tar" if last else names[0])),
    }
    if positives is not None:
        index["positives"] = f"{name}.positives.json"
    write_json(out_dir / f"{name}.json", index)
    return index


def make_shards(cfg: DictConfig) -> dict[str, Any]:
    """Read ``cfg.data``'s split ``cfg.split`` and write its shards (``conf/make_shards.yaml``)."""
    from hydra.utils import instantiate

    from fne_lightning.datamodule import CaptionDataModule

    check(cfg.split in ("train", "val", "test"), "split", "train, val or test", cfg.split)
    check(isinstance(cfg.shard_size, int) and not isinstance(cfg.shard_size, bool) and cfg.shard_size > 0,
          "shard_size", "a positive number of samples per shard", cfg.shard_size)
    if not cfg.get("out_dir"):
        raise FNEError("out_dir: expected out_dir=<directory to write the shards into>")
    out_dir = Path(os.path.expanduser(str(cfg.out_dir))).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise FNEError(f"out_dir={str(cfg.out_dir)!r}: exists and is not a directory")
    old = sorted(out_dir.glob(f"{cfg.split}-*.tar")) + sorted(out_dir.glob(f"{cfg.split}.json"))
    if old:
        raise FNEError(f"out_dir={str(cfg.out_dir)!r}: already holds {cfg.split} shards ({old[0].name}, ...); "
                       "choose a new directory or remove them")
    # Captions as annotated: the reader cleans them with its own data.caption settings.
    datamodule = instantiate(cfg.data, caption=RAW_CAPTIONS)
    if not isinstance(datamodule, CaptionDataModule):
        raise FNEError(f"data._target_={cfg.data.get('_target_')!r}: expected a data config of images with "
                       "annotations (synthetic, karpathy, f30k, coco, albef) to write shards from")
    split = datamodule.load_split(cfg.split)
    image_root = str(datamodule.image_root or datamodule.root)
    index = write_shards(split, image_root, out_dir, cfg.shard_size, bool(cfg.shuffle), int(cfg.seed))
    print(f"wrote {index['num_samples']:,} samples ({index['num_images']:,} images) in {len(index['shards'])} "
          f"shards to {out_dir}; index {out_dir / (cfg.split + '.json')}")
    # Quoted twice: the shell keeps Hydra's quotes, which protect the braces from Hydra's grammar.
    print(f"train on them with data=webdataset 'data.train_shards=\"{index['train_shards']}\"' "
          f"data.train_num_samples={index['num_samples']}")
    return index


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="make_shards")
def main(cfg: DictConfig) -> None:
    from fne_lightning.train import verbose_run
    from fne_lightning.utils.logs import configure_logging

    configure_logging(verbose_run(cfg))
    with report_user_errors():
        make_shards(cfg)


if __name__ == "__main__":
    main()
