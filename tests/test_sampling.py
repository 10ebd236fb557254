"""FNE weights and sampler (FNE_SPEC sections 5-6): parity with a per-row loop, hand
cases, sampling distribution, and the absence of host syncs (meta tensors)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from fne_lightning.fne.bank import MemoryBank
from fne_lightning.fne.negatives import (
    false_negative_posterior,
    first_max_index,
    fne_weights,
    hardest_negatives,
    sample_negatives,
    search_cdf,
)
from fne_lightning.fne.stats import Gaussians, SimilarityStats


def gaussians(
    pos_mean=0.5, pos_var=0.01, neg_mean=0.0, neg_var=0.01, ready=True, pos_count=500.0, device="cpu"
):
    t = lambda x: torch.tensor(x, dtype=torch.float32, device=device)  # noqa: E731
    return Gaussians(
        t(pos_mean), t(pos_var), t(neg_mean), t(neg_var), torch.tensor(ready, device=device), t(pos_count)
    )


def reference_row(scores, positive, valid, g, tau, match_prior, false_margin, weighting, cutdown, posterior):
    """FNE_SPEC section 6 for one anchor, written as plainly as possible (float64)."""
    pos_mean, pos_var, neg_mean, neg_var = (float(x) for x in g[:4])
    ready, pos_count = bool(g.ready), float(g.pos_count)
    weights, flagged, cut, p_fns = [], [], [], []
    for s, ok in zip(scores.tolist(), valid.tolist(), strict=True):
        log_pos = -0.5 * math.log(2 * math.pi * pos_var) - (s - pos_mean) ** 2 / (2 * pos_var)
        log_neg = -0.5 * math.log(2 * math.pi * neg_var) - (s - neg_mean) ** 2 / (2 * neg_var)
        logit = log_pos - log_neg - math.log(1 / match_prior - 1)
        p_fn = 1 / (1 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1 + math.exp(logit))
        w = math.exp(-tau * (s - positive) ** 2)
        if posterior and ready:
            if weighting == "reference" and p_fn > 1 - false_margin:
                w = math.exp(-tau * p_fn)
            elif weighting == "complement":
                w = w * (1 - p_fn)
        is_cut = ok and cutdown is not None and pos_count > 0 and s <= pos_mean - cutdown
        weights.append(w if ok and not is_cut else 0.0)
        flagged.append(ok and ready and p_fn > 1 - false_margin)
        cut.append(is_cut)
        p_fns.append(p_fn)
    return weights, flagged, cut, p_fns


@pytest.mark.parametrize("weighting", ["reference", "complement"])
@pytest.mark.parametrize("posterior", [True, False])
@pytest.mark.parametrize(("ready", "pos_count"), [(True, 500.0), (False, 50.0), (False, 0.0)])
@pytest.mark.parametrize("cutdown", [None, 0.2, 0.05])
def test_fne_weights_match_per_row_loop(weighting, posterior, ready, pos_count, cutdown):
    gen = torch.Generator().manual_seed(
        zlib.crc32(repr((weighting, posterior, ready, pos_count, cutdown)).encode())
    )
    b, n = 6, 40
    scores = torch.rand(b, n, generator=gen) * 1.2 - 0.3  # (B, N) in [-0.3, 0.9]
    positive = 0.4 + 0.4 * torch.rand(b, generator=gen)
    valid = torch.rand(b, n, generator=gen) > 0.2
    valid[0] = False  # a row without candidates
    g = gaussians(
        pos_mean=0.45 + 0.2 * torch.rand((), generator=gen).item(),
        pos_var=0.005 + 0.02 * torch.rand((), generator=gen).item(),
        neg_mean=0.05 + 0.1 * torch.rand((), generator=gen).item(),
        neg_var=0.005 + 0.02 * torch.rand((), generator=gen).item(),
        ready=ready,
        pos_count=pos_count,
    )
    kwargs = dict(
        tau=0.5,
        match_prior=1e-3,
        false_margin=0.99,
        weighting=weighting,
        cutdown=cutdown,
        posterior=posterior,
    )
    out = fne_weights(scores, positive, valid, g, **kwargs)
    for i in range(b):
        w, flagged, cut, p_fn = reference_row(scores[i], float(positive[i]), valid[i], g, **kwargs)
        torch.testing.assert_close(out.weights[i], torch.tensor(w, dtype=torch.float32), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.p_fn[i], torch.tensor(p_fn, dtype=torch.float32), rtol=1e-4, atol=1e-6)
        assert out.flagged[i].tolist() == flagged
        assert out.cut[i].tolist() == cut
    # The branches under test were exercised (a vacuous parity would pass too).
    assert (out.weights > 0).any() and (out.weights == 0).any()
    if ready:
        assert out.flagged.any()
    if cutdown is not None and pos_count > 0:
        assert out.cut.any()


def test_fne_weights_by_hand():
    # pos N(0.5, 0.01), neg N(0, 0.01): equal variances, so
    #   logit(s) = [(s - 0)^2 - (s - 0.5)^2] / 0.02 - log(1/1e-4 - 1) = 50 (s - 0.25) - 9.21024
    # positive score 0.6, tau 0.5, cutdown 0.2 (threshold 0.5 - 0.2 = 0.3):
    #   s=0.50: logit  3.28976, p 0.96407583 > 0.001 -> exp(-0.5 p) = 0.61752365
    #           (hardness exp(-0.5 * 0.1^2) = 0.99501248; complement 0.99501248 * (1 - p) = 0.03574500)
    #   s=0.35: logit -4.21024, p 0.01462571 > 0.001 -> exp(-0.5 p) = 0.99271382
    #           (hardness exp(-0.5 * 0.25^2) = 0.96923323; complement 0.95505751)
    #   s=0.27: p 0.00027178 (not flagged) but 0.27 <= 0.3: cut -> 0
    #   s=0.10: cut -> 0;  s=0.45: invalid (a positive) -> 0
    scores = torch.tensor([[0.5, 0.35, 0.27, 0.1, 0.45]])
    valid = torch.tensor([[True, True, True, True, False]])
    g = gaussians(ready=True, pos_count=300.0)
    out = fne_weights(scores, torch.tensor([0.6]), valid, g)
    torch.testing.assert_close(out.weights, torch.tensor([[0.61752365, 0.99271382, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.p_fn[0, :3], torch.tensor([0.96407583, 0.01462571, 0.00027178]))
    assert out.flagged.tolist() == [[True, True, False, False, False]]
    assert out.cut.tolist() == [[False, False, True, True, False]]
    out = fne_weights(scores, torch.tensor([0.6]), valid, g, weighting="complement")
    torch.testing.assert_close(out.weights, torch.tensor([[0.03574500, 0.95505751, 0.0, 0.0, 0.0]]))
    out = fne_weights(scores, torch.tensor([0.6]), valid, g, posterior=False, cutdown=None)
    torch.testing.assert_close(
        out.weights, torch.tensor([[0.99501248, 0.96923323, 0.94700586, 0.88249690, 0.0]])
    )


def test_posterior_by_hand():
    # Equal variances and match_prior 0.5: logit = 50 (s - 0.25), so p(0.25) = 0.5 and
    # p(0.27) = sigmoid(1) = 0.73105858. With var+ = 0.04 instead, at s = 0.3:
    #   logit = 0.3^2 / 0.02 - 0.2^2 / 0.08 + 0.5 log(0.01 / 0.04) = 4.5 - 0.5 - 0.69314718
    #         = 3.30685282, p = 0.96466316.
    p = false_negative_posterior(torch.tensor([0.25, 0.27]), 0.5, 0.01, 0.0, 0.01, match_prior=0.5)
    torch.testing.assert_close(p, torch.tensor([0.5, 0.73105858]))
    p = false_negative_posterior(torch.tensor([0.3]), 0.5, 0.04, 0.0, 0.01, match_prior=0.5)
    torch.testing.assert_close(p, torch.tensor([0.96466316]))


def test_posterior_far_apart_gaussians_stays_finite():
    scores = torch.linspace(-1, 1, 2001)  # fp32
    for var in (1e-2, 1e-4, 1e-6):
        p = false_negative_posterior(scores, 0.9, var, -0.5, var, match_prior=1e-4)
        assert torch.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
        assert p[scores > 0.95].min() == 1.0 and p[scores < -0.45].max() == 0.0
        assert (p.diff() >= 0).all()  # equal variances: monotone in s
    # The density ratio itself is 0/0 in fp32 there; the log-space form is not.
    dens = lambda s, m, v: torch.exp(-((s - m) ** 2) / (2 * v)) / math.sqrt(2 * math.pi * v)  # noqa: E731
    naive = dens(scores, 0.9, 1e-4) / (dens(scores, 0.9, 1e-4) + 9999 * dens(scores, -0.5, 1e-4))
    assert torch.isnan(naive).any()


def test_bf16_scores_are_computed_in_fp32():
    gen = torch.Generator().manual_seed(1)
    scores = (torch.rand(4, 50, generator=gen) - 0.2).bfloat16()
    positive = torch.full((4,), 0.6).bfloat16()
    valid = torch.ones(4, 50, dtype=torch.bool)
    g = gaussians()
    out = fne_weights(scores, positive, valid, g)
    ref = fne_weights(scores.float(), positive.float(), valid, g)
    assert out.weights.dtype == torch.float32 and out.p_fn.dtype == torch.float32
    torch.testing.assert_close(out.weights, ref.weights, rtol=0, atol=0)
    assert scores.dtype == torch.bfloat16  # inputs untouched
    s = torch.rand(3, 5)
    s_before = s.clone()
    fne_weights(s, torch.rand(3), torch.ones(3, 5, dtype=torch.bool), g)
    fne_weights(s, torch.rand(3), torch.ones(3, 5, dtype=torch.bool), g, posterior=False, cutdown=None)
    assert torch.equal(s, s_before)  # fp32 input is not modified in place


def wilson_hilferty_critical(df: int, z: float = 3.0902) -> float:
    """Chi-square quantile (z = upper-tail normal quantile; 3.0902 for p = 0.001)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def test_sampler_frequencies_match_weights():
    gen = torch.Generator().manual_seed(7)
    n, draws = 30, 20_000
    row = torch.zeros(n)
    nonzero = torch.randperm(n, generator=gen)[:10]
    row[nonzero] = 0.05 + torch.rand(10, generator=gen)
    valid = torch.rand(n, generator=gen) > 0.3
    valid[nonzero] = True
    scores = torch.rand(n, generator=gen)
    index, has_negative = sample_negatives(
        row.expand(draws, n), scores.expand(draws, n), valid.expand(draws, n), generator=gen
    )
    assert has_negative.all()
    counts = torch.bincount(index, minlength=n).double()
    assert counts[row == 0].sum() == 0  # zero weights never drawn
    expected = draws * row.double() / row.double().sum()
    chi2 = ((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]).sum().item()
    assert chi2 < wilson_hilferty_critical(df=9), chi2
    assert abs(wilson_hilferty_critical(9) - 27.877) < 0.3  # sanity of the approximation


