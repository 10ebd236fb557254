"""Lightning callbacks of a training run (``conf/callbacks/default.yaml``).

* :class:`LastCheckpoint`: ``last.ckpt`` every N steps, at the end, and on SIGTERM / Ctrl-C.
* :class:`Requeue`: SIGTERM, and inside a SLURM job SLURM's warning signal, write ``last.ckpt`` at the
  next step boundary on every rank together and stop (the warning also requeues the job;
  :mod:`fne_lightning.utils.resume` says why Lightning's own requeue is not used).
* :class:`RetrievalFigures`: at the end of validation epochs, the similarity histograms that FNE
  fits its Gaussians to (with the Gaussians, p_fn and the cut-down) and validation retrieval
  examples, as PNGs and, with a ``WandbLogger``, W&B images and tables. The samples come from
  :class:`SimilarityReservoir`, filled from each training step's online features.

The module knows nothing of the figures: they read what the loss exposes through
:meth:`~fne_lightning.losses.base.RetrievalLoss.posterior_view` and what the training step
returns.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from fne_lightning.errors import FNEError, check
from fne_lightning.fne.stats import confident_samples
from fne_lightning.utils.resume import LAST, slurm_job_id


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: every ``every_n_train_steps`` steps, at the end of training, and when SIGTERM
    (what SLURM sends before a preemption) or Ctrl-C stops a run, after the batch in flight.

    Never after an error: a failed or non-finite step must not overwrite the last good state.
    Lightning writes checkpoints atomically (a temporary file, then a rename), so a crash while
    writing leaves the previous ``last.ckpt`` intact.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 500) -> None:
        """A ``ModelCheckpoint`` that keeps only ``last.ckpt``.

        Args:
            dirpath: the checkpoint directory (the run's ``checkpoints/``).
            every_n_train_steps: steps between two saves (config key ``checkpoint.every_n_steps``).
        """
        check(every_n_train_steps >= 1, "checkpoint.every_n_steps", "an integer >= 1", every_n_train_steps)
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)

    @property
    def last_path(self) -> Path:
        """The path of ``last.ckpt`` in ``dirpath``."""
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Lightning's own rule skips the final save when an earlier periodic one happened.
        if self._last_global_step_saved != trainer.global_step:
            trainer.save_checkpoint(self.last_path)
            self._last_global_step_saved = trainer.global_step

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if (isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and not trainer.sanity_checking
                and self._last_global_step_saved != trainer.global_step):  # Requeue may have written it
            trainer.save_checkpoint(self.last_path)


class Requeue(L.Callback):
    """Signals that stop training at a step boundary, on every rank at the same step.

    * SIGTERM (a preemption, ``kill``, ``scancel``): after the batch in flight, ``last.ckpt`` is
      written and Lightning's :class:`SIGTERMException` stops the run (exit code 143).
    * ``signals`` inside a SLURM job (SLURM's warning before a time limit or preemption): the
      same, after ``scontrol requeue <job id>`` (rank zero); ``requeued`` then holds
      ``(job id, whether scontrol succeeded)``.

    The stop itself is Lightning's: the callback sets the trainer's SIGTERM flag, so Lightning
    raises :class:`SIGTERMException` on every rank once the batch's metrics are logged.

    The handlers only note the signal; ``on_train_batch_end`` acts on it, with one all-reduce that
    makes every rank stop together (any rank's signal counts), so the checkpoint is a step
    boundary and the collectives of saving line up. Lightning's own SIGTERM handler broadcasts
    from inside the handler, which can meet another collective of the step on a rank that was
    not signalled at the same moment (we saw two gloo ranks hang that way); it is replaced while
    training runs and restored afterwards.
    """

    def __init__(self, signals: list[str] | None = None, enabled: bool | str = "auto") -> None:
        """Check the settings (config keys ``requeue.<name>``); the handlers are installed at train start.

        Args:
            signals: requeue signal names, e.g. ``[SIGUSR1, SIGUSR2]`` (sbatch
                ``--signal=USR1@120``; submitit uses USR2); default both.
            enabled: requeue ``auto`` (inside SLURM jobs), True or False. SIGTERM is always
                handled.

        Raises:
            FNEError: a name that is not a signal (or is SIGTERM), or a bad ``enabled``.
        """
        names = list(signals or ["SIGUSR1", "SIGUSR2"])
        for name in names:
            if not isinstance(getattr(signal, str(name), None), signal.Signals) or name == "SIGTERM":
                raise FNEError(f"requeue.signals: {name!r} is not a signal name other than SIGTERM "
                               "(expected e.g. SIGUSR1)")
        if enabled not in (True, False, "auto"):
            raise FNEError(f"requeue.enabled={enabled!r}: expected auto, true or false")
        self.signals = [getattr(signal, str(n)) for n in names]
        self.enabled = enabled
        self.terminate = self.requeue = False
        self.requeued: tuple[str | None, bool] | None = None
        self._previous: dict[int, Any] = {}

    def _requeue_active(self) -> bool:
        return self.enabled is True or (self.enabled == "auto" and slurm_job_id() is not None)

    def _note_term(self, signum: int, frame: Any) -> None:
        self.terminate = True

    def _note_requeue(self, signum: int, frame: Any) -> None:
        self.requeue = True

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.terminate = self.requeue = False
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._note_term)
        if self._requeue_active():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._note_requeue)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if not self._previous:
            return
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(self.terminate or self.requeue, all=False):
            return
        requeue = strategy.reduce_boolean_decision(self.requeue, all=False)
        last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        path = last.last_path if last is not None else Path(trainer.default_root_dir) / LAST
        trainer.save_checkpoint(path)
        if last is not None:
            last._last_global_step_saved = trainer.global_step
        if requeue:
            job, ok = slurm_job_id(), False
            if trainer.is_global_zero and job is not None:
                try:
                    ok = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True).returncode == 0
                except FileNotFoundError:
                    ok = False
            self.requeued = (job, bool(strategy.broadcast(ok, src=0)))  # every rank exits alike
        # Lightning raises SIGTERMException after this batch's logging, on every rank (all set it).
        trainer._signal_connector.received_sigterm = True


class SimilarityReservoir:
    """Ring buffers of the most recent confident positive and negative similarities.

    :meth:`add` takes the same in-batch online similarities as
    :meth:`SimilarityStats.update <fne_lightning.fne.stats.SimilarityStats.update>` and keeps
    the samples the Gaussians are fitted on
    (:func:`~fne_lightning.fne.stats.confident_samples`): S_ii of confidently matched pairs and
    their hardest in-batch negatives. Entries that are not samples are stored
    as NaN, so every write has a fixed size and the pointer is a host integer: no host sync in
    the training step. :meth:`samples` (once per epoch) syncs and drops the NaNs.
    """

    def __init__(self, capacity: int = 4096) -> None:
        """Create empty buffers (allocated on the device of the first batch).

        Args:
            capacity: positive samples kept (and twice as many negatives).

        Raises:
            ValueError: ``capacity < 1``.
        """
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: expected >= 1")
        self.capacity = capacity
        self.pos: Tensor | None = None  # (C,)
        self.neg: Tensor | None = None  # (2C,): two negatives per positive
        self._ptr = [0, 0]

    def reset(self) -> None:
        """Forget every sample (at the start of an epoch)."""
        if self.pos is not None:
            self.pos.fill_(float("nan"))
            self.neg.fill_(float("nan"))
        self._ptr = [0, 0]

    @torch.no_grad()
    def add(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor) -> None:
        """Keep the confident samples of one training batch.

        Args:
            image_features: (B, D) online image features; row i belongs to pair i.
            text_features: (B, D) online caption features.
            image_ids: (B,) image indices (captions of one image are never negatives).
        """
        v, t = image_features.detach().float(), text_features.detach().float()
        same = image_ids[:, None] == image_ids[None, :]  # (B, B)
        with torch.autocast(v.device.type, enabled=False):  # fp32, as the statistics (bf16 under autocast)
            pos, pos_mask, neg, neg_mask = confident_samples(v @ t.T, same)
        if self.pos is None:
            self.pos = v.new_full((self.capacity,), float("nan"))
            self.neg = v.new_full((2 * self.capacity,), float("nan"))
        nan = v.new_full((), float("nan"))
        for k, (buf, values) in enumerate(((self.pos, torch.where(pos_mask, pos, nan)),
                                           (self.neg, torch.where(neg_mask, neg, nan)))):
            values = values[-buf.numel():].to(buf.dtype)  # a batch larger than the buffer keeps its tail
            n = values.numel()
            index = torch.arange(self._ptr[k], self._ptr[k] + n, device=buf.device) % buf.numel()
            buf.index_copy_(0, index, values)
            self._ptr[k] = (self._ptr[k] + n) % buf.numel()

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """The samples kept so far (one host sync).

        Returns:
            ``(positives, negatives)``: 1-D float64 NumPy arrays.
        """
        if self.pos is None:
            return np.zeros(0), np.zeros(0)
        pos, neg = self.pos.double().cpu().numpy(), self.neg.double().cpu().numpy()
        return pos[np.isfinite(pos)], neg[np.isfinite(neg)]


def wandb_tables(text_rows: Sequence[Any], image_rows: Sequence[Any],
                 image: Callable[[Any, str], Any] = lambda im, label: im) -> dict[str, tuple[list, list]]:
    """Columns and rows of two tables of retrieval examples, ``t2i`` and ``i2t``.

    Args:
        text_rows: caption queries with their image results
            (:func:`~fne_lightning.retrieval.plots.example_rows`).
        image_rows: image queries with their caption results.
        image: wraps each picture with its label (e.g. ``wandb.Image(picture, caption=label)``);
            default the picture itself.

    Returns:
        ``{"t2i": (columns, rows), "i2t": (columns, rows)}``.
    """
    from fne_lightning.retrieval.examples import MARKS

    k = max([len(r[1]) for r in [*text_rows, *image_rows]], default=0)
    ranks = [f"top {r + 1}" for r in range(k)]
    t2i = [[caption, *(image(im, MARKS[m][0]) for im, m in items)] for caption, items in text_rows]
    i2t = [[image(im, "query"), *(f"{MARKS[m][2]} {c}".strip() for c, m in items)] for im, items in image_rows]
    return {"t2i": (["caption", *ranks], t2i), "i2t": (["image", *ranks], i2t)}


class RetrievalFigures(Callback):
    """Figures of the validation epochs of a fit, as PNG files and W&B media.

    ``<run dir>/figures/{similarities,retrievals}_epochNNN.png`` (run dir: the trainer's
    ``default_root_dir``) and, with a ``WandbLogger``, the same as W&B images plus two example
    tables (rank zero). The similarity figure is
    :func:`~fne_lightning.retrieval.plots.similarity_figure` of this epoch's training samples
    (:class:`SimilarityReservoir`), the retrieval figure
    :func:`~fne_lightning.retrieval.plots.retrieval_figure` of validation queries.
    """

    def __init__(self, enabled: bool = True, every_n_epochs: int = 1, num_examples: int = 4, top_k: int = 5,
                 sample_size: int = 4096) -> None:
        """Check the settings (the top-level config keys ``figures.<name>``).

        Args:
            enabled: False turns the callback into a no-op.
            every_n_epochs: draw on epochs divisible by this.
            num_examples: captions and images shown as queries (0: the similarity figure only).
            top_k: results shown per query.
            sample_size: recent confident positive similarities kept for the histograms (twice
                as many negatives).

        Raises:
            FNEError: a value out of range, naming its key.
        """
        for key, value, low in (("every_n_epochs", every_n_epochs, 1), ("sample_size", sample_size, 1),
                                ("num_examples", num_examples, 0), ("top_k", top_k, 0)):
            check(isinstance(value, int) and not isinstance(value, bool) and value >= low, f"figures.{key}",
                  f"an integer >= {low}", value)
        self.enabled, self.every_n_epochs = enabled, every_n_epochs
        self.num_examples, self.top_k = num_examples, top_k
        # The histograms' samples: recent confident in-batch similarities (what the Gaussians fit).
        self.samples = SimilarityReservoir(sample_size)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.samples.reset()  # the figure shows this epoch's samples

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # A skipped (non-finite) step returns None: its features never reach the figure.
        if self.enabled and isinstance(outputs, dict) and "image_features" in outputs:
            self.samples.add(outputs["image_features"], outputs["text_features"], batch[2])

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # During fit only: the histograms show training samples, and a bare trainer.validate()
        # would write into the working directory (Lightning's default_root_dir).
        if (not self.enabled or trainer.sanity_checking or trainer.state.fn != "fit"
                or trainer.current_epoch % self.every_n_epochs or not module.saw_whole_split("val")):
            return
        dm = trainer.datamodule
        show_examples = self.num_examples > 0 and hasattr(dm, "load_split")  # images and captions come from it
        metric = module.val_metric
        features = metric.features() if show_examples else None  # collective under DDP: every rank
        if trainer.is_global_zero:
            self._draw(trainer, module, features)

    def _draw(self, trainer: L.Trainer, module: Any, features: tuple[Tensor, Tensor] | None) -> None:
        from lightning.pytorch.loggers import WandbLogger

        from fne_lightning.data.datasets import open_image
        from fne_lightning.retrieval import plots
        from fne_lightning.retrieval.examples import retrieval_examples

        epoch, run_dir = trainer.current_epoch, Path(trainer.default_root_dir) / "figures"
        title = f"epoch {epoch}" + (" (warm-up)" if module.in_warmup() else "")
        view = module.loss.posterior_view()
        if view is not None and not view.ready:
            title += f", Gaussians not ready ({view.pos_count} < {view.min_pos_samples} positives)"
        fig = plots.similarity_figure(
            *self.samples.samples(), None if view is None else list(view.gaussians),
            match_prior=None if view is None else view.match_prior, cutdown=None if view is None else view.cutdown,
            false_margin=None if view is None else view.false_margin,
            title=f"{title}: similarities of confidently matched training pairs")
        paths = {"val/similarities": plots.save_figure(fig, run_dir / f"similarities_epoch{epoch:03d}.png")}
        rows = None
        if features is not None:
            split, metric = trainer.datamodule.load_split("val"), module.val_metric
            examples = retrieval_examples(*features, metric.text_to_image, metric.positive_pairs,
                                                num_queries=self.num_examples, k=self.top_k)
            image = trainer.datamodule.image if hasattr(trainer.datamodule, "image") else (
                lambda stage, i: open_image(split.image_paths[i]))
            rows = plots.example_rows(examples, split.captions, lambda i: image("val", i))
            fig = plots.retrieval_figure(*rows, title=f"{title}: validation retrievals")
            paths["val/retrievals"] = plots.save_figure(fig, run_dir / f"retrievals_epoch{epoch:03d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                media: dict[str, Any] = {key: wandb.Image(str(path)) for key, path in paths.items()}
                tables = wandb_tables(*rows, image=lambda im, label: wandb.Image(im, caption=label)) if rows else {}
                for name, (columns, data) in tables.items():
                    media[f"val/examples_{name}"] = wandb.Table(columns=columns, data=data)
                logger.log_metrics(media, step=trainer.global_step)
