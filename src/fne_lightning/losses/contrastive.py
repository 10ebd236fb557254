"""Contrastive objectives with false-negative handling: InfoNCE (CLIP) and the sigmoid loss (SigLIP).

* :class:`InfoNCELoss` (``loss=infonce``): symmetric cross-entropy over scaled cosine scores
  (Radford et al., ICML 2021), with image-id targets (ALBEF, Li et al., NeurIPS 2021), an optional
  queue of earlier features (MoCo, He et al., CVPR 2020; ALBEF's momentum queue, or XBM's online
  features, Wang et al., CVPR 2020) and one false-negative option: FNE's posterior as weights of
  the denominator (or, ``fne_action=attract``, its expected labels as soft targets), ALBEF's
  momentum distillation, or an oracle of the declared true matches.
* :class:`SigLIPLoss` (``loss=siglip``): the pairwise sigmoid loss (Zhai et al., ICCV 2023) with
  learnable scale and bias, every pair of the same image positive.

The temperature (``logit_scale``) is the open_clip model's own when it has one, so a fine-tuned
CLIP keeps and exports its learned scale. Under DDP the candidates are gathered with the gradient
flowing back to every rank, and each rank's loss covers its local anchors, so two processes give
the loss and the gradients of one process over the same global batch. The shared machinery (the
posterior, the targets, the queue, the statistics) is in :mod:`fne_lightning.fne`; what each
option measured: docs: results/synthetic-fn.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fne_lightning.errors import check, number
from fne_lightning.fne.bank import MemoryBank
from fne_lightning.fne.contrastive import (
    distillation_targets,
    expected_targets,
    id_targets,
    negative_mass,
    posterior_log_weights,
    soft_cross_entropy,
)
from fne_lightning.fne.diagnostics import binned_auc
from fne_lightning.fne.negatives import posterior_coefficients, posterior_log_odds
from fne_lightning.fne.prior import PRIORS, candidate_mixture_sums, mixture_gaussians, mixture_step
from fne_lightning.fne.stats import Gaussians, SimilarityStats
from fne_lightning.losses.base import PosteriorView, RetrievalLoss
from fne_lightning.losses.vse import check_oracle_data, fn_rate, in_batch_vse
from fne_lightning.utils.distributed import all_reduce_sum, gather_no_grad, gather_with_grad, rank, world_size

FALSE_NEGATIVES = ("none", "fne", "distill", "oracle")
ORACLE_ACTIONS = ("eliminate", "attract")
FNE_ACTIONS = ("eliminate", "attract")
SAME_IMAGE = ("target", "mask")
QUEUE_FEATURES = ("momentum", "online")
# The triplet margin of a recipe's VSE warm-up epochs (the VSE losses' default).
WARMUP_MARGIN = 0.2
# The posterior's flag threshold for the flagged-candidates diagnostic (FNE's false_margin default).
FLAG_THRESHOLD = 1e-3


class _Candidates:
    """One direction's candidates: features (M, D), their image and caption ids, which columns hold
    data, and where each anchor's own pair is."""

    def __init__(self, features: Tensor, image_ids: Tensor, text_ids: Tensor, present: Tensor, own: Tensor,
                 momentum: Tensor | None) -> None:
        self.features, self.image_ids, self.text_ids, self.present, self.own = features, image_ids, text_ids, present, own
        self.momentum = momentum  # (M, D) the momentum features of the same candidates (distillation)


