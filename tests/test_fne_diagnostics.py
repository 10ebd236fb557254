"""FNE against plain loops written here: the loss value in sample mode with a filled bank, the
false-negative rates and base rate (non-zero by construction), the binned AUC, and every ablation
switch changing the negatives that are drawn."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fne_lightning.fne.diagnostics import binned_auc
from fne_lightning.fne.negatives import fne_weights, hardest_negatives, sample_negatives
from fne_lightning.fne.stats import Gaussians
from fne_lightning.losses import FNELoss, VSELoss

B, D, K = 6, 8, 10


def setup_loss(**kwargs) -> tuple[FNELoss, dict[str, torch.Tensor]]:
    """FNE with a full bank of known slots, Gaussians ready, and declared positives."""
    g = torch.Generator().manual_seed(0)
    unit = lambda n: F.normalize(torch.randn(n, D, generator=g), dim=-1)  # noqa: E731
    loss = FNELoss(embed_dim=D, memory_size=K, warmup_epochs=0, min_pos_samples=1, cutdown=0.6, tau=0.5,
                   match_prior=0.05, **kwargs)
    bank_img, bank_txt = unit(K), unit(K)
    bank_img_ids, bank_txt_ids = torch.arange(10, 10 + K), torch.arange(20, 20 + K)
    loss.bank.enqueue(bank_img, bank_txt, bank_img_ids, bank_txt_ids)
    v = unit(B)
    batch = {"v": v, "t": F.normalize(v + 0.5 * unit(B), dim=-1), "mv": unit(B), "mt": unit(B),
             "image_ids": torch.tensor([0, 0, 1, 2, 3, 4]), "text_ids": torch.arange(B)}
    # Truly matching pairs beyond the own image: every anchor image matches some bank captions and
    # batch captions of other images, and some bank images match the batch captions.
    pairs = [(i, j) for i in range(5) for j in range(B) if (i + j) % 3 == 0] + \
            [(i, 20 + k) for i in range(5) for k in range(K) if (i + k) % 4 == 0] + \
            [(10 + k, j) for k in range(K) for j in range(B) if (k + j) % 5 == 0]
    loss.positives.set_pairs(torch.tensor(pairs), num_texts=20 + K)
    loss.stats.pos_count.fill_(50.0)
    loss.stats.pos_mean.fill_(0.6)
    loss.stats.pos_m2.fill_(49 * 0.04)  # var 0.04
    loss.stats.neg_count.fill_(100.0)
    loss.stats.neg_mean.fill_(0.1)
    loss.stats.neg_m2.fill_(99 * 0.05)  # var 0.05
    loss.reset_stats_every_epoch = False
    batch.update(bank_img=bank_img, bank_txt=bank_txt, bank_img_ids=bank_img_ids, bank_txt_ids=bank_txt_ids,
                 pairs=set(pairs))
    return loss, batch


def normal_logpdf(x: float, mean: float, var: float) -> float:
    return -0.5 * math.log(2 * math.pi * var) - (x - mean) ** 2 / (2 * var)


def loop_direction(anchors, positive, candidates, cand_image_ids, anchor_image_ids, u, stats, loss) -> float:
    """The published rule, one anchor at a time: weights, cut-down, inverse-CDF draw, hinge."""
    pm, pv, nm, nv = stats
    total = 0.0
    for i in range(anchors.shape[0]):
        weights, scores = [], []
        for j in range(candidates.shape[0]):
            s = float(anchors[i] @ candidates[j])
            scores.append(s)
            if int(cand_image_ids[j]) == int(anchor_image_ids[i]):
                weights.append(0.0)
                continue
            logit = normal_logpdf(s, pm, pv) - normal_logpdf(s, nm, nv) - math.log(1 / loss.match_prior - 1)
            p_fn = 1 / (1 + math.exp(-logit))
            w = math.exp(-loss.tau * (s - float(positive[i])) ** 2)
            if p_fn > 1 - loss.false_margin:
                w = math.exp(-loss.tau * p_fn)
            if s <= pm - loss.cutdown:
                w = 0.0
            weights.append(w)
        cdf = list(torch.tensor(weights).cumsum(0).tolist())
        target = float(u[i]) * cdf[-1]
        pick = next(j for j, c in enumerate(cdf) if c > target) if cdf[-1] > 0 else None
        if pick is None:  # all cut: the hardest valid negative
            pick = max((j for j in range(len(scores)) if int(cand_image_ids[j]) != int(anchor_image_ids[i])),
                       key=lambda j: scores[j])
        total += max(0.0, loss.margin + scores[pick] - float(positive[i]))
    return total / anchors.shape[0]


def test_fne_loss_in_sample_mode_equals_a_plain_loop() -> None:
    loss, b = setup_loss()
    gen = torch.Generator().manual_seed(7)
    loss.set_generator(gen)
    state = gen.get_state()
    value, _ = loss(b["v"], b["t"], b["image_ids"], b["text_ids"], b["mv"], b["mt"])
    replay = torch.Generator()
    replay.set_state(state)
    u_i2t, u_t2i = torch.rand(B, generator=replay), torch.rand(B, generator=replay)  # i2t draws first
    # The step first merges its own confident pairs into the statistics, then selects.
    stats = tuple(float(x) for x in loss.stats.gaussians())
    assert stats != (0.6, 0.04, 0.1, 0.05)
    cand_img_ids = torch.cat([b["image_ids"], b["bank_img_ids"]])
    i2t = loop_direction(b["v"], (b["v"] * b["mt"]).sum(-1), torch.cat([b["mt"], b["bank_txt"]]), cand_img_ids,
                         b["image_ids"], u_i2t, stats, loss)
    t2i = loop_direction(b["t"], (b["t"] * b["mv"]).sum(-1), torch.cat([b["mv"], b["bank_img"]]), cand_img_ids,
                         b["image_ids"], u_t2i, stats, loss)
    assert value.item() == pytest.approx(i2t + t2i, abs=1e-5) and value.item() > 0


def test_fn_rates_and_base_rate_match_a_loop() -> None:
    loss, b = setup_loss(selection="hardest")  # the negative used is then known: the hardest valid one
    _, diag = loss(b["v"], b["t"], b["image_ids"], b["text_ids"], b["mv"], b["mt"])
    cand_img = torch.cat([b["image_ids"], b["bank_img_ids"]]).tolist()
    cand_txt = torch.cat([b["text_ids"], b["bank_txt_ids"]]).tolist()
    pairs, rates, base = b["pairs"], [], []
    for anchors, cands, truth in ((b["v"], torch.cat([b["mt"], b["bank_txt"]]),
                                   lambda i, j: (int(b["image_ids"][i]), cand_txt[j]) in pairs),
                                  (b["t"], torch.cat([b["mv"], b["bank_img"]]),
                                   lambda i, j: (cand_img[j], int(b["text_ids"][i])) in pairs)):
        hits = matches = valid = 0
        for i in range(B):
            ok = [j for j in range(len(cand_img)) if cand_img[j] != int(b["image_ids"][i])]
            hardest = max(ok, key=lambda j: float(anchors[i] @ cands[j]))
            hits += truth(i, hardest)
            matches += sum(truth(i, j) for j in ok)
            valid += len(ok)
        rates.append(hits / B)
        base.append(matches / valid)
    assert 0 < sum(rates) and 0 < sum(base)
    assert diag["hardest_fn_rate"].item() == pytest.approx(sum(rates) / 2)
    assert diag["sampled_fn_rate"].item() == pytest.approx(sum(rates) / 2)
    assert diag["fn_base_rate"].item() == pytest.approx(sum(base) / 2)


def test_vse0_reports_the_share_of_all_negatives_that_truly_match() -> None:
    v = F.normalize(torch.randn(5, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    t = F.normalize(v + 0.4 * torch.randn(5, D, generator=torch.Generator().manual_seed(2)), dim=-1)
    image_ids, text_ids = torch.tensor([0, 0, 1, 2, 3]), torch.arange(5)
    pairs = {(0, 2), (1, 4), (2, 0), (3, 1), (3, 2)}
    loss = VSELoss(max_violation=False)
    loss.positives.set_pairs(torch.tensor(sorted(pairs)), num_texts=5)
    _, diag = loss(v, t, image_ids, text_ids)
    # Every (anchor, candidate) pair of different images, both directions, counts as a negative used.
    negatives = [(i, j) for i in range(5) for j in range(5) if image_ids[i] != image_ids[j]]
    i2t = sum((int(image_ids[i]), j) in pairs for i, j in negatives)
    t2i = sum((int(image_ids[j]), i) in pairs for i, j in negatives)
    assert diag["sampled_fn_rate"].item() == pytest.approx((i2t + t2i) / (2 * len(negatives))) and i2t + t2i > 0


def exact_auc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_binned_auc_equals_the_mann_whitney_statistic() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.rand(40, 30, generator=g) < 0.2
    scores = (torch.randn(40, 30, generator=g) * 0.3 + labels * 0.4).clamp(-1, 1)
    scores[:5] = scores[:5].round(decimals=1)  # ties
    valid = torch.rand(40, 30, generator=g) < 0.9
    got = binned_auc(scores, labels & valid, ~labels & valid, -1.0, 1.0, bins=2**20).item()
    want = exact_auc(scores[valid].tolist(), labels[valid].tolist())
    assert got == pytest.approx(want, abs=1e-4) and 0.6 < want < 0.99
    assert binned_auc(scores, labels & False, valid, -1.0, 1.0).item() == 0.5  # one class empty


@pytest.mark.parametrize("switch", [{"posterior": False}, {"weighting": "complement"}, {"cutdown": None},
                                    {"match_prior": 0.5}, {"exclude": 0.5}, {"match_prior": torch.tensor(0.5)}])
def test_every_ablation_switch_changes_the_drawn_negatives(switch: dict) -> None:
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(64, 200, generator=g) * 1.4 - 0.4
    positive = torch.full((64,), 0.7)
    valid = torch.rand(64, 200, generator=g) < 0.95
    gauss = Gaussians(torch.tensor(0.7), torch.tensor(0.01), torch.tensor(0.2), torch.tensor(0.04),
                      ready=torch.tensor(True), pos_count=torch.tensor(500.0))
    defaults = {"tau": 0.5, "match_prior": 0.05, "false_margin": 0.999, "weighting": "reference",
                "cutdown": 0.2, "posterior": True}
    drawn = []
    for kwargs in (defaults, {**defaults, **switch}):
        w = fne_weights(scores, positive, valid, gauss, **kwargs)
        idx, _ = sample_negatives(w.weights, scores, valid, generator=torch.Generator().manual_seed(5),
                                  hardest=hardest_negatives(scores, valid))
        drawn.append(idx)
    assert (drawn[0] != drawn[1]).sum() >= 5, switch


def test_aucs_and_flagged_precision_match_a_loop() -> None:
    """score_auc, posterior_auc (ranking by the posterior's logit) and flagged_precision against
    the Mann-Whitney statistic and counts over every valid (anchor, candidate) pair, with p_fn
    from the Gaussian densities written here."""
    loss, b = setup_loss()
    # A narrow positive Gaussian inside the scores' range: p_fn peaks near 0.3 and is not a monotone
    # function of the score, so the two AUCs differ.
    loss.stats.pos_count.fill_(5000.0)
    loss.stats.pos_mean.fill_(0.3)
    loss.stats.pos_m2.fill_(4999 * 0.005)
    _, diag = loss(b["v"], b["t"], b["image_ids"], b["text_ids"], b["mv"], b["mt"])
    pm, pv, nm, nv = (float(x) for x in loss.stats.gaussians())  # after the step's own update, as it selects
    cand_img = torch.cat([b["image_ids"], b["bank_img_ids"]]).tolist()
    cand_txt = torch.cat([b["text_ids"], b["bank_txt_ids"]]).tolist()
    pairs, want = b["pairs"], {"score_auc": [], "posterior_auc": [], "flagged_precision": []}
    for anchors, cands, truth in ((b["v"], torch.cat([b["mt"], b["bank_txt"]]),
                                   lambda i, j: (int(b["image_ids"][i]), cand_txt[j]) in pairs),
                                  (b["t"], torch.cat([b["mv"], b["bank_img"]]),
                                   lambda i, j: (cand_img[j], int(b["text_ids"][i])) in pairs)):
        scores, logits, labels, flagged_true, flagged = [], [], [], 0, 0
        for i in range(B):
            for j in range(len(cand_img)):
                if cand_img[j] == int(b["image_ids"][i]):
                    continue
                s = float(anchors[i] @ cands[j])
                logit = normal_logpdf(s, pm, pv) - normal_logpdf(s, nm, nv) - math.log(1 / loss.match_prior - 1)
                is_fn = 1 / (1 + math.exp(-logit)) > 1 - loss.false_margin
                scores.append(s), logits.append(logit), labels.append(truth(i, j))
                flagged += is_fn
                flagged_true += is_fn and truth(i, j)
        want["score_auc"].append(exact_auc(scores, labels))
        want["posterior_auc"].append(exact_auc(logits, labels))
        want["flagged_precision"].append(flagged_true / flagged)
    # The score's bins (width 0.001) hold no ties here; the logit's (width 0.054 on [-90, 20]) a few.
    tolerance = {"score_auc": 1e-6, "posterior_auc": 1.5e-3, "flagged_precision": 1e-6}
    for key, (i2t, t2i) in want.items():
        assert diag[key].item() == pytest.approx((i2t + t2i) / 2, abs=tolerance[key]), key
    assert all(0.0 < x < 1.0 for x in want["flagged_precision"])
    # Ranking by the score instead of the posterior would be caught.
    assert abs(sum(want["posterior_auc"]) - sum(want["score_auc"])) / 2 > 3 * tolerance["posterior_auc"]
