"""WebDataset shards: written from the synthetic benchmark by ``make_shards`` and streamed back by
``data=webdataset`` (real tar files, real webdataset, real DataLoader workers, real gloo DDP).

Shards of the tiny synthetic split (32 images, 160 captions) in shards of 50: 50/50/50/10 samples,
so ranks and workers get uneven shards and the stream must still give every rank equal batches.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image

from fne_lightning.data.captions import clean_caption
from fne_lightning.data.datasets import positive_pairs_tensor
from fne_lightning.data.shards import ShardLoader, expand_shards, stable_id
from fne_lightning.datamodule import ShardDataModule, SyntheticDataModule
from fne_lightning.errors import FNEError
from fne_lightning.fne.positives import PositiveIndex
from fne_lightning.make_shards import RAW_CAPTIONS, make_shards
from fne_lightning.models.encoders import ImageConfig
from fne_lightning.train import build

from conftest import TINY_OVERRIDES, compose_config
from helpers import compose_task, run_entry_point

SIZES = ["data.num_train=32", "data.num_val=8", "data.num_test=8"]
IMAGE = ImageConfig(32, (0.5,) * 3, (0.5,) * 3)
NO_AUGMENT = ["data.augment.crop_scale=null", "data.augment.hflip=false", "data.augment.randaugment=null"]
MAX_TOKENS = 96


def byte_tokenize(texts: list[str]) -> torch.Tensor:
    """A reversible tokenizer: the caption's UTF-8 bytes, zero-padded (L = MAX_TOKENS)."""
    rows = [list(t.encode())[:MAX_TOKENS] for t in texts]
    return torch.tensor([r + [0] * (MAX_TOKENS - len(r)) for r in rows])


def detokenize(tokens: torch.Tensor) -> str:
    return bytes(tokens[tokens > 0].tolist()).decode()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, dict[str, Any], Any]:
    """(shard dir, index, the raw-caption train split they were written from)."""
    out = tmp_path_factory.mktemp("shards") / "train"
    cfg = compose_task("make_shards", [f"paths.cache_dir={cache_dir}", *SIZES, f"out_dir={out}", "shard_size=50"],
                       out.parent)
    index = make_shards(cfg)
    split = SyntheticDataModule(cache_dir=str(cache_dir / "synthetic"), num_train=32, num_val=8, num_test=8,
                                caption=RAW_CAPTIONS).load_split("train")
    return out, index, split


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, dict[str, Any]]:
    """val and test shards (with their positives files) of the tiny synthetic benchmark, in one directory."""
    out = tmp_path_factory.mktemp("shards") / "eval"
    return {split: make_shards(compose_task("make_shards", [f"paths.cache_dir={cache_dir}", *SIZES, f"out_dir={out}",
                                                            f"split={split}", "shard_size=15"], out.parent))
            for split in ("val", "test")}


def eval_shards(evaluation: dict[str, dict[str, Any]]) -> list[str]:
    return ["data@data.eval=webdataset_eval", *[f"data.eval.{s}_shards='{evaluation[s]['train_shards']}'"
                                                for s in ("val", "test")],
            "data.eval.eval_batch_size=16", "data.eval.num_workers=0"]


def shard_config(index: dict[str, Any], cache_dir: Path, *overrides: str):
    """The tiny train config with data=webdataset over ``index``'s shards (evaluation: tiny synthetic)."""
    rest = [o for o in TINY_OVERRIDES if not o.startswith("data.")]
    synthetic = [] if "data@data.eval=webdataset_eval" in overrides else [f"data.eval.{s[5:]}" for s in SIZES]
    return compose_config(["experiment=synthetic", "data=webdataset", f"data.train_shards='{index['train_shards']}'",
                           f"data.train_num_samples={index['num_samples']}", "data.batch_size=16",
                           "data.num_workers=0", "data.pin_memory=false", *synthetic,
                           "data.eval.eval_batch_size=16", *rest, *overrides], cache_dir)


