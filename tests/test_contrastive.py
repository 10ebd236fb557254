"""InfoNCE and SigLIP (``losses/contrastive.py``) against plain per-anchor loops written here (value
and gradients, the scale and bias included), against open_clip's own ``ClipLoss`` and
``SigLipLoss``; the model's ``logit_scale`` (``bind``); the diagnostics against declared truth;
the triplet losses' oracles; FNE's online queue; and both losses through the training entry point.

The batches come from a small world of images: captions of one image share its base vector, two
images are near-duplicates (each one's captions truly match the other: false negatives that score
high) and the captions of one image are declared to match another one as well (false negatives
that score low), so every truth-based quantity is non-trivial.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn

from fne_lightning.errors import FNEError
from fne_lightning.fne.contrastive import expected_targets, id_targets
from fne_lightning.losses import FNELoss, InfoNCELoss, SigLIPLoss, VSELoss
from fne_lightning.models.encoders import DualEncoder
from fne_lightning.module import RetrievalModule

from conftest import TINY_OVERRIDES, compose_config

D = 16
IDS = [0, 0, 1, 2, 3, 3, 3, 4]  # several captions of one image, unevenly
TWINS = ((1, 4),)  # near-duplicate images: each one's captions truly match the other
ALSO = ((2, 3),)  # the captions of image 2 truly match image 3 too (and score low against it)
F64 = torch.float64


# ----------------------------------------------------------------------------- the world
class World:
    """Images with base vectors; batches of (image, caption) pairs drawn from them, with their
    momentum features; the declared true matches as a set of (image id, caption id)."""

    def __init__(self, seed: int = 0, num_images: int = 8, twins=TWINS, also=ALSO) -> None:
        self.g = torch.Generator().manual_seed(seed)
        base = torch.randn(num_images, D, generator=self.g)
        for a, b in twins:
            base[b] = base[a] + 0.3 * torch.randn(D, generator=self.g)
        self.base = F.normalize(base, dim=-1)
        self.twins, self.also = twins, also
        self.pairs: set[tuple[int, int]] = set()
        self.num_texts = 0

    def batch(self, image_ids: list[int]) -> dict[str, Tensor]:
        b = len(image_ids)
        ids = torch.tensor(image_ids)
        tids = torch.arange(self.num_texts, self.num_texts + b)
        self.num_texts += b
        v = F.normalize(self.base[ids] + 0.1 * torch.randn(b, D, generator=self.g), dim=-1)
        t = F.normalize(self.base[ids] + 0.3 * torch.randn(b, D, generator=self.g), dim=-1)
        mv = F.normalize(v + 0.05 * torch.randn(b, D, generator=self.g), dim=-1)
        mt = F.normalize(t + 0.05 * torch.randn(b, D, generator=self.g), dim=-1)
        for image, text in zip(image_ids, tids.tolist(), strict=True):
            self.pairs.add((image, text))
            for a, c in self.twins:
                if image in (a, c):
                    self.pairs.add((a + c - image, text))
            for a, c in self.also:
                if image == a:
                    self.pairs.add((c, text))
        return {"v": v, "t": t, "ids": ids, "tids": tids, "mv": mv, "mt": mt}

    def declare(self, loss: nn.Module) -> None:
        """Hand the loss the declared pairs (as the module does from the positives file)."""
        loss.positives.set_pairs(torch.tensor(sorted(self.pairs)), self.num_texts)


def leaves(b: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """float32 leaves for the loss and float64 leaves of the same values for the reference."""
    v, t = b["v"].clone().requires_grad_(True), b["t"].clone().requires_grad_(True)
    return v, t, b["v"].double().requires_grad_(True), b["t"].double().requires_grad_(True)


def scalar_leaf(x: Tensor | float) -> Tensor:
    return torch.tensor(float(x.detach() if isinstance(x, Tensor) else x), dtype=F64,
                        requires_grad=True)


def value_of(loss: nn.Module, b: dict[str, Tensor]) -> float:
    """The loss of an in-batch step, as a number."""
    with torch.no_grad():
        return float(loss(b["v"], b["t"], b["ids"], b["tids"])[0])


def close(got: Tensor, want: Tensor, tol: float = 2e-5) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


# ------------------------------------------------------------------- the reference, plainly
def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@dataclass
class Posterior:
    """FNE's false-negative posterior from two Gaussians and a prior, written out in float64."""

    pos_mean: float
    pos_var: float
    neg_mean: float
    neg_var: float
    prior: float

    @classmethod
    def of(cls, loss: nn.Module, prior: float | None = None) -> Posterior:
        """From the loss's fitted statistics (the fit itself is tested in test_stats.py)."""
        st = loss.stats
        return cls(float(st.pos_mean), float(st.pos_var), float(st.neg_mean), float(st.neg_var),
                   loss.match_prior if prior is None else prior)

    def log_odds(self, s: float) -> float:
        def log_normal(mean: float, var: float) -> float:
            return -0.5 * math.log(2 * math.pi * var) - (s - mean) ** 2 / (2 * var)

        return (log_normal(self.pos_mean, self.pos_var) - log_normal(self.neg_mean, self.neg_var)
                + math.log(self.prior / (1 - self.prior)))

    def p(self, s: float) -> float:
        return math.exp(log_sigmoid(self.log_odds(s)))

    def log_keep(self, s: float) -> float:
        """log(1 - p_fn)."""
        return log_sigmoid(-self.log_odds(s))


@dataclass
class Entry:
    """One (anchor, candidate) pair as the reference saw it."""

    s: float  # cosine score
    negative: bool  # treated as a negative (removed ones included)
    true: bool  # declared true match
    push: float = 0.0  # softmax probability (InfoNCE) or sigmoid(logit) x weight (SigLIP)
    weight: float | None = None  # fne: 1 - p_fn of a kept negative


@dataclass
class Rule:
    """What to do with a negative: ``none``, ``oracle`` (eliminate/attract) or ``fne``
    (eliminate: weights; attract: soft labels)."""

    fn: str = "none"
    action: str = "eliminate"
    post: Posterior | None = None  # fne: None while the Gaussians are not ready
    exclude: float | None = None
    cut_at: float | None = None  # fne cut-down: remove negatives scoring <= this

    def apply(self, s: float, true: bool) -> tuple[str, float]:
        """('keep', log-weight), ('remove', 0), ('attract', 0) or ('soft', its label p_fn) for a
        negative of score s."""
        if self.fn == "oracle" and true:
            return ("remove" if self.action == "eliminate" else "attract"), 0.0
        if self.fn == "fne" and self.post is not None:
            if self.exclude is not None and self.post.p(s) > self.exclude:
                return "remove", 0.0
            if self.cut_at is not None and s <= self.cut_at:
                return "remove", 0.0
            if self.action == "attract":
                return "soft", self.post.p(s)
            return "keep", self.post.log_keep(s)
        return "keep", 0.0


PLAIN = Rule()