def test_search_cdf_edges():
    w = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    # u = 0 takes the first positive weight; u -> 1 (and u * total rounding up to total,
    # simulated by u = 1) the last positive weight, never the zeros after it.
    assert search_cdf(w.cumsum(1), torch.zeros(2))[0] == 1
    assert search_cdf(w.cumsum(1), torch.full((2,), 1.0 - 2**-24))[0] == 3
    assert search_cdf(w.cumsum(1), torch.ones(2))[0] == 3
    assert search_cdf(w.cumsum(1), torch.full((2,), 0.6))[0] == 1  # 0.6 * 3 = 1.8 < cdf_1 = 2
    assert search_cdf(w.cumsum(1), torch.full((2,), 0.7))[0] == 3
    index = search_cdf(w.cumsum(1), torch.rand(2))
    assert ((index >= 0) & (index < 6)).all()


def test_zero_weight_and_invalid_never_drawn_and_fallbacks():
    gen = torch.Generator().manual_seed(3)
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # weights all 0 -> hardest valid (index 2; 0 is invalid)
            [0.2, 0.8, 0.4, 0.1],  # no valid candidate
            [0.1, 0.2, 0.3, 0.4],  # positive weight on an invalid entry only -> fallback
            [0.1, 0.2, 0.3, 0.4],  # one drawable entry
        ]
    )
    valid = torch.tensor([[False, True, True, True], [False] * 4, [True, True, True, False], [True] * 4])
    weights = torch.tensor([[0.0] * 4, [0.0] * 4, [0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 1.0, 0.0]])
    for _ in range(50):
        index, has_negative = sample_negatives(weights, scores, valid, generator=gen)
        assert index.tolist()[0] == 2 and index.tolist()[2] == 2 and index.tolist()[3] == 2
        assert 0 <= index[1] < 4
        assert has_negative.tolist() == [True, False, True, True]
    index, has_negative = hardest_negatives(scores, valid)
    assert index.tolist()[0] == 2 and index.tolist()[2] == 2 and index.tolist()[3] == 3
    assert has_negative.tolist() == [True, False, True, True]


