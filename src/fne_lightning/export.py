"""Export entry point: ``python -m fne_lightning.export ckpt_path=PATH out_dir=DIR [push_to_hub=org/name]``.

Turns a checkpoint of ``fne_lightning.train`` into an open_clip model directory that plain
open_clip loads with ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
``open_clip.get_tokenizer("local-dir:DIR")`` (or ``"hf-hub:org/name"`` once uploaded):

- ``open_clip_config.json``: ``model_cfg`` (the open_clip config of the trained architecture with
  the run's ``context_length``/``image_size`` overrides) and ``preprocess_cfg`` chosen so that
  open_clip's eval preprocessing *is* our evaluation transform (resize to size x size bicubic,
  the encoder's mean/std): embeddings from plain open_clip equal ours.
- ``open_clip_model.safetensors``: the online encoder's open_clip state dict (the checkpoint's
  ``encoder.model.*``; the momentum encoder, bank and optimizer state are not exported).
- the Hugging Face tokenizer files, for models with a Hugging Face text tower (open_clip's
  local-dir tokenizer reads them from the directory itself).
- ``README.md``: a model card with the training config and the run's test metrics.

The checkpoint is read safely (:func:`~fne_lightning.utils.checkpoints.load_checkpoint`)
and the encoder rebuilt and loaded strictly as ``fne_lightning.evaluate`` does, so a checkpoint
that does not fit its own config is refused before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fne_lightning.errors import FNEError, check, report_user_errors
from fne_lightning.utils.config import config_dir
from fne_lightning.utils.report import atomic_write

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
CARD_FILE = "README.md"
PREFIX = "encoder.model."  # the online DualEncoder's open_clip model inside the LightningModule
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def model_config(name: str, model: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """open_clip's config of architecture ``name`` with the run's ``model.*`` overrides applied as
    ``DualEncoder`` applied them, and notes for the model card on what plain open_clip needs."""
    from fne_lightning.models.encoders import resolve_model_config

    cfg = resolve_model_config(name, model.get("cache_dir"))
    vision, text, notes = cfg["vision_cfg"], cfg["text_cfg"], []
    if model.get("embed_dim") is not None:
        cfg["embed_dim"] = int(model["embed_dim"])
    if model.get("context_length") is not None:
        text["context_length"] = int(model["context_length"])
    if model.get("timm_model"):
        vision["timm_model_name"] = str(model["timm_model"])
    if model.get("image_size") is not None:
        vision["image_size"] = int(model["image_size"])
        if "timm_model_name" in vision:
            # open_clip builds a timm trunk at the timm model's own resolution and resizes it only when asked.
            notes.append(f"The timm image tower was trained at {vision['image_size']} px: pass "
                         f"`force_image_size={vision['image_size']}` to `create_model_and_transforms`.")
    hf_model = model.get("hf_model")
    if hf_model and not Path(os.path.expanduser(str(hf_model))).is_dir():
        text["hf_model_name"] = text["hf_tokenizer_name"] = str(hf_model)
    elif hf_model:
        # A local directory (an offline copy) would not exist where the export is loaded: keep the
        # architecture's Hugging Face name; the tokenizer itself is saved into the directory.
        notes.append(f"The text tower was built from the local directory `{hf_model}`; the config names its "
                     f"architecture `{text.get('hf_model_name')}` (open_clip reads that model's Hugging Face config).")
    return cfg, notes


def preprocess_config(image: Any) -> dict[str, Any]:
    """open_clip ``PreprocessCfg`` equal to our eval transform (``data/transforms.py``):
    ``squash`` is a plain ``Resize((size, size))``, no shorter-side resize or centre crop."""
    return {"size": image.size, "mode": "RGB", "mean": list(image.mean), "std": list(image.std),
            "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0}


def encoder_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``encoder.model.*`` tensors as open_clip's state dict, ready for safetensors.

    safetensors refuses tensors that share memory or are not contiguous (a tied or sliced weight):
    those are copied, so every key owns its bytes; loading restores any tie through the model."""
    import torch

    out: dict[str, Any] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not key.startswith(PREFIX):
            continue
        tensor = value.detach()
        storage = tensor.untyped_storage()
        if (storage.data_ptr() in seen or not tensor.is_contiguous()
                or storage.nbytes() != tensor.numel() * tensor.element_size()):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        out[key[len(PREFIX):]] = tensor
    return out