def infonce_direction(anchors: Tensor, cands: Tensor, anchor_img: list[int], cand_img: list[int],
                      truth: Callable[[int, int], bool], log_scale: Tensor, rule: Rule, same_image: str,
                      alpha: float | None = None, m_anchors: Tensor | None = None,
                      m_cands: Tensor | None = None) -> tuple[Tensor, list[list[Entry]]]:
    """One direction of InfoNCE, anchor by anchor and candidate by candidate. Candidate j == i is
    anchor i's own pair. Returns the mean loss over the anchors and every anchor's entries."""
    scale = log_scale.exp()
    losses, rows = [], []
    for i in range(anchors.shape[0]):
        logits, targets, momentum, kept, row = [], [], [], [], []
        for j in range(cands.shape[0]):
            same = anchor_img[i] == cand_img[j]
            if same_image == "mask" and same and j != i:
                continue  # another caption of the anchor's image: out of the denominator
            positive = j == i if same_image == "mask" else same
            entry = Entry(float(anchors[i].detach() @ cands[j].detach()), not same, truth(i, j))
            row.append(entry)
            log_w, label = 0.0, 0.0
            if not same:
                what, value = rule.apply(entry.s, entry.true)
                if what == "remove":
                    continue
                if what == "attract":
                    positive, entry.negative = True, False
                elif what == "soft":
                    label = value  # its expected label under the posterior
                elif rule.fn == "fne" and rule.post is not None:
                    log_w = value
                    entry.weight = math.exp(log_w)
            logits.append(scale * (anchors[i] @ cands[j]) + log_w)
            targets.append(1.0 if positive else label)
            kept.append(entry)
            if alpha is not None:
                momentum.append(float(scale.detach()) * float(m_anchors[i] @ m_cands[j]))
        y = [x / sum(targets) for x in targets]
        if alpha is not None:
            top = max(momentum)
            e = [math.exp(m - top) for m in momentum]
            y = [alpha * ek / sum(e) + (1 - alpha) * yk for ek, yk in zip(e, y, strict=True)]
        lse = torch.logsumexp(torch.stack(logits), 0)
        losses.append(-sum(yk * (lk - lse) for yk, lk in zip(y, logits, strict=True) if yk > 0))
        for entry, logit in zip(kept, logits, strict=True):
            entry.push = float(torch.exp(logit - lse).detach())
        rows.append(row)
    return torch.stack(losses).mean(), rows


def ref_infonce(v: Tensor, t: Tensor, ids: Tensor, tids: Tensor, pairs: set, log_scale: Tensor,
                rule: Rule = PLAIN, same_image: str = "target", mv: Tensor | None = None,
                mt: Tensor | None = None, queue: list[tuple[Tensor, Tensor, int, int]] | None = None,
                queue_features: str = "momentum", alpha: float | None = None):
    """Both directions: ``(loss, i2t entries, t2i entries)``. Candidates: the batch (online, or
    with a queue of momentum features the batch's momentum features), then the ``queue`` rows
    ``(image feature, caption feature, image id, caption id)``; ``queue=None``: no queue."""
    use_momentum = queue is not None and queue_features == "momentum"
    queue = queue or []
    ids, tids = ids.tolist(), tids.tolist()
    q_v = [q[0].double() for q in queue]
    q_t = [q[1].double() for q in queue]
    q_img, q_txt = [q[2] for q in queue], [q[3] for q in queue]
    batch_v, batch_t = (mv.double(), mt.double()) if use_momentum else (v, t)
    cand_t, cand_v = torch.stack([*batch_t, *q_t]), torch.stack([*batch_v, *q_v])
    cand_img, cand_txt = ids + q_img, tids + q_txt
    m_t = m_v = None
    if alpha is not None:
        m_t = torch.stack([*mt.double(), *q_t])
        m_v = torch.stack([*mv.double(), *q_v])
    i2t, rows_i2t = infonce_direction(v, cand_t, ids, cand_img, lambda i, j: (ids[i], cand_txt[j]) in pairs,
                                      log_scale, rule, same_image, alpha,
                                      None if mv is None else mv.double(), m_t)
    t2i, rows_t2i = infonce_direction(t, cand_v, ids, cand_img, lambda i, j: (cand_img[j], tids[i]) in pairs,
                                      log_scale, rule, same_image, alpha,
                                      None if mt is None else mt.double(), m_v)
    return (i2t + t2i) / 2, rows_i2t, rows_t2i


def ref_siglip(v: Tensor, t: Tensor, ids: Tensor, tids: Tensor, pairs: set, log_scale: Tensor, bias: Tensor,
               rule: Rule = PLAIN) -> tuple[Tensor, list[list[Entry]]]:
    """The sigmoid loss pair by pair: label +1 for the same image (every caption of it), -1 else."""
    ids, tids = ids.tolist(), tids.tolist()
    scale = log_scale.exp()
    total, rows = 0.0, []
    for i in range(v.shape[0]):
        row = []
        for j in range(t.shape[0]):
            same = ids[i] == ids[j]
            entry = Entry(float(v[i].detach() @ t[j].detach()), not same, (ids[i], tids[j]) in pairs)
            row.append(entry)
            label, weight = (1.0 if same else 0.0), 1.0  # the probability that the pair matches
            if not same:
                what, value = rule.apply(entry.s, entry.true)
                if what == "soft":
                    label = value
                else:
                    weight = 0.0 if what == "remove" else math.exp(value)
                if what == "attract":
                    label, weight, entry.negative = 1.0, 1.0, False
                elif rule.fn == "fne" and rule.post is not None and what == "keep":
                    entry.weight = weight
            logit = scale * (v[i] @ t[j]) + bias
            entry.push = weight * float(torch.sigmoid(logit.detach()))
            if weight:  # binary cross-entropy with the label
                total = total - weight * (label * F.logsigmoid(logit) + (1 - label) * F.logsigmoid(-logit))
        rows.append(row)
    return total / v.shape[0], rows


def exact_auc(matches: list[float], others: list[float]) -> float:
    """The Mann-Whitney statistic, pair by pair (0.5 when a class is empty)."""
    pairs = [(a > b) + 0.5 * (a == b) for a in matches for b in others]
    return sum(pairs) / len(pairs) if pairs else 0.5


def binning_slack(matches: list[float], others: list[float], lo: float, hi: float, bins: int = 2048) -> float:
    """How far binned_auc may be from the exact AUC: half of the cross pairs that may share a bin."""
    width = (hi - lo) / (bins - 1)
    c = lambda x: min(max(x, lo), hi)  # noqa: E731
    near = sum(abs(c(a) - c(b)) <= width for a in matches for b in others)
    return 0.5 * near / max(len(matches) * len(others), 1) + 1e-6


def em_step(post: Posterior, scores: list[float]) -> tuple[float, tuple[float, float, float, float]]:
    """One EM step of the two-component mixture over the negatives' scores: responsibilities
    r = p_fn under ``post``, then the prior and the r- and (1 - r)-weighted moments."""
    r = [post.p(s) for s in scores]
    sr, sw = sum(r), len(scores) - sum(r)
    pos_mean = sum(ri * s for ri, s in zip(r, scores, strict=True)) / sr
    neg_mean = sum((1 - ri) * s for ri, s in zip(r, scores, strict=True)) / sw
    pos_var = max(sum(ri * s * s for ri, s in zip(r, scores, strict=True)) / sr - pos_mean**2, 1e-6)
    neg_var = max(sum((1 - ri) * s * s for ri, s in zip(r, scores, strict=True)) / sw - neg_mean**2, 1e-6)
    return min(max(sr / len(scores), 1e-6), 0.5), (pos_mean, pos_var, neg_mean, neg_var)


