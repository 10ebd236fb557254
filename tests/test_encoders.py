"""The open_clip dual encoder, its momentum copy and the EMA update."""

from __future__ import annotations

import pytest
import torch

from fne_lightning.components.encoders import DualEncoder, ema_update, momentum_copy
from fne_lightning.errors import FNEError


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
