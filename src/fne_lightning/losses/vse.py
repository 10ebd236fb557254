"""Triplet losses over in-batch negatives: VSE0 and VSE++ (FNE_SPEC section 7).

* VSE0: hinge summed over all in-batch negatives (learns from random init).
* VSE++ (Faghri et al., 2018): hinge on the hardest in-batch negative (max violation).

Captions of the same image are never negatives. :class:`TripletLoss` holds what VSE and FNE
share (margin, warm-up loss, DDP candidate gathering, in-batch VSE with its false-negative
diagnostics), so FNE's warm-up is exactly this module's VSE.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fne_lightning.errors import FNEError, check, number
from fne_lightning.fne.positives import PositiveIndex
from fne_lightning.losses.base import RetrievalLoss
from fne_lightning.utils.distributed import gather_no_grad, gather_with_local_grad


def fn_rate(hits: Tensor, mask: Tensor) -> Tensor:
    """Share of the ``mask`` entries that are also ``hits`` (e.g. a false-negative rate).

    Args:
        hits: bool tensor.
        mask: bool tensor of the same shape: the entries that count.

    Returns:
        A 0-d float tensor, 0 when the mask is empty (no host sync).
    """
    return (hits & mask).sum() / mask.sum().clamp(min=1)


def triplet_hinge(negative_scores: Tensor, positive_scores: Tensor, margin: float,
                  has_negative: Tensor | None = None) -> Tensor:
    """Triplet hinge ``mean_i [margin + s_neg(i) - s_pos(i)]_+`` over B anchors.

    Args:
        negative_scores: (B,) the score of each anchor's negative.
        positive_scores: (B,) the score of each anchor's positive pair.
        margin: the triplet margin.
        has_negative: (B,) bool, or None: anchors without a negative add 0 (and still count in
            the mean).

    Returns:
        The 0-d loss.
    """
    cost = (margin + negative_scores - positive_scores).clamp(min=0)  # (B,)
    if has_negative is not None:
        cost = cost * has_negative
    return cost.mean()


class VSEOutput(NamedTuple):
    """What :func:`vse_loss` returns: the loss and each anchor's hardest negative."""

    #: The 0-d loss, image-to-text plus text-to-image.
    loss: Tensor
    #: (B,) candidate index of each image anchor's hardest negative caption.
    i2t_negative: Tensor
    #: (B,) candidate index of each caption anchor's hardest negative image.
    t2i_negative: Tensor
    #: (B,) bool, whether the image anchor has at least one negative.
    i2t_has: Tensor
    #: (B,) bool, whether the caption anchor has at least one negative.
    t2i_has: Tensor


