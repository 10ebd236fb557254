"""The LightningModule: what it trains, what it checkpoints, and the loss-config ablations."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, open_dict

from fne_lightning.train import build

from conftest import TINY_OVERRIDES, compose_config


def fit_steps(cfg: DictConfig, steps: int) -> tuple[L.LightningModule, L.Trainer]:
    L.seed_everything(0)
    module, datamodule = build(cfg)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=cfg.paths.output_dir)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


def test_momentum_encoder_is_not_optimised_and_everything_fne_keeps_is_checkpointed(cfg: DictConfig) -> None:
    module, trainer = fit_steps(cfg, steps=3)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised and not optimised & {id(p) for p in module.momentum_encoder.parameters()}
    # EMA moved the momentum copy towards the trained encoder, but it is not a copy of it.
    online, ema = module.encoder.model.visual.conv1.weight, module.momentum_encoder.model.visual.conv1.weight
    assert not torch.equal(online, ema)
    assert int(module.loss.bank.filled) == 3 * cfg.data.batch_size

    path = Path(cfg.paths.output_dir) / "state.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    for key in ("loss.bank.image_features", "loss.bank.text_ids", "loss.bank.ptr", "loss.bank.filled",
                "loss.stats.pos_count", "loss.stats.neg_m2", "momentum_encoder.model.visual.conv1.weight"):
        assert key in state, key
    fresh, _ = build(cfg)
    fresh.load_state_dict(state)
    for (name, a), b in zip(module.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "ablation",
    [
        ["loss.memory_size=0"],
        ["loss.cutdown=null"],
        ["loss.posterior=false"],
        ["loss.weighting=complement"],
        ["loss.selection=hardest"],
        ["loss.online_batch=true"],
        ["loss.prior=estimated", "loss.exclude=0.5"],
        ["loss.warmup_epochs=0", "loss.warmup_loss=vse0"],
        ["momentum=0.0", "loss.match_prior=0.01"],
        ["loss=vsepp"],
        ["loss=vse0"],
    ],
    ids=lambda a: " ".join(a),
)
def test_ablations_by_config_alone_train(ablation: list[str], cache_dir: Path, tmp_path: Path) -> None:
    base = TINY_OVERRIDES if ablation[0].startswith("loss.") else [o for o in TINY_OVERRIDES
                                                                   if not o.startswith("loss.")]
    cfg = compose_config([*base, "loss.warmup_epochs=0", *ablation], cache_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    module, trainer = fit_steps(cfg, steps=4)
    assert torch.isfinite(trainer.callback_metrics["train/loss_step"])
    if "loss.memory_size=0" in ablation:
        assert module.loss.bank.size == 0


def test_bf16_mixed_keeps_similarities_statistics_and_bank_in_full_precision(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.loss.warmup_epochs = 0
    L.seed_everything(0)
    module, datamodule = build(cfg)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss_step"])
    assert module.loss.bank.image_features.dtype == torch.float32 and int(module.loss.bank.filled) == 48
    assert module.loss.stats.pos_m2.dtype == torch.float64


def test_lazy_momentum_skips_only_forwards_nobody_reads(cfg: DictConfig) -> None:
    """Two warm-up epochs then one of FNE: the early warm-up steps' momentum features would leave the
    48-slot bank before FNE reads it, so the momentum forward runs only for the last 3 warm-up
    steps (ceil(48 / 16)); every weight, the bank and the statistics end exactly as without skipping."""
    with open_dict(cfg):
        cfg.loss.warmup_epochs = 2
    states, forwards = [], []
    for lazy in (True, False):
        L.seed_everything(0)
        module, datamodule = build(cfg)
        module.lazy_momentum = lazy
        calls: list[int] = []
        module.momentum_encoder.model.visual.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, datamodule=datamodule)
        states.append(module.state_dict())
        forwards.append(len(calls))
    steps_per_epoch = 160 // cfg.data.batch_size  # 32 images x 5 captions
    assert forwards == [3 + steps_per_epoch, 3 * steps_per_epoch]
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
