"""Evaluation entry point: ``python -m fne_lightning.evaluate ckpt_path=PATH [overrides]``, or
``python -m fne_lightning.evaluate model=clip_vit_b32 data=f30k`` for an open_clip model as it is
(zero-shot).

Scores image-text retrieval with the protocol of FNE_SPEC sections 9-10: i2t and t2i R@1/5/10,
medr, meanr, rsum; with ``data.test_folds`` also the mean over consecutive folds (COCO 1K); with
extra positives also R-Precision, mAP@R and any-positive R@K; with ``protocol=eccv`` (or
``data.protocol``) also ECCV Caption's, CxC's and the COCO 5K / 1K metrics exactly as the
``eccv_caption`` package computes them (``test_eccv/...``, ``test_cxc/...``, ``test_coco5k/...``,
``test_coco1k/...``). Every unique image and every
caption is encoded once, in batches, under ``torch.inference_mode()`` (bf16 autocast on CUDA),
through the same datamodule and :class:`~fne_lightning.retrieval.metric.RetrievalMetric` that
``trainer.test`` uses, so a checkpoint scores here exactly what training reported for it.

A checkpoint is read with ``torch.load(weights_only=True)`` and rebuilt from the run config it
stores (``hyper_parameters``); only its ``encoder.*`` weights are used, loaded strictly. Writes
``metrics.json``, ``metrics.md`` and, on request, ``embeddings.npz`` and ``retrievals.json``
into the run directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fne_lightning.errors import FNEError, check, report_user_errors
from fne_lightning.utils.config import config_dir
from fne_lightning.utils.report import atomic_write

log = logging.getLogger(__name__)

SPLITS = {"test": "test", "val": "validate"}  # split -> datamodule stage
DATASET_NAMES = {"dataset_coco": "COCO", "dataset_flickr30k": "Flickr30K", "dataset_synthetic": "Synthetic"}
# Chosen at build time: the checkpoint supplies every weight, so nothing is downloaded (and a local
# timm_weights file is not needed any more).
NO_DOWNLOAD = {"pretrained": None, "pretrained_towers": False, "timm_weights": None}


def _group(cfg: DictConfig, trained: dict[str, Any], group: str) -> DictConfig | None:
    """The ``model``/``data`` config to use: the one chosen on the command line (``group=...``),
    else the checkpoint's, with ``+group.key=...`` overrides merged onto it."""
    chosen = cfg.get(group)
    stored = trained.get(group)
    if chosen is not None and "_target_" in chosen:
        return chosen
    if stored is None:
        if chosen is not None:
            raise FNEError(f"{group}: +{group}.<key> overrides need a checkpoint to take the rest of the "
                           f"{group} config from; choose one with {group}=<option>")
        return None
    merged = OmegaConf.create(stored)
    return merged if chosen is None else OmegaConf.merge(merged, chosen)


def _mismatch(ckpt_path: Path, trained: dict[str, Any], used: DictConfig, detail: str) -> FNEError:
    from fne_lightning.utils.checkpoints import checkpoint_mismatch

    return checkpoint_mismatch(ckpt_path, trained, OmegaConf.to_container(used, resolve=True), detail,
                               ignore=tuple(NO_DOWNLOAD))


def build_encoder(model_cfg: DictConfig, ckpt: dict[str, Any] | None, ckpt_path: Path | None) -> Any:
    """Instantiate the :class:`DualEncoder`; with a checkpoint, without downloading weights, then
    load its ``encoder.*`` weights strictly."""
    import open_clip
    from hydra.utils import instantiate

    from fne_lightning.utils.checkpoints import state_mismatch

    if ckpt is None:
        return instantiate(model_cfg)
    trained = (ckpt.get("hyper_parameters") or {}).get("model") or {}
    if trained.get("name") and model_cfg.get("name") != trained["name"]:
        raise _mismatch(ckpt_path, trained, model_cfg, "a different architecture")
    build_cfg = OmegaConf.merge(model_cfg, NO_DOWNLOAD)
    tag = model_cfg.get("pretrained")
    if tag and not os.path.isfile(str(tag)):
        # An open_clip tag can set the normalisation the model was trained with: keep it.
        tag_cfg = open_clip.get_pretrained_cfg(model_cfg.name, tag) or {}
        for key, value in (("image_mean", tag_cfg.get("mean")), ("image_std", tag_cfg.get("std"))):
            if build_cfg.get(key) is None and value is not None:
                build_cfg[key] = list(value)
    encoder = instantiate(build_cfg)
    weights = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    problem = state_mismatch(encoder.state_dict(), weights)
    if problem:
        raise _mismatch(ckpt_path, trained, model_cfg, problem)
    encoder.load_state_dict(weights, strict=True)
    return encoder


