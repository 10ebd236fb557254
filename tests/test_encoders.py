"""The open_clip dual encoder (built-in, local-dir: and hf-hub: names, local tower weights), its momentum
copy and the EMA update."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from safetensors.torch import save_file

from fne_lightning.errors import FNEError
from fne_lightning.evaluate import evaluate
from fne_lightning.models.encoders import (
    DualEncoder,
    ema_update,
    load_timm_weights,
    momentum_copy,
    text_trimmable,
)
from fne_lightning.train import train
from fne_lightning.utils.config import config_dir

from helpers import run_entry_point


@pytest.fixture(scope="module")
def encoder() -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder("fne-tiny")


def test_tiny_encoder_outputs_unit_norm_features(encoder: DualEncoder) -> None:
    size = encoder.image_config.size
    tokens = encoder.tokenizer(["a red circle", "two small stars on a dotted background"])
    image_features, text_features = encoder(torch.randn(2, 3, size, size), tokens)
    assert image_features.shape == text_features.shape == (2, encoder.embed_dim)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(2))
    # The triplet losses use no temperature: open_clip's logit scale is frozen.
    assert not encoder.model.logit_scale.requires_grad


def test_momentum_copy_is_frozen_and_ema_follows_the_formula(encoder: DualEncoder) -> None:
    twin = momentum_copy(encoder)
    assert not any(p.requires_grad for p in twin.parameters())
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.5)
    before = [p.clone() for p in twin.parameters()]
    ema_update(twin, encoder, momentum=0.9)
    for old, new, online in zip(before, twin.parameters(), encoder.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)
    ema_update(twin, encoder, momentum=0.0)  # momentum 0: the copy equals the online towers
    for new, online in zip(twin.parameters(), encoder.parameters(), strict=True):
        assert torch.equal(new, online)


def _text_lengths_seen(encoder: DualEncoder, tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The text features of ``tokens`` and the sequence lengths the text transformer ran on."""
    seen: list[int] = []
    hook = encoder.model.transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        return encoder.encode_text(tokens), seen
    finally:
        hook.remove()


def test_training_batches_run_the_text_tower_only_up_to_their_longest_caption() -> None:
    torch.manual_seed(0)
    encoder = DualEncoder("fne-tiny")
    captions = ["a red circle", "two small stars on a dotted background above a big blue square", "dots"]
    tokens = encoder.tokenizer(captions)
    longest = int((tokens != 0).sum(dim=1).max())  # start, words, end token
    assert tokens.shape[1] == 32 and longest < 20
    encoder.train()
    trimmed, seen = _text_lengths_seen(encoder, tokens)
    assert seen == [longest]
    full = encoder.model.encode_text(tokens, normalize=True)  # open_clip's own, at the full context
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)
    # The same gradients: the cut positions sent none back through the causal mask.
    weights = torch.randn_like(full)
    grads = [torch.autograd.grad((features * weights).sum(), list(encoder.model.transformer.parameters())
                                 + [encoder.model.token_embedding.weight, encoder.model.positional_embedding])
             for features in (encoder.encode_text(tokens), encoder.model.encode_text(tokens, normalize=True))]
    for got, expected in zip(*grads, strict=True):  # rounding only: far below each gradient's scale
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    # Evaluation embeds every caption at the full context, whatever its batch.
    encoder.eval()
    features, seen = _text_lengths_seen(encoder, tokens[:1])
    assert seen == [32]
    assert torch.equal(features, encoder.model.encode_text(tokens[:1], normalize=True))
    encoder.train()
    encoder.trim_text = False
    assert _text_lengths_seen(encoder, tokens)[1] == [32]


@pytest.mark.parametrize("text_cfg, trimmable", [({}, True), ({"no_causal_mask": True}, False),
                                                 ({"pool_type": "last"}, False)])
def test_only_causal_towers_pooling_at_the_end_token_are_trimmed(text_cfg: dict, trimmable: bool) -> None:
    base = open_clip.get_model_config("fne-tiny")["text_cfg"]
    model = open_clip.create_model("fne-tiny", text_cfg={**base, **text_cfg})
    assert text_trimmable(model) is trimmable


def test_a_trim_text_that_is_not_a_boolean_is_one_clear_error() -> None:
    with pytest.raises(FNEError, match="model.trim_text='no': expected true or false"):
        DualEncoder("fne-tiny", trim_text="no")  # a string would read as true


def test_unknown_model_name_is_one_clear_error() -> None:
    with pytest.raises(FNEError, match="model.name='ViT-Q-99'"):
        DualEncoder("ViT-Q-99")


def test_unknown_pretrained_tag_lists_the_known_ones() -> None:
    with pytest.raises(FNEError, match=r"model.pretrained='nope'.*openai"):
        DualEncoder("ViT-B-32", pretrained="nope")


