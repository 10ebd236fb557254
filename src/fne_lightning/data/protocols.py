"""The annotation files of published protocols, mapped onto a split (``data.protocol``).

``protocol=eccv`` follows the ``eccv_caption`` package (github.com/naver-ai/eccv-caption, on PyPI
as ``eccv-caption``): its ``eccv_caption/data/`` ships, in COCO's ids,

* ``original_image_to_caption.json`` / ``original_caption_to_image.json``: COCO's ground truth of
  the 5K test split (5,000 images, five captions each);
* ``cxc_*.json``: the positives of CxC (Parekh et al. 2021);
* ``eccv_*.json``: the positives of ECCV Caption (1,261 image queries, 1,332 caption queries);
* ``coco_test_ids.npy``: the 25,000 caption ids, in the order whose consecutive fifths are the
  COCO 1K folds.

They are read from the installed package (found without importing it, so the package need not
be a dependency) or from ``data.protocol_dir``. Images are mapped through the Karpathy JSON's
``cocoid``; captions through COCO's caption annotations (``data.coco_captions``) onto the Karpathy
sentence of the same image with the same text, as
:mod:`fne_lightning.convert_positives` does. The result is an
:class:`~fne_lightning.retrieval.protocols.EccvProtocol` of split indices.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fne_lightning.data.datasets import CaptionSplit
from fne_lightning.errors import FNEError
from fne_lightning.retrieval.protocols import EccvProtocol, QuerySet

log = logging.getLogger(__name__)

#: The protocols ``data.protocol`` / ``protocol=`` accept.
PROTOCOLS = ("eccv",)
#: The files of ``eccv_caption/data/`` the ECCV protocol reads.
ECCV_FILES = ("original_image_to_caption.json", "original_caption_to_image.json", "cxc_image_to_caption.json",
              "cxc_caption_to_image.json", "eccv_image_to_caption.json", "eccv_caption_to_image.json",
              "coco_test_ids.npy")
FOLDS = 5


@dataclass
class EccvFiles:
    """The ECCV Caption package's annotation files, in COCO ids."""

    directory: Path  #: Where they were read from.
    #: ``"<protocol>/<direction>"`` -> {query id: [positive ids]}: ``coco5k/i2t`` (the original
    #: ground truth), ``coco5k/t2i``, ``cxc/i2t``, ``cxc/t2i``, ``eccv/i2t``, ``eccv/t2i``.
    positives: dict[str, dict[int, list[int]]]
    caption_ids: list[int]  #: ``coco_test_ids.npy``: the 25,000 test caption ids, fold by fold.

    @property
    def image_ids(self) -> list[int]:
        """The 5,000 test image ids (the keys of ``original_image_to_caption.json``)."""
        return list(self.positives["coco5k/i2t"])


def eccv_directory(directory: str | None, key: str = "data.protocol_dir") -> Path:
    """The directory of the ECCV Caption files: ``directory``, or the installed ``eccv_caption``
    package's ``data/``.

    Raises:
        FNEError: no directory given and the package is not installed, or a file is missing.
    """
    if directory is None:
        spec = importlib.util.find_spec("eccv_caption")
        if spec is None or spec.origin is None:
            raise FNEError(f"{key}=null: the ECCV Caption protocol needs the eccv_caption package's annotation "
                           f"files: pip install eccv-caption, or {key}=<a directory holding {', '.join(ECCV_FILES)}>")
        path = Path(spec.origin).parent / "data"
    else:
        path = Path(directory).expanduser()
    missing = [name for name in ECCV_FILES if not (path / name).is_file()]
    if missing:
        raise FNEError(f"{key}={str(path)!r}: {missing[0]} not found (expected the files of eccv_caption/data/: "
                       f"{', '.join(ECCV_FILES)})")
    return path


