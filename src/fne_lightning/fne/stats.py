"""Running statistics of matched and unmatched similarities: the two Gaussians of FNE.

FNE (Li et al., ACM MM 2023, arXiv 2308.04380; FNE_SPEC section 4) models the score of a
true match as N(mu+, var+) and of a non-match as N(mu-, var-), both fitted on the
in-batch ONLINE similarities S = V T^T (B, B) of "confidently matched" pairs. The
posterior of section 5 then applies them to the candidate scores (online anchor vs
momentum/bank candidate), which are a different kind of similarity; we say so here
because the published code does it silently (FNE_SPEC section 11).

Each batch contributes exact moments (count, mean, M2); batches and ranks are merged
with the parallel algorithm of Chan, Golub and LeVeque (1979), so the running variance
equals the unbiased variance over all samples seen, with no moving mean and no drift
(the published code keeps a variance against a moving mean). Everything stays on the
device in float64; no step needs a host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fne_lightning.utils.distributed import gather_no_grad, is_distributed

# Smallest variance reported by `SimilarityStats`: the posterior divides by the
# variances, so a degenerate fit (fewer than 2 samples, or identical samples) must not
# be 0. 1e-6 is a standard deviation of 1e-3 in cosine units, far below any real spread.
VAR_FLOOR = 1e-6


class Gaussians(NamedTuple):
    """Snapshot of :class:`SimilarityStats` for :func:`~fne_lightning.fne.negatives.fne_weights`.

    Every field is a 0-d fp32 tensor (``ready`` a bool one), so callers can branch with
    ``torch.where`` and never sync.
    """

    pos_mean: Tensor  #: Mean similarity of the positives (mu+).
    pos_var: Tensor  #: Variance of the positives.
    neg_mean: Tensor  #: Mean similarity of the negatives (mu-).
    neg_var: Tensor  #: Variance of the negatives.
    ready: Tensor  #: Bool, at least ``min_pos_samples`` positives were seen.
    pos_count: Tensor  #: The number of positive samples seen.


def confident_samples(similarities: Tensor, same_image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Positive and negative samples of the confidently matched pairs of a batch (FNE_SPEC section 4).

    Pair i is confident when S_ii >= every entry of row i and of column i (ties count as
    confident: S_ii is then still a largest entry). Its samples are S_ii (a positive) and the
    hardest entry of row i and of column i that is not same-image (two negatives). A row or
    column without a different-image entry gives no negative.

    Args:
        similarities: (B, B) in-batch similarities, S[i, j] = v_i . t_j.
        same_image: (B, B) bool, True where image i and caption j show the same image (the
            diagonal is always treated as True).

    Returns:
        ``(pos_values, pos_mask, neg_values, neg_mask)``, of shapes (B,), (B,), (2B,) and
        (2B,), the negatives of the rows first and then those of the columns; masks rather
        than boolean indexing, which would sync.
    """
    s = similarities.detach()
    b = s.shape[0]
    if b == 0:  # a shape, not a value: no sync; amax over an empty dim would raise
        empty = s.new_zeros(0)
        return empty, empty.bool(), empty, empty.bool()
    diag = s.diagonal()  # (B,)
    confident = (diag >= s.amax(dim=1)) & (diag >= s.amax(dim=0))  # (B,)
    excluded = same_image | torch.eye(b, dtype=torch.bool, device=s.device)  # (B, B)
    negatives = s.masked_fill(excluded, float("-inf"))  # (B, B)
    row_hardest = negatives.amax(dim=1)  # (B,); -inf where no valid negative
    col_hardest = negatives.amax(dim=0)
    has_row = ~excluded.all(dim=1)
    has_col = ~excluded.all(dim=0)
    neg_values = torch.cat([row_hardest, col_hardest])  # (2B,)
    neg_mask = torch.cat([confident & has_row, confident & has_col])  # (2B,)
    return diag, confident, neg_values, neg_mask


def masked_moments(values: Tensor, mask: Tensor) -> Tensor:
    """Count, mean and sum of squared deviations (m2) of ``values[mask]``, without a sync.

    Args:
        values: a tensor of samples; masked-out entries may be non-finite (e.g. -inf
            placeholders), they never enter the sums.
        mask: bool, the same shape: the samples to use.

    Returns:
        (3,) float64 ``[count, mean, m2]``; zeros for an empty selection.
    """
    x = torch.where(mask, values.double(), 0.0)
    weight = mask.double()
    count = weight.sum()
    mean = x.sum() / count.clamp(min=1.0)
    m2 = ((x - mean) * weight).square().sum()
    return torch.stack([count, mean, m2])


def merge_moments(a: Tensor, b: Tensor) -> Tensor:
    """Merge the moments of two disjoint sample sets (Chan, Golub and LeVeque).

    Args:
        a: (..., 3) ``[count, mean, m2]`` of the first set.
        b: (..., 3) those of the second set.

    Returns:
        (..., 3) the moments of the union; two empty sets give zeros.
    """
    na, ma, m2a = a.unbind(-1)
    nb, mb, m2b = b.unbind(-1)
    n = na + nb
    # clamp: two empty sets merge to zeros instead of 0/0.
    frac_b = nb / n.clamp(min=1.0)
    delta = mb - ma
    mean = ma + delta * frac_b
    m2 = m2a + m2b + delta.square() * na * frac_b
    return torch.stack([n, mean, m2], dim=-1)


