"""Tests of the built-in synthetic benchmark: determinism, reuse, files, and exact positives."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fne_lightning.data import synthetic
from fne_lightning.data.synthetic import POSITIVES_NAME, build_synthetic, render_scene
from fne_lightning.errors import FNEError

SIZES = {"num_train": 40, "num_val": 10, "num_test": 10}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("synthetic"), **SIZES)


def caption_matches(meaning: dict[str, Any], scene: dict[str, Any]) -> bool:
    """Test oracle of ``synthetic.match_matrix``, one pair at a time: whether every attribute, relation, count and background stated in ``meaning`` holds in ``scene``."""
    objs = scene["objects"]
    if meaning.get("count", len(objs)) != len(objs):
        return False
    if any(scene["background"][k] != v for k, v in meaning.get("background", {}).items()):
        return False
    relation = {None: None, "left_of": ("left", "right"), "above": ("top", "bottom")}[meaning.get("relation")]
    for chosen in itertools.permutations(objs, len(meaning["objects"])):  # distinct objects
        if all(o[k] == v for want, o in zip(meaning["objects"], chosen, strict=True) for k, v in want.items()) and (
                relation is None or (chosen[0]["position"], chosen[1]["position"]) == relation):
            return True
    return False



def _load(json_path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    return json.loads(json_path.read_text()), json.loads(json_path.with_name(POSITIVES_NAME).read_text())


def _describes(meaning: dict[str, Any], scene: dict[str, Any]) -> bool:
    """Independent reference: try every assignment of stated objects to distinct scene objects."""
    objs = scene["objects"]
    if "count" in meaning and meaning["count"] != len(objs):
        return False
    for key, value in meaning.get("background", {}).items():
        if scene["background"][key] != value:
            return False
    stated = meaning["objects"]
    assignments = [(i,) for i in range(len(objs))] if len(stated) == 1 else [
        (i, j) for i in range(len(objs)) for j in range(len(objs)) if i != j]
    for assignment in assignments:
        chosen = [objs[i] for i in assignment]
        if any(o.get(k) != v for want, o in zip(stated, chosen, strict=True) for k, v in want.items()):
            continue
        relation = meaning.get("relation")
        if relation == "left_of" and not (chosen[0]["x"] < chosen[1]["x"] - 0.3):
            continue
        if relation == "above" and not (chosen[0]["y"] < chosen[1]["y"] - 0.3):
            continue
        return True
    return False


def test_layout_and_ids(built: Path) -> None:
    data, _ = _load(built)
    assert built.name == "dataset_synthetic.json" and built.parent.name == "synthetic-v1-s0-40-10-10-64px"
    images = data["images"]
    assert data["dataset"] == "synthetic"
    assert [im["imgid"] for im in images] == list(range(60))
    assert [im["split"] for im in images] == ["train"] * 40 + ["val"] * 10 + ["test"] * 10
    sentids = [s["sentid"] for im in images for s in im["sentences"]]
    assert sentids == list(range(len(sentids)))
    for im in images:
        assert im["filepath"] == "images" and len(im["sentences"]) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert len({s["raw"] for s in im["sentences"]}) == 5  # no duplicate captions of one image
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"] and s["tokens"] == s["raw"].lower().replace(",", "").rstrip(".").split()


def test_images_are_pngs_of_the_right_size(built: Path) -> None:
    data, _ = _load(built)
    for im in data["images"]:
        with Image.open(built.parent / im["filepath"] / im["filename"]) as img:
            assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
            # The stored scene is enough to redraw the image exactly.
            assert np.array_equal(np.asarray(img), np.asarray(render_scene(im["scene"], 64)))
    assert render_scene(data["images"][0]["scene"], 32).size == (32, 32)


def test_positives_are_exactly_the_true_same_split_pairs(built: Path) -> None:
    data, positives = _load(built)
    assert set(positives) == {str(im["imgid"]) for im in data["images"]}
    for split in synthetic.SPLITS:
        images = [im for im in data["images"] if im["split"] == split]
        sentences = [s for im in images for s in im["sentences"]]
        for im in images:
            listed = positives[str(im["imgid"])]
            assert listed == sorted(listed) and set(im["sentids"]) <= set(listed)
            expected = [s["sentid"] for s in sentences if _describes(s["meaning"], im["scene"])]
            assert listed == expected
            assert all(caption_matches(s["meaning"], im["scene"]) == (s["sentid"] in listed) for s in sentences)
    # False negatives exist by construction: many captions truly describe other images too.
    train = [im for im in data["images"] if im["split"] == "train"]
    counts = np.bincount([s for im in train for s in positives[str(im["imgid"])]])
    own = [s for im in train for s in im["sentids"]]
    assert (counts[own] > 1).mean() > 0.1 and counts[own].max() >= 3


def test_deterministic_for_a_seed(built: Path, tmp_path: Path) -> None:
    again = build_synthetic(tmp_path / "a", **SIZES)
    assert again.read_bytes() == built.read_bytes()
    assert again.with_name(POSITIVES_NAME).read_bytes() == built.with_name(POSITIVES_NAME).read_bytes()
    for name in ("000000.png", "000041.png", "000059.png"):
        assert (again.parent / "images" / name).read_bytes() == (built.parent / "images" / name).read_bytes()
    other = build_synthetic(tmp_path / "b", seed=1, **SIZES)
    assert other.parent.name == "synthetic-v1-s1-40-10-10-64px"
    assert other.read_bytes() != built.read_bytes()
    assert (other.parent / "images" / "000000.png").read_bytes() != (built.parent / "images" / "000000.png").read_bytes()


def test_second_call_reuses_without_rendering(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: p.stat().st_mtime_ns for p in built.parent.rglob("*")}

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("re-rendered a complete dataset")

    monkeypatch.setattr(synthetic, "render_scene", fail)
    assert build_synthetic(built.parent.parent, **SIZES) == built
    assert {p: p.stat().st_mtime_ns for p in built.parent.rglob("*")} == before
    assert [p.name for p in built.parent.parent.iterdir()] == [built.parent.name]  # no temporary left


def test_lost_race_and_failure_leave_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("crash while rendering")

    monkeypatch.setattr(synthetic, "render_scene", crash)
    with pytest.raises(RuntimeError):
        build_synthetic(tmp_path, num_train=2, num_val=1, num_test=1)
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone, nothing looks complete
    monkeypatch.undo()

    # Another process finishes first while we render: ours is discarded, theirs is kept.
    real_write = synthetic._write_dataset

    def write_then_lose(out: Path, *args: Any) -> None:
        real_write(out, *args)
        winner = tmp_path / "synthetic-v1-s0-2-1-1-64px"
        real_write(winner, *args)

    monkeypatch.setattr(synthetic, "_write_dataset", write_then_lose)
    result = build_synthetic(tmp_path, num_train=2, num_val=1, num_test=1)
    assert result.is_file() and [p.name for p in tmp_path.iterdir()] == [result.parent.name]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"num_train": 0}, "num_train"), ({"num_val": 0}, "num_val"), ({"num_test": -1}, "num_test"),
     ({"image_size": 8}, "image_size"), ({"num_train": 2.5}, "num_train"), ({"seed": -1}, "seed")],
)
def test_bad_arguments_name_the_argument(tmp_path: Path, kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(FNEError, match=f"^{name}="):
        build_synthetic(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_false_negative_density_keeps_low_and_makes_captions_true_of_more_images(tmp_path: Path) -> None:
    """``fn_density=low`` is the benchmark as it was (the same captions from the same stream, the
    same cache directory); ``medium``, ``high`` and ``very_high`` draw a quarter, half and four
    fifths of the captions from the vague templates, so a caption is true of a larger share of the
    scenes, counted here with the per-pair oracle, not with match_matrix."""
    def captions(density: str | None) -> list[tuple[dict, str]]:
        rng = np.random.Generator(np.random.PCG64(7))
        scenes = [synthetic.sample_scene(rng) for _ in range(60)]
        kwargs = {} if density is None else {"fn_density": density}
        return scenes, [c for s in scenes for c in synthetic.make_captions(s, rng, **kwargs)]

    scenes, default = captions(None)
    assert captions("low")[1] == default
    shares = {}
    for density in synthetic.FN_DENSITIES:
        scenes, caps = captions(density)
        true_of = [sum(caption_matches(meaning, scene) for scene in scenes) / len(scenes) for meaning, _ in caps]
        shares[density] = float(np.mean(true_of))
        vague = [m for m, _ in caps if len(m["objects"]) == 1 and len(m["objects"][0]) <= 2 and len(m) == 1
                 and (len(m["objects"][0]) == 1 or "position" in m["objects"][0])]
        if density == "low":
            assert shares[density] < 0.03
        else:  # every caption stays true of its own scene
            assert all(caption_matches(m, s) for s, m in zip(np.repeat(scenes, 5), (m for m, _ in caps), strict=True))
            assert len(vague) > 0.1 * len(caps)
    assert shares["low"] < shares["medium"] < shares["high"] < shares["very_high"]
    assert shares["high"] > 3 * shares["low"]
    low = build_synthetic(tmp_path, num_train=2, num_val=1, num_test=1)
    high = build_synthetic(tmp_path, num_train=2, num_val=1, num_test=1, fn_density="high")
    assert not low.parent.name.endswith("high") and high.parent.name.endswith("-fnhigh")
    with pytest.raises(FNEError, match="data.fn_density"):
        build_synthetic(tmp_path, num_train=2, num_val=1, num_test=1, fn_density="dense")