def datamodule(index: dict[str, Any], cache_dir: Path, *overrides: str) -> ShardDataModule:
    cfg = shard_config(index, cache_dir, *NO_AUGMENT, *overrides)
    dm = instantiate(cfg.data, shuffle_seed=0)
    dm.use_encoder(IMAGE, byte_tokenize)
    return dm


def epoch_ids(loader: ShardLoader) -> list[list[int]]:
    """The text ids of each batch of one pass over ``loader``."""
    return [batch[3].tolist() for batch in loader]


# ----------------------------------------------------------------- writing
def test_make_shards_round_trip_keeps_every_sample_caption_and_image_id(written) -> None:
    out, index, split = written
    names = sorted(p.name for p in out.glob("train-*.tar"))
    assert [s["name"] for s in index["shards"]] == names == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["num_samples"] for s in index["shards"]] == [50, 50, 50, 10]
    assert index["num_samples"] == split.num_texts == 160 and index["num_images"] == split.num_images == 32
    assert json.loads((out / "train.json").read_text()) == index
    assert expand_shards(index["train_shards"]) == [str(out / n) for n in names]

    per_shard: dict[str, int] = {}
    seen = set()
    for sample in wds.WebDataset([str(out / n) for n in names], shardshuffle=False):
        meta = json.loads(sample["json"])
        j = meta["text_id"]
        i = int(split.text_to_image[j])
        assert sample["__key__"] == f"{j:09d}" and j not in seen
        seen.add(j)
        assert sample["txt"].decode() == split.captions[j]
        assert meta["image_id"] == int(split.image_keys[i])
        assert sample["png"] == Path(split.image_paths[i]).read_bytes()
        name = Path(sample["__url__"]).name
        per_shard[name] = per_shard.get(name, 0) + 1
    assert seen == set(range(160))
    assert per_shard == {s["name"]: s["num_samples"] for s in index["shards"]}


def test_make_shards_refuses_a_directory_with_shards(written, cache_dir: Path) -> None:
    out = written[0]
    cfg = compose_task("make_shards", [f"paths.cache_dir={cache_dir}", *SIZES, f"out_dir={out}"], out.parent)
    with pytest.raises(FNEError, match="already holds train shards"):
        make_shards(cfg)


# ----------------------------------------------------------------- reading
def test_stream_serves_the_caption_datamodule_batch_and_every_sample_once(written, cache_dir: Path) -> None:
    out, index, split = written
    dm = datamodule(index, cache_dir)
    loader = dm.train_dataloader()
    assert len(loader) == 160 // 16
    batches = list(loader)
    assert len(batches) == 10

    reference = SyntheticDataModule(cache_dir=str(cache_dir / "synthetic"), num_train=32, num_val=8, num_test=8,
                                    batch_size=16, image_config=IMAGE, tokenizer=byte_tokenize)
    expected = next(iter(reference.train_dataloader()))
    for got, want in zip(batches[0], expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape

    text_ids = [t for b in batches for t in b[3].tolist()]
    assert sorted(text_ids) == list(range(160))  # each sample exactly once; text id = the json's text_id
    for images, tokens, image_ids, ids in batches:
        for image, tok, image_id, j in zip(images, tokens, image_ids.tolist(), ids.tolist(), strict=True):
            i = int(split.text_to_image[j])
            assert image_id == int(split.image_keys[i])  # captions of one image share the id
            assert detokenize(tok) == clean_caption(split.captions[j])
            assert image.shape == (3, 32, 32)


def test_epochs_are_reproducible_from_seed_and_epoch_and_differ(written, cache_dir: Path) -> None:
    index = written[1]
    first = datamodule(index, cache_dir).train_dataloader()
    epoch0, epoch1 = epoch_ids(first), epoch_ids(first)
    assert epoch0 != epoch1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))
    assert epoch_ids(datamodule(index, cache_dir).train_dataloader()) == epoch0
    other_seed = instantiate(shard_config(index, cache_dir, *NO_AUGMENT).data, shuffle_seed=1)
    other_seed.use_encoder(IMAGE, byte_tokenize)
    assert epoch_ids(other_seed.train_dataloader()) != epoch0


