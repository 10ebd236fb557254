"""Dual encoder over open_clip, and the momentum (EMA) copy FNE keeps of it.

Any open_clip architecture works: the built-in ones (``ViT-B-32`` with ``openai`` weights),
open_clip's ``hf-hub:org/repo`` and ``local-dir:/path`` model names, timm/Hugging Face towers
(the paper's ViT-B/16-384 + bert-base-uncased, FNE_SPEC section 1, also from local copies:
``hf_model``, ``timm_model``, ``timm_weights``), and the tiny configs shipped in
``model_configs/`` (registered with open_clip on import) that train from random init on a CPU
in minutes. Outputs are L2-normalised, so a dot product is the cosine similarity of FNE_SPEC
section 1.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from fne_lightning.errors import FNEError, check

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)
SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip model names whose config and weights come from elsewhere
LOCAL_DIR_LAYOUT = ("open_clip_config.json ({'model_cfg': ..., 'preprocess_cfg': ...}) and open_clip_model.safetensors "
                    "(or open_clip_pytorch_model.bin)")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pth")  # what open_clip looks for in a local-dir


@dataclass(frozen=True)
class ImageConfig:
    """What the data pipeline must produce for this encoder: size and normalisation."""

    size: int  #: The side of the square input image, in pixels.
    mean: tuple[float, float, float]  #: Per-channel mean subtracted after scaling to [0, 1].
    std: tuple[float, float, float]  #: Per-channel standard deviation the centred values are divided by.


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _file_error(key: str, path: str, err: BaseException) -> str:
    if "Weights only load failed" in str(err) or "weights_only" in str(err):
        return (f"{key}={path!r}: refused by torch.load(weights_only=True) (the file holds pickled "
                "objects beyond tensors); if you trust it, pass model.trust_pretrained=true")
    return f"{key}={path!r}: not weights of this model ({_first_line(err)})"


def _hf_cache(cache_dir: str | None) -> str:
    """The Hugging Face hub cache that is searched: model.cache_dir, else HF_HUB_CACHE / HF_HOME."""
    import huggingface_hub.constants

    return cache_dir or huggingface_hub.constants.HF_HUB_CACHE


def _weights_error(name: str, pretrained: str | None, model_cfg: dict, cache_dir: str | None) -> str:
    """One line saying which weights could not be loaded, where they were looked for, and the fix."""
    if pretrained:
        repo = (open_clip.get_pretrained_cfg(name, pretrained) or {}).get("hf_hub", "").rstrip("/")
        what = f"pretrained weights {pretrained!r}" + (f" (Hugging Face repo {repo})" if repo else "")
    else:
        towers = [model_cfg.get("vision_cfg", {}).get("timm_model_name"),
                  model_cfg.get("text_cfg", {}).get("hf_model_name")]
        what = "the towers' pretrained weights/configs (" + ", ".join(t for t in towers if t) + ")"
    return (f"model.name={name!r}: could not load {what}: not in the cache {_hf_cache(cache_dir)} and not "
            "downloadable (offline?). Download them where there is network (same HF_HOME), or use local "
            "copies: model.pretrained=/path/to/weights, model.hf_model=/path/to/hf_dir, model.timm_weights=FILE")


def resolve_model_config(name: str, cache_dir: str | None = None) -> dict[str, Any]:
    """open_clip's model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for a model name.

    Args:
        name: a registered architecture (``open_clip.list_models()``, ours included),
            ``local-dir:DIR`` (read from ``DIR/open_clip_config.json``) or ``hf-hub:org/repo``
            (from the Hugging Face cache, else downloaded, together with the repo's weights).
        cache_dir: the Hugging Face cache to use (default: ``HF_HUB_CACHE`` / ``HF_HOME``).

    Returns:
        The ``model_cfg`` dict.

    Raises:
        FNEError: an unknown name, a directory without config or weights, or a repo that is
            neither cached nor downloadable.
    """
    if name.startswith("local-dir:"):
        path = Path(name.removeprefix("local-dir:")).expanduser()
        config_file = path / "open_clip_config.json"
        if not config_file.is_file():
            found = "no such directory" if not path.is_dir() else f"{config_file.name} is missing"
            raise FNEError(f"model.name={name!r}: {found}; expected a directory with {LOCAL_DIR_LAYOUT}")
        try:
            model_cfg = json.loads(config_file.read_text())["model_cfg"]
        except (ValueError, KeyError, TypeError) as err:
            raise FNEError(f"model.name={name!r}: {config_file} is not an open_clip config "
                           f"(expected JSON with a 'model_cfg' entry: {_first_line(err)})") from None
        # Without a weights file open_clip only warns and builds a randomly initialised model.
        if not any(f for pattern in WEIGHT_FILES for f in path.glob(pattern)):
            raise FNEError(f"model.name={name!r}: no weights file (.safetensors, .bin or .pth) in {path}; "
                           f"expected {LOCAL_DIR_LAYOUT}")
        return model_cfg
    if name.startswith("hf-hub:"):
        from open_clip.pretrained import download_pretrained_from_hf

        repo = name.removeprefix("hf-hub:")
        try:
            config_file = download_pretrained_from_hf(repo, filename="open_clip_config.json", cache_dir=cache_dir)
            # Fetched here too: when they are missing open_clip only warns and builds a random model.
            download_pretrained_from_hf(repo, cache_dir=cache_dir)
        except OSError:  # huggingface_hub's offline / not-found / connection errors are all OSErrors
            raise FNEError(f"model.name={name!r}: the open_clip config and weights of Hugging Face repo {repo} "
                           f"are not in the cache {_hf_cache(cache_dir)} (model.cache_dir, else HF_HUB_CACHE or "
                           "HF_HOME/hub) and cannot be downloaded (no network, or HF_HUB_OFFLINE=1). Download "
                           "them where there is network into the same cache, or use model.name=local-dir:DIR "
                           "with a copy of the repo") from None
        return json.loads(Path(config_file).read_text())["model_cfg"]
    check(name in open_clip.list_models(), "model.name", "an open_clip architecture (see "
          "open_clip.list_models()), one of ours (fne-tiny), hf-hub:org/repo or local-dir:/path", name)
    return open_clip.get_model_config(name)


def load_timm_weights(trunk: nn.Module, path: str, weights_only: bool = True) -> None:
    """Load a timm checkpoint into the image tower's timm ``trunk``, strictly.

    Every weight must be there with its shape, except the classifier head.

    Args:
        trunk: the timm model of the image tower (``model.visual.trunk``).
        path: a state dict in ``.safetensors``, ``.pth`` or ``.bin``.
        weights_only: refuse pickled code in ``.pth``/``.bin`` files (``torch.load(weights_only=True)``).

    Raises:
        FNEError: a missing or unreadable file, or weights that do not fit the trunk.
    """
    key = "model.timm_weights"
    if not os.path.isfile(path):
        raise FNEError(f"{key}={path!r}: file not found (expected a timm state dict: .safetensors, .pth or .bin)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # safetensors, pickle and zip errors share no base class
        raise FNEError(_file_error(key, path, err)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FNEError(f"{key}={path!r}: expected a state dict (name -> tensor), found {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    heads = trunk.pretrained_cfg.get("classifier") or "head"
    heads = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    state = {k: v for k, v in state.items() if not k.startswith(heads)}
    own = trunk.state_dict()
    # Average-pooled ViTs (timm_pool avg, the paper's mean pooling) apply their final LayerNorm after
    # pooling (fc_norm), class-token checkpoints before it (norm): the same layer, so it moves over.
    for k in [k for k in state if k.startswith("norm.")]:
        if k not in own and f"fc_{k}" in own and f"fc_{k}" not in state:
            state[f"fc_{k}"] = state.pop(k)
    from fne_lightning.utils.checkpoints import state_mismatch

    problem = state_mismatch(own, state)
    if problem:
        name = trunk.pretrained_cfg.get("architecture") or type(trunk).__name__
        raise FNEError(f"{key}={path!r}: not a checkpoint of the timm model {name} (its classifier head "
                       f"excepted): {problem}")
    trunk.load_state_dict(state, strict=True)


def _check_widths(model: nn.Module, embed_dim: int) -> None:
    """Towers without a projection output their own width: it must be the shared dimension."""
    from open_clip.hf_configs import arch_dict
    from open_clip.hf_model import HFTextEncoder
    from open_clip.timm_model import TimmModel

    text, visual = getattr(model, "text", None), getattr(model, "visual", None)
    if isinstance(text, HFTextEncoder) and not hasattr(text, "proj"):  # open_clip leaves it unset then
        width = getattr(text.config, arch_dict[text.config.model_type]["config_names"]["width"])
        raise FNEError(f"model.embed_dim={embed_dim}: the Hugging Face text tower is {width} wide and has no "
                       f"projection (hf_proj_type null): set model.embed_dim={width}")
    if isinstance(visual, TimmModel) and len(visual.head) == 0 and visual.trunk.num_features != embed_dim:
        raise FNEError(f"model.embed_dim={embed_dim}: the timm image tower is {visual.trunk.num_features} wide "
                       f"and has no projection (timm_proj none): set model.embed_dim={visual.trunk.num_features}")


def _hf_dir(hf_model: str) -> str:
    """A local Hugging Face model directory must exist and hold config.json; anything else is a hub name."""
    path = Path(hf_model).expanduser()
    if path.is_dir() or hf_model.startswith(("/", "./", "../", "~")):
        check((path / "config.json").is_file(), "model.hf_model", "a Hugging Face model directory with "
              "config.json and tokenizer files (save_pretrained layout) or a hub name", hf_model)
        return str(path)
    return hf_model


class DualEncoder(nn.Module):
    """Image and text towers of an open_clip model, each returning L2-normalised features.

    Built from the ``model`` config group (``model.<name>`` keys). Besides the towers it gives
    the data pipeline what to produce: :attr:`image_config` and :attr:`tokenizer`. open_clip's
    logit scale (and bias) are frozen: the triplet losses use no temperature.
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
        hf_model: str | None = None,
        timm_model: str | None = None,
        timm_weights: str | None = None,
        embed_dim: int | None = None,
        trim_text: bool = True,
    ) -> None:
        """Build the open_clip model and load its weights, or fail with one line that says why.

        Args:
            name: open_clip architecture (``open_clip.list_models()``, plus our ``fne-*`` configs),
                or open_clip's ``hf-hub:org/repo`` / ``local-dir:/path`` (config and weights from
                there).
            pretrained: an open_clip weight tag (e.g. ``openai``), a local checkpoint file, or None
                for random init. Must be None with ``hf-hub:``/``local-dir:`` names.
            pretrained_towers: for timm/Hugging Face towers, load each tower's own pretrained
                weights (ImageNet-21k ViT, bert-base-uncased) when no full ``pretrained``
                checkpoint is given.
            cache_dir: where open_clip / Hugging Face look for downloaded weights.
            context_length: override the text context length of the config.
            image_size: override the input resolution of the image tower.
            image_mean: override the normalisation mean open_clip reports for the image tower
                (timm towers without an open_clip tag default to OpenAI's statistics).
            image_std: override the normalisation standard deviation likewise.
            trust_pretrained: load a ``pretrained`` or ``timm_weights`` file that
                ``torch.load(weights_only=True)`` refuses (it would run code pickled in the file:
                only for files you trust).
            hf_model: a local Hugging Face model directory (or hub name) for the Hugging Face text
                tower: its architecture, its tokenizer and, with ``pretrained_towers``, its
                weights.
            timm_model: the timm architecture of the timm image tower
                (``vision_cfg.timm_model_name``).
            timm_weights: a timm state dict file loaded into the image tower's trunk (classifier
                head excepted), instead of timm's download when ``pretrained_towers`` is set.
            embed_dim: override the shared dimension D of the config (towers without a projection
                must be exactly that wide).
            trim_text: in training mode, run the text tower on the batch's tokens only up to its
                longest caption's end token (the padding after it cannot reach any caption's
                feature through a causal tower that pools at that token): the same features up to
                rounding, a third less text-tower work on the synthetic data. Only for open_clip's
                own text tower with its causal mask and end-token pooling
                (:func:`text_trimmable`); in eval mode every caption is embedded at the full
                context, so its feature does not depend on its batch.

        Raises:
            FNEError: a bad value, or weights that cannot be found or loaded, naming the key or
                file and the fix.
        """
        super().__init__()
        check(isinstance(trim_text, bool), "model.trim_text", "true or false", trim_text)
        schema = next((s for s in SCHEMAS if name.startswith(s)), None)
        check(not (schema and pretrained), "model.pretrained", f"null with model.name={name!r} (open_clip takes "
              "the weights from that " + ("directory" if schema == "local-dir:" else "repo") + " and would "
              "ignore model.pretrained)", pretrained)
        model_cfg = resolve_model_config(name, cache_dir)
        text_cfg, vision_cfg = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
        hf_text, timm_image = "hf_model_name" in text_cfg, "timm_model_name" in vision_cfg
        check(hf_model is None or hf_text, "model.hf_model", f"null: {name} has no Hugging Face text tower", hf_model)
        check(timm_model is None or timm_image, "model.timm_model", f"null: {name} has no timm image tower",
              timm_model)
        check(timm_weights is None or timm_image, "model.timm_weights", f"null: {name} has no timm image tower",
              timm_weights)
        check(embed_dim is None or (isinstance(embed_dim, int) and embed_dim > 0), "model.embed_dim",
              "null or a positive integer", embed_dim)
        if hf_text and importlib.util.find_spec("transformers") is None:
            raise FNEError(f"model.name={name!r} uses a Hugging Face text tower and needs the "
                           "'transformers' package: pip install 'fne-lightning[paper]'")
        if pretrained and not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(name, pretrained):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise FNEError(f"model.pretrained={pretrained!r}: expected a local weights file or one of "
                           f"the open_clip tags of {name}: {tags or 'none'}")
        full_checkpoint = bool(pretrained or schema)
        # Top-level entries given to create_model replace the config's. It sets the towers' pretrained flags
        # and the forced sizes on its own copy, which a replaced tower config never sees: set them here.
        overrides: dict[str, Any] = {} if embed_dim is None else {"embed_dim": embed_dim}
        if hf_model:
            hf_model = _hf_dir(hf_model)
            overrides["text_cfg"] = {**text_cfg, "hf_model_name": hf_model, "hf_tokenizer_name": hf_model,
                                     "hf_model_pretrained": pretrained_towers and not full_checkpoint,
                                     "context_length": context_length or text_cfg.get("context_length")}
        if timm_model or timm_weights:
            overrides["vision_cfg"] = {**vision_cfg, "timm_model_name": timm_model or vision_cfg["timm_model_name"],
                                       "timm_model_pretrained": pretrained_towers and not (full_checkpoint
                                                                                          or timm_weights),
                                       "image_size": image_size or vision_cfg.get("image_size")}
        effective_cfg = {**model_cfg, **overrides}
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
                # A replaced image tower is resized below, after its timm weights are loaded.
                force_image_size=None if "vision_cfg" in overrides else image_size,
                weights_only=not trust_pretrained,
                **overrides,
            )
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as err:
            # Download failures surface as RuntimeError (open_clip) or OSError (HF hub/timm).
            if not (pretrained or schema or pretrained_towers or hf_text):
                raise
            if pretrained and os.path.isfile(pretrained):
                raise FNEError(_file_error("model.pretrained", pretrained, err)) from err
            if schema:
                raise FNEError(_file_error("model.name", name, err)) from err
            raise FNEError(_weights_error(name, pretrained, effective_cfg, cache_dir)) from err
        finally:
            logging.disable(logging.NOTSET)
        if "vision_cfg" in overrides:
            if timm_weights:
                load_timm_weights(self.model.visual.trunk, timm_weights, weights_only=not trust_pretrained)
            # open_clip never passes the config's image size to timm: the trunk is built at the timm
            # model's own resolution (its pos_embed is resampled here), which timm_model may change.
            self.model.visual.set_input_size(overrides["vision_cfg"]["image_size"])
        self._embed_dim = int(effective_cfg["embed_dim"])  # what open_clip built both towers with
        _check_widths(self.model, self._embed_dim)
        # transformers' from_pretrained returns its model in eval mode, and Lightning keeps each submodule's
        # mode: without this the pretrained BERT would be fine-tuned without dropout.
        self.model.train()
        log.info("model %s: %s", name, f"weights {pretrained}" if pretrained else f"weights of {name}" if schema
                 else "pretrained towers" if pretrained_towers else "random init")
        # The triplet losses use no temperature: freeze open_clip's logit scale/bias so every
        # trainable parameter gets a gradient (DDP requires it without find_unused_parameters).
        for attr in ("logit_scale", "logit_bias"):
            param = getattr(self.model, attr, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)
        self.name = name
        self.trim_text = trim_text and text_trimmable(self.model)
        #: The tokenizer of the text tower, from a list of n captions to (n, L) long token ids.
        self.tokenizer = self._tokenizer(name, hf_model, overrides.get("text_cfg"), context_length, cache_dir)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        size = pp["size"]
        #: The image size and normalisation the data pipeline must produce.
        self.image_config = ImageConfig(
            size=int(size[0] if isinstance(size, (tuple, list)) else size),
            mean=tuple(image_mean or pp["mean"]),
            std=tuple(image_std or pp["std"]),
        )

    @staticmethod
    def _tokenizer(name: str, hf_model: str | None, text_cfg: dict | None, context_length: int | None,
                   cache_dir: str | None) -> Any:
        """open_clip's tokenizer for ``name`` (for ``local-dir:`` an HF tokenizer from the directory itself
        when the config names one); with ``hf_model``, that model's tokenizer."""
        from open_clip.tokenizer import HFTokenizer

        try:
            if hf_model is None:
                return open_clip.get_tokenizer(name, context_length=context_length, cache_dir=cache_dir)
            return HFTokenizer(hf_model, context_length=text_cfg["context_length"], cache_dir=cache_dir,
                               tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))
        except (OSError, ValueError) as err:
            key, value = ("model.hf_model", hf_model) if hf_model else ("model.name", name)
            raise FNEError(f"{key}={value!r}: could not load its tokenizer from the directory or the cache "
                           f"{_hf_cache(cache_dir)} ({_first_line(err)})") from None

    @property
    def embed_dim(self) -> int:
        """Dimension D of the shared embedding space."""
        return self._embed_dim

    def encode_image(self, images: Tensor) -> Tensor:
        """Image features.

        Args:
            images: (B, 3, H, W) normalised images.

        Returns:
            (B, D) unit-norm features.
        """
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Caption features.

        Args:
            tokens: (B, L) token ids (:attr:`tokenizer`).

        Returns:
            (B, D) unit-norm features.
        """
        if self.trim_text and self.training:
            return _encode_text_trimmed(self.model, tokens)
        return self.model.encode_text(tokens, normalize=True)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Both towers at once.

        Args:
            images: (B, 3, H, W) normalised images.
            tokens: (B, L) token ids.

        Returns:
            ``(encode_image(images), encode_text(tokens))``, each (B, D).
        """
        return self.encode_image(images), self.encode_text(tokens)


