"""The contract between :class:`~fne_lightning.module.RetrievalModule` and a loss.

A loss is one subclass of :class:`RetrievalLoss` and one YAML file in ``conf/loss/`` whose
``_target_`` names it; ``module.py`` needs no edit (docs: guides/adding-a-loss). What passes
between the two, and nothing else:

* an experiment may set ``loss.warmup_epochs`` and ``loss.warmup_loss`` for any loss (a recipe's
  warm-up phase): the base class takes both;
* when the module is built it calls :meth:`bind` with the online encoder, so that a loss can use
  a parameter of the model (InfoNCE trains the open_clip model's own ``logit_scale``, which then
  exports with it); then it reads ``requires_momentum`` (a class attribute, or set per instance
  in ``__init__``) to decide whether to build momentum encoders;
* a loss may own trainable parameters (a temperature, a bias): the module's optimizer takes every
  parameter of the loss that requires a gradient, besides the encoder's, and they are
  checkpointed with the module;
* the module gives every training step the online features (B, D) of the batch's images and
  captions, their image ids and caption ids, ``warmup`` (``current_epoch < warmup_epochs``),
  and, when ``requires_momentum``, the momentum encoders' features of the same batch (the module
  owns those encoders and their EMA); before the step it calls :meth:`set_progress` with the
  training progress in epochs (restored exactly on resume, so a schedule that depends on it, such
  as a ramp, resumes exactly);
* before training it hands the loss a per-rank random generator (:meth:`set_generator`) and the
  training split's truly matching pairs (``positives``, for false-negative diagnostics and
  oracles), then calls :meth:`check_setup`, where a loss refuses what it cannot train with (an
  oracle on data without positives) as one error line;
* at the start of every new training epoch (not at a mid-epoch resume) it calls
  :meth:`on_train_epoch_start`;
* the loss returns ``(loss, diagnostics)``: a scalar, and detached scalars that the module logs
  as ``fne/<name>``, or under the name itself when it holds a ``/`` (``train/logit_scale``). Its
  state (memory bank, statistics) lives in buffers and submodules, so it is checkpointed, moved
  to the device and restored with the module;
* for the similarity figure a loss with fitted Gaussians describes them (:meth:`posterior_view`).

Every loss is built as ``instantiate(cfg.loss, embed_dim=D)``: its ``__init__`` takes
``embed_dim`` (the feature dimension) whether it uses it or not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fne_lightning.errors import check
from fne_lightning.fne.positives import PositiveIndex

WARMUP_LOSSES = ("vsepp", "vse0")


class PosteriorView(NamedTuple):
    """What the similarity figure shows of a loss's false-negative model, as host numbers.

    Returned by :meth:`RetrievalLoss.posterior_view`; see
    :func:`~fne_lightning.retrieval.plots.similarity_figure` for the figure.
    """

    #: The Gaussians of matched and unmatched similarities that the false-negative posterior
    #: uses, as ``(pos_mean, pos_var, neg_mean, neg_var)``.
    gaussians: tuple[float, float, float, float]
    #: Whether the Gaussians are in use (at least ``min_pos_samples`` positives seen).
    ready: bool
    #: Positive samples seen so far.
    pos_count: int
    #: Positive samples needed before the Gaussians are used.
    min_pos_samples: int
    #: The prior probability that a candidate matches its anchor, as the posterior uses it.
    match_prior: float
    #: Candidates scoring at or below ``pos_mean - cutdown`` get weight 0 (None for no cut-down).
    cutdown: float | None
    #: Candidates with a posterior above ``1 - false_margin`` are flagged as probable false
    #: negatives.
    false_margin: float


class RetrievalLoss(nn.Module):
    """Base class of every loss the module trains with: the contract above, as methods.

    A subclass implements :meth:`forward` and, when it needs them, sets
    :attr:`requires_momentum` and overrides the hooks below. Two attributes are the module's to
    fill before training: ``generator`` (:meth:`set_generator`) and ``positives``, a
    :class:`~fne_lightning.fne.positives.PositiveIndex` of the training split's truly matching
    (image, caption) pairs (empty when the data declares none).
    """

    #: The module builds momentum (EMA) encoders and passes ``momentum_image_features`` /
    #: ``momentum_text_features`` (B, D) to ``forward``. A class attribute, or set per instance in
    #: ``__init__`` when it depends on the settings (a queue of momentum features, distillation).
    requires_momentum: bool = False

    def __init__(self, warmup_epochs: int = 0, warmup_loss: str = "vse0") -> None:
        """Check and keep the warm-up settings that every loss accepts.

        Args:
            warmup_epochs: epochs at the start of training during which :meth:`forward` gets
                ``warmup=True``.
            warmup_loss: what a recipe asks for during those epochs: ``vse0`` (hinge over every
                in-batch negative, learns from random init) or ``vsepp``. Experiments set both
                keys for every loss (the synthetic recipe's 10 epochs of VSE0), so every loss
                accepts them; :class:`~fne_lightning.losses.vse.TripletLoss` implements them, a
                loss of another kind may honour them as it sees fit.

        Raises:
            FNEError: a value out of range, naming ``loss.warmup_epochs`` or ``loss.warmup_loss``.
        """
        super().__init__()
        check(isinstance(warmup_epochs, int) and warmup_epochs >= 0, "loss.warmup_epochs", "an integer >= 0",
              warmup_epochs)
        check(warmup_loss in WARMUP_LOSSES, "loss.warmup_loss", " or ".join(WARMUP_LOSSES), warmup_loss)
        self.warmup_epochs, self.warmup_loss = warmup_epochs, warmup_loss
        # Truly matching (image, caption) pairs of the training split, when the data declares them.
        self.positives = PositiveIndex()
        self.generator: torch.Generator | None = None
        #: Training progress in epochs (``epoch + batches done / batches per epoch``), from
        #: :meth:`set_progress`; 0 before training.
        self.progress = 0.0

    def bind(self, encoder: nn.Module) -> None:
        """Hook: the module was built around ``encoder`` (the online dual encoder).

        A loss that trains a parameter of the model takes it here (InfoNCE and SigLIP use the
        open_clip model's ``logit_scale``/``logit_bias`` when it has them). The default does
        nothing.

        Args:
            encoder: the :class:`~fne_lightning.models.encoders.DualEncoder`; its open_clip model is
                ``encoder.model``.
        """

    def check_setup(self) -> None:
        """Hook: before training, once :attr:`positives` and the generator are set.

        Raise :class:`~fne_lightning.errors.FNEError` naming the key for what the loss cannot train
        with (an oracle on data that declares no positives). The default accepts everything.
        """

    def set_progress(self, epochs: float) -> None:
        """Take the training progress before a step (a ramp or schedule inside the loss reads it).

        Args:
            epochs: ``current_epoch + batches trained in it / batches per epoch``.
        """
        self.progress = epochs

    def set_generator(self, generator: torch.Generator) -> None:
        """Take the generator to draw random choices from (e.g. the negatives FNE samples).

        Args:
            generator: this rank's generator, on the training device; the module seeds it from
                ``seed + rank`` and saves its state in checkpoints.
        """
        self.generator = generator

    def on_train_epoch_start(self) -> None:
        """Hook: a new training epoch begins (not called when a run resumes inside an epoch).

        FNE restarts its Gaussian fit here (``reset_stats_every_epoch``); the default does nothing.
        """

    def momentum_horizon(self, global_batch_size: int) -> int | None:
        """How many of the last warm-up steps need the momentum features (e.g. to fill a bank).

        The module skips the momentum forward on earlier warm-up steps and passes ``None`` for
        the momentum features there (their EMA update still runs every step). Only asked of
        losses that set :attr:`requires_momentum`.

        Args:
            global_batch_size: pairs per optimizer step over all processes.

        Returns:
            The number of warm-up steps, or None (the default) when every step needs them.
        """
        return None

    def posterior_view(self) -> PosteriorView | None:
        """Describe the fitted false-negative model for the similarity figure.

        Returns:
            The model's Gaussians and thresholds, or None (the default) for a loss without one.
        """
        return None

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                momentum_image_features: Tensor | None = None, momentum_text_features: Tensor | None = None,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one training batch of B (image, caption) pairs.

        Args:
            image_features: (B, D) online image features, unit norm; row i belongs to pair i.
            text_features: (B, D) online caption features, unit norm.
            image_ids: (B,) long: the image index of each pair (captions of one image share it).
            text_ids: (B,) long: the caption index of each pair.
            momentum_image_features: (B, D) the momentum encoders' image features of the same
                batch, for losses that set :attr:`requires_momentum`; None for other losses and on
                the warm-up steps that :meth:`momentum_horizon` leaves out.
            momentum_text_features: (B, D) the same for the captions.
            warmup: True during the first ``warmup_epochs`` epochs.

        Returns:
            ``(loss, diagnostics)``: the scalar loss, and detached scalar tensors that the module
            logs as ``fne/<name>``.
        """
        raise NotImplementedError
