"""Dual encoder over open_clip, and the momentum (EMA) copy FNE keeps of it.

Any open_clip architecture works: the built-in ones (``ViT-B-32`` with ``openai`` weights),
timm/Hugging Face towers (the paper's ViT-B/16-384 + bert-base-uncased, FNE_SPEC section 1),
and the tiny configs shipped in ``model_configs/`` (registered with open_clip on import) that
train from random init on a CPU in minutes. Outputs are L2-normalised, so a dot product is
the cosine similarity of FNE_SPEC section 1.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from fne_lightning.errors import FNEError, check

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass(frozen=True)
class ImageConfig:
    """What the data pipeline must produce for this encoder: size and normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _file_error(path: str, err: BaseException) -> str:
    text = str(err)
    if "Weights only load failed" in text or "weights_only" in text:
        return (f"model.pretrained={path!r}: refused by torch.load(weights_only=True) (the file holds pickled "
                "objects beyond tensors); if you trust it, pass model.trust_pretrained=true")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
    return f"model.pretrained={path!r}: not weights of this model ({first})"


def _weights_error(name: str, pretrained: str | None, model_cfg: dict, cache_dir: str | None) -> str:
    """One line saying which weights could not be loaded, where they were looked for, and the fix."""
    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    where = cache_dir or f"{hf_home}/hub"
    if pretrained:
        repo = (open_clip.get_pretrained_cfg(name, pretrained) or {}).get("hf_hub", "").rstrip("/")
        what = f"pretrained weights {pretrained!r}" + (f" (Hugging Face repo {repo})" if repo else "")
    else:
        towers = [model_cfg.get("vision_cfg", {}).get("timm_model_name"),
                  model_cfg.get("text_cfg", {}).get("hf_model_name")]
        what = "the towers' pretrained weights/configs (" + ", ".join(t for t in towers if t) + ")"
    return (f"model.name={name!r}: could not load {what}: not in the cache {where} and not downloadable "
            "(offline?). Download them where there is network (same HF_HOME), or pass "
            "model.pretrained=/path/to/weights")


class DualEncoder(nn.Module):
    """Image and text towers of an open_clip model, each returning L2-normalised features.

    Args:
        name: open_clip architecture (``open_clip.list_models()``, plus our ``fne-*`` configs).
        pretrained: an open_clip weight tag (e.g. ``openai``), a local checkpoint file, or None
            for random init.
        pretrained_towers: for timm/Hugging Face towers, load each tower's own pretrained weights
            (ImageNet-21k ViT, bert-base-uncased) when no full ``pretrained`` checkpoint is given.
        cache_dir: where open_clip / Hugging Face look for downloaded weights.
        context_length: override the text context length of the config.
        image_size: override the input resolution of the image tower.
        image_mean, image_std: override the normalisation open_clip reports for the image tower
            (timm towers without an open_clip tag default to OpenAI's statistics).
        trust_pretrained: load a ``pretrained`` file that ``torch.load(weights_only=True)`` refuses
            (it would run code pickled in the file: only for files you trust).
    """

    def __init__(
        self,
        name: str = "fne-tiny",
        pretrained: str | None = None,
        pretrained_towers: bool = False,
        cache_dir: str | None = None,
        context_length: int | None = None,
        image_size: int | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        trust_pretrained: bool = False,
    ) -> None:
        super().__init__()
        check(name in open_clip.list_models(), "model.name", "an open_clip architecture "
              "(see open_clip.list_models()) or one of ours: fne-tiny", name)
        model_cfg = open_clip.get_model_config(name)
        hf_text = "hf_model_name" in model_cfg.get("text_cfg", {})
        timm_image = "timm_model_name" in model_cfg.get("vision_cfg", {})
        if hf_text and importlib.util.find_spec("transformers") is None:
            raise FNEError(f"model.name={name!r} uses a Hugging Face text tower and needs the "
                           "'transformers' package: pip install 'fne-lightning[paper]'")
        if pretrained and not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(name, pretrained):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise FNEError(f"model.pretrained={pretrained!r}: expected a local weights file or one of "
                           f"the open_clip tags of {name}: {tags or 'none'}")
        try:
            # open_clip logs download failures at ERROR level before raising: we raise one clear
            # error instead, so silence its log lines for the duration of the call.
            logging.disable(logging.ERROR)
            self.model = open_clip.create_model(
                name,
                pretrained=pretrained or None,
                pretrained_image=pretrained_towers and timm_image,
                pretrained_text=pretrained_towers and hf_text,
                cache_dir=cache_dir,
                force_context_length=context_length,
                force_image_size=image_size,
                weights_only=not trust_pretrained,
            )
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as err:
            # Download failures surface as RuntimeError (open_clip) or OSError (HF hub/timm).
            if not (pretrained or pretrained_towers or hf_text):
                raise
            if pretrained and os.path.isfile(pretrained):
                raise FNEError(_file_error(pretrained, err)) from err
            raise FNEError(_weights_error(name, pretrained, model_cfg, cache_dir)) from err
        finally:
            logging.disable(logging.NOTSET)
        log.info("model %s: %s", name, f"weights {pretrained}" if pretrained else
                 "pretrained towers" if pretrained_towers else "random init")
        # The triplet losses use no temperature: freeze open_clip's logit scale/bias so every
        # trainable parameter gets a gradient (DDP requires it without find_unused_parameters).
        for attr in ("logit_scale", "logit_bias"):
            param = getattr(self.model, attr, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)
        self.name = name
        self.tokenizer = open_clip.get_tokenizer(name, context_length=context_length)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        size = pp["size"]
        self.image_config = ImageConfig(
            size=int(size[0] if isinstance(size, (tuple, list)) else size),
            mean=tuple(image_mean or pp["mean"]),
            std=tuple(image_std or pp["std"]),
        )

    @property
    def embed_dim(self) -> int:
        """Dimension D of the shared embedding space."""
        return int(open_clip.get_model_config(self.name)["embed_dim"])

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D), unit norm."""
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids -> (B, D), unit norm."""
        return self.model.encode_text(tokens, normalize=True)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode_image(images), self.encode_text(tokens)


def momentum_copy(encoder: nn.Module) -> nn.Module:
    """A frozen deep copy: no gradient, never handed to the optimizer (FNE_SPEC section 1)."""
    twin = copy.deepcopy(encoder)
    twin.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """theta_m <- m * theta_m + (1 - m) * theta for parameters; buffers are copied.

    One fused ``_foreach_lerp_`` over all tensors: no Python loop per step on the GPU.
    ``momentum=0`` makes the target equal to the source.
    """
    tgt = [p for p in target.parameters()]
    src = [p.detach() for p in source.parameters()]
    if len(tgt) != len(src):
        raise RuntimeError("momentum encoder and encoder have different parameter lists")
    if tgt:
        torch._foreach_lerp_(tgt, src, 1.0 - momentum)
    for b_t, b_s in zip(target.buffers(), source.buffers(), strict=True):
        b_t.copy_(b_s)
