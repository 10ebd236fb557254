"""Convert ECCV Caption or CxC positives into a ``<stem>.positives.json`` (FNE_SPEC section 10).

    python -m fne_lightning.convert_positives --karpathy dataset_coco.json \\
        --coco-captions captions_val2014.json \\
        --image-to-caption eccv_image_to_caption.json \\
        [--caption-to-image eccv_caption_to_image.json] --out dataset_coco.positives.json

ECCV Caption (Chun et al. 2022, github.com/naver-ai/eccv-caption, ``eccv_caption/data/``) ships
its positives and CxC's (Parekh et al. 2021) as ``{"<COCO image id>": [COCO caption ids]}`` and
``{"<COCO caption id>": [COCO image ids]}``. Karpathy's ``dataset_coco.json`` knows each image's
COCO id (``cocoid``) but not the COCO ids of its sentences, so caption ids are mapped through
COCO's ``captions_*.json`` (``annotations: [{id, image_id, caption}]``) onto the Karpathy sentence
of the same image with the same text (whitespace collapsed, lower-case; repeated texts in order).
The output lists, per Karpathy ``imgid``, the sorted ``sentid`` of every caption that describes
the image, its own included. Ids that cannot be mapped are counted and reported, not fatal.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from fne_lightning.data.datasets import read_json
from fne_lightning.errors import FNEError, report_user_errors
from fne_lightning.utils.report import write_json


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def karpathy_images(path: Path, key: str = "--karpathy") -> dict[int, tuple[int, list[tuple[int, str]]]]:
    """``cocoid -> (imgid, [(sentid, raw), ...])`` of a Karpathy COCO JSON; errors name ``key``."""
    data = read_json(path, key)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise FNEError(f"{key}={str(path)!r}: expected a Karpathy JSON object with an 'images' list")
    out = {}
    for n, img in enumerate(data["images"]):
        try:
            sentences = [(int(s["sentid"]), str(s["raw"])) for s in img["sentences"]]
            out[int(img["cocoid"])] = (int(img.get("imgid", n)), sentences)
        except (KeyError, TypeError, ValueError) as err:
            raise FNEError(f"{key}={str(path)!r}: image entry {n} lacks {err} (expected MS-COCO's Karpathy "
                           "JSON: cocoid, imgid, sentences[].sentid/raw)") from None
    return out


def caption_sentids(paths: Sequence[Path], images: dict[int, tuple[int, list[tuple[int, str]]]],
                    key: str = "--coco-captions") -> dict[int, int]:
    """``COCO caption id -> Karpathy sentid`` for the captions of Karpathy's images, by text; errors
    name ``key``."""
    per_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for path in paths:
        data = read_json(path, key)
        rows = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise FNEError(f"{key}={str(path)!r}: expected COCO captions JSON with an 'annotations' list")
        for n, row in enumerate(rows):
            try:
                per_image[int(row["image_id"])].append((int(row["id"]), str(row["caption"])))
            except (KeyError, TypeError, ValueError) as err:
                raise FNEError(f"{key}={str(path)!r}: annotation {n} lacks {err} "
                               "(expected id, image_id, caption)") from None
    mapping = {}
    for cocoid, captions in per_image.items():
        if cocoid not in images:
            continue
        free: dict[str, list[int]] = defaultdict(list)  # text -> sentids not yet matched, in order
        for sentid, raw in images[cocoid][1]:
            free[normalise(raw)].append(sentid)
        for capid, text in sorted(captions):
            waiting = free.get(normalise(text))
            if waiting:
                mapping[capid] = waiting.pop(0)
    return mapping


def read_pairs(path: Path, flag: str, shape: str) -> dict[int, list[int]]:
    """``{"<id>": [id, ...]}`` as ints; anything else is one clear error."""
    raw = read_json(path, flag)
    try:
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise TypeError
        return {int(k): [int(x) for x in v] for k, v in raw.items()}
    except (TypeError, ValueError):
        raise FNEError(f"{flag}={str(path)!r}: expected {shape} (the ECCV Caption / CxC format)") from None


def convert(karpathy: Path, coco_captions: Sequence[Path], image_to_caption: Path | None,
            caption_to_image: Path | None) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The positives ``{"<imgid>": [sentid, ...]}`` and counts of what could not be mapped."""
    images = karpathy_images(karpathy)
    sentid_of = caption_sentids(coco_captions, images)
    positives: dict[int, set[int]] = {}
    bad_images: set[int] = set()
    bad_captions: set[int] = set()
    seen_images: set[int] = set()
    seen_captions: set[int] = set()

    def add(cocoid: int, capid: int) -> None:
        seen_images.add(cocoid)
        seen_captions.add(capid)
        if cocoid not in images:
            bad_images.add(cocoid)
            return
        if capid not in sentid_of:
            bad_captions.add(capid)
            return
        imgid, sentences = images[cocoid]
        positives.setdefault(imgid, {s for s, _ in sentences}).add(sentid_of[capid])

    if image_to_caption is not None:
        shape = '{"<COCO image id>": [COCO caption ids]}'
        for cocoid, capids in read_pairs(image_to_caption, "--image-to-caption", shape).items():
            for capid in capids:
                add(cocoid, capid)
    if caption_to_image is not None:
        shape = '{"<COCO caption id>": [COCO image ids]}'
        for capid, cocoids in read_pairs(caption_to_image, "--caption-to-image", shape).items():
            for cocoid in cocoids:
                add(cocoid, capid)
    stats = dict(image_ids=len(seen_images), unmapped_image_ids=len(bad_images), caption_ids=len(seen_captions),
                 unmapped_caption_ids=len(bad_captions))
    return {str(k): sorted(v) for k, v in sorted(positives.items())}, stats


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fne_lightning.convert_positives`` / ``fne-convert-positives``."""
    parser = argparse.ArgumentParser(prog="python -m fne_lightning.convert_positives", description=__doc__.split("\n")[0])
    parser.add_argument("--karpathy", type=Path, required=True, help="Karpathy's dataset_coco.json")
    parser.add_argument("--coco-captions", type=Path, action="append", required=True,
                        help="COCO captions_val2014.json (repeat for captions_train2014.json)")
    parser.add_argument("--image-to-caption", type=Path, help='{"<COCO image id>": [COCO caption ids]}')
    parser.add_argument("--caption-to-image", type=Path, help='{"<COCO caption id>": [COCO image ids]}')
    parser.add_argument("--out", type=Path, required=True, help="e.g. dataset_coco.positives.json beside the JSON")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; exits with argparse's usage error on a bad one (as ``main`` does)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image_to_caption is None and args.caption_to_image is None:
        parser.error("give --image-to-caption and/or --caption-to-image")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: ``python -m fne_lightning.convert_positives`` / ``fne-convert-positives``."""
    args = parse_args(argv)
    with report_user_errors():
        positives, stats = convert(args.karpathy, args.coco_captions, args.image_to_caption, args.caption_to_image)
        write_json(args.out, positives)
    pairs = sum(len(v) for v in positives.values())
    print(f"wrote {args.out}: {len(positives):,} images, {pairs:,} (image, caption) positives, own captions included")
    print(f"unmapped: {stats['unmapped_image_ids']:,} of {stats['image_ids']:,} COCO image ids (not in --karpathy), "
          f"{stats['unmapped_caption_ids']:,} of {stats['caption_ids']:,} COCO caption ids (not in --coco-captions, "
          "or no sentence of the same image with the same text)")


if __name__ == "__main__":
    main()
