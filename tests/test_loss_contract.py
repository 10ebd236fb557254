"""The module-loss contract: a new loss is one class and one YAML file, with no edit to module.py.

The loss below lives in this test file and its YAML in a config directory the test writes; a
real Trainer trains with it through the entry point's ``train``. It uses everything the
contract offers: momentum features, the per-rank generator, the epoch hook, the positives, its
own buffer (checkpointed with the module) and its own trainable parameter, a learnable margin
(in the module's optimizer, trained and checkpointed).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from omegaconf import open_dict
from torch import Tensor, nn

from fne_lightning.losses import RetrievalLoss
from fne_lightning.train import train

from conftest import TINY_OVERRIDES, compose_config


class RandomNegativeLoss(RetrievalLoss):
    """Hinge with a learnable margin on one in-batch negative drawn uniformly at random per anchor
    (momentum candidates)."""

    requires_momentum = True

    def __init__(self, embed_dim: int, margin: float = 0.2, warmup_epochs: int = 0, warmup_loss: str = "vse0") -> None:
        super().__init__(warmup_epochs, warmup_loss)  # warm-up keys any experiment may set
        self.margin = nn.Parameter(torch.tensor(float(margin)))  # the loss's own: the optimizer trains it
        self.register_buffer("epochs_started", torch.zeros((), dtype=torch.long))

    def on_train_epoch_start(self) -> None:
        self.epochs_started += 1

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                momentum_image_features: Tensor | None = None, momentum_text_features: Tensor | None = None,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        assert momentum_text_features is not None and momentum_text_features.shape == text_features.shape
        scores = image_features @ momentum_text_features.T  # (B, B)
        weights = (image_ids[:, None] != image_ids[None, :]).float()  # never a caption of the same image
        pick = torch.multinomial(weights + 1e-12, 1, generator=self.generator).squeeze(1)  # (B,)
        negative = scores.gather(1, pick[:, None]).squeeze(1)
        positive = (image_features * text_features).sum(-1)
        loss = (self.margin + negative - positive).clamp(min=0).mean()
        fn = self.positives.contains(image_ids, text_ids[pick]).float().mean()
        return loss, {"random_fn_rate": fn, "random_sim": negative.detach().mean()}


class OptimizerProbe(L.Callback):
    """Records, when training starts, how often the optimizers hold the loss's margin."""

    held = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = [p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]]
        self.held = sum(p is pl_module.loss.margin for p in params)


def test_a_loss_from_a_test_file_trains_through_the_entry_point(cache_dir: Path, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "loss").mkdir(parents=True)
    (conf / "loss" / "random_negative.yaml").write_text(
        "_target_: test_loss_contract.RandomNegativeLoss\nmargin: 0.1\nwarmup_epochs: 0\n")
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("loss.")]  # those name FNE's keys
    cfg = compose_config([*tiny, f"hydra.searchpath=[file://{conf}]", "loss=random_negative",
                          "figures.enabled=false", "trainer.enable_progress_bar=false"], cache_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    assert set(cfg.loss) == {"_target_", "margin", "warmup_epochs", "warmup_loss"}  # + the experiment's
    probe = OptimizerProbe()
    metrics = train(cfg, callbacks=[probe])
    assert metrics["test/rsum"] > 0
    # Its diagnostics are logged like FNE's, with a non-zero rate on data with false negatives.
    assert {"fne/random_fn_rate", "fne/random_sim"} <= metrics.keys() and metrics["fne/random_fn_rate"] > 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(ckpt["state_dict"]["loss.epochs_started"]) == cfg.trainer.max_epochs  # hook once per epoch
    assert "momentum_encoder.model.visual.conv1.weight" in ckpt["state_dict"] and "sampler_generator" in ckpt
    # Its own parameter is in the optimizer once, trained (the hinge's gradient lowers the margin)
    # and checkpointed with the module.
    assert probe.held == 1
    margin = float(ckpt["state_dict"]["loss.margin"])
    assert margin < 0.1 - 1e-4, margin