def _vse_direction(anchors: Tensor, candidates: Tensor, positive: Tensor, same_image: Tensor, margin: float,
                   kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge over the negatives of each anchor: anchors (B, D), candidates (M, D), same_image (B, M)."""
    masked = (anchors @ candidates.T).masked_fill(same_image, float("-inf"))  # (B, M)
    cost = (margin + masked - positive[:, None]).clamp(min=0)  # (B, M), 0 on same-image entries
    loss = (cost.amax(1) if kind == "vsepp" else cost.sum(1)).mean()
    return loss, masked.argmax(1), (~same_image).any(1)


def vse_loss(image_features: Tensor, text_features: Tensor, same_image: Tensor, margin: float,
             kind: str = "vsepp", candidate_images: Tensor | None = None,
             candidate_texts: Tensor | None = None, exclude_i2t: Tensor | None = None,
             exclude_t2i: Tensor | None = None) -> VSEOutput:
    """VSE++ (max violation) or VSE0 (sum) over in-batch negatives, in both directions.

    Args:
        image_features: (B, D) image anchors; row i of both feature tensors is pair i.
        text_features: (B, D) caption anchors.
        same_image: (B, M) bool, True where candidate j shows or describes anchor i's image:
            never a negative (the pair itself included).
        margin: the triplet margin.
        kind: ``"vsepp"`` (hinge on the hardest negative) or ``"vse0"`` (hinge summed over all
            negatives).
        candidate_images: (M, D) the image candidates of the caption anchors; default the batch
            itself. Under ``gather_batch``, the global batch, whose local rows carry the gradient.
        candidate_texts: (M, D) the caption candidates of the image anchors; default the batch.
        exclude_i2t: (B, M) bool or None: further captions that are never image anchor i's
            negatives (the oracle's true matches).
        exclude_t2i: (B, M) bool or None: further images that are never caption anchor i's
            negatives.

    Returns:
        The loss (image-to-text plus text-to-image) and each anchor's hardest negative.
    """
    cand_t = text_features if candidate_texts is None else candidate_texts
    cand_v = image_features if candidate_images is None else candidate_images
    positive = (image_features * text_features).sum(-1)  # (B,)
    not_i2t = same_image if exclude_i2t is None else same_image | exclude_i2t
    not_t2i = same_image if exclude_t2i is None else same_image | exclude_t2i
    i2t_loss, i2t_neg, i2t_has = _vse_direction(image_features, cand_t, positive, not_i2t, margin, kind)
    t2i_loss, t2i_neg, t2i_has = _vse_direction(text_features, cand_v, positive, not_t2i, margin, kind)
    return VSEOutput(i2t_loss + t2i_loss, i2t_neg, t2i_neg, i2t_has, t2i_has)


class Candidates(NamedTuple):
    """In-batch candidates: this rank's batch, or under ``gather_batch`` the global one (M rows)."""

    image_features: Tensor  #: (M, D)
    text_features: Tensor  #: (M, D)
    image_ids: Tensor  #: (M,)
    text_ids: Tensor  #: (M,)


def batch_candidates(image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                     gather: bool) -> Candidates:
    """The batch as in-batch candidates; with ``gather``, every rank's batch in rank order.

    Gathered features keep the gradient of the local rows only, the other ranks' rows being
    constants (open_clip's ClipLoss); features without a gradient (momentum ones) stay without.

    Args:
        image_features: (B, D) this rank's image features.
        text_features: (B, D) this rank's caption features.
        image_ids: (B,) their image indices.
        text_ids: (B,) their caption indices.
        gather: gather over all ranks (M = world size x B); False: M = B, the inputs as they are.
    """
    if not gather:
        return Candidates(image_features, text_features, image_ids, text_ids)
    return Candidates(gather_with_local_grad(image_features), gather_with_local_grad(text_features),
                      gather_no_grad(image_ids), gather_no_grad(text_ids))


def in_batch_vse(image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor, kind: str,
                 margin: float, positives: PositiveIndex, gather: bool = False,
                 oracle: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """VSE over the (optionally gathered) in-batch online features, with its false-negative diagnostics.

    Similarities in fp32 whatever the autocast setting, as in FNE: a VSE++ baseline run in
    bf16-mixed scores its negatives like FNE's warm-up does. The triplet losses train with it,
    and every loss runs it for a recipe's warm-up epochs.

    Args:
        image_features: (B, D) online image features, unit norm.
        text_features: (B, D) online caption features, unit norm.
        image_ids: (B,) image indices.
        text_ids: (B,) caption indices.
        kind: ``"vsepp"`` or ``"vse0"``.
        margin: the triplet margin.
        positives: the training split's truly matching pairs (for the diagnostics and the oracle).
        gather: under DDP, the candidates are every rank's batch (local rows keep the gradient).
        oracle: a true match (``positives``) is never a negative; needs declared positives.

    Returns:
        ``(loss, diagnostics)``; with known positives the diagnostics hold ``hardest_fn_rate``
        and ``sampled_fn_rate`` (the share of the hardest, and of the used, negatives that truly
        match their anchor).
    """
    with torch.autocast(image_features.device.type, enabled=False):
        v, t = image_features.float(), text_features.float()
        cand = batch_candidates(v, t, image_ids, text_ids, gather)
        same_image = image_ids[:, None] == cand.image_ids[None, :]  # (B, M)
        truth_i2t = truth_t2i = None
        if positives.available:  # which candidates truly match their anchor: (B, M) each
            truth_i2t = positives.contains(image_ids[:, None], cand.text_ids[None, :])
            truth_t2i = positives.contains(cand.image_ids[None, :], text_ids[:, None])
        out = vse_loss(v, t, same_image, margin, kind, candidate_images=cand.image_features,
                       candidate_texts=cand.text_features, exclude_i2t=truth_i2t if oracle else None,
                       exclude_t2i=truth_t2i if oracle else None)
        diagnostics: dict[str, Tensor] = {}
        if truth_i2t is not None and truth_t2i is not None:
            with torch.no_grad():
                fn_i2t = truth_i2t.gather(1, out.i2t_negative[:, None]).squeeze(1)
                fn_t2i = truth_t2i.gather(1, out.t2i_negative[:, None]).squeeze(1)
                hardest = (fn_rate(fn_i2t, out.i2t_has) + fn_rate(fn_t2i, out.t2i_has)) / 2
                diagnostics["hardest_fn_rate"] = hardest
                if kind == "vsepp":  # the negative used is the hardest one
                    diagnostics["sampled_fn_rate"] = hardest
                else:  # VSE0 uses every negative: the share of them that truly match
                    neg_i2t, neg_t2i = ~same_image, ~same_image
                    if oracle:
                        neg_i2t, neg_t2i = neg_i2t & ~truth_i2t, neg_t2i & ~truth_t2i
                    n = (torch.count_nonzero(neg_i2t) + torch.count_nonzero(neg_t2i)).clamp(min=1)
                    diagnostics["sampled_fn_rate"] = (torch.count_nonzero(truth_i2t & neg_i2t)
                                                      + torch.count_nonzero(truth_t2i & neg_t2i)) / n
    return out.loss, diagnostics


class TripletLoss(RetrievalLoss):
    """What VSE and FNE share: the margin, the warm-up loss, DDP gathering of in-batch candidates
    and the oracle."""

    def __init__(self, margin: float = 0.2, warmup_epochs: int = 0, warmup_loss: str = "vse0",
                 gather_batch: bool = False, oracle: bool = False) -> None:
        """Check and keep the shared settings (config keys ``loss.<name>``).

        Args:
            margin: the triplet margin.
            warmup_epochs: epochs of in-batch ``warmup_loss`` before the loss's own rule.
            warmup_loss: ``vse0`` or ``vsepp``.
            gather_batch: under DDP, the in-batch candidates include the other ranks' batch items.
            oracle: benchmarks only: a candidate that truly matches its anchor (the data's declared
                positives) is never chosen as a negative, which bounds what any false-negative
                rule could gain for this loss's selection. Needs data with positives.
        """
        super().__init__(warmup_epochs, warmup_loss)
        check(number(margin) and margin >= 0, "loss.margin", "a value >= 0", margin)
        check(isinstance(oracle, bool), "loss.oracle", "true or false", oracle)
        self.margin, self.gather_batch, self.oracle = margin, gather_batch, oracle

    def check_setup(self) -> None:
        """Refuse the oracle on data that declares no positives.

        Raises:
            FNEError: ``loss.oracle=true`` without positives.
        """
        check_oracle_data(self.oracle, self.positives, "loss.oracle")

    def in_batch_loss(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor,
                      text_ids: Tensor, kind: str) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`in_batch_vse` with this loss's margin, gathering, positives and oracle.

        Args:
            image_features: (B, D) online image features, unit norm.
            text_features: (B, D) online caption features, unit norm.
            image_ids: (B,) image indices.
            text_ids: (B,) caption indices.
            kind: ``"vsepp"`` or ``"vse0"``.

        Returns:
            ``(loss, diagnostics)``.
        """
        return in_batch_vse(image_features, text_features, image_ids, text_ids, kind, self.margin,
                            self.positives, self.gather_batch, self.oracle)


def check_oracle_data(enabled: bool, positives: PositiveIndex, key: str) -> None:
    """One error line when an oracle is asked for on data that declares no true matches.

    Args:
        enabled: whether the oracle is on.
        positives: the training split's declared positives.
        key: the config key that asked for it (named in the message).

    Raises:
        FNEError: the oracle is on and ``positives`` is empty.
    """
    if enabled and not positives.available:
        raise FNEError(f"{key}: the oracle needs the training data's true matches, and this data declares none "
                       "(expected a positives file: <annotations stem>.positives.json, data.positives=..., or "
                       "data.train_positives for shards; the synthetic benchmark has one)")


class VSELoss(TripletLoss):
    """VSE++ (``max_violation=True``) or VSE0, optionally after ``warmup_epochs`` of another VSE.

    ``loss=vsepp`` and ``loss=vse0`` in the config. The usual recipe from random init is
    ``warmup_loss=vse0`` for a few epochs (hardest negatives collapse an untrained model,
    FNE_SPEC section 12), then VSE++.
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True, warmup_epochs: int = 0,
                 warmup_loss: str = "vse0", gather_batch: bool = False, oracle: bool = False,
                 embed_dim: int | None = None) -> None:
        """Check and keep the settings (config keys ``loss.<name>``).

        Args:
            margin: the triplet margin.
            max_violation: True: VSE++, the hinge on the hardest in-batch negative; False: VSE0,
                the hinge summed over every in-batch negative.
            warmup_epochs: epochs of ``warmup_loss`` first.
            warmup_loss: ``vse0`` or ``vsepp``.
            gather_batch: under DDP, the in-batch candidates include the other ranks' batch items.
            oracle: a true match is never a negative (benchmarks only; needs declared positives).
            embed_dim: unused (every loss is given the feature dimension).
        """
        super().__init__(margin, warmup_epochs, warmup_loss, gather_batch, oracle)
        self.kind = "vsepp" if max_violation else "vse0"

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                momentum_image_features: Tensor | None = None, momentum_text_features: Tensor | None = None,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        return self.in_batch_loss(image_features, text_features, image_ids, text_ids,
                                  self.warmup_loss if warmup else self.kind)
