"""The estimated prior (``loss.prior=estimated``, beyond the paper): the candidates' scores as a
two-component Gaussian mixture, matches and non-matches, fitted by one online EM step per
training step.

The published posterior uses a fixed prior (``match_prior``) and Gaussians fitted on confidently
matched in-batch pairs and their hardest negatives, not on the candidates it is applied to
(FNE_SPEC section 11). Here the E-step takes each valid candidate's responsibility r = p_fn under
the current estimates, the M-step sets the prior to the mean r and each component's mean and
variance to the r- or (1 - r)-weighted moments. The fit starts from ``match_prior`` and the
published Gaussians once those are ready. Plain functions of tensors: the loss (FNE, or a
contrastive loss with ``false_negatives=fne``) owns the two buffers, ``prior_estimate`` (0-d
float64) and ``mixture`` (4,) float64 (pos_mean, pos_var, neg_mean, neg_var; all 0 until fitted).
What it measured: docs: results/synthetic-fn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fne_lightning.fne.stats import VAR_FLOOR, Gaussians

PRIORS = ("fixed", "estimated")
# Bounds of the estimated prior: above 0.5 matches would outnumber non-matches among the
# negatives; below 1e-6 the estimate could never recover in float32 sigmoid arithmetic.
PRIOR_BOUNDS = (1e-6, 0.5)


def mixture_gaussians(published: Gaussians, mixture: Tensor | None) -> Gaussians:
    """The Gaussians the posterior uses: the published fit, or the mixture's components once fitted.

    Args:
        published: the snapshot of the confident-pair statistics (:class:`~fne_lightning.fne.stats.Gaussians`).
        mixture: (4,) float64 mixture estimate, or None (``prior=fixed``).

    Returns:
        ``published`` with its four moments replaced by the mixture's when it is fitted.
    """
    if mixture is None:
        return published
    fitted = mixture[3] > 0
    moments = torch.where(fitted, mixture.float(), torch.stack(list(published[:4])))
    return published._replace(pos_mean=moments[0], pos_var=moments[1], neg_mean=moments[2], neg_var=moments[3])


def candidate_mixture_sums(scores: Tensor, p_fn: Tensor, valid: Tensor) -> Tensor:
    """The E-step's sums over the valid candidates of one direction.

    The (1 - r) sums are the valid entries' totals minus the r sums, so no (1 - r) buffer is
    formed. Each row is summed in float32 (pairwise, relative error about 1e-7 at 65k columns) and
    the B row sums in float64: ``sum(dtype=float64)`` over (B, N) converts every element and took
    2.7x as long on a CPU.

    Args:
        scores: (B, N) anchor-candidate scores.
        p_fn: (B, N) the posterior under the current estimates (the responsibilities r).
        valid: (B, N) bool, the candidates that count.

    Returns:
        (6,) float64 ``[sum r, sum r s, sum r s^2, sum (1-r), sum (1-r) s, sum (1-r) s^2]``.
    """
    f64 = torch.float64

    def total(x: Tensor) -> Tensor:
        return x.sum(dim=1).to(f64).sum()

    r = p_fn * valid  # (B, N), 0 off the valid entries
    rs, vs = r * scores, scores * valid
    r_sums = torch.stack([total(r), total(rs), total(rs.mul_(scores))])
    totals = torch.stack([torch.count_nonzero(valid).to(f64), total(vs), total(vs.mul_(scores))])
    return torch.cat([r_sums, totals - r_sums])


@torch.no_grad()
def mixture_step(sums: Tensor, ready: Tensor, prior: Tensor, mixture: Tensor) -> tuple[Tensor, Tensor]:
    """One M-step from a step's sums over every rank and direction.

    Args:
        sums: (7,) float64 ``[count, sum r, sum r s, sum r s^2, sum (1-r), sum (1-r) s,
            sum (1-r) s^2]``, the valid candidates' count and the sums of
            :func:`candidate_mixture_sums` (both directions added, all-reduced over ranks).
        ready: 0-d bool, the published Gaussians are ready (they start the fit).
        prior: 0-d float64, the current prior estimate.
        mixture: (4,) float64, the current mixture.

    Returns:
        The new ``(prior, mixture)``; unchanged when not ready or a component got no weight.
    """
    n, r, rs, rs2, w, ws, ws2 = sums.double().unbind()
    new_prior = (r / n.clamp(min=1)).clamp(*PRIOR_BOUNDS)
    pos_mean, neg_mean = rs / r.clamp(min=1e-12), ws / w.clamp(min=1e-12)
    pos_var = (rs2 / r.clamp(min=1e-12) - pos_mean.square()).clamp(min=VAR_FLOOR)
    neg_var = (ws2 / w.clamp(min=1e-12) - neg_mean.square()).clamp(min=VAR_FLOOR)
    update = ready & (r > 0) & (w > 0)
    return (torch.where(update, new_prior, prior),
            torch.where(update, torch.stack([pos_mean, pos_var, neg_mean, neg_var]), mixture))
