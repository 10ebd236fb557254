"""Training pairs streamed from WebDataset shards (web-scale data: CC3M, CC12M, LAION subsets).

A shard is a tar file of samples in img2dataset's layout: ``<key>.jpg|jpeg|png|webp`` with
``<key>.txt`` (the caption) and optionally ``<key>.json``. Shards are local paths or any URL
webdataset opens (``pipe:``, ``http(s)://``, fsspec), written as brace patterns and ``::``-joined
lists as in open_clip (``/data/cc3m/{00000..00331}.tar``).

The stream serves what :class:`~fne_lightning.data.datasets.PairDataset` serves, batched:
(images (B, 3, H, W), tokens (B, L), image ids (B,), text ids (B,)). FNE masks captions of the
same image by their image id: the ``<key>.json`` field ``image_id_field`` when the sample has it,
else the key up to its last ``key_separator``, else the key itself (one caption per image, CC3M);
integers are kept, other values hashed (:func:`stable_id`). Text ids are the json field
``text_id_field`` when present (``make_shards`` writes the caption's index), else the hashed key.
With integer ids, a positives file ``{"<image_id>": [text_id, ...]}`` (``make_shards`` writes
``<split>.positives.json``) declares which pairs truly match: the false-negative diagnostics of
training (:func:`stream_positives`), and multi-positive metrics of validation and test read
from shards (:func:`read_split`).

Order and length (open_clip's ``get_wds_dataset``): every DataLoader worker of every rank is one
*reader*. Without resampling, epoch e shuffles the shard list from (seed, e), identically on every
rank, and reader (rank, worker) takes ``shards[rank::world][worker::workers]``, as
``wds.split_by_node`` and ``wds.split_by_worker`` would, with the rank taken from the trainer
rather than guessed from the environment inside a worker process; a reader that runs out of
shards before the epoch ends starts its own shards again. With ``resampled`` each reader draws
shards with replacement, seeded from (seed, e, rank, worker). Samples pass a shuffle buffer seeded
the same way. An epoch is ``train_num_samples // (batch_size * world)`` full batches on every rank
(equal counts: FNE's gathers need equal shapes), spread over the workers; the stream is cut there
as ``with_epoch`` does.

Bad input (a missing or corrupt shard, a sample without caption or image, an image that does not
decode) goes through webdataset's ``handler=`` hooks: :class:`BadInputHandler` raises one
:class:`~fne_lightning.errors.FNEError` naming the shard and key (``on_bad_image=error``) or logs it
and skips it with a running count (``skip``). Errors inside a worker come back to the main process
as one line (:class:`StreamError`), not a worker traceback; under DDP the data module stops every
rank on it together.

Resuming inside an epoch is exact: the stream of (seed, epoch, rank, worker) is replayed and the
batches already trained are dropped before decoding (:class:`ShardLoader`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import random
import subprocess
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from fne_lightning.data.datasets import CaptionSplit, image_problem, read_json, read_positive_pairs
from fne_lightning.errors import FNEError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LAYOUT = "<key>.jpg|jpeg|png|webp with <key>.txt"
SHUFFLE_INITIAL = 1000  # samples in the shuffle buffer before the first leaves it (open_clip's)


# ------------------------------------------------------------------ shard lists
def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """The shard URLs that a shard setting names.

    Args:
        spec: a string (``::``-joined, brace patterns, ``${WDS_*}`` variables, as
            ``wds.shardlists.expand_urls``) or a list of such strings.

    Returns:
        Every URL, in order.
    """
    items = [spec] if isinstance(spec, str) else [str(item) for item in spec]
    return [u for item in items for u in wds.shardlists.expand_urls(item) if u]


def local_path(url: str) -> str | None:
    """The file path of a local shard (a plain path or ``file://``), None for a URL or ``pipe:``."""
    parsed = urlparse(url)
    return url if parsed.scheme == "" else parsed.path if parsed.scheme == "file" else None


def missing_shards(urls: list[str]) -> list[str]:
    """The local shards of ``urls`` that are not files (remote URLs and ``pipe:`` are not checked)."""
    return [u for u in urls if (path := local_path(u)) is not None and not Path(path).is_file()]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, equal in every process (``hash()`` of strings is not)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stable_id(value: Any) -> int:
    """An int64 id of a sample's image or text id: integers as they are, anything else hashed.

    The hash (63 bits of BLAKE2b of the text) is the same in every process and run.

    Args:
        value: an id from ``<key>.json``, or a sample key.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def own_shards(urls: Sequence[str], seed: int, epoch: int, rank: int, world: int, worker: int,
               workers: int) -> list[str]:
    """The shards of reader (rank, worker) in ``epoch`` without resampling: the list shuffled from
    (seed, epoch), the same on every rank, then split by rank and by worker (disjoint slices)."""
    order = list(urls)
    random.Random(mix_seed(seed, epoch)).shuffle(order)
    return order[rank::world][worker::workers]


def shard_passes(urls: Sequence[str], seed: int, epoch: int, rank: int, world: int, worker: int, workers: int,
                 resampled: bool) -> Iterator[Iterable[str]]:
    """The passes over its shards of one reader (rank, worker) in ``epoch``: without resampling its
    own shards, again (in a new order) whenever they run out before the epoch does; with
    resampling one endless pass of shards drawn with replacement."""
    if resampled:
        rng = random.Random(mix_seed(seed, epoch, rank, worker))
        yield (urls[rng.randrange(len(urls))] for _ in itertools.count())
        return
    own = own_shards(urls, seed, epoch, rank, world, worker, workers)
    if not own:  # train_dataloader refuses this; an empty reader would end its rank's epoch early
        raise FNEError(f"data.train_shards: {len(urls)} shards for {world * workers} readers ({world} processes x "
                       f"{workers} workers); expected at least one shard per reader")
    for cycle in itertools.count():
        if cycle:
            random.Random(mix_seed(seed, epoch, rank, worker, cycle)).shuffle(own)
        yield list(own)


def share(total: int, worker: int, workers: int) -> int:
    """How many of ``total`` round-robin batches fall to ``worker``: the DataLoader takes one batch
    from each worker in turn, so batch k comes from worker ``k % workers``."""
    return total // workers + (worker < total % workers)


# ------------------------------------------------------------------ bad input
class BadSample(Exception):
    """A shard or sample that is not usable; the message names it and what was expected."""


class BadInputHandler:
    """webdataset ``handler=`` hook: raise one :class:`FNEError` (``error``) or log and skip (``skip``).

    ``where()`` names the shard being read, for exceptions that webdataset raises without it, and
    ``exit_status()`` the exit status of its ``pipe:`` command, if that failed. ``skipped`` is a
    counter shared by the workers of one rank (a running count in the log).
    """

    def __init__(self, on_bad_image: str, where: Callable[[], str], skipped: Any,
                 exit_status: Callable[[], int | None] = lambda: None, key: str = "data.on_bad_image") -> None:
        self.on_bad_image, self.where, self.skipped, self.exit_status = on_bad_image, where, skipped, exit_status
        self.key = key  # the setting, as errors and logs name it

    def describe(self, exn: Exception) -> str:
        if isinstance(exn, BadSample):
            return str(exn)
        first = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
        # A failed pipe: command gives an empty stream (tarfile: "empty file") or webdataset's
        # "exit N" error, whichever comes first; the exit status is the useful part.
        status = self.exit_status()
        if status:
            return f"{self.where()}: the pipe command exited with status {status} (shard missing or unreadable)"
        if isinstance(exn, FileNotFoundError):
            return f"{self.where()}: shard not found ({exn.strerror or first})"
        if isinstance(exn, (tarfile.TarError, EOFError)) or "end of data" in first:
            return f"{self.where()}: corrupt or truncated tar ({first}); expected a tar of {LAYOUT}"
        if isinstance(exn, ValueError) and "duplicate file name" in first:
            return f"{self.where()}: {first.split(':')[0]}: two members with one key and extension; expected {LAYOUT}"
        return f"{self.where()}: unreadable shard ({type(exn).__name__}: {first})"

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, FNEError):
            # Raised by this handler in an inner stage: the outer stages' except clauses append the
            # shard's stream and URL to its args before handing it on; keep the one line.
            exn.args = exn.args[:1]
            raise exn
        message = self.describe(exn)
        if self.on_bad_image == "error":
            raise FNEError(f"{message} ({self.key}=skip skips bad samples and shards)")
        with self.skipped.get_lock():
            self.skipped.value += 1
            count = self.skipped.value
        log.warning("skipped %s (%d skipped so far, %s=skip)", message, count, self.key)
        return True  # continue with the next sample or shard


class StreamError:
    """An :class:`~fne_lightning.errors.FNEError` raised in a worker, carried to the main process as a batch.

    A plain object, so Lightning passes it through its batch handling untouched; ``message``
    holds the error's line.
    """

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        """Carry one error line.

        Args:
            message: the :class:`~fne_lightning.errors.FNEError`'s line.
        """
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return StreamError, (self.message,)


class _TailCheck:
    """A shard's byte stream that can tell, once tarfile is done with it, whether the tar was whole.

    Python's tarfile ends an archive silently at a corrupt header after the first member, and at a
    header cut short: a whole tar ends in zero blocks with nothing after them. Non-zero bytes after
    the point tarfile stopped mean a corrupt member (undetected only within tarfile's 10 KB
    read-ahead); a stream whose last 1 KB is not zeros was truncated.
    """

    def __init__(self, stream: Any) -> None:
        self.stream, self.last = stream, b""

    def read(self, *args: Any) -> bytes:
        chunk = self.stream.read(*args)
        self.last = chunk[-1024:] if len(chunk) >= 1024 else (self.last + chunk)[-1024:]
        return chunk

    def problem(self) -> str | None:
        """Why the tar was not whole (read the rest first), or None."""
        while chunk := self.read(1 << 20):
            if chunk.strip(b"\0"):
                return "corrupt tar member (a bad header ended the archive early, data follows it)"
        if self.last.strip(b"\0") or len(self.last) < 1024:
            return "truncated tar (it lacks the end-of-archive blocks)"
        return None

    def close(self) -> None:
        self.stream.close()


# ------------------------------------------------------------------ samples
def parse_sample(sample: dict[str, Any], image_id_field: str | None, key_separator: str | None,
                 text_id_field: str | None) -> dict[str, Any]:
    """Check a raw sample's layout (one image, one caption), read its json and its ids (no decoding)."""
    key, url = sample["__key__"], sample.get("__url__", "?")
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None or "txt" not in sample:
        has = "a caption but no image" if ext is None and "txt" in sample else (
            "an image but no caption (.txt)" if ext is not None else "neither image nor caption")
        found = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(f"{url}: sample {key!r} has {has} (members {found}); expected {LAYOUT}")
    meta: Any = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadSample(f"{url}: sample {key!r}: <key>.json is not valid JSON ({err})") from None
    meta = meta if isinstance(meta, dict) else {}
    image_id: Any = meta.get(image_id_field) if image_id_field else None
    if image_id is None:
        image_id = key.rsplit(key_separator, 1)[0] if key_separator else key
    text_id: Any = meta.get(text_id_field) if text_id_field else None
    return {"key": key, "url": url, "image": sample[ext], "txt": sample["txt"], "image_id": stable_id(image_id),
            "text_id": stable_id(key if text_id is None else text_id), "name": meta.get("image")}


# ------------------------------------------------------------------ the stream
class ShardStream(IterableDataset):
    """One rank's training batches from shards: ``num_batches`` full batches per epoch.

    Each batch is ``(images (B, 3, H, W), tokens (B, L), image ids (B,), text ids (B,))``, or a
    :class:`StreamError` for bad input met in a worker. Order, ids and bad input: see
    :mod:`fne_lightning.data.shards`. Iterate it through a :class:`ShardLoader`, which tells it
    the epoch.
    """

    def __init__(self, urls: Sequence[str], batch_size: int, num_batches: int, transform: Callable,
                 tokenize: Callable, clean: Callable[[str], str] = str, image_id_field: str | None = "image_id",
                 key_separator: str | None = None, seed: int = 0, resampled: bool = False, shuffle_buffer: int = 5000,
                 on_bad_image: str = "error", rank: int = 0, world: int = 1, text_id_field: str | None = "text_id") -> None:
        """Keep the settings; shards are opened by each worker when it iterates.

        Args:
            urls: the expanded shard list (:func:`expand_shards`).
            batch_size: samples per batch.
            num_batches: the batches of one epoch on this rank.
            transform: PIL image -> (3, H, W) tensor.
            tokenize: list of captions -> (n, L) token ids.
            clean: caption cleaning.
            image_id_field: the ``<key>.json`` field of the image id.
            key_separator: without that field, the image id is the key up to its last
                ``key_separator`` (None: the key itself).
            seed: the run's seed; with the epoch, rank and worker it fixes the shard order and
                the shuffle buffer.
            resampled: draw shards with replacement (open_clip's ``--dataset-resampled``).
            shuffle_buffer: samples in the shuffle buffer (0: the order of the shards).
            on_bad_image: ``error`` or ``skip``.
            rank: this process's rank (from the trainer).
            world: the number of processes.
            text_id_field: the ``<key>.json`` field of the caption's id (else the hashed key).
        """
        super().__init__()
        self.urls, self.batch_size, self.num_batches = list(urls), batch_size, num_batches
        self.transform, self.tokenize, self.clean = transform, tokenize, clean
        self.image_id_field, self.key_separator, self.text_id_field = image_id_field, key_separator, text_id_field
        self.seed, self.resampled, self.shuffle_buffer = seed, resampled, shuffle_buffer
        self.on_bad_image, self.rank, self.world = on_bad_image, rank, world
        # Set by the loader before each epoch and read by (persistent) workers when it starts.
        self.epoch = multiprocessing.Value("q", 0, lock=False)
        self.skip = multiprocessing.Value("q", 0, lock=False)  # batches of this epoch already trained
        self.skipped = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return self.num_batches

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Set the epoch the next iteration serves, and the batches of it to skip (a resume).

        Args:
            epoch: the epoch.
            skip_batches: its batches already trained.
        """
        self.epoch.value, self.skip.value = epoch, skip_batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor] | StreamError]:
        try:
            yield from self._batches()
        except FNEError as err:
            yield StreamError(str(err))

    def _batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, trained = int(self.epoch.value), int(self.skip.value)
        # The DataLoader asks its workers in turn from worker 0; batch k of the epoch is worker
        # k % workers's. Resuming after `trained` batches, loader worker 0 must go on with the stream of
        # the worker whose turn is next, and so on round the table.
        worker = (loader_worker + trained) % workers
        count = share(self.num_batches, worker, workers)
        skip = share(trained, worker, workers)
        reader = _Reader(set(self.urls) if self.resampled else set())
        handler = BadInputHandler(self.on_bad_image, reader.where, self.skipped, reader.exit_status)
        samples = self._samples(reader, handler, epoch, worker, workers)
        # Resuming inside the epoch: drop the samples of the batches already trained before decoding.
        samples = itertools.islice(samples, skip * self.batch_size, None)
        samples = wds.map(self._decode, handler=handler)(samples)
        # Exactly the epoch's batches, full ones (the stream is endless). Not wds.batched: it reads a
        # sample past each batch, which at the epoch's end would start the next pass (and its buffer).
        for _ in range(count - skip):
            yield collate(list(itertools.islice(samples, self.batch_size)))

    def _samples(self, reader: _Reader, handler: BadInputHandler, epoch: int, worker: int,
                 workers: int) -> Iterator[dict[str, Any]]:
        """This reader's endless stream of checked (undecoded) samples, shuffled pass by pass: a pass
        yields each of its samples once, the buffer never mixes in the next pass."""
        passes = shard_passes(self.urls, self.seed, epoch, self.rank, self.world, worker, workers, self.resampled)
        for cycle, shards in enumerate(passes):
            samples = wds.map(self._pair, handler=handler)(reader.samples(shards, handler))
            if self.shuffle_buffer > 1:
                rng = random.Random(mix_seed(self.seed, epoch, self.rank, worker, cycle))
                initial = min(self.shuffle_buffer, SHUFFLE_INITIAL)
                samples = wds.shuffle(self.shuffle_buffer, initial=initial, rng=rng)(samples)
            count = 0
            for sample in samples:
                count += 1
                yield sample
            if not count:  # a whole pass without a usable sample: never loop on it
                raise FNEError(f"data.train_shards: no usable sample in any of this reader's {len(shards)} shards "
                               f"(the last {reader.url!r}); expected tars of {LAYOUT}")

    # ---------------------------------------------------------------- sample stages
    def _pair(self, sample: dict[str, Any]) -> dict[str, Any]:
        return parse_sample(sample, self.image_id_field, self.key_separator, self.text_id_field)

    def _decode(self, sample: dict[str, Any]) -> tuple[Tensor, Tensor, int, int]:
        key, url = sample["key"], sample["url"]
        try:
            with Image.open(io.BytesIO(sample["image"])) as img:
                image = img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:  # PIL's decode errors, truncation included
            raise BadSample(f"{url}: sample {key!r}: image does not decode ({err})") from None
        try:
            caption = self.clean(sample["txt"].decode("utf-8"))
        except UnicodeDecodeError as err:
            raise BadSample(f"{url}: sample {key!r}: caption is not UTF-8 ({err})") from None
        if not caption:
            raise BadSample(f"{url}: sample {key!r}: caption {sample['txt'][:80]!r} is empty after preprocessing")
        return self.transform(image), self.tokenize([caption])[0], sample["image_id"], sample["text_id"]


class _Reader:
    """Raw samples from a reader's shards (webdataset's tar iterators), checking that no shard ends
    early and, for an endless resampled pass, that the shards keep giving samples."""

    def __init__(self, pool: set[str]) -> None:
        self.pool = pool  # the shards an endless pass draws from (empty: passes are finite)
        self.url, self.tail, self.pipe = "", None, None
        self.seen = 0  # samples of the current shard
        self.barren: set[str] = set()  # shards read since the last one that gave a sample

    def where(self) -> str:
        return self.url

    def exit_status(self) -> int | None:
        """The exit status of the current shard's ``pipe:`` command once it ended (waits up to 2 s)."""
        proc = getattr(self.pipe, "proc", None)
        if proc is None:
            return None
        try:
            return proc.wait(timeout=2)
        except subprocess.TimeoutExpired:  # still streaming: the problem is elsewhere
            return None

    def _urls(self, shards: Iterable[str]) -> Iterator[dict[str, str]]:
        for url in shards:
            if self.url and self.pool:
                self.barren = set() if self.seen else self.barren | {self.url}
                if self.barren >= self.pool:  # every shard drawn, none gave a sample: never hang
                    raise FNEError(f"data.train_shards: no usable sample in any of the {len(self.pool)} shards "
                                   f"(the last {self.url!r}); expected tars of {LAYOUT}")
            self.url, self.seen = url, 0
            yield {"url": url}

    def _opened(self, sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in sources:
            self.pipe = source["stream"]
            if urlparse(source["url"]).path.endswith(".tar"):  # compressed tars are not checked
                source["stream"] = self.tail = _TailCheck(source["stream"])
            else:
                self.tail = None
            yield source

    def _files(self, files: Iterable[dict[str, Any]], handler: BadInputHandler) -> Iterator[dict[str, Any]]:
        for item in files:
            if item == {} and self.tail is not None and (problem := self.tail.problem()):  # end of one shard
                handler(BadSample(f"{self.url}: {problem}; expected a tar of {LAYOUT}"))
            yield item

    def samples(self, shards: Iterable[str], handler: BadInputHandler) -> Iterator[dict[str, Any]]:
        opened = self._opened(url_opener(self._urls(shards), handler=handler))
        files = self._files(tar_file_expander(opened, handler=handler), handler)
        for sample in group_by_keys(files, handler=handler):
            self.seen += 1
            yield sample


# ------------------------------------------------------------------ positives and whole splits
POSITIVES_FORMAT = '{"<image_id>": [text_id, ...]}'


def find_positives(urls: Sequence[str]) -> Path | None:
    """The positives file that the ``make_shards`` index beside the shards names, if any.

    Local shards only: an index is any ``*.json`` beside the first shard whose ``shards`` list
    that shard, and it counts only when it lists every shard of ``urls``.

    Args:
        urls: the expanded shard list.

    Returns:
        The positives file, or None.
    """
    paths = [local_path(u) for u in urls]
    if not paths or None in paths:
        return None
    shard = Path(paths[0])
    for candidate in sorted(shard.parent.glob("*.json")):
        try:
            index = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        entries = index.get("shards") if isinstance(index, dict) else None
        names = {e.get("name") for e in entries if isinstance(e, dict)} if isinstance(entries, list) else set()
        if shard.name in names:
            # Another index's shards share its ids (caption indices, image ids) but not its positives.
            if any(Path(p).parent != shard.parent or Path(p).name not in names for p in paths):
                log.warning("not using %s for the positives: not every shard of the list is in its index", candidate)
                return None
            name = index.get("positives")
            return shard.parent / name if isinstance(name, str) else None
    return None


def resolve_positives(setting: str | None, urls: Sequence[str], key: str) -> Path | None:
    """The positives file of a ``*_positives`` setting.

    Args:
        setting: ``auto`` (the file the shards' index names, :func:`find_positives`), None (no
            file) or a path.
        urls: the expanded shard list.
        key: how errors name the setting.

    Returns:
        The file, or None.

    Raises:
        FNEError: a path that is not a file.
    """
    if setting is None:
        return None
    if setting == "auto":
        return find_positives(urls)
    path = Path(os.path.expanduser(str(setting)))
    if not path.is_file():
        raise FNEError(f"{key}={str(setting)!r}: positives file not found (expected {POSITIVES_FORMAT} in the "
                       "shards' image and text ids; make_shards writes <split>.positives.json)")
    return path


def stream_positives(path: Path, key: str) -> np.ndarray:
    """Read a positives file ``{"<image_id>": [text_id, ...]}`` in a stream's (integer) ids.

    Args:
        path: the file.
        key: how errors name it.

    Returns:
        (P, 2) int64 (image id, text id) pairs.

    Raises:
        FNEError: a malformed file, or ids that are not non-negative integers (or too large).
    """
    raw = read_json(path, key)
    if not isinstance(raw, dict):
        raise FNEError(f"{key}={str(path)!r}: expected an object {POSITIVES_FORMAT}")
    pairs = []
    for image_id, text_ids in raw.items():
        if not (image_id.isdigit() and isinstance(text_ids, list)
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in text_ids)):
            raise FNEError(f"{key}={str(path)!r}: entry {image_id!r}: expected a non-negative integer image id "
                           f"with a list of non-negative integer text ids ({POSITIVES_FORMAT})")
        pairs.extend((int(image_id), t) for t in text_ids)
    out = np.asarray(pairs, np.int64).reshape(-1, 2)
    if len(out) and (int(out[:, 0].max()) + 1) * (int(out[:, 1].max()) + 1) >= 2**62:
        raise FNEError(f"{key}={str(path)!r}: image and text ids too large to index together "
                       "(expected ids below a few billion, as make_shards writes)")
    return out


