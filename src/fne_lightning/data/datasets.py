"""Image-caption annotations and the torch Datasets that serve them.

Two annotation formats are read into one :class:`CaptionSplit`:

* Karpathy JSON (``dataset_flickr30k.json``, ``dataset_coco.json``, the synthetic benchmark):
  ``images[]`` with ``split``, ``filename``, optional ``filepath``, ``imgid`` and
  ``sentences[]`` (``raw``, ``sentid``). A file ``<stem>.positives.json`` beside it lists the
  extra positives of FNE_SPEC section 10.
* ALBEF-style per-split lists: ``[{"image", "caption", "image_id"}]`` for train (one row per
  caption) and ``[{"image", "caption": [...]}]`` for evaluation.

A split keeps unique images and all captions apart, with ``text_to_image`` mapping each
caption to its image: nothing assumes five captions per image.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from fne_lightning.errors import FNEError

log = logging.getLogger(__name__)


@dataclass
class CaptionSplit:
    """One split: unique images, all captions, and the image each caption belongs to."""

    name: str  #: The split's name (``train``, ``val``, ``test``).
    image_paths: list[str]  #: The N_img image files (or, for shards, names of the images).
    captions: list[str]  #: The N_txt cleaned captions.
    text_to_image: np.ndarray  #: (N_txt,) int64, the index into ``image_paths`` of each caption's image.
    #: The annotations' id of each image (``imgid`` / ``image_id``), for reports.
    image_keys: list[str] = field(default_factory=list)
    #: (P, 2) int64 (image index, caption index) pairs that truly match beyond the ground
    #: truth (FNE_SPEC section 10), or None when the dataset declares none.
    positive_pairs: np.ndarray | None = None
    #: The annotations' id of each caption (Karpathy ``sentid``), where the format has one; maps
    #: the captions of a published protocol's files onto the split (empty otherwise).
    caption_keys: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        """N_img, the number of images."""
        return len(self.image_paths)

    @property
    def num_texts(self) -> int:
        """N_txt, the number of captions."""
        return len(self.captions)


def read_json(path: Path, key: str) -> object:
    """Load a JSON file; a missing or malformed file is one clear error naming ``key``."""
    if not path.is_file():
        raise FNEError(f"{key}={str(path)!r}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FNEError(f"{key}={str(path)!r}: not valid JSON ({err})") from None


def _clean_all(captions: list[str], clean: Callable[[str], str], where: Sequence[str]) -> list[str]:
    out = [clean(c) for c in captions]
    for text, raw, loc in zip(out, captions, where, strict=True):
        if not text:
            raise FNEError(f"{loc}: caption {raw!r} is empty after preprocessing")
    return out


def load_karpathy(annotations: Path, image_root: Path, splits: Sequence[str], name: str,
                  clean: Callable[[str], str] = str, positives: Path | None = None,
                  key: str = "data") -> CaptionSplit:
    """Read the images of some Karpathy splits, with their captions, into one :class:`CaptionSplit`.

    Args:
        annotations: the Karpathy JSON file.
        image_root: the directory its image paths are relative to.
        splits: the Karpathy split names to read (e.g. ``["train", "restval"]``).
        name: the name of the split made of them.
        clean: caption cleaning (e.g. :func:`~fne_lightning.data.captions.clean_caption`).
        positives: the extra-positives file (``{"<imgid>": [sentid, ...]}``); by default
            ``<annotations stem>.positives.json`` beside the JSON, when it exists.
        key: the config that errors name (``<key>.annotations``, ``<key>.positives``).

    Raises:
        FNEError: a missing or malformed file, duplicate ids, no images, or an empty caption.
    """
    split = load_karpathy_splits(annotations, image_root, {name: splits}, clean, positives, key)[name]
    if isinstance(split, FNEError):
        raise split
    return split


def load_karpathy_splits(annotations: Path, image_root: Path, splits: Mapping[str, Sequence[str]],
                         clean: Callable[[str], str] = str, positives: Path | None = None,
                         key: str = "data") -> dict[str, CaptionSplit | FNEError]:
    """:func:`load_karpathy` for several named splits (e.g. ``{"train": ["train", "restval"],
    "val": ["val"]}``) of one file: the JSON, its ids and the positives file are read once (the
    synthetic benchmark's 8 MB JSON and 4 MB positives took 0.4 s a split). Errors of the file
    are raised; a split that cannot be built (no images, a bad entry among its images) holds its
    error instead, for the caller to raise when that split is used."""
    data = read_json(annotations, f"{key}.annotations")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise FNEError(f"{key}.annotations={str(annotations)!r}: expected a Karpathy JSON object with "
                       "an 'images' list")
    check_karpathy_ids(data["images"], annotations, key)
    pos_file, pos_key = (Path(positives), f"{key}.positives") if positives is not None else (
        annotations.with_name(annotations.stem + ".positives.json"), "positives file")
    raw_positives = read_json(pos_file, pos_key) if positives is not None or pos_file.is_file() else None
    out: dict[str, CaptionSplit | FNEError] = {}
    for name, wanted in splits.items():
        try:
            out[name] = _karpathy_split(data["images"], annotations, image_root, wanted, name, clean, raw_positives,
                                        pos_file, key)
        except FNEError as err:
            out[name] = err
    return out


def _karpathy_split(images: list, annotations: Path, image_root: Path, splits: Sequence[str], name: str,
                    clean: Callable[[str], str], raw_positives: object | None, pos_file: Path,
                    key: str) -> CaptionSplit:
    wanted = set(splits)
    paths, keys, captions, t2i, sentids, where = [], [], [], [], [], []
    for n, img in enumerate(images):
        try:
            if img["split"] not in wanted:
                continue
            sentences = img["sentences"]
            rel = os.path.join(img.get("filepath", ""), img["filename"])
            imgid = img.get("imgid", n)
        except (KeyError, TypeError) as err:
            raise FNEError(f"{key}.annotations={str(annotations)!r}: image entry {n} lacks key {err} "
                           "(expected split, filename, sentences)") from None
        if not sentences:
            raise FNEError(f"{annotations}: image {rel!r} (imgid {imgid}) has no captions")
        for s in sentences:
            if not isinstance(s, dict) or "raw" not in s:
                raise FNEError(f"{annotations}: a sentence of image {rel!r} lacks key 'raw'")
            captions.append(s["raw"])
            sentids.append(int(s.get("sentid", -1)))
            t2i.append(len(paths))
            where.append(f"{annotations} (imgid {imgid}, sentid {s.get('sentid')})")
        paths.append(str(image_root / rel))
        keys.append(str(imgid))
    if not paths:
        raise FNEError(f"{key}.annotations={str(annotations)!r}: no images in split(s) {list(splits)}")
    split = CaptionSplit(name, paths, _clean_all(captions, clean, where), np.asarray(t2i, np.int64), keys,
                         caption_keys=[str(s) for s in sentids] if all(s >= 0 for s in sentids) else [])
    if raw_positives is not None:
        split.positive_pairs = positive_pairs(raw_positives, pos_file, keys, sentids)
    return split


def check_karpathy_ids(images: list, annotations: Path, key: str = "data") -> None:
    """Image ids and sentence ids unique over the whole file, each sentence's ``imgid`` its image's.

    Real Karpathy files satisfy this; hand-made ones often do not, and two images sharing an
    ``imgid`` would silently become one image for same-image masking and the positives.
    One error names the first offending entry. An image without ``imgid`` has its position.
    """
    where = f"{key}.annotations={str(annotations)!r}"
    image_owner: dict[str, int] = {}
    sentence_owner: dict[str, int] = {}
    for n, img in enumerate(images):
        if not isinstance(img, dict):
            raise FNEError(f"{where}: image entry {n} is not an object")
        imgid = str(img.get("imgid", n))
        name = img.get("filename")
        if imgid in image_owner:
            first = image_owner[imgid]
            raise FNEError(f"{where}: image entry {n} ({name!r}) has imgid {imgid}, already used by image entry "
                           f"{first} ({images[first].get('filename')!r}); expected unique image ids")
        image_owner[imgid] = n
        for s in img.get("sentences") or []:
            if not isinstance(s, dict):
                continue  # reported with the caption checks
            if "imgid" in s and str(s["imgid"]) != imgid:
                raise FNEError(f"{where}: sentence {s.get('sentid')} of image entry {n} ({name!r}) has imgid "
                               f"{s['imgid']}, expected its image's imgid {imgid}")
            if "sentid" in s:
                sentid = str(s["sentid"])
                if sentid in sentence_owner:
                    raise FNEError(f"{where}: sentid {sentid} of image entry {n} ({name!r}) is already used in "
                                   f"image entry {sentence_owner[sentid]}; expected unique sentence ids")
                sentence_owner[sentid] = n


def read_positive_pairs(pos_file: Path, image_keys: list[str], sentids: list[int],
                    key: str = "positives file") -> np.ndarray:
    """Read a positives file ``{"<imgid>": [sentid, ...]}`` as (image index, caption index) pairs of a split.

    Ids that are not in the split are ignored.

    Args:
        pos_file: the positives file.
        image_keys: the split's image ids (:attr:`CaptionSplit.image_keys`).
        sentids: the split's caption ids, in caption order.
        key: how errors name the file.

    Returns:
        (P, 2) int64.
    """
    return positive_pairs(read_json(pos_file, key), pos_file, image_keys, sentids)


def positive_pairs(raw: object, pos_file: Path, image_keys: list[str], sentids: list[int]) -> np.ndarray:
    """:func:`read_positive_pairs` of the parsed file ``raw`` (read from ``pos_file``)."""
    if not isinstance(raw, dict):
        raise FNEError(f"{pos_file}: expected an object {{'<imgid>': [sentid, ...]}}")
    image_index = {k: i for i, k in enumerate(image_keys)}
    text_index = {s: j for j, s in enumerate(sentids) if s >= 0}
    pairs = [(image_index[k], text_index[s]) for k, sents in raw.items() if k in image_index
             for s in sents if s in text_index]
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def load_albef(annotations: Path, image_root: Path, name: str,
               clean: Callable[[str], str] = str, key: str = "data") -> CaptionSplit:
    """Read an ALBEF-style list into a :class:`CaptionSplit`.

    One row per caption (train) or per image (evaluation).

    Args:
        annotations: the JSON list of ``{"image", "caption"[, "image_id"]}`` rows, ``caption``
            a string or a list of strings.
        image_root: the directory the image paths are relative to.
        name: the split's name.
        clean: caption cleaning.
        key: the config that errors name (``<key>.annotations``).

    Raises:
        FNEError: a missing or malformed file, one image id for two files, or an empty caption.
    """
    rows = read_json(annotations, f"{key}.annotations")
    if not isinstance(rows, list) or not rows:
        raise FNEError(f"{key}.annotations={str(annotations)!r}: expected a non-empty JSON list of "
                       "{'image', 'caption'} rows")
    index: dict[str, int] = {}
    paths, keys, captions, t2i, where = [], [], [], [], []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            raise FNEError(f"{annotations}: row {n} lacks key 'image' or 'caption'")
        key = str(row.get("image_id", row["image"]))
        if key not in index:
            index[key] = len(paths)
            paths.append(str(image_root / row["image"]))
            keys.append(key)
        elif paths[index[key]] != str(image_root / row["image"]):
            # Same id, another file: same-image masking would treat two images as one.
            raise FNEError(f"{annotations}: row {n} gives image_id {key} to {row['image']!r}, which an earlier row "
                           f"gave to {os.path.relpath(paths[index[key]], image_root)!r}; expected one image per id")
        texts = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        if not texts:
            raise FNEError(f"{annotations}: image {row['image']!r} (row {n}) has no captions")
        for text in texts:
            captions.append(text)
            t2i.append(index[key])
            where.append(f"{annotations} (row {n})")
    return CaptionSplit(name, paths, _clean_all(captions, clean, where), np.asarray(t2i, np.int64), keys)


def image_problem(source: str | bytes) -> str | None:
    """Why ``source`` (a file path, or an image file's bytes) is not a usable image (missing, not an
    image, truncated), or None.

    Cheap enough for every image at set-up (a header parse and a look at the file's end):
    JPEG and PNG files cut short lack their end marker, which is the common truncation.
    A file that still fails to decode later raises :class:`FNEError` naming it.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            fmt = img.format
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as err:
        return f"unreadable image ({err})"
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt or "")
    if marker:
        if isinstance(source, bytes):
            tail = source[-1024:]
        else:
            with open(source, "rb") as f:
                f.seek(max(0, os.path.getsize(source) - 1024))
                tail = f.read()
        if marker not in tail:
            return f"truncated {fmt} (no end marker)"
    return None


def check_images(split: CaptionSplit, on_bad_image: str = "error", workers: int = 8,
                 key: str = "data") -> CaptionSplit:
    """Check every image of ``split`` (missing, not an image, truncated) before training.

    Threads, since the work is I/O.

    Args:
        split: the split to check.
        on_bad_image: ``error``: one error naming the first bad file and the count; ``skip``:
            log each bad file, drop it with its captions (and positives), log the count.
        workers: threads.
        key: the config the messages name (``<key>.root``, ``<key>.on_bad_image``).

    Returns:
        ``split``, or with ``skip`` a new split without the bad images, re-indexed.

    Raises:
        FNEError: a bad image with ``on_bad_image=error``, or no readable image left.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(image_problem, split.image_paths))
    bad = [i for i, p in enumerate(problems) if p]
    if not bad:
        return split
    first = split.image_paths[bad[0]]
    if on_bad_image == "error":
        raise FNEError(f"{first}: {problems[bad[0]]} ({len(bad)} of {split.num_images} {split.name} images are "
                       f"missing or unreadable; check {key}.root / {key}.image_root, or {key}.on_bad_image=skip)")
    for i in bad:
        log.warning("skipping %s image %s: %s", split.name, split.image_paths[i], problems[i])
    log.warning("skipped %d of %d %s images (%s.on_bad_image=skip)", len(bad), split.num_images, split.name, key)
    return drop_images(split, set(bad), key)


def drop_images(split: CaptionSplit, drop: set[int], key: str = "data") -> CaptionSplit:
    """``split`` without the images ``drop`` and their captions, indices renumbered."""
    keep = [i for i in range(split.num_images) if i not in drop]
    if not keep:
        raise FNEError(f"{key}.on_bad_image=skip: no readable {split.name} image is left")
    new_image = np.full(split.num_images, -1, np.int64)
    new_image[keep] = np.arange(len(keep))
    kept_text = np.flatnonzero(new_image[split.text_to_image] >= 0)
    new_text = np.full(split.num_texts, -1, np.int64)
    new_text[kept_text] = np.arange(len(kept_text))
    pairs = split.positive_pairs
    if pairs is not None:
        pairs = np.stack([new_image[pairs[:, 0]], new_text[pairs[:, 1]]], 1)
        pairs = pairs[(pairs >= 0).all(1)]
    return CaptionSplit(split.name, [split.image_paths[i] for i in keep], [split.captions[j] for j in kept_text],
                        new_image[split.text_to_image[kept_text]],
                        [split.image_keys[i] for i in keep] if split.image_keys else [], pairs,
                        [split.caption_keys[j] for j in kept_text] if split.caption_keys else [])


def open_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """The RGB image of a file, or of an image file's bytes.

    Args:
        source: a path, or the bytes of an image file.
        name: what to call it in errors (default: ``source``).

    Raises:
        FNEError: the image does not decode.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL's decode errors, incl. truncation
        raise FNEError(f"{name or source}: cannot decode image ({err})") from None


class ImageStore:
    """Loads RGB images by index (``store[i]``), optionally decoded once and kept in memory."""

    def __init__(self, paths: Sequence[str], preload: bool = False, blobs: Sequence[bytes] | None = None) -> None:
        """Keep the sources; with ``preload``, decode every image now.

        Args:
            paths: the image files, by image index.
            preload: decode every image once and keep it in memory.
            blobs: the images' encoded bytes (e.g. read from shards) instead of files; ``paths``
                then only name them.
        """
        self.paths = list(paths)
        self.blobs = None if blobs is None else list(blobs)
        self.cache = [self._open(i) for i in range(len(self.paths))] if preload else None

    def _open(self, i: int) -> Image.Image:
        return open_image(self.paths[i]) if self.blobs is None else open_image(self.blobs[i], self.paths[i])

    def __getitem__(self, i: int) -> Image.Image:
        return self.cache[i] if self.cache is not None else self._open(i)


Tokenize = Callable[[list[str]], Tensor]


class ImageInputs:
    """The model input of image i: ``inputs(i)`` is ``transform(store[i])``, a (3, H, W) tensor."""

    def __init__(self, store: ImageStore, transform: Callable, cache: bool = False) -> None:
        """Wrap a store and a transform.

        Args:
            store: the images.
            transform: PIL image -> tensor (:func:`~fne_lightning.data.transforms.build_transform`).
            cache: keep each result (only for deterministic transforms: evaluation, or training
                without augmentation).
        """
        self.store, self.transform = store, transform
        self.cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.store.paths)

    def __call__(self, i: int) -> Tensor:
        if self.cache is None:
            return self.transform(self.store[i])
        if i not in self.cache:
            self.cache[i] = self.transform(self.store[i])
        return self.cache[i]