def text_trimmable(model: nn.Module) -> bool:
    """Whether ``model`` may run its text tower on tokens cut after the batch's last pooled position.

    That is, whether the features stay the same (what ``trim_text`` relies on). True for
    open_clip's ``CLIP`` (its own text transformer, ``encode_text`` not overridden) with a
    causal attention mask, pooling at the end token (``argmax``, ``eos``).

    Args:
        model: an open_clip model.
    """
    return (isinstance(model, open_clip.CLIP) and type(model).encode_text is open_clip.CLIP.encode_text
            and getattr(model, "attn_mask", None) is not None
            and (getattr(model, "text_pool_type", None) == "argmax"
                 or (model.text_pool_type == "eos" and getattr(model, "text_eos_id", None) is not None)))


def _encode_text_trimmed(model: nn.Module, text: Tensor) -> Tensor:
    """open_clip's ``CLIP.encode_text(text, normalize=True)`` on ``text[:, :n]``, n one past the
    batch's last pooled position, with the positional embedding and the causal mask cut to n.
    Under the causal mask a position only sees those before it, so the positions cut cannot reach
    a pooled one. One host sync (n)."""
    eos = getattr(model, "text_eos_id", None)
    ends = text.argmax(dim=-1) if model.text_pool_type == "argmax" else (text == eos).int().argmax(dim=-1)
    n = int(ends.max()) + 1 if text.shape[0] else text.shape[1]
    text = text[:, :n]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)
    x = x + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=eos)
    if isinstance(model.text_projection, nn.Linear):
        x = model.text_projection(x)
    elif model.text_projection is not None:
        x = x @ model.text_projection
    return nn.functional.normalize(x, dim=-1)


def momentum_copy(encoder: nn.Module) -> nn.Module:
    """The momentum encoder: a frozen deep copy of ``encoder`` (FNE_SPEC section 1).

    Its parameters need no gradient and are never handed to the optimizer; :func:`ema_update`
    moves them.

    Args:
        encoder: the online encoder.
    """
    twin = copy.deepcopy(encoder)
    twin.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """EMA update of the momentum encoder: ``theta_m <- m * theta_m + (1 - m) * theta``.

    Parameters move by the EMA; buffers are copied. One fused ``_foreach_lerp_`` over all
    tensors: no Python loop per step on the GPU.

    Args:
        target: the momentum encoder (:func:`momentum_copy` of ``source``).
        source: the online encoder.
        momentum: m; 0 makes the target equal to the source.

    Raises:
        RuntimeError: the two have different parameter lists.
    """
    tgt = [p for p in target.parameters()]
    src = [p.detach() for p in source.parameters()]
    if len(tgt) != len(src):
        raise RuntimeError("momentum encoder and encoder have different parameter lists")
    if tgt:
        torch._foreach_lerp_(tgt, src, 1.0 - momentum)
    for b_t, b_s in zip(target.buffers(), source.buffers(), strict=True):
        b_t.copy_(b_s)
