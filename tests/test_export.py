"""The export entry point: a checkpoint becomes an open_clip directory that plain open_clip loads
and that embeds the test split's image files and captions exactly as ``fne_lightning.evaluate``
does; its model card carries the run's metrics; bad input is one ``error:`` line; an export can
start ``experiment=synthetic_finetune``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from omegaconf import open_dict
from PIL import Image
from safetensors.torch import load_file

from fne_lightning.evaluate import evaluate
from fne_lightning.export import CONFIG_FILE, WEIGHTS_FILE, export
from fne_lightning.models.encoders import DualEncoder
from fne_lightning.train import build, train

from conftest import TINY_OVERRIDES, compose_config
from helpers import compose_task, run_entry_point, train_tiny


def run_export(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_entry_point("export", *args, cwd=cwd, env=env, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, dict[str, float]]:
    """best.ckpt of one epoch on the tiny synthetic config, and the run's metrics.json."""
    out = tmp_path_factory.mktemp("trained")
    train_tiny(out, cache_dir, "trainer.max_epochs=1")
    return out / "checkpoints" / "best.ckpt", json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint exported through the command line."""
    ckpt, _ = trained
    tmp = tmp_path_factory.mktemp("export")
    proc = run_export(f"ckpt_path={ckpt}", "out_dir=model", f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "local-dir:" in proc.stdout
    return tmp / "model"


@pytest.mark.slow
def test_plain_open_clip_embeds_what_evaluate_saves(trained, exported: Path, tmp_path: Path) -> None:
    ckpt, _ = trained
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["model_cfg"] == open_clip.get_model_config("fne-tiny")
    assert config["preprocess_cfg"]["resize_mode"] == "squash" and config["preprocess_cfg"]["size"] == 32
    # The online encoder's weights, not the momentum encoder's.
    weights = load_file(exported / WEIGHTS_FILE)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    online = {k.removeprefix("encoder.model."): v for k, v in state.items() if k.startswith("encoder.model.")}
    assert weights.keys() == online.keys() and all(torch.equal(weights[k], online[k]) for k in online)

    evaluate(compose_task("evaluate", [f"ckpt_path={ckpt}", "save_embeddings=true"], tmp_path))
    saved = np.load(tmp_path / "embeddings.npz")

    name = f"local-dir:{exported}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    with torch.inference_mode():
        images = torch.stack([preprocess(Image.open(p)) for p in saved["image_paths"]])
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokenizer([str(c) for c in saved["captions"]]), normalize=True)
    np.testing.assert_allclose(image_features.numpy(), saved["image_features"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(text_features.numpy(), saved["text_features"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_model_card_has_metrics_config_and_loading(trained, exported: Path) -> None:
    _, metrics = trained
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n")
    assert f"rsum: **{metrics['test/rsum']:.2f}**" in card
    assert "`fne-tiny`" in card and "open_clip.create_model_and_transforms(name)" in card
    assert "memory_size: 48" in card and "num_train: 32" in card  # the run's own (shrunk) config


def test_card_without_metrics_and_overwrite(trained, tmp_path: Path) -> None:
    ckpt, _ = trained
    lonely = tmp_path / "lonely.ckpt"  # no run directory around it, so no metrics.json
    lonely.symlink_to(ckpt)
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    (out / WEIGHTS_FILE).write_bytes(b"stale")
    export(compose_task("export", [f"ckpt_path={lonely}", f"out_dir={out}", "overwrite=true"], tmp_path))
    assert "## Test metrics\n\nNot available (no `" in (out / "README.md").read_text()
    assert len(load_file(out / WEIGHTS_FILE)) > 0 and (out / "notes.txt").read_text() == "kept"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


@pytest.mark.parametrize(
    ("case", "culprit"),
    [("missing_ckpt", "ckpt_path='missing.ckpt': file not found"),
     ("not_empty", "out_dir='full': exists and is not empty"),
     ("no_out_dir", "out_dir: expected out_dir="),
     ("bad_repo", "push_to_hub='no-slash': expected null or a Hugging Face repo id")],
)
def test_bad_input_is_one_clear_line(case: str, culprit: str, trained, tmp_path: Path) -> None:
    ckpt, _ = trained
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("mine")
    args = {"missing_ckpt": ["ckpt_path=missing.ckpt", "out_dir=new"],
            "not_empty": [f"ckpt_path={ckpt}", "out_dir=full"],
            "no_out_dir": [f"ckpt_path={ckpt}"],
            "bad_repo": [f"ckpt_path={ckpt}", "out_dir=new", "push_to_hub=no-slash"]}[case]
    line = one_error_line(run_export(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))
    assert culprit in line, line
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["something.txt"]


@pytest.mark.slow
def test_push_to_hub_offline_is_one_line_and_keeps_the_directory(trained, tmp_path: Path) -> None:
    ckpt, _ = trained
    proc = run_export(f"ckpt_path={ckpt}", "out_dir=model", "push_to_hub=my-org/fne-tiny",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    line = one_error_line(proc)
    out = tmp_path / "model"
    assert "push_to_hub='my-org/fne-tiny'" in line and "offline" in line
    assert f"written locally to {out}" in line and f"hf upload my-org/fne-tiny {out} ." in line
    assert (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file() and (out / "README.md").is_file()


def test_hugging_face_text_tower_ships_its_tokenizer(tmp_path: Path) -> None:
    """A miniature BERT text tower, built offline: the tokenizer files land in the directory and
    open_clip's local-dir tokenizer and model reproduce ours."""
    transformers = pytest.importorskip("transformers")
    bert = tmp_path / "bert"
    bert.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "square", "circle", "left", "of"]
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32).save_pretrained(bert)
    name = f"fne-export-test-bert-{os.getpid()}"
    (tmp_path / f"{name}.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "linear", "context_length": 12},
    }))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    encoder = DualEncoder(name=name)
    model_cfg = {"_target_": "fne_lightning.models.encoders.DualEncoder", "name": name, "pretrained": None,
                 "pretrained_towers": False, "context_length": None, "image_size": None}
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                "hyper_parameters": {"model": model_cfg}}, ckpt)

    out = tmp_path / "model"
    export(compose_task("export", [f"ckpt_path={ckpt}", f"out_dir={out}"], tmp_path))
    assert {"tokenizer_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "tokenizer.json" in (out / "README.md").read_text()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    captions = ["a red square left of a blue circle", "a circle"]
    assert torch.equal(tokenizer(captions), encoder.tokenizer(captions))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    encoder.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_text(tokenizer(captions), normalize=True),
                                   encoder.encode_text(encoder.tokenizer(captions)))


