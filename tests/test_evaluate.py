"""The evaluation entry point and the positives converter.

A checkpoint trained in the test must score, through ``python -m fne_lightning.evaluate``, exactly
what training reported for it (same datamodule, same metric); COCO-1K-style folds must agree
between the LightningModule and evaluate; bad input is one ``error:`` line.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from fne_lightning.convert_positives import main as convert_main
from fne_lightning.data.datasets import load_karpathy
from fne_lightning.evaluate import evaluate
from fne_lightning.retrieval import coco_1k_scores
from fne_lightning.retrieval.ranking import topk_neighbours
from fne_lightning.train import train

from conftest import TINY_OVERRIDES, compose_config
from helpers import compose_task, run_entry_point, train_tiny, write_karpathy


def run_eval(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_entry_point("evaluate", *args, cwd=cwd, timeout=timeout)


def compose_eval(overrides: list[str], output_dir: Path) -> DictConfig:
    return compose_task("evaluate", overrides, output_dir)


def as_logged(metrics: dict[str, float], prefix: str) -> dict[str, np.float32]:
    """Lightning logs float32: compare evaluate's float64 values at that precision, exactly."""
    return {k: np.float32(v) for k, v in metrics.items() if k.startswith(f"{prefix}/")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, dict[str, float]]:
    """best.ckpt of one epoch on the tiny synthetic config, and the metrics training reported."""
    out = tmp_path_factory.mktemp("trained")
    metrics = train_tiny(out, cache_dir, "trainer.max_epochs=1")
    return out / "checkpoints" / "best.ckpt", metrics


def test_checkpoint_scores_what_training_reported(trained, cache_dir: Path, tmp_path: Path) -> None:
    ckpt, train_metrics = trained
    run_dir = tmp_path / "eval"
    # A relative ckpt_path is relative to the directory the command runs in.
    proc = run_eval("ckpt_path=checkpoints/best.ckpt", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
                    "save_embeddings=true", "save_topk=3", cwd=ckpt.parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert as_logged(metrics, "test") == as_logged(train_metrics, "test")
    assert {"test/rsum", "test/i2t_map_at_r"} <= metrics.keys()
    assert "Image-to-text" in proc.stdout and "rsum" in proc.stdout
    assert "| Text-to-image |" in (run_dir / "metrics.md").read_text()

    emb = np.load(run_dir / "embeddings.npz")
    n_img, n_txt = 8, 40  # data.num_test=8, five captions each
    assert emb["image_features"].shape == (n_img, 128) and emb["text_features"].shape == (n_txt, 128)
    np.testing.assert_allclose(np.linalg.norm(emb["text_features"], axis=1), 1.0, rtol=1e-5)
    t2i = emb["text_to_image"]
    assert t2i.shape == (n_txt,) and set(t2i.tolist()) == set(range(n_img))
    assert all(Path(p).is_file() for p in emb["image_paths"]) and all(len(c) > 3 for c in emb["captions"])

    saved = json.loads((run_dir / "retrievals.json").read_text())
    root = Path(saved["image_root"])
    by_image, by_caption = saved["image_to_text"], saved["text_to_image"]
    assert len(by_image) == n_img and len(by_caption) == n_txt
    for i, query in enumerate(by_image):
        assert (root / query["image"]).is_file() and len(query["top"]) == 3
        assert query["captions"] == [str(c) for c, g in zip(emb["captions"], t2i, strict=True) if g == i]
        assert all(hit["correct"] == (t2i[hit["caption_index"]] == i) for hit in query["top"])
        assert all(hit["caption"] == emb["captions"][hit["caption_index"]] for hit in query["top"])
        assert [h["score"] for h in query["top"]] == sorted((h["score"] for h in query["top"]), reverse=True)
    for j, query in enumerate(by_caption):
        assert query["caption"] == emb["captions"][j] and (root / query["top"][0]["image"]).is_file()
        assert [h["correct"] for h in query["top"]] == [h["image_index"] == t2i[j] for h in query["top"]]
    # The top-1 lists agree with R@1 (no exact ties among random-init float scores).
    assert 100 * np.mean([q["top"][0]["correct"] for q in by_image]) == pytest.approx(metrics["test/i2t_r1"])
    assert 100 * np.mean([q["top"][0]["correct"] for q in by_caption]) == pytest.approx(metrics["test/t2i_r1"])


def write_dataset(root: Path) -> Path:
    """A Karpathy dataset on disk: 16 train, 4 val and 10 test PNGs, 1-3 captions per test image,
    and a positives file under a non-default name. Also a JSON without a val split."""
    rng = np.random.default_rng(0)
    path = write_karpathy(root, ["train"] * 16 + ["val"] * 4 + ["test"] * 10,
                          lambda i, split: [f"Picture {i}, caption {k}." for k in range(2 if split != "test" else 1 + i % 3)],
                          lambda i: Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                          name="dataset_tiny.json", ext="png")
    images = json.loads(path.read_text())["images"]
    (root / "dataset_noval.json").write_text(json.dumps({"images": [i for i in images if i["split"] != "val"]}))
    # Test image 20 is also described by a caption of image 23 (across folds) and of image 21.
    first = {i["imgid"]: i["sentences"][0]["sentid"] for i in images}
    (root / "extra_positives.json").write_text(json.dumps({"20": [first[21], first[23]], "25": [first[24]]}))
    return root / "dataset_tiny.json"


@pytest.fixture(scope="module")
def tiny_karpathy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("karpathy"))


