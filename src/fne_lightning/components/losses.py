"""Triplet losses for image-text matching: VSE0, VSE++ and FNE (FNE_SPEC section 7).

* VSE0: hinge summed over all in-batch negatives (learns from random init).
* VSE++ (Faghri et al., 2018): hinge on the hardest in-batch negative (max violation).
* FNE (Li et al., ACM MM 2023, arXiv 2308.04380): one negative per anchor sampled from the
  batch's momentum features plus a memory bank, with weights that fall for probable false
  negatives (``sampling.py``) and a Gaussian fit of positive/negative similarities
  (``stats.py``). Gradients flow through the anchors only.

Captions of the same image are never negatives in any of them. Every loss returns
``(loss, diagnostics)``; diagnostics are detached scalars logged under ``fne/``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fne_lightning.components.bank import MemoryBank
from fne_lightning.components.distributed import gather_no_grad, gather_with_local_grad
from fne_lightning.components.positives import PositiveIndex
from fne_lightning.components.sampling import fne_weights, hardest_negatives, sample_negatives
from fne_lightning.components.stats import SimilarityStats
from fne_lightning.errors import check

WARMUP_LOSSES = ("vsepp", "vse0")


def _rate(hits: Tensor, mask: Tensor) -> Tensor:
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


class VSELoss(nn.Module):
    """VSE++ (``max_violation=True``) or VSE0, optionally after ``warmup_epochs`` of another VSE.

    The usual recipe from random init is ``warmup_loss=vse0`` for a few epochs (hardest
    negatives collapse an untrained model, FNE_SPEC section 12), then VSE++.
    """

    requires_momentum = False

    def __init__(self, margin: float = 0.2, max_violation: bool = True, warmup_epochs: int = 0,
                 warmup_loss: str = "vse0", gather_batch: bool = False, embed_dim: int | None = None) -> None:
        super().__init__()
        check(margin >= 0, "loss.margin", "a value >= 0", margin)
        check(warmup_epochs >= 0, "loss.warmup_epochs", "an integer >= 0", warmup_epochs)
        check(warmup_loss in WARMUP_LOSSES, "loss.warmup_loss", " or ".join(WARMUP_LOSSES), warmup_loss)
        self.margin = margin
        self.kind = "vsepp" if max_violation else "vse0"
        self.warmup_epochs = warmup_epochs
        self.warmup_loss = warmup_loss
        self.gather_batch = gather_batch
        self.positives = PositiveIndex()

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                warmup: bool = False, **_: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return in_batch_loss(self, image_features, text_features, image_ids, text_ids,
                             self.warmup_loss if warmup else self.kind)


def in_batch_loss(owner: VSELoss | FNELoss, image_features: Tensor, text_features: Tensor,
                  image_ids: Tensor, text_ids: Tensor, kind: str) -> tuple[Tensor, dict[str, Tensor]]:
    """VSE loss over the (optionally gathered) in-batch online features, with FN diagnostics.

    Similarities in fp32 whatever the autocast setting, as in :class:`FNELoss`: a VSE++ baseline
    run in bf16-mixed scores its negatives like FNE's warm-up does.
    """
    with torch.autocast(image_features.device.type, enabled=False):
        v, t = image_features.float(), text_features.float()
        cand_v, cand_t, cand_image_ids, cand_text_ids = v, t, image_ids, text_ids
        if owner.gather_batch:
            # Other ranks' rows are constants, the local rows keep their gradient (open_clip's ClipLoss).
            cand_v, cand_t = gather_with_local_grad(v), gather_with_local_grad(t)
            cand_image_ids, cand_text_ids = gather_no_grad(image_ids), gather_no_grad(text_ids)
        same_image = image_ids[:, None] == cand_image_ids[None, :]  # (B, M)
        out = vse_loss(v, t, same_image, owner.margin, kind, candidate_images=cand_v, candidate_texts=cand_t)
        diagnostics: dict[str, Tensor] = {}
        if owner.positives.available:
            with torch.no_grad():
                fn_i2t = owner.positives.contains(image_ids, cand_text_ids[out.i2t_negative])
                fn_t2i = owner.positives.contains(cand_image_ids[out.t2i_negative], text_ids)
                rate = (_rate(fn_i2t, out.i2t_has) + _rate(fn_t2i, out.t2i_has)) / 2
                # Negatives of VSE losses are the hardest ones: both rates are the same number.
                diagnostics["sampled_fn_rate"] = rate
                diagnostics["hardest_fn_rate"] = rate
        return out.loss, diagnostics


def candidate_rows(batch_candidates: Tensor, bank_candidates: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` (B,) of ``cat([batch (Bc, D), bank (K, D)])`` without building the concatenation."""
    n = batch_candidates.shape[0]
    rows = batch_candidates[index.clamp(max=n - 1)]  # (B, D)
    if bank_candidates.shape[0]:
        rows = torch.where((index < n)[:, None], rows, bank_candidates[(index - n).clamp(min=0)])
    return rows