class TextInputs:
    """The model input of caption j: ``inputs(j)`` is its (L,) token ids."""

    def __init__(self, captions: Sequence[str], tokenize: Tokenize, cache: bool = False) -> None:
        """Wrap the captions and a tokenizer.

        Args:
            captions: the captions, by caption index.
            tokenize: list of n captions -> (n, L) token ids.
            cache: tokenize each caption once and keep the result.
        """
        self.captions, self.tokenize = captions, tokenize
        self.cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.captions)

    def __call__(self, j: int) -> Tensor:
        if self.cache is not None and j in self.cache:
            return self.cache[j]
        tokens = self.tokenize([self.captions[j]])[0]
        if self.cache is not None:
            self.cache[j] = tokens
        return tokens


class PairDataset(Dataset):
    """Training pairs: item j is ``(image, tokens, image index, caption index)`` of caption j."""

    def __init__(self, text_to_image: np.ndarray, images: ImageInputs, texts: TextInputs) -> None:
        """Join the captions to their images.

        Args:
            text_to_image: (N_txt,) the image index of each caption.
            images: the image inputs.
            texts: the caption inputs.
        """
        self.text_to_image, self.images, self.texts = text_to_image, images, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, j: int) -> tuple[Tensor, Tensor, int, int]:
        i = int(self.text_to_image[j])
        return self.images(i), self.texts(j), i, j


class IndexedDataset(Dataset):
    """Evaluation items, each once: item i is ``(image or tokens, i)``."""

    def __init__(self, inputs: ImageInputs | TextInputs) -> None:
        """Serve ``inputs`` with their indices.

        Args:
            inputs: the images, or the captions, of a split.
        """
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.inputs(i), i


def positive_pairs_tensor(split: CaptionSplit) -> Tensor | None:
    """The positive pairs of a split as a (P, 2) LongTensor, or None when the dataset declares none.

    Args:
        split: the split.
    """
    return None if split.positive_pairs is None else torch.from_numpy(split.positive_pairs)