def test_folds_match_between_module_and_evaluate(tiny_karpathy: Path, cache_dir: Path, tmp_path: Path) -> None:
    root = tiny_karpathy.parent
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.num_")] + [
        "data=karpathy", f"data.root={root}", f"data.annotations={tiny_karpathy}", "data.num_workers=0",
        "data.pin_memory=false", "data.augment.randaugment=null", "data.test_folds=5",
        f"data.positives={root / 'extra_positives.json'}", "trainer.max_epochs=1",
    ]
    cfg = compose_config(overrides, cache_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "train")
    train_metrics = train(cfg)
    assert {"test_1k/rsum", "test_1k/i2t_map_at_r"} <= train_metrics.keys()

    ckpt = tmp_path / "train" / "checkpoints" / "best.ckpt"
    metrics = evaluate(compose_eval([f"ckpt_path={ckpt}", "save_embeddings=true"], tmp_path / "eval"))
    for prefix in ("test", "test_1k"):
        assert as_logged(metrics, prefix) == as_logged(train_metrics, prefix)
    assert "(mean of 5 folds, 2 images each)" in (tmp_path / "eval" / "metrics.md").read_text()
    # test_1k is the fold average of the very features that were saved.
    emb = np.load(tmp_path / "eval" / "embeddings.npz")
    folds = coco_1k_scores(torch.from_numpy(emb["image_features"]), torch.from_numpy(emb["text_features"]),
                           torch.from_numpy(emb["text_to_image"]), torch.from_numpy(emb["positive_pairs"]))
    assert {f"test_1k/{k}": v for k, v in folds.items()} == {k: v for k, v in metrics.items() if "_1k/" in k}