def save_weights(path: Path, state: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """safetensors file written atomically (serialised in memory, then renamed into place)."""
    from safetensors.torch import save

    with atomic_write(path, "wb") as f:
        f.write(save(dict(state), metadata=dict(metadata)))


def save_tokenizer_files(tokenizer: Any, out_dir: Path) -> list[str]:
    """For a Hugging Face tokenizer, its files into ``out_dir`` (each renamed into place); [] otherwise."""
    from open_clip.tokenizer import HFTokenizer

    if not isinstance(tokenizer, HFTokenizer):
        return []  # open_clip's SimpleTokenizer ships with open_clip: nothing to save
    names = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-") as tmp:
        tokenizer.tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file():
                os.replace(path, out_dir / path.name)
                names.append(path.name)
    return names


def read_metrics(path: Path | None) -> dict[str, float] | None:
    if path is None or not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FNEError(f"metrics_path={str(path)!r}: not a readable metrics.json ({err})") from None
    return metrics if isinstance(metrics, dict) else None


def model_card(title: str, hparams: Mapping[str, Any], metrics: dict[str, float] | None,
               metrics_path: Path | None, ckpt_path: Path, tokenizer_files: list[str],
               notes: list[str] | None = None) -> str:
    """README.md of the directory: what it is, how to load it, its test metrics and training config."""
    from fne_lightning.utils.report import format_markdown

    model = hparams.get("model") or {}
    loss = hparams.get("loss") or {}
    loss_name = str(loss.get("_target_", "?")).rsplit(".", 1)[-1]
    caption = (hparams.get("data") or {}).get("caption") or {}
    lines = [
        "---", "library_name: open_clip",
        "tags:", "- clip", "- image-text-retrieval", "- fne-lightning", "- false-negative-elimination", "---", "",
        f"# {title}", "",
        f"An open_clip image-text dual encoder, architecture `{model.get('name', '?')}`, trained for image-text "
        f"retrieval with fne-lightning (False Negative Elimination, [arXiv 2308.04380]"
        f"(https://arxiv.org/abs/2308.04380); loss `{loss_name}`) and exported from `{ckpt_path.name}`.",
        "Only the online encoder is included (no momentum encoder, memory bank or optimizer state).", "",
        "## Load with open_clip", "",
        "```python",
        "import open_clip, torch",
        "from PIL import Image",
        "",
        'name = "local-dir:/path/to/this/directory"  # or "hf-hub:<org>/<name>" once uploaded',
        "model, _, preprocess = open_clip.create_model_and_transforms(name)",
        "tokenizer = open_clip.get_tokenizer(name)",
        "model.eval()",
        "with torch.inference_mode():",
        '    image = model.encode_image(preprocess(Image.open("photo.jpg")).unsqueeze(0), normalize=True)',
        '    text = model.encode_text(tokenizer(["a photo of a dog"]), normalize=True)',
        "print(image @ text.T)  # cosine similarity",
        "```", "",
        "`preprocess` resizes to the model's size x size (bicubic, no crop) and normalises as in training's "
        "evaluation, so these embeddings equal fne-lightning's. Captions were cleaned before tokenization "
        f"(`{json.dumps(caption)}`: lower-case, punctuation stripped, first words kept; "
        "`fne_lightning.data.captions.clean_caption`); clean queries the same way to match the "
        "reported numbers exactly.",
    ]
    if tokenizer_files:
        lines.append(f"The text tower's Hugging Face tokenizer is in this directory ({', '.join(tokenizer_files)}).")
    lines += notes or []
    lines += ["", "## Test metrics", ""]
    if metrics and "test/rsum" in metrics:
        lines.append(f"From `{metrics_path}` (the run's best checkpoint on its test split):\n")
        lines.append(format_markdown(metrics, "test", "test"))
        if "test_1k/rsum" in metrics:
            lines.append(format_markdown(metrics, "test_1k", "test 1K (mean of folds)"))
        if "val/rsum_best" in metrics:
            lines.append(f"Best validation rsum: {metrics['val/rsum_best']:.2f}\n")
    else:
        where = f"`{metrics_path}` has no test metrics" if metrics else f"no `{metrics_path}`"
        lines.append(f"Not available ({where}); score the checkpoint with `python -m fne_lightning.evaluate "
                     "ckpt_path=...`.\n")
    config = OmegaConf.to_yaml(OmegaConf.create(dict(hparams))) if hparams else "{}\n"
    lines += ["## Training config", "", "The run's resolved Hydra config (the checkpoint's `hyper_parameters`):", "",
              "```yaml", config.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.upper() in ("1", "ON", "YES", "TRUE")


def push_to_hub(out_dir: Path, repo_id: str, private: bool) -> str:
    """Upload ``out_dir`` to the Hugging Face model repo ``repo_id``; returns its URL."""
    later = (f"the directory was written locally to {out_dir}; upload it later with "
             f"`hf upload {repo_id} {out_dir} .` (after `hf auth login`; `huggingface-cli upload` / `login` "
             "before huggingface_hub 0.34)")
    if _offline():
        raise FNEError(f"push_to_hub={repo_id!r}: Hugging Face Hub is offline (HF_HUB_OFFLINE); {later}")
    from huggingface_hub import create_repo, upload_folder

    try:
        url = create_repo(repo_id, private=private, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=str(out_dir), commit_message="Export from fne-lightning")
    except Exception as err:  # no network, not logged in, no permission...: all fixable, none a bug of ours
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise FNEError(f"push_to_hub={repo_id!r}: upload failed ({type(err).__name__}"
                       f"{': ' + text if text else ''}); {later}") from None
    return str(url)


def _check_out_dir(out_dir: Path, raw: str, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FNEError(f"out_dir={raw!r}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FNEError(f"out_dir={raw!r}: exists and is not empty; choose a new directory or pass "
                       "overwrite=true to replace the exported files in it")


def check_inputs(cfg: DictConfig) -> tuple[Path, Path, Path, str | None]:
    """(checkpoint, out_dir, metrics file, Hub repo id) of ``cfg``, every bad value one clear line.

    Cheap (no torch): the entry point calls it before anything heavy is imported."""
    if not cfg.get("ckpt_path"):
        raise FNEError("ckpt_path: expected ckpt_path=<best.ckpt or last.ckpt of fne_lightning.train>")
    if not cfg.get("out_dir"):
        raise FNEError("out_dir: expected out_dir=<directory to write the open_clip model into>")
    check(isinstance(cfg.overwrite, bool), "overwrite", "true or false", cfg.overwrite)
    repo_id = cfg.get("push_to_hub")
    check(repo_id is None or (isinstance(repo_id, str) and REPO_ID.match(repo_id) is not None), "push_to_hub",
          "null or a Hugging Face repo id <org or user>/<name>", repo_id)
    ckpt_path = Path(os.path.expanduser(str(cfg.ckpt_path))).absolute()
    out_dir = Path(os.path.expanduser(str(cfg.out_dir))).absolute()
    if not ckpt_path.is_file():
        raise FNEError(f"ckpt_path={str(cfg.ckpt_path)!r}: file not found")
    _check_out_dir(out_dir, str(cfg.out_dir), cfg.overwrite)
    metrics_path = (Path(os.path.expanduser(str(cfg.metrics_path))).absolute() if cfg.get("metrics_path")
                    else ckpt_path.parent.parent / "metrics.json")  # <run dir>/checkpoints/best.ckpt
    if cfg.get("metrics_path") and not metrics_path.is_file():
        raise FNEError(f"metrics_path={str(cfg.metrics_path)!r}: file not found")
    return ckpt_path, out_dir, metrics_path, repo_id


def export(cfg: DictConfig) -> Path:
    """Write the open_clip directory of ``cfg`` (``conf/export.yaml``); returns its path."""
    ckpt_path, out_dir, metrics_path, repo_id = check_inputs(cfg)
    from fne_lightning.evaluate import build_encoder
    from fne_lightning.utils.checkpoints import load_checkpoint

    ckpt = load_checkpoint(ckpt_path, bool(cfg.trust_checkpoint))
    hparams = dict(ckpt.get("hyper_parameters") or {})
    stored = hparams.get("model")
    if not stored or not stored.get("name"):
        raise FNEError(f"ckpt_path={str(ckpt_path)!r}: the checkpoint stores no model config (hyper_parameters.model)")
    # Rebuilt and loaded strictly as evaluate does: a checkpoint that does not fit is refused here,
    # and the encoder supplies the exact image size/normalisation and tokenizer training used.
    encoder = build_encoder(OmegaConf.create(stored), ckpt, ckpt_path)
    name = str(stored["name"])
    model_cfg, notes = model_config(name, stored)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(encoder.image_config)}
    state = encoder_state_dict(ckpt["state_dict"])

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / CONFIG_FILE) as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_weights(out_dir / WEIGHTS_FILE, state, {"format": "pt", "model_name": name,
                                                 "source": "fne-lightning", "checkpoint": ckpt_path.name})
    tokenizer_files = save_tokenizer_files(encoder.tokenizer, out_dir)
    title = repo_id or out_dir.name
    with atomic_write(out_dir / CARD_FILE) as f:
        f.write(model_card(title, hparams, read_metrics(metrics_path), metrics_path, ckpt_path, tokenizer_files,
                           notes))
    print(f"exported {name} ({sum(t.numel() for t in state.values()):,} weights) to {out_dir}")
    print(f'load it with open_clip.create_model_and_transforms("local-dir:{out_dir}")')
    if repo_id:
        url = push_to_hub(out_dir, repo_id, bool(cfg.private))
        print(f"uploaded to {url}")
    return out_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    from fne_lightning.train import verbose_run
    from fne_lightning.utils.logs import configure_logging

    with report_user_errors():
        check_inputs(cfg)  # bad input answers before Lightning (imported by configure_logging) loads
        configure_logging(verbose_run(cfg))
        export(cfg)


if __name__ == "__main__":
    main()
