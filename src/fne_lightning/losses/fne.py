"""False Negative Elimination (Li et al., ACM MM 2023, arXiv 2308.04380; FNE_SPEC sections 2-7).

One negative per anchor is drawn from the batch's momentum features plus a memory bank, with
weights that fall for probable false negatives (:mod:`fne_lightning.fne.negatives`) under a
Gaussian fit of positive/negative similarities (:mod:`fne_lightning.fne.stats`). Gradients flow
through the anchors only (unless ``online_batch``). During the warm-up epochs the loss is the
in-batch VSE of :class:`~fne_lightning.losses.vse.TripletLoss`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fne_lightning.errors import check, number
from fne_lightning.fne.bank import MemoryBank
from fne_lightning.fne.diagnostics import binned_auc
from fne_lightning.fne.negatives import posterior_coefficients, posterior_log_odds, select_negatives
from fne_lightning.fne.prior import PRIORS, candidate_mixture_sums, mixture_gaussians, mixture_step
from fne_lightning.fne.stats import Gaussians, SimilarityStats
from fne_lightning.losses.base import PosteriorView
from fne_lightning.losses.vse import TripletLoss, batch_candidates, fn_rate, triplet_hinge
from fne_lightning.utils.distributed import all_reduce_sum, gather_no_grad, gather_with_local_grad, world_size

# What the memory bank holds: the momentum encoders' features (MoCo, the paper) or the detached
# online ones (XBM), which needs no momentum encoder.
QUEUE_FEATURES = ("momentum", "online")


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
    mixture_sums: Tensor  # (6,) EM sums over valid candidates for prior=estimated (zeros when unused)


class FNELoss(TripletLoss):
    """False Negative Elimination (FNE_SPEC sections 2-7) with its ablation switches: ``loss=fne``.

    Each anchor's candidates are the momentum features of the batch followed by the valid slots
    of a memory bank; one negative per anchor is drawn with weights that fall for hard
    candidates that are probably false negatives, under a Gaussian fit of matched and unmatched
    similarities. Each call updates the statistics (before the selection) and enqueues the step's
    global momentum batch into the bank (after the loss). The bank and the statistics are
    buffers and submodules, so they are checkpointed with the model. The momentum encoders
    belong to the LightningModule, which owns their EMA (config key ``momentum``) and passes
    their features.
    """

    requires_momentum = True

    def __init__(self, embed_dim: int, margin: float = 0.2, memory_size: int = 8224, tau: float = 0.5,
                 match_prior: float = 1e-4, false_margin: float = 0.999, min_pos_samples: int = 200,
                 cutdown: float | None = 0.2, weighting: str = "reference", posterior: bool = True,
                 selection: str = "sample", warmup_epochs: int = 1, warmup_loss: str = "vsepp",
                 reset_stats_every_epoch: bool = True, gather_batch: bool = False, prior: str = "fixed",
                 exclude: float | None = None, online_batch: bool = False, oracle: bool = False,
                 queue_features: str = "momentum") -> None:
        """Check the settings (config keys ``loss.<name>``) and create the bank and statistics.

        The defaults are the published ones; ``prior``, ``exclude`` and ``online_batch`` go
        beyond the paper (what each measured: docs: results/synthetic-fn, "Beyond the published
        rule").

        Args:
            embed_dim: the feature dimension D (filled in from the encoder).
            margin: the triplet margin.
            memory_size: bank slots K; 0: in-batch candidates only.
            tau: hardness temperature: a candidate's weight is ``exp(-tau (s - s+)^2)``, s its
                score and s+ the anchor's positive score.
            match_prior: prior probability that a candidate matches its anchor, in the
                false-negative posterior.
            false_margin: a candidate is a probable false negative when its posterior
                ``p_fn > 1 - false_margin``.
            min_pos_samples: positive samples seen before the Gaussians are used.
            cutdown: candidates scoring at or below ``mu+ - cutdown`` (mu+ the running mean of
                the positives) get weight 0; None: no cut-down.
            weighting: ``reference`` (published: probable false negatives get weight
                ``exp(-tau p_fn)``) or ``complement`` (every weight times ``1 - p_fn``).
            posterior: use the false-negative posterior; False: hardness weights only.
            selection: ``sample`` (FNE: one weighted draw per anchor) or ``hardest`` (VSE++ over
                the same batch and bank candidates).
            warmup_epochs: epochs of in-batch VSE before FNE starts (the bank fills meanwhile).
            warmup_loss: ``vsepp`` or ``vse0``.
            reset_stats_every_epoch: restart the Gaussian fit at each epoch (published behaviour).
            gather_batch: under DDP, the in-batch candidates include the other ranks' batch items.
            prior: ``fixed`` (``match_prior``, published) or ``estimated``: the candidates' scores
                are modelled as a two-component Gaussian mixture, matches (weight ``prior``) and
                non-matches, and all five parameters are fitted on the candidates themselves by
                one EM step per training step (responsibilities p_fn under the current
                estimates), starting from ``match_prior`` and the published Gaussians. The
                published Gaussians are fitted on confidently matched in-batch pairs and their
                hardest negatives, not on the candidates the posterior is applied to (FNE_SPEC
                section 11): false negatives score lower than confident pairs, and most
                candidates far lower than hardest negatives. The estimates are the buffers
                ``prior_estimate`` and ``mixture`` (pos_mean, pos_var, neg_mean, neg_var; all 0:
                not yet fitted), kept across epochs.
            exclude: None (published), or a probability: candidates with ``p_fn > exclude`` are
                removed (weight 0) instead of down-weighted, and an anchor whose every remaining
                candidate is cut or removed falls back to its hardest candidate that is not
                removed.
            online_batch: the in-batch candidates are the ONLINE features of the batch (gradient
                to the negative as well as to the anchor, as in VSE++) and the positive score is
                the online pair's; bank candidates stay momentum features (gradient to the anchor
                only).
            oracle: benchmarks only: a candidate that truly matches its anchor (the data's declared
                positives) is never chosen, in the warm-up nor after: the bound of what any
                false-negative rule could gain for this selection. Needs data with positives.
            queue_features: ``momentum`` (published: the bank holds the momentum encoders'
                features) or ``online``: the bank holds the detached online features (XBM, Wang et
                al., CVPR 2020), the in-batch candidates are the online features (as
                ``online_batch``) and no momentum encoder is built or stepped.

        Raises:
            FNEError: a value out of range, naming its ``loss.<name>`` key.
        """
        super().__init__(margin, warmup_epochs, warmup_loss, gather_batch, oracle)
        check(queue_features in QUEUE_FEATURES, "loss.queue_features", " or ".join(QUEUE_FEATURES), queue_features)
        self.queue_features = queue_features
        self.requires_momentum = queue_features == "momentum"
        check(isinstance(memory_size, int) and not isinstance(memory_size, bool) and memory_size >= 0, "loss.memory_size", "an integer >= 0", memory_size)
        check(number(tau) and tau > 0, "loss.tau", "a value > 0", tau)
        check(number(match_prior) and 0.0 < match_prior < 1.0, "loss.match_prior", "a value in (0, 1)", match_prior)
        check(number(false_margin) and 0.0 < false_margin <= 1.0, "loss.false_margin", "a value in (0, 1]", false_margin)
        check(isinstance(min_pos_samples, int) and min_pos_samples >= 1, "loss.min_pos_samples", "an integer >= 1", min_pos_samples)
        check(cutdown is None or (number(cutdown) and cutdown >= 0), "loss.cutdown", "null or a value >= 0", cutdown)
        check(weighting in ("reference", "complement"), "loss.weighting", "reference or complement", weighting)
        check(selection in ("sample", "hardest"), "loss.selection", "sample or hardest", selection)
        check(prior in PRIORS, "loss.prior", " or ".join(PRIORS), prior)
        check(exclude is None or (number(exclude) and 0.0 <= exclude < 1.0), "loss.exclude", "null or a value in [0, 1)", exclude)
        check(isinstance(online_batch, bool), "loss.online_batch", "true or false", online_batch)
        self.prior, self.exclude, self.online_batch = prior, exclude, online_batch
        self.tau, self.match_prior, self.false_margin, self.cutdown = tau, match_prior, false_margin, cutdown
        self.weighting, self.posterior, self.selection = weighting, posterior, selection
        self.reset_stats_every_epoch = reset_stats_every_epoch
        self.bank = MemoryBank(memory_size, embed_dim)
        self.stats = SimilarityStats(min_pos_samples)
        # The match prior the posterior uses (float64 scalar, checkpointed): `match_prior`, or with
        # prior=estimated its running EM estimate.
        self.register_buffer("prior_estimate", torch.tensor(float(match_prior), dtype=torch.float64))
        # prior=estimated: the mixture's (pos_mean, pos_var, neg_mean, neg_var); zeros: not yet fitted.
        self.register_buffer("mixture", torch.zeros(4, dtype=torch.float64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Checkpoints written before the estimated prior have no `prior_estimate`: theirs was
        # `match_prior`, which the fresh buffer holds.
        for name in ("prior_estimate", "mixture"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_epoch_start(self) -> None:
        if self.reset_stats_every_epoch:
            self.stats.reset()

    def momentum_horizon(self, global_batch_size: int) -> int:
        """How many of the last warm-up steps need the momentum features: those that fill the bank.

        During the warm-up the momentum features only fill the bank, and at FNE's first step the
        bank holds the last K of them, so earlier warm-up steps need no momentum forward.

        Args:
            global_batch_size: pairs per optimizer step over all processes.

        Returns:
            ``ceil(K / global_batch_size)``.
        """
        return math.ceil(self.bank.size / global_batch_size)

    def posterior_view(self) -> PosteriorView:
        """The Gaussians and thresholds as host numbers (one sync; for figures after an epoch)."""
        return PosteriorView(tuple(float(g) for g in self._gaussians()[:4]), bool(self.stats.ready),
                             int(self.stats.pos_count), self.stats.min_pos_samples, float(self.prior_estimate),
                             self.cutdown, self.false_margin if self.exclude is None else 1.0 - self.exclude)

    # ---------------------------------------------------------------- the step
    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                momentum_image_features: Tensor | None = None, momentum_text_features: Tensor | None = None,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """FNE loss of one batch of B pairs (the in-batch VSE of ``warmup_loss`` while ``warmup``).

        The contract of :meth:`RetrievalLoss.forward
        <fne_lightning.losses.base.RetrievalLoss.forward>`. Similarities, statistics and
        sampling run in fp32 whatever the autocast setting.

        Args:
            image_features: (B, D) online image features, unit norm.
            text_features: (B, D) online caption features, unit norm.
            image_ids: (B,) image indices.
            text_ids: (B,) caption indices.
            momentum_image_features: (B, D) momentum image features; None only on the warm-up
                steps that :meth:`momentum_horizon` leaves out.
            momentum_text_features: (B, D) momentum caption features, likewise.
            warmup: True during the ``warmup_epochs``.

        Returns:
            ``(loss, diagnostics)``, the diagnostics being the Gaussians (``pos_mean``, ``pos_std``,
            ``neg_mean``, ``neg_std``, ``ready``, ``match_prior``; with ``prior=estimated`` also
            ``mixture_*``); after the warm-up the shares of valid candidates flagged and cut
            (``flagged_rate``, ``cutdown_rate``) and the mean score of the used and of the
            hardest negatives (``sampled_sim``, ``hardest_sim``); and where the data declares
            its positives, ``sampled_fn_rate`` and ``hardest_fn_rate`` and, after the warm-up,
            ``fn_base_rate``, ``score_auc`` and, with ``selection=sample``,
            ``flagged_precision`` and ``posterior_auc`` (see :mod:`fne_lightning.fne.diagnostics`;
            what they say: docs: concepts/diagnostics).

        Raises:
            ValueError: the momentum features are missing outside the warm-up.
        """
        with torch.autocast(image_features.device.type, enabled=False):
            v, t = image_features.float(), text_features.float()
            with torch.no_grad():
                same = image_ids[:, None] == image_ids[None, :]  # (B, B)
                self.stats.update(v.detach() @ t.detach().T, same)
            if self.queue_features == "online":  # the bank takes the online features themselves
                momentum_image_features, momentum_text_features = v, t
            skipped = momentum_image_features is None or momentum_text_features is None
            if not skipped:
                mv, mt = momentum_image_features.float().detach(), momentum_text_features.float().detach()
            if warmup:
                loss, diagnostics = self.in_batch_loss(v, t, image_ids, text_ids, self.warmup_loss)
            elif skipped:
                raise ValueError("FNELoss needs the momentum features outside the warm-up")
            else:
                loss, diagnostics = self._fne(v, t, mv, mt, image_ids, text_ids)
            diagnostics.update(self._stat_diagnostics())
            if skipped:
                # An early warm-up step (momentum_horizon): its rows would be overwritten before
                # FNE reads the bank, so only the pointer moves, by the global batch as enqueue would.
                self.bank.advance(image_ids.shape[0] * world_size())
            else:
                # After the loss: the global momentum batch enters the bank for the next steps
                # (filled during warm-up too). Nothing of the bank is saved for backward.
                self.bank.enqueue(gather_no_grad(mv), gather_no_grad(mt),
                                  gather_no_grad(image_ids), gather_no_grad(text_ids))
        return loss, diagnostics

    def _fne(self, v: Tensor, t: Tensor, mv: Tensor, mt: Tensor, image_ids: Tensor,
             text_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        batch_mv, batch_mt, batch_img_ids, batch_txt_ids = batch_candidates(mv, mt, image_ids, text_ids,
                                                                            self.gather_batch)
        if self.online_batch or self.queue_features == "online":  # the same rows, as online features with this rank's gradient
            gather = gather_with_local_grad if self.gather_batch else (lambda x: x)
            batch_mv, batch_mt = gather(v), gather(t)
            i2t_pos = t2i_pos = (v * t).sum(-1)
        else:
            i2t_pos, t2i_pos = (v * mt).sum(-1), (t * mv).sum(-1)
        bank = self.bank
        cand_valid = torch.cat([torch.ones_like(batch_img_ids, dtype=torch.bool), bank.valid_mask()])  # (Bc + K,)
        cand_image_ids = torch.cat([batch_img_ids, bank.image_ids])  # (Bc + K,)
        cand_text_ids = torch.cat([batch_txt_ids, bank.text_ids])
        with torch.no_grad():
            # The same for both directions: slots holding data, and never the anchor's own image
            # (its captions/image are positives, not negatives).
            valid = cand_valid[None, :] & (cand_image_ids[None, :] != image_ids[:, None])  # (B, Bc + K)
            gaussians = self._gaussians()
            prior = self.prior_estimate.float() if self.prior == "estimated" else self.match_prior
            # Shared by both directions: the posterior's coefficients and the count of candidates.
            coefficients = posterior_coefficients(*gaussians[:4], prior, v.device) if self.selection == "sample" else None
            truth_i2t = truth_t2i = None
            if self.positives.available:  # which candidates truly match their anchor: (B, Bc + K) each
                truth_i2t = self.positives.contains(image_ids[:, None], cand_text_ids[None, :])
                truth_t2i = self.positives.contains(cand_image_ids[None, :], text_ids[:, None])
            valid_i2t = valid_t2i = valid
            if self.oracle and truth_i2t is not None and truth_t2i is not None:  # never a true match
                valid_i2t, valid_t2i = valid & ~truth_i2t, valid & ~truth_t2i
            n_i2t = torch.count_nonzero(valid_i2t).clamp(min=1)
            n_t2i = n_i2t if valid_t2i is valid_i2t else torch.count_nonzero(valid_t2i).clamp(min=1)
        i2t = self._direction(v, i2t_pos, batch_mt, bank.text_features, valid_i2t, gaussians, prior, truth_i2t,
                              coefficients, n_i2t)
        t2i = self._direction(t, t2i_pos, batch_mv, bank.image_features, valid_t2i, gaussians, prior, truth_t2i,
                              coefficients, n_t2i)
        diagnostics = {k: (i2t.diagnostics[k] + t2i.diagnostics[k]) / 2 for k in i2t.diagnostics}
        if self.prior == "estimated" and self.selection == "sample":
            both = (torch.count_nonzero(valid_i2t) + torch.count_nonzero(valid_t2i)).double()
            self._mixture_step(torch.cat([both[None], i2t.mixture_sums + t2i.mixture_sums]), gaussians.ready)
        return i2t.loss + t2i.loss, diagnostics

    def _gaussians(self) -> Gaussians:
        """The posterior's Gaussians: the published fit, or with prior=estimated (once fitted) the
        mixture's components."""
        return mixture_gaussians(self.stats.snapshot(), self.mixture if self.prior == "estimated" else None)

    @torch.no_grad()
    def _mixture_step(self, sums: Tensor, ready: Tensor) -> None:
        """One EM step of the candidates' mixture (:func:`~fne_lightning.fne.prior.mixture_step`)."""
        prior, mixture = mixture_step(all_reduce_sum(sums.double()), ready, self.prior_estimate, self.mixture)
        self.prior_estimate.copy_(prior)
        self.mixture.copy_(mixture)

    def _direction(self, anchors: Tensor, positive_scores: Tensor, batch_candidates: Tensor,
                   bank_candidates: Tensor, valid: Tensor, gaussians: Gaussians, prior: float | Tensor,
                   truth: Tensor | None, coefficients: Tensor | None = None,
                   n_valid: Tensor | None = None) -> _Direction:
        """One direction: anchors (B, D) vs batch (Bc, D) + bank (K, D) candidates; ``valid``
        (B, Bc + K) marks the candidates that may be negatives (``n_valid`` of them, at least 1),
        ``truth`` (same shape, when the data declares its positives) those that truly match their
        anchor; ``coefficients``: the posterior's (:func:`posterior_coefficients`)."""
        with torch.no_grad():
            # Selection needs no gradient: score all candidates once without autograd, then
            # recompute only the B chosen scores with gradient (no backward through (B, Bc + K)).
            a = anchors.detach()
            s = torch.cat([a @ batch_candidates.detach().T, a @ bank_candidates.T], 1)  # (B, Bc + K)
            # One uniform per anchor from the loss's generator (only when sampling: the same stream as before).
            u = (torch.rand(a.shape[0], generator=self.generator, device=a.device) if self.selection == "sample"
                 else None)
            if coefficients is None and self.selection == "sample":  # p_fn's, for the selection and the AUC
                coefficients = posterior_coefficients(*gaussians[:4], prior, a.device)
            chosen = select_negatives(s, positive_scores.detach(), valid, gaussians, u, selection=self.selection,
                                      masks=truth is not None or self.prior == "estimated",
                                      tau=self.tau, match_prior=prior, false_margin=self.false_margin,
                                      weighting=self.weighting, cutdown=self.cutdown, posterior=self.posterior,
                                      exclude=self.exclude, cutdown_mean=self.stats.pos_mean,
                                      coefficients=coefficients)
            idx, has, hard_idx, hard_has, n_flagged, n_cut, flagged, p_fn = chosen
            mixture_sums = s.new_zeros(6, dtype=torch.float64)
            if self.prior == "estimated" and p_fn is not None:
                mixture_sums = candidate_mixture_sums(s, p_fn, valid)
        # Outside no_grad: with online_batch, an in-batch negative's row carries its gradient.
        negatives = candidate_rows(batch_candidates, bank_candidates, idx)  # (B, D)
        negative_scores = (anchors * negatives).sum(-1)  # (B,), gradient to the anchors (and online negatives)
        loss = triplet_hinge(negative_scores, positive_scores, self.margin, has)
        with torch.no_grad():
            # count_nonzero, not sum: summing a bool (B, N) mask first converts it to int64.
            if n_valid is None:
                n_valid = torch.count_nonzero(valid).clamp(min=1)
            diagnostics = {
                "flagged_rate": n_flagged / n_valid,
                "cutdown_rate": n_cut / n_valid,
                "sampled_sim": (negative_scores.detach() * has).sum() / has.sum().clamp(min=1),
                "hardest_sim": (s.gather(1, hard_idx[:, None]).squeeze(1) * hard_has).sum()
                / hard_has.sum().clamp(min=1),
            }
            if truth is not None:
                diagnostics.update(self._truth_diagnostics(s, valid, truth, idx, has, hard_idx, hard_has,
                                                           flagged, n_valid, coefficients))
        return _Direction(loss, diagnostics, mixture_sums)

    @staticmethod
    def _truth_diagnostics(s: Tensor, valid: Tensor, truth: Tensor, idx: Tensor, has: Tensor, hard_idx: Tensor,
                           hard_has: Tensor, flagged: Tensor | None, n_valid: Tensor,
                           coefficients: Tensor | None) -> dict[str, Tensor]:
        """What the known truth says of this direction's candidates (``fne/diagnostics.py``):
        the FN rates of the used and the hardest negatives, the base rate, and how well the
        posterior (and the raw score, for comparison) separate true matches from true negatives.
        The posterior's AUC ranks by its logit, recomputed from ``coefficients`` (the quadratic
        p_fn is the sigmoid of): the same order as p_fn, without its saturation at 0 and 1, and
        without the log and log1p of p_fn (1.7 ms a direction at (128, 1,152) on a CPU)."""
        true_match, true_negative = valid & truth, valid & ~truth  # (B, N)
        out = {
            "sampled_fn_rate": fn_rate(truth.gather(1, idx[:, None]).squeeze(1), has),
            "hardest_fn_rate": fn_rate(truth.gather(1, hard_idx[:, None]).squeeze(1), hard_has),
            "fn_base_rate": torch.count_nonzero(true_match) / n_valid,
            "score_auc": binned_auc(s, true_match, true_negative, -1.0, 1.0),
        }
        if flagged is not None and coefficients is not None:  # sampling: the posterior was used
            # 0 in a step that flags nothing (the epoch average then under-states the precision).
            out["flagged_precision"] = torch.count_nonzero(flagged & truth) / torch.count_nonzero(flagged).clamp(min=1)
            out["posterior_auc"] = binned_auc(posterior_log_odds(s, coefficients), true_match, true_negative,
                                              -90.0, 20.0)
        return out

    def _stat_diagnostics(self) -> dict[str, Tensor]:
        pos_mean, pos_var, neg_mean, neg_var = self.stats.gaussians()
        return {
            "pos_mean": pos_mean, "pos_std": pos_var.clamp(min=0).sqrt(),
            "neg_mean": neg_mean, "neg_std": neg_var.clamp(min=0).sqrt(),
            "ready": self.stats.ready.float(), "match_prior": self.prior_estimate.float(),
            **({f"mixture_{k}": x.float() for k, x in zip(("pos_mean", "pos_var", "neg_mean", "neg_var"),
                                                          self.mixture.unbind(), strict=True)}
               if self.prior == "estimated" else {}),
        }