@pytest.mark.parametrize(
    ("case", "culprit"),
    [("missing", "ckpt_path='missing.ckpt': file not found"), ("mismatched", "model.context_length=16"),
     ("missing_split", "split='val'")],
)
def test_bad_input_is_one_clear_line(case: str, culprit: str, trained, tiny_karpathy: Path, tmp_path: Path) -> None:
    ckpt, _ = trained
    args = {
        "missing": ["ckpt_path=missing.ckpt"],
        "mismatched": [f"ckpt_path={ckpt}", "model=tiny", "model.context_length=16"],
        "missing_split": [f"ckpt_path={ckpt}", "data=karpathy", f"data.root={tiny_karpathy.parent}",
                          f"data.annotations={tiny_karpathy.parent / 'dataset_noval.json'}", "split=val"],
    }[case]
    proc = run_eval(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and culprit in error_lines[0], proc.stderr[-2000:]
    if case == "mismatched":
        assert str(ckpt) in error_lines[0] and "fne-tiny" in error_lines[0]
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 100])
def test_topk_neighbours_chunked_equals_full(chunk_size: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(11, 8, generator=gen), torch.randn(23, 8, generator=gen)
    scores, idx = topk_neighbours(query, gallery, 5, chunk_size)
    full = torch.topk(query @ gallery.T, 5, dim=1)
    torch.testing.assert_close(scores, full.values)
    assert torch.equal(idx, full.indices)
    assert topk_neighbours(query, gallery, 50)[0].shape == (11, 23)  # k is capped at the gallery size


def test_convert_positives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    karpathy = {"images": [
        {"cocoid": 100, "imgid": 0, "split": "test", "filename": "a.jpg", "sentences": [
            {"raw": "A dog runs.", "sentid": 0}, {"raw": "a dog  runs.", "sentid": 1}, {"raw": "A cat.", "sentid": 2}]},
        {"cocoid": 200, "imgid": 1, "split": "test", "filename": "b.jpg", "sentences": [
            {"raw": "Two birds.", "sentid": 3}]},
    ]}
    coco = {"annotations": [
        {"id": 11, "image_id": 100, "caption": "A dog runs. "}, {"id": 12, "image_id": 100, "caption": "A DOG runs."},
        {"id": 13, "image_id": 100, "caption": "A cat."}, {"id": 21, "image_id": 200, "caption": "Two birds."},
        {"id": 99, "image_id": 200, "caption": "text that Karpathy does not have"},
    ]}
    files = {"karpathy.json": karpathy, "captions.json": coco,
             # Image 100 is described by caption 21 (of image 200); 555 is no COCO caption id.
             "i2c.json": {"100": [11, 21, 555], "200": [21]},
             # Caption 12 (the second "a dog runs.") also describes image 200; 300 is not in Karpathy's JSON.
             "c2i.json": {"12": [200, 300], "99": [100]}}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    out = tmp_path / "karpathy.positives.json"
    convert_main(["--karpathy", str(tmp_path / "karpathy.json"), "--coco-captions", str(tmp_path / "captions.json"),
                  "--image-to-caption", str(tmp_path / "i2c.json"), "--caption-to-image", str(tmp_path / "c2i.json"),
                  "--out", str(out)])
    assert json.loads(out.read_text()) == {"0": [0, 1, 2, 3], "1": [1, 3]}
    printed = capsys.readouterr().out
    assert "1 of 3 COCO image ids" in printed and "2 of 5 COCO caption ids" in printed
    # The written file is what load_karpathy reads as positives (beside the JSON, same stem).
    split = load_karpathy(tmp_path / "karpathy.json", tmp_path, ["test"], "test")
    assert sorted(map(tuple, split.positive_pairs.tolist())) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 3)]

    (tmp_path / "bad.json").write_text(json.dumps({"100": 11}))
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--karpathy", str(tmp_path / "karpathy.json"), "--coco-captions", str(tmp_path / "captions.json"),
                      "--image-to-caption", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--image-to-caption" in err[0] and "bad.json" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_evaluate_config_composes_without_data_or_model(tmp_path: Path) -> None:
    cfg = compose_eval(["ckpt_path=x.ckpt"], tmp_path)
    assert cfg.get("data") is None and cfg.get("model") is None and cfg.split == "test"
    cfg = compose_eval(["model=clip_vit_b32", "data=coco"], tmp_path)
    assert cfg.model.name == "ViT-B-32-quickgelu" and cfg.data.test_folds == 5
    assert OmegaConf.select(cfg, "data.positives", default="absent") is None


def test_zero_shot_evaluates_an_open_clip_model_without_a_checkpoint(tiny_karpathy: Path, tmp_path: Path) -> None:
    # model= and data= without ckpt_path: the open_clip model as it is (here the tiny config,
    # random init; with model=clip_vit_b32 the same path loads OpenAI's weights).
    root = tiny_karpathy.parent
    metrics = evaluate(compose_eval(["model=tiny", "data=karpathy", f"data.root={root}",
                                     f"data.annotations={tiny_karpathy}", "data.num_workers=0",
                                     "data.pin_memory=false"], tmp_path))
    assert {"test/i2t_r1", "test/t2i_medr", "test/rsum"} <= metrics.keys()
    assert "zero-shot, model `fne-tiny`" in (tmp_path / "metrics.md").read_text()


def test_checkpoints_from_before_the_package_layout_still_evaluate(trained, cache_dir: Path, tmp_path: Path) -> None:
    """Checkpoints store the run config, whose _target_ paths named the old components/ modules."""
    ckpt_path, train_metrics = trained
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["hyper_parameters"]["model"]["_target_"] = "fne_lightning.components.encoders.DualEncoder"
    ckpt["hyper_parameters"]["loss"]["_target_"] = "fne_lightning.components.losses.FNELoss"
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    metrics = evaluate(compose_eval([f"ckpt_path={old}", f"paths.cache_dir={cache_dir}"], tmp_path / "eval"))
    assert as_logged(metrics, "test") == as_logged(train_metrics, "test")