class ContrastiveLoss(RetrievalLoss):
    """What InfoNCE and SigLIP share: the learnable scale (and bias), the statistics of FNE's
    posterior, the oracle, the warm-up, and the diagnostics against declared positives."""

    #: ``"infonce"`` or ``"siglip"``.
    kind = "infonce"

    def __init__(self, embed_dim: int, temperature: float = 0.07, bias: float | None = None, learn_scale: bool = True,
                 model_scale: bool = True, max_logit_scale: float = 100.0, false_negatives: str = "none",
                 oracle_action: str = "eliminate", match_prior: float = 1e-4, min_pos_samples: int = 200,
                 prior: str = "fixed", exclude: float | None = None, cutdown: float | None = None,
                 reset_stats_every_epoch: bool = True, gather_batch: bool = True, warmup_epochs: int = 0,
                 warmup_loss: str = "vse0", fne_action: str = "eliminate") -> None:
        """Check and keep the shared settings (config keys ``loss.<name>``).

        Args:
            embed_dim: the feature dimension D.
            temperature: the initial temperature, ``logit_scale = log(1 / temperature)``, when the
                loss has a scale of its own (the model has none, or ``model_scale`` is false).
            bias: the initial logit bias (SigLIP), or None for none.
            learn_scale: train the scale (and bias); false: keep them fixed.
            model_scale: use the open_clip model's own ``logit_scale`` (and, for SigLIP, its
                ``logit_bias``) when it has them, so they are trained and exported with the model.
            max_logit_scale: the scale is clamped at this value (CLIP: 100).
            false_negatives: ``none``, ``fne`` (FNE's posterior weights the negatives),
                ``distill`` (momentum distillation, InfoNCE only) or ``oracle`` (benchmarks: the
                declared true matches; needs data with positives).
            oracle_action: ``eliminate`` (a true match is not a negative) or ``attract`` (it is
                a positive).
            match_prior: ``fne``: the prior of a match in the posterior (the start value with
                ``prior=estimated``).
            min_pos_samples: ``fne``: confident positives seen before the Gaussians are used.
            prior: ``fne``: ``fixed`` or ``estimated`` (FNE's options).
            exclude: ``fne``: None (weight ``1 - p_fn``), or a probability: candidates with
                ``p_fn`` above it are removed.
            cutdown: ``fne``: None (published contrastive use), or remove negatives scoring at or
                below ``mu+ - cutdown`` (FNE's cut-down).
            reset_stats_every_epoch: restart the Gaussian fit every epoch (FNE's default).
            gather_batch: under DDP, the in-batch candidates are every rank's batch (CLIP's global
                batch); false: each rank's own batch.
            warmup_epochs: epochs of in-batch VSE (``warmup_loss``) first, as a recipe asks.
            warmup_loss: ``vse0`` or ``vsepp``.
            fne_action: ``fne``: ``eliminate`` (a negative's term weighted by ``1 - p_fn``, or
                removed above ``exclude``) or ``attract`` (each negative's expected label under
                the posterior, ``p_fn``, is its target: the posterior's counterpart of the
                attracting oracle).

        Raises:
            FNEError: a value out of range, naming its ``loss.<name>`` key.
        """
        super().__init__(warmup_epochs, warmup_loss)
        check(number(temperature) and temperature > 0.0, "loss.temperature", "a value > 0", temperature)
        check(number(max_logit_scale) and max_logit_scale > 0.0, "loss.max_logit_scale", "a value > 0", max_logit_scale)
        check(false_negatives in FALSE_NEGATIVES, "loss.false_negatives", " | ".join(FALSE_NEGATIVES), false_negatives)
        check(oracle_action in ORACLE_ACTIONS, "loss.oracle_action", " or ".join(ORACLE_ACTIONS), oracle_action)
        check(fne_action in FNE_ACTIONS, "loss.fne_action", " or ".join(FNE_ACTIONS), fne_action)
        check(fne_action == "eliminate" or exclude is None, "loss.exclude",
              "null with loss.fne_action=attract (attraction keeps every candidate)", exclude)
        check(number(match_prior) and 0.0 < match_prior < 1.0, "loss.match_prior", "a value in (0, 1)", match_prior)
        check(isinstance(min_pos_samples, int) and min_pos_samples >= 1, "loss.min_pos_samples", "an integer >= 1",
              min_pos_samples)
        check(prior in PRIORS, "loss.prior", " or ".join(PRIORS), prior)
        check(exclude is None or (number(exclude) and 0.0 <= exclude < 1.0), "loss.exclude", "null or a value in [0, 1)", exclude)
        check(cutdown is None or (number(cutdown) and cutdown >= 0), "loss.cutdown", "null or a value >= 0", cutdown)
        for key, value in (("learn_scale", learn_scale), ("model_scale", model_scale),
                           ("gather_batch", gather_batch), ("reset_stats_every_epoch", reset_stats_every_epoch)):
            check(isinstance(value, bool), f"loss.{key}", "true or false", value)
        self.false_negatives, self.oracle_action, self.fne_action = false_negatives, oracle_action, fne_action
        self.match_prior, self.prior, self.exclude, self.cutdown = match_prior, prior, exclude, cutdown
        self.learn_scale, self.model_scale, self.max_logit_scale = learn_scale, model_scale, max_logit_scale
        self.gather_batch, self.reset_stats_every_epoch = gather_batch, reset_stats_every_epoch
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_scale)
        self.uses_bias = bias is not None
        if self.uses_bias:
            self.logit_bias = nn.Parameter(torch.tensor(float(bias)), requires_grad=learn_scale)
        self._model: tuple[nn.Module, ...] = ()  # the open_clip model whose scale (and bias) is used
        self.stats = SimilarityStats(min_pos_samples)
        self.register_buffer("prior_estimate", torch.tensor(float(match_prior), dtype=torch.float64))
        self.register_buffer("mixture", torch.zeros(4, dtype=torch.float64))

    # ------------------------------------------------------------- the contract
    def bind(self, encoder: nn.Module) -> None:
        """Use the open_clip model's ``logit_scale`` (and ``logit_bias`` when the loss has a bias)
        instead of the loss's own, when ``model_scale`` and the model has them.

        Args:
            encoder: the online dual encoder; its open_clip model is ``encoder.model``.
        """
        model = getattr(encoder, "model", None)
        scale = getattr(model, "logit_scale", None)
        bias = getattr(model, "logit_bias", None)
        if not (self.model_scale and isinstance(scale, nn.Parameter)
                and (not self.uses_bias or isinstance(bias, nn.Parameter))):
            return
        del self.logit_scale
        scale.requires_grad_(self.learn_scale)
        if self.uses_bias:
            del self.logit_bias
            bias.requires_grad_(self.learn_scale)
        self._model = (model,)

    def check_setup(self) -> None:
        """Refuse the oracle on data that declares no positives (one error line)."""
        check_oracle_data(self.false_negatives == "oracle", self.positives, "loss.false_negatives=oracle")

    def on_train_epoch_start(self) -> None:
        if self.reset_stats_every_epoch:
            self.stats.reset()

    def scale_parameters(self) -> tuple[Tensor, Tensor | None]:
        """The log-scale and bias parameters in use: the model's (after :meth:`bind`) or the loss's."""
        owner = self._model[0] if self._model else self
        return owner.logit_scale, (owner.logit_bias if self.uses_bias else None)

    def _scale_and_bias(self) -> tuple[Tensor, Tensor | None]:
        log_scale, bias = self.scale_parameters()
        with torch.no_grad():  # CLIP's clamp, on the parameter itself so that it can come back
            log_scale.clamp_(max=math.log(self.max_logit_scale))
        return log_scale.float().exp(), (bias.float() if bias is not None else None)

    def posterior_view(self) -> PosteriorView | None:
        """The Gaussians of ``false_negatives=fne`` for the similarity figure (None otherwise)."""
        if self.false_negatives != "fne":
            return None
        return PosteriorView(tuple(float(g) for g in self._gaussians()[:4]), bool(self.stats.ready),
                             int(self.stats.pos_count), self.stats.min_pos_samples, float(self.prior_estimate),
                             self.cutdown, 1.0 - (self.exclude if self.exclude is not None else FLAG_THRESHOLD))

    # ---------------------------------------------------------- shared pieces
    def _gaussians(self) -> Gaussians:
        return mixture_gaussians(self.stats.snapshot(), self.mixture if self.prior == "estimated" else None)

    def _update_stats(self, v: Tensor, t: Tensor, image_ids: Tensor) -> None:
        if self.false_negatives == "fne":
            with torch.no_grad():
                self.stats.update(v.detach() @ t.detach().T, image_ids[:, None] == image_ids[None, :])

    def _warmup(self, v: Tensor, t: Tensor, image_ids: Tensor, text_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, diagnostics = in_batch_vse(v, t, image_ids, text_ids, self.warmup_loss, WARMUP_MARGIN, self.positives,
                                         self.gather_batch, oracle=self.false_negatives == "oracle")
        if world_size() > 1:
            # The VSE warm-up does not use the scale (and bias), and DDP stops at the next step when a
            # trainable parameter got no gradient: they enter with weight 0 (a zero gradient under
            # DDP; one process leaves theirs None).
            for param in self.scale_parameters():
                if param is not None and param.requires_grad:
                    loss = loss + 0.0 * param.sum()
        return loss, diagnostics

    def _false_negative_terms(self, s: Tensor, negative: Tensor, truth: Tensor | None,
                              coefficients: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The log-weights (B, M) of the negatives under ``fne`` / the eliminating oracle (None for
        none), and the candidates the attracting oracle adds to the positives (None for none)."""
        if self.false_negatives == "oracle" and truth is not None:
            extra = truth & negative
            if self.oracle_action == "attract":
                return None, extra
            return torch.zeros_like(s).masked_fill(extra, float("-inf")), None
        if self.false_negatives == "fne" and coefficients is not None:
            if self.fne_action == "attract":  # no weights: the targets attract (_posterior_targets)
                log_w = torch.zeros_like(s)
            else:
                log_w = posterior_log_weights(s, coefficients, self.exclude)  # (B, M)
            if self.cutdown is not None:
                log_w = log_w.masked_fill(self._cut_down(s), float("-inf"))
            # Only negatives are weighted, and only once the Gaussians are ready.
            return torch.where(negative & self.stats.ready, log_w, 0.0), None
        return None, None

    def _cut_down(self, s: Tensor) -> Tensor:
        """(B, M) bool: the candidates FNE's cut-down removes (at or below ``mu+ - cutdown``)."""
        assert self.cutdown is not None
        return (s <= self.stats.pos_mean.float() - self.cutdown) & (self.stats.pos_count > 0)

    def _posterior_targets(self, s: Tensor, negative: Tensor, coefficients: Tensor | None) -> Tensor | None:
        """``fne_action=attract``: (B, M) each negative's expected label under the posterior, ``p_fn``
        (0 until the Gaussians are ready, and where the cut-down removes it); None otherwise."""
        if self.false_negatives != "fne" or self.fne_action != "attract" or coefficients is None:
            return None
        keep = negative & self.stats.ready
        if self.cutdown is not None:
            keep = keep & ~self._cut_down(s)
        return torch.where(keep, posterior_log_odds(s, coefficients).sigmoid(), 0.0)

    def _coefficients(self) -> tuple[Tensor | None, Gaussians | None]:
        if self.false_negatives != "fne":
            return None, None
        g = self._gaussians()
        prior = self.prior_estimate.float() if self.prior == "estimated" else self.match_prior
        return posterior_coefficients(*g[:4], prior, g.pos_mean.device), g

    def _fne_diagnostics(self) -> dict[str, Tensor]:
        if self.false_negatives != "fne":
            return {}
        pos_mean, pos_var, neg_mean, neg_var = self.stats.gaussians()
        return {"pos_mean": pos_mean, "pos_std": pos_var.clamp(min=0).sqrt(), "neg_mean": neg_mean,
                "neg_std": neg_var.clamp(min=0).sqrt(), "ready": self.stats.ready.float(),
                "match_prior": self.prior_estimate.float()}

    def _truth_diagnostics(self, s: Tensor, push: Tensor, negative: Tensor, truth: Tensor,
                           coefficients: Tensor | None) -> dict[str, Tensor]:
        """One direction's view of the declared truth: the share of the push on negatives that
        falls on true matches, the hardest negative's FN rate, the base rate, and the AUCs."""
        hard = s.masked_fill(~negative, float("-inf")).argmax(1)  # (B,)
        has = negative.any(1)
        true_match, true_negative = negative & truth, negative & ~truth
        out = {
            "fn_mass": negative_mass(push, negative, truth),  # summed, made a share by the caller
            "hardest_fn_rate": fn_rate(truth.gather(1, hard[:, None]).squeeze(1), has),
            "fn_base_rate": torch.count_nonzero(true_match) / torch.count_nonzero(negative).clamp(min=1),
            "score_auc": binned_auc(s, true_match, true_negative, -1.0, 1.0),
        }
        if coefficients is not None:
            out["posterior_auc"] = binned_auc(posterior_log_odds(s, coefficients), true_match, true_negative,
                                              -90.0, 20.0)
        return out


def _mean_directions(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The diagnostics of several directions: ``fn_mass`` as one share of the summed masses, the
    rest as means."""
    out = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0] if k != "fn_mass"}
    if "fn_mass" in parts[0]:
        mass = sum(p["fn_mass"] for p in parts)
        out["fn_mass"] = (mass[0] / mass[1].clamp(min=1e-30)).float()
    return out


class InfoNCELoss(ContrastiveLoss):
    """Symmetric InfoNCE (CLIP's loss) with image-id targets, a queue and false-negative options.

    ``loss=infonce``. Per direction (image to text; text to image is symmetric) the logits are
    ``scale * v_i . c_j`` over the candidates c: the batch (every rank's, gathered with the
    gradient, under DDP), or with ``memory_size`` > 0 the batch's momentum features followed by a
    queue of earlier ones (ALBEF/MoCo; with ``queue_features=online``, the detached online features
    of XBM, and no momentum encoder). The loss is the cross-entropy against targets over the
    anchor's own image (``same_image=target``), averaged over anchors and the two directions.
    """

    kind = "infonce"

    def __init__(self, embed_dim: int, temperature: float = 0.07, learn_scale: bool = True,
                 model_scale: bool = True, max_logit_scale: float = 100.0, same_image: str = "target",
                 memory_size: int = 0, queue_features: str = "momentum", false_negatives: str = "none",
                 oracle_action: str = "eliminate", alpha: float = 0.4, alpha_ramp_epochs: float = 1.0,
                 match_prior: float = 1e-4, min_pos_samples: int = 200, prior: str = "fixed",
                 exclude: float | None = None, cutdown: float | None = None, reset_stats_every_epoch: bool = True,
                 gather_batch: bool = True, warmup_epochs: int = 0, warmup_loss: str = "vse0",
                 fne_action: str = "eliminate") -> None:
        """Check and keep the settings (config keys ``loss.<name>``; the shared ones as in
        :class:`ContrastiveLoss`).

        Args:
            embed_dim: the feature dimension D (the queue's width).
            temperature: the initial temperature when the loss has its own scale (0.07: CLIP's).
            learn_scale: train the scale.
            model_scale: use the open_clip model's own ``logit_scale`` when it has one.
            max_logit_scale: the clamp of the scale (CLIP: 100).
            same_image: ``target``: the other captions (or copies) of the anchor's image are
                positives that share the target (ALBEF); ``mask``: they are removed from the
                denominator and the target is the anchor's own pair.
            memory_size: queue slots K; 0: in-batch candidates only (CLIP).
            queue_features: ``momentum`` (ALBEF/MoCo: the batch's and the queue's candidates are
                the momentum encoders' features) or ``online`` (XBM: the batch's online features
                with their gradient, and a queue of detached online features; no momentum encoder).
            false_negatives: ``none``, ``fne``, ``distill`` or ``oracle``.
            oracle_action: ``eliminate`` or ``attract``.
            alpha: ``distill``: the weight of the momentum model's softmax in the targets (ALBEF: 0.4).
            alpha_ramp_epochs: ``distill``: alpha rises linearly from 0 over this many epochs
                after the warm-up (ALBEF: the first epoch).
            match_prior: ``fne``: the posterior's prior.
            min_pos_samples: ``fne``: positives seen before the Gaussians are used.
            prior: ``fne``: ``fixed`` or ``estimated``.
            exclude: ``fne``: None, or remove candidates above this posterior.
            cutdown: ``fne``: None, or remove negatives at or below ``mu+ - cutdown``.
            reset_stats_every_epoch: ``fne``: restart the Gaussian fit every epoch.
            gather_batch: under DDP, the in-batch candidates are every rank's batch.
            warmup_epochs: epochs of in-batch VSE first.
            warmup_loss: ``vse0`` or ``vsepp``.
            fne_action: ``fne``: ``eliminate`` (weights ``1 - p_fn``) or ``attract`` (the targets
                give each negative its ``p_fn``, then sum to 1 with the positives' 1s).

        Raises:
            FNEError: a value out of range, naming its ``loss.<name>`` key.
        """
        super().__init__(embed_dim, temperature, None, learn_scale, model_scale, max_logit_scale, false_negatives,
                         oracle_action, match_prior, min_pos_samples, prior, exclude, cutdown,
                         reset_stats_every_epoch, gather_batch, warmup_epochs, warmup_loss, fne_action)
        check(same_image in SAME_IMAGE, "loss.same_image", " or ".join(SAME_IMAGE), same_image)
        check(isinstance(memory_size, int) and memory_size >= 0, "loss.memory_size", "an integer >= 0", memory_size)
        check(queue_features in QUEUE_FEATURES, "loss.queue_features", " or ".join(QUEUE_FEATURES), queue_features)
        check(number(alpha) and 0.0 <= alpha <= 1.0, "loss.alpha", "a value in [0, 1]", alpha)
        check(number(alpha_ramp_epochs) and alpha_ramp_epochs >= 0, "loss.alpha_ramp_epochs", "a value >= 0", alpha_ramp_epochs)
        self.same_image, self.queue_features = same_image, queue_features
        self.alpha, self.alpha_ramp_epochs = alpha, alpha_ramp_epochs
        self.bank = MemoryBank(memory_size, embed_dim)
        self.requires_momentum = (memory_size > 0 and queue_features == "momentum") or false_negatives == "distill"

    def momentum_horizon(self, global_batch_size: int) -> int:
        """Warm-up steps that need the momentum features: those whose features are still in the
        queue when the loss starts (none without a queue of momentum features)."""
        if self.bank.size == 0 or self.queue_features != "momentum":
            return 0
        return math.ceil(self.bank.size / global_batch_size)

    def distill_alpha(self) -> float:
        """This step's distillation weight: ``alpha``, ramped up linearly over ``alpha_ramp_epochs``
        after the warm-up (from :attr:`progress`, so it resumes exactly)."""
        if self.alpha_ramp_epochs == 0:
            return self.alpha
        return self.alpha * min(1.0, max(0.0, self.progress - self.warmup_epochs) / self.alpha_ramp_epochs)

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                momentum_image_features: Tensor | None = None, momentum_text_features: Tensor | None = None,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """InfoNCE of one batch of B pairs (the in-batch VSE of ``warmup_loss`` while ``warmup``).

        The contract of :meth:`RetrievalLoss.forward <fne_lightning.losses.base.RetrievalLoss.forward>`;
        scores in fp32 whatever the autocast.

        Returns:
            ``(loss, diagnostics)``: ``train/logit_scale`` always; with ``distill``, ``alpha``;
            with ``fne``, the Gaussians; on data with declared positives (after the warm-up),
            ``fn_mass`` (the share of the softmax's probability on negatives that falls on true
            matches), ``hardest_fn_rate``, ``fn_base_rate``, ``score_auc`` and with ``fne``
            ``posterior_auc``.
        """
        with torch.autocast(image_features.device.type, enabled=False):
            v, t = image_features.float(), text_features.float()
            self._update_stats(v, t, image_ids)
            mv = momentum_image_features.float().detach() if momentum_image_features is not None else None
            mt = momentum_text_features.float().detach() if momentum_text_features is not None else None
            if self.queue_features == "online":
                mv_q, mt_q = v.detach(), t.detach()
            else:
                mv_q, mt_q = mv, mt
            if warmup:
                loss, diagnostics = self._warmup(v, t, image_ids, text_ids)
            else:
                loss, diagnostics = self._infonce(v, t, mv, mt, image_ids, text_ids)
            diagnostics.update(self._fne_diagnostics())
            if self.bank.size:
                if mv_q is None or mt_q is None:  # a warm-up step whose features leave the queue before use
                    self.bank.advance(image_ids.shape[0] * world_size())
                else:
                    self.bank.enqueue(gather_no_grad(mv_q), gather_no_grad(mt_q), gather_no_grad(image_ids),
                                      gather_no_grad(text_ids))
        return loss, diagnostics

    def _candidates(self, online: Tensor, momentum: Tensor | None, image_ids: Tensor, text_ids: Tensor,
                    bank_features: Tensor) -> _Candidates:
        """One direction's candidates from the other modality: the batch (gathered under DDP), then the queue."""
        gather = self.gather_batch
        batch_ids = (gather_no_grad(image_ids), gather_no_grad(text_ids)) if gather else (image_ids, text_ids)
        n_local = image_ids.shape[0]
        own = torch.arange(n_local, device=online.device) + (rank() * n_local if gather else 0)
        use_momentum = self.bank.size > 0 and self.queue_features == "momentum"
        if use_momentum:
            if momentum is None:
                raise ValueError("InfoNCELoss needs the momentum features with a queue of momentum features")
            batch = gather_no_grad(momentum) if gather else momentum
        else:
            batch = gather_with_grad(online) if gather else online
        batch_momentum = None
        if self.false_negatives == "distill":
            if momentum is None:
                raise ValueError("InfoNCELoss(false_negatives=distill) needs the momentum features after the warm-up")
            batch_momentum = gather_no_grad(momentum) if gather else momentum
        present = torch.ones(batch.shape[0], dtype=torch.bool, device=online.device)
        if self.bank.size == 0:
            return _Candidates(batch, *batch_ids, present, own, batch_momentum)
        bank = self.bank
        momentum_all = torch.cat([batch_momentum, bank_features]) if batch_momentum is not None else None
        return _Candidates(torch.cat([batch, bank_features]), torch.cat([batch_ids[0], bank.image_ids]),
                           torch.cat([batch_ids[1], bank.text_ids]), torch.cat([present, bank.valid_mask()]), own,
                           momentum_all)

    def _infonce(self, v: Tensor, t: Tensor, mv: Tensor | None, mt: Tensor | None, image_ids: Tensor,
                 text_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        scale, _ = self._scale_and_bias()
        coefficients, gaussians = self._coefficients()
        alpha = self.distill_alpha() if self.false_negatives == "distill" else None
        texts = self._candidates(t, mt, image_ids, text_ids, self.bank.text_features)
        images = self._candidates(v, mv, image_ids, text_ids, self.bank.image_features)
        i2t = self._direction(v, mv, texts, image_ids[:, None] == texts.image_ids[None, :], scale, coefficients,
                              alpha, "i2t", image_ids, text_ids)
        t2i = self._direction(t, mt, images, image_ids[:, None] == images.image_ids[None, :], scale, coefficients,
                              alpha, "t2i", image_ids, text_ids)
        diagnostics = _mean_directions([i2t[1], t2i[1]])
        diagnostics["train/logit_scale"] = scale.detach()
        if alpha is not None:
            diagnostics["alpha"] = torch.full((), alpha, device=v.device)  # no host-to-device copy (sync)
        if self.prior == "estimated" and gaussians is not None:
            sums = i2t[2] + t2i[2]
            prior, mixture = mixture_step(all_reduce_sum(sums), gaussians.ready, self.prior_estimate, self.mixture)
            self.prior_estimate.copy_(prior)
            self.mixture.copy_(mixture)
        return (i2t[0] + t2i[0]) / 2, diagnostics

    def _direction(self, anchors: Tensor, momentum_anchors: Tensor | None, cand: _Candidates, same: Tensor,
                   scale: Tensor, coefficients: Tensor | None, alpha: float | None, direction: str,
                   image_ids: Tensor, text_ids: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """One direction's loss (mean over its B anchors), diagnostics and EM sums."""
        present = cand.present[None, :]  # (1, M)
        positive = same & present  # (B, M): candidates of the anchor's own image
        own = torch.zeros_like(same).scatter_(1, cand.own[:, None], True)  # (B, M): the anchor's own pair
        negative = ~same & present
        # One product for the logits and for the scores the masks, weights and diagnostics read (the
        # same values as a separate product without autograd, one (B, M) GEMM fewer).
        raw = anchors @ cand.features.T  # (B, M) cosine scores, with the gradient
        with torch.no_grad():
            s = raw.detach()
            truth = None
            if self.positives.available:
                truth = (self.positives.contains(image_ids[:, None], cand.text_ids[None, :]) if direction == "i2t"
                         else self.positives.contains(cand.image_ids[None, :], text_ids[:, None]))
            log_w, attract = self._false_negative_terms(s, negative, truth, coefficients)
            expected = self._posterior_targets(s, negative, coefficients)
            removed = ~present
            if self.same_image == "mask":
                removed = removed | (positive & ~own)
                target_mask = own
            else:
                target_mask = positive
            if attract is not None:
                target_mask = target_mask | attract
                negative = negative & ~attract
            targets = id_targets(target_mask) if expected is None else expected_targets(target_mask, expected)
            if alpha is not None and momentum_anchors is not None and cand.momentum is not None:
                momentum_logits = (scale.detach() * (momentum_anchors @ cand.momentum.T)).masked_fill(removed,
                                                                                                     float("-inf"))
                targets = distillation_targets(momentum_logits, targets, alpha)
            bias = torch.zeros_like(s).masked_fill(removed, float("-inf"))
            if log_w is not None:
                bias = bias + log_w
        logits = scale * raw + bias  # (B, M)
        loss = soft_cross_entropy(logits, targets).mean()
        diagnostics: dict[str, Tensor] = {}
        sums = s.new_zeros(7, dtype=torch.float64)
        with torch.no_grad():
            if truth is not None:
                push = torch.softmax(logits.detach(), dim=1)
                diagnostics = self._truth_diagnostics(s, push, negative, truth, coefficients)
            if self.prior == "estimated" and coefficients is not None:
                p_fn = posterior_log_odds(s, coefficients).sigmoid_()
                sums = torch.cat([torch.count_nonzero(negative).double()[None],
                                  candidate_mixture_sums(s, p_fn, negative)])
        return loss, diagnostics, sums


class SigLIPLoss(ContrastiveLoss):
    """The pairwise sigmoid loss (SigLIP, Zhai et al., ICCV 2023) with learnable scale and bias.

    ``loss=siglip``. Every (image, caption) pair of the global batch is a binary problem, label +1
    when the caption describes the image's own image id (several captions of one image are all
    positives) and -1 otherwise: ``-log sigmoid(z_ij (scale v_i . t_j + bias))``, summed over the
    captions and averaged over the images. Under DDP each rank scores its images against every
    rank's captions (gathered with the gradient), so each pair counts once.
    """

    kind = "siglip"

    def __init__(self, embed_dim: int, temperature: float = 0.1, bias: float = -10.0, learn_scale: bool = True,
                 model_scale: bool = True, max_logit_scale: float = 100.0, false_negatives: str = "none",
                 oracle_action: str = "eliminate", match_prior: float = 1e-4, min_pos_samples: int = 200,
                 prior: str = "fixed", exclude: float | None = None, cutdown: float | None = None,
                 reset_stats_every_epoch: bool = True, gather_batch: bool = True, warmup_epochs: int = 0,
                 warmup_loss: str = "vse0", fne_action: str = "eliminate") -> None:
        """Check and keep the settings (config keys ``loss.<name>``; as :class:`ContrastiveLoss`).

        Args:
            embed_dim: the feature dimension D.
            temperature: the initial temperature, 0.1 (SigLIP: ``log scale = log 10``).
            bias: the initial bias (SigLIP: -10).
            learn_scale: train the scale and the bias.
            model_scale: use the model's ``logit_scale`` and ``logit_bias`` when it has both (a
                SigLIP model); a CLIP model has no bias, and then the loss's own pair is used.
            max_logit_scale: the clamp of the scale.
            false_negatives: ``none``, ``fne`` (each negative's term weighted by ``1 - p_fn``) or
                ``oracle``; ``distill`` is InfoNCE's only.
            oracle_action: ``eliminate`` (a true match's term is dropped) or ``attract`` (its label
                is +1).
            match_prior: ``fne``: the posterior's prior.
            min_pos_samples: ``fne``: positives seen before the Gaussians are used.
            prior: ``fne``: ``fixed`` or ``estimated``.
            exclude: ``fne``: None, or drop the terms of candidates above this posterior.
            cutdown: ``fne``: None, or drop negatives at or below ``mu+ - cutdown``.
            reset_stats_every_epoch: ``fne``: restart the Gaussian fit every epoch.
            gather_batch: under DDP, score against every rank's captions.
            warmup_epochs: epochs of in-batch VSE first.
            warmup_loss: ``vse0`` or ``vsepp``.
            fne_action: ``fne``: ``eliminate`` (weights ``1 - p_fn``) or ``attract`` (a negative's
                label is its ``p_fn``: the expected binary cross-entropy under the posterior).

        Raises:
            FNEError: a value out of range, naming its ``loss.<name>`` key.
        """
        check(number(bias), "loss.bias", "a number", bias)
        check(false_negatives != "distill", "loss.false_negatives", "none, fne or oracle for loss=siglip (distill "
              "is InfoNCE's)", false_negatives)
        super().__init__(embed_dim, temperature, bias, learn_scale, model_scale, max_logit_scale, false_negatives,
                         oracle_action, match_prior, min_pos_samples, prior, exclude, cutdown,
                         reset_stats_every_epoch, gather_batch, warmup_epochs, warmup_loss, fne_action)

    def forward(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor,
                momentum_image_features: Tensor | None = None, momentum_text_features: Tensor | None = None,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The sigmoid loss of one batch (the in-batch VSE of ``warmup_loss`` while ``warmup``).

        Returns:
            ``(loss, diagnostics)``: ``train/logit_scale`` and ``train/logit_bias``; with ``fne``
            the Gaussians; on data with declared positives ``fn_mass`` (the share of
            ``sigmoid(logit)`` times each term's weight over negatives, each negative's push, that falls
            on true matches),
            ``hardest_fn_rate``, ``fn_base_rate``, ``score_auc`` (image anchors).
        """
        with torch.autocast(image_features.device.type, enabled=False):
            v, t = image_features.float(), text_features.float()
            self._update_stats(v, t, image_ids)
            if warmup:
                loss, diagnostics = self._warmup(v, t, image_ids, text_ids)
            else:
                loss, diagnostics = self._sigmoid(v, t, image_ids, text_ids)
            diagnostics.update(self._fne_diagnostics())
        return loss, diagnostics

    def _sigmoid(self, v: Tensor, t: Tensor, image_ids: Tensor, text_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        scale, bias = self._scale_and_bias()
        assert bias is not None  # SigLIP always has a bias
        coefficients, gaussians = self._coefficients()
        texts = gather_with_grad(t) if self.gather_batch else t
        cand_image_ids = gather_no_grad(image_ids) if self.gather_batch else image_ids
        cand_text_ids = gather_no_grad(text_ids) if self.gather_batch else text_ids
        same = image_ids[:, None] == cand_image_ids[None, :]  # (B, M)
        negative = ~same
        with torch.no_grad():
            s = v.detach() @ texts.detach().T  # (B, M)
            truth = (self.positives.contains(image_ids[:, None], cand_text_ids[None, :])
                     if self.positives.available else None)
            log_w, attract = self._false_negative_terms(s, negative, truth, coefficients)
            expected = self._posterior_targets(s, negative, coefficients)
            labels = same | attract if attract is not None else same
            if attract is not None:
                negative = negative & ~attract
            weights = log_w.exp() if log_w is not None else None  # (B, M): 1 - p_fn, or 0 where removed
        logits = scale * (v @ texts.T) + bias  # (B, M)
        if expected is None:
            terms = torch.nn.functional.logsigmoid(torch.where(labels, logits, -logits))
        else:  # soft labels y: y log sigmoid(z) + (1 - y) log sigmoid(-z) = log sigmoid(-z) + y z
            terms = torch.nn.functional.logsigmoid(-logits) + (labels.float() + expected) * logits
        if weights is not None:
            terms = terms * weights
        loss = -terms.sum() / v.shape[0]
        diagnostics: dict[str, Tensor] = {"train/logit_scale": scale.detach(), "train/logit_bias": bias.detach()}
        if truth is not None:
            with torch.no_grad():
                # A term's push is the gradient of the loss with respect to its logit: weighted as the term.
                push = torch.sigmoid(logits.detach())
                if weights is not None:
                    push = push * weights
                diagnostics.update(_mean_directions([self._truth_diagnostics(s, push, negative, truth, coefficients)]))
        if self.prior == "estimated" and gaussians is not None and coefficients is not None:
            with torch.no_grad():  # one EM step of the candidates' mixture, as InfoNCE (image anchors only)
                p_fn = posterior_log_odds(s, coefficients).sigmoid_()
                sums = torch.cat([torch.count_nonzero(negative).double()[None],
                                  candidate_mixture_sums(s, p_fn, negative)])
                prior, mixture = mixture_step(all_reduce_sum(sums), gaussians.ready, self.prior_estimate,
                                              self.mixture)
                self.prior_estimate.copy_(prior)
                self.mixture.copy_(mixture)
        return loss, diagnostics
