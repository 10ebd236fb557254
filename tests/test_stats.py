"""Similarity statistics (FNE_SPEC section 4) against NumPy over samples picked by a loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fne_lightning.fne import stats as stats_module
from fne_lightning.fne.stats import (
    VAR_FLOOR,
    SimilarityStats,
    confident_samples,
    masked_moments,
    merge_moments,
    merge_moments_stack,
)
from fne_lightning.utils.distributed import gather_no_grad, gather_with_local_grad, is_distributed


def random_batch(b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities with planted matches and same-image groups (several captions per image)."""
    image_ids = torch.randint(0, max(2, b // 2), (b,), generator=gen)
    same_image = image_ids.unsqueeze(1) == image_ids.unsqueeze(0)  # (B, B)
    s = torch.rand(b, b, generator=gen) * 0.6 - 0.1
    planted = torch.rand(b, generator=gen) < 0.7
    s = s + torch.diag(planted * (0.3 + 0.3 * torch.rand(b, generator=gen)))
    return s, same_image


def loop_samples(s: torch.Tensor, same_image: torch.Tensor) -> tuple[list[float], list[float]]:
    """FNE_SPEC section 4, one pair at a time."""
    s, same = s.double().numpy(), same_image.numpy()
    b = s.shape[0]
    positives, negatives = [], []
    for i in range(b):
        if s[i, i] < s[i].max() or s[i, i] < s[:, i].max():
            continue
        positives.append(s[i, i])
        row = [s[i, j] for j in range(b) if j != i and not same[i, j]]
        col = [s[j, i] for j in range(b) if j != i and not same[j, i]]
        negatives += [max(row)] if row else []
        negatives += [max(col)] if col else []
    return positives, negatives


def assert_matches_numpy(stats: SimilarityStats, positives: list[float], negatives: list[float]) -> None:
    assert stats.pos_count.item() == len(positives) and stats.neg_count.item() == len(negatives)
    np.testing.assert_allclose(stats.pos_mean.item(), np.mean(positives), rtol=1e-12)
    np.testing.assert_allclose(stats.neg_mean.item(), np.mean(negatives), rtol=1e-12)
    np.testing.assert_allclose(stats.pos_var.item(), np.var(positives, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(stats.neg_var.item(), np.var(negatives, ddof=1), rtol=1e-10)


def test_confident_samples_match_loop():
    gen = torch.Generator().manual_seed(0)
    for b in (1, 2, 5, 16, 33):
        s, same = random_batch(b, gen)
        pos, pos_mask, neg, neg_mask = confident_samples(s, same)
        positives, negatives = loop_samples(s, same)
        assert pos.shape == pos_mask.shape == (b,) and neg.shape == neg_mask.shape == (2 * b,)
        np.testing.assert_allclose(sorted(pos[pos_mask].tolist()), sorted(positives), rtol=1e-6)
        np.testing.assert_allclose(sorted(neg[neg_mask].tolist()), sorted(negatives), rtol=1e-6)


def test_ties_count_as_confident_and_same_image_is_never_negative():
    s = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.95], [0.3, 0.4, 0.8]])
    same = torch.tensor([[True, False, False], [False, True, True], [False, True, True]])
    pos, pos_mask, neg, neg_mask = confident_samples(s, same)
    # Pair 0: tie with S_01 in row 0, still confident. Pair 1: 0.95 > 0.9 in its row.
    # Pair 2: column max 0.95 > 0.8. Negatives of pair 0: row -> 0.5, column -> 0.3.
    assert pos_mask.tolist() == [True, False, False]
    assert neg[neg_mask].tolist() == pytest.approx([0.5, 0.3])
    # Caption 2 shows image 1: S_12 = 0.7 and S_21 = 0.6 are not negatives, so row 1's
    # hardest negative is S_10 = 0.2 and column 1's is S_01 = 0.3.
    s = torch.eye(3)
    s[1, 2], s[1, 0], s[2, 1], s[0, 1] = 0.7, 0.2, 0.6, 0.3
    _, pos_mask, neg, neg_mask = confident_samples(s, same)
    assert pos_mask.all() and neg_mask.all()
    assert neg[1].item() == pytest.approx(0.2) and neg[3 + 1].item() == pytest.approx(0.3)


def test_all_same_image_gives_no_negatives():
    s = torch.eye(3) + 0.1
    pos, pos_mask, neg, neg_mask = confident_samples(s, torch.ones(3, 3, dtype=torch.bool))
    assert pos_mask.all() and not neg_mask.any()
    stats = SimilarityStats()
    stats.update(s, torch.ones(3, 3, dtype=torch.bool))
    assert stats.neg_count.item() == 0 and stats.pos_count.item() == 3
    assert torch.isfinite(stats.neg_mean) and stats.neg_var.item() == VAR_FLOOR


def test_update_matches_numpy_over_batches():
    gen = torch.Generator().manual_seed(1)
    stats = SimilarityStats()
    positives, negatives = [], []
    for step, b in enumerate((16, 7, 32, 3, 16, 24)):
        s, same = random_batch(b, gen)
        stats.update(s, same)
        p, n = loop_samples(s, same)
        positives += p
        negatives += n
        if len(positives) >= 2 and len(negatives) >= 2:
            assert_matches_numpy(stats, positives, negatives)
        assert step < 2 or len(positives) > 10  # the planted matches make samples
    mean_p, var_p, mean_n, var_n = stats.gaussians()
    assert all(x.dtype == torch.float32 and x.shape == () for x in (mean_p, var_p, mean_n, var_n))
    np.testing.assert_allclose(var_p.item(), np.var(positives, ddof=1), rtol=1e-6)


def test_update_ignores_autograd_and_accepts_bf16():
    gen = torch.Generator().manual_seed(2)
    s, same = random_batch(16, gen)
    leaf = s.clone().requires_grad_()
    stats = SimilarityStats()
    stats.update(leaf * 1.0, same)
    assert all(not buf.requires_grad and buf.grad_fn is None for buf in stats.buffers())
    bf16 = SimilarityStats()
    bf16.update(s.bfloat16(), same)
    p, n = loop_samples(s.bfloat16().float(), same)
    assert_matches_numpy(bf16, p, n)


def test_merge_stack_equals_single_pass():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(200, generator=gen, dtype=torch.float64) * 0.3 + 0.5
    mask = torch.rand(200, generator=gen) < 0.6
    whole = masked_moments(values, mask)
    np.testing.assert_allclose(whole[1].item(), values[mask].mean().item(), rtol=1e-12)
    np.testing.assert_allclose(
        whole[2].item(), ((values[mask] - values[mask].mean()) ** 2).sum().item(), rtol=1e-12
    )
    bounds = [0, 13, 13, 90, 150, 200]  # uneven, one empty chunk
    parts = torch.stack(
        [masked_moments(values[a:z], mask[a:z]) for a, z in zip(bounds[:-1], bounds[1:], strict=True)]
    )
    torch.testing.assert_close(merge_moments_stack(parts), whole, rtol=1e-12, atol=1e-12)
    pairwise = parts[0]
    for part in parts[1:]:
        pairwise = merge_moments(pairwise, part)
    torch.testing.assert_close(pairwise, whole, rtol=1e-12, atol=1e-12)
    empty = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(merge_moments(empty, empty), empty)
    torch.testing.assert_close(merge_moments(empty, whole), whole)
    # Masked-out placeholders may be -inf (no valid negative) without poisoning the sums.
    with_inf = torch.where(mask, values, float("-inf"))
    torch.testing.assert_close(masked_moments(with_inf, mask), whole)


def test_update_merges_ranks_like_one_process(monkeypatch):
    # Simulate rank 0 of 2: its batch moments are all-gathered with rank 1's and merged.
    gen = torch.Generator().manual_seed(4)
    s0, same0 = random_batch(16, gen)
    s1, same1 = random_batch(16, gen)
    p1, m1, n1, nm1 = confident_samples(s1, same1)
    rank1 = torch.stack([masked_moments(p1, m1), masked_moments(n1, nm1)]).unsqueeze(0)  # (1, 2, 3)
    monkeypatch.setattr(stats_module, "is_distributed", lambda: True)
    monkeypatch.setattr(stats_module, "gather_no_grad", lambda t: torch.cat([t, rank1]))
    stats = SimilarityStats()
    stats.update(s0, same0)
    p_a, n_a = loop_samples(s0, same0)
    p_b, n_b = loop_samples(s1, same1)
    assert_matches_numpy(stats, p_a + p_b, n_a + n_b)


def test_reset_and_ready_threshold():
    stats = SimilarityStats(min_pos_samples=5)
    s = torch.eye(3) * 0.5 + 0.1  # every pair confident: 3 positives, 6 negatives per update
    same = torch.eye(3, dtype=torch.bool)
    assert not stats.ready and stats.pos_var.item() == VAR_FLOOR  # floor while count < 2
    stats.update(s, same)
    assert stats.pos_count.item() == 3 and not stats.ready
    assert stats.pos_var.item() == VAR_FLOOR  # identical samples: m2 = 0, floored
    stats.update(s, same)
    assert stats.pos_count.item() == 6 and stats.ready and stats.ready.dtype == torch.bool
    snap = stats.snapshot()
    assert bool(snap.ready) and snap.pos_count.item() == 6.0
    stats.reset()
    assert all(buf.item() == 0 for buf in stats.buffers()) and not stats.ready
    assert set(stats.state_dict()) == {"pos_count", "pos_mean", "pos_m2", "neg_count", "neg_mean", "neg_m2"}
    assert all(buf.dtype == torch.float64 for buf in stats.buffers())


def test_distributed_helpers_single_process():
    # The multi-rank paths are covered by the DDP test; alone they must be identities.
    assert not is_distributed()
    x = torch.randn(4, 3, requires_grad=True)
    gathered = gather_no_grad(x * 2)
    assert torch.equal(gathered, x.detach() * 2) and not gathered.requires_grad
    kept = gather_with_local_grad(x * 2)
    kept.sum().backward()
    assert torch.equal(x.grad, torch.full((4, 3), 2.0))


def test_empty_batch_adds_nothing():
    stats = SimilarityStats()
    stats.update(torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool))
    assert all(buf.item() == 0 for buf in stats.buffers())