@pytest.mark.parametrize("resampled", [False, True])
def test_two_workers_share_the_epoch_and_resume_mid_epoch_exactly(written, cache_dir: Path, resampled: bool) -> None:
    index = written[1]
    dm = datamodule(index, cache_dir, "data.num_workers=2", f"data.resampled={str(resampled).lower()}")
    full = dm.train_dataloader()
    full.progress = lambda: (1, 0)
    batches = list(full)
    assert len(batches) == 10
    ids = [t for b in batches for t in b[3].tolist()]
    assert len(ids) == 160 and set(ids) <= set(range(160))
    if not resampled:
        # Each worker yields 5 batches (80 samples) from its two shards: 50 + 50 samples (80 of them) or
        # 50 + 10 (all 60, then 20 again from its second pass), so 140 distinct samples.
        assert len(set(ids)) == 140

    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches": 3})  # what a checkpoint after 3 batches of epoch 1 holds
    resumed.progress = lambda: (1, 3)
    rest = list(resumed)
    assert len(rest) == 7
    for got, want in zip(rest, batches[3:], strict=True):
        assert torch.equal(got[3], want[3]) and torch.equal(got[0], want[0])
    assert len(list(resumed)) == 10  # the next pass is a whole epoch again


def test_resampled_stream_has_the_epoch_length_and_is_seeded(written, cache_dir: Path) -> None:
    index = written[1]
    loader = datamodule(index, cache_dir, "data.resampled=true").train_dataloader()
    epoch0 = epoch_ids(loader)
    assert len(epoch0) == 10 and all(len(b) == 16 for b in epoch0)
    assert set(sum(epoch0, [])) <= set(range(160))
    assert epoch_ids(datamodule(index, cache_dir, "data.resampled=true").train_dataloader()) == epoch0


