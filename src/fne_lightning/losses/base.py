"""The contract between :class:`~fne_lightning.module.RetrievalModule` and a loss.

A loss is one subclass of :class:`RetrievalLoss` and one YAML file in ``conf/loss/`` whose
``_target_`` names it; ``module.py`` needs no edit (docs: guides/adding-a-loss). What passes
between the two, and nothing else:

* an experiment may set ``loss.warmup_epochs`` and ``loss.warmup_loss`` for any loss (a recipe's
  warm-up phase): the base class takes both;
* the module gives every training step the online features (B, D) of the batch's images and
  captions, their image ids and caption ids, ``warmup`` (``current_epoch < warmup_epochs``),
  and, when the class sets ``requires_momentum``, the momentum encoders' features of the same
  batch (the module owns those encoders and their EMA);
* before training it hands the loss a per-rank random generator (:meth:`set_generator`) and the
  training split's truly matching pairs (``positives``, for false-negative diagnostics);
* at the start of every new training epoch (not at a mid-epoch resume) it calls
  :meth:`on_train_epoch_start`;
* the loss returns ``(loss, diagnostics)``: a scalar, and detached scalars that the module logs
  as ``fne/<name>``. Its state (memory bank, statistics) lives in buffers and submodules, so it is
  checkpointed, moved to the device and restored with the module;
* for the similarity figure a loss with fitted Gaussians describes them (:meth:`posterior_view`).

Every loss is built as ``instantiate(cfg.loss, embed_dim=D)``: its ``__init__`` takes
``embed_dim`` (the feature dimension) whether it uses it or not.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

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
    #: ``momentum_text_features`` (B, D) to ``forward``.
    requires_momentum: ClassVar[bool] = False

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
