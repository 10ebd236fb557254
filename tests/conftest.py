"""Shared fixtures: one composed, shrunk config per session; each test gets its own copy.

The shrunk config keeps every component real (open_clip tiny model, synthetic images on
disk, Lightning Trainer on CPU) and only makes it small: 32 training images (160 pairs),
8 + 8 evaluation images, two epochs, no logger.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from fne_lightning.utils.config import config_dir

os.environ.setdefault("WANDB_MODE", "offline")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # make test: the cores shared among the workers
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

TINY_OVERRIDES = [
    "data.num_train=32",
    "data.num_val=8",
    "data.num_test=8",
    "data.batch_size=16",
    "data.eval_batch_size=16",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "loss.memory_size=48",
    "loss.min_pos_samples=8",
    "loss.warmup_epochs=1",
    "optim.scheduler.milestones=[1]",
    "~logger",
]


def compose_config(overrides: list[str], cache_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.cache_dir={cache_dir}", *overrides])
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic-benchmark cache for the whole session (rendered once, then reused)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def cfg_global(cache_dir: Path) -> DictConfig:
    return compose_config(TINY_OVERRIDES, cache_dir)


@pytest.fixture
def cfg(cfg_global: DictConfig, tmp_path: Path) -> DictConfig:
    """A private copy of the tiny config writing into this test's tmp_path."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg_global))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg
