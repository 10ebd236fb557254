"""False-negative handling for contrastive objectives (InfoNCE, SigLIP): targets, weights, distillation.

Plain functions of (B, M) anchor-candidate tensors, shared by
:class:`~fne_lightning.losses.contrastive.InfoNCELoss` and
:class:`~fne_lightning.losses.contrastive.SigLIPLoss` (FNE_SPEC section 13):

* image-id targets: every candidate of the anchor's own image is a positive, and the target
  spreads uniformly over them (ALBEF, Li et al., NeurIPS 2021), instead of CLIP's one-hot target
  that treats the other captions of the same image as negatives;
* FNE's posterior as log-weights: a negative's term of the softmax denominator is weighted by
  ``1 - p_fn`` by adding ``log(1 - p_fn) = -softplus(logit p_fn)`` to its logit (exact where p_fn
  saturates), or removed (``-inf``) above ``exclude``;
* FNE's posterior as targets: each candidate's expected label under the posterior (1 for a
  positive, ``p_fn`` for a negative), normalised, the posterior's counterpart of the oracle that
  attracts the true matches;
* momentum distillation (ALBEF): the targets mix the momentum model's softmax with the id targets;
* a cross-entropy against soft targets that accepts ``-inf`` logits (removed candidates);
* what share of the loss's push on negatives falls on true matches (the diagnostic ``fn_mass``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fne_lightning.fne.negatives import posterior_log_odds


def id_targets(positive: Tensor) -> Tensor:
    """Targets spread uniformly over each anchor's positives.

    Args:
        positive: (B, M) bool, the candidates that are positives of anchor i (at least one per row).

    Returns:
        (B, M) float32 rows summing to 1 (0 for a row without positives).
    """
    targets = positive.float()
    return targets / targets.sum(1, keepdim=True).clamp(min=1.0)


@torch.no_grad()
def expected_targets(positive: Tensor, p_match: Tensor) -> Tensor:
    """Each candidate's expected label under the posterior, normalised per row.

    The label of a positive is 1 and that of a negative is 1 with probability ``p_fn``, so the
    expected labels are ``positive + p_fn``; spread as :func:`id_targets` spreads the positives' 1s.
    With ``p_match`` the 0/1 truth of the negatives, this is :func:`id_targets` of the positives and
    the true matches together (the attracting oracle).

    Args:
        positive: (B, M) bool, the anchor's positives (at least one per row).
        p_match: (B, M) ``p_fn`` of each negative, 0 elsewhere.

    Returns:
        (B, M) float32 rows summing to 1.
    """
    labels = positive.float() + p_match
    return labels / labels.sum(1, keepdim=True).clamp(min=torch.finfo(labels.dtype).tiny)


@torch.no_grad()
def posterior_log_weights(scores: Tensor, coefficients: Tensor, exclude: float | None = None) -> Tensor:
    """``log(1 - p_fn(s))`` of every candidate, ``-inf`` where ``p_fn > exclude``.

    Added to a negative's logit, it weights that term of the softmax denominator by ``1 - p_fn``.
    Computed from the posterior's logit x as ``-softplus(x)``: exact where p_fn rounds to 1 in
    float32 (the weight is then tiny, not 0, unless ``exclude`` removes it).

    Args:
        scores: (B, M) anchor-candidate cosine scores.
        coefficients: (3,) :func:`~fne_lightning.fne.negatives.posterior_coefficients` of the step.
        exclude: None, or a probability in [0, 1): candidates above it are removed.

    Returns:
        (B, M) float32 log-weights, <= 0.
    """
    log_odds = posterior_log_odds(scores, coefficients)  # (B, M)
    weights = -F.softplus(log_odds)
    if exclude is not None:
        bound = math.log(exclude / (1.0 - exclude)) if exclude > 0.0 else -math.inf
        weights = weights.masked_fill(log_odds > bound, float("-inf"))
    return weights


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``-sum_j y_ij log softmax_j(logits_i)`` per row, with ``-inf`` logits allowed where ``y_ij = 0``.

    Args:
        logits: (B, M) logits; ``-inf`` removes a candidate from the softmax.
        targets: (B, M) non-negative targets, rows summing to 1, 0 wherever the logit is ``-inf``.

    Returns:
        (B,) the loss of each row.
    """
    log_probs = torch.log_softmax(logits, dim=1)
    # 0 * -inf would be nan: only the entries with a target count.
    return -torch.where(targets > 0, targets * log_probs, log_probs.new_zeros(())).sum(1)


@torch.no_grad()
def distillation_targets(momentum_logits: Tensor, targets: Tensor, alpha: float | Tensor) -> Tensor:
    """ALBEF's soft targets: ``alpha * softmax(momentum logits) + (1 - alpha) * targets``.

    Args:
        momentum_logits: (B, M) the momentum model's scaled scores of the same candidates, ``-inf``
            where a candidate is absent.
        targets: (B, M) the hard (id) targets.
        alpha: the distillation weight (ALBEF: 0.4, ramped up over the first epoch).

    Returns:
        (B, M) targets, rows summing to 1.
    """
    return alpha * torch.softmax(momentum_logits, dim=1) + (1.0 - alpha) * targets


@torch.no_grad()
def negative_mass(push: Tensor, negative: Tensor, truth: Tensor) -> Tensor:
    """How much of a loss's push on negatives falls on true matches: ``[on true matches, on all]``.

    For InfoNCE the push on a negative is its softmax probability (the gradient of the loss with
    respect to its logit); for the sigmoid loss, ``sigmoid(logit)`` times the term's weight (the
    gradient of that term). The share
    ``sums[0] / sums[1]`` over a step is the diagnostic ``fn_mass``.

    Args:
        push: (B, M) non-negative weights of the candidates.
        negative: (B, M) bool, the candidates the loss treats as negatives.
        truth: (B, M) bool, the candidates that truly match their anchor.

    Returns:
        (2,) float64 sums.
    """
    on_negatives = push * negative
    return torch.stack([(on_negatives * truth).sum(1).double().sum(), on_negatives.sum(1).double().sum()])