def read_split(urls: Sequence[str], name: str, clean: Callable[[str], str], key: str,
               image_id_field: str | None = "image_id", key_separator: str | None = None,
               text_id_field: str | None = "text_id", on_bad_image: str = "error",
               positives: Path | None = None, positives_key: str = "positives",
               bad_input_key: str = "data.on_bad_image") -> tuple[CaptionSplit, list[bytes]]:
    """A whole evaluation split read from shards into memory.

    Unique images by image id and every caption, in text-id order (the annotations' order for
    shards that ``make_shards`` wrote). Bad input as for training (``on_bad_image``).

    Args:
        urls: the expanded shard list.
        name: the split's name.
        clean: caption cleaning.
        key: how errors name the shard list.
        image_id_field: as for :class:`ShardStream`.
        key_separator: as for :class:`ShardStream`.
        text_id_field: as for :class:`ShardStream`.
        on_bad_image: ``error`` or ``skip``.
        positives: a positives file ``{"<image_id>": [text_id, ...]}`` in the shards' ids, or None.
        positives_key: how errors name the positives file.
        bad_input_key: how errors name the ``on_bad_image`` setting.

    Returns:
        ``(split, blobs)``: the :class:`~fne_lightning.data.datasets.CaptionSplit` and each
        image's encoded bytes.

    Raises:
        FNEError: bad input (with ``error``), duplicate text ids, two images of one id, or no
            usable sample.
    """
    reader = _Reader(set())
    handler = BadInputHandler(on_bad_image, reader.where, multiprocessing.Value("q", 0), reader.exit_status,
                              key=bad_input_key)
    parse = functools.partial(parse_sample, image_id_field=image_id_field, key_separator=key_separator,
                              text_id_field=text_id_field)
    samples = sorted(wds.map(parse, handler=handler)(reader.samples(urls, handler)), key=lambda s: s["text_id"])
    index: dict[int, int] = {}
    bad_images: set[int] = set()
    first: dict[int, str] = {}
    names, blobs, image_keys, captions, text_to_image, text_ids = [], [], [], [], [], []
    for sample in samples:
        where = f"{sample['url']}: sample {sample['key']!r}"
        if sample["text_id"] in first:
            raise FNEError(f"{where} has text id {sample['text_id']}, as has sample {first[sample['text_id']]!r}; "
                           "expected one text id per caption")
        first[sample["text_id"]] = sample["key"]
        image_id = sample["image_id"]
        try:
            caption = clean(sample["txt"].decode("utf-8"))
            if not caption:
                raise BadSample(f"{where}: caption {sample['txt'][:80]!r} is empty after preprocessing")
            if image_id in bad_images:
                raise BadSample(f"{where}: its image (id {image_id}) did not decode in an earlier sample")
            i = index.get(image_id)
            if i is None:
                if problem := image_problem(sample["image"]):
                    bad_images.add(image_id)
                    raise BadSample(f"{where}: image does not decode ({problem})")
                i = index[image_id] = len(blobs)
                blobs.append(sample["image"])
                names.append(sample["name"] if isinstance(sample["name"], str) else f"{sample['url']}#{sample['key']}")
                image_keys.append(str(image_id))
            elif blobs[i] != sample["image"]:
                raise FNEError(f"{where} gives image id {image_id} another image than an earlier sample of that id; "
                               "expected one image per id")
        except UnicodeDecodeError as err:
            handler(BadSample(f"{where}: caption is not UTF-8 ({err})"))
            continue
        except BadSample as err:
            handler(err)
            continue
        captions.append(caption)
        text_to_image.append(i)
        text_ids.append(sample["text_id"])
    if not captions:
        raise FNEError(f"{key}: no usable sample in its {len(urls)} shards (the first {urls[0]!r}); expected tars "
                       f"of {LAYOUT}")
    split = CaptionSplit(name, names, captions, np.asarray(text_to_image, np.int64), image_keys)
    if positives is not None:
        split.positive_pairs = read_positive_pairs(positives, image_keys, text_ids, positives_key)
    return split, blobs