def read_eccv_files(directory: Path, key: str = "data.protocol_dir") -> EccvFiles:
    """Read the seven files of :data:`ECCV_FILES` from ``directory``.

    Raises:
        FNEError: a file that is not what the package ships, naming it.
    """
    positives = {}
    for proto, stem in (("coco5k", "original"), ("cxc", "cxc"), ("eccv", "eccv")):
        for direction, name in (("i2t", "image_to_caption"), ("t2i", "caption_to_image")):
            path = directory / f"{stem}_{name}.json"
            try:
                with open(path, encoding="utf-8") as f:
                    raw = json.load(f)
                if not isinstance(raw, dict):
                    raise TypeError
                table = {int(k): [int(x) for x in v] for k, v in raw.items()}
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as err:
                raise FNEError(f"{key}: {path}: expected a JSON object {{\"<COCO id>\": [COCO ids]}} as eccv_caption "
                               f"ships it ({type(err).__name__})") from None
            if any(not v for v in table.values()):
                raise FNEError(f"{key}: {path}: a query lists no positive")
            positives[f"{proto}/{direction}"] = table
    path = directory / "coco_test_ids.npy"
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise FNEError(f"{key}: {path}: not a NumPy array file ({err})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or len(ids) % FOLDS:
        raise FNEError(f"{key}: {path}: expected a 1-d array of COCO caption ids, a multiple of {FOLDS} long")
    return EccvFiles(directory, positives, [int(x) for x in ids])


def build_eccv_protocol(files: EccvFiles, image_index: Mapping[int, int], caption_index: Mapping[int, int],
                        key: str = "data.protocol") -> EccvProtocol:
    """The protocol of ``files`` on a split whose images and captions have these COCO ids.

    Args:
        files: the package's files.
        image_index: COCO image id -> split image index, for the split's images that have one.
        caption_index: COCO caption id -> split caption index, likewise.
        key: how errors name the protocol's config key.

    Returns:
        The :class:`~fne_lightning.retrieval.protocols.EccvProtocol`; its ``notes`` say what could
        not be mapped. Caption queries without a split caption are left out (the package would
        need a ranking for them); positives without one cannot be retrieved but still count in R.

    Raises:
        FNEError: some of the protocol's images are not in the split (it is not COCO's 5K test).
    """
    image_ids = files.image_ids
    missing = [i for i in image_ids if i not in image_index]
    if missing:
        raise FNEError(f"{key}=eccv: the split holds {len(image_ids) - len(missing):,} of the {len(image_ids):,} "
                       f"COCO 5K test images of {files.directory / 'original_image_to_caption.json'} (COCO id "
                       f"{missing[0]} is missing); the protocol scores COCO's Karpathy 5K test split (data=coco, "
                       "split=test)")
    images = [image_index[i] for i in image_ids]
    gallery_captions = [c for c in files.caption_ids if c in caption_index]
    gallery = {"i2t": {caption_index[c] for c in gallery_captions}, "t2i": set(images)}
    index = {"i2t": (image_index, caption_index), "t2i": (caption_index, image_index)}
    query_sets, dropped = {}, {}
    for name, table in files.positives.items():
        direction = name.split("/")[1]
        query_index, item_index = index[direction]
        queries, pairs, n_relevant = [], [], []
        for query, items in table.items():
            if query not in query_index:
                dropped[name] = dropped.get(name, 0) + 1
                continue
            wanted = set(items)
            mapped = {item_index[i] for i in wanted if i in item_index} & gallery[direction]
            pairs += [(len(queries), j) for j in sorted(mapped)]
            queries.append(query_index[query])
            n_relevant.append(len(wanted))
        query_sets[name] = QuerySet(torch.tensor(queries, dtype=torch.long),
                                    torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
                                    torch.tensor(n_relevant, dtype=torch.long))
    folds = []
    owner = files.positives["coco5k/t2i"]
    step = len(files.caption_ids) // FOLDS
    for f in range(FOLDS):
        ids = files.caption_ids[f * step : (f + 1) * step]
        fold_images = sorted({image_index[owner[c][0]] for c in ids if c in owner})
        folds.append((torch.tensor(fold_images, dtype=torch.long),
                      torch.tensor(sorted(caption_index[c] for c in ids if c in caption_index), dtype=torch.long)))
    unmapped = len(files.caption_ids) - len(gallery_captions)
    notes = [f"ECCV Caption protocol (eccv_caption's files in {files.directory}): {len(images):,} images, "
             f"{len(gallery_captions):,} of {len(files.caption_ids):,} captions mapped onto the split"]
    if unmapped:
        notes.append(f"{unmapped:,} of the protocol's caption ids have no caption in the split: left out of the "
                     "galleries and the queries (" + ", ".join(f"{n}: {c:,} queries" for n, c in dropped.items())
                     + "); the numbers are not exactly the protocol's")
    return EccvProtocol(torch.tensor(images, dtype=torch.long), torch.tensor(sorted(gallery["i2t"]), dtype=torch.long),
                        query_sets, folds, notes)


def split_coco_ids(split: CaptionSplit, annotations: Path, coco_captions: Sequence[Path],
                   key: str = "data") -> tuple[dict[int, int], dict[int, int]]:
    """COCO image id -> split image index and COCO caption id -> split caption index of a split
    read from a Karpathy COCO JSON.

    Args:
        split: the split (:attr:`~fne_lightning.data.datasets.CaptionSplit.image_keys` are
            ``imgid``, :attr:`~fne_lightning.data.datasets.CaptionSplit.caption_keys` ``sentid``).
        annotations: the Karpathy JSON it was read from (its ``cocoid`` and raw sentences).
        coco_captions: COCO's caption annotations (``captions_val2014.json``, ...), whose ids the
            protocol's files use.
        key: the data config's key, for errors.

    Raises:
        FNEError: a missing or malformed file, or a split without sentence ids.
    """
    from fne_lightning.convert_positives import caption_sentids, karpathy_images

    if not split.caption_keys or not split.image_keys:
        raise FNEError(f"{key}.protocol: needs a split read from a Karpathy JSON ({key}.format=karpathy, with "
                       "imgid and sentid), to map COCO ids onto it")
    images = karpathy_images(annotations, f"{key}.annotations")
    wanted = set(split.image_keys)
    images = {cocoid: entry for cocoid, entry in images.items() if str(entry[0]) in wanted}
    image_of = {k: i for i, k in enumerate(split.image_keys)}
    caption_of = {k: j for j, k in enumerate(split.caption_keys)}
    image_index = {cocoid: image_of[str(imgid)] for cocoid, (imgid, _) in images.items()}
    sentids = caption_sentids(coco_captions, images, f"{key}.coco_captions")
    caption_index = {capid: caption_of[str(s)] for capid, s in sentids.items() if str(s) in caption_of}
    return image_index, caption_index


def load_protocol(name: str, split: CaptionSplit, annotations: object, coco_captions: object,
                  directory: str | None, key: str = "data") -> EccvProtocol:
    """The protocol ``name`` (``eccv``) on ``split``, from its files and the split's ids.

    Args:
        name: the protocol.
        split: the test split.
        annotations: the data config's ``annotations`` (a Karpathy COCO JSON).
        coco_captions: the data config's ``coco_captions``: a path or a list of paths.
        directory: the data config's ``protocol_dir`` (None: the installed package's files).
        key: the data config's key, for errors.

    Raises:
        FNEError: an unknown protocol, a missing file or key, or a split that is not COCO 5K.
    """
    if name not in PROTOCOLS:
        raise FNEError(f"{key}.protocol={name!r}: expected null or {' | '.join(PROTOCOLS)}")
    if not isinstance(annotations, (str, Path)):
        raise FNEError(f"{key}.protocol={name}: needs {key}.annotations, the Karpathy COCO JSON ({key}=coco)")
    if coco_captions is None or (isinstance(coco_captions, Sequence) and not isinstance(coco_captions, str)
                                 and not coco_captions):
        raise FNEError(f"{key}.coco_captions=null: protocol={name} needs COCO's caption annotations "
                       "(annotations/captions_val2014.json), whose ids its files use")
    paths = [Path(coco_captions)] if isinstance(coco_captions, (str, Path)) else [Path(p) for p in coco_captions]
    files = read_eccv_files(eccv_directory(directory, f"{key}.protocol_dir"), f"{key}.protocol_dir")
    image_index, caption_index = split_coco_ids(split, Path(annotations), paths, key)
    protocol = build_eccv_protocol(files, image_index, caption_index, f"{key}.protocol")
    outside = (split.num_images - protocol.images.numel(), split.num_texts - protocol.captions.numel())
    if any(outside):
        protocol.notes.append(f"{outside[0]:,} images and {outside[1]:,} captions of the split are not among the "
                              "protocol's and are left out of its galleries")
    for note in protocol.notes[1:]:
        log.warning(note)
    log.info(protocol.notes[0])
    return protocol
