"""FNE's options beyond the published rule (``loss.exclude``, ``loss.prior=estimated``,
``loss.online_batch``) against what is computed here independently: removed candidates, the EM
step of the candidates' mixture, and in-batch online negatives (which with the hardest selection
and no bank make FNE exactly VSE++)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fne_lightning.fne.negatives import false_negative_posterior, fne_weights
from fne_lightning.fne.stats import Gaussians
from fne_lightning.losses import FNELoss, VSELoss

from test_fne_diagnostics import B, D, normal_logpdf, setup_loss


def gaussians(pos_mean=0.6, pos_var=0.01, neg_mean=0.2, neg_var=0.04) -> Gaussians:
    return Gaussians(torch.tensor(pos_mean), torch.tensor(pos_var), torch.tensor(neg_mean), torch.tensor(neg_var),
                     ready=torch.tensor(True), pos_count=torch.tensor(500.0))


def test_a_tensor_prior_gives_the_float_priors_posterior() -> None:
    s = torch.linspace(-0.5, 1.0, 301)
    as_float = false_negative_posterior(s, 0.6, 0.01, 0.2, 0.04, 0.03)
    as_tensor = false_negative_posterior(s, 0.6, 0.01, 0.2, 0.04, torch.tensor(0.03))
    torch.testing.assert_close(as_tensor, as_float, rtol=0, atol=1e-6)


def test_exclude_removes_exactly_the_candidates_above_the_threshold() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(16, 50, generator=g) * 1.2 - 0.3
    positive = torch.full((16,), 0.7)
    valid = torch.rand(16, 50, generator=g) < 0.9
    gauss = gaussians()
    out = fne_weights(scores, positive, valid, gauss, match_prior=0.05, cutdown=None, exclude=0.5)
    # Under the reference weighting, a candidate that is not removed keeps its hardness weight.
    kept = fne_weights(scores, positive, valid, gauss, match_prior=0.05, cutdown=None, posterior=False)
    removed = 0
    for i in range(16):
        for j in range(50):
            s = float(scores[i, j])
            logit = normal_logpdf(s, 0.6, 0.01) - normal_logpdf(s, 0.2, 0.04) - math.log(1 / 0.05 - 1)
            above = bool(valid[i, j]) and 1 / (1 + math.exp(-logit)) > 0.5
            removed += above
            assert bool(out.flagged[i, j]) == above
            if above:
                assert out.weights[i, j] == 0
            elif valid[i, j]:
                assert out.weights[i, j] == pytest.approx(float(kept.weights[i, j]))
    assert 20 < removed < 16 * 50 * 0.9  # some removed, not all


def test_an_anchor_left_only_with_removed_candidates_takes_its_hardest_kept_one() -> None:
    # Candidates at cosines 0.95, 0.9 (probable matches under these Gaussians), 0.3 and 0.1 (cut
    # down, below mu+ - 0.2): every weight is 0, and the fallback must not be the removed 0.95.
    cosines = torch.tensor([0.95, 0.9, 0.3, 0.1])
    anchor = F.one_hot(torch.tensor([0]), D).float()  # (1, D)
    candidates = torch.zeros(4, D)
    candidates[:, 0], candidates[:, 1] = cosines, (1 - cosines.square()).sqrt()
    gauss = gaussians(pos_mean=0.9, pos_var=0.001, neg_mean=0.2, neg_var=0.04)
    valid = torch.ones(1, 4, dtype=torch.bool)
    picked = {}
    for exclude in (None, 0.5):
        loss = FNELoss(embed_dim=D, memory_size=0, warmup_epochs=0, cutdown=0.2, exclude=exclude)
        loss.stats.pos_mean.fill_(0.9)
        loss.set_generator(torch.Generator().manual_seed(0))
        out = loss._direction(anchor, torch.tensor([0.92]), candidates, torch.zeros(0, D), valid, gauss, 0.5, None)
        picked[exclude] = round(float(out.diagnostics["sampled_sim"]), 4)
    assert picked[None] in (0.95, 0.9) and picked[0.5] == 0.3


def test_one_step_of_the_estimated_prior_is_the_em_update_computed_here() -> None:
    loss, b = setup_loss(prior="estimated")
    loss.positives.set_pairs(torch.zeros(0, 2, dtype=torch.long), num_texts=1)  # not needed here
    loss.set_generator(torch.Generator().manual_seed(0))
    loss(b["v"], b["t"], b["image_ids"], b["text_ids"], b["mv"], b["mt"])
    pm, pv, nm, nv = (float(x) for x in loss.stats.gaussians())  # after the step's own update
    cand_img = torch.cat([b["image_ids"], b["bank_img_ids"]]).tolist()
    r_sum = r_s = r_s2 = w_sum = w_s = w_s2 = n = 0.0
    for anchors, candidates in ((b["v"], torch.cat([b["mt"], b["bank_txt"]])),
                                (b["t"], torch.cat([b["mv"], b["bank_img"]]))):
        for i in range(B):
            for j in range(candidates.shape[0]):
                if cand_img[j] == int(b["image_ids"][i]):
                    continue
                s = float(anchors[i] @ candidates[j])
                logit = normal_logpdf(s, pm, pv) - normal_logpdf(s, nm, nv) - math.log(1 / 0.05 - 1)
                r = 1 / (1 + math.exp(-logit))
                n += 1
                r_sum, r_s, r_s2 = r_sum + r, r_s + r * s, r_s2 + r * s * s
                w_sum, w_s, w_s2 = w_sum + (1 - r), w_s + (1 - r) * s, w_s2 + (1 - r) * s * s
    assert 0.01 < r_sum / n < 0.5
    assert float(loss.prior_estimate) == pytest.approx(r_sum / n, rel=1e-4)
    want = [r_s / r_sum, r_s2 / r_sum - (r_s / r_sum) ** 2, w_s / w_sum, w_s2 / w_sum - (w_s / w_sum) ** 2]
    assert loss.mixture.tolist() == pytest.approx(want, rel=1e-3, abs=1e-6)
    # The next step's posterior uses the mixture and the estimate, the cut-down the published mu+.
    g = loss._gaussians()
    assert [float(x) for x in g[:4]] == pytest.approx(want, rel=1e-3, abs=1e-6)


def test_the_estimated_prior_waits_for_the_gaussians() -> None:
    loss, b = setup_loss(prior="estimated")
    loss.stats.reset()  # not ready: fewer than min_pos_samples positives after this step
    loss.stats.min_pos_samples = 1000
    loss.set_generator(torch.Generator().manual_seed(0))
    loss(b["v"], b["t"], b["image_ids"], b["text_ids"], b["mv"], b["mt"])
    assert float(loss.prior_estimate) == pytest.approx(0.05) and float(loss.mixture.abs().sum()) == 0


def test_online_batch_with_the_hardest_in_batch_negative_is_vsepp() -> None:
    g = torch.Generator().manual_seed(3)
    v0 = F.normalize(torch.randn(8, D, generator=g), dim=-1)
    t0 = F.normalize(v0 + 0.7 * torch.randn(8, D, generator=g), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    grads = []
    for loss in (FNELoss(embed_dim=D, memory_size=0, warmup_epochs=0, selection="hardest", online_batch=True),
                 VSELoss(max_violation=True)):
        v, t = v0.clone().requires_grad_(), t0.clone().requires_grad_()
        momentum = (torch.randn(8, D, generator=g), torch.randn(8, D, generator=g))  # unused by either
        value, _ = (loss(v, t, ids, torch.arange(8), *momentum) if isinstance(loss, FNELoss)
                    else loss(v, t, ids, torch.arange(8)))
        value.backward()
        grads.append((value.detach(), v.grad, t.grad))
    (fv, fgv, fgt), (vv, vgv, vgt) = grads
    assert float(vv) > 0
    torch.testing.assert_close(fv, vv)
    torch.testing.assert_close(fgv, vgv)
    torch.testing.assert_close(fgt, vgt)  # the negatives' gradient too, which momentum candidates lack


def test_without_online_batch_in_batch_negatives_get_no_gradient() -> None:
    loss, b = setup_loss(selection="hardest")
    loss.set_generator(torch.Generator().manual_seed(0))
    v, t, mt = (b[k].clone().requires_grad_() for k in ("v", "t", "mt"))
    value, _ = loss(v, t, b["image_ids"], b["text_ids"], b["mv"], mt)
    value.backward()
    assert float(v.grad.abs().sum()) > 0 and float(t.grad.abs().sum()) > 0
    assert mt.grad is None  # momentum candidates are constants; with online_batch the rows are t's


def test_checkpoints_from_before_the_options_load() -> None:
    loss = FNELoss(embed_dim=D, memory_size=4, prior="estimated", match_prior=0.02)
    state = {k: v for k, v in loss.state_dict().items() if k not in ("prior_estimate", "mixture")}
    fresh = FNELoss(embed_dim=D, memory_size=4, prior="estimated", match_prior=0.02)
    fresh.load_state_dict(state)  # strict
    assert float(fresh.prior_estimate) == pytest.approx(0.02)
