"""LightningDataModules for image-caption data.

With ``module.py`` and ``callbacks.py``, the only code that imports Lightning.

Training serves (image, tokens, image index, caption index) pairs, one per caption.
Validation and test serve two loaders, unique images and all captions, so that every image
is encoded once and any number of captions per image works; the LightningModule joins
them with ``text_to_image`` and the split's positives.

``CaptionDataModule`` reads Flickr30K, MS-COCO or any Karpathy/ALBEF-format dataset;
``SyntheticDataModule`` first renders the built-in synthetic benchmark into a cache;
``ShardDataModule`` streams training pairs from WebDataset shards
(:mod:`fne_lightning.data.shards`) and takes validation and test from one of the others
(``ShardEvalDataModule`` reads them from shards too).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from fne_lightning.data.captions import clean_caption
from fne_lightning.data.datasets import (
    CaptionSplit,
    ImageInputs,
    ImageStore,
    IndexedDataset,
    PairDataset,
    TextInputs,
    check_images,
    load_albef,
    load_karpathy_splits,
)
from fne_lightning.data.order import ResumableLoader, ResumableSampler
from fne_lightning.data.protocols import PROTOCOLS, load_protocol
from fne_lightning.data.shards import (
    ShardLoader,
    ShardStream,
    StreamError,
    expand_shards,
    local_path,
    missing_shards,
    read_split,
    resolve_positives,
    stream_positives,
)
from fne_lightning.data.synthetic import FN_DENSITIES, build_synthetic
from fne_lightning.data.transforms import build_transform, is_random
from fne_lightning.errors import FNEError, check
from fne_lightning.models.encoders import ImageConfig

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")


MAX_AUTO_WORKERS = 4
# The evaluation splits each Lightning stage needs (modules whose training split is a stream).
EVAL_SPLITS = {"fit": ("val",), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def image_id_settings(image_id: Mapping[str, Any] | None, key: str = "data") -> tuple[str | None, str | None]:
    """(json field, key separator) of a ``<key>.image_id`` mapping for shards, checked."""
    image_id = dict(image_id or {})
    unknown = set(image_id) - {"field", "key_separator"}
    check(not unknown, f"{key}.image_id", "the keys field and key_separator", sorted(unknown))
    return image_id.get("field", "image_id"), image_id.get("key_separator")


def resolve_loader_settings(num_workers: int | str, pin_memory: bool | str, key: str = "data") -> tuple[int, bool]:
    """``auto`` values follow the machine (errors name ``<key>.num_workers`` / ``<key>.pin_memory``): workers up to the usable cores (at most
    :data:`MAX_AUTO_WORKERS`, so PyTorch never warns that there are more workers than cores), and
    pinned memory only when there is a GPU to copy to (without one pinning only costs time)."""
    import os

    import torch

    if num_workers == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_workers = min(MAX_AUTO_WORKERS, cores)
    check(isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0,
          f"{key}.num_workers", "auto or an integer >= 0", num_workers)
    if pin_memory == "auto":
        pin_memory = torch.cuda.is_available()
    check(isinstance(pin_memory, bool), f"{key}.pin_memory", "auto, true or false", pin_memory)
    return num_workers, pin_memory


class CaptionDataModule(L.LightningDataModule):
    """Karpathy-format (``format=karpathy``) or ALBEF-format (``format=albef``) caption data.

    ``data=karpathy``, ``f30k``, ``coco`` and ``albef`` in the config. Training serves
    ``(image, tokens, image index, caption index)`` batches, one item per caption, in an order
    that resumes exactly (:mod:`fne_lightning.data.order`); validation and test serve two
    loaders, the split's images and its captions, each item once. The image size, normalisation
    and tokenizer come from the encoder (:meth:`use_encoder`).
    """

    def __init__(
        self,
        root: str,
        annotations: str | Mapping[str, str] | None = None,
        image_root: str | None = None,
        format: str = "karpathy",
        splits: Mapping[str, Sequence[str]] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        preload_images: bool = False,
        cache_inputs: bool = False,
        augment: Mapping[str, Any] | None = None,
        caption: Mapping[str, Any] | None = None,
        positives: str | None = None,
        test_folds: int | None = None,
        protocol: str | None = None,
        protocol_dir: str | None = None,
        coco_captions: str | Sequence[str] | None = None,
        on_bad_image: str = "error",
        shuffle_seed: int = 0,
        image_config: ImageConfig | Mapping[str, Any] | None = None,
        tokenizer: Callable | None = None,
        config_key: str = "data",
    ) -> None:
        """Check the settings (config keys ``data.<name>``); nothing is read before set-up.

        Args:
            root: dataset directory (checked to exist).
            annotations: Karpathy JSON path, or for ALBEF a mapping ``{train, val, test}`` of paths.
            image_root: directory the image paths in the annotations are relative to (default
                ``root``).
            format: ``karpathy`` or ``albef``.
            splits: Karpathy split names per stage (COCO's ``restval`` joins train).
            batch_size: training pairs per batch and process.
            eval_batch_size: images, or captions, per evaluation batch.
            num_workers: loader processes; ``auto``: the CPU cores this process may use, at most 4.
            pin_memory: page-locked batches for fast host-to-GPU copies; ``auto``: when CUDA is
                present.
            preload_images: decode every image once at set-up and keep it in memory (small
                datasets).
            cache_inputs: keep each caption's tokens, and each image tensor where the transform is
                deterministic (evaluation; training without augmentation), after first use.
            augment: ``crop_scale``, ``hflip``, ``randaugment`` of the training transform
                (:func:`~fne_lightning.data.transforms.build_transform`).
            caption: ``lowercase``, ``strip_punctuation``, ``max_words`` of caption cleaning
                (:func:`~fne_lightning.data.captions.clean_caption`).
            positives: extra-positives file ``{"<imgid>": [sentid, ...]}`` (FNE_SPEC section 10)
                for a Karpathy JSON; default ``<annotations stem>.positives.json`` beside it, when
                it exists.
            test_folds: also score the test split as this many consecutive equal folds, averaged
                (COCO 1K: 5 folds of the 5K test set); None: the whole split only.
            protocol: also score the test split with a published protocol: ``eccv`` (ECCV
                Caption, CxC and COCO 5K / 1K as the ``eccv_caption`` package computes them;
                :mod:`fne_lightning.data.protocols`); None: ours only.
            protocol_dir: the protocol's annotation files (None: the installed package's).
            coco_captions: COCO's caption annotations (a path or a list), whose caption ids the
                protocol's files use.
            on_bad_image: every image is checked at set-up (missing, not an image, truncated):
                ``error`` stops with the first bad file named; ``skip`` drops bad images with their
                captions, logging each and the count.
            shuffle_seed: the training order of epoch e is a function of (shuffle_seed, e) only
                (the run's ``seed``), which makes resuming from a checkpoint exact, mid-epoch
                included.
            image_config: the encoder's image size and normalisation, supplied at run time.
            tokenizer: the encoder's tokenizer, supplied at run time.
            config_key: how errors name this config's keys: ``data`` (``data.<key>``), or
                ``data.eval`` for the evaluation config of ``data=webdataset`` (set by that
                config).

        Raises:
            FNEError: a bad value, naming its key.
        """
        super().__init__()
        k = config_key
        check(format in ("karpathy", "albef"), f"{k}.format", "karpathy or albef", format)
        check(isinstance(batch_size, int) and batch_size > 0, f"{k}.batch_size", "a positive integer", batch_size)
        check(isinstance(eval_batch_size, int) and eval_batch_size > 0, f"{k}.eval_batch_size",
              "a positive integer", eval_batch_size)
        num_workers, pin_memory = resolve_loader_settings(num_workers, pin_memory, k)
        check(positives is None or format == "karpathy", f"{k}.positives",
              "null for format=albef (a positives file indexes Karpathy imgid/sentid)", positives)
        check(test_folds is None or (isinstance(test_folds, int) and not isinstance(test_folds, bool)
                                     and test_folds >= 1), f"{k}.test_folds", "null or a positive integer",
              test_folds)
        self.root = root
        self.annotations = annotations
        self.image_root = image_root
        self.format = format
        self.splits = dict(splits or {"train": ["train", "restval"], "val": ["val"], "test": ["test"]})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.preload_images = preload_images
        self.cache_inputs = cache_inputs
        self.augment = dict(augment or {})
        self.clean = partial(clean_caption, **dict(caption or {}))
        self.positives = positives
        self.test_folds = test_folds
        check(protocol is None or protocol in PROTOCOLS, f"{k}.protocol", f"null or {' | '.join(PROTOCOLS)}", protocol)
        self.protocol, self.protocol_dir, self.coco_captions = protocol, protocol_dir, coco_captions
        self._protocols: dict[str, Any] = {}
        check(on_bad_image in ("error", "skip"), f"{k}.on_bad_image", "error or skip", on_bad_image)
        self.on_bad_image = on_bad_image
        self.shuffle_seed = shuffle_seed
        # Hydra's `_convert_: all` hands dataclass arguments over as dicts.
        self.image_config = ImageConfig(**image_config) if isinstance(image_config, Mapping) else image_config
        self.tokenizer = tokenizer
        self.config_key = config_key  # how errors name this config (data.eval when it is data=webdataset's)
        self.data: dict[str, CaptionSplit] = {}
        # Karpathy splits read with an earlier stage's (or their errors), not yet checked or used.
        self._parsed: dict[str, CaptionSplit | FNEError] = {}
        self._images: dict[str, ImageStore] = {}

    def use_encoder(self, image_config: ImageConfig, tokenizer: Callable) -> None:
        """Take the image size, the normalisation and the tokenizer from the encoder.

        Args:
            image_config: the encoder's :attr:`~fne_lightning.models.encoders.DualEncoder.image_config`.
            tokenizer: the encoder's tokenizer (list of captions -> (n, L) tokens).
        """
        self.image_config, self.tokenizer = image_config, tokenizer

    def load_all(self) -> None:
        """Parse every split and check its images now, so bad data fails before a model is built.

        Bad data includes a missing root or annotation file.

        Raises:
            FNEError: the first problem found, naming its file or key.
        """
        for stage in STAGES:
            self.load_split(stage)
        if self.protocol:
            self.protocol_targets()  # the protocol's files and ids map, before hours of training

    def protocol_targets(self, protocol: str | None = None) -> Any:
        """The published protocol to score the test split with, mapped onto it (built once).

        Args:
            protocol: the protocol (``eccv``); default: ``data.protocol``.

        Returns:
            An :class:`~fne_lightning.retrieval.protocols.EccvProtocol`, or None without a
            protocol.

        Raises:
            FNEError: a missing file or key, or a test split that is not the protocol's (COCO 5K).
        """
        protocol = protocol or self.protocol
        if not protocol:
            return None
        if protocol not in self._protocols:
            if self.format != "karpathy":
                raise FNEError(f"{self.config_key}.protocol={protocol}: needs {self.config_key}.format=karpathy "
                               "(COCO's Karpathy JSON, whose cocoid and sentid map the protocol's ids)")
            self._protocols[protocol] = load_protocol(protocol, self.load_split("test"), self.annotations,
                                                      self.coco_captions, self.protocol_dir, self.config_key)
        return self._protocols[protocol]

    # ----------------------------------------------------------------- reading
    def _annotation_path(self, stage: str) -> Path:
        if self.format == "albef":
            if not isinstance(self.annotations, Mapping) or stage not in self.annotations:
                raise FNEError(f"{self.config_key}.annotations: expected a mapping with a {stage!r} file for "
                               "format=albef")
            return Path(self.annotations[stage])
        if not isinstance(self.annotations, (str, Path)):
            raise FNEError(f"{self.config_key}.annotations: expected the path of a Karpathy JSON file")
        return Path(self.annotations)

    def load_split(self, stage: str) -> CaptionSplit:
        """The split of ``stage``, parsed (once) from the annotations and its images checked.

        Args:
            stage: ``train``, ``val`` or ``test``.

        Raises:
            FNEError: a missing root or annotation file, a malformed entry, a bad image (with
                ``on_bad_image=error``), or ``test_folds`` not dividing the test images.
        """
        if stage not in self.data:
            if not Path(self.root).is_dir():
                raise FNEError(f"{self.config_key}.root={str(self.root)!r}: directory not found")
            image_root = Path(self.image_root or self.root)
            path = self._annotation_path(stage)
            if self.format == "karpathy":
                if stage not in self.splits:
                    raise FNEError(f"{self.config_key}.splits: no entry for stage {stage!r}")
                if stage not in self._parsed:  # every stage not yet loaded, from one read of the file
                    names = [s for s in STAGES if s in self.splits and s not in self.data]
                    self._parsed = load_karpathy_splits(
                        path, image_root, {s: list(self.splits[s]) for s in names}, self.clean,
                        positives=None if self.positives is None else Path(self.positives), key=self.config_key)
                split = self._parsed.pop(stage)
                if isinstance(split, FNEError):
                    raise split
            else:
                split = load_albef(path, image_root, stage, self.clean, key=self.config_key)
            split = check_images(split, self.on_bad_image, key=self.config_key)
            if stage == "test" and self.test_folds and split.num_images % self.test_folds:
                raise FNEError(f"{self.config_key}.test_folds={self.test_folds}: expected a divisor of the "
                               f"{split.num_images} test images")
            self.data[stage] = split
        return self.data[stage]

    def setup(self, stage: str | None = None) -> None:
        if self.image_config is None or self.tokenizer is None:
            raise RuntimeError("CaptionDataModule needs image_config and tokenizer from the encoder")
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for name in wanted.get(stage, STAGES) if stage else STAGES:
            self.load_split(name)

    def _store(self, stage: str) -> ImageStore:
        if stage not in self._images:
            self._images[stage] = ImageStore(self.data[stage].image_paths, self.preload_images)
        return self._images[stage]

    def image(self, stage: str, i: int) -> Any:
        """The RGB image ``i`` of split ``stage``, as PIL decodes it, before any transform.

        Args:
            stage: ``train``, ``val`` or ``test``.
            i: the image index in that split.
        """
        self.load_split(stage)
        return self._store(stage)[i]

    # ------------------------------------------------------------- dataloaders
    def _loader(self, dataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        split = self.load_split("train")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if split.num_texts // world < self.batch_size:
            per_rank = f" ({split.num_texts // world} per rank over {world} processes)" if world > 1 else ""
            raise FNEError(f"{self.config_key}.batch_size={self.batch_size}: larger than the {split.num_texts} training "
                           f"captions{per_rank} (training uses full batches only)")
        transform = build_transform(self.image_config, train=True, **self.augment)
        # Inputs are cached only when nothing random happens to them (e.g. the synthetic data).
        images = ImageInputs(self._store("train"), transform, cache=self.cache_inputs and not is_random(transform))
        texts = TextInputs(split.captions, self.tokenizer, cache=self.cache_inputs)
        dataset = PairDataset(split.text_to_image, images, texts)
        # Sharded over ranks and shuffled from (seed, epoch); Lightning keeps it under DDP.
        sampler = ResumableSampler(dataset, self.batch_size, num_replicas=world, rank=rank, seed=self.shuffle_seed)
        return ResumableLoader(dataset, sampler, progress=self._train_progress, num_workers=self.num_workers,
                               pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def _train_progress(self) -> tuple[int, int]:
        """(epoch, batches trained in it), what a checkpoint must remember to resume mid-epoch."""
        trainer = self.trainer
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        split = self.load_split(stage)
        transform = build_transform(self.image_config, train=False)
        images = ImageInputs(self._store(stage), transform, cache=self.cache_inputs)
        texts = TextInputs(split.captions, self.tokenizer, cache=self.cache_inputs)
        return [
            self._loader(IndexedDataset(images), self.eval_batch_size),
            self._loader(IndexedDataset(texts), self.eval_batch_size),
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")


class SyntheticDataModule(CaptionDataModule):
    """The built-in synthetic benchmark (``data=synthetic``), rendered on first use into ``cache_dir``.

    Its Karpathy JSON carries a ``.positives.json`` listing every caption that truly describes
    each image, so multi-positive metrics and false-negative rates are always available
    (:mod:`fne_lightning.data.synthetic`).
    """

    def __init__(self, cache_dir: str, num_train: int = 4000, num_val: int = 500, num_test: int = 500,
                 image_size: int = 64, seed: int = 0, fn_density: str = "low", **kwargs: Any) -> None:
        """Check the settings; the dataset is rendered (once, by rank 0) in ``prepare_data``.

        Args:
            cache_dir: where the rendered datasets are kept (one directory per setting).
            num_train: training images (five captions each).
            num_val: validation images.
            num_test: test images.
            image_size: the side of the rendered images in pixels.
            seed: the seed of the scenes and captions.
            fn_density: how dense false negatives are: ``low`` (the benchmark's original captions),
                ``medium``, ``high`` or ``very_high`` (a quarter, half or four fifths of the
                captions vague, true of many images).
            **kwargs: the other arguments of :class:`CaptionDataModule` (not ``root`` or
                ``annotations``).
        """
        for key in ("root", "annotations"):  # e.g. `+data.root=...` left over from a real-data command
            check(kwargs.get(key) is None, f"{kwargs.get('config_key', 'data')}.{key}", "no value for data=synthetic (it is rendered into "
                  "data.cache_dir; use data=karpathy for a dataset on disk)", kwargs.get(key))
            kwargs.pop(key, None)
        kwargs.setdefault("splits", {"train": ["train"], "val": ["val"], "test": ["test"]})
        super().__init__(root=cache_dir, **kwargs)
        check(fn_density in FN_DENSITIES, f"{kwargs.get('config_key', 'data')}.fn_density", " | ".join(FN_DENSITIES),
              fn_density)
        self.synthetic = dict(num_train=num_train, num_val=num_val, num_test=num_test,
                              image_size=image_size, seed=seed, fn_density=fn_density)

    def _build(self) -> Path:
        Path(self.root).mkdir(parents=True, exist_ok=True)
        return build_synthetic(self.root, **self.synthetic)

    def load_all(self) -> None:
        """Nothing to check early: the data is rendered by rank 0 in ``prepare_data``, well formed."""

    def prepare_data(self) -> None:
        self._build()  # rank 0 renders; the write is atomic, so other ranks never see half a dataset

    def load_split(self, stage: str) -> CaptionSplit:
        if self.annotations is None:
            self.annotations = str(self._build())
            self.image_root = str(Path(self.annotations).parent)
        return super().load_split(stage)


class ShardEvalDataModule(CaptionDataModule):
    """Validation and test splits read from WebDataset shards (``data.eval`` of ``data=webdataset``).

    Also what ``evaluate`` reads shards with; the shards are typically ``make_shards`` of a
    Karpathy val/test split. Each split's shards are read whole into memory at set-up (encoded
    images, captions): unique images by image id, every caption, in text-id order (the
    annotations' order for shards that ``make_shards`` wrote), so the metrics are the same R@K /
    rsum / multi-positive numbers as from the annotations. It has no training split.
    """

    def __init__(self, val_shards: str | Sequence[str] | None = None, test_shards: str | Sequence[str] | None = None,
                 val_positives: str | None = "auto", test_positives: str | None = "auto",
                 image_id: Mapping[str, Any] | None = None, text_id_field: str | None = "text_id",
                 **kwargs: Any) -> None:
        """Check the settings; the shards are read at set-up.

        Args:
            val_shards: the validation split's shard paths or URLs (brace patterns, ``::``
                lists, lists).
            test_shards: the test split's.
            val_positives: extra positives ``{"<image_id>": [text_id, ...]}`` in the shards' ids:
                a file, ``auto`` (the one the ``make_shards`` index names) or None.
            test_positives: the same for the test split.
            image_id: as for :class:`ShardDataModule`.
            text_id_field: as for :class:`ShardDataModule`.
            **kwargs: the other arguments of :class:`CaptionDataModule` (``eval_batch_size``,
                ``test_folds``, ``caption``, ``cache_inputs``, ``preload_images``,
                ``num_workers``, ``pin_memory``, ``on_bad_image``, ...; not ``root``,
                ``annotations``, ``positives`` or ``image_root``).
        """
        for key in ("root", "annotations", "positives", "image_root"):
            check(kwargs.get(key) is None, f"{kwargs.get('config_key', 'data')}.{key}",
                  "no value for shards (val_shards / test_shards name them)", kwargs.get(key))
            kwargs.pop(key, None)
        super().__init__(root="", **kwargs)
        self.split_shards = {"val": val_shards, "test": test_shards}
        self.split_positives = {"val": val_positives, "test": test_positives}
        self.image_id_field, self.key_separator = image_id_settings(image_id, self.config_key)
        self.text_id_field = text_id_field
        self._blobs: dict[str, list[bytes]] = {}
        # Tables name the dataset after the shards' directory.
        first = next((expand_shards(s) for s in (test_shards, val_shards) if s), [])
        path = local_path(first[0]) if first else None
        self.root = str(Path(path).parent) if path else "shards"

    def load_split(self, stage: str) -> CaptionSplit:
        if stage not in self.data:
            key = f"{self.config_key}.{stage}_shards"
            if stage not in self.split_shards:
                raise FNEError(f"{self.config_key}: shards for evaluation hold only val and test splits (train from "
                               "shards with data=webdataset)")
            spec = self.split_shards[stage]
            if not spec:
                raise FNEError(f"{key}: expected the {stage} split's shard paths or URLs (e.g. "
                               f"'/data/f30k/{stage}-{{000000..000004}}.tar', written by make_shards)")
            urls = expand_shards(spec)
            if not urls:
                raise FNEError(f"{key}={spec!r}: expands to no shard")
            missing = missing_shards(urls)
            if missing:  # an evaluation split without some of its shards would give other numbers
                raise FNEError(f"{key}: shard {missing[0]!r} not found ({len(missing)} of {len(urls)} shards missing)")
            positives_key = f"{self.config_key}.{stage}_positives"
            split, blobs = read_split(urls, stage, self.clean, key, self.image_id_field, self.key_separator,
                                      self.text_id_field, self.on_bad_image,
                                      resolve_positives(self.split_positives[stage], urls, positives_key),
                                      positives_key, f"{self.config_key}.on_bad_image")
            if stage == "test" and self.test_folds and split.num_images % self.test_folds:
                raise FNEError(f"{self.config_key}.test_folds={self.test_folds}: expected a divisor of the "
                               f"{split.num_images} test images")
            self.data[stage], self._blobs[stage] = split, blobs
        return self.data[stage]

    def load_all(self) -> None:
        for stage in ("val", "test"):
            self.load_split(stage)

    def setup(self, stage: str | None = None) -> None:
        if self.image_config is None or self.tokenizer is None:
            raise RuntimeError("ShardEvalDataModule needs image_config and tokenizer from the encoder")
        for name in EVAL_SPLITS.get(stage, ("val", "test")) if stage else ("val", "test"):
            self.load_split(name)

    def _store(self, stage: str) -> ImageStore:
        if stage not in self._images:
            self._images[stage] = ImageStore(self.data[stage].image_paths, self.preload_images, self._blobs[stage])
        return self._images[stage]


class ShardDataModule(L.LightningDataModule):
    """Training pairs streamed from WebDataset shards (``data=webdataset``); evaluation from ``eval``.

    The stream (:class:`~fne_lightning.data.shards.ShardStream`) is never held in memory; each
    epoch is ``train_num_samples // (batch_size * world)`` full batches on every rank, and a run
    resumes inside an epoch exactly. Bad input stops every rank together, each with one line.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str] | None,
        train_num_samples: int | None,
        eval: CaptionDataModule,
        batch_size: int = 128,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        resampled: bool = False,
        shuffle_buffer: int = 5000,
        image_id: Mapping[str, Any] | None = None,
        text_id_field: str | None = "text_id",
        train_positives: str | None = "auto",
        on_bad_image: str = "error",
        augment: Mapping[str, Any] | None = None,
        caption: Mapping[str, Any] | None = None,
        shuffle_seed: int = 0,
        image_config: ImageConfig | Mapping[str, Any] | None = None,
        tokenizer: Callable | None = None,
    ) -> None:
        """Check the settings (config keys ``data.<name>``); the shards are opened by the loader.

        Args:
            train_shards: shard paths or URLs: a brace pattern, ``::``-joined patterns, or a list.
            train_num_samples: samples per epoch (all ranks together): every rank trains
                ``train_num_samples // (batch_size * world)`` full batches each epoch.
            eval: the data module (any other data config) whose val/test splits are evaluated,
                exactly as when training on it; its training split is never read.
            batch_size: training pairs per batch and process.
            num_workers: as for :class:`CaptionDataModule`.
            pin_memory: as for :class:`CaptionDataModule`.
            resampled: draw shards with replacement (each epoch a fresh sample of the shards).
            shuffle_buffer: samples shuffled in each reader's buffer (0: shard order).
            image_id: ``field`` of ``<key>.json`` holding the image id, and ``key_separator``
                (image id = the key up to its last separator) when the json lacks it; neither:
                the key.
            text_id_field: the ``<key>.json`` field holding the caption's id (``make_shards``
                writes ``text_id``); without it, the hashed key.
            train_positives: which (image id, text id) pairs truly match,
                ``{"<image_id>": [text_id, ...]}`` (integer ids), for the false-negative
                diagnostics of training: a file, ``auto`` (the one the ``make_shards`` index
                beside the shards names, if any) or None (none).
            on_bad_image: ``error`` stops at the first bad shard or sample, named; ``skip`` logs
                and skips it.
            augment: as for :class:`CaptionDataModule`.
            caption: as for :class:`CaptionDataModule`.
            shuffle_seed: as for :class:`CaptionDataModule`.
            image_config: as for :class:`CaptionDataModule`.
            tokenizer: as for :class:`CaptionDataModule`.

        Raises:
            FNEError: a bad value, naming its key.
        """
        super().__init__()
        check(isinstance(train_shards, (str, Sequence)) and bool(train_shards), "data.train_shards",
              "shard paths or URLs (e.g. '/data/cc3m/{00000..00331}.tar', patterns joined with ::)", train_shards)
        check(isinstance(train_num_samples, int) and not isinstance(train_num_samples, bool)
              and train_num_samples > 0, "data.train_num_samples", "the number of training samples per epoch",
              train_num_samples)
        check(isinstance(eval, CaptionDataModule), "data.eval", "a data config with val and test splits "
              "(synthetic, karpathy, f30k, coco, albef)", type(eval).__name__)
        check(isinstance(batch_size, int) and batch_size > 0, "data.batch_size", "a positive integer", batch_size)
        check(isinstance(shuffle_buffer, int) and shuffle_buffer >= 0, "data.shuffle_buffer", "an integer >= 0",
              shuffle_buffer)
        check(isinstance(resampled, bool), "data.resampled", "true or false", resampled)
        check(on_bad_image in ("error", "skip"), "data.on_bad_image", "error or skip", on_bad_image)
        eval.config_key = "data.eval"  # its errors at set-up name data.eval.<key>
        self.train_shards, self.train_num_samples, self.eval = train_shards, train_num_samples, eval
        self.batch_size, self.resampled, self.shuffle_buffer = batch_size, resampled, shuffle_buffer
        self.num_workers, self.pin_memory = resolve_loader_settings(num_workers, pin_memory)
        self.image_id_field, self.key_separator = image_id_settings(image_id)
        self.text_id_field, self.train_positives = text_id_field, train_positives
        self._train_split: CaptionSplit | None = None
        self.on_bad_image = on_bad_image
        self.augment = dict(augment or {})
        self.clean = partial(clean_caption, **dict(caption or {}))
        self.shuffle_seed = shuffle_seed
        self.image_config = ImageConfig(**image_config) if isinstance(image_config, Mapping) else image_config
        self.tokenizer = tokenizer
        self._urls: list[str] | None = None

    # Evaluation is the eval module's: evaluate.py and the module read these of any data module.
    test_folds = property(lambda self: self.eval.test_folds)
    root = property(lambda self: self.eval.root)
    annotations = property(lambda self: self.eval.annotations)
    image_root = property(lambda self: self.eval.image_root)

    def use_encoder(self, image_config: ImageConfig, tokenizer: Callable) -> None:
        self.image_config, self.tokenizer = image_config, tokenizer
        self.eval.use_encoder(image_config, tokenizer)

    def shards(self) -> list[str]:
        """The expanded list of training shards; local shards are checked to exist.

        With ``on_bad_image=skip`` missing shards are dropped (and logged), else the first one
        is an error.

        Raises:
            FNEError: the list expands to no shard, or a shard is missing.
        """
        if self._urls is None:
            urls = expand_shards(self.train_shards)
            if not urls:
                raise FNEError(f"data.train_shards={self.train_shards!r}: expands to no shard")
            missing = missing_shards(urls)
            if missing and self.on_bad_image == "error":
                raise FNEError(f"data.train_shards: shard {missing[0]!r} not found ({len(missing)} of {len(urls)} "
                               "shards missing; data.on_bad_image=skip trains without them)")
            for url in missing:
                log.warning("skipping missing shard %s (data.on_bad_image=skip)", url)
            urls = [u for u in urls if u not in set(missing)]
            if not urls:
                raise FNEError(f"data.train_shards={self.train_shards!r}: none of the shards exists")
            self._urls = urls
        return self._urls

    def load_all(self) -> None:
        """Check the shard list and the evaluation splits now, before a model is built."""
        self.load_split("train")
        for stage in ("val", "test"):
            self.eval.load_split(stage)

    def load_split(self, stage: str) -> CaptionSplit:
        """The split of ``stage``: for val and test the ``eval`` module's.

        For train, a split without images or captions (the stream is never held in memory):
        only the declared positives (``train_positives``) as (image id, text id) pairs of the
        stream, which the false-negative diagnostics test the bank's candidates against;
        without them the diagnostics are off.

        Args:
            stage: ``train``, ``val`` or ``test``.
        """
        if stage != "train":
            return self.eval.load_split(stage)
        if self._train_split is None:
            split = CaptionSplit("train", [], [], np.zeros(0, np.int64))
            path = resolve_positives(self.train_positives, self.shards(), "data.train_positives")
            if path is not None:
                split.positive_pairs = stream_positives(path, "data.train_positives")
                log.info("training positives: %d pairs from %s", len(split.positive_pairs), path)
            self._train_split = split
        return self._train_split

    def prepare_data(self) -> None:
        self.eval.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.image_config is None or self.tokenizer is None:
            raise RuntimeError("ShardDataModule needs image_config and tokenizer from the encoder")
        for name in EVAL_SPLITS.get(stage, ("val", "test")) if stage else ("val", "test"):
            self.eval.load_split(name)

    def train_dataloader(self) -> ShardLoader:
        urls = self.shards()
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        num_batches = self.train_num_samples // (self.batch_size * world)
        if num_batches == 0:
            raise FNEError(f"data.train_num_samples={self.train_num_samples}: less than one global batch "
                           f"({self.batch_size} x {world} processes; training uses full batches only)")
        readers = world * max(self.num_workers, 1)
        if not self.resampled and len(urls) < readers:
            raise FNEError(f"data.train_shards: {len(urls)} shards for {readers} readers ({world} processes x "
                           f"{max(self.num_workers, 1)} workers); expected at least one shard per reader (more "
                           "shards, a smaller data.num_workers, or data.resampled=true)")
        stream = ShardStream(
            urls, self.batch_size, num_batches, build_transform(self.image_config, train=True, **self.augment),
            self.tokenizer, self.clean, image_id_field=self.image_id_field, key_separator=self.key_separator,
            text_id_field=self.text_id_field,
            seed=self.shuffle_seed, resampled=self.resampled, shuffle_buffer=self.shuffle_buffer,
            on_bad_image=self.on_bad_image, rank=rank, world=world)
        # Lightning warns that an IterableDataset's length may be wrong with workers; this one's is
        # exact (each worker yields its share of the epoch's batches).
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        return ShardLoader(stream, progress=self._train_progress if trainer is not None else None,
                           raise_errors=trainer is None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                           persistent_workers=self.num_workers > 0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Bad input that one rank met stops every rank, each with one line: no rank is left waiting
        in a collective of the step (one all-reduce of a flag per training step under DDP)."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch
        failed = isinstance(batch, StreamError)
        anywhere = trainer.strategy.reduce_boolean_decision(failed, all=False) if trainer.world_size > 1 else failed
        if failed:
            raise FNEError(batch.message)
        if anywhere:
            raise FNEError("data.train_shards: another rank stopped on bad input (its error line names the shard)")
        return batch

    def _train_progress(self) -> tuple[int, int]:
        trainer = self.trainer
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def image(self, stage: str, i: int) -> Any:
        return self.eval.image(stage, i)

    def val_dataloader(self) -> list[DataLoader]:
        return self.eval.val_dataloader()

    def test_dataloader(self) -> list[DataLoader]:
        return self.eval.test_dataloader()
