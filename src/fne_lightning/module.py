"""LightningModule for image-text matching (Lightning glue #1 of 2).

Wires plain-PyTorch components together: the dual encoder, its momentum (EMA) copy, the
loss (VSE0/VSE++ or FNE with its memory bank and similarity statistics, all registered
buffers) and the retrieval metric. Order of one training step, as in FNE_SPEC sections 1-2:
online + momentum forward -> loss (statistics updated, negatives selected) -> backward ->
optimizer step -> EMA update of the momentum encoders. The step's momentum features enter
the bank right after the loss, so the next step sees them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from fne_lightning.components.datasets import positive_pairs_tensor
from fne_lightning.components.encoders import DualEncoder, ema_update, momentum_copy
from fne_lightning.components.plots import SimilarityReservoir
from fne_lightning.errors import check
from fne_lightning.metrics import RetrievalMetric


class RetrievalModule(L.LightningModule):
    """Dual-encoder retrieval model trained with a triplet loss.

    Args:
        encoder: the online :class:`DualEncoder`.
        loss: a loss module from ``components/losses.py``.
        optimizer: partial optimizer, finished with the encoder's trainable parameters.
        scheduler: partial LR scheduler (stepped per epoch) or None.
        config: the resolved run config, stored in checkpoints and sent to the loggers.
        seed: base seed of the negative sampler (rank r uses seed + r).
        figures: ``{enabled, every_n_epochs, num_examples, top_k, sample_size}`` (config
            ``figures``): at the end of validation epochs, similarity histograms with the fitted
            Gaussians, p_fn and the cut-down, and retrieval examples (see ``_log_figures``).
            None or ``enabled: false``: no figures.
    """

    def __init__(self, encoder: DualEncoder, loss: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, config: dict | None = None, seed: int = 0,
                 figures: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(config or {})
        self.encoder = encoder
        self.loss = loss
        self.momentum_encoder = momentum_copy(encoder) if getattr(loss, "requires_momentum", False) else None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed
        # Targets (caption -> image, positives) are set from the datamodule in setup().
        self.val_metric = RetrievalMetric(torch.empty(0, dtype=torch.long))
        self.test_metric = RetrievalMetric(torch.empty(0, dtype=torch.long))
        self._generator_state: Tensor | None = None
        self.figures = dict(figures or {})
        if not self.figures.get("enabled", False):
            self.figures = {}
        for key in ("every_n_epochs", "sample_size"):
            value = self.figures.get(key, 1)
            check(isinstance(value, int) and value >= 1, f"figures.{key}", "an integer >= 1", value)
        for key in ("num_examples", "top_k"):
            value = self.figures.get(key, 0)
            check(isinstance(value, int) and value >= 0, f"figures.{key}", "an integer >= 0", value)
        # The histograms' samples: recent confident in-batch similarities (what the Gaussians fit).
        self.similarity_samples = SimilarityReservoir(self.figures.get("sample_size", 4096)) if self.figures else None

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None:
            return
        if stage == "fit":
            train = dm.load_split("train")
            self.loss.positives.set_pairs(positive_pairs_tensor(train), train.num_texts)
        for name, metric in (("val", self.val_metric), ("test", self.test_metric)):
            if (stage in ("fit", "validate") and name == "val") or (stage == "test" and name == "test"):
                split = dm.load_split(name)
                metric.set_targets(torch.from_numpy(split.text_to_image), positive_pairs_tensor(split))

    def on_fit_start(self) -> None:
        if hasattr(self.loss, "generator"):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.seed + self.global_rank)  # differs per rank, reproducible from the seed
            if self._generator_state is not None:
                gen.set_state(self._generator_state)
            self.loss.generator = gen

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        gen = getattr(self.loss, "generator", None)
        if gen is not None:
            checkpoint["sampler_generator"] = gen.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._generator_state = checkpoint.get("sampler_generator")

    def configure_optimizers(self) -> Any:
        # Only the online towers: the momentum copy and the loss's buffers are not trained.
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ---------------------------------------------------------------- training
    def in_warmup(self) -> bool:
        return self.current_epoch < getattr(self.loss, "warmup_epochs", 0)

    def on_train_epoch_start(self) -> None:
        stats = getattr(self.loss, "stats", None)
        if stats is not None and getattr(self.loss, "reset_stats_every_epoch", False):
            stats.reset()
        if self.similarity_samples is not None:
            self.similarity_samples.reset()  # the figure shows this epoch's samples

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        images, tokens, image_ids, text_ids = batch
        image_features = self.encoder.encode_image(images)  # (B, D)
        text_features = self.encoder.encode_text(tokens)  # (B, D)
        momentum: dict[str, Tensor] = {}
        if self.momentum_encoder is not None:
            with torch.no_grad():
                momentum = {
                    "momentum_image_features": self.momentum_encoder.encode_image(images),
                    "momentum_text_features": self.momentum_encoder.encode_text(tokens),
                }
        loss, diagnostics = self.loss(image_features, text_features, image_ids, text_ids,
                                      warmup=self.in_warmup(), **momentum)
        if self.similarity_samples is not None:
            self.similarity_samples.add(image_features, text_features, image_ids)
        batch_size = images.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"fne/{k}": v for k, v in diagnostics.items()}, on_step=True, on_epoch=True,
                      batch_size=batch_size)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.momentum_encoder is not None:
            ema_update(self.momentum_encoder, self.encoder, self.loss.momentum)

    # -------------------------------------------------------------- evaluation
    def _eval_step(self, metric: RetrievalMetric, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> None:
        inputs, indices = batch
        if dataloader_idx == 0:
            metric.update(self.encoder.encode_image(inputs), indices, "image")
        else:
            metric.update(self.encoder.encode_text(inputs), indices, "text")

    def _saw_whole_split(self, stage: str) -> bool:
        trainer = self.trainer
        counts, loaders = ((trainer.num_val_batches, trainer.val_dataloaders) if stage == "val"
                           else (trainer.num_test_batches, trainer.test_dataloaders))
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        return all(n >= len(dl) for n, dl in zip(counts, loaders, strict=True))

    def _eval_epoch_end(self, metric: RetrievalMetric, stage: str) -> None:
        if self.trainer.sanity_checking or not self._saw_whole_split(stage):
            if not self.trainer.sanity_checking:
                rank_zero_warn(f"{stage}: retrieval metrics need every image and caption of the split; "
                               "this pass saw only part of it (limit_*_batches / fast_dev_run), so none are logged")
            metric.reset()
            return
        scores = metric.compute()
        # COCO 1K protocol (data.test_folds): the mean over consecutive folds of the test split.
        folds = getattr(self.trainer.datamodule, "test_folds", None) if stage == "test" else None
        fold_scores = metric.fold_scores(folds) if folds else {}
        if stage == "val":
            self._log_figures(metric)
        metric.reset()
        # Every rank computed the same numbers from gathered features: no further reduction.
        self.log_dict({f"{stage}/{k}": float(v) for k, v in scores.items() if k != "rsum"})
        self.log(f"{stage}/rsum", float(scores["rsum"]), prog_bar=True)
        if fold_scores:
            self.log_dict({f"test_1k/{k}": float(v) for k, v in fold_scores.items()})

    def _log_figures(self, metric: RetrievalMetric) -> None:
        """Figures of this validation epoch of a fit: ``<run dir>/figures/{similarities,retrievals}_epochNNN.png``
        (run dir: the trainer's ``default_root_dir``) and, with a WandbLogger, the same as W&B
        images plus two example tables (rank zero).

        The histograms show the confident training similarities of this epoch (the samples
        the Gaussians were fitted on, from ``similarity_samples``); the examples rank the
        validation features the metric just scored. About half a second per epoch on a CPU.
        """
        opts = self.figures
        # During fit only: the histograms show training samples, and a bare trainer.validate()
        # would write into the working directory (Lightning's default_root_dir).
        if not opts or self.trainer.state.fn != "fit" or self.current_epoch % opts.get("every_n_epochs", 1):
            return
        num_examples = opts.get("num_examples", 4)
        dm = self.trainer.datamodule
        show_examples = num_examples > 0 and hasattr(dm, "load_split")  # images and captions come from it
        features = metric.features() if show_examples else None  # collective under DDP: every rank
        if not self.trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import WandbLogger

        from fne_lightning.components import plots

        epoch, run_dir = self.current_epoch, Path(self.trainer.default_root_dir) / "figures"
        title = f"epoch {epoch}" + (" (warm-up)" if self.in_warmup() else "")
        stats, loss = getattr(self.loss, "stats", None), self.loss
        gaussians = None if stats is None else [float(g) for g in stats.gaussians()]
        if stats is not None and not bool(stats.ready):
            title += f", Gaussians not ready ({int(stats.pos_count)} < {stats.min_pos_samples} positives)"
        fig = plots.similarity_figure(
            *self.similarity_samples.samples(), gaussians, match_prior=getattr(loss, "match_prior", None),
            cutdown=getattr(loss, "cutdown", None), false_margin=getattr(loss, "false_margin", None),
            title=f"{title}: similarities of confidently matched training pairs")
        paths = {"val/similarities": plots.save_figure(fig, run_dir / f"similarities_epoch{epoch:03d}.png")}
        rows = None
        if features is not None:
            split = dm.load_split("val")
            examples = plots.retrieval_examples(*features, metric.text_to_image, metric.positive_pairs,
                                                num_queries=num_examples, k=opts.get("top_k", 5))
            rows = plots.example_rows(examples, split.captions, lambda i: plots.open_image(split.image_paths[i]))
            fig = plots.retrieval_figure(*rows, title=f"{title}: validation retrievals")
            paths["val/retrievals"] = plots.save_figure(fig, run_dir / f"retrievals_epoch{epoch:03d}.png")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                media: dict[str, Any] = {key: wandb.Image(str(path)) for key, path in paths.items()}
                tables = plots.table_data(*rows, image=lambda im, label: wandb.Image(im, caption=label)) if rows else {}
                for name, (columns, data) in tables.items():
                    media[f"val/examples_{name}"] = wandb.Table(columns=columns, data=data)
                logger.log_metrics(media, step=self.global_step)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.val_metric, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metric, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_metric, batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metric, "test")
