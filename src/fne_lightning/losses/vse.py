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

from fne_lightning.errors import check
from fne_lightning.losses.base import RetrievalLoss
from fne_lightning.utils.distributed import gather_no_grad, gather_with_local_grad


def fn_rate(hits: Tensor, mask: Tensor) -> Tensor:
    """Share of ``mask`` entries that are ``hits`` (0 when the mask is empty), no host sync."""
    return (hits & mask).sum() / mask.sum().clamp(min=1)


def triplet_hinge(negative_scores: Tensor, positive_scores: Tensor, margin: float,
                  has_negative: Tensor | None = None) -> Tensor:
    """mean_i [margin + s_neg(i) - s_pos(i)]_+ over anchors; anchors without a negative add 0."""
    cost = (margin + negative_scores - positive_scores).clamp(min=0)  # (B,)
    if has_negative is not None:
        cost = cost * has_negative
    return cost.mean()


class VSEOutput(NamedTuple):
    loss: Tensor
    i2t_negative: Tensor  # (B,) candidate caption index of each image anchor's hardest negative
    t2i_negative: Tensor  # (B,) candidate image index of each caption anchor's hardest negative
    i2t_has: Tensor  # (B,) bool: the anchor has at least one valid negative
    t2i_has: Tensor  # (B,) bool


def _vse_direction(anchors: Tensor, candidates: Tensor, positive: Tensor, same_image: Tensor, margin: float,
                   kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge over the negatives of each anchor: anchors (B, D), candidates (M, D), same_image (B, M)."""
    masked = (anchors @ candidates.T).masked_fill(same_image, float("-inf"))  # (B, M)
    cost = (margin + masked - positive[:, None]).clamp(min=0)  # (B, M), 0 on same-image entries
    loss = (cost.amax(1) if kind == "vsepp" else cost.sum(1)).mean()
    return loss, masked.argmax(1), (~same_image).any(1)


def vse_loss(image_features: Tensor, text_features: Tensor, same_image: Tensor, margin: float,
             kind: str = "vsepp", candidate_images: Tensor | None = None,
             candidate_texts: Tensor | None = None) -> VSEOutput:
    """VSE++ (``kind="vsepp"``, max violation) or VSE0 (``"vse0"``, sum) over in-batch negatives.

    ``image_features``, ``text_features`` (B, D): the anchors, row i of both being pair i.
    Candidates default to the same batch; under ``gather_batch`` they are the global batch
    (M, D), whose local rows carry the gradient. ``same_image`` (B, M) is True where
    candidate j shows/describes anchor i's image: never a negative (the pair itself included).
    """
    cand_t = text_features if candidate_texts is None else candidate_texts
    cand_v = image_features if candidate_images is None else candidate_images
    positive = (image_features * text_features).sum(-1)  # (B,)
    i2t_loss, i2t_neg, i2t_has = _vse_direction(image_features, cand_t, positive, same_image, margin, kind)
    t2i_loss, t2i_neg, t2i_has = _vse_direction(text_features, cand_v, positive, same_image, margin, kind)
    return VSEOutput(i2t_loss + t2i_loss, i2t_neg, t2i_neg, i2t_has, t2i_has)


class Candidates(NamedTuple):
    """In-batch candidates: this rank's batch, or under ``gather_batch`` the global one (M rows)."""

    image_features: Tensor  # (M, D)
    text_features: Tensor  # (M, D)
    image_ids: Tensor  # (M,)
    text_ids: Tensor  # (M,)


def batch_candidates(image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                     gather: bool) -> Candidates:
    """The batch as candidates; with ``gather`` every rank's batch in rank order.

    Gathered features keep the gradient of the local rows only, the other ranks' rows being
    constants (open_clip's ClipLoss); features without a gradient (momentum ones) stay without.
    """
    if not gather:
        return Candidates(image_features, text_features, image_ids, text_ids)
    return Candidates(gather_with_local_grad(image_features), gather_with_local_grad(text_features),
                      gather_no_grad(image_ids), gather_no_grad(text_ids))


class TripletLoss(RetrievalLoss):
    """What VSE and FNE share: the margin, the warm-up loss and DDP gathering of in-batch candidates.

    Args (``loss.<name>``):
        margin: triplet margin.
        warmup_epochs / warmup_loss: epochs of in-batch ``vse0`` or ``vsepp`` first.
        gather_batch: under DDP, in-batch candidates include the other ranks' batch items.
    """

    def __init__(self, margin: float = 0.2, warmup_epochs: int = 0, warmup_loss: str = "vse0",
                 gather_batch: bool = False) -> None:
        super().__init__(warmup_epochs, warmup_loss)
        check(margin >= 0, "loss.margin", "a value >= 0", margin)
        self.margin, self.gather_batch = margin, gather_batch

    def in_batch_loss(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor,
                      text_ids: Tensor, kind: str) -> tuple[Tensor, dict[str, Tensor]]:
        """VSE loss over the (optionally gathered) in-batch online features, with FN diagnostics.

        Similarities in fp32 whatever the autocast setting, as in FNE: a VSE++ baseline run in
        bf16-mixed scores its negatives like FNE's warm-up does.
        """
        with torch.autocast(image_features.device.type, enabled=False):
            v, t = image_features.float(), text_features.float()
            cand = batch_candidates(v, t, image_ids, text_ids, self.gather_batch)
            same_image = image_ids[:, None] == cand.image_ids[None, :]  # (B, M)
            out = vse_loss(v, t, same_image, self.margin, kind, candidate_images=cand.image_features,
                           candidate_texts=cand.text_features)
            diagnostics: dict[str, Tensor] = {}
            if self.positives.available:
                with torch.no_grad():
                    fn_i2t = self.positives.contains(image_ids, cand.text_ids[out.i2t_negative])
                    fn_t2i = self.positives.contains(cand.image_ids[out.t2i_negative], text_ids)
                    hardest = (fn_rate(fn_i2t, out.i2t_has) + fn_rate(fn_t2i, out.t2i_has)) / 2
                    diagnostics["hardest_fn_rate"] = hardest
                    if kind == "vsepp":  # the negative used is the hardest one
                        diagnostics["sampled_fn_rate"] = hardest
                    else:  # VSE0 uses every negative: the share of them that truly match
                        negative = ~same_image  # (B, M)
                        truth_i2t = self.positives.contains(image_ids[:, None], cand.text_ids[None, :])
                        truth_t2i = self.positives.contains(cand.image_ids[None, :], text_ids[:, None])
                        n = torch.count_nonzero(negative).clamp(min=1)
                        diagnostics["sampled_fn_rate"] = (torch.count_nonzero(truth_i2t & negative)
                                                          + torch.count_nonzero(truth_t2i & negative)) / (2 * n)
        return out.loss, diagnostics


class VSELoss(TripletLoss):
    """VSE++ (``max_violation=True``) or VSE0, optionally after ``warmup_epochs`` of another VSE.

    The usual recipe from random init is ``warmup_loss=vse0`` for a few epochs (hardest
    negatives collapse an untrained model, FNE_SPEC section 12), then VSE++.
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True, warmup_epochs: int = 0,
                 warmup_loss: str = "vse0", gather_batch: bool = False, embed_dim: int | None = None) -> None:
        super().__init__(margin, warmup_epochs, warmup_loss, gather_batch)
        self.kind = "vsepp" if max_violation else "vse0"

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                momentum_image_features: Tensor | None = None, momentum_text_features: Tensor | None = None,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        return self.in_batch_loss(image_features, text_features, image_ids, text_ids,
                                  self.warmup_loss if warmup else self.kind)