def write_tar(path: Path, samples: list[dict[str, Any]]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def png(seed: int, size: int = 64) -> bytes:
    """A noise image: incompressible, so a shard of a few is tens of KB."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def good(key: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {"__key__": key, "png": png(seed), "txt": f"a noisy picture number {seed}", **extra}


def stream(index: dict[str, Any], cache_dir: Path, shards: str | list[str], num_samples: int,
           *overrides: str) -> ShardLoader:
    dm = datamodule(index, cache_dir, "data.batch_size=2", "data.shuffle_buffer=0", *overrides)
    dm.train_shards, dm.train_num_samples = shards, num_samples
    return dm.train_dataloader()


def test_image_ids_from_json_field_key_prefix_or_key(written, cache_dir: Path, tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "ids.tar", [good("a_0", 0), good("a_1", 1), good("b_0", 2),
                                             good("c_0", 3, json={"image_id": 7, "text_id": 42}),
                                             good("c_1", 4, json={"x": 1})])
    index = written[1]
    ids = next(iter(stream(index, cache_dir, str(shard), 5, "data.batch_size=5", "data.image_id.key_separator=_")))
    assert ids[2].tolist() == [stable_id("a"), stable_id("a"), stable_id("b"), 7, stable_id("c")]
    assert ids[3].tolist() == [stable_id(k) for k in ("a_0", "a_1", "b_0")] + [42, stable_id("c_1")]
    plain = next(iter(stream(index, cache_dir, str(shard), 5, "data.batch_size=5")))
    assert plain[2].tolist() == [stable_id(k) for k in ("a_0", "a_1", "b_0")] + [7, stable_id("c_1")]


# ----------------------------------------------------------------- bad input
def corrupt_header(path: Path, member: int) -> None:
    """Overwrite part of the tar header of the ``member``-th file (checksum no longer matches)."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member].offset
    raw = bytearray(path.read_bytes())
    raw[offset + 20:offset + 40] = b"#" * 20
    path.write_bytes(bytes(raw))


def bad_shard(case: str, tmp_path: Path) -> tuple[str, int]:
    """(shards, training samples) of one bad-input case; 24 samples, the bad one the 5th."""
    samples = [good(f"{k:04d}", k) for k in range(24)]
    bad = samples[4]
    if case == "no_caption":
        del bad["txt"]
    elif case == "no_image":
        del bad["png"]
    elif case == "undecodable":
        bad["png"] = b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10
    path = write_tar(tmp_path / f"{case}.tar", samples)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif case == "truncated_header":  # cut inside a header: tarfile takes it for the end of the archive
        with tarfile.open(path) as tar:
            cut = tar.getmembers()[3 * 2].offset + 100
        path.write_bytes(path.read_bytes()[:cut])
    elif case == "corrupt_member":
        corrupt_header(path, 3 * 2)  # the png of sample 3: the archive seems to end there
    elif case == "missing_shard":
        return str(tmp_path / "nope-{0..1}.tar"), 8
    elif case == "missing_url":
        return f"pipe:cat {tmp_path / 'nope.tar'}", 8
    return str(path), 20


BAD = {
    "no_caption": "sample '0004' has an image but no caption",
    "no_image": "sample '0004' has a caption but no image",
    "undecodable": "sample '0004': image does not decode",
    "truncated": "truncated.tar: corrupt or truncated tar",
    "truncated_header": "truncated_header.tar: truncated tar (it lacks the end-of-archive blocks)",
    "corrupt_member": "corrupt_member.tar: corrupt tar member",
    "missing_shard": "nope-0.tar' not found (2 of 2 shards missing",
    "missing_url": "nope.tar: the pipe command exited with status 1",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(written, cache_dir: Path, tmp_path: Path, case: str) -> None:
    shards, n = bad_shard(case, tmp_path)
    with pytest.raises(FNEError) as err:
        list(stream(written[1], cache_dir, shards, n))
    message = str(err.value)
    assert BAD[case] in message and "\n" not in message, message


def test_an_error_in_a_worker_is_one_line_too(written, cache_dir: Path, tmp_path: Path) -> None:
    shards, n = bad_shard("undecodable", tmp_path)
    other = write_tar(tmp_path / "other.tar", [good(f"x{k}", k) for k in range(24)])
    with pytest.raises(FNEError) as err:
        list(stream(written[1], cache_dir, [shards, str(other)], 2 * n, "data.num_workers=2"))
    message = str(err.value)
    assert BAD["undecodable"] in message and "\n" not in message and "Traceback" not in message


def test_empty_shard_list_is_refused(written, cache_dir: Path) -> None:
    cfg = shard_config(written[1], cache_dir)
    with open_dict(cfg):
        cfg.data.train_shards = ""
    with pytest.raises(Exception) as err:
        instantiate(cfg.data)
    from fne_lightning.errors import user_error

    assert "data.train_shards='': expected shard paths or URLs" in str(user_error(err.value))


def test_too_few_shards_for_the_readers_is_refused(written, cache_dir: Path, tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "one.tar", [good(f"{k}", k) for k in range(8)])
    with pytest.raises(FNEError, match=r"1 shards for 2 readers \(1 processes x 2 workers\)"):
        stream(written[1], cache_dir, str(shard), 8, "data.num_workers=2")


def test_skip_mode_skips_bad_samples_with_a_running_count(written, cache_dir: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    samples = [good(f"{k:04d}", k) for k in range(22)]
    del samples[3]["txt"]
    samples[7]["png"] = b"garbage"
    shard = write_tar(tmp_path / "mixed.tar", samples)
    loader = stream(written[1], cache_dir, [str(shard), str(tmp_path / "gone.tar")], 20, "data.on_bad_image=skip")
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert len(batches) == 10 and all(b[0].shape[0] == 2 for b in batches)
    assert loader.skipped == 2
    skipped = [r.getMessage() for r in caplog.records if "data.on_bad_image=skip" in r.getMessage()]
    assert any("gone.tar" in m for m in skipped)  # the missing shard, dropped at set-up
    assert any("'0003' has an image but no caption" in m and "(1 skipped so far" in m for m in skipped)
    assert any("'0007': image does not decode" in m and "(2 skipped so far" in m for m in skipped)
    kept = {stable_id(f"{k:04d}") for k in range(22)} - {stable_id("0003"), stable_id("0007")}
    assert {t for b in batches for t in b[3].tolist()} == kept


def test_skip_mode_never_hangs_on_shards_without_a_usable_sample(written, cache_dir: Path, tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "all_bad.tar", [{"__key__": f"{k}", "txt": "no image"} for k in range(4)])
    with pytest.raises(FNEError, match="no usable sample in any of this reader's 1 shards"):
        list(stream(written[1], cache_dir, str(shard), 4, "data.on_bad_image=skip"))


# ----------------------------------------------------------------- positives and evaluation from shards
def test_training_positives_are_the_annotations_in_the_streams_ids(written, cache_dir: Path) -> None:
    out, index, split = written
    assert index["positives"] == "train.positives.json" and (out / "train.positives.json").is_file()
    dm = datamodule(index, cache_dir)
    # The annotations' positives (image index, caption index), from dataset_synthetic.positives.json.
    expected = {(int(split.image_keys[i]), j) for i, j in split.positive_pairs.tolist()}
    got = {tuple(p) for p in dm.load_split("train").positive_pairs.tolist()}
    assert got == expected and len(expected) > split.num_texts  # more than each caption's own image
    assert datamodule(index, cache_dir, "data.train_positives=null").load_split("train").positive_pairs is None

    # What the loss's index answers for every (image id, text id) of a streamed batch: extra positives
    # included (a caption that truly describes another image of the batch).
    train = dm.load_split("train")
    positives = PositiveIndex()
    positives.set_pairs(positive_pairs_tensor(train), train.num_texts)  # as the module's setup does
    _, _, image_ids, text_ids = next(iter(dm.train_dataloader()))
    answer = positives.contains(image_ids[:, None], text_ids[None, :])
    truth = torch.tensor([[(int(i), int(t)) in expected for t in text_ids] for i in image_ids])
    own = image_ids[:, None] == image_ids[None, :]
    assert torch.equal(answer, truth) and bool((truth & ~own).any())


def test_evaluation_splits_from_shards_equal_those_of_the_annotations(evaluation, cache_dir: Path) -> None:
    assert all(evaluation[s]["positives"] == f"{s}.positives.json" for s in ("val", "test"))
    cfg = compose_config(["data=webdataset_eval", *[f"data.{s}_shards='{evaluation[s]['train_shards']}'"
                                                    for s in ("val", "test")], "data.num_workers=0"], cache_dir)
    dm = instantiate(cfg.data)
    dm.use_encoder(IMAGE, byte_tokenize)
    reference = SyntheticDataModule(cache_dir=str(cache_dir / "synthetic"), num_train=32, num_val=8, num_test=8,
                                    num_workers=0, image_config=IMAGE, tokenizer=byte_tokenize)
    for stage in ("val", "test"):
        got, want = dm.load_split(stage), reference.load_split(stage)
        assert got.captions == want.captions and got.image_keys == want.image_keys
        assert np.array_equal(got.text_to_image, want.text_to_image)
        assert np.array_equal(np.sort(got.positive_pairs, 0), np.sort(want.positive_pairs, 0))
        assert len(want.positive_pairs) > want.num_texts
        root = Path(reference.image_root)
        assert [root / p for p in got.image_paths] == [Path(p) for p in want.image_paths]  # names: the json's paths
        for ours, theirs in zip(dm._eval_loaders(stage), reference._eval_loaders(stage), strict=True):
            for a, b in zip(ours, theirs, strict=True):
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(FNEError, match="hold only val and test"):
        dm.load_split("train")


@pytest.mark.parametrize("case", ["missing_file", "bad_format", "no_val_shards", "missing_shard", "two_images",
                                  "bad_image"])
def test_bad_positives_and_evaluation_shards_are_one_clear_line(written, evaluation, cache_dir: Path,
                                                                 tmp_path: Path, case: str) -> None:
    index = written[1]
    if case in ("missing_file", "bad_format"):
        path = tmp_path / "pos.json"
        if case == "bad_format":
            path.write_text(json.dumps({"cat": [1, 2]}))
        expected = "data.train_positives=.*" + ("not found" if case == "missing_file" else "entry 'cat'")
        with pytest.raises(FNEError, match=expected):
            datamodule(index, cache_dir, f"data.train_positives={path}").load_all()
        return
    overrides = eval_shards(evaluation)
    if case == "no_val_shards":
        overrides, expected = [*overrides, "data.eval.val_shards=null"], "data.eval.val_shards: expected"
    elif case == "missing_shard":
        overrides = [*overrides, f"data.eval.test_shards={tmp_path / 'nope.tar'}"]
        expected = "data.eval.test_shards: shard .*nope.tar' not found"
    elif case == "two_images":  # one image id, two different images
        shard = write_tar(tmp_path / "two.tar", [good("x", 0, json={"image_id": 3}), good("y", 1, json={"image_id": 3})])
        overrides, expected = [*overrides, f"data.eval.test_shards={shard}"], "another image than an earlier sample"
    else:
        shard = write_tar(tmp_path / "bad.tar", [good("x", 0), {**good("y", 1), "png": b"not a picture"}])
        overrides, expected = [*overrides, f"data.eval.test_shards={shard}"], "bad.tar: sample 'y': image does not decode.*data.eval.on_bad_image=skip"
    with pytest.raises(FNEError, match=expected):
        datamodule(index, cache_dir, *overrides).load_all()


# ----------------------------------------------------------------- end to end
class RecordBatches(L.Callback):
    """Each rank writes the text ids of every training batch, per epoch."""

    def __init__(self, out: str) -> None:
        self.out, self.epochs = out, {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.epochs.setdefault(trainer.current_epoch, []).append(batch[3].tolist())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        Path(f"{self.out}/rank{trainer.global_rank}.json").write_text(json.dumps(self.epochs))


class SaveAt(L.Callback):
    """A checkpoint after optimizer step ``step``, from inside the epoch (as last.ckpt is written)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.slow
def test_two_process_ddp_ranks_see_disjoint_samples_and_equal_batches(written, cache_dir: Path,
                                                                      tmp_path: Path) -> None:
    index = written[1]
    cfg = shard_config(index, cache_dir, "loss.warmup_epochs=0", "data.num_workers=2")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    L.seed_everything(0)
    module, dm = build(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RecordBatches(str(tmp_path))])
    trainer.fit(module, datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    keys = set(range(160))
    for epoch in ("0", "1"):
        batches = [ranks[r][epoch] for r in range(2)]
        # 160 samples / (16 x 2 ranks): 5 full batches on each rank, although the shards are uneven.
        assert [len(b) for b in batches] == [5, 5] and all(len(x) == 16 for b in batches for x in b)
        seen = [{t for x in b for t in x} for b in batches]
        assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] <= keys
    assert ranks[0]["0"] != ranks[0]["1"]  # each epoch its own order


@pytest.mark.parametrize("text_id_field", ["text_id", None])
def test_positives_in_other_ids_than_the_stream_are_warned_about(written, cache_dir: Path, tmp_path: Path,
                                                                 text_id_field: str | None) -> None:
    """Shards read with another ``data.text_id_field`` than make_shards wrote them with: the text ids
    are the hashed keys, none is in the positives file, and every FN rate would read 0 unannounced."""
    index = written[1]
    cfg = shard_config(index, cache_dir, *NO_AUGMENT, f"data.text_id_field={text_id_field or 'null'}")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    module, dm = build(cfg)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm)
    messages = [str(w.message) for w in caught if "training positives" in str(w.message)]
    if text_id_field:
        assert messages == []
    else:  # 2 batches of 16; every image of the split has positives, no hashed key is a text id of the file
        assert len(messages) == 1 and messages[0].startswith(
            "training positives: of the 32 captions of epoch 0, 32 have their image id and 0 their text id in the "
            "positives file"), messages


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_trains_on_the_batches_the_uninterrupted_run_did(written, cache_dir: Path,
                                                                                 tmp_path: Path) -> None:
    index = written[1]
    cfg = shard_config(index, cache_dir, *NO_AUGMENT, "data.num_workers=2", "trainer.max_epochs=2")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)

    def fit(out: Path, max_steps: int, ckpt: Path | None = None) -> dict[str, list[list[int]]]:
        out.mkdir()
        L.seed_everything(0)
        module, dm = build(cfg)
        trainer = L.Trainer(accelerator="cpu", max_epochs=2, max_steps=max_steps, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[RecordBatches(str(out)), SaveAt(13, str(out / "step13.ckpt"))])
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return json.loads((out / "rank0.json").read_text())

    whole = fit(tmp_path / "whole", 20)
    first = fit(tmp_path / "first", 13)  # stops after batch 3 of epoch 1, as a preempted run would
    rest = fit(tmp_path / "rest", 20, tmp_path / "first" / "step13.ckpt")
    assert [len(whole[e]) for e in ("0", "1")] == [10, 10] and len(first["1"]) == 3 and list(rest) == ["1"]
    assert first["0"] == whole["0"] and first["1"] + rest["1"] == whole["1"]


@pytest.mark.slow
def test_entry_points_write_shards_and_train_on_them(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    proc = run_entry_point("make_shards", f"paths.cache_dir={cache_dir}", *SIZES, f"out_dir={out}", "shard_size=40",
                           f"hydra.run.dir={tmp_path / 'make'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "train.json").read_text())
    assert len(index["shards"]) == 4 and f"data.train_shards=\"{index['train_shards']}\"" in proc.stdout
    rest = [o for o in TINY_OVERRIDES if not o.startswith("data.")]
    for split in ("val", "test"):  # in-process: the entry point's own run is above
        make_shards(compose_task("make_shards", [f"paths.cache_dir={cache_dir}", *SIZES, f"out_dir={out}",
                                                 f"split={split}", "shard_size=15"], tmp_path / "make"))
    evaluation = {s: json.loads((out / f"{s}.json").read_text()) for s in ("val", "test")}
    run_dir = tmp_path / "run"
    proc = run_entry_point("train", "experiment=synthetic", "data=webdataset",
                           f"data.train_shards='{index['train_shards']}'", "data.train_num_samples=160",
                           "data.batch_size=16", "data.num_workers=2", *eval_shards(evaluation), *rest,
                           f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/rsum"] > 0 and metrics["val/rsum_best"] > 0
    # Training positives from the shards' index: the false-negative diagnostics are reported.
    assert metrics["fne/fn_base_rate"] > 0 and "fne/sampled_fn_rate" in metrics and "fne/hardest_fn_rate" in metrics
    # Evaluation from the shards is evaluation on the annotations: the same model scores the same.
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_entry_point("evaluate", f"ckpt_path={ckpt}", "data=synthetic", *SIZES, "data.num_workers=0",
                           f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    direct = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert direct["test/rsum"] == pytest.approx(metrics["test/rsum"], abs=1e-4)


@pytest.mark.slow
def test_entry_point_ddp_run_stops_every_rank_on_a_bad_shard_with_one_line(written, cache_dir: Path,
                                                                            tmp_path: Path) -> None:
    shards, _ = bad_shard("no_caption", tmp_path)
    others = [write_tar(tmp_path / f"other{n}.tar", [good(f"x{n}{k}", k) for k in range(24)]) for n in range(3)]
    rest = [o for o in TINY_OVERRIDES if not o.startswith(("data.", "trainer."))]
    run_dir = tmp_path / "run"
    # 2 ranks x 2 workers: the bad shard is one reader's; the other rank must not wait for it forever.
    proc = run_entry_point("train", "experiment=synthetic", "data=webdataset",
                           f"data.train_shards='{'::'.join([shards, *map(str, others)])}'",
                           "data.train_num_samples=80", "data.batch_size=2", "data.num_workers=2",
                           *[f"data.eval.{s[5:]}" for s in SIZES], *rest, "trainer=ddp", "trainer.accelerator=cpu",
                           "trainer.devices=2", "trainer.max_epochs=1", f"paths.cache_dir={cache_dir}",
                           f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    named = [e for e in errors if BAD["no_caption"] in e]
    others = [e for e in errors if e not in named]
    assert len(named) == 1 and len(others) <= 1, proc.stderr[-3000:]  # one line per rank
    assert all("another rank stopped on bad input" in e for e in others), errors
    assert "Traceback" not in proc.stderr and not (run_dir / "metrics.json").exists()