def negative_scores(*rows: list[list[Entry]]) -> list[float]:
    return [e.s for r in rows for row in r for e in row if e.negative]


def truth_diagnostics(rows: list[list[Entry]], post: Posterior | None = None) -> dict[str, float]:
    """One direction's diagnostics from its entries, by their definitions."""
    num = den = 0.0
    hardest, n_true, n_neg, matches, others = [], 0, 0, [], []
    for row in rows:
        negs = [e for e in row if e.negative]
        num += sum(e.push for e in negs if e.true)
        den += sum(e.push for e in negs)
        if negs:
            hardest.append(max(negs, key=lambda e: e.s).true)
        n_true += sum(e.true for e in negs)
        n_neg += len(negs)
        matches += [e.s for e in negs if e.true]
        others += [e.s for e in negs if not e.true]
    out = {"fn_num": num, "fn_den": den, "hardest_fn_rate": sum(hardest) / len(hardest),
           "fn_base_rate": n_true / n_neg, "score_auc": exact_auc(matches, others),
           "score_slack": binning_slack(matches, others, -1.0, 1.0)}
    if post is not None:
        lm, lo = [post.log_odds(s) for s in matches], [post.log_odds(s) for s in others]
        out["posterior_auc"] = exact_auc(lm, lo)
        out["posterior_slack"] = binning_slack(lm, lo, -90.0, 20.0)
    return out


def check_diagnostics(diag: dict[str, Tensor], directions: list[dict[str, float]]) -> None:
    """The loss's diagnostics against the directions' expectations (means, fn_mass as one share)."""
    mean = lambda k: sum(d[k] for d in directions) / len(directions)  # noqa: E731
    fn_mass = sum(d["fn_num"] for d in directions) / sum(d["fn_den"] for d in directions)
    assert float(diag["fn_mass"]) == pytest.approx(fn_mass, rel=1e-4, abs=1e-7)
    assert float(diag["hardest_fn_rate"]) == pytest.approx(mean("hardest_fn_rate"), abs=1e-6)
    assert float(diag["fn_base_rate"]) == pytest.approx(mean("fn_base_rate"), abs=1e-6)
    assert float(diag["score_auc"]) == pytest.approx(mean("score_auc"), abs=mean("score_slack"))
    if "posterior_auc" in directions[0]:
        assert float(diag["posterior_auc"]) == pytest.approx(mean("posterior_auc"), abs=mean("posterior_slack"))


def kept_weights(*rows: list[list[Entry]]) -> list[float]:
    return [e.weight for r in rows for row in r for e in row if e.weight is not None]


def removed(*rows: list[list[Entry]]) -> int:
    """Negatives the reference removed (in no softmax: push 0 and no weight) under fne."""
    return sum(e.negative and e.push == 0.0 for r in rows for row in r for e in row)


# ------------------------------------------------------------------------------ InfoNCE
def run_infonce(loss: InfoNCELoss, b: dict[str, Tensor], world: World, *, momentum: bool = False,
                **ref) -> tuple[Tensor, dict[str, Tensor], tuple]:
    """One step of the loss and of the reference on the same batch; values and gradients compared
    (features, and the scale). Returns the diagnostics and the reference's output."""
    v, t, v64, t64 = leaves(b)
    log_scale = scalar_leaf(loss.logit_scale)
    loss.zero_grad(set_to_none=True)
    extra = (b["mv"], b["mt"]) if momentum else ()
    value, diag = loss(v, t, b["ids"], b["tids"], *extra)
    out = ref_infonce(v64, t64, b["ids"], b["tids"], world.pairs, log_scale, **ref)
    close(value, out[0])
    value.backward()
    out[0].backward()
    close(v.grad, v64.grad)
    close(t.grad, t64.grad)
    close(loss.logit_scale.grad, log_scale.grad)
    assert float(diag["train/logit_scale"]) == pytest.approx(math.exp(float(log_scale.detach())), rel=1e-6)
    return value, diag, out


def test_infonce_by_hand() -> None:
    # Two pairs, v = e0, e1; t0 = e0, t1 = (0.6, 0.8); temperature 0.5 (scale 2). Scores
    # [[1, 0.6], [0, 0.8]]: i2t rows -log softmax(2 s_i)[i]: log(1 + e^(1.2 - 2)) and
    # log(1 + e^(0 - 1.6)); t2i columns: log(1 + e^(0 - 2)) and log(1 + e^(1.2 - 1.6)).
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = InfoNCELoss(embed_dim=2, temperature=0.5)
    value, _ = loss(v, t, torch.tensor([0, 1]), torch.tensor([0, 1]))
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert float(value.detach()) == pytest.approx((sp(-0.8) + sp(-1.6) + sp(-2.0) + sp(-0.4)) / 4, rel=1e-6)
    # Both pairs of one image: the target spreads over both captions, both rows alike.
    value, _ = loss(v, t, torch.tensor([0, 0]), torch.tensor([0, 1]))
    i2t = (math.log(math.exp(2) + math.exp(1.2)) - (2 + 1.2) / 2 + math.log(1 + math.exp(1.6)) - 1.6 / 2) / 2
    t2i = (math.log(math.exp(2) + 1) - 2 / 2 + math.log(math.exp(1.2) + math.exp(1.6)) - (1.2 + 1.6) / 2) / 2
    assert float(value.detach()) == pytest.approx((i2t + t2i) / 2, rel=1e-6)


@pytest.mark.parametrize("same_image", ["target", "mask"])
def test_infonce_in_batch_equals_the_loop(same_image: str) -> None:
    world = World()
    b = world.batch(IDS)
    loss = InfoNCELoss(embed_dim=D, temperature=0.1, same_image=same_image)
    world.declare(loss)
    run_infonce(loss, b, world, same_image=same_image)
    # The two modes differ (captions of one image in the batch), so the parity is not vacuous.
    other = InfoNCELoss(embed_dim=D, temperature=0.1, same_image="mask" if same_image == "target" else "target")
    assert abs(value_of(loss, b) - value_of(other, b)) > 1e-3


@pytest.mark.parametrize("same_image", ["target", "mask"])
@pytest.mark.parametrize(("fn", "queue_features"), [("none", "momentum"), ("oracle", "momentum"),
                                                    ("distill", "momentum"), ("none", "online")])
