"""Reading checkpoints safely, and saying precisely why one does not fit a model.

``torch.load(weights_only=True)`` refuses pickled code, so a checkpoint from the internet
cannot run anything on load; files that need full unpickling are refused with one line
unless the user explicitly trusts them (``trust_checkpoint=true``).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fne_lightning.errors import FNEError

# Classes that moved when the package was split into fne/, losses/, data/, retrieval/, models/:
# the run config stored in older checkpoints names them by their old paths.
MOVED_TARGETS = {
    "fne_lightning.components.encoders.": "fne_lightning.models.encoders.",
    "fne_lightning.components.losses.": "fne_lightning.losses.",
    "fne_lightning.module.LastCheckpoint": "fne_lightning.callbacks.LastCheckpoint",
}


def upgrade_targets(config: Any) -> Any:
    """The config with every ``_target_`` of a moved class rewritten to its current path.

    Args:
        config: a run config as plain containers (dicts and lists), e.g. a checkpoint's
            ``hyper_parameters``.
    """
    if isinstance(config, dict):
        out = {k: upgrade_targets(v) for k, v in config.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            for old, new in MOVED_TARGETS.items():
                if target.startswith(old):
                    out["_target_"] = new + target[len(old):]
        return out
    if isinstance(config, list):
        return [upgrade_targets(v) for v in config]
    return config


def load_checkpoint(path: Path, trust: bool, key: str = "ckpt_path") -> dict[str, Any]:
    """Load a checkpoint of ``fne_lightning.train`` on the CPU, refusing pickled code unless ``trust``.

    Memory-mapped when the file is in torch's zip format (every Lightning checkpoint): checking
    keys and shapes then reads only the file's metadata, not gigabytes of weights and optimizer
    state that the Trainer reads again when it resumes. Class paths of an older layout in its
    run config are upgraded (:func:`upgrade_targets`).

    Args:
        path: the checkpoint file.
        trust: allow full unpickling (``trust_checkpoint=true``): only for files you trust.
        key: how errors name the file (the config key it came from).

    Returns:
        The checkpoint dict (``state_dict``, ``hyper_parameters``, ...).

    Raises:
        FNEError: a missing, unreadable or refused file, or one without ``encoder.*`` weights.
    """
    if not path.is_file():
        raise FNEError(f"{key}={str(path)!r}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch.load fails in many ways (KeyError, EOFError, ...) on a bad file
        text = str(err)
        if not trust and "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL \S+|Unsupported operand \S+", text)
            reason = found.group(0) if found else "it holds more than tensors and plain containers"
            raise FNEError(f"{key}={str(path)!r}: refused by torch.load(weights_only=True) ({reason}); "
                           "if you trust this file, pass trust_checkpoint=true") from None
        first = type(err).__name__ + (": " + text.strip().splitlines()[0][:200] if text.strip() else "")
        raise FNEError(f"{key}={str(path)!r}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or not any(
        k.startswith("encoder.") for k in ckpt["state_dict"]
    ):
        raise FNEError(f"{key}={str(path)!r}: not a checkpoint of fne_lightning.train (no encoder.* weights "
                       "in its state_dict); for open_clip weights use model=<config> model.pretrained=<file>")
    if isinstance(ckpt.get("hyper_parameters"), dict):
        ckpt["hyper_parameters"] = upgrade_targets(ckpt["hyper_parameters"])
    return ckpt


def checkpoint_mismatch(ckpt_path: str | Path, trained: Mapping[str, Any], requested: Mapping[str, Any],
                        detail: str, ignore: tuple[str, ...] = ()) -> FNEError:
    """The error for a checkpoint that does not fit the requested model, in one line.

    The line names the checkpoint, the model config it was trained with, the one requested
    (the keys that differ) and ``detail``.

    Args:
        ckpt_path: the checkpoint.
        trained: the ``model`` config it was trained with (its ``hyper_parameters["model"]``).
        requested: this run's ``model`` config.
        detail: what does not fit (e.g. :func:`state_mismatch`'s first difference).
        ignore: keys not compared (besides ``_target_``).

    Returns:
        The :class:`~fne_lightning.errors.FNEError` to raise.
    """
    changed = [f"model.{k}={requested.get(k)!r} (checkpoint: {trained.get(k)!r})"
               for k in sorted(set(requested) | set(trained))
               if k not in ("_target_", "name", *ignore) and requested.get(k) != trained.get(k)]
    asked = f"model.name={requested.get('name')!r}" + (" with " + ", ".join(changed) if changed else "")
    return FNEError(f"ckpt_path={str(ckpt_path)!r}: does not fit the requested model (trained with "
                    f"model.name={trained.get('name')!r}, requested {asked}): {detail}")


def state_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> str | None:
    """The first difference between two state dicts (missing or unexpected key, shape), or None.

    Args:
        expected: the model's state dict.
        found: the checkpoint's.

    Returns:
        One phrase naming the key, or None when they fit.
    """
    for key in sorted(set(expected) | set(found)):
        if key not in expected:
            return f"checkpoint weight {key!r} is not in the model"
        if key not in found:
            return f"model weight {key!r} is not in the checkpoint"
        if tuple(found[key].shape) != tuple(expected[key].shape):
            return (f"weight {key!r} has shape {tuple(found[key].shape)} in the checkpoint, "
                    f"{tuple(expected[key].shape)} in the model")
    return None
