"""Exact image-text retrieval ranks by counting, in row chunks: the pure functions behind
:mod:`fne_lightning.retrieval.metric`.

Protocol: FNE_SPEC section 9 (the VSE++ ranks of Faghri et al. 2018, without the five-captions
assumption) and section 10 (multi-positive R-Precision and mAP@R of Musgrave et al. 2020, "A Metric
Learning Reality Check", and any-positive R@K).

The rank of the ground truth is a count, not a position found by sorting: the number of
non-relevant candidates that score at or above the best relevant score. So the similarity matrix
``S = I @ T.T`` is computed once, in blocks of image rows, and each block is compared with two
threshold vectors (one per row for image-to-text, one per column for text-to-image). Ties count
against the query; a collapsed model (every embedding equal) scores R@K = 0, not 100.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fne_lightning.errors import FNEError

if TYPE_CHECKING:
    from fne_lightning.retrieval.protocols import EccvProtocol

# A chunk of S holds at most this many fp32 elements (1 GiB): COCO-5K (5,000 x 25,000) is one
# chunk, a 100k x 500k gallery is ~190 chunks and never exists as a whole.
CHUNK_ELEMENTS = 2**28
# The comparison pass walks a chunk in row blocks of about this many elements (16 MiB) so that
# both comparisons read a block while it is still in (a large L2/L3) cache. Measured for COCO-5K
# on 2 Sapphire Rapids cores: 2**18 to 2**23 all take ~0.09 s when the machine is quiet, but with
# another process on the cores small blocks stall on OpenMP barriers (worst of 12 runs: 6.3 s at
# 2**18, 0.9 s at 2**22, 0.5 s at 2**23); 2**24 and above fall out of cache (~0.13 s).
CPU_BLOCK_ELEMENTS = 2**22
# On a GPU the block only bounds the comparison buffer (fp32, 256 MiB).
CUDA_BLOCK_ELEMENTS = 2**26
# Queries x items of the fp64 sort keys built at once for the multi-positive metrics (32 MiB).
SORT_BLOCK_ELEMENTS = 2**22
HIT_KS = (1, 5, 10)


def _row_bounds(n: int, rows: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``ceil(n / rows)`` chunks of near-equal size (at most ``rows``)."""
    n_chunks = max(1, math.ceil(n / rows))
    return [(k * n // n_chunks, (k + 1) * n // n_chunks) for k in range(n_chunks)]


def _count_at_or_above(scores: Tensor, row_thresh: Tensor, col_thresh: Tensor, col_count: Tensor) -> Tensor:
    """Count, per row, entries >= ``row_thresh`` (returned) and add, per column, the entries
    >= ``col_thresh`` to ``col_count``.

    scores (C, N) fp32, row_thresh (C,), col_thresh (N,), col_count (N,) fp64 (updated in place).
    Returns (C,) fp64 counts.
    """
    n_rows, n_cols = scores.shape
    block = max(1, (CUDA_BLOCK_ELEMENTS if scores.is_cuda else CPU_BLOCK_ELEMENTS) // max(n_cols, 1))
    # Writing the comparison into fp32 takes the vectorised same-dtype kernel: ~3x faster on CPU
    # than a bool result, and fp32 sums of 0/1 are exact below 2**24.
    buf = torch.empty(min(block, n_rows), n_cols, device=scores.device)
    row_dtype = torch.float32 if n_cols < 2**24 else torch.float64
    row_count = torch.empty(n_rows, dtype=torch.float64, device=scores.device)
    for start in range(0, n_rows, block):
        blk = scores[start : start + block]  # (b, N)
        out = buf[: blk.shape[0]]
        torch.ge(blk, row_thresh[start : start + block, None], out=out)
        row_count[start : start + block] = out.sum(1, dtype=row_dtype)
        torch.ge(blk, col_thresh, out=out)
        col_count += out.sum(0)  # at most `block` (< 2**24) rows: exact in fp32
    return row_count


def _ground_truth_ranks(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    bounds: list[tuple[int, int]],
    on_chunk: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """0-based pessimistic ranks: (N_img,) image-to-text and (N_txt,) text-to-image, int64.

    ``on_chunk(start, scores)``, if given, also sees every chunk of S (rows ``start:start + C``).
    """
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    device = image_features.device
    order = torch.argsort(text_to_image, stable=True)  # captions grouped by image
    # Caption slice of each chunk in `order` (one host sync for all chunks).
    edges = torch.tensor([a for a, _ in bounds] + [n_img], device=device)
    cuts = torch.searchsorted(text_to_image[order], edges).tolist()

    def chunk_captions(k: int) -> tuple[Tensor, Tensor]:
        cols = order[cuts[k] : cuts[k + 1]]  # (n_k,) captions of the chunk's images
        return cols, text_to_image[cols] - bounds[k][0]  # and their image's row in the chunk

    # The t2i threshold of caption j is S[g_j, j]; every chunk's counting pass needs all of them.
    # Chunk 0 reads its own from S; later chunks compute theirs up front with a small product of
    # the same row block against the gathered caption columns. MKL usually reproduces those bits
    # (not always: some small or odd shapes differ in the last bit). The own image is excluded by
    # index below, so a differing bit can only move a rank where another image ties within an ulp.
    tau = torch.empty(n_txt, device=device)  # (N_txt,)
    for k in range(1, len(bounds)):
        a, b = bounds[k]
        cols, local = chunk_captions(k)
        small = image_features[a:b] @ text_features[cols].T  # (C, n_k)
        tau[cols] = small[local, torch.arange(cols.numel(), device=device)]

    i2t = torch.empty(n_img, dtype=torch.float64, device=device)
    t2i = torch.zeros(n_txt, dtype=torch.float64, device=device)
    for k, (a, b) in enumerate(bounds):
        scores = image_features[a:b] @ text_features.T  # (C, N_txt)
        cols, local = chunk_captions(k)
        own = scores[local, cols]  # (n_k,) ground-truth pair scores
        if k == 0:
            tau[cols] = own
        best = torch.full((b - a,), -math.inf, device=device)
        best.scatter_reduce_(0, local, own, "amax")  # (C,) best ground-truth caption per image
        # Ground-truth captions at the best score are relevant: they do not count against it.
        own_at_best = torch.zeros(b - a, dtype=torch.float64, device=device)
        own_at_best.index_add_(0, local, (own >= best[local]).double())
        i2t[a:b] = _count_at_or_above(scores, best, tau, t2i) - own_at_best
        t2i[cols] -= (own >= tau[cols]).double()  # drop the caption's own image, by index
        if on_chunk is not None:
            on_chunk(a, scores)
        del scores
    return i2t.long(), t2i.long()


def _summary(prefix: str, ranks: Tensor) -> dict[str, float]:
    """R@1/5/10 (percent), medr = floor(median) + 1 and meanr = mean + 1 of 0-based ranks (Q,)."""
    n = ranks.numel()
    ordered = ranks.sort().values
    hits = [(ranks < k).sum() for k in HIT_KS]
    # numpy's median of an even count is the mean of the two middle ranks; floor it in integers.
    stats = torch.stack([*hits, ordered[(n - 1) // 2] + ordered[n // 2], ranks.sum()]).tolist()
    out = {f"{prefix}_r{k}": 100.0 * c / n for k, c in zip(HIT_KS, stats[:3], strict=True)}
    out[f"{prefix}_medr"] = float(stats[3] // 2 + 1)
    out[f"{prefix}_meanr"] = stats[4] / n + 1
    return out


def _positive_stats(scores: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Per-query multi-positive statistics of a block of queries.

    scores (Q, N) fp32; ``rows``/``cols`` (P,) the distinct (query, item) positive pairs of the
    block, >= 1 per query. Returns (5, Q) fp64: R-Precision and mAP@R (fractions), and 0/1 hits
    of any positive within the top 1, 5, 10. At equal scores non-relevant items rank first
    (pessimistic, as for R@K).
    """
    n_q, n_items = scores.shape
    n_rel = torch.bincount(rows, minlength=n_q)  # (Q,) R of each query
    k = min(n_items, max(int(n_rel.max()), max(HIT_KS)))
    # Sort key: the fp32 score in fp64, with each positive lowered by less than the gap to the
    # next fp32 value below it (>= 2**-24 relative, >= 2**-149 absolute) but by more than fp64
    # rounding: positives lose every tie and nothing else; -0.0 and +0.0 still tie.
    key = torch.empty(n_q, n_items, dtype=torch.float64, device=scores.device)
    key.copy_(scores)  # also makes caption queries (columns of S) contiguous rows
    own = key[rows, cols]
    key[rows, cols] = own - (own.abs() * 2.0**-30 + 2.0**-160)
    top, idx = key.topk(k, dim=1)  # (Q, k) best first
    hit = top != scores.gather(1, idx)  # (Q, k) relevance in ranked order: lowered keys
    del key
    hits = hit.cumsum(1, dtype=torch.float64)  # (Q, k) relevant items within the top i
    pos = torch.arange(1, k + 1, dtype=torch.float64, device=scores.device)
    r_prec = hits.gather(1, (n_rel - 1)[:, None]).squeeze(1) / n_rel
    # mAP@R: mean over the first R positions of precision@i where position i is relevant.
    precision = torch.where(hit & (pos <= n_rel[:, None]), hits / pos, 0.0)  # (Q, k)
    map_at_r = precision.sum(1) / n_rel
    first = torch.where(hit.any(1), hit.int().argmax(1), k)  # (Q,) rank of the best positive
    return torch.stack([r_prec, map_at_r, *[(first < kk).double() for kk in HIT_KS]])


class PositiveAccumulator:
    """Multi-positive statistics of one direction, filled block of queries by block."""

    def __init__(self, pairs: Tensor, query_col: int, n_queries: int) -> None:
        order = torch.argsort(pairs[:, query_col], stable=True)
        self.queries = pairs[order, query_col]  # (P,) sorted
        self.items = pairs[order, 1 - query_col]  # (P,)
        # Kept per query and summed once at the end, so that the result does not depend on
        # how the queries were chunked (fp64 sums in another grouping differ in the last bit).
        self.stats = torch.zeros(5, n_queries, dtype=torch.float64, device=pairs.device)

    def add(self, start: int, scores: Tensor) -> None:
        """Rank the items for queries ``start:start + Q``: scores (Q, N_items), any strides."""
        n_q, n_items = scores.shape
        step = max(1, SORT_BLOCK_ELEMENTS // max(n_items, 1))
        bounds = torch.arange(start, start + n_q + step, step, device=self.queries.device).clamp(
            max=start + n_q
        )
        cuts = torch.searchsorted(self.queries, bounds).tolist()  # pairs of each block
        for b, s in enumerate(range(0, n_q, step)):
            rows = self.queries[cuts[b] : cuts[b + 1]] - start - s
            cols = self.items[cuts[b] : cuts[b + 1]]
            blk = scores[s : s + step]
            self.stats[:, start + s : start + s + blk.shape[0]] = _positive_stats(blk, rows, cols)

    def result(self, prefix: str) -> dict[str, float]:
        r_prec, map_r, *hit_counts = self.stats.sum(1).tolist()
        n = self.stats.shape[1]
        out = {f"{prefix}_rprecision": 100.0 * r_prec / n, f"{prefix}_map_at_r": 100.0 * map_r / n}
        # Hit counts are whole numbers; same formula as R@K so that ground-truth-only positives
        # give exactly R@K.
        out.update(
            {f"{prefix}_any_r{k}": 100.0 * round(c) / n for k, c in zip(HIT_KS, hit_counts, strict=True)}
        )
        return out


def _checked_inputs(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, positive_pairs: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Validate shapes and indices; return fp32 features and int64 indices on the features' device."""
    if (
        image_features.ndim != 2
        or text_features.ndim != 2
        or image_features.shape[1] != text_features.shape[1]
    ):
        raise ValueError(
            f"expected image_features (N_img, D) and text_features (N_txt, D), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if text_to_image.shape != (n_txt,) or text_to_image.is_floating_point():
        raise ValueError(
            f"expected text_to_image of {n_txt} integer indices, got {text_to_image.dtype} {tuple(text_to_image.shape)}"
        )
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"nothing to rank: {n_img} images, {n_txt} captions")
    device = image_features.device
    images, texts = image_features.float(), text_features.float()
    gt = text_to_image.to(device=device, dtype=torch.long)
    captions_per_image = torch.bincount(gt.clamp(0, n_img - 1), minlength=n_img)
    # One sum per matrix: NaN/inf anywhere (or features so large that scores overflow) shows up
    # in it, at a tenth of the cost of isfinite().all().
    finite = torch.isfinite(torch.stack([images.sum(), texts.sum()])).all()
    lo, hi, fewest, ok = torch.stack([gt.min(), gt.max(), captions_per_image.min(), finite.long()]).tolist()
    if not ok:
        raise ValueError("image_features or text_features contain NaN or inf: ranks would be meaningless")
    if lo < 0 or hi >= n_img:
        raise FNEError(f"text_to_image: expected image indices in [0, {n_img}), got [{lo}, {hi}]")
    if fewest < 1:
        raise FNEError(
            "text_to_image: every image needs at least one caption (its image-to-text rank is undefined)"
        )
    pairs = None
    if positive_pairs is not None:
        if positive_pairs.ndim != 2 or positive_pairs.shape[1] != 2 or positive_pairs.is_floating_point():
            raise ValueError(f"expected positive_pairs (P, 2) of integers, got {tuple(positive_pairs.shape)}")
        pairs = positive_pairs.to(device=device, dtype=torch.long)  # (P, 2)
        if pairs.numel() and not bool(
            ((pairs >= 0) & (pairs < torch.tensor([n_img, n_txt], device=device))).all()
        ):
            raise FNEError(f"positive_pairs: expected (image < {n_img}, caption < {n_txt}) index pairs")
        # The ground-truth pairs are positives whether listed or not; each pair counts once.
        pairs = torch.cat([pairs, torch.stack([gt, torch.arange(n_txt, device=device)], 1)])
        linear = torch.unique(pairs[:, 0] * n_txt + pairs[:, 1])  # (P',) sorted by image
        pairs = torch.stack([linear // n_txt, linear % n_txt], 1)
    return images, texts, gt, pairs


@torch.inference_mode()
def retrieval_scores(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    positive_pairs: Tensor | None = None,
    chunk_size: int | None = None,
    protocol: EccvProtocol | None = None,
) -> dict[str, float]:
    """Retrieval scores of a split's features (FNE_SPEC sections 9-10), in percent except medr/meanr.

    Ranks are 0-based and pessimistic: the rank of an image is the number of non-relevant
    captions scoring >= its best ground-truth caption, the rank of a caption the number of
    other images scoring >= its own image. Ties count against the query, so a collapsed model
    (all embeddings equal) gets R@K = 0, not 100. Without ties, and with one chunk, the ranks
    equal a per-query argsort of ``I @ T.T`` exactly. For the multi-positive metrics items are
    ordered by score, and at equal scores non-relevant items first. With several chunks, scores
    of different row blocks (and the text-to-image multi-positive pass, which multiplies caption
    blocks ``T[c] @ I.T``) can differ from the one-chunk matrix in the last bit, which only
    matters for near-exact ties.

    Args:
        image_features: (N_img, D) L2-normalised image embeddings (any float dtype; fp32 math).
        text_features: (N_txt, D) L2-normalised caption embeddings.
        text_to_image: (N_txt,) int64, index of each caption's image; any number >= 1 of
            captions per image, in any order.
        positive_pairs: optional (P, 2) int64 (image index, caption index) pairs that also
            match; the ground-truth pairs are always positives. Adds R-Precision, mAP@R
            (Musgrave et al. 2020) and any-positive R@K for both directions.
        chunk_size: images per chunk of the similarity matrix (at most; chunks are split
            evenly). Default: as many as keep a chunk <= 2**28 fp32 elements.
        protocol: optional published protocol on this split
            (:class:`~fne_lightning.retrieval.protocols.EccvProtocol`): adds its metrics, computed
            from the same matrix and ground-truth ranks in the same pass. It needs the whole
            matrix at once: with several chunks it is computed a second time, whole.

    Returns:
        A dict of Python floats by name. ``i2t_r1``, ``i2t_r5``, ``i2t_r10`` (R@K, percent),
        ``i2t_medr`` and ``i2t_meanr`` (median and mean rank, 1-based), the same for ``t2i``,
        ``rsum`` (the sum of the six R@K), with ``positive_pairs`` also
        ``{i2t,t2i}_{rprecision,map_at_r,any_r1,any_r5,any_r10}`` (percent), and with
        ``protocol`` its keys, each named ``<protocol>/<name>`` (``eccv/i2t_map_at_r``, ...: see
        :func:`~fne_lightning.retrieval.protocols.protocol_scores`).

    Raises:
        ValueError: features or indices of the wrong shape or dtype, no image or no caption, or
            non-finite features.
        FNEError: indices out of range, an image without a caption, or a bad ``chunk_size``.

    Example::

        scores = retrieval_scores(image_features, text_features, text_to_image)
        print(scores["i2t_r1"], scores["rsum"])
    """
    images, texts, gt, pairs = _checked_inputs(image_features, text_features, text_to_image, positive_pairs)
    n_img, n_txt = images.shape[0], texts.shape[0]
    rows = chunk_size if chunk_size is not None else max(1, CHUNK_ELEMENTS // max(n_txt, 1))
    if rows < 1:
        raise FNEError(f"chunk_size={chunk_size!r}: expected a positive number of images")
    bounds = _row_bounds(n_img, rows)

    hooks: list[Callable[[int, Tensor], None]] = []
    if pairs is not None:
        i2t_pos, t2i_pos = PositiveAccumulator(pairs, 0, n_img), PositiveAccumulator(pairs, 1, n_txt)

        def positives_hook(start: int, scores: Tensor) -> None:
            i2t_pos.add(start, scores)
            if len(bounds) == 1:  # all of S is here: the caption queries are its columns
                t2i_pos.add(0, scores.T)

        hooks.append(positives_hook)
    whole: list[Tensor] = []  # S, kept for the protocol when it is one chunk
    if protocol is not None and len(bounds) == 1:
        hooks.append(lambda start, scores: whole.append(scores))

    def on_chunk(start: int, scores: Tensor) -> None:
        for hook in hooks:
            hook(start, scores)

    i2t, t2i = _ground_truth_ranks(images, texts, gt, bounds, on_chunk if hooks else None)
    out = {**_summary("i2t", i2t), **_summary("t2i", t2i)}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in HIT_KS)
    if pairs is not None:
        if len(bounds) > 1:
            step = max(1, CHUNK_ELEMENTS // n_img)
            for start in range(0, n_txt, step):
                t2i_pos.add(start, texts[start : start + step] @ images.T)  # (c, N_img)
        out.update(i2t_pos.result("i2t"))
        out.update(t2i_pos.result("t2i"))
    if protocol is not None:
        from fne_lightning.retrieval.protocols import protocol_scores

        reuse = None
        if whole:  # the ranks above come from this very matrix: the protocol reuses them
            captions = torch.arange(n_txt, device=gt.device)
            reuse = {"i2t": (torch.stack([gt, captions], 1), i2t), "t2i": (torch.stack([captions, gt], 1), t2i)}
            scores = whole.pop()
        else:
            scores = images @ texts.T  # (N_img, N_txt)
        out.update(protocol_scores(scores, protocol, reuse))
    return out


@torch.inference_mode()
def topk_neighbours(
    query: Tensor, gallery: Tensor, k: int, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` best-scoring gallery items of every query (dot product), best first.

    Queries are scored in chunks, so the whole Q x N matrix never exists. The order of exactly
    tied items is unspecified.

    Args:
        query: (Q, D) query features.
        gallery: (N, D) gallery features.
        k: items per query (at most N are returned).
        chunk_size: queries per chunk (at most); default: as many as keep a chunk <= 2**28
            scores.

    Returns:
        ``(scores, indices)``: (Q, k') fp32 and (Q, k') int64, ``k' = min(k, N)``.
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"expected query (Q, D) and gallery (N, D), got {tuple(query.shape)} and "
                         f"{tuple(gallery.shape)}")
    rows = chunk_size if chunk_size is not None else max(1, CHUNK_ELEMENTS // max(gallery.shape[0], 1))
    if rows < 1:
        raise FNEError(f"chunk_size={chunk_size!r}: expected a positive number of queries")
    k = min(int(k), gallery.shape[0])
    scores = torch.empty(query.shape[0], k, device=query.device)
    indices = torch.empty(query.shape[0], k, dtype=torch.long, device=query.device)
    gallery = gallery.float()
    for a, b in _row_bounds(query.shape[0], rows):
        top = torch.topk(query[a:b].float() @ gallery.T, k, dim=1)  # (C, k) of the (C, N) chunk
        scores[a:b], indices[a:b] = top.values, top.indices
    return scores, indices


def coco_1k_scores(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    positive_pairs: Tensor | None = None,
    num_folds: int = 5,
    **kw: Any,
) -> dict[str, float]:
    """COCO 1K protocol: :func:`retrieval_scores` averaged over ``num_folds`` consecutive folds.

    Fold f holds images ``[f * n, (f + 1) * n)`` with ``n = N_img / num_folds`` and the captions
    of those images (in any order in the input), re-indexed; positive pairs are kept where both
    sides fall in the fold.

    Args:
        image_features: (N_img, D), as for :func:`retrieval_scores`.
        text_features: (N_txt, D).
        text_to_image: (N_txt,) int64 image index of each caption.
        positive_pairs: optional (P, 2) extra (image index, caption index) positives.
        num_folds: the number of folds; must divide N_img (COCO 1K: 5 folds of the 5K test set).
        **kw: passed to :func:`retrieval_scores` (``chunk_size``).

    Returns:
        The keys of :func:`retrieval_scores`, each the mean of its fold values (so ``rsum`` is
        the mean of the fold rsums).

    Raises:
        FNEError: ``num_folds`` does not divide the number of images.
    """
    n_img = image_features.shape[0]
    if not isinstance(num_folds, int) or num_folds < 1 or n_img % num_folds:
        raise FNEError(
            f"num_folds={num_folds!r}: expected a positive divisor of the number of images ({n_img})"
        )
    fold = n_img // num_folds
    text_to_image = text_to_image.to(image_features.device).long()
    fold_of_caption = text_to_image // fold  # (N_txt,)
    index_in_fold = torch.empty_like(text_to_image)  # (N_txt,) caption index inside its fold
    pairs = None if positive_pairs is None else positive_pairs.to(image_features.device).long()
    totals: dict[str, float] = {}
    for f in range(num_folds):
        captions = (fold_of_caption == f).nonzero().squeeze(1)  # (n_f,) in input order
        index_in_fold[captions] = torch.arange(captions.numel(), device=captions.device)
        fold_pairs = None
        if pairs is not None:
            keep = (pairs[:, 0] // fold == f) & (fold_of_caption[pairs[:, 1]] == f)
            fold_pairs = torch.stack([pairs[keep, 0] - f * fold, index_in_fold[pairs[keep, 1]]], 1)
        scores = retrieval_scores(
            image_features[f * fold : (f + 1) * fold],
            text_features[captions],
            text_to_image[captions] - f * fold,
            fold_pairs,
            **kw,
        )
        for key, value in scores.items():
            totals[key] = totals.get(key, 0.0) + value
    return {key: value / num_folds for key, value in totals.items()}
