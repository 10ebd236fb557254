"""How well a score separates true matches from true negatives, on data whose truth is known.

On data with extra positives (FNE_SPEC section 10; the synthetic benchmark always) FNE's loss
reports, for the candidates of every step, the share that truly match (the base rate), the
precision of the candidates it flags as probable false negatives, and the ROC AUC of its
evidence: the false-negative posterior p_fn and, for comparison, the raw anchor-candidate score.
Everything is whole-tensor, without host syncs, so it can run in every training step.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def binned_auc(scores: Tensor, positive: Tensor, negative: Tensor, lo: float, hi: float,
               bins: int = 2048) -> Tensor:
    """ROC AUC of ``scores`` ranking the ``positive`` entries above the ``negative`` ones.

    The Mann-Whitney statistic over a histogram of ``bins`` equal bins on ``[lo, hi]`` (scores
    outside are clamped to the ends): pairs in the same bin count one half, as ties do, so the
    result is the exact AUC of the scores rounded to their bin. No sort and no host sync: two
    ``scatter_add_`` into (bins,) counts.

    Args:
        scores: the scores, any shape (e.g. (B, N) anchor-candidate scores).
        positive: bool mask of the same shape: the true matches.
        negative: bool mask of the same shape: the true negatives.
        lo: the low end of the histogram.
        hi: the high end.
        bins: the number of bins.

    Returns:
        The 0-d AUC; 0.5 when either class is empty.
    """
    index = ((scores.detach().float().clamp(lo, hi) - lo) * ((bins - 1) / (hi - lo))).round_().long().flatten()
    pos = torch.zeros(bins, device=scores.device).scatter_add_(0, index, positive.flatten().float())
    neg = torch.zeros(bins, device=scores.device).scatter_add_(0, index, negative.flatten().float())
    below = neg.cumsum(0) - neg  # negatives strictly below each bin
    pairs = pos.sum() * neg.sum()
    auc = (pos * (below + 0.5 * neg)).sum() / pairs.clamp(min=1.0)
    return torch.where(pairs > 0, auc, 0.5)  # a Python scalar: no host-to-device copy (a sync on a GPU)

