"""Experiment tracking: W&B offline runs, the PNG figures without W&B, and the plotting components."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from PIL import Image

from fne_lightning.callbacks import SimilarityReservoir, wandb_tables
from fne_lightning.fne.stats import confident_samples
from fne_lightning.retrieval import examples, plots
from fne_lightning.train import train
from fne_lightning.utils.config import wandb_offline

from conftest import TINY_OVERRIDES, compose_config

FNE_KEYS = {"pos_mean", "pos_std", "neg_mean", "neg_std", "flagged_rate", "cutdown_rate", "sampled_sim",
            "hardest_sim", "sampled_fn_rate", "hardest_fn_rate"}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for the tiny runs here: the model gains nothing from more, and on a busy
    machine OpenMP threads that wait for each other made training several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wandb_records(run_dir: Path) -> dict[str, Any]:
    """Summary, config and run settings of an offline W&B run, read from its ``run-<id>.wandb`` file.

    wandb 0.31 writes no ``wandb-summary.json`` or ``config.yaml`` for offline runs, only this
    log: LevelDB's log format (32 KiB blocks of chunks: crc32 u32, length u16, type u8) after a
    7-byte ``:W&B`` header, each record a ``wandb_internal_pb2.Record`` protobuf.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            chunks = chunk
        elif kind in (3, 4):  # middle, last
            chunks += chunk
        else:
            break
        if kind in (1, 4):
            records.append(pb.Record.FromString(chunks))
    out: dict[str, Any] = {"summary": {}, "config": {}, "run": None, "complete": False}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "exit":
            out["complete"] = True
        elif kind in ("summary", "config"):
            for item in getattr(record, kind).update:
                out[kind]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return out


def finished_wandb_run(run_dir: Path, timeout: float = 60.0) -> dict[str, Any]:
    """:func:`wandb_records` once the run's exit record is on disk: ``wandb.finish()`` returns
    before wandb-core has flushed the file's last block."""
    deadline = time.monotonic() + timeout
    while not (run := wandb_records(run_dir))["complete"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run["complete"], f"{run_dir}: no exit record after {timeout} s"
    return run


def test_wandb_offline_run_logs_config_metrics_diagnostics_and_figures(cache_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in TINY_OVERRIDES if o != "~logger"]
    cfg = compose_config([*overrides, "logger=wandb", f"paths.output_dir={tmp_path}"], cache_dir)
    assert cfg.logger.wandb.offline is True  # WANDB_MODE=offline (conftest): never online in tests
    train(cfg)
    import wandb

    assert wandb.run is None  # train() finishes its run: the next run of a sweep starts a new one
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = finished_wandb_run(run_dir)
    summary, config = run["summary"], run["config"]
    assert summary["val/rsum"] > 0 and summary["test/rsum"] > 0
    assert {f"fne/{k}_epoch" for k in FNE_KEYS} <= summary.keys()
    # The resolved config, as the module stored it.
    assert config["loss"]["cutdown"] == cfg.loss.cutdown and config["data"]["num_train"] == 32
    assert run["run"].project == "fne-lightning"
    # The figures of the last validation epoch, and the example tables, are in the run's files.
    media = run_dir / "files" / "media"
    for name in ("similarities", "retrievals"):
        assert summary[f"val/{name}/_type"] == "image-file"
        assert (run_dir / "files" / summary[f"val/{name}/path"]).is_file()
        assert len(list((media / "images" / "val").glob(f"{name}_*.png"))) == cfg.trainer.max_epochs
    for name in ("t2i", "i2t"):
        table = json.loads((run_dir / "files" / summary[f"val/examples_{name}/path"]).read_text())
        assert len(table["data"]) == cfg.figures.num_examples
        assert len(table["columns"]) == 1 + cfg.figures.top_k


def test_csv_run_saves_the_figures_as_png(cfg: DictConfig, tmp_path: Path) -> None:
    with open_dict(cfg):
        cfg.logger = {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path),
                              "name": "csv", "version": ""}}
        cfg.test = False
    train(cfg)
    names = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    epochs = range(cfg.trainer.max_epochs)
    assert names == sorted([f"similarities_epoch{e:03d}.png" for e in epochs]
                           + [f"retrievals_epoch{e:03d}.png" for e in epochs])
    with Image.open(tmp_path / "figures" / "similarities_epoch001.png") as image:
        assert image.width > 300 and image.height > 200


