"""Retrieval metrics against brute-force NumPy rankings (FNE_SPEC sections 9 and 10)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchmetrics.retrieval import RetrievalHitRate

from fne_lightning.errors import FNEError
from fne_lightning.retrieval.metric import RetrievalMetric, coco_1k_scores, retrieval_scores
from fne_lightning.retrieval.ranking import _positive_stats

STANDARD_KEYS = [f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")] + ["rsum"]


# ---------------------------------------------------------------- brute force (NumPy, per query)


def ranked_relevance(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Relevance of the items in ranked order: score descending, non-relevant first at a tie."""
    order = np.lexsort((relevant, -scores))  # last key is the primary one
    return relevant[order]


def brute_ranks(sims: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based pessimistic ranks by sorting every query: image rank = best of its captions."""
    n_img, n_txt = sims.shape
    i2t = np.array([np.flatnonzero(ranked_relevance(sims[i], text_to_image == i))[0] for i in range(n_img)])
    t2i = np.array(
        [
            np.flatnonzero(ranked_relevance(sims[:, j], np.arange(n_img) == text_to_image[j]))[0]
            for j in range(n_txt)
        ]
    )
    return i2t, t2i


def vsepp_summary(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """The VSE++ evaluation formulas."""
    out = {}
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def brute_scores(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor
) -> dict:
    sims = (image_features.float() @ text_features.float().T).numpy()  # the one-chunk matrix
    return vsepp_summary(*brute_ranks(sims, text_to_image.numpy()))


def brute_multi_positive(sims: np.ndarray, relevant: np.ndarray, prefix: str) -> dict[str, float]:
    """R-Precision, mAP@R (Musgrave et al. 2020) and any-positive R@K over the rows."""
    r_prec, map_r, first = [], [], []
    for scores, rel in zip(sims, relevant, strict=True):
        ranked = ranked_relevance(scores, rel)
        n_rel = int(rel.sum())
        hits = np.cumsum(ranked)
        r_prec.append(hits[n_rel - 1] / n_rel)
        map_r.append(sum(hits[i] / (i + 1) for i in range(n_rel) if ranked[i]) / n_rel)
        first.append(np.flatnonzero(ranked)[0])
    first = np.array(first)
    out = {f"{prefix}_rprecision": 100 * np.mean(r_prec), f"{prefix}_map_at_r": 100 * np.mean(map_r)}
    out.update({f"{prefix}_any_r{k}": 100.0 * int((first < k).sum()) / len(first) for k in (1, 5, 10)})
    return out


# ---------------------------------------------------------------- data


def uneven_data(n_img: int = 40, dim: int = 16, noise: float = 0.9, seed: int = 0):
    """1..7 captions per image, caption order shuffled (not arange ground truth)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 8, (n_img,), generator=gen)
    text_to_image = torch.repeat_interleave(torch.arange(n_img), counts)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]
    images = F.normalize(torch.randn(n_img, dim, generator=gen), dim=1)
    texts = F.normalize(
        images[text_to_image] + noise * torch.randn(len(text_to_image), dim, generator=gen), dim=1
    )
    return images, texts, text_to_image


def random_pairs(n_img: int, n_txt: int, density: float, seed: int = 1) -> torch.Tensor:
    """(P, 2) extra positives, some duplicated."""
    gen = torch.Generator().manual_seed(seed)
    pairs = (torch.rand(n_img, n_txt, generator=gen) < density).nonzero()
    return torch.cat([pairs, pairs[:5]])


def relevance(text_to_image: torch.Tensor, pairs: torch.Tensor, n_img: int) -> np.ndarray:
    """(N_img, N_txt) bool: ground truth or listed pair."""
    rel = np.zeros((n_img, len(text_to_image)), dtype=bool)
    rel[text_to_image.numpy(), np.arange(len(text_to_image))] = True
    rel[pairs[:, 0].numpy(), pairs[:, 1].numpy()] = True
    return rel