@pytest.mark.parametrize("n", [5, 128, 130, 8256])
def test_first_max_index_is_the_first_maximum_of_each_row(n: int) -> None:
    """The two-level search against a plain loop: ties (within a block, across blocks, between the
    blocks and the columns past the last block), rows of -inf, the maximum in the tail."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-3, 4, (9, n), generator=gen).float()  # few distinct values: many ties
    x[1] = float("-inf")  # no valid candidate: index 0
    x[2, -1] = 10.0  # the maximum past the last whole block
    x[3, 0] = x[3, -1] = 10.0  # a tie between the first and the last column
    x[4, n // 2] = x[4, -1] = 10.0
    x[5] = torch.randn(n, generator=gen)
    x[6, : n // 2] = float("-inf")
    for rows in (x, x.flip(1), x.T.contiguous().T):  # also a column-major view
        expected = [max(range(n), key=lambda j, row=row: (row[j], -j)) for row in rows.tolist()]
        assert first_max_index(rows).tolist() == expected
        assert first_max_index(rows).tolist() == rows.max(dim=1).indices.tolist()


def test_pipeline_never_samples_positives():
    gen = torch.Generator().manual_seed(11)
    b, n = 64, 200
    image_ids = torch.randint(0, 20, (b,), generator=gen)
    candidate_ids = torch.randint(0, 20, (n,), generator=gen)
    valid = image_ids.unsqueeze(1) != candidate_ids  # same image = positive = invalid
    scores = torch.rand(b, n, generator=gen) * 0.8
    scores = torch.where(valid, scores, scores + 0.5)  # positives score high: tempting picks
    positive = torch.full((b,), 0.7)
    g = gaussians(pos_mean=0.6, neg_mean=0.2)
    for weighting in ("reference", "complement"):
        out = fne_weights(scores, positive, valid, g, weighting=weighting, cutdown=0.5)
        for _ in range(30):
            index, has_negative = sample_negatives(out.weights, scores, valid, generator=gen)
            assert valid.gather(1, index.unsqueeze(1)).all() and has_negative.all()


def test_seeded_generator_reproduces_draws():
    w = torch.rand(16, 100, generator=torch.Generator().manual_seed(0))
    scores = torch.rand(16, 100)
    valid = torch.ones(16, 100, dtype=torch.bool)
    draw = lambda seed: sample_negatives(w, scores, valid, torch.Generator().manual_seed(seed))[0]  # noqa: E731
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_sync_detector_works_on_meta():
    x = torch.empty(3, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        x.sum().item()
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool((x > 0).any())
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.nonzero(x)
    with pytest.raises((RuntimeError, NotImplementedError)):
        x[x > 0]


@pytest.mark.parametrize("weighting", ["reference", "complement"])
def test_no_host_sync_meta_device(weighting):
    # Meta tensors carry shapes only: any data-dependent host sync (.item(), bool(),
    # nonzero, boolean-mask indexing, .tolist(), .cpu() of values) raises.
    b, k, d = 8, 20, 16
    meta = torch.device("meta")
    scores = torch.empty(b, b + k, device=meta)
    valid = torch.empty(b, b + k, dtype=torch.bool, device=meta)
    positive = torch.empty(b, device=meta)
    stats = SimilarityStats(min_pos_samples=10).to(meta)
    stats.update(torch.empty(b, b, device=meta), torch.empty(b, b, dtype=torch.bool, device=meta))
    stats.reset()
    g = stats.snapshot()
    assert g.ready.device == meta
    out = fne_weights(scores, positive, valid, g, weighting=weighting)
    assert out.weights.shape == (b, b + k) and out.weights.device == meta
    index, has_negative = sample_negatives(out.weights, scores, valid)
    assert index.shape == (b,) and has_negative.shape == (b,)
    index, has_negative = hardest_negatives(scores, valid)
    assert index.shape == (b,)
    out = fne_weights(scores, positive, valid, g, weighting=weighting, posterior=False, cutdown=None)
    sample_negatives(out.weights, scores, valid, hardest=(index, has_negative))
    bank = MemoryBank(k, d).to(meta)
    bank.enqueue(
        torch.empty(b, d, device=meta),
        torch.empty(b, d, device=meta),
        torch.empty(b, dtype=torch.long, device=meta),
        torch.empty(b, dtype=torch.long, device=meta),
    )
    assert bank.valid_mask().shape == (k,)


def test_precomputed_hardest_gives_same_draws():
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(32, 50, generator=gen)
    valid = torch.rand(32, 50, generator=gen) > 0.5
    valid[3] = False
    weights = torch.where(valid & (torch.rand(32, 50, generator=gen) > 0.7), scores, 0.0)
    weights[5] = 0.0  # falls back to the hardest
    plain = sample_negatives(weights, scores, valid, torch.Generator().manual_seed(9))
    given = sample_negatives(
        weights, scores, valid, torch.Generator().manual_seed(9), hardest=hardest_negatives(scores, valid)
    )
    assert torch.equal(plain[0], given[0]) and torch.equal(plain[1], given[1])
    assert plain[0][5] == torch.where(valid[5], scores[5], -1.0).argmax() and not plain[1][3]
