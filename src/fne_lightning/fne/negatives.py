"""FNE sampling weights and negative sampling, vectorised over anchors (FNE_SPEC sections 5-6).

Li et al., "Your Negative May not Be True Negative: Boosting Image-Text Matching with
False Negative Elimination", ACM MM 2023 (arXiv 2308.04380). For each anchor i and
candidate j (score s_ij, positive score s_i+), the weight w_ij of :func:`fne_weights` is:

1. the hardness weight ``w_ij = exp(-tau (s_ij - s_i+)^2)`` (all there is with
   ``posterior=False, cutdown=None``);
2. once the Gaussians are ready, with the false-negative posterior
   ``p_fn(s) = sigmoid(log N+(s) - log N-(s) - log(1/match_prior - 1))``: for the ``reference``
   weighting (published) ``w_ij = exp(-tau p_fn)`` where ``p_fn > 1 - false_margin``, for the
   ``complement`` weighting ``w_ij = (1 - p_fn) w_ij``;
3. the cut-down: ``w_ij = 0`` where ``s_ij <= mu+ - cutdown`` (mu+ the running mean of the
   positives; no cut-down before any positive was seen);
4. 0 for positives and invalid slots;
5. a row whose weights are all 0 takes its hardest valid negative.

Options beyond the paper: ``exclude`` (of :func:`fne_weights`) removes the candidates whose
posterior exceeds it (weight 0) instead of down-weighting them, and ``match_prior`` may be a 0-d
tensor (e.g. the prior that :class:`~fne_lightning.losses.fne.FNELoss` estimates with
``prior=estimated``).

One negative per anchor is drawn with probability proportional to w by inverse-CDF
sampling. The published code loops over anchors with ``.item()``; here every function is
whole-tensor, with no host sync (no ``.item()``, ``bool(tensor)``, ``nonzero`` or boolean-mask
indexing), so a step never waits for the device. Weights need no gradient and are
computed under no_grad in fp32, in place where the memory is ours: on CPU a fresh
(B, B + K) buffer costs more in page faults than the arithmetic done on it.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from fne_lightning.fne.stats import Gaussians

Weighting = Literal["reference", "complement"]


class FNEWeights(NamedTuple):
    """What :func:`fne_weights` returns, every field (B, N)."""

    #: Sampling weights, 0 for invalid, cut or positive candidates.
    weights: Tensor
    #: Bool, the probable false negatives (valid, Gaussians ready and ``p_fn > 1 - false_margin``),
    #: also computed with ``posterior=False``, for diagnostics.
    flagged: Tensor
    #: Bool, the valid candidates zeroed by the cut-down.
    cut: Tensor
    #: The false-negative posterior (meaningful only once the Gaussians are ready).
    p_fn: Tensor


@torch.no_grad()
def posterior_coefficients(
    pos_mean: Tensor | float,
    pos_var: Tensor | float,
    neg_mean: Tensor | float,
    neg_var: Tensor | float,
    match_prior: float | Tensor,
    device: torch.device | str | None = None,
) -> Tensor:
    """The coefficients of the posterior's logit ``(A s + B) s + C``, a quadratic in the score s.

    Formed in float64 (see :func:`false_negative_posterior`); the same for every score of a
    step, so a caller scoring two directions forms them once.

    Args:
        pos_mean: mean of the positives' Gaussian N+.
        pos_var: its variance.
        neg_mean: mean of the negatives' Gaussian N-.
        neg_var: its variance.
        match_prior: the prior probability of a match, a float in (0, 1) or a 0-d tensor.
        device: where to put the result.

    Returns:
        (3,) float32 ``[A, B, C]``.

    Raises:
        ValueError: a float ``match_prior`` outside (0, 1).
    """
    if not isinstance(match_prior, Tensor) and not 0.0 < match_prior < 1.0:
        raise ValueError(f"match_prior={match_prior}: expected 0 < match_prior < 1")
    mp, vp, mn, vn = (torch.as_tensor(x, dtype=torch.float64, device=device)
                      for x in (pos_mean, pos_var, neg_mean, neg_var))
    # log N+(s) - log N-(s) = (s - mn)^2 / 2vn - (s - mp)^2 / 2vp + 0.5 log(vn / vp)
    a = 0.5 / vn - 0.5 / vp
    b = mp / vp - mn / vn
    c = (
        0.5 * mn.square() / vn
        - 0.5 * mp.square() / vp
        + 0.5 * torch.log(vn / vp)
        + (torch.logit(match_prior.to(torch.float64)) if isinstance(match_prior, Tensor)
           else -math.log(1.0 / match_prior - 1.0))
    )
    return torch.stack([a, b, c]).float()


@torch.no_grad()
def false_negative_posterior(
    scores: Tensor,
    pos_mean: Tensor | float,
    pos_var: Tensor | float,
    neg_mean: Tensor | float,
    neg_var: Tensor | float,
    match_prior: float | Tensor,
    coefficients: Tensor | None = None,
) -> Tensor:
    """The probability that a candidate with score s is a false negative (FNE_SPEC section 5).

    ``p_fn(s) = sigmoid(log N+(s) - log N-(s) - log(1/match_prior - 1))``, computed in log
    space: the density ratio of two far-apart Gaussians overflows or underflows fp32, its
    logarithm does not, and sigmoid saturates cleanly to 0 or 1. The log ratio is a quadratic
    in s; its coefficients are formed in float64 and it is evaluated as ``(A s + B) s + C`` on
    one fp32 buffer (3 passes instead of 8 and one buffer instead of two). The absolute error
    of the logit is then about ``6e-8 (|A| + |B| + |C|)``: 1e-5 for variances near 0.01, and
    only near the 1e-6 variance floor (a degenerate fit) as large as 0.1.

    Args:
        scores: anchor-candidate similarities, any shape.
        pos_mean: mean of the positives' Gaussian N+.
        pos_var: its variance.
        neg_mean: mean of the negatives' Gaussian N-.
        neg_var: its variance.
        match_prior: the prior probability of a match, a float in (0, 1) or a 0-d tensor of
            such a value (no host sync).
        coefficients: :func:`posterior_coefficients` of these arguments, if the caller has them.

    Returns:
        p_fn, fp32, of the shape of ``scores``.
    """
    if coefficients is None:
        coefficients = posterior_coefficients(pos_mean, pos_var, neg_mean, neg_var, match_prior, scores.device)
    return posterior_log_odds(scores, coefficients).sigmoid_()


@torch.no_grad()
def posterior_log_odds(scores: Tensor, coefficients: Tensor) -> Tensor:
    """The logit of the false-negative posterior, ``(A s + B) s + C``.

    :func:`false_negative_posterior` is its sigmoid, to the bit. It ranks the candidates as
    p_fn does without saturating where p_fn rounds to 0 or 1.

    Args:
        scores: anchor-candidate similarities, any shape.
        coefficients: (3,) ``[A, B, C]`` of :func:`posterior_coefficients`.

    Returns:
        The logit, fp32, of the shape of ``scores``.
    """
    s = scores.float()
    a, b, c = coefficients.unbind()
    logit = torch.addcmul(b, s, a)  # (B, N), the only buffer
    return logit.mul_(s).add_(c)


@torch.no_grad()
def fne_weights(
    scores: Tensor,
    positive_scores: Tensor,
    valid: Tensor,
    gaussians: Gaussians,
    *,
    tau: float = 0.5,
    match_prior: float | Tensor = 1e-4,
    false_margin: float = 0.999,
    weighting: Weighting = "reference",
    cutdown: float | None = 0.2,
    posterior: bool = True,
    exclude: float | None = None,
    cutdown_mean: Tensor | None = None,
    coefficients: Tensor | None = None,
) -> FNEWeights:
    """Sampling weight of every candidate (FNE_SPEC section 6).

    Steps 1-4 of the list of :mod:`fne_lightning.fne.negatives`, computed in fp32 without
    gradient. The Gaussians gate the posterior and the cut-down through
    ``torch.where``, not Python branches, so nothing syncs.

    Args:
        scores: (B, N) anchor-candidate similarities.
        positive_scores: (B,) each anchor's positive score s_i+.
        valid: (B, N) bool, False for positives (same image id) and never-written bank slots.
        gaussians: the Gaussians (e.g. :meth:`SimilarityStats.snapshot()
            <fne_lightning.fne.stats.SimilarityStats.snapshot>`); their ``ready`` gates step 2 and
            their ``pos_count`` the cut-down.
        tau: the hardness temperature.
        match_prior: the prior probability of a match (a float, or a 0-d tensor).
        false_margin: candidates with ``p_fn > 1 - false_margin`` are flagged.
        weighting: ``reference`` (published) or ``complement``.
        cutdown: the cut-down distance below mu+; None skips step 3.
        posterior: False skips step 2 (the weights are the hardness weights).
        exclude: None, or a probability: candidates with ``p_fn > exclude`` are the flagged ones
            instead of those above ``1 - false_margin``, and their weight is 0 (removed, whatever
            the weighting; with ``posterior=False`` they are only reported).
        cutdown_mean: the mu+ of the cut-down (0-d tensor) when it is not the posterior's
            ``gaussians.pos_mean``.
        coefficients: the posterior's :func:`posterior_coefficients`, if the caller has formed
            them already.

    Returns:
        The weights, with the flagged and cut masks and p_fn, each (B, N).

    Raises:
        ValueError: ``exclude`` outside [0, 1) or an unknown ``weighting``.
    """
    if exclude is not None and not 0.0 <= exclude < 1.0:
        raise ValueError(f"exclude={exclude}: expected null or 0 <= exclude < 1")
    if weighting not in ("reference", "complement"):
        raise ValueError(f"weighting={weighting!r}: expected 'reference' or 'complement'")
    g = gaussians
    s = scores.detach().float()  # (B, N); may alias `scores`: never written in place
    p_fn = false_negative_posterior(s, g.pos_mean, g.pos_var, g.neg_mean, g.neg_var, match_prior,
                                    coefficients)  # (B, N)
    # `ready` and `pos_count` gate through 0-d thresholds (+inf: never flagged, -inf: never
    # cut), not through a broadcast bool op over (B, N), which is a slow path on CPU.
    flag_at = 1.0 - false_margin if exclude is None else exclude
    flag_threshold = torch.where(g.ready, flag_at, float("inf"))  # ()
    flagged = torch.gt(p_fn, flag_threshold).logical_and_(valid)  # (B, N)
    # Both rules of the reference weighting are exp(-tau x): x = (s - s+)^2, or x = p_fn
    # on flagged candidates, so the replacement happens before the one exp, in place
    # (flagged is False on invalid entries, which are zeroed below anyway).
    w = s - positive_scores.detach().float().unsqueeze(1)  # (B, N), the weights' buffer
    w.square_()
    if posterior and weighting == "reference":  # Python flags, not tensor values: no sync
        torch.where(flagged, p_fn, w, out=w)
    w.mul_(-tau).exp_()
    if posterior and weighting == "complement":
        # w (1 - p_fn) once ready, else w. (An in-place addcmul_ aliasing w took 6x as long.)
        w.mul_(p_fn.mul(g.ready).neg_().add_(1.0))
    if cutdown is None:
        cut = torch.zeros_like(valid)
        keep = valid
    else:
        mu = g.pos_mean if cutdown_mean is None else cutdown_mean
        cut_threshold = torch.where(g.pos_count > 0, mu.float() - cutdown, float("-inf"))  # ()
        cut = torch.le(s, cut_threshold).logical_and_(valid)  # (B, N)
        keep = valid.logical_xor(cut)  # cut is a subset of valid: valid & ~cut
    if posterior and exclude is not None:
        keep = keep.logical_and(flagged.logical_not())
    # w is finite and >= 0, so multiplying by the mask is exactly `where(keep, w, 0)`, 5x faster on
    # the CPU than `torch.where(..., out=w)` with a 0-d zero.
    w.mul_(keep)
    return FNEWeights(w, flagged, cut, p_fn)


@torch.no_grad()
def hardest_negatives(scores: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """The highest-scoring valid candidate of each anchor.

    Args:
        scores: (B, N) finite similarities (cosines are).
        valid: (B, N) bool, the candidates that may be negatives.

    Returns:
        ``(index, has_negative)``: (B,) long and (B,) bool. A row with no valid candidate gets
        index 0 (in range) and has_negative False.
    """
    return _hardest(torch.where(valid, scores.detach(), float("-inf")), valid)


def _hardest(masked: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    # A row with a valid candidate has a finite maximum at a valid index, a row without one
    # has -inf everywhere and index 0, so `valid` at the index says which (cheaper than
    # `valid.any(dim=1)`).
    index = first_max_index(masked)  # (B,)
    return index, valid.gather(1, index.unsqueeze(1)).squeeze(1)


def first_max_index(x: Tensor, block: int = 64) -> Tensor:
    """The index of the first maximum of each row: ``x.max(dim=1).indices``, faster on a CPU.

    A maximum with indices reduces one element at a time on a CPU (0.15 ms for (32, 8256));
    ``amax`` over blocks of ``block`` columns is vectorised, and the first block holding the
    row's maximum, then the first maximum inside it, is the first maximum of the row (0.03 ms).
    Columns past the last whole block count only when strictly larger, which keeps the first
    occurrence.

    Args:
        x: (B, N) without NaN.
        block: columns per block.

    Returns:
        (B,) long.
    """
    rows, n = x.shape
    blocks = n // block
    if blocks < 2 or x.stride(1) != 1:
        return x.max(dim=1).indices
    body = x[:, : blocks * block].view(rows, blocks, block)  # a view: rows keep their stride
    best, which = body.amax(dim=2).max(dim=1)  # (B,): the maximum and the first block holding it
    inside = body[torch.arange(rows, device=x.device), which].max(dim=1).indices  # (B,)
    index = which * block + inside
    if blocks * block < n:
        tail, tail_index = x[:, blocks * block:].max(dim=1)
        index = torch.where(tail > best, tail_index + blocks * block, index)
    return index


def search_cdf(cdf: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw of one index per row: the first j with ``cdf_j > u * total``.

    A zero weight adds nothing to the cdf, so its index is never the first to exceed the target;
    the result is capped at the last positive weight because ``u * total`` can round up to
    ``total`` in floating point. Rows whose weights are all 0 return an arbitrary in-range index
    (check the weight there).

    Precision: the cumulative sum is fp32, so a candidate's probability is off by up to
    about 2^-24 * total / weight relative (at most 0.4% for weight 1 and 4% for weight
    0.1 at total 65k; the cut-down usually leaves totals far smaller).

    Args:
        cdf: (B, N) row-wise cumulative sums of the weights.
        u: (B,) uniforms in [0, 1).

    Returns:
        (B,) long.
    """
    total = cdf[:, -1:].contiguous()  # (B, 1); searchsorted wants contiguous queries
    index = torch.searchsorted(cdf, u.to(cdf).unsqueeze(1) * total, right=True)  # (B, 1)
    last = torch.searchsorted(cdf, total, right=False)  # (B, 1): the last positive weight
    return torch.minimum(index, last).clamp_(max=cdf.shape[1] - 1).squeeze(1)


