"""Annotation parsing (Karpathy, ALBEF), caption cleaning and the datamodule, on real JPEG files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fne_lightning.data.captions import clean_caption
from fne_lightning.data.datasets import load_albef, load_karpathy
from fne_lightning.datamodule import CaptionDataModule
from fne_lightning.errors import FNEError
from fne_lightning.models.encoders import ImageConfig

from helpers import write_karpathy

# Uneven captions per image: 1, 3, 7, 2 (train/val/test mixed, plus a restval image).
CAPTIONS = {0: ("train", 1), 1: ("train", 3), 2: ("val", 7), 3: ("test", 2), 4: ("restval", 2)}


def write_jpeg(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), colour).save(path, format="JPEG")


@pytest.fixture
def karpathy(tmp_path: Path) -> Path:
    path = write_karpathy(tmp_path, [split for split, _ in CAPTIONS.values()],
                          lambda i, split: [f"A Photo, number {i}-{k}!" for k in range(CAPTIONS[i][1])],
                          lambda i: Image.new("RGB", (20, 12), (i * 40, 10, 200)), name="dataset_toy.json",
                          folder="imgs", sentence_imgid=True)
    # Image 1 is also described by image 0's caption (sentid 0); one entry points outside the split.
    (tmp_path / "dataset_toy.positives.json").write_text(json.dumps({"0": [0], "1": [0, 1, 2, 3], "2": [4]}))
    return path


def test_clean_caption_follows_the_published_recipe() -> None:
    raw = "A man/woman, on a half-pipe; (skating)!  Is it \"cool\"?  #fun ~yes: " + "w " * 40
    out = clean_caption(raw)
    assert out.startswith("a man woman on a half pipe skating is it cool fun yes w")
    assert len(out.split()) == 30
    assert clean_caption("Keep Case.", lowercase=False) == "Keep Case"
    assert clean_caption("?!...") == ""


def test_karpathy_uneven_captions_and_restval(karpathy: Path) -> None:
    train = load_karpathy(karpathy, karpathy.parent, ["train", "restval"], "train", clean_caption)
    assert train.num_images == 3 and train.num_texts == 1 + 3 + 2
    assert train.text_to_image.tolist() == [0, 1, 1, 1, 2, 2]
    assert train.captions[0] == "a photo number 0 0"
    assert train.image_paths[1].endswith("imgs/1.jpg")
    # positives: (image 0, sent 0), (image 1, sents 0..3) within the split; sent 4 is in val.
    pairs = {tuple(p) for p in train.positive_pairs.tolist()}
    assert pairs == {(0, 0), (1, 0), (1, 1), (1, 2), (1, 3)}
    val = load_karpathy(karpathy, karpathy.parent, ["val"], "val")
    assert val.num_images == 1 and val.num_texts == 7 and set(val.text_to_image.tolist()) == {0}


def test_albef_train_and_eval_lists(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        write_jpeg(tmp_path / "img" / f"{name}.jpg", (0, 100, 0))
    train = [{"image": "img/a.jpg", "caption": "one", "image_id": "a"},
             {"image": "img/b.jpg", "caption": "two", "image_id": "b"},
             {"image": "img/a.jpg", "caption": "three", "image_id": "a"}]
    test = [{"image": "img/c.jpg", "caption": ["x", "y", "z", "w"]}, {"image": "img/a.jpg", "caption": ["q"]}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    tr = load_albef(tmp_path / "train.json", tmp_path, "train")
    assert tr.num_images == 2 and tr.text_to_image.tolist() == [0, 1, 0]
    te = load_albef(tmp_path / "test.json", tmp_path, "test")
    assert te.num_images == 2 and te.text_to_image.tolist() == [0, 0, 0, 0, 1]
    # One image_id given to two files would make them one image for same-image masking.
    (tmp_path / "bad.json").write_text(json.dumps([*train, {"image": "img/c.jpg", "caption": "four", "image_id": "b"}]))
    with pytest.raises(FNEError, match=r"row 3 gives image_id b to 'img/c.jpg', which an earlier row gave to "
                                       r"'img/b.jpg'"):
        load_albef(tmp_path / "bad.json", tmp_path, "train")


def _tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t), 1, 0, 0] for t in texts])


def test_datamodule_serves_pairs_and_separate_eval_loaders(karpathy: Path) -> None:
    dm = CaptionDataModule(root=str(karpathy.parent), annotations=str(karpathy), batch_size=2,
                           eval_batch_size=4, num_workers=0, pin_memory=False,
                           image_config=ImageConfig(16, (0.5,) * 3, (0.5,) * 3), tokenizer=_tokenize)
    dm.setup("fit")
    images, tokens, image_ids, text_ids = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and tokens.shape == (2, 4)
    assert all(dm.data["train"].text_to_image[t] == i for i, t in zip(image_ids.tolist(), text_ids.tolist(), strict=True))
    image_loader, text_loader = dm.val_dataloader()
    assert sum(b[0].shape[0] for b in image_loader) == 1  # each image once
    assert sum(b[0].shape[0] for b in text_loader) == 7  # every caption


def test_datamodule_reads_the_karpathy_file_once_and_defers_a_split_s_error(
        karpathy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fne_lightning.data import datasets

    reads: list[str] = []
    read_json = datasets.read_json
    monkeypatch.setattr(datasets, "read_json", lambda path, key: reads.append(Path(path).name) or read_json(path, key))
    dm = CaptionDataModule(root=str(karpathy.parent), annotations=str(karpathy), num_workers=0)
    dm.load_all()
    assert reads == ["dataset_toy.json", "dataset_toy.positives.json"]  # once for the three splits
    for stage in ("train", "val", "test"):  # as loading each split on its own gives
        want = load_karpathy(karpathy, karpathy.parent, dm.splits[stage], stage, dm.clean)
        got = dm.data[stage]
        assert (got.captions, got.image_paths, got.text_to_image.tolist(), got.positive_pairs.tolist()) == (
            want.captions, want.image_paths, want.text_to_image.tolist(), want.positive_pairs.tolist())
    # A split without images fails only when it is used: evaluating on the test split still works.
    dm = CaptionDataModule(root=str(karpathy.parent), annotations=str(karpathy), num_workers=0,
                           splits={"train": ["nothing"], "val": ["val"], "test": ["test"]})
    assert dm.load_split("test").num_images == 1
    with pytest.raises(FNEError, match=r"no images in split\(s\) \['nothing'\]"):
        dm.load_split("train")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.unlink(), "annotation file not found"),
        (lambda p: p.write_text("{not json"), "not valid JSON"),
        (lambda p: p.write_text(json.dumps({"pictures": []})), "'images' list"),
        (lambda p: (p.parent / "imgs" / "3.jpg").unlink(), "3.jpg"),
        (lambda p: p.write_text(json.dumps({"images": [{"split": "test", "filename": "0.jpg", "sentences": [
            {"raw": "?!", "sentid": 0}]}]})), "empty after preprocessing"),
        (lambda p: p.write_text(json.dumps({"images": [{"split": "test", "filename": "0.jpg",
                                                       "sentences": []}]})), "has no captions"),
        (lambda p: p.write_text(json.dumps({"images": [{"split": "train", "filename": "0.jpg", "sentences": [
            {"raw": "fine", "sentid": 0}]}]})), "no images in split"),
    ],
)
def test_bad_annotations_give_one_clear_error(karpathy: Path, mutate, message: str) -> None:
    mutate(karpathy)
    dm = CaptionDataModule(root=str(karpathy.parent), annotations=str(karpathy), num_workers=0)
    with pytest.raises(FNEError, match=message) as err:
        dm.load_split("test")
    assert "\n" not in str(err.value)


def test_batch_larger_than_the_training_captions_is_refused(karpathy: Path) -> None:
    dm = CaptionDataModule(root=str(karpathy.parent), annotations=str(karpathy), num_workers=0, batch_size=1000)
    with pytest.raises(FNEError, match=r"data.batch_size=1000: larger than the \d+ training captions"):
        dm.train_dataloader()


def test_missing_root_names_the_key(tmp_path: Path) -> None:
    dm = CaptionDataModule(root=str(tmp_path / "nowhere"), annotations="x.json")
    with pytest.raises(FNEError, match=r"data.root=.*nowhere.*directory not found"):
        dm.load_split("train")


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(FNEError, match="data.batch_size=0"):
        CaptionDataModule(root=".", batch_size=0)


def test_positive_pairs_are_int64(karpathy: Path) -> None:
    split = load_karpathy(karpathy, karpathy.parent, ["train"], "train")
    assert split.positive_pairs.dtype == np.int64


def test_on_bad_image_skip_drops_bad_images_with_their_captions(karpathy: Path, caplog) -> None:
    (karpathy.parent / "imgs" / "1.jpg").write_text("not a picture")
    dm = CaptionDataModule(root=str(karpathy.parent), annotations=str(karpathy), on_bad_image="skip")
    with caplog.at_level("WARNING"):
        train = dm.load_split("train")
    # Image 1 (3 captions) is gone; images 0 and 4 (restval) remain, indices renumbered.
    assert train.num_images == 2 and train.text_to_image.tolist() == [0, 1, 1]
    assert train.image_paths[1].endswith("4.jpg") and train.captions[1].startswith("a photo number 4")
    assert {tuple(p) for p in train.positive_pairs.tolist()} == {(0, 0)}
    assert "1.jpg: not an image" in caplog.text and "skipped 1 of 3 train images" in caplog.text


def test_loader_settings_follow_the_machine() -> None:
    import os

    from fne_lightning.datamodule import resolve_loader_settings

    cores = len(os.sched_getaffinity(0))
    workers, pin = resolve_loader_settings("auto", "auto")
    # Never more workers than usable cores (PyTorch warns then), and no pinning without a GPU.
    assert workers == min(4, cores) and 1 <= workers <= cores
    assert pin is torch.cuda.is_available()
    assert resolve_loader_settings(3, False) == (3, False)
    with pytest.raises(FNEError, match="data.num_workers='many': expected auto or an integer >= 0"):
        resolve_loader_settings("many", "auto")
    with pytest.raises(FNEError, match="data.pin_memory='yes'"):
        resolve_loader_settings(0, "yes")
