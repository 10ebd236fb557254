"""LightningModule for image-text matching (Lightning glue #1 of 2).

Wires plain-PyTorch components together: the dual encoder, its momentum (EMA) copy, the
loss (VSE0/VSE++ or FNE with its memory bank and similarity statistics, all registered
buffers) and the retrieval metric. Order of one training step, as in FNE_SPEC sections 1-2:
online + momentum forward -> loss (statistics updated, negatives selected) -> backward ->
optimizer step -> EMA update of the momentum encoders. The step's momentum features enter
the bank right after the loss, so the next step sees them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from fne_lightning.components.datasets import positive_pairs_tensor
from fne_lightning.components.distributed import any_rank
from fne_lightning.components.encoders import DualEncoder, ema_update, momentum_copy
from fne_lightning.components.plots import SimilarityReservoir
from fne_lightning.errors import FNEError, check
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
        nonfinite: what a non-finite loss or feature does: ``stop`` the run with a message naming
            the step (the last good checkpoint is kept), or ``skip`` the batch before it touches
            the bank, the statistics or the weights (counted in ``train/skipped_batches``).
    """

    def __init__(self, encoder: DualEncoder, loss: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, config: dict | None = None, seed: int = 0,
                 figures: Mapping[str, Any] | None = None, nonfinite: str = "stop") -> None:
        super().__init__()
        check(nonfinite in ("stop", "skip"), "nonfinite", "stop or skip", nonfinite)
        self.nonfinite = nonfinite
        self.skipped_batches = 0
        self._stats_epoch = -1  # the epoch the similarity statistics were last reset for
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
        # What the state_dict does not hold but an exact resume needs: the random streams
        # (negative sampling, and the global ones augmentation in the main process draws from)
        # and the epoch the statistics belong to. Tensors and plain types only (weights_only).
        gen = getattr(self.loss, "generator", None)
        if gen is not None:
            checkpoint["sampler_generator"] = gen.get_state()
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(),
        }
        checkpoint["fne_state"] = {"stats_epoch": self._stats_epoch, "skipped_batches": self.skipped_batches}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._generator_state = checkpoint.get("sampler_generator")
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(_as_tuples(rng["python"]))
        state = checkpoint.get("fne_state", {})
        self._stats_epoch = state.get("stats_epoch", -1)
        self.skipped_batches = state.get("skipped_batches", 0)

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
        # Reset at the start of an epoch, not when a run resumes in the middle of one.
        fresh_epoch = self._stats_epoch != self.current_epoch
        self._stats_epoch = self.current_epoch
        if stats is not None and getattr(self.loss, "reset_stats_every_epoch", False) and fresh_epoch:
            stats.reset()
        if self.similarity_samples is not None:
            self.similarity_samples.reset()  # the figure shows this epoch's samples

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], batch_idx: int) -> Tensor | None:
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
        # Checked before the loss, which writes the bank and the statistics: a bad batch must not
        # poison them. One host sync per step (two with the loss check below).
        if not self._finite([image_features, text_features, *momentum.values()], "features"):
            return None
        loss, diagnostics = self.loss(image_features, text_features, image_ids, text_ids,
                                      warmup=self.in_warmup(), **momentum)
        if not self._finite([loss], "loss"):
            return None
        if self.similarity_samples is not None:
            self.similarity_samples.add(image_features, text_features, image_ids)
        batch_size = images.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"fne/{k}": v for k, v in diagnostics.items()}, on_step=True, on_epoch=True,
                      batch_size=batch_size)
        return loss

    def _finite(self, tensors: list[Tensor], what: str) -> bool:
        """True if all ``tensors`` are finite on every rank; else stop the run or skip the batch."""
        bad = torch.stack([~torch.isfinite(t.detach().float()).all() for t in tensors]).any()
        if not bool(any_rank(bad)):  # every rank takes the same decision
            return True
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {self.trainer.fit_loop.batch_idx})"
        if self.nonfinite == "stop":
            raise FNEError(f"non-finite {what} at {where}: training stopped (nonfinite=stop); the last good "
                           f"checkpoint is kept in {self.trainer.default_root_dir}/checkpoints, or pass "
                           "nonfinite=skip to drop such batches")
        self.skipped_batches += 1
        rank_zero_warn(f"non-finite {what} at {where}: batch skipped ({self.skipped_batches} so far)")
        self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
        return False

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


def _as_tuples(value: Any) -> Any:
    """Python's random state, whose tuples a checkpoint round trip may have turned into lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: every ``every_n_train_steps`` steps, at the end of training, and when SIGTERM
    (what SLURM sends before a preemption) or Ctrl-C stops a run, after the batch in flight.

    Never after an error: a failed or non-finite step must not overwrite the last good state.
    Lightning writes checkpoints atomically (a temporary file, then a rename), so a crash while
    writing leaves the previous ``last.ckpt`` intact.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 500) -> None:
        check(every_n_train_steps >= 1, "checkpoint.every_n_steps", "an integer >= 1", every_n_train_steps)
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Lightning's own rule skips the final save when an earlier periodic one happened.
        if self._last_global_step_saved != trainer.global_step:
            trainer.save_checkpoint(self.last_path)
            self._last_global_step_saved = trainer.global_step

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and not trainer.sanity_checking:
            trainer.save_checkpoint(self.last_path)