@torch.no_grad()
def sample_negatives(
    weights: Tensor,
    scores: Tensor,
    valid: Tensor,
    generator: torch.Generator | None = None,
    *,
    hardest: tuple[Tensor, Tensor] | None = None,
    u: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one candidate per row with probability proportional to ``weights``.

    Inverse-CDF sampling (:func:`search_cdf`), one uniform per row: ``torch.multinomial`` is
    slow over 65k columns on CPU. Zero-weight entries are never drawn; a row whose
    weights are all 0 takes its hardest valid negative (argmax of ``scores`` over
    ``valid``); a row with no valid candidate returns has_negative False and an
    arbitrary in-range index. Weights must be 0 on invalid entries (:func:`fne_weights`
    guarantees it); a draw that still lands on one falls back to the hardest valid
    negative.

    Args:
        weights: (B, N) non-negative sampling weights.
        scores: (B, N) similarities, for the fallback to the hardest valid negative.
        valid: (B, N) bool, the candidates that may be negatives.
        generator: the generator of the uniforms, on the device of ``weights``.
        hardest: ``hardest_negatives(scores, valid)`` (:func:`hardest_negatives`), if the caller
            has it already.
        u: the (B,) uniforms in [0, 1) of the draw, if the caller has drawn them (then
            ``generator`` is unused).

    Returns:
        ``(index, has_negative)``: (B,) long and (B,) bool.
    """
    if u is None:
        u = torch.rand(weights.shape[0], generator=generator, device=weights.device)  # (B,)
    cdf = weights.detach().float().cumsum(dim=1)  # (B, N)
    index = search_cdf(cdf, u)  # (B,)
    # Accept only a valid entry of positive weight (all-zero rows, rounding, misuse).
    picked = index.unsqueeze(1)
    drawn = (weights.gather(1, picked) > 0).logical_and_(valid.gather(1, picked)).squeeze(1)  # (B,)
    if hardest is None:
        # The cdf buffer is free again: reuse it for the masked scores (a fresh
        # (B, N) buffer costs more in page faults on CPU than the pass itself).
        neg_inf = cdf.new_full((), float("-inf"))
        hardest = _hardest(torch.where(valid, scores.detach().float(), neg_inf, out=cdf), valid)
    return torch.where(drawn, index, hardest[0]), hardest[1]


class Selection(NamedTuple):
    """What :func:`select_negatives` returns for one direction."""

    #: (B,) long, the candidate used as each anchor's negative.
    index: Tensor
    #: (B,) bool, whether the anchor has a negative at all.
    has: Tensor
    #: (B,) long, each anchor's hardest valid candidate.
    hard_index: Tensor
    #: (B,) bool, whether the anchor has a valid candidate.
    hard_has: Tensor
    #: 0-d, the number of flagged candidates (0 for ``selection="hardest"``).
    n_flagged: Tensor
    #: 0-d, the number of cut candidates (0 for ``selection="hardest"``).
    n_cut: Tensor
    #: (B, N) bool flagged mask of :func:`fne_weights` with ``masks=True`` and
    #: ``selection="sample"``, else None.
    flagged: Tensor | None
    #: (B, N) posterior of :func:`fne_weights` with ``masks=True`` and ``selection="sample"``,
    #: else None.
    p_fn: Tensor | None


@torch.no_grad()
def select_negatives(
    scores: Tensor,
    positive_scores: Tensor,
    valid: Tensor,
    gaussians: Gaussians,
    u: Tensor | None,
    *,
    selection: Literal["sample", "hardest"] = "sample",
    masks: bool = False,
    tau: float = 0.5,
    match_prior: float | Tensor = 1e-4,
    false_margin: float = 0.999,
    weighting: Weighting = "reference",
    cutdown: float | None = 0.2,
    posterior: bool = True,
    exclude: float | None = None,
    cutdown_mean: Tensor | None = None,
    coefficients: Tensor | None = None,
) -> Selection:
    """One direction's whole negative selection (FNE_SPEC sections 5-6): one negative per anchor.

    Finds each anchor's hardest valid candidate; ``selection="sample"`` then weighs every
    candidate (:func:`fne_weights`) and draws one per anchor (:func:`sample_negatives`), while
    ``selection="hardest"`` uses the hardest. With ``exclude``, an anchor left without a weighted
    candidate falls back to its hardest candidate that was not removed (the hardest of all is
    then a probable match).

    A pure function of its tensors and Python constants (the caller draws ``u``), so the same
    inputs give the same negatives. It also compiles with ``torch.compile`` without a graph
    break, but on a CPU that measured too little gain to pay for its compile time (docs:
    journal/2026-12-02-slower-machine-and-selection-work).

    Args:
        scores: (B, N) anchor-candidate similarities.
        positive_scores: (B,) each anchor's positive score.
        valid: (B, N) bool, the candidates that may be negatives.
        gaussians: the Gaussians of :meth:`SimilarityStats.snapshot()
            <fne_lightning.fne.stats.SimilarityStats.snapshot>`.
        u: (B,) uniforms in [0, 1) for the draw (unused, may be None, for ``"hardest"``).
        selection: ``"sample"`` (FNE) or ``"hardest"``.
        masks: also return the (B, N) ``flagged`` and ``p_fn`` (for diagnostics against known
            positives, or the estimated prior); without them only their counts leave the
            function.
        tau: as for :func:`fne_weights`.
        match_prior: as for :func:`fne_weights`.
        false_margin: as for :func:`fne_weights`.
        weighting: as for :func:`fne_weights`.
        cutdown: as for :func:`fne_weights`.
        posterior: as for :func:`fne_weights`.
        exclude: as for :func:`fne_weights`.
        cutdown_mean: as for :func:`fne_weights`.
        coefficients: as for :func:`fne_weights`.

    Returns:
        The negatives used, the hardest candidates, and the counts (and masks) of flagged and cut
        candidates.
    """
    hard_index, hard_has = hardest_negatives(scores, valid)
    if selection == "hardest":
        zero = torch.zeros((), dtype=torch.long, device=scores.device)
        return Selection(hard_index, hard_has, hard_index, hard_has, zero, zero, None, None)
    w = fne_weights(scores, positive_scores, valid, gaussians, tau=tau, match_prior=match_prior,
                    false_margin=false_margin, weighting=weighting, cutdown=cutdown, posterior=posterior,
                    exclude=exclude, cutdown_mean=cutdown_mean, coefficients=coefficients)
    fallback = ((hard_index, hard_has) if exclude is None or not posterior
                else hardest_negatives(scores, valid & ~w.flagged))
    index, has = sample_negatives(w.weights, scores, valid, hardest=fallback, u=u)
    return Selection(index, has, hard_index, hard_has, torch.count_nonzero(w.flagged), torch.count_nonzero(w.cut),
                     w.flagged if masks else None, w.p_fn if masks else None)
