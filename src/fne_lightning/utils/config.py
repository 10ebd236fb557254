"""Where the Hydra configs live, and the resolvers they interpolate, for every entry point.

The wheel ships ``conf/`` inside the package (``fne_lightning/conf``, see ``pyproject.toml``); an
editable install reads the repository's ``conf/``. Importing this module registers the custom
resolvers the configs use (``${wandb_offline:}``, ``${hydra_choice:experiment}``,
``${run_name:${task_name}}``), so each entry point that finds ``conf/`` here can also compose it. A
module of its own, so that lower floors (``utils/malloc.py``) and the entry points import it
without importing each other.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import OmegaConf

from fne_lightning.utils.resume import run_name


def config_dir() -> str:
    """``conf/`` shipped inside the wheel, else the repository's (editable installs)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "conf"
    return str(packaged if packaged.is_dir() else package.parents[1] / "conf")


def wandb_offline() -> bool:
    """``logger=wandb`` runs offline unless the user is logged in to W&B.

    Logged in: ``WANDB_API_KEY`` is set, or the netrc file (``$NETRC``, else ``~/.netrc``, where
    ``wandb login`` writes) holds a key for the W&B host (``$WANDB_BASE_URL``, else
    api.wandb.ai). ``WANDB_MODE=online`` / ``offline`` decides outright. Read from the
    environment only: no network, no prompt, so a sweep never hangs on a login.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "run"):
        return False
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is None
    except (OSError, netrc.NetrcParseError):
        return True


def hydra_choice(group: str, default: str = "none") -> str:
    """The option chosen for a config group (``experiment``, ``loss``), or ``default`` outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return default
    return str(HydraConfig.get().runtime.choices.get(group) or default)


# Used by conf/logger/wandb.yaml: ${wandb_offline:} and ${hydra_choice:experiment}; by
# conf/hydra/default.yaml: ${run_name:${task_name}} (a timestamp, or slurm-<job id> under SLURM).
OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)
OmegaConf.register_new_resolver("hydra_choice", hydra_choice, replace=True)
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
