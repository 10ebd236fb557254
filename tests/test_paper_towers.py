"""The paper's towers (model=vit_b16_bert: timm ViT + Hugging Face BERT, mean-pooled, no projection) in
miniature, from local copies written by the test, offline: the same open_clip code path with a
2-layer BERT of the synthetic benchmark's vocabulary and timm's 6-layer ``test_vit``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from fne_lightning.data import synthetic
from fne_lightning.data.captions import clean_caption
from fne_lightning.evaluate import evaluate
from fne_lightning.train import train
from fne_lightning.utils.config import config_dir

from conftest import TINY_OVERRIDES, compose_config

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from safetensors.torch import load_file, save_file  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: id 0 is BertConfig's pad_token_id


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small BERT directory (save_pretrained layout) and a timm test_vit state dict with its classifier
    head, trained with class-token pooling (``norm``), as the published ViT checkpoints are."""
    out = tmp_path_factory.mktemp("towers")
    rng = np.random.default_rng(0)
    words = {w for _ in range(1000) for _, raw in synthetic.make_captions(synthetic.sample_scene(rng), rng)
             for w in clean_caption(raw).split()}
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + sorted(words)) + "\n")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(SPECIAL) + len(words), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(out / "bert")
    transformers.BertTokenizer(str(vocab)).save_pretrained(out / "bert")
    save_file(timm.create_model("test_vit", num_classes=10).state_dict(), str(out / "vit.safetensors"))
    return {"bert": out / "bert", "vit": out / "vit.safetensors", "vocab": vocab}


def paper_overrides(towers: dict[str, Path]) -> list[str]:
    # Both towers are 64 wide without projection, so the shared dimension is 64 (the paper's: 768).
    return ["model=vit_b16_bert", f"model.hf_model={towers['bert']}", "model.timm_model=test_vit",
            f"model.timm_weights={towers['vit']}", "model.image_size=32", "model.embed_dim=64",
            "model.pretrained_towers=true"]


def test_the_towers_get_the_local_weights_and_tokenizer(towers: dict[str, Path], cache_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing may be fetched
    cfg = compose_config([*TINY_OVERRIDES, *paper_overrides(towers)], cache_dir)
    encoder = instantiate(cfg.model)
    assert cfg.model.name == "fne-vit-b16-384-bert" and encoder.embed_dim == 64
    trunk, saved = encoder.model.visual.trunk, load_file(str(towers["vit"]))
    assert torch.equal(trunk.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])
    assert torch.equal(trunk.fc_norm.weight, saved["norm.weight"])  # the final LayerNorm, now after pooling
    assert trunk.patch_embed.img_size == (32, 32) and encoder.image_config.size == 32
    bert = transformers.BertModel.from_pretrained(towers["bert"])
    text = encoder.model.text.transformer
    assert torch.equal(text.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert torch.equal(text.encoder.layer[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight)
    vocab = towers["vocab"].read_text().split()
    tokens = encoder.tokenizer(["a red circle"])[0]
    assert tokens[:5].tolist() == [vocab.index(w) for w in ("[CLS]", "a", "red", "circle", "[SEP]")]
    assert encoder.image_config.mean == (0.5, 0.5, 0.5)  # vit_b16_bert's normalisation
    assert all(m.training for m in encoder.modules())  # from_pretrained's eval mode is undone


@pytest.mark.slow
def test_train_one_fne_epoch_resume_and_evaluate(towers: dict[str, Path], cache_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    vit = tmp_path / "vit.safetensors"  # a copy, removed before the evaluation (which must not need it)
    shutil.copy(towers["vit"], vit)
    cfg = compose_config([*TINY_OVERRIDES, *paper_overrides({**towers, "vit": vit}), "loss.warmup_epochs=0",
                          "trainer.max_epochs=1", "figures.enabled=false", "trainer.enable_progress_bar=false"],
                         cache_dir)
    first = tmp_path / "first"
    with open_dict(cfg):
        cfg.paths.output_dir = str(first)
    trained = train(cfg)
    assert trained["fne/pos_std"] > 0 and "fne/sampled_fn_rate" in trained  # the FNE loss ran, not a warm-up

    last = first / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "resumed")
        cfg.trainer.max_epochs = 2
        cfg.ckpt_path = str(last)
    assert "test/rsum" in train(cfg)
    after = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["epoch"] == saved["epoch"] + 1 and after["global_step"] == 2 * saved["global_step"]
    assert after["state_dict"]["loss.stats.pos_count"] > 0

    # The checkpoint scores in fne_lightning.evaluate what training's test reported for it; every
    # weight comes from the checkpoint, so the timm file is not needed any more.
    vit.unlink()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=[f"ckpt_path={first / 'checkpoints' / 'best.ckpt'}"])
    with open_dict(eval_cfg):
        eval_cfg.paths.output_dir = str(tmp_path / "eval")
    assert evaluate(eval_cfg)["test/rsum"] == pytest.approx(trained["test/rsum"], abs=1e-4)