def test_wandb_is_offline_unless_logged_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_offline()  # no netrc file
    netrc.write_text("machine example.org login user password secret\n")
    assert wandb_offline()  # credentials for another host only
    netrc.write_text("machine api.wandb.ai login user password not-a-real-key\n")
    assert not wandb_offline()  # what `wandb login` writes
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline()  # WANDB_MODE decides outright
    monkeypatch.setenv("WANDB_MODE", "online")
    netrc.unlink()
    assert not wandb_offline()


def test_reservoir_keeps_the_latest_confident_samples_of_the_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    reservoir = SimilarityReservoir(capacity=20)
    batches = []
    for _ in range(3):  # 3 batches of 8 pairs: 24 positive slots written into 20
        v = torch.nn.functional.normalize(torch.randn(8, 4, generator=gen), dim=1)
        t = torch.nn.functional.normalize(v + 0.5 * torch.randn(8, 4, generator=gen), dim=1)
        ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
        reservoir.add(v, t, ids)
        batches.append(confident_samples(v @ t.T, ids[:, None] == ids[None, :]))
    pos, neg = reservoir.samples()
    # Expected: the samples among the last 20 positive slots and the last 40 negative slots written.
    pos_values = torch.cat([torch.where(m, p, torch.nan) for p, m, _, _ in batches])[-20:]
    neg_values = torch.cat([torch.where(m, n, torch.nan) for _, _, n, m in batches])[-40:]
    for got, want in ((pos, pos_values), (neg, neg_values)):
        assert got.size > 0
        np.testing.assert_allclose(np.sort(got), np.sort(want[~want.isnan()].double().numpy()), rtol=1e-6)
    reservoir.reset()
    assert all(s.size == 0 for s in reservoir.samples())


def test_retrieval_examples_mark_pairs_true_matches_and_misses() -> None:
    # 3 images, 4 captions: caption c belongs to image t2i[c]; caption 3 also truly describes image 0.
    image_features = torch.eye(3)
    text_features = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0.6, 0.8], [0.8, 0.6, 0]])
    t2i = torch.tensor([0, 1, 2, 1])
    pairs = torch.tensor([[0, 0], [1, 1], [2, 2], [1, 3], [0, 3]])
    ex = examples.retrieval_examples(image_features, text_features, t2i, pairs, num_queries=4, k=2)
    assert ex.text_queries.tolist() == [0, 1, 2, 3] and ex.image_queries.tolist() == [0, 1, 2]
    assert ex.text_results.tolist() == [[0, 1], [1, 0], [2, 1], [0, 1]]  # caption 3 -> image 0 first
    assert ex.text_marks[3].tolist() == [examples.TRUE_MATCH, examples.PAIRED]
    assert ex.text_marks[0].tolist() == [examples.PAIRED, examples.NO_MATCH]
    assert ex.image_results[0].tolist() == [0, 3]
    assert ex.image_marks[0].tolist() == [examples.PAIRED, examples.TRUE_MATCH]
    # Without declared positives, only the pairs are marked.
    ex = examples.retrieval_examples(image_features, text_features, t2i, None, num_queries=4, k=2)
    assert ex.text_marks[3].tolist() == [examples.NO_MATCH, examples.PAIRED]
    # Figures and tables build from these rows.
    rows = plots.example_rows(ex, ["a", "b", "c", "d"], lambda i: Image.new("RGB", (20, 30), "red"))
    assert plots.retrieval_figure(*rows).get_size_inches()[0] > 0
    tables = wandb_tables(*rows)
    assert tables["t2i"][0] == ["caption", "top 1", "top 2"] and len(tables["i2t"][1]) == 3