def _device_and_autocast(device: str, precision: str) -> tuple[Any, Any]:
    import contextlib

    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FNEError(f"device={device!r}: expected auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FNEError(f"device={device!r}: CUDA is not available on this machine")
    bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    return dev, autocast


def encode(encoder: Any, loaders: list[Any], metric: Any, device: Any, autocast: Any) -> None:
    """Feed the images loader then the captions loader through the encoder into ``metric``."""
    import torch

    with torch.inference_mode(), autocast:
        for modality, loader in zip(("image", "text"), loaders, strict=True):
            fn = encoder.encode_image if modality == "image" else encoder.encode_text
            for inputs, indices in loader:
                metric.update(fn(inputs.to(device, non_blocking=True)), indices, modality)


def _titles(datamodule: Any, split: str, n_images: int, folds: int | None) -> tuple[str, str]:
    """Table labels: "COCO 5K test" and "COCO 1K test (mean of 5 folds)"; sizes that are not
    whole thousands are spelt out: "Synthetic test (500 images)"."""
    annotations = datamodule.annotations
    stem = Path(annotations).stem if isinstance(annotations, (str, os.PathLike)) else Path(datamodule.root).name
    name = DATASET_NAMES.get(stem, stem.removeprefix("dataset_"))

    def title(n: int, suffix: str) -> str:
        if n % 1000 == 0:
            return f"{name} {n // 1000}K {split}" + (f" ({suffix})" if suffix else "")
        return f"{name} {split} ({suffix + ', ' if suffix else ''}{n:,} images{' each' if suffix else ''})"

    return title(n_images, ""), title(n_images // folds, f"mean of {folds} folds") if folds else ""


def _relative(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def save_embeddings(path: Path, split: Any, images: Any, texts: Any) -> None:
    import numpy as np

    arrays = dict(image_features=images.cpu().numpy(), text_features=texts.cpu().numpy(),
                  text_to_image=split.text_to_image, image_paths=np.asarray(split.image_paths),
                  image_ids=np.asarray(split.image_keys), captions=np.asarray(split.captions))
    if split.positive_pairs is not None:
        arrays["positive_pairs"] = split.positive_pairs
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def save_retrievals(path: Path, split: Any, image_root: str, images: Any, texts: Any, k: int,
                    chunk_size: int | None) -> None:
    """The ``k`` best captions of every image and images of every caption, with scores, whether
    each is the ground truth (``correct``) and, with extra positives, a declared ``positive``."""
    from fne_lightning.retrieval.ranking import topk_neighbours

    t2i = split.text_to_image.tolist()
    names = [_relative(p, image_root) for p in split.image_paths]
    captions_of: list[list[int]] = [[] for _ in names]
    for j, i in enumerate(t2i):
        captions_of[i].append(j)
    positives = None if split.positive_pairs is None else set(map(tuple, split.positive_pairs.tolist()))

    def entry(item: dict[str, Any], i: int, j: int) -> dict[str, Any]:
        item["correct"] = t2i[j] == i
        if positives is not None:
            item["positive"] = item["correct"] or (i, j) in positives
        return item

    scores, idx = topk_neighbours(images, texts, k, chunk_size)  # (N_img, k)
    image_queries = [
        {"image": names[i], "image_id": split.image_keys[i], "captions": [split.captions[j] for j in captions_of[i]],
         "top": [entry({"caption": split.captions[j], "caption_index": j, "image": names[t2i[j]], "score": s}, i, j)
                 for s, j in zip(scores[i].tolist(), idx[i].tolist(), strict=True)]}
        for i in range(len(names))
    ]
    scores, idx = topk_neighbours(texts, images, k, chunk_size)  # (N_txt, k)
    caption_queries = [
        {"caption": split.captions[j], "caption_index": j, "image": names[t2i[j]],
         "top": [entry({"image": names[i], "image_index": i, "score": s}, i, j)
                 for s, i in zip(scores[j].tolist(), idx[j].tolist(), strict=True)]}
        for j in range(len(t2i))
    ]
    with atomic_write(path) as f:
        json.dump({"split": split.name, "k": k, "image_root": image_root, "image_to_text": image_queries,
                   "text_to_image": caption_queries}, f, indent=1, ensure_ascii=False)


def logged_key(stage: str, name: str) -> str:
    """The ``metrics.json`` key of a score: ``test/i2t_r1``; a protocol's ``eccv/i2t_r1`` becomes
    ``test_eccv/i2t_r1``."""
    return f"{stage}_{name}" if "/" in name else f"{stage}/{name}"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Encode, score and write the results of ``cfg`` (``conf/evaluate.yaml``); returns the metrics."""
    split_name, precision, topk = cfg.split, str(cfg.precision), cfg.save_topk
    check(split_name in SPLITS, "split", "test or val", split_name)
    check(precision in ("auto", "fp32", "32", "bf16"), "precision", "auto, fp32 or bf16", cfg.precision)
    check(isinstance(topk, int) and not isinstance(topk, bool) and topk >= 0, "save_topk",
          "an integer >= 0 (captions/images to save per query)", topk)
    check(cfg.chunk_size is None or (isinstance(cfg.chunk_size, int) and cfg.chunk_size > 0), "chunk_size",
          "null or a positive number of images", cfg.chunk_size)
    ckpt_path = Path(os.path.expanduser(str(cfg.ckpt_path))).absolute() if cfg.get("ckpt_path") else None
    if ckpt_path is None and cfg.get("model") is None:
        raise FNEError("ckpt_path: expected ckpt_path=<checkpoint of fne_lightning.train>, or model=<config> "
                       "to evaluate an open_clip model as it is (zero-shot)")
    if ckpt_path is not None and not ckpt_path.is_file():
        raise FNEError(f"ckpt_path={str(cfg.ckpt_path)!r}: file not found")
    if ckpt_path is None and cfg.get("data") is None:
        raise FNEError("data: expected data=<synthetic|f30k|coco|karpathy|albef> (without a checkpoint there is "
                       "no training data config to use)")
    from fne_lightning.data.protocols import PROTOCOLS

    check(cfg.get("protocol") is None or cfg.protocol in PROTOCOLS, "protocol", f"null or {' | '.join(PROTOCOLS)}",
          cfg.get("protocol"))

    import torch
    from hydra.utils import instantiate

    from fne_lightning.data.datasets import positive_pairs_tensor
    from fne_lightning.retrieval.metric import RetrievalMetric
    from fne_lightning.utils.checkpoints import load_checkpoint
    from fne_lightning.utils.report import format_markdown, format_protocol_table, format_table, write_json

    ckpt = load_checkpoint(ckpt_path, bool(cfg.trust_checkpoint)) if ckpt_path else None
    trained = (ckpt.get("hyper_parameters") or {}) if ckpt else {}
    model_cfg, data_cfg = _group(cfg, trained, "model"), _group(cfg, trained, "data")
    if model_cfg is None or data_cfg is None:
        missing = "model" if model_cfg is None else "data"
        raise FNEError(f"ckpt_path={str(ckpt_path)!r}: the checkpoint stores no {missing} config; "
                       f"choose one with {missing}=<option>")
    device, autocast = _device_and_autocast(str(cfg.device), precision)

    protocol_name = cfg.get("protocol") or data_cfg.get("protocol")
    key = "protocol" if cfg.get("protocol") else "data.protocol"
    if protocol_name and split_name != "test":
        raise FNEError(f"{key}={protocol_name}: the protocol scores the COCO 5K test split; got split={split_name}")
    datamodule = instantiate(data_cfg)
    try:  # before the model is built: missing data or a missing split fails fast
        split = datamodule.load_split(split_name)
    except FNEError as err:
        raise FNEError(f"split={split_name!r}: {err}") from None
    protocol = None
    if protocol_name:
        if not hasattr(datamodule, "protocol_targets"):
            raise FNEError(f"{key}={protocol_name}: data._target_={data_cfg.get('_target_')} has no published "
                           "protocols; use data=coco (COCO's Karpathy JSON)")
        protocol = datamodule.protocol_targets(protocol_name)  # files and ids, before the model is built
    encoder = build_encoder(model_cfg, ckpt, ckpt_path)
    del ckpt  # the optimizer state and momentum encoder are not needed any more
    datamodule.use_encoder(encoder.image_config, encoder.tokenizer)
    datamodule.setup(SPLITS[split_name])
    loaders = datamodule.test_dataloader() if split_name == "test" else datamodule.val_dataloader()
    encoder.to(device).eval()
    log.info("encoding %d images and %d captions (%s split) on %s", split.num_images, split.num_texts,
             split_name, device)

    metric = RetrievalMetric(torch.from_numpy(split.text_to_image), positive_pairs_tensor(split),
                             chunk_size=cfg.chunk_size, protocol=protocol).to(device)
    encode(encoder, loaders, metric, device, autocast)
    scores = metric.compute()
    folds = datamodule.test_folds if split_name == "test" else None
    metrics = {logged_key(split_name, k): v for k, v in scores.items()}
    if folds:
        metrics.update({f"{split_name}_1k/{k}": v for k, v in metric.fold_scores(folds).items()})

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title, fold_title = _titles(datamodule, split_name, split.num_images, folds)
    tables = [(split_name, title)] + ([(f"{split_name}_1k", fold_title)] if folds else [])
    source = (f"checkpoint `{ckpt_path}`" if ckpt_path else "zero-shot") + f", model `{model_cfg.name}`" + (
        f" (`{model_cfg.pretrained}` weights)" if not ckpt_path and model_cfg.get("pretrained") else "")
    positives = ("" if split.positive_pairs is None else
                 f", {len(split.positive_pairs):,} declared positive pairs (own captions included)")
    markdown = [f"# Retrieval: {title}\n", f"- {source}",
                f"- {split.num_images:,} images, {split.num_texts:,} captions{positives}\n"]
    for prefix, label in tables:
        markdown += [f"## {label}\n", format_markdown(metrics, prefix, label)]
    if protocol is not None:
        markdown += ["## Published protocols (eccv_caption)\n", *[f"- {note}" for note in protocol.notes], "",
                     format_protocol_table(metrics, split_name, markdown=True)]
    write_json(out_dir / "metrics.json", metrics)
    with atomic_write(out_dir / "metrics.md") as f:
        f.write("\n".join(markdown))
    if cfg.save_embeddings or topk:
        images, texts = metric.features()
        if cfg.save_embeddings:
            save_embeddings(out_dir / "embeddings.npz", split, images, texts)
        if topk:
            image_root = str(datamodule.image_root or datamodule.root)
            save_retrievals(out_dir / "retrievals.json", split, image_root, images, texts, topk, cfg.chunk_size)
    printed = [format_table(metrics, prefix, label) for prefix, label in tables]
    if protocol is not None:
        printed.append(format_protocol_table(metrics, split_name))
    print("\n" + "\n\n".join(printed))
    print(f"\nmetrics: {out_dir / 'metrics.json'}")
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from fne_lightning.train import verbose_run
    from fne_lightning.utils.logs import configure_logging

    configure_logging(verbose_run(cfg))
    with report_user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