@pytest.mark.slow
@pytest.mark.parametrize("start", ["local_dir", "pretrained_file"])
def test_finetune_starts_from_the_export(start: str, exported: Path, cache_dir: Path, tmp_path: Path) -> None:
    """``experiment=synthetic_finetune`` from an export (both ways of naming it): the model starts
    from the exported weights, trains, and its checkpoint exports again."""
    model = {"local_dir": [f"model.name=local-dir:{exported}"],
             "pretrained_file": [f"model.pretrained={exported / WEIGHTS_FILE}"]}[start]
    cfg = compose_config([*TINY_OVERRIDES, "experiment=synthetic_finetune", *model, "trainer.max_epochs=1",
                          "loss.warmup_epochs=0", "optim.scheduler.milestones=[]", "figures.enabled=false"],
                         cache_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    momentum = cfg.momentum if "momentum" in cfg else cfg.loss.momentum  # top-level since the loss refactor
    assert cfg.optim.optimizer.lr == 5e-5 and momentum == 0.9 and cfg.loss.warmup_epochs == 0
    exported_weights = load_file(exported / WEIGHTS_FILE)
    module, _ = build(cfg)
    before = module.encoder.model.state_dict()
    assert before.keys() == exported_weights.keys()
    assert all(torch.equal(before[k], exported_weights[k]) for k in before)

    metrics = train(cfg)
    assert np.isfinite(metrics["test/rsum"])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    trained = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not torch.equal(trained["encoder.model.visual.proj"], exported_weights["visual.proj"])  # it trained
    again = export(compose_task("export", [f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'again'}"], tmp_path))
    assert json.loads((again / CONFIG_FILE).read_text()) == json.loads((exported / CONFIG_FILE).read_text())
