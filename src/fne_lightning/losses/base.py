"""The contract between :class:`~fne_lightning.module.RetrievalModule` and a loss.

A loss is one subclass of :class:`RetrievalLoss` and one YAML file in ``conf/loss/`` whose
``_target_`` names it; ``module.py`` needs no edit (README, "Adding a loss"). What passes
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
    """What the similarity figure shows of a loss's false-negative model (host floats)."""

    gaussians: tuple[float, float, float, float]  # pos_mean, pos_var, neg_mean, neg_var
    ready: bool
    pos_count: int
    min_pos_samples: int
    match_prior: float
    cutdown: float | None
    false_margin: float


class RetrievalLoss(nn.Module):
    """Base class of every loss the module trains with (see the module docstring).

    Args:
        warmup_epochs: epochs at the start of training during which ``forward`` gets
            ``warmup=True``.
        warmup_loss: what a recipe asks for during those epochs, ``vse0`` (hinge over every
            in-batch negative, learns from random init) or ``vsepp``. Experiments set both keys
            for every loss (the synthetic recipe's 10 epochs of VSE0), so every loss accepts them;
            :class:`~fne_lightning.losses.vse.TripletLoss` implements them, a loss of another kind
            may honour them as it sees fit.
    """

    #: The module builds momentum (EMA) encoders and passes ``momentum_image_features`` /
    #: ``momentum_text_features`` (B, D) to ``forward``.
    requires_momentum: ClassVar[bool] = False

    def __init__(self, warmup_epochs: int = 0, warmup_loss: str = "vse0") -> None:
        super().__init__()
        check(isinstance(warmup_epochs, int) and warmup_epochs >= 0, "loss.warmup_epochs", "an integer >= 0",
              warmup_epochs)
        check(warmup_loss in WARMUP_LOSSES, "loss.warmup_loss", " or ".join(WARMUP_LOSSES), warmup_loss)
        self.warmup_epochs, self.warmup_loss = warmup_epochs, warmup_loss
        # Truly matching (image, caption) pairs of the training split, when the data declares them.
        self.positives = PositiveIndex()
        self.generator: torch.Generator | None = None

    def set_generator(self, generator: torch.Generator) -> None:
        """The per-rank generator for random choices (seeded and checkpointed by the module)."""
        self.generator = generator

    def on_train_epoch_start(self) -> None:
        """A new training epoch begins (not called when a run resumes inside an epoch)."""

    def momentum_horizon(self, global_batch_size: int) -> int | None:
        """How many of the last warm-up steps need the momentum features (e.g. to fill a bank).

        The module skips the momentum forward on earlier warm-up steps and passes ``None`` for
        the momentum features there (their EMA update still runs every step). ``None``: every
        step needs them. Only asked of losses that ``requires_momentum``.
        """
        return None

    def posterior_view(self) -> PosteriorView | None:
        """The fitted false-negative model for figures, or None for losses without one."""
        return None

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                momentum_image_features: Tensor | None = None, momentum_text_features: Tensor | None = None,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one batch of B pairs: features (B, D) unit norm, ids (B,) long."""
        raise NotImplementedError