def quarter_grid(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Multiples of 0.25 in [-0.5, 0.5]: every dot product is exact in fp32, so scores tie often."""
    return torch.randint(-2, 3, (n, dim), generator=gen).float() * 0.25


# ---------------------------------------------------------------- retrieval_scores


def test_matches_bruteforce_with_uneven_captions() -> None:
    images, texts, text_to_image = uneven_data()
    counts = torch.bincount(text_to_image)
    assert counts.min() == 1 and counts.max() == 7
    ours = retrieval_scores(images, texts, text_to_image)
    assert list(ours) == STANDARD_KEYS
    assert all(isinstance(v, float) for v in ours.values())
    assert ours == brute_scores(images, texts, text_to_image)
    assert 0 < ours["i2t_r1"] < 100 and 0 < ours["t2i_r1"] < 100  # a non-trivial ranking

    # Without ties the VSE++ way agrees too: argsort each query, look up the ground truth.
    sims = (images @ texts.T).numpy()
    assert all(len(np.unique(v)) == len(v) for v in [*sims, *sims.T])
    gt = text_to_image.numpy()
    order = np.argsort(-sims, axis=1)
    i2t = np.array([np.flatnonzero(gt[order[i]] == i).min() for i in range(len(images))])
    t2i = np.argmax(np.argsort(-sims.T, axis=1) == gt[:, None], axis=1)
    assert ours == vsepp_summary(i2t, t2i)


def test_matches_torchmetrics_hit_rate() -> None:
    # torchmetrics orders tied scores by its sort, not pessimistically: the data has no ties.
    images, texts, text_to_image = uneven_data(seed=3)
    sims = images @ texts.T  # (N_img, N_txt)
    n_img, n_txt = sims.shape
    is_gt = text_to_image[None, :] == torch.arange(n_img)[:, None]  # (N_img, N_txt)
    ours = retrieval_scores(images, texts, text_to_image)
    for k in (1, 5, 10):
        i2t = RetrievalHitRate(top_k=k)(
            sims.flatten(), is_gt.flatten(), torch.arange(n_img).repeat_interleave(n_txt)
        )
        t2i = RetrievalHitRate(top_k=k)(
            sims.T.flatten(), is_gt.T.flatten(), torch.arange(n_txt).repeat_interleave(n_img)
        )
        assert ours[f"i2t_r{k}"] == pytest.approx(100 * i2t.item(), abs=1e-4)
        assert ours[f"t2i_r{k}"] == pytest.approx(100 * t2i.item(), abs=1e-4)


@pytest.mark.parametrize("with_pairs", [False, True])
def test_chunked_equals_unchunked(with_pairs: bool) -> None:
    images, texts, text_to_image = uneven_data(n_img=30, seed=5)
    pairs = random_pairs(30, len(texts), 0.1) if with_pairs else None
    full = retrieval_scores(images, texts, text_to_image, pairs)
    for chunk_size in (1, 3, 7, 30, 1000):
        assert retrieval_scores(images, texts, text_to_image, pairs, chunk_size=chunk_size) == full


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7])
def test_ties_count_against_the_query(chunk_size: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    images, texts = quarter_grid(30, 3, gen), quarter_grid(90, 3, gen)
    text_to_image = torch.randint(0, 30, (90,), generator=gen)
    text_to_image[torch.randperm(90, generator=gen)[:30]] = torch.arange(30)  # every image captioned
    sims = (images @ texts.T).numpy()
    assert sum(len(row) - len(np.unique(row)) for row in sims) > 1000  # many ties
    pairs = random_pairs(30, 90, 0.15)
    ours = retrieval_scores(images, texts, text_to_image, pairs, chunk_size=chunk_size)
    expected = vsepp_summary(*brute_ranks(sims, text_to_image.numpy()))
    rel = relevance(text_to_image, pairs, 30)
    expected.update(brute_multi_positive(sims, rel, "i2t"))
    expected.update(brute_multi_positive(sims.T, rel.T, "t2i"))
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)
    assert {k: ours[k] for k in STANDARD_KEYS} == {k: expected[k] for k in STANDARD_KEYS}


def test_collapsed_model_scores_zero() -> None:
    _, _, text_to_image = uneven_data()
    images, texts = torch.ones(40, 8) / 8**0.5, torch.ones(len(text_to_image), 8) / 8**0.5
    out = retrieval_scores(images, texts, text_to_image, random_pairs(40, len(text_to_image), 0.05))
    assert all(
        out[f"{d}_{r}"] == 0.0 for d in ("i2t", "t2i") for r in ("r1", "r5", "r10", "any_r1", "any_r10")
    )
    assert out["rsum"] == 0.0
    assert out["t2i_medr"] == 40.0  # every other image ties with the right one


def test_negative_zero_ties_with_zero() -> None:
    # Query 0: its positive scores -0.0 and ties with a negative at +0.0, so it ranks second.
    # Query 1: positives at the smallest subnormal and at 0 stay below/above the right items.
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0**-23  # 2**-149
    scores = torch.tensor([[-0.0, 0.0, -1.0, -2.0], [tiny, 0.0, tiny, 0.0]])
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])
    stats = _positive_stats(scores, rows, cols)  # (5, 2)
    assert stats[:, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    # Query 1 ranks: item 2 (negative, tiny) ties item 0 (positive, tiny) and goes first, then
    # item 0, then item 3 (negative, 0) before item 1 (positive, 0): hits at ranks 2 and 4.
    assert stats[:, 1].tolist() == [0.5, 0.25, 0.0, 1.0, 1.0]


def test_multi_positive_matches_bruteforce() -> None:
    images, texts, text_to_image = uneven_data(n_img=40, seed=7, noise=0.6)
    pairs = random_pairs(40, len(texts), 0.2)  # ~20% of the gallery matches each query
    ours = retrieval_scores(images, texts, text_to_image, pairs)
    sims = (images @ texts.T).numpy()
    rel = relevance(text_to_image, pairs, 40)
    assert rel.sum(1).min() > 5 and rel.sum(0).min() > 3  # several positives per query
    expected = {**brute_multi_positive(sims, rel, "i2t"), **brute_multi_positive(sims.T, rel.T, "t2i")}
    assert {k: ours[k] for k in expected} == pytest.approx(expected, rel=1e-12, abs=0)
    # The standard metrics are unchanged by extra positives.
    assert {k: ours[k] for k in STANDARD_KEYS} == retrieval_scores(images, texts, text_to_image)


def test_ground_truth_positives_give_standard_recall() -> None:
    images, texts, text_to_image = uneven_data(seed=11)
    listed = torch.stack([text_to_image, torch.arange(len(texts))], 1)  # the ground truth, listed
    for pairs in (torch.zeros(0, 2, dtype=torch.long), listed):
        out = retrieval_scores(images, texts, text_to_image, pairs)
        for d in ("i2t", "t2i"):
            assert [out[f"{d}_any_r{k}"] for k in (1, 5, 10)] == [out[f"{d}_r{k}"] for k in (1, 5, 10)]
        assert out["t2i_rprecision"] == out["t2i_r1"]  # one positive: R-Precision is R@1


def test_low_precision_and_inference_mode() -> None:
    images, texts, text_to_image = uneven_data(seed=2)
    images, texts = images.bfloat16(), texts.bfloat16()
    with torch.inference_mode():
        out = retrieval_scores(images, texts, text_to_image)
    assert out == retrieval_scores(images.float(), texts.float(), text_to_image)


def test_input_errors() -> None:
    images, texts, text_to_image = uneven_data()
    orphan = text_to_image.clone()
    orphan[orphan == 3] = 4  # image 3 loses its captions
    with pytest.raises(FNEError, match="at least one caption"):
        retrieval_scores(images, texts, orphan)
    with pytest.raises(FNEError, match="text_to_image"):
        retrieval_scores(images, texts, text_to_image + 1)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_scores(images * float("nan"), texts, text_to_image)


# ---------------------------------------------------------------- COCO 1K


def test_coco_1k_folds_and_average() -> None:
    gen = torch.Generator().manual_seed(0)
    n_fold, dim = 1000, 8
    # The five folds share the same 1,000 images, exactly: a fold that leaked another fold's
    # images would see exact duplicates, and ties count against the query.
    base = F.normalize(torch.randn(n_fold, dim, generator=gen), dim=1)
    images = base.repeat(5, 1)  # (5000, D)
    counts = torch.randint(3, 8, (5000,), generator=gen)
    text_to_image = torch.repeat_interleave(torch.arange(5000), counts)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]  # not sorted by image
    # Noise grows with the fold, so every fold scores differently.
    fold_noise = (0.05 + 0.1 * (text_to_image // n_fold)).float()[:, None]
    texts = F.normalize(
        images[text_to_image] + fold_noise * torch.randn(len(text_to_image), dim, generator=gen), dim=1
    )

    per_fold = []
    for f in range(5):
        caps = (text_to_image // n_fold == f).nonzero().squeeze(1)
        sims = (images[f * n_fold : (f + 1) * n_fold] @ texts[caps].T).numpy()  # (1000, n_f)
        gt = text_to_image[caps].numpy() - f * n_fold
        # Vectorised argsort per query (fine here: no ties inside a fold).
        order = np.argsort(-sims, axis=1)
        i2t = np.array([np.flatnonzero(gt[order[i]] == i)[0] for i in range(n_fold)])
        t2i = np.argmax(np.argsort(-sims.T, axis=1) == gt[:, None], axis=1)
        per_fold.append(vsepp_summary(i2t, t2i))
    rsums = [s["rsum"] for s in per_fold]
    assert len(set(rsums)) == 5 and rsums == sorted(rsums, reverse=True)

    ours = coco_1k_scores(images, texts, text_to_image)
    expected = {k: sum(s[k] for s in per_fold) / 5 for k in per_fold[0]}
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)
    assert ours["rsum"] == pytest.approx(sum(ours[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    # On the 5K set every caption's image has 4 exact copies; ties count against the caption.
    assert retrieval_scores(images, texts, text_to_image)["t2i_r1"] == 0.0


def test_coco_1k_with_positives_reindexes_folds() -> None:
    images, texts, text_to_image = uneven_data(n_img=20, seed=13)
    pairs = random_pairs(20, len(texts), 0.2)
    ours = coco_1k_scores(images, texts, text_to_image, pairs, num_folds=2)
    folds = []
    for f in range(2):
        caps = ((text_to_image >= 10 * f) & (text_to_image < 10 * (f + 1))).nonzero().squeeze(1)
        new_index = {int(c): i for i, c in enumerate(caps)}
        fold_pairs = torch.tensor(
            [
                [i - 10 * f, new_index[int(c)]]
                for i, c in pairs.tolist()
                if 10 * f <= i < 10 * (f + 1) and int(c) in new_index
            ]
        )
        folds.append(
            retrieval_scores(
                images[10 * f : 10 * (f + 1)], texts[caps], text_to_image[caps] - 10 * f, fold_pairs
            )
        )
    assert ours == pytest.approx({k: (folds[0][k] + folds[1][k]) / 2 for k in folds[0]}, rel=1e-12, abs=0)


def test_coco_1k_needs_divisible_image_count() -> None:
    images, texts, text_to_image = uneven_data(n_img=40)
    with pytest.raises(FNEError, match="num_folds"):
        coco_1k_scores(images, texts, text_to_image, num_folds=3)


# ---------------------------------------------------------------- RetrievalMetric


def test_metric_accumulates_shuffled_batches_with_duplicates() -> None:
    images, texts, text_to_image = uneven_data(seed=17)
    pairs = random_pairs(40, len(texts), 0.1)
    metric = RetrievalMetric(text_to_image, positive_pairs=pairs)
    gen = torch.Generator().manual_seed(0)
    for modality, feats in (("image", images), ("text", texts)):
        # A DistributedSampler-like stream: shuffled, with some indices padded in twice.
        order = torch.cat([torch.randperm(len(feats), generator=gen), torch.arange(3)])
        for batch in order.split(7):
            metric.update(feats[batch].bfloat16() if modality == "text" else feats[batch], batch, modality)
    out = metric.compute()
    assert out == retrieval_scores(images, texts.bfloat16().float(), text_to_image, pairs)
    assert all(isinstance(v, float) for v in out.values())

    metric.reset()
    metric.set_targets(text_to_image[:-1])  # one caption fewer than the features added below
    metric.update(images, torch.arange(40), "image")
    metric.update(texts, torch.arange(len(texts)), "text")
    with pytest.raises(FNEError, match="distinct text indices"):
        metric.compute()


def test_metric_reports_missing_indices() -> None:
    images, texts, text_to_image = uneven_data(seed=19)
    metric = RetrievalMetric(text_to_image)
    metric.update(images[:-1], torch.arange(39), "image")  # the last image was never evaluated
    metric.update(texts, torch.arange(len(texts)), "text")
    with pytest.raises(FNEError, match="got 39 distinct image indices"):
        metric.compute()
    with pytest.raises(ValueError, match="modality"):
        metric.update(images, torch.arange(40), "audio")


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    """One rank: a DistributedSampler-style share of the data (padded with repeats), in batches."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        images, texts, text_to_image = uneven_data(n_img=41, seed=23)
        metric = RetrievalMetric(text_to_image)
        for modality, feats in (("image", images), ("text", texts)):
            n = len(feats)
            padded = torch.cat([torch.arange(n), torch.arange(-n % world)])  # pads with the first
            for batch in padded[rank::world].split(8):
                metric.update(feats[batch], batch, modality)
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(metric.compute()))
    finally:
        dist.destroy_process_group()


def test_metric_under_ddp(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    images, texts, text_to_image = uneven_data(n_img=41, seed=23)
    expected = retrieval_scores(images, texts, text_to_image)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