def collate(samples: list[tuple[Tensor, Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stack B decoded samples into a training batch.

    Args:
        samples: ``(image, tokens, image id, text id)`` of each sample.

    Returns:
        ``(images (B, 3, H, W), tokens (B, L), image ids (B,) int64, text ids (B,) int64)``.
    """
    images, tokens, image_ids, text_ids = zip(*samples, strict=True)
    return (torch.stack(images), torch.stack(tokens), torch.tensor(image_ids, dtype=torch.long),
            torch.tensor(text_ids, dtype=torch.long))


class ShardLoader(DataLoader):
    """The DataLoader of a :class:`ShardStream`.

    It tells the stream the epoch, resumes inside one (its position is saved in Lightning
    checkpoints, as for :class:`~fne_lightning.data.order.ResumableLoader`), and turns a
    worker's :class:`StreamError` into one :class:`~fne_lightning.errors.FNEError` line.
    """

    def __init__(self, stream: ShardStream, progress: Callable[[], tuple[int, int]] | None = None,
                 raise_errors: bool = True, **kwargs: Any) -> None:
        """Wrap a stream (its batches are already batched).

        Args:
            stream: the stream.
            progress: returns ``(epoch, batches trained in it)`` from the training loop; without
                it (benchmarks), each iteration is the next epoch.
            raise_errors: raise a worker's error here; False hands a :class:`StreamError` on as a
                batch instead, for the data module to stop every rank together.
            **kwargs: passed to ``DataLoader`` (``num_workers``, ``pin_memory``, ...).
        """
        super().__init__(stream, batch_size=None, **kwargs)
        self.progress, self.raise_errors = progress, raise_errors
        self._epochs = 0
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.dataset.num_batches

    @property
    def skipped(self) -> int:
        """Bad samples and shards skipped so far (``on_bad_image=skip``)."""
        return int(self.dataset.skipped.value)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        epoch = self.progress()[0] if self.progress is not None else self._epochs
        self._epochs = epoch + 1
        skip = 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                skip = self._resume[1]
            self._resume = None
        self.dataset.start_epoch(epoch, skip)  # before the workers (re)start iterating
        batches = super().__iter__()
        return self._checked(batches) if self.raise_errors else batches

    @staticmethod
    def _checked(batches: Iterator) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        for batch in batches:
            if isinstance(batch, StreamError):
                raise FNEError(batch.message)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The position to save, ``{"epoch": e, "batches": n}`` (batches trained in epoch e)."""
        epoch, batches = self.progress() if self.progress is not None else (self._epochs - 1, 0)
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after the saved position (a whole epoch saved: the next epoch from its start).

        Args:
            state: what :meth:`state_dict` returned.
        """
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self._resume = (epoch, batches)