class _Direction(NamedTuple):
    loss: Tensor
    diagnostics: dict[str, Tensor]


class FNELoss(nn.Module):
    """False Negative Elimination (FNE_SPEC sections 2-7) with its ablation switches.

    Holds the memory bank and the similarity statistics as buffers (checkpointed with the
    model). The momentum encoders live in the LightningModule, which passes their features.
    Each call updates the statistics (before selection) and enqueues the step's global
    momentum batch into the bank (after the loss).

    Args (all ``loss.<name>`` in the config):
        embed_dim: feature dimension D (filled in from the encoder).
        memory_size: bank slots K; 0 = in-batch candidates only.
        momentum: EMA momentum m of the momentum encoders.
        selection: ``sample`` (FNE) or ``hardest`` (VSE++ over batch + bank candidates).
        weighting: ``reference`` (published) or ``complement`` (``(1 - p_fn) * hardness``).
        posterior: use the false-negative posterior (False = hardness weights only).
        cutdown: drop candidates scoring <= mu+ - cutdown (None = no cut-down).
        warmup_epochs / warmup_loss: epochs of in-batch VSE before FNE starts.
        reset_stats_every_epoch: restart the Gaussian fit at each epoch (published behaviour).
        gather_batch: under DDP, in-batch candidates include the other ranks' batch items.
    """

    requires_momentum = True

    def __init__(self, embed_dim: int, margin: float = 0.2, memory_size: int = 8224, momentum: float = 0.995,
                 tau: float = 0.5, match_prior: float = 1e-4, false_margin: float = 0.999,
                 min_pos_samples: int = 200, cutdown: float | None = 0.2, weighting: str = "reference",
                 posterior: bool = True, selection: str = "sample", warmup_epochs: int = 1,
                 warmup_loss: str = "vsepp", reset_stats_every_epoch: bool = True,
                 gather_batch: bool = False) -> None:
        super().__init__()
        check(margin >= 0, "loss.margin", "a value >= 0", margin)
        check(memory_size >= 0, "loss.memory_size", "an integer >= 0", memory_size)
        check(0.0 <= momentum <= 1.0, "loss.momentum", "a value in [0, 1]", momentum)
        check(tau > 0, "loss.tau", "a value > 0", tau)
        check(0.0 < match_prior < 1.0, "loss.match_prior", "a value in (0, 1)", match_prior)
        check(0.0 < false_margin <= 1.0, "loss.false_margin", "a value in (0, 1]", false_margin)
        check(min_pos_samples >= 1, "loss.min_pos_samples", "an integer >= 1", min_pos_samples)
        check(cutdown is None or cutdown >= 0, "loss.cutdown", "null or a value >= 0", cutdown)
        check(weighting in ("reference", "complement"), "loss.weighting", "reference or complement", weighting)
        check(selection in ("sample", "hardest"), "loss.selection", "sample or hardest", selection)
        check(warmup_epochs >= 0, "loss.warmup_epochs", "an integer >= 0", warmup_epochs)
        check(warmup_loss in WARMUP_LOSSES, "loss.warmup_loss", " or ".join(WARMUP_LOSSES), warmup_loss)
        self.margin, self.momentum, self.tau = margin, momentum, tau
        self.match_prior, self.false_margin, self.cutdown = match_prior, false_margin, cutdown
        self.weighting, self.posterior, self.selection = weighting, posterior, selection
        self.warmup_epochs, self.warmup_loss = warmup_epochs, warmup_loss
        self.reset_stats_every_epoch, self.gather_batch = reset_stats_every_epoch, gather_batch
        self.bank = MemoryBank(memory_size, embed_dim)
        self.stats = SimilarityStats(min_pos_samples)
        self.positives = PositiveIndex()
        self.generator: torch.Generator | None = None

    # ---------------------------------------------------------------- the step
    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                momentum_image_features: Tensor, momentum_text_features: Tensor,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one batch of B pairs; features (B, D) unit norm, ids (B,) long.

        Similarities, statistics and sampling run in fp32 whatever the autocast setting.
        """
        with torch.autocast(image_features.device.type, enabled=False):
            v, t = image_features.float(), text_features.float()
            mv, mt = momentum_image_features.float().detach(), momentum_text_features.float().detach()
            with torch.no_grad():
                same = image_ids[:, None] == image_ids[None, :]  # (B, B)
                self.stats.update(v.detach() @ t.detach().T, same)
            if warmup:
                loss, diagnostics = in_batch_loss(self, v, t, image_ids, text_ids, self.warmup_loss)
            else:
                loss, diagnostics = self._fne(v, t, mv, mt, image_ids, text_ids)
            diagnostics.update(self._stat_diagnostics())
            # After the loss: the global momentum batch enters the bank for the next steps
            # (filled during warm-up too). Nothing of the bank is saved for backward.
            self.bank.enqueue(gather_no_grad(mv), gather_no_grad(mt),
                              gather_no_grad(image_ids), gather_no_grad(text_ids))
        return loss, diagnostics

    def _fne(self, v: Tensor, t: Tensor, mv: Tensor, mt: Tensor, image_ids: Tensor,
             text_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        batch_mv, batch_mt, batch_img_ids, batch_txt_ids = mv, mt, image_ids, text_ids
        if self.gather_batch:
            batch_mv, batch_mt = gather_no_grad(mv), gather_no_grad(mt)
            batch_img_ids, batch_txt_ids = gather_no_grad(image_ids), gather_no_grad(text_ids)
        bank, valid_slots = self.bank, self.bank.valid_mask()
        batch_valid = torch.ones_like(batch_img_ids, dtype=torch.bool)
        cand_valid = torch.cat([batch_valid, valid_slots])  # (Bc + K,)
        cand_image_ids = torch.cat([batch_img_ids, bank.image_ids])  # (Bc + K,)
        cand_text_ids = torch.cat([batch_txt_ids, bank.text_ids])
        i2t = self._direction(v, (v * mt).sum(-1), batch_mt, bank.text_features, image_ids, cand_image_ids,
                              cand_valid, lambda idx: self.positives.contains(image_ids, cand_text_ids[idx]))
        t2i = self._direction(t, (t * mv).sum(-1), batch_mv, bank.image_features, image_ids, cand_image_ids,
                              cand_valid, lambda idx: self.positives.contains(cand_image_ids[idx], text_ids))
        diagnostics = {k: (i2t.diagnostics[k] + t2i.diagnostics[k]) / 2 for k in i2t.diagnostics}
        return i2t.loss + t2i.loss, diagnostics

    def _direction(self, anchors: Tensor, positive_scores: Tensor, batch_candidates: Tensor,
                   bank_candidates: Tensor, anchor_image_ids: Tensor, cand_image_ids: Tensor,
                   cand_valid: Tensor, truly_matches) -> _Direction:
        """One direction: anchors (B, D) vs momentum batch (Bc, D) + bank (K, D) candidates."""
        with torch.no_grad():
            # Selection needs no gradient: score all candidates once without autograd, then
            # recompute only the B chosen scores with gradient (no backward through (B, Bc + K)).
            a = anchors.detach()
            s = torch.cat([a @ batch_candidates.T, a @ bank_candidates.T], 1)  # (B, Bc + K)
            # Candidates of the anchor's own image are positives, never negatives.
            valid = cand_valid[None, :] & (cand_image_ids[None, :] != anchor_image_ids[:, None])  # (B, Bc + K)
            hard_idx, hard_has = hardest_negatives(s, valid)
            if self.selection == "hardest":
                idx, has = hard_idx, hard_has
                flagged = cut = None
            else:
                w = fne_weights(s, positive_scores.detach(), valid, self.stats.snapshot(), tau=self.tau,
                                match_prior=self.match_prior, false_margin=self.false_margin,
                                weighting=self.weighting, cutdown=self.cutdown, posterior=self.posterior)
                idx, has = sample_negatives(w.weights, s, valid, generator=self.generator,
                                            hardest=(hard_idx, hard_has))
                flagged, cut = w.flagged, w.cut
            negatives = candidate_rows(batch_candidates, bank_candidates, idx)  # (B, D)
        negative_scores = (anchors * negatives).sum(-1)  # (B,), gradient to the anchors only
        loss = triplet_hinge(negative_scores, positive_scores, self.margin, has)
        with torch.no_grad():
            n_valid = valid.sum().clamp(min=1)
            zero = n_valid.new_zeros((), dtype=torch.float32)
            diagnostics = {
                "flagged_rate": zero if flagged is None else flagged.sum() / n_valid,
                "cutdown_rate": zero if cut is None else cut.sum() / n_valid,
                "sampled_sim": (negative_scores.detach() * has).sum() / has.sum().clamp(min=1),
                "hardest_sim": (s.gather(1, hard_idx[:, None]).squeeze(1) * hard_has).sum()
                / hard_has.sum().clamp(min=1),
            }
            if self.positives.available:
                diagnostics["sampled_fn_rate"] = _rate(truly_matches(idx), has)
                diagnostics["hardest_fn_rate"] = _rate(truly_matches(hard_idx), hard_has)
        return _Direction(loss, diagnostics)

    def _stat_diagnostics(self) -> dict[str, Tensor]:
        pos_mean, pos_var, neg_mean, neg_var = self.stats.gaussians()
        return {
            "pos_mean": pos_mean, "pos_std": pos_var.clamp(min=0).sqrt(),
            "neg_mean": neg_mean, "neg_std": neg_var.clamp(min=0).sqrt(),
            "ready": self.stats.ready.float(),
        }