def test_infonce_with_a_queue_equals_the_loop(same_image: str, fn: str, queue_features: str) -> None:
    # K = 12 slots, 8 pairs a step: 8 valid slots after the first step (4 never written, which
    # must not count), full and wrapped after the second. Later batches share image ids with
    # earlier ones, whose queue slots are then positives of the anchor.
    world = World(seed=1)
    batches = [world.batch(ids) for ids in (IDS, [1, 1, 5, 0, 6, 6, 2, 7], [4, 3, 3, 0, 5, 7, 7, 1])]
    loss = InfoNCELoss(embed_dim=D, temperature=0.1, same_image=same_image, memory_size=12,
                       queue_features=queue_features, false_negatives=fn, oracle_action="attract",
                       alpha_ramp_epochs=0.0)
    world.declare(loss)
    assert loss.requires_momentum == (queue_features == "momentum")
    momentum = queue_features == "momentum"
    queue: list[tuple[Tensor, Tensor, int, int]] = []  # what the bank should hold, oldest first
    same_image_slots = 0
    for step, b in enumerate(batches):
        rule = Rule(fn, "attract") if fn == "oracle" else Rule()
        run_infonce(loss, b, world, momentum=momentum, same_image=same_image, mv=b["mv"], mt=b["mt"],
                    queue=queue, queue_features=queue_features, rule=rule,
                    alpha=0.4 if fn == "distill" else None)
        same_image_slots += sum(q[2] in b["ids"].tolist() for q in queue)
        fv, ft = (b["mv"], b["mt"]) if momentum else (b["v"], b["t"])
        queue = (queue + list(zip(fv, ft, b["ids"].tolist(), b["tids"].tolist(), strict=True)))[-12:]
        bank = loss.bank
        valid = bank.valid_mask()
        assert int(valid.sum()) == min(8 * (step + 1), 12)
        # The valid slots hold exactly the last K rows written (detached), whatever their order.
        held = sorted(zip(bank.text_ids[valid].tolist(), bank.image_features[valid], bank.text_features[valid],
                          strict=True), key=lambda x: x[0])
        want = sorted(((q[3], q[0], q[1]) for q in queue), key=lambda x: x[0])
        assert [h[0] for h in held] == [w[0] for w in want]
        for (_, hv, ht), (_, wv, wt) in zip(held, want, strict=True):
            assert torch.equal(hv, wv) and torch.equal(ht, wt)
        assert not any(buf.requires_grad for buf in bank.buffers())
    assert same_image_slots > 0  # queue slots of an anchor's image id were in play


def test_infonce_queue_of_momentum_features_needs_them() -> None:
    b = World().batch(IDS)
    loss = InfoNCELoss(embed_dim=D, memory_size=12)
    assert loss.requires_momentum and loss.momentum_horizon(8) == 2
    with pytest.raises(ValueError, match="momentum"):
        loss(b["v"], b["t"], b["ids"], b["tids"])


def ready_fne(cls, b: dict[str, Tensor], exclude: str | None, cutdown: float | None, action: str = "eliminate",
              **kwargs):
    """A loss with ``false_negatives=fne`` whose Gaussians are ready at its first step (fitted on
    the batch's confident pairs as forward does first), the reference posterior and rule.
    ``exclude``: ``below`` / ``above``: just below / above the largest p_fn of a negative (the
    near-duplicates'), so that the threshold is tested where it makes a difference."""
    loss = cls(embed_dim=D, false_negatives="fne", min_pos_samples=1, match_prior=0.05, **kwargs)
    loss.stats.update(b["v"] @ b["t"].T, b["ids"][:, None] == b["ids"][None, :])
    post = Posterior.of(loss)
    loss.stats.reset()
    negatives = (b["v"] @ b["t"].T)[b["ids"][:, None] != b["ids"][None, :]]
    top = max(post.p(float(x)) for x in negatives)
    assert 0.5 < top < 0.99
    value = None if exclude is None else top + (1e-4 if exclude == "above" else -1e-4)
    loss = cls(embed_dim=D, false_negatives="fne", min_pos_samples=1, match_prior=0.05, exclude=value,
               cutdown=cutdown, fne_action=action, **kwargs)
    cut_at = None if cutdown is None else post.pos_mean - cutdown
    return loss, post, Rule("fne", action, post=post, exclude=value, cut_at=cut_at)


FNE_CASES = [(None, None), ("below", None), ("above", None), (None, 0.25)]


@pytest.mark.parametrize(("exclude", "cutdown"), FNE_CASES)
def test_infonce_fne_weights_negatives_by_one_minus_p_fn_once_ready(exclude, cutdown) -> None:
    world = World()
    b = world.batch(IDS)
    # Not ready (too few confident positives seen): exactly the plain loss.
    loss = InfoNCELoss(embed_dim=D, false_negatives="fne", min_pos_samples=10**6, match_prior=0.05,
                       exclude=0.5, cutdown=cutdown)
    world.declare(loss)
    run_infonce(loss, b, world, rule=Rule())
    # Ready: weights 1 - p_fn on the negatives only (exclude, cutdown: removed).
    loss, post, rule = ready_fne(InfoNCELoss, b, exclude, cutdown)
    world.declare(loss)
    _, diag, (_, rows_i2t, rows_t2i) = run_infonce(loss, b, world, rule=rule)
    assert bool(diag["ready"])
    # Not a vacuous parity: weights well below 1 unless removed, and removals where asked.
    assert (min(kept_weights(rows_i2t, rows_t2i)) < 0.5) == (exclude != "below")
    assert (removed(rows_i2t, rows_t2i) > 0) == (exclude == "below" or cutdown is not None)
    check_diagnostics(diag, [truth_diagnostics(rows_i2t, post), truth_diagnostics(rows_t2i, post)])


@pytest.mark.parametrize("cutdown", [None, 0.25])
@pytest.mark.parametrize("same_image", ["target", "mask"])
def test_infonce_fne_attract_targets_each_negatives_expected_label(cutdown, same_image: str) -> None:
    """``fne_action=attract``: a negative's target is its p_fn (normalised with the positives' 1s),
    nothing is weighted; as the loop computes it, values and gradients."""
    world = World()
    b = world.batch(IDS)
    loss, post, rule = ready_fne(InfoNCELoss, b, None, cutdown, "attract", same_image=same_image)
    world.declare(loss)
    _, diag, (_, rows_i2t, rows_t2i) = run_infonce(loss, b, world, rule=rule, same_image=same_image)
    check_diagnostics(diag, [truth_diagnostics(rows_i2t, post), truth_diagnostics(rows_t2i, post)])
    # Not a vacuous parity: the near-duplicates get real targets (p_fn > 0.5 seen in ready_fne), so
    # the loss differs from the plain one and from the weighting rule's.
    eliminate, _, _ = ready_fne(InfoNCELoss, b, None, cutdown, same_image=same_image)
    plain = InfoNCELoss(embed_dim=D, same_image=same_image)
    for other in (eliminate, plain):
        assert abs(value_of(other, b) - value_of(loss, b)) > 1e-3


def test_expected_targets_of_the_truth_are_the_attracting_oracles() -> None:
    """With the 0/1 truth as p_fn, the posterior's targets are the id targets of the positives and
    the true matches together; with p_fn between, each candidate's share is its label over the sum."""
    positive = torch.tensor([[True, False, False, False], [False, True, True, False]])
    truth = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(expected_targets(positive, truth), id_targets(positive | truth.bool()))
    soft = torch.tensor([[0.0, 0.5, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(expected_targets(positive, soft),
                               torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0, 0.5, 0.5, 0.0]]))


