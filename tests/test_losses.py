"""VSE0 / VSE++ against a hand-computed case, and the FNE loss wiring (warm-up, masking, gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fne_lightning.errors import FNEError
from fne_lightning.fne.positives import PositiveIndex
from fne_lightning.losses import FNELoss, VSELoss
from fne_lightning.losses.vse import vse_loss

# S[i, j] = v_i . t_j; with v = identity rows, t_j is column j of S.
S = torch.tensor([[0.90, 0.55, 0.10],
                  [0.30, 0.70, 0.65],
                  [0.68, 0.75, 0.80]])
V, T = torch.eye(3), S.T.clone()


def test_vse_losses_by_hand() -> None:
    distinct = torch.eye(3, dtype=torch.bool)
    # i2t costs (rows): [0], [.15], [.08, .15]; t2i costs (columns): [0], [.05, .25], [.05]
    assert vse_loss(V, T, distinct, 0.2, "vsepp").loss.item() == pytest.approx((0.15 + 0.15) / 3 + (0.25 + 0.05) / 3)
    assert vse_loss(V, T, distinct, 0.2, "vse0").loss.item() == pytest.approx((0.15 + 0.23) / 3 + (0.30 + 0.05) / 3)


def test_captions_of_the_same_image_are_never_negatives() -> None:
    ids = torch.tensor([0, 1, 1])
    same = ids[:, None] == ids[None, :]
    out = vse_loss(V, T, same, 0.2, "vsepp")
    # Only S[2, 0] (row 2) and S[0, 1] (column 1) still violate once S[1, 2] and S[2, 1] are masked.
    assert out.loss.item() == pytest.approx(0.08 / 3 + 0.05 / 3)
    assert out.i2t_negative.tolist()[1:] == [0, 0]  # images 1 and 2 take caption 0, not each other's
    assert not same[torch.arange(3), out.i2t_negative].any()
    assert not same[out.t2i_negative, torch.arange(3)].any()


def test_positive_index_membership() -> None:
    index = PositiveIndex()
    index.set_pairs(torch.tensor([[0, 3], [2, 1], [2, 5]]), num_texts=6)
    got = index.contains(torch.tensor([0, 2, 2, 1, -1]), torch.tensor([3, 5, 0, 3, 3]))
    assert got.tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("bitmap", [True, False])
def test_positive_index_bitmap_and_search_agree_with_a_set(bitmap: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from fne_lightning.fne import positives

    if not bitmap:
        monkeypatch.setattr(positives, "MAX_BITMAP_BITS", 0)
    g = torch.Generator().manual_seed(0)
    pairs = torch.stack([torch.randint(0, 40, (300,), generator=g), torch.randint(0, 90, (300,), generator=g)], 1)
    index = PositiveIndex()
    index.set_pairs(pairs, num_texts=100)  # captions 90..99 have no positive: beyond the table's width
    assert bool(index.bitmap.numel()) == bitmap
    images, texts = torch.arange(-1, 42)[:, None], torch.arange(-1, 101)[None, :]  # (43, 1) x (1, 102)
    truth = {tuple(p) for p in pairs.tolist()}
    want = torch.tensor([[(i, j) in truth for j in texts[0].tolist()] for i in images[:, 0].tolist()])
    got = index.contains(images, texts)
    assert got.shape == (43, 102) and torch.equal(got, want) and 0 < int(want.sum()) <= 300
    # Candidates' images along the columns (the text-to-image direction of the diagnostics).
    assert torch.equal(index.contains(images.T, texts.T), want.T)


def _batch(b: int = 8, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    t = F.normalize(v + 0.3 * torch.randn(b, d, generator=g), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])[:b]
    return v, t, ids, torch.arange(b)


def test_warmup_loss_equals_in_batch_vsepp() -> None:
    v, t, ids, tids = _batch()
    loss = FNELoss(embed_dim=16, memory_size=32, warmup_loss="vsepp")
    got, _ = loss(v, t, ids, tids, v.clone(), t.clone(), warmup=True)
    want = vse_loss(v, t, ids[:, None] == ids[None, :], 0.2, "vsepp").loss
    assert torch.equal(got, want)


def test_fne_gradients_reach_the_anchors_only_and_bank_fills_after_the_step() -> None:
    v, t, ids, tids = _batch()
    v.requires_grad_(True)
    t.requires_grad_(True)
    mv, mt = v.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)
    loss = FNELoss(embed_dim=16, memory_size=12, min_pos_samples=1, warmup_epochs=0)
    loss.generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # the bank wraps around (12 slots, 8 per step)
        value, diag = loss(v, t, ids, tids, mv, mt)
        value.backward()
    assert v.grad is not None and t.grad is not None
    assert mv.grad is None and mt.grad is None
    assert not any(b.requires_grad for b in loss.buffers())
    assert int(loss.bank.filled) == 12 and int(loss.bank.ptr) == 24 % 12
    assert {"flagged_rate", "cutdown_rate", "sampled_sim", "hardest_sim", "pos_mean", "neg_std", "ready"} <= diag.keys()


def test_fne_never_samples_same_image_candidates() -> None:
    # Captions 0 and 1 describe image 0 and score highest against each other's anchors:
    # if they leaked into the candidates, the FN rates (positives = same-image pairs) would be > 0.
    v, t, ids, tids = _batch()
    t[1] = v[0]
    loss = FNELoss(embed_dim=16, memory_size=16, min_pos_samples=1, warmup_epochs=0, cutdown=None)
    loss.positives.set_pairs(torch.stack([ids, tids], 1), num_texts=8)
    loss.generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        _, diag = loss(v, t, ids, tids, v, t)
        assert diag["sampled_fn_rate"] == 0 and diag["hardest_fn_rate"] == 0


def test_selection_hardest_matches_masked_max() -> None:
    v, t, ids, tids = _batch()
    loss = FNELoss(embed_dim=16, memory_size=0, selection="hardest", warmup_epochs=0)
    got, diag = loss(v, t, ids, tids, v, t)
    scores = v @ t.T
    same = ids[:, None] == ids[None, :]
    pos = scores.diagonal()
    i2t = (0.2 + scores.masked_fill(same, -1e9).amax(1) - pos).clamp(min=0).mean()
    t2i = (0.2 + scores.masked_fill(same, -1e9).amax(0) - pos).clamp(min=0).mean()
    assert got.item() == pytest.approx((i2t + t2i).item(), abs=1e-6)
    assert diag["sampled_sim"] == pytest.approx(diag["hardest_sim"].item())


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"memory_size": -1}, "loss.memory_size"), ({"warmup_epochs": -1}, "loss.warmup_epochs"),
     ({"match_prior": 1.0}, "loss.match_prior"), ({"tau": 0.0}, "loss.tau"), ({"margin": -0.1}, "loss.margin"),
     ({"cutdown": -0.2}, "loss.cutdown"), ({"weighting": "soft"}, "loss.weighting"),
     ({"selection": "random"}, "loss.selection"), ({"warmup_loss": "infonce"}, "loss.warmup_loss")],
)
def test_bad_loss_values_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(FNEError, match=key):
        FNELoss(embed_dim=4, **kwargs)


def test_vse_loss_module_switches_after_warmup() -> None:
    v, t, ids, tids = _batch()
    loss = VSELoss(max_violation=True, warmup_epochs=2, warmup_loss="vse0")
    same = ids[:, None] == ids[None, :]
    assert torch.equal(loss(v, t, ids, tids, warmup=True)[0], vse_loss(v, t, same, 0.2, "vse0").loss)
    assert torch.equal(loss(v, t, ids, tids, warmup=False)[0], vse_loss(v, t, same, 0.2, "vsepp").loss)
