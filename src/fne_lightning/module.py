"""LightningModule for image-text matching.

With ``datamodule.py`` and ``callbacks.py``, the only code that imports Lightning. It wires
plain-PyTorch components together: the dual encoder, its momentum (EMA) copy, the
loss (VSE0/VSE++ or FNE with its memory bank and similarity statistics, all registered
buffers) and the retrieval metric. Order of one training step, as in FNE_SPEC sections 1-2:
online + momentum forward -> loss (statistics updated, negatives selected) -> backward ->
optimizer step -> EMA update of the momentum encoders. The step's momentum features enter
the bank right after the loss, so the next step sees them.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from fne_lightning.data.datasets import positive_pairs_tensor
from fne_lightning.errors import FNEError, check
from fne_lightning.losses.base import RetrievalLoss
from fne_lightning.models.encoders import DualEncoder, ema_update, momentum_copy
from fne_lightning.retrieval.metric import RetrievalMetric
from fne_lightning.utils.distributed import any_rank


class RetrievalModule(L.LightningModule):
    """Dual-encoder retrieval model trained with any :class:`~fne_lightning.losses.base.RetrievalLoss`.

    A training step encodes the batch's images and captions (and, for a loss that
    ``requires_momentum``, encodes them again with the momentum encoders), checks that the
    features are finite, calls the loss, and logs ``train/loss`` and the loss's diagnostics as
    ``fne/<name>_step`` and ``fne/<name>_epoch``. After every optimizer step the momentum
    encoders follow the online ones by EMA. Validation and test encode every image and every
    caption of the split once and log the scores of
    :func:`~fne_lightning.retrieval.ranking.retrieval_scores` as ``val/<name>`` and
    ``test/<name>`` (and ``test_1k/<name>`` with ``data.test_folds``, ``test_<protocol>/<name>``
    with ``data.protocol``). Checkpoints also hold
    the random streams and the loss's epoch, so a resumed run continues exactly.
    """

    def __init__(self, encoder: DualEncoder, loss: RetrievalLoss, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, config: dict | None = None, seed: int = 0,
                 momentum: float = 0.995, nonfinite: str = "stop", lazy_momentum: bool = True,
                 scheduler_interval: str = "epoch", decay_1d: bool = False) -> None:
        """Wire the encoder, its momentum copy (when the loss needs one), the loss and the metrics.

        Args:
            encoder: the online :class:`~fne_lightning.models.encoders.DualEncoder`.
            loss: a :class:`~fne_lightning.losses.base.RetrievalLoss` (the contract is written
                there).
            optimizer: partial optimizer, finished with the encoder's trainable parameters.
            scheduler: partial LR scheduler or None. A factory with a ``total_steps`` argument is
                given the run's optimizer steps (``trainer.estimated_stepping_batches``).
            config: the resolved run config, stored in checkpoints and sent to the loggers.
            seed: base seed of the loss's random generator (rank r uses seed + r).
            momentum: EMA momentum m of the momentum encoders (config key ``momentum``), built
                only when the loss ``requires_momentum``: ``theta_m <- m theta_m + (1 - m) theta``
                after every optimizer step.
            nonfinite: what a non-finite loss or feature does: ``stop`` the run with a message
                naming the step (the last good checkpoint is kept), or ``skip`` the batch before
                it touches the bank, the statistics or the weights (counted in
                ``train/skipped_batches``).
            lazy_momentum: skip the momentum forward on warm-up steps whose momentum features
                the loss will never read
                (:meth:`~fne_lightning.losses.base.RetrievalLoss.momentum_horizon`; the EMA still
                runs every step, so the result is the same: tested). False: always run it.
            scheduler_interval: ``epoch`` (step the scheduler after every epoch) or ``step``
                (after every optimizer step; config key ``optim.interval``).
            decay_1d: whether weight decay also applies to biases, norms' gains and the logit
                scale and bias (config key ``optim.decay_1d``; open_clip and timm exempt them,
                some published recipes decay every parameter).

        Raises:
            FNEError: a loss that is not a ``RetrievalLoss``, or a bad ``nonfinite`` or
                ``momentum``.
        """
        super().__init__()
        check(isinstance(loss, RetrievalLoss), "loss._target_", "a subclass of fne_lightning.losses.RetrievalLoss",
              type(loss).__name__)
        check(nonfinite in ("stop", "skip"), "nonfinite", "stop or skip", nonfinite)
        check(0.0 <= momentum <= 1.0, "momentum", "a value in [0, 1]", momentum)
        check(scheduler_interval in ("epoch", "step"), "optim.interval", "epoch or step", scheduler_interval)
        check(isinstance(decay_1d, bool), "optim.decay_1d", "true or false", decay_1d)
        self.scheduler_interval, self.decay_1d = scheduler_interval, decay_1d
        self.nonfinite = nonfinite
        self.skipped_batches = 0
        #: The logged names of the loss's diagnostics in the last training epoch (``fne/...``).
        self.last_epoch_keys: set[str] = set()
        self._epoch_started = -1  # the epoch whose start the loss was last told of
        # This epoch's running sums and step counts of the loss's diagnostics (_log_diagnostics).
        self._diagnostic_sums: dict[str, Tensor] = {}
        self._diagnostic_counts: dict[str, int] = {}
        self._step_diagnostics: tuple[dict[str, Tensor], int] | None = None
        self.save_hyperparameters(config or {})
        self.encoder = encoder
        self.loss = loss
        loss.bind(encoder)  # before the momentum copy: a loss may switch on a parameter of the model
        self.momentum = momentum
        self.lazy_momentum = lazy_momentum
        self.momentum_encoder = momentum_copy(encoder) if loss.requires_momentum else None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed
        # Targets (caption -> image, positives) are set from the datamodule in setup().
        self.val_metric = RetrievalMetric(torch.empty(0, dtype=torch.long))
        self.test_metric = RetrievalMetric(torch.empty(0, dtype=torch.long))
        self._generator_state: Tensor | None = None
        self._listed: Tensor | None = None  # see on_train_epoch_start
        self._listed_seen = 0
        self._positives_warned = False

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
                # data.protocol: the test split is also scored by a published protocol (test_eccv/...).
                protocol = getattr(dm, "protocol_targets", lambda: None)() if name == "test" else None
                metric.set_targets(torch.from_numpy(split.text_to_image), positive_pairs_tensor(split), protocol)

    def on_fit_start(self) -> None:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed + self.global_rank)  # differs per rank, reproducible from the seed
        state = self._generator_state
        if state is not None and state.dim() == 2:  # one row per rank (saved by a multi-process run)
            if state.shape[0] == self.trainer.world_size:
                state = state[self.global_rank].clone()  # set_state wants a tensor of its own
            else:
                rank_zero_warn(f"the checkpoint holds the negative sampler's streams of {state.shape[0]} processes, "
                               f"this run has {self.trainer.world_size}: each rank restarts from seed + rank")
                state = None
        if state is not None:
            gen.set_state(state)
        self.generator = gen
        self.loss.set_generator(gen)
        self.loss.check_setup()  # positives (setup) and generator are set: the loss may refuse them

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What the state_dict does not hold but an exact resume needs: the random streams
        # (negative sampling, and the global ones augmentation in the main process draws from)
        # and the epoch the statistics belong to. Tensors and plain types only (weights_only).
        gen = getattr(self, "generator", None)  # set in on_fit_start; absent for a bare save
        if gen is not None:
            state = gen.get_state()
            if self.trainer.world_size > 1:
                # Every rank draws from its own stream: keep all of them (rank r's in row r), so that
                # a resumed multi-process run continues each rank's stream. Checkpoints are dumped on
                # every rank (written by rank 0), so the gather is a collective all ranks reach.
                state = self.all_gather(state.to(self.device)).cpu()  # (world, S)
            checkpoint["sampler_generator"] = state
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(),
        }
        # "stats_epoch": the name checkpoints written before the loss contract used.
        checkpoint["fne_state"] = {"stats_epoch": self._epoch_started, "skipped_batches": self.skipped_batches}

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
        self._epoch_started = state.get("stats_epoch", -1)
        self.skipped_batches = state.get("skipped_batches", 0)

    def trainable_parameter_groups(self, weight_decay: bool = True) -> list[dict[str, Any]]:
        """The parameter groups the optimizer trains.

        The online towers' parameters and the loss's own (a temperature), each once (a loss may
        share the model's ``logit_scale``); not the momentum copy nor the loss's buffers.

        Args:
            weight_decay: whether the optimizer decays weights. If so, as open_clip and timm do,
                biases, norms' gains, other 1-d parameters and the logit scale and bias form a
                second group with ``weight_decay=0``; if not, every parameter is in one group.

        Returns:
            One or two ``{"params": [...]}`` groups, none of them empty.
        """
        seen: set[int] = set()
        decay, no_decay = [], []
        for name, param in [*self.encoder.named_parameters(), *self.loss.named_parameters()]:
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = weight_decay and not self.decay_1d and (param.ndim < 2 or "logit_" in name)
            (no_decay if exempt else decay).append(param)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        keywords = getattr(self.optimizer_factory, "keywords", {})
        groups = self.trainable_parameter_groups(weight_decay=bool(keywords.get("weight_decay", 0.0)))
        optimizer = self.optimizer_factory(params=groups)
        if self.scheduler_factory is None:
            return optimizer
        extra = {}
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters:
            extra["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, **extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    # ---------------------------------------------------------------- training
    def in_warmup(self) -> bool:
        """Whether the current epoch is one of the loss's ``warmup_epochs``."""
        return self.current_epoch < self.loss.warmup_epochs

    def on_train_epoch_start(self) -> None:
        self._diagnostic_sums, self._diagnostic_counts = {}, {}
        # The epoch's captions whose image id, and whose text id, occur in the positives file; and
        # the captions trained on.
        self._listed = (torch.zeros(2, dtype=torch.long, device=self.device) if self.loss.positives.available
                        else None)
        self._listed_seen = 0
        # A new epoch, not a run resuming in the middle of one (its statistics are restored).
        if self._epoch_started != self.current_epoch:
            self._epoch_started = self.current_epoch
            self.loss.on_train_epoch_start()

    def on_train_epoch_end(self) -> None:
        self._check_positives_listed()
        means = {k: total / self._diagnostic_counts[k] for k, total in self._diagnostic_sums.items()}
        # The keys of this epoch: a warm-up epoch's diagnostics (VSE's sampled_fn_rate, say) stay in
        # Lightning's callback_metrics after the loss stops reporting them, and must not be read as
        # the last epoch's (train.py's metrics.json).
        self.last_epoch_keys = {_key(k) for k in means}
        if means:
            self.log_dict({f"{_key(k)}_epoch": v for k, v in means.items()}, on_step=False, on_epoch=True)
            # As self.log(on_step=True, on_epoch=True) leaves them for monitors (ModelCheckpoint,
            # EarlyStopping, optimized_metric=fne/...): the plain keys hold the epoch's means.
            self.log_dict({_key(k): v for k, v in means.items()}, on_step=False, on_epoch=True, logger=False)

    def _check_positives_listed(self) -> None:
        """Warn (once a run) when the training positives name none of the epoch's image ids or none
        of its text ids: the file is then in other ids than the batches' (a stream read with another
        ``data.text_id_field`` or ``data.image_id`` than the shards were written with), and every
        false-negative rate reads 0. One host sync (and an all-reduce) per epoch."""
        if self._listed is None or self._positives_warned:
            return
        counts = torch.cat([self._listed, self._listed.new_tensor([self._listed_seen])])
        images, texts, seen = self.trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        if seen and (images == 0 or texts == 0):
            self._positives_warned = True
            rank_zero_warn(f"training positives: of the {seen} captions of epoch {self.current_epoch}, {images} have "
                           f"their image id and {texts} their text id in the positives file, so the false-negative "
                           "rates (fne/*fn_rate) read 0; expected the file in the batches' ids (for shards: the "
                           "data.image_id and data.text_id_field they were written with)")

    def _log_diagnostics(self, diagnostics: dict[str, Tensor], batch_size: int) -> None:
        """The loss's diagnostics as ``fne/<name>_step`` on the steps the loggers write
        (``trainer.log_every_n_steps``) and ``fne/<name>_epoch``, the mean over every step of the
        epoch, at its end: the keys ``self.log(on_step=True, on_epoch=True)`` gives. Not that call
        every step: Lightning's ``self.log`` costs about 0.8 ms a key on a CPU (it walks the stored
        metric's attributes to move it to the device), 9 ms a step for FNE's eleven keys against
        its 24 ms VSE++ step; here a step adds each value to a running sum (one op a key)."""
        sums, counts = self._diagnostic_sums, self._diagnostic_counts
        for key, value in diagnostics.items():
            value = value.detach().float()
            sums[key] = sums[key] + value if key in sums else value
            counts[key] = counts.get(key, 0) + 1
        self._step_diagnostics = (diagnostics, batch_size)  # logged in on_train_batch_end if it is written

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the callbacks' hooks (one of them may stop the run, which makes this step a written
        # one) and before Lightning writes the step's metrics: log this step's diagnostics then.
        pending, self._step_diagnostics = self._step_diagnostics, None
        trainer = self.trainer
        if pending is not None and (getattr(trainer._logger_connector, "should_update_logs", True)
                                    or trainer.fast_dev_run):
            diagnostics, batch_size = pending
            self.log_dict({f"{_key(k)}_step": v for k, v in diagnostics.items()}, on_step=True, on_epoch=False,
                          batch_size=batch_size)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor] | None:
        images, tokens, image_ids, text_ids = batch
        image_features = self.encoder.encode_image(images)  # (B, D)
        text_features = self.encoder.encode_text(tokens)  # (B, D)
        momentum: dict[str, Tensor] = {}
        if self.momentum_encoder is not None and self._momentum_needed(images.shape[0]):
            with torch.no_grad():
                momentum = {
                    "momentum_image_features": self.momentum_encoder.encode_image(images),
                    "momentum_text_features": self.momentum_encoder.encode_text(tokens),
                }
        # Checked before the loss, which writes the bank and the statistics: a bad batch must not
        # poison them. One host sync per step (two with the loss check below).
        if not self._finite([image_features, text_features, *momentum.values()], "features"):
            return None
        self.loss.set_progress(self._progress())
        loss, diagnostics = self.loss(image_features, text_features, image_ids, text_ids,
                                      warmup=self.in_warmup(), **momentum)
        if not self._finite([loss], "loss"):
            return None
        batch_size = images.shape[0]
        if self._listed is not None:  # on the device: no sync
            in_images, in_texts = self.loss.positives.listed(image_ids, text_ids)
            self._listed += torch.stack([torch.count_nonzero(in_images), torch.count_nonzero(in_texts)])
            self._listed_seen += batch_size
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self._log_diagnostics(diagnostics, batch_size)
        # The features go to callbacks (RetrievalFigures' reservoir) through on_train_batch_end.
        return {"loss": loss, "image_features": image_features.detach(), "text_features": text_features.detach()}

    def _progress(self) -> float:
        """Training progress in epochs before this step: the epoch plus the share of its batches
        already trained (the loop's count, which a mid-epoch resume restores)."""
        per_epoch = self.trainer.num_training_batches
        if per_epoch == float("inf") or not per_epoch:
            return float(self.current_epoch)
        position = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return self.current_epoch + position / per_epoch

    def _momentum_needed(self, batch_size: int) -> bool:
        """Whether this step's momentum features can still be read by the loss.

        In the warm-up, only the last ``loss.momentum_horizon(global batch)`` steps before the
        main loss starts count (for FNE, the steps whose features are still in the bank then).
        The same decision on every rank: it depends on the epoch and the batch's position in it
        only (the loop's count of trained batches, which a mid-epoch resume restores).
        """
        if not (self.lazy_momentum and self.in_warmup()):
            return True
        horizon = self.loss.momentum_horizon(batch_size * self.trainer.world_size)
        per_epoch = self.trainer.num_training_batches
        if horizon is None or per_epoch == float("inf"):
            return True
        position = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed  # this batch, 0-based
        steps_left = (self.loss.warmup_epochs - self.current_epoch) * int(per_epoch) - position
        return steps_left <= horizon

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
            ema_update(self.momentum_encoder, self.encoder, self.momentum)

    # -------------------------------------------------------------- evaluation
    def _eval_step(self, metric: RetrievalMetric, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> None:
        inputs, indices = batch
        if dataloader_idx == 0:
            metric.update(self.encoder.encode_image(inputs), indices, "image")
        else:
            metric.update(self.encoder.encode_text(inputs), indices, "text")

    def saw_whole_split(self, stage: str) -> bool:
        """Whether this evaluation pass saw every batch of the split (not so under ``limit_*_batches``).

        Args:
            stage: ``"val"`` or ``"test"``.
        """
        trainer = self.trainer
        counts, loaders = ((trainer.num_val_batches, trainer.val_dataloaders) if stage == "val"
                           else (trainer.num_test_batches, trainer.test_dataloaders))
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        return all(n >= len(dl) for n, dl in zip(counts, loaders, strict=True))

    def _eval_epoch_end(self, metric: RetrievalMetric, stage: str) -> None:
        if self.trainer.sanity_checking:
            metric.reset()
            return
        fold_scores: dict[str, float] = {}
        if self.saw_whole_split(stage):
            scores = metric.compute()
            # COCO 1K protocol (data.test_folds): the mean over consecutive folds of the test split.
            folds = getattr(self.trainer.datamodule, "test_folds", None) if stage == "test" else None
            fold_scores = metric.fold_scores(folds) if folds else {}
        else:
            # limit_*_batches < 1: score what was seen, so that `val/rsum` (the checkpoint monitor)
            # exists; the same part of the split every pass, so epochs stay comparable.
            scores, n_img, n_txt = metric.subset_scores()
            if n_txt == 0:
                metric.reset()
                rank_zero_warn(f"{stage}: no caption of the images seen (limit_*_batches): no retrieval metrics")
                return
            rank_zero_warn(f"{stage}: retrieval metrics of the part of the split seen ({n_img} images, {n_txt} of "
                           "their captions; limit_*_batches < 1): not comparable with whole-split numbers")
        metric.reset()
        # Every rank computed the same numbers from gathered features: no further reduction.
        # A protocol's eccv/<name> is logged as test_eccv/<name>.
        self.log_dict({f"{stage}_{k}" if "/" in k else f"{stage}/{k}": float(v) for k, v in scores.items()
                       if k != "rsum"})
        self.log(f"{stage}/rsum", float(scores["rsum"]), prog_bar=True)
        if fold_scores:
            self.log_dict({f"test_1k/{k}": float(v) for k, v in fold_scores.items()})

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.val_metric, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metric, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_metric, batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metric, "test")


def _key(name: str) -> str:
    """The logged key of a loss diagnostic: ``fne/<name>``, or the name itself when it holds a
    ``/`` (``train/logit_scale``)."""
    return name if "/" in name else f"fne/{name}"


def _as_tuples(value: Any) -> Any:
    """Python's random state, whose tuples a checkpoint round trip may have turned into lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