def test_infonce_fne_estimated_prior_is_one_em_step_computed_here() -> None:
    world = World()
    batches = [world.batch(IDS), world.batch([1, 4, 4, 2, 0, 3, 1, 2])]
    loss = InfoNCELoss(embed_dim=D, false_negatives="fne", min_pos_samples=1, match_prior=0.05,
                       prior="estimated")
    world.declare(loss)
    mixture: tuple[float, float, float, float] | None = None
    prior = 0.05
    for b in batches:
        loss.on_train_epoch_start()  # (reset_stats_every_epoch) each step's Gaussians from its batch alone
        loss.stats.update(b["v"] @ b["t"].T, b["ids"][:, None] == b["ids"][None, :])  # as forward does
        published = Posterior.of(loss, prior)
        loss.stats.reset()
        # The published Gaussians until the mixture is fitted, then the mixture's and its prior.
        post = published if mixture is None else Posterior(*mixture, prior)
        _, _, (_, rows_i2t, rows_t2i) = run_infonce(loss, b, world, rule=Rule("fne", post=post))
        # E-step over every negative of both directions, M-step by the formulas.
        prior, mixture = em_step(post, negative_scores(rows_i2t, rows_t2i))
        assert float(loss.prior_estimate) == pytest.approx(prior, rel=1e-4)
        torch.testing.assert_close(loss.mixture, torch.tensor(mixture, dtype=F64), rtol=1e-4, atol=1e-7)
    assert 0.05 != pytest.approx(prior, rel=0.01)  # the estimate moved


def test_infonce_distill_mixes_the_momentum_softmax_and_ramps_alpha() -> None:
    world = World()
    b = world.batch(IDS)
    loss = InfoNCELoss(embed_dim=D, false_negatives="distill", alpha=0.4, alpha_ramp_epochs=1.0,
                       warmup_epochs=1)
    assert loss.requires_momentum and loss.momentum_horizon(8) == 0
    for progress, alpha in ((0.5, 0.0), (1.0, 0.0), (1.5, 0.2), (1.75, 0.3), (2.0, 0.4), (3.6, 0.4)):
        loss.set_progress(progress)
        assert loss.distill_alpha() == pytest.approx(alpha)
    loss.set_progress(1.5)
    _, diag, _ = run_infonce(loss, b, world, momentum=True, mv=b["mv"], mt=b["mt"], alpha=0.2)
    assert float(diag["alpha"]) == pytest.approx(0.2)
    # The momentum model's softmax matters: alpha 0 is the plain id-target loss, which differs.
    loss.set_progress(1.0)
    with torch.no_grad():
        plain, _ = loss(b["v"], b["t"], b["ids"], b["tids"], b["mv"], b["mt"])
        loss.set_progress(2.0)
        full, diag = loss(b["v"], b["t"], b["ids"], b["tids"], b["mv"], b["mt"])
    assert float(diag["alpha"]) == pytest.approx(0.4) and abs(float(full) - float(plain)) > 1e-3
    ref = ref_infonce(b["v"].double(), b["t"].double(), b["ids"], b["tids"], world.pairs,
                      scalar_leaf(loss.logit_scale), alpha=None)[0]
    assert float(plain) == pytest.approx(float(ref.detach()), rel=1e-5)
    # No ramp: alpha from the first step after the warm-up.
    assert InfoNCELoss(embed_dim=D, false_negatives="distill", alpha=0.4, alpha_ramp_epochs=0.0).distill_alpha() == 0.4


@pytest.mark.parametrize("action", ["eliminate", "attract"])
@pytest.mark.parametrize("same_image", ["target", "mask"])
def test_infonce_oracle_equals_the_loop(action: str, same_image: str) -> None:
    world = World()
    b = world.batch(IDS)
    loss = InfoNCELoss(embed_dim=D, temperature=0.1, false_negatives="oracle", oracle_action=action,
                       same_image=same_image)
    world.declare(loss)
    loss.check_setup()
    _, diag, (_, rows_i2t, rows_t2i) = run_infonce(loss, b, world, rule=Rule("oracle", action),
                                                   same_image=same_image)
    check_diagnostics(diag, [truth_diagnostics(rows_i2t), truth_diagnostics(rows_t2i)])
    # No push on true matches: eliminated (out of the softmax) or attracted (no longer negatives).
    assert float(diag["fn_mass"]) == 0.0
    assert float(diag["fn_base_rate"]) > 0 if action == "eliminate" else float(diag["fn_base_rate"]) == 0
    plain = InfoNCELoss(embed_dim=D, temperature=0.1, same_image=same_image)
    assert abs(value_of(plain, b) - value_of(loss, b)) > 1e-3