def merge_moments_stack(moments: Tensor) -> Tensor:
    """Merge a stack of moments of W disjoint sets (e.g. one per rank) into one, exactly.

    The closed form of W-1 pairwise Chan merges: n = sum n_w, mean = sum n_w mean_w / n,
    m2 = sum m2_w + sum n_w (mean_w - mean)^2.

    Args:
        moments: (W, ..., 3) ``[count, mean, m2]`` of each set.

    Returns:
        (..., 3) the moments of the union.
    """
    n_w, mean_w, m2_w = moments.unbind(-1)  # each (W, ...)
    n = n_w.sum(0)
    mean = (n_w * mean_w).sum(0) / n.clamp(min=1.0)
    m2 = m2_w.sum(0) + (n_w * (mean_w - mean).square()).sum(0)
    return torch.stack([n, mean, m2], dim=-1)


class SimilarityStats(nn.Module):
    """Running count, mean and M2 of the positive and negative similarities: the two Gaussians.

    The six float64 buffers (``pos_count``, ``pos_mean``, ``pos_m2`` and the same for ``neg``)
    are persistent (saved in checkpoints). Beware ``module.to(dtype)`` / ``.half()``: like every
    floating buffer they would be cast; keep this module out of such casts. :meth:`reset` at
    the start of every epoch reproduces the published behaviour (the caller decides; FNE_SPEC
    section 4).
    """

    pos_count: Tensor
    pos_mean: Tensor
    pos_m2: Tensor
    neg_count: Tensor
    neg_mean: Tensor
    neg_m2: Tensor

    def __init__(self, min_pos_samples: int = 200) -> None:
        """Start with no samples.

        Args:
            min_pos_samples: positive samples needed before :attr:`ready`.

        Raises:
            ValueError: ``min_pos_samples < 0``.
        """
        super().__init__()
        if min_pos_samples < 0:
            raise ValueError(f"min_pos_samples={min_pos_samples}: expected >= 0")
        self.min_pos_samples = min_pos_samples
        for name in ("pos_count", "pos_mean", "pos_m2", "neg_count", "neg_mean", "neg_m2"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, similarities: Tensor, same_image: Tensor) -> None:
        """Add the confident samples of one batch (:func:`confident_samples`).

        Under DDP each rank's (count, mean, m2) are all-gathered and merged, so every
        rank ends with the statistics of the global batch (all ranks must call this).

        Args:
            similarities: (B, B) in-batch online similarities, S[i, j] = v_i . t_j.
            same_image: (B, B) bool, True where image i and caption j show the same image.
        """
        pos_values, pos_mask, neg_values, neg_mask = confident_samples(similarities, same_image)
        batch = torch.stack(
            [masked_moments(pos_values, pos_mask), masked_moments(neg_values, neg_mask)]
        )  # (2, 3)
        if is_distributed():
            batch = merge_moments_stack(gather_no_grad(batch.unsqueeze(0)))  # (W, 2, 3) -> (2, 3)
        running = torch.stack(
            [
                torch.stack([self.pos_count, self.pos_mean, self.pos_m2]),
                torch.stack([self.neg_count, self.neg_mean, self.neg_m2]),
            ]
        )  # (2, 3)
        merged = merge_moments(running, batch.to(running))
        for i, name in enumerate(("pos", "neg")):
            getattr(self, f"{name}_count").copy_(merged[i, 0])
            getattr(self, f"{name}_mean").copy_(merged[i, 1])
            getattr(self, f"{name}_m2").copy_(merged[i, 2])

    @torch.no_grad()
    def reset(self) -> None:
        """Forget all samples (zero every buffer)."""
        for buf in self.buffers():
            buf.zero_()

    @property
    def ready(self) -> Tensor:
        """Whether at least ``min_pos_samples`` positives were seen (a 0-d bool tensor)."""
        return self.pos_count >= self.min_pos_samples

    @staticmethod
    def _var(count: Tensor, m2: Tensor) -> Tensor:
        # Unbiased (ddof=1); VAR_FLOOR when count < 2 or the samples coincide.
        return (m2 / (count - 1.0).clamp(min=1.0)).clamp(min=VAR_FLOOR)

    @property
    def pos_var(self) -> Tensor:
        """Unbiased variance of the positives, float64, at least ``VAR_FLOOR``."""
        return self._var(self.pos_count, self.pos_m2)

    @property
    def neg_var(self) -> Tensor:
        """Unbiased variance of the negatives, float64, at least ``VAR_FLOOR``."""
        return self._var(self.neg_count, self.neg_m2)

    def gaussians(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The two Gaussians, ``(pos_mean, pos_var, neg_mean, neg_var)``, as 0-d float32 tensors."""
        return (
            self.pos_mean.float(),
            self.pos_var.float(),
            self.neg_mean.float(),
            self.neg_var.float(),
        )

    def snapshot(self) -> Gaussians:
        """All that :func:`~fne_lightning.fne.negatives.fne_weights` needs, as tensors (no host sync)."""
        return Gaussians(*self.gaussians(), ready=self.ready, pos_count=self.pos_count.float())