def test_unreachable_weights_say_which_and_where(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No network here: open_clip cannot download the 'openai' weights. Offline mode makes the
    # Hugging Face hub fail at once instead of after its retries.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FNEError, match=r"could not load pretrained weights 'openai'.*vit_base_patch32_clip_224.*not in the cache.*model.pretrained=/path"):
        DualEncoder("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))


def write_local_dir(path: Path, source: DualEncoder) -> Path:
    """open_clip's local-dir layout: open_clip_config.json plus the model's weights as safetensors."""
    path.mkdir()
    config = {"model_cfg": open_clip.get_model_config("fne-tiny"),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    save_file(source.model.state_dict(), str(path / "open_clip_model.safetensors"))
    return path


def test_local_dir_model_loads_the_directory_config_and_weights(encoder: DualEncoder, tmp_path: Path) -> None:
    local = write_local_dir(tmp_path / "tiny", encoder)
    loaded = DualEncoder(f"local-dir:{local}")
    assert loaded.embed_dim == 128 and loaded.image_config.std == (0.25, 0.25, 0.25)
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    tokens = loaded.tokenizer(["a red circle"])
    torch.testing.assert_close(loaded.encode_text(tokens), encoder.encode_text(tokens))


@pytest.mark.slow
def test_local_dir_model_trains_and_evaluates_zero_shot(encoder: DualEncoder, cfg: DictConfig, cache_dir: Path,
                                                         tmp_path: Path) -> None:
    name = f"local-dir:{write_local_dir(tmp_path / 'tiny', encoder)}"
    with open_dict(cfg):
        cfg.model.name = name
        cfg.trainer.fast_dev_run = True
    assert "train/loss" in train(cfg)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=["model=tiny", f"model.name={name}", "data=synthetic",
                                                  f"paths.cache_dir={cache_dir}", "data.num_train=32",
                                                  "data.num_val=8", "data.num_test=8"])
    with open_dict(eval_cfg):
        eval_cfg.paths.output_dir = str(tmp_path / "eval")
    metrics = evaluate(eval_cfg)
    assert metrics["test/rsum"] >= 0
    assert f"zero-shot, model `{name}`" in (tmp_path / "eval" / "metrics.md").read_text()


@pytest.mark.parametrize("layout", ["missing", "no_config", "no_weights", "bad_config"])
def test_a_bad_local_dir_is_one_line_naming_it(layout: str, tmp_path: Path) -> None:
    local = tmp_path / "model"
    if layout != "missing":
        local.mkdir()
    if layout in ("no_weights", "bad_config"):
        (local / "open_clip_config.json").write_text('{"model_cfg": {}}' if layout == "no_weights" else "{}")
    expected = {"missing": "no such directory", "no_config": "open_clip_config.json is missing",
                "no_weights": "no weights file", "bad_config": "is not an open_clip config"}[layout]
    with pytest.raises(FNEError, match=rf"model.name='local-dir:{local}': .*{expected}"):
        DualEncoder(f"local-dir:{local}")


def test_pretrained_with_a_schema_name_is_refused(encoder: DualEncoder, tmp_path: Path) -> None:
    local = write_local_dir(tmp_path / "tiny", encoder)
    with pytest.raises(FNEError, match=r"model.pretrained='openai': expected null with model.name='local-dir:"):
        DualEncoder(f"local-dir:{local}", pretrained="openai")


@pytest.mark.slow
def test_hf_hub_name_offline_is_one_line_naming_the_repo_and_the_cache(
        tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when imported: the real entry point in a fresh process.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    proc = run_entry_point(
        "evaluate", "model=tiny", "model.name=hf-hub:fne-test/no-such-repo", "data=synthetic",
        f"paths.cache_dir={cache_dir}", "data.num_train=32", "data.num_val=8", "data.num_test=8",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, proc.stderr[-3000:]
    assert "model.name='hf-hub:fne-test/no-such-repo'" in error[0] and "repo fne-test/no-such-repo" in error[0]
    assert f"the cache {tmp_path / 'hf' / 'hub'}" in error[0] and "no network" in error[0]


def test_timm_weights_that_do_not_fit_name_the_file_and_the_first_key(tmp_path: Path) -> None:
    # The function DualEncoder(timm_weights=...) calls, on a real timm trunk as open_clip builds it.
    timm = pytest.importorskip("timm")
    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit", num_classes=10).state_dict(), str(weights))
    load_timm_weights(timm.create_model("test_vit", num_classes=0, global_pool="avg"), str(weights))  # fits
    with pytest.raises(FNEError, match=rf"model.timm_weights='{weights}': not a checkpoint of the timm model "
                                       r"test_vit2 .*'blocks.0.ls1.gamma' is not in the checkpoint"):
        load_timm_weights(timm.create_model("test_vit2", num_classes=0, global_pool="avg"), str(weights))
    with pytest.raises(FNEError, match=r"model.timm_weights='.*nope.pth': file not found"):
        load_timm_weights(timm.create_model("test_vit", num_classes=0), str(tmp_path / "nope.pth"))