def test_infonce_with_unique_ids_is_open_clips_clip_loss() -> None:
    world = World()
    b = world.batch(list(range(8)))
    loss = InfoNCELoss(embed_dim=D, temperature=0.05)
    v, t = b["v"].clone().requires_grad_(True), b["t"].clone().requires_grad_(True)
    value, _ = loss(v, t, b["ids"], b["tids"])
    value.backward()
    v2, t2 = b["v"].clone().requires_grad_(True), b["t"].clone().requires_grad_(True)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.05)))
    want = ClipLoss()(v2, t2, log_scale.exp())
    want.backward()
    torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6)
    for got, ref in ((v.grad, v2.grad), (t.grad, t2.grad), (loss.logit_scale.grad, log_scale.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------- SigLIP
def run_siglip(loss: SigLIPLoss, b: dict[str, Tensor], world: World, rule: Rule = PLAIN):
    v, t, v64, t64 = leaves(b)
    log_scale, bias = scalar_leaf(loss.logit_scale), scalar_leaf(loss.logit_bias)
    loss.zero_grad(set_to_none=True)
    value, diag = loss(v, t, b["ids"], b["tids"])
    want, rows = ref_siglip(v64, t64, b["ids"], b["tids"], world.pairs, log_scale, bias, rule)
    close(value, want)
    value.backward()
    want.backward()
    close(v.grad, v64.grad)
    close(t.grad, t64.grad)
    close(loss.logit_scale.grad, log_scale.grad)
    close(loss.logit_bias.grad, bias.grad)
    assert float(diag["train/logit_scale"]) == pytest.approx(math.exp(float(log_scale.detach())), rel=1e-6)
    assert float(diag["train/logit_bias"]) == pytest.approx(float(bias.detach()), rel=1e-6)
    return diag, rows


def test_siglip_by_hand() -> None:
    # Scores [[1, 0.6], [0, 0.8]], scale 10, bias -5: logits [[5, 1], [-5, 3]]; labels +1 on
    # the diagonal: (softplus(-5) + softplus(1) + softplus(-5) + softplus(-3)) / 2.
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = SigLIPLoss(embed_dim=2, temperature=0.1, bias=-5.0)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    value, _ = loss(v, t, torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert float(value.detach()) == pytest.approx((sp(-5) + sp(1) + sp(-5) + sp(-3)) / 2, rel=1e-6)
    # One image: every pair positive.
    value, _ = loss(v, t, torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert float(value.detach()) == pytest.approx((sp(-5) + sp(-1) + sp(5) + sp(-3)) / 2, rel=1e-6)


@pytest.mark.parametrize(("fn", "action"), [("none", "eliminate"), ("oracle", "eliminate"), ("oracle", "attract")])
def test_siglip_equals_the_loop(fn: str, action: str) -> None:
    world = World()
    b = world.batch(IDS)
    loss = SigLIPLoss(embed_dim=D, temperature=0.2, bias=-2.0, false_negatives=fn, oracle_action=action)
    world.declare(loss)
    diag, rows = run_siglip(loss, b, world, Rule(fn, action))
    check_diagnostics(diag, [truth_diagnostics(rows)])
    if fn == "oracle":  # the oracle changes the loss: not a vacuous parity
        plain = SigLIPLoss(embed_dim=D, temperature=0.2, bias=-2.0)
        assert abs(value_of(plain, b) - value_of(loss, b)) > 1e-3


@pytest.mark.parametrize(("exclude", "cutdown"), FNE_CASES)
def test_siglip_fne_weights_negative_terms_by_one_minus_p_fn(exclude, cutdown) -> None:
    world = World()
    b = world.batch(IDS)
    loss = SigLIPLoss(embed_dim=D, temperature=0.2, bias=-2.0, false_negatives="fne", min_pos_samples=10**6,
                      match_prior=0.05, exclude=0.5, cutdown=cutdown)
    world.declare(loss)
    run_siglip(loss, b, world, Rule())  # not ready: the plain loss
    loss, post, rule = ready_fne(SigLIPLoss, b, exclude, cutdown, temperature=0.2, bias=-2.0)
    world.declare(loss)
    diag, rows = run_siglip(loss, b, world, rule)
    assert (min(kept_weights(rows)) < 0.5) == (exclude != "below")
    assert (removed(rows) > 0) == (exclude == "below" or cutdown is not None)
    check_diagnostics(diag, [truth_diagnostics(rows, post)])


@pytest.mark.parametrize("cutdown", [None, 0.25])
def test_siglip_fne_attract_labels_each_negative_with_its_p_fn(cutdown) -> None:
    """``fne_action=attract``: a negative's label is its p_fn (the expected binary cross-entropy),
    nothing is weighted; as the loop computes it."""
    world = World()
    b = world.batch(IDS)
    loss, post, rule = ready_fne(SigLIPLoss, b, None, cutdown, "attract", temperature=0.2, bias=-2.0)
    world.declare(loss)
    diag, rows = run_siglip(loss, b, world, rule)
    check_diagnostics(diag, [truth_diagnostics(rows, post)])
    eliminate, _, _ = ready_fne(SigLIPLoss, b, None, cutdown, temperature=0.2, bias=-2.0)
    assert abs(value_of(eliminate, b) - value_of(loss, b)) > 1e-3


def test_siglip_fne_estimated_prior_is_one_em_step_computed_here() -> None:
    world = World()
    batches = [world.batch(IDS), world.batch([1, 4, 4, 2, 0, 3, 1, 2])]
    loss = SigLIPLoss(embed_dim=D, temperature=0.2, bias=-2.0, false_negatives="fne", min_pos_samples=1,
                      match_prior=0.05, prior="estimated")
    world.declare(loss)
    mixture: tuple[float, float, float, float] | None = None
    prior = 0.05
    for b in batches:
        loss.on_train_epoch_start()
        loss.stats.update(b["v"] @ b["t"].T, b["ids"][:, None] == b["ids"][None, :])
        published = Posterior.of(loss, prior)
        loss.stats.reset()
        post = published if mixture is None else Posterior(*mixture, prior)
        _, rows = run_siglip(loss, b, world, Rule("fne", post=post))
        prior, mixture = em_step(post, negative_scores(rows))  # over the image anchors' negatives
        assert float(loss.prior_estimate) == pytest.approx(prior, rel=1e-4)
        torch.testing.assert_close(loss.mixture, torch.tensor(mixture, dtype=F64), rtol=1e-4, atol=1e-7)
    assert 0.05 != pytest.approx(prior, rel=0.01)


def test_siglip_with_unique_ids_is_open_clips_siglip_loss() -> None:
    b = World().batch(list(range(8)))
    loss = SigLIPLoss(embed_dim=D)
    v, t = b["v"].clone().requires_grad_(True), b["t"].clone().requires_grad_(True)
    value, _ = loss(v, t, b["ids"], b["tids"])
    value.backward()
    v2, t2 = b["v"].clone().requires_grad_(True), b["t"].clone().requires_grad_(True)
    log_scale, bias = nn.Parameter(torch.tensor(math.log(10.0))), nn.Parameter(torch.tensor(-10.0))
    want = SigLipLoss()(v2, t2, log_scale.exp(), bias)
    want.backward()
    torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6)
    for got, ref in ((v.grad, v2.grad), (t.grad, t2.grad), (loss.logit_scale.grad, log_scale.grad),
                     (loss.logit_bias.grad, bias.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ diagnostics, with truth
def test_infonce_diagnostics_against_the_declared_truth() -> None:
    world = World()
    b = world.batch(IDS)
    loss = InfoNCELoss(embed_dim=D, temperature=0.1)
    world.declare(loss)
    _, diag, (_, rows_i2t, rows_t2i) = run_infonce(loss, b, world)
    directions = [truth_diagnostics(rows_i2t), truth_diagnostics(rows_t2i)]
    check_diagnostics(diag, directions)
    # The truth is not trivial: some but not all negatives match, the hardest ones often do,
    # and the scores rank the near-duplicates high and the other declared matches low.
    for d in directions:
        assert 0 < d["fn_base_rate"] < 0.5 and 0 < d["hardest_fn_rate"] < 1 and 0 < d["fn_num"] < d["fn_den"]
        assert 0.2 < d["score_auc"] < 1.0
    assert "posterior_auc" not in diag
    assert float(diag["train/logit_scale"]) == pytest.approx(10.0, rel=1e-6)


def test_no_truth_diagnostics_without_declared_positives() -> None:
    b = World().batch(IDS)
    for loss in (InfoNCELoss(embed_dim=D), SigLIPLoss(embed_dim=D)):
        _, diag = loss(b["v"], b["t"], b["ids"], b["tids"])
        assert not {"fn_mass", "hardest_fn_rate", "fn_base_rate", "score_auc"} & diag.keys()
        assert "train/logit_scale" in diag


def test_posterior_view_of_a_contrastive_loss() -> None:
    loss = InfoNCELoss(embed_dim=D, false_negatives="fne", min_pos_samples=1, match_prior=0.05, cutdown=0.2)
    assert InfoNCELoss(embed_dim=D).posterior_view() is None
    b = World().batch(IDS)
    loss(b["v"], b["t"], b["ids"], b["tids"])
    view = loss.posterior_view()
    assert view.ready and view.match_prior == pytest.approx(0.05) and view.cutdown == 0.2
    assert view.gaussians[0] == pytest.approx(float(loss.stats.pos_mean), rel=1e-6)
    # Flagged above 1 - false_margin: the exclusion threshold, or 1e-3 (FNE's default false_margin 0.999).
    assert 1 - view.false_margin == pytest.approx(1e-3)
    excl = InfoNCELoss(embed_dim=D, false_negatives="fne", exclude=0.3).posterior_view()
    assert 1 - excl.false_margin == pytest.approx(0.3)


# --------------------------------------------------------------------------- the scale
@pytest.fixture
def tiny_encoder() -> DualEncoder:
    return DualEncoder("fne-tiny")  # 0.6 s: each test gets its own parameters


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def test_infonce_trains_the_models_own_logit_scale(tiny_encoder: DualEncoder) -> None:
    scale = tiny_encoder.model.logit_scale
    assert not scale.requires_grad  # frozen by DualEncoder: the triplet losses use no temperature
    loss = InfoNCELoss(embed_dim=tiny_encoder.embed_dim, temperature=0.5)
    module = RetrievalModule(tiny_encoder, loss, adam)  # binds the loss
    assert module.momentum_encoder is None and scale.requires_grad
    assert list(loss.parameters()) == [] and loss.scale_parameters()[0] is scale and loss.scale_parameters()[1] is None
    trained = [p for g in module.configure_optimizers().param_groups for p in g["params"]]
    assert sum(p is scale for p in trained) == 1
    images = torch.rand(4, 3, 32, 32)
    tokens = tiny_encoder.tokenizer(["a red square", "a blue circle", "two green lines", "a red square"])
    ids, tids = torch.tensor([0, 1, 2, 0]), torch.arange(4)
    value, diag = loss(tiny_encoder.encode_image(images), tiny_encoder.encode_text(tokens), ids, tids)
    assert float(diag["train/logit_scale"]) == pytest.approx(float(scale.detach().exp()), rel=1e-6)
    assert float(scale.detach()) == pytest.approx(math.log(1 / 0.07), rel=1e-6)  # CLIP's init, not the loss's 0.5
    value.backward()
    assert scale.grad is not None and float(scale.grad) != 0.0
    assert tiny_encoder.model.visual.conv1.weight.grad is not None
    # The clamp at max_logit_scale acts on the model's parameter itself.
    with torch.no_grad():
        scale.fill_(math.log(1000.0))
    b = World().batch(IDS)
    _, diag = loss(b["v"], b["t"], b["ids"], b["tids"])
    assert float(diag["train/logit_scale"]) == pytest.approx(100.0, rel=1e-6)
    assert float(scale.detach()) == pytest.approx(math.log(100.0))
    # The scale is the model's: it is in the encoder's state (exported with it), not the loss's.
    assert "model.logit_scale" in tiny_encoder.state_dict() and not loss.state_dict().keys() & {"logit_scale"}


def test_model_scale_false_keeps_the_losss_own(tiny_encoder: DualEncoder) -> None:
    loss = InfoNCELoss(embed_dim=D, temperature=0.5, model_scale=False, max_logit_scale=50.0)
    loss.bind(tiny_encoder)
    assert not tiny_encoder.model.logit_scale.requires_grad
    assert [n for n, _ in loss.named_parameters()] == ["logit_scale"] and loss.logit_scale.requires_grad
    b = World().batch(IDS)
    value, diag = loss(b["v"], b["t"], b["ids"], b["tids"])
    assert float(diag["train/logit_scale"]) == pytest.approx(2.0, rel=1e-6)
    value.backward()
    assert tiny_encoder.model.logit_scale.grad is None and float(loss.logit_scale.grad) != 0
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(80.0))
    assert float(loss(b["v"], b["t"], b["ids"], b["tids"])[1]["train/logit_scale"]) == pytest.approx(50.0)
    assert float(loss.logit_scale.detach()) == pytest.approx(math.log(50.0))
    # learn_scale=false: a fixed temperature, nothing for the optimizer.
    fixed = InfoNCELoss(embed_dim=D, learn_scale=False, model_scale=False)
    assert not any(p.requires_grad for p in fixed.parameters())


def test_siglip_keeps_its_own_pair_with_a_clip_model_and_takes_a_siglip_models(tiny_encoder: DualEncoder) -> None:
    model = tiny_encoder.model
    assert getattr(model, "logit_bias", None) is None  # a CLIP model: no bias
    loss = SigLIPLoss(embed_dim=D)
    RetrievalModule(tiny_encoder, loss, adam)
    assert {n for n, _ in loss.named_parameters()} == {"logit_scale", "logit_bias"}
    assert not model.logit_scale.requires_grad
    assert float(loss.logit_scale.detach()) == pytest.approx(math.log(10.0)) and float(loss.logit_bias.detach()) == -10.0
    # A model with both (as a SigLIP model has): the loss trains the model's pair.
    model.logit_bias = nn.Parameter(torch.tensor(-3.0), requires_grad=False)
    loss = SigLIPLoss(embed_dim=D)
    loss.bind(tiny_encoder)
    assert list(loss.parameters()) == [] and model.logit_bias.requires_grad
    owned = loss.scale_parameters()
    assert owned[0] is model.logit_scale and owned[1] is model.logit_bias
    b = World().batch(IDS)
    value, diag = loss(b["v"], b["t"], b["ids"], b["tids"])
    assert float(diag["train/logit_bias"]) == -3.0
    value.backward()
    assert float(model.logit_scale.grad) != 0 and float(model.logit_bias.grad) != 0


# ------------------------------------------------------------------------ triplet oracles
def triplet_reference(anchors_v: Tensor, anchors_t: Tensor, cands_t: Tensor, cands_v: Tensor, ids: list[int],
                      tids: list[int], cand_img: list[int], cand_txt: list[int], pos_i2t: Tensor, pos_t2i: Tensor,
                      pairs: set, margin: float, oracle: bool, kind: str) -> tuple[float, float]:
    """Triplet hinges anchor by anchor, in both directions, over the candidates that are not of
    the anchor's image (nor, with the oracle, a declared match): on the hardest one (``vsepp``) or
    summed over all (``vse0``). Returns the loss and the share of the hardest candidates that
    truly match (the mean of the two directions)."""
    total, rates = 0.0, []
    for direction in ("i2t", "t2i"):
        anchors, cands, pos = (anchors_v, cands_t, pos_i2t) if direction == "i2t" else (anchors_t, cands_v, pos_t2i)
        hits, has = 0, 0
        for i in range(len(ids)):
            costs, best, best_true = [], -math.inf, False
            for j in range(len(cand_img)):
                true = ((ids[i], cand_txt[j]) if direction == "i2t" else (cand_img[j], tids[i])) in pairs
                if ids[i] == cand_img[j] or (oracle and true):
                    continue
                s = float(anchors[i] @ cands[j])
                costs.append(max(0.0, margin + s - float(pos[i])))
                if s > best:
                    best, best_true = s, true
            if costs:
                total += (max(costs) if kind == "vsepp" else sum(costs)) / len(ids)
                hits, has = hits + best_true, has + 1
        rates.append(hits / max(has, 1))
    return total, sum(rates) / 2


@pytest.mark.parametrize("max_violation", [True, False])
def test_vse_oracle_never_uses_a_true_match(max_violation: bool) -> None:
    world = World(seed=2, num_images=6, twins=((0, 3), (1, 4), (2, 5)), also=())
    batches = [world.batch(torch.randint(0, 6, (8,), generator=world.g).tolist()) for _ in range(6)]
    rates: dict[bool, list[float]] = {True: [], False: []}
    for oracle in (True, False):
        loss = VSELoss(max_violation=max_violation, oracle=oracle)
        world.declare(loss)
        loss.check_setup()
        for b in batches:
            value, diag = loss(b["v"], b["t"], b["ids"], b["tids"])
            rates[oracle].append(float(diag["sampled_fn_rate"]))
            v, t, ids, tids = b["v"], b["t"], b["ids"].tolist(), b["tids"].tolist()
            pos = (v * t).sum(-1)
            want, hardest = triplet_reference(v, t, t, v, ids, tids, ids, tids, pos, pos, world.pairs, 0.2, oracle,
                                              loss.kind)
            assert float(value) == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert float(diag["hardest_fn_rate"]) == pytest.approx(hardest, abs=1e-6)
    assert max(rates[True]) == 0.0
    assert max(rates[False]) > 0  # without the oracle, true matches are used: the check can fail


@pytest.mark.parametrize("selection", ["sample", "hardest"])
def test_fne_oracle_never_chooses_a_true_match(selection: str) -> None:
    world = World(seed=3, num_images=6, twins=((0, 3), (1, 4), (2, 5)), also=())
    batches = [world.batch(torch.randint(0, 6, (8,), generator=world.g).tolist()) for _ in range(8)]
    rates: dict[bool, list[float]] = {True: [], False: []}
    for oracle in (True, False):
        loss = FNELoss(embed_dim=D, memory_size=16, warmup_epochs=0, min_pos_samples=1, cutdown=None,
                       selection=selection, oracle=oracle)
        world.declare(loss)
        loss.check_setup()
        loss.set_generator(torch.Generator().manual_seed(0))
        queue: list[tuple[Tensor, Tensor, int, int]] = []  # the bank: earlier momentum features
        for b in batches:
            value, diag = loss(b["v"], b["t"], b["ids"], b["tids"], b["mv"], b["mt"])
            rates[oracle].append(float(diag["sampled_fn_rate"]))
            if selection == "hardest":  # the chosen negative is the hardest allowed candidate, computed here
                ids, tids = b["ids"].tolist(), b["tids"].tolist()
                cands_t = torch.stack([*b["mt"], *(q[1] for q in queue)])
                cands_v = torch.stack([*b["mv"], *(q[0] for q in queue)])
                want, hardest = triplet_reference(
                    b["v"], b["t"], cands_t, cands_v, ids, tids, ids + [q[2] for q in queue],
                    tids + [q[3] for q in queue], (b["v"] * b["mt"]).sum(-1), (b["t"] * b["mv"]).sum(-1),
                    world.pairs, 0.2, oracle, "vsepp")
                assert float(value) == pytest.approx(want, rel=1e-5, abs=1e-6)
                assert float(diag["sampled_fn_rate"]) == pytest.approx(hardest, abs=1e-6)
            if oracle:
                assert float(diag["hardest_fn_rate"]) == 0.0
            queue = (queue + list(zip(b["mv"], b["mt"], b["ids"].tolist(), b["tids"].tolist(), strict=True)))[-16:]
        # In the warm-up too (in-batch VSE with the same oracle).
        _, diag = loss(b["v"], b["t"], b["ids"], b["tids"], b["mv"], b["mt"], warmup=True)
        rates[oracle].append(float(diag["sampled_fn_rate"]))
    assert max(rates[True]) == 0.0
    assert max(rates[False]) > 0  # without the oracle some chosen negatives are true matches


@pytest.mark.parametrize(("make", "key"), [
    (lambda: VSELoss(oracle=True), "loss.oracle"),
    (lambda: FNELoss(embed_dim=D, oracle=True), "loss.oracle"),
    (lambda: InfoNCELoss(embed_dim=D, false_negatives="oracle"), "loss.false_negatives=oracle"),
    (lambda: SigLIPLoss(embed_dim=D, false_negatives="oracle"), "loss.false_negatives=oracle"),
])
def test_an_oracle_without_positives_is_refused_naming_its_key(make, key: str) -> None:
    loss = make()
    with pytest.raises(FNEError, match=key.replace(".", r"\.")) as err:
        loss.check_setup()
    assert "\n" not in str(err.value)
    loss.positives.set_pairs(torch.tensor([[0, 0]]), 1)
    loss.check_setup()  # with positives: accepted
    make_plain = {"loss.oracle": lambda: VSELoss(), "loss.false_negatives=oracle": lambda: InfoNCELoss(D)}
    make_plain[key]().check_setup()  # without the oracle: nothing needed


@pytest.mark.parametrize(("cls", "kwargs"), [(InfoNCELoss, {"false_negatives": "bogus"}),
                                             (InfoNCELoss, {"same_image": "both"}),
                                             (InfoNCELoss, {"queue_features": "ema"}),
                                             (InfoNCELoss, {"alpha": 1.5}), (InfoNCELoss, {"temperature": 0.0}),
                                             (SigLIPLoss, {"false_negatives": "distill"}),
                                             (SigLIPLoss, {"oracle_action": "ignore"}),
                                             (InfoNCELoss, {"fne_action": "repel"}),
                                             (SigLIPLoss, {"exclude": 0.5, "fne_action": "attract"})])
def test_bad_contrastive_values_name_the_key(cls, kwargs: dict) -> None:
    key = next(iter(kwargs))
    with pytest.raises(FNEError, match=f"loss.{key}"):
        cls(embed_dim=D, **kwargs)


# -------------------------------------------------------------------- FNE's online queue
def test_fne_online_queue_needs_no_momentum_and_holds_the_online_features() -> None:
    world = World()
    loss = FNELoss(embed_dim=D, memory_size=12, warmup_epochs=0, min_pos_samples=1, queue_features="online")
    assert not loss.requires_momentum
    loss.set_generator(torch.Generator().manual_seed(0))
    queue: list[tuple[Tensor, Tensor, int]] = []
    for ids in (IDS, [1, 1, 5, 0, 6, 6, 2, 7]):
        b = world.batch(ids)
        v, t = b["v"].clone().requires_grad_(True), b["t"].clone().requires_grad_(True)
        value, _ = loss(v, t, b["ids"], b["tids"])  # no momentum features
        value.backward()
        assert v.grad is not None and t.grad is not None
        queue = (queue + list(zip(b["v"], b["t"], b["tids"].tolist(), strict=True)))[-12:]
        valid = loss.bank.valid_mask()
        by_text = {int(k): (fv, ft) for k, fv, ft in zip(loss.bank.text_ids[valid], loss.bank.image_features[valid],
                                                         loss.bank.text_features[valid], strict=True)}
        assert sorted(by_text) == sorted(q[2] for q in queue)
        for fv, ft, k in queue:
            assert torch.equal(by_text[k][0], fv) and torch.equal(by_text[k][1], ft)
        assert not loss.bank.image_features.requires_grad


# ------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_contrastive_losses_train_through_the_entry_point(loss: str, cache_dir: Path, tmp_path: Path) -> None:
    from fne_lightning.train import train

    tiny = [o for o in TINY_OVERRIDES if not o.startswith("loss.")]  # those name FNE's keys
    # One epoch of the loss itself (no warm-up): its diagnostics are the last epoch's.
    cfg = compose_config([*tiny, f"loss={loss}", "loss.warmup_epochs=0", "trainer.max_epochs=1",
                          "figures.enabled=false", "trainer.enable_progress_bar=false"], cache_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    metrics = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    assert {"fne/fn_mass", "train/logit_scale", "fne/hardest_fn_rate", "fne/score_auc"} <= written.keys()
    assert 0 < written["fne/fn_mass"] < 1 and written["train/logit_scale"] > 0
    assert ("train/logit_bias" in written) == (loss == "siglip")
    assert written["test/rsum"] > 0

