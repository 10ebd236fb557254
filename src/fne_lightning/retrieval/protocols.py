"""Published evaluation protocols on our similarity scores: ECCV Caption's mAP@R, R-Precision and
R@1, CxC's R@K and the COCO 5K and 1K R@K, exactly as the ``eccv_caption`` package (Chun et al.
2022, "ECCV Caption: Correcting False Negatives by Collecting Machine-and-Human-verified
Image-Caption Associations for MS-COCO", github.com/naver-ai/eccv-caption) computes them.

That package takes ranked lists (query id -> item ids, best first) and loops over queries in
Python; here the same numbers come from the split's score matrix ``S = I @ T.T`` with counts and
short top lists, never a per-query loop. What each metric averages over is the protocol's, not
ours (:mod:`fne_lightning.retrieval.ranking`):

- **queries**: the query ids listed in its files (ECCV Caption: 1,261 images and 1,332 captions;
  CxC: 5,000 images and 24,972 captions; COCO 5K: every image and every caption of its 25,000);
- **positives**: the ids its files list for each query; ``R``, the number of positives, counts
  every listed id, also those that cannot be retrieved (2 of ECCV's caption positives are not in
  the 25,000 test captions);
- **galleries**: the protocol's 5,000 images and the 25,000 captions of its
  ``coco_test_ids.npy``; items of the split outside them (Karpathy's test split has 10 captions
  more) are left out;
- **COCO 1K**: the package's own folds, the captions ``coco_test_ids[5000 f : 5000 (f + 1)]`` and
  their images, ranked among the fold's items only; the mean of the five folds' means.

R@K is the share of queries with a positive in the top K; mAP@R the mean over the first R
positions of the precision at each position that holds a positive; R-Precision the share of
positives among the top R. The package breaks no ties (the order of the lists is the caller's);
here, as in the rest of our evaluation, a tie counts against the query: at equal scores
non-positive items rank first.

Pure PyTorch, on any device. The protocol arrives as :class:`EccvProtocol`, index tensors of the
split (built from the package's files by :mod:`fne_lightning.data.protocols`);
:func:`~fne_lightning.retrieval.ranking.retrieval_scores` computes it in the same pass as our own
metrics (``protocol=...``), reusing the score matrix and the ground-truth ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fne_lightning.retrieval.ranking import CUDA_BLOCK_ELEMENTS, HIT_KS

# Extra length of a top list beyond the largest R: items tied with the list's last score may be
# missing from it, and the positions before them are exact only if at least R remain.
TOP_SLACK = 8
# Column counts compare all of S in place once the queries are at least 1 / COL_GATHER_SHARE of
# its columns, rather than gathering them (see _col_counts).
COL_GATHER_SHARE = 10
# ECCV's top lists are taken this many queries at a time on CPU (COCO 5K on 2 threads: caption
# queries 2.6x faster than all at once, image queries 1.15x faster than 256 at a time).
ECCV_CPU_QUERIES = 64
# Elements per block of the counting passes on CPU: COCO 5K on 2 threads counts faster in blocks of
# 4 MB than in ranking's 16 MB (CPU_BLOCK_ELEMENTS), which are also fresh memory at every call.
COUNT_CPU_ELEMENTS = 2**20
# The protocols, their metrics (keys ``<protocol>/<i2t|t2i>_<metric>``) and what the package
# calls them.
PROTOCOL_METRICS = {
    "eccv": ("map_at_r", "rprecision", "r1"),
    "cxc": ("r1", "r5", "r10"),
    "coco5k": ("r1", "r5", "r10"),
    "coco1k": ("r1", "r5", "r10"),
}
OFFICIAL_NAMES = {"eccv": "eccv_{metric}", "cxc": "cxc_{metric}", "coco5k": "coco_5k_{metric}",
                  "coco1k": "coco_1k_{metric}"}


@dataclass
class QuerySet:
    """The queries of one direction of a protocol, with their positives, as split indices."""

    #: (Q,) int64 split indices of the queries: images for ``i2t``, captions for ``t2i``.
    queries: Tensor
    #: (P, 2) int64 (query position in :attr:`queries`, split index of a positive item), only
    #: positives inside the protocol's gallery, each once.
    pairs: Tensor
    #: (Q,) int64 R, the number of positives the protocol lists for each query (>= 1), those
    #: outside the gallery (or not mapped onto the split) included.
    n_relevant: Tensor

    def to(self, device: torch.device | str) -> QuerySet:
        """The same tensors on ``device``."""
        return QuerySet(self.queries.to(device), self.pairs.to(device), self.n_relevant.to(device))


@dataclass
class EccvProtocol:
    """ECCV Caption's evaluation (the ``eccv_caption`` package) mapped onto a split."""

    #: (N_g_img,) int64 split indices of the protocol's images: the text-to-image gallery.
    images: Tensor
    #: (N_g_txt,) int64 split indices of its captions (``coco_test_ids.npy``): the image-to-text
    #: gallery.
    captions: Tensor
    #: ``"<protocol>/<direction>"`` -> queries and positives: ``eccv/i2t``, ``eccv/t2i``,
    #: ``cxc/i2t``, ``cxc/t2i``, ``coco5k/i2t``, ``coco5k/t2i``.
    query_sets: dict[str, QuerySet]
    #: COCO 1K: (images, captions) split indices of each fold; empty: no ``coco1k`` metrics.
    folds: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    #: Where the protocol comes from and what could not be mapped, one line each (for reports).
    notes: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> EccvProtocol:
        """The same protocol with its tensors on ``device``."""
        return EccvProtocol(self.images.to(device), self.captions.to(device),
                            {k: v.to(device) for k, v in self.query_sets.items()},
                            [(i.to(device), c.to(device)) for i, c in self.folds], list(self.notes))


def _block_rows(scores: Tensor, width: int) -> int:
    return max(1, (CUDA_BLOCK_ELEMENTS if scores.is_cuda else COUNT_CPU_ELEMENTS) // max(width, 1))


def _take(scores: Tensor, dim: int, index: Tensor) -> Tensor:
    """``scores.index_select(dim, index)``, or a view when ``index`` is a run of consecutive indices."""
    n = index.numel()
    if n:
        first = int(index[0])
        if torch.equal(index, torch.arange(first, first + n, device=index.device)):
            return scores.narrow(dim, first, n)
    return scores.index_select(dim, index)


def _window(scores: Tensor, dim: int, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The part of ``scores`` along ``dim`` that holds the sorted ``index``: a view of the range
    from its first to its last entry when few others lie in between (a COCO 1K fold of a split in
    Karpathy's order), else a gathered copy.

    Returns:
        ``(part, local, others)``: the sub-matrix, the position of each entry of ``index`` in it,
        and the positions in it of items that are not in ``index`` (to be left out).
    """
    device = index.device
    n = index.numel()
    lo, hi = (int(index[0]), int(index[-1]) + 1) if n else (0, 0)
    if n and hi - lo - n <= max(64, n // 64):
        inside = torch.ones(hi - lo, dtype=torch.bool, device=device)
        inside[index - lo] = False
        return scores.narrow(dim, lo, hi - lo), index - lo, inside.nonzero().squeeze(1)
    return scores.index_select(dim, index), torch.arange(n, device=device), torch.empty(0, dtype=torch.long,
                                                                                          device=device)


def _values(scores: Tensor, columns: bool, queries: Tensor, items: Tensor) -> Tensor:
    """Scores of (query, item) pairs: ``S[query, item]``, or ``S[item, query]`` for column queries."""
    return scores[items, queries] if columns else scores[queries, items]


def _row_counts(scores: Tensor, rows: Tensor, thresh: Tensor) -> Tensor:
    """(Q,) int64: how many entries of row ``rows[k]`` of ``scores`` are >= ``thresh[k]``."""
    n_rows, n_cols = scores.shape
    order = torch.argsort(rows)
    rows, thresh = rows[order], thresh[order]
    whole = rows.numel() == n_rows and bool((rows == torch.arange(n_rows, device=rows.device)).all())
    block = _block_rows(scores, n_cols)
    buf = torch.empty(min(block, rows.numel()), n_cols, device=scores.device)
    rows_buf = None if whole or not scores.is_contiguous() else torch.empty_like(buf)  # gathered rows
    sum_dtype = torch.float32 if n_cols < 2**24 else torch.float64
    counts = torch.empty(rows.numel(), dtype=torch.float64, device=scores.device)
    for start in range(0, rows.numel(), block):
        end = min(start + block, rows.numel())
        if whole:
            blk = scores[start:end]  # (b, N)
        elif rows_buf is not None:
            blk = torch.index_select(scores, 0, rows[start:end], out=rows_buf[: end - start])
        else:
            blk = _take(scores, 0, rows[start:end])
        out = buf[: end - start]
        torch.ge(blk, thresh[start:end, None], out=out)
        counts[start:end] = out.sum(1, dtype=sum_dtype)
    result = torch.empty_like(counts)
    result[order] = counts
    return result.long()


def _col_counts(scores: Tensor, cols: Tensor, thresh: Tensor) -> Tensor:
    """(Q,) int64: how many entries of column ``cols[k]`` of ``scores`` are >= ``thresh[k]``.

    Row blocks of ``scores`` against a threshold per column (a transposed view would be ~10x
    slower). A few columns are gathered first; from a tenth of them on, all are compared in place
    (+inf elsewhere): a column gather copies element by element, and for COCO 5K on 2 CPU threads
    gathering 20% of the columns took 2x (``torch.gather``) to 3x (``index_select``) as long as
    comparing all of them.
    """
    n_rows, n_cols = scores.shape
    if COL_GATHER_SHARE * cols.numel() >= n_cols:
        matrix = scores
        full = torch.full((n_cols,), math.inf, device=scores.device)
        full[cols] = thresh
    else:
        matrix, full = torch.gather(scores, 1, cols.expand(n_rows, -1)), thresh  # (N_rows, Q)
    # Each block's 0/1 comparisons are added into one block-sized accumulator, summed over its rows
    # once at the end: a sum along dim 0 per block costs more than the comparison (COCO 5K on 2 CPU
    # threads: 1.5x as fast in all). Sums stay exact: fp32 holds counts up to 2**24.
    width = matrix.shape[1]
    block = min(n_rows, _block_rows(scores, width)) or 1
    acc = torch.zeros(block, width, device=scores.device)
    buf = torch.empty_like(acc)
    whole = n_rows - n_rows % block
    for start in range(0, whole, block):
        acc += torch.ge(matrix[start : start + block], full, out=buf)
    counts = acc.sum(0, dtype=torch.float64)
    if whole < n_rows:
        counts += (matrix[whole:] >= full).sum(0)
    return (counts[cols] if matrix is scores else counts).long()


def _excluded_counts(scores: Tensor, columns: bool, queries: Tensor, excluded: Tensor, thresh: Tensor) -> Tensor:
    """(Q,) int64: how many of the ``excluded`` items (outside the gallery) score >= ``thresh``."""
    counts = torch.zeros(queries.numel(), dtype=torch.long, device=scores.device)
    if not excluded.numel() or not queries.numel():
        return counts
    step = max(1, 2**24 // excluded.numel())
    for start in range(0, queries.numel(), step):
        q = queries[start : start + step]
        block = scores[excluded[:, None], q[None, :]].T if columns else scores[q[:, None], excluded[None, :]]
        counts[start : start + step] = (block >= thresh[start : start + step, None]).sum(1)
    return counts


def recall_ranks(
    scores: Tensor,
    query_set: QuerySet,
    excluded: Tensor,
    columns: bool,
    reuse: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """0-based pessimistic rank of each query's best positive among the gallery's items.

    The rank is the number of gallery items that are not positives and score at or above the
    best positive: R@K is the share of ranks < K. A query without a positive in the gallery gets
    the number of items (never a hit).

    Args:
        scores: (N_img, N_txt) the split's similarity matrix.
        query_set: the queries (rows of ``scores``, or its columns with ``columns``) and their
            positives.
        excluded: (E,) int64 items of the split outside the protocol's gallery (captions for row
            queries, images for column queries).
        columns: the queries are captions (columns of ``scores``): text-to-image.
        reuse: optional ``(ground_truth, ranks)``: the split's (query, item) ground-truth pairs
            (G, 2) and the ranks of every query of the split against its ground truth over all
            the split's items (:func:`~fne_lightning.retrieval.ranking.retrieval_scores`'
            internals, from the same ``scores``). Where a query's ground truth lies among its
            positives and inside the gallery, its rank follows from that one with sparse
            corrections; only the others are counted again.

    Returns:
        (Q,) int64 ranks.
    """
    ranks, idx, thresh, correction = _recall_plan(scores, query_set, excluded, columns, reuse)
    if idx.numel():
        q = query_set.queries[idx]
        ranks[idx] = (_col_counts(scores, q, thresh) if columns else _row_counts(scores, q, thresh)) - correction
    return ranks


def _recall_plan(scores: Tensor, query_set: QuerySet, excluded: Tensor, columns: bool,
                 reuse: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`recall_ranks` but for the counting pass: the ranks known without one, the queries
    (positions) still to count, their thresholds, and what to subtract from their counts (items
    outside the gallery and positives at or above the threshold)."""
    device = scores.device
    n_items = scores.shape[0] if columns else scores.shape[1]
    queries = query_set.queries
    n_q = queries.numel()
    pq, pi = query_set.pairs[:, 0], query_set.pairs[:, 1]
    vals = _values(scores, columns, queries[pq], pi)  # (P,)
    thresh = torch.full((n_q,), -math.inf, device=device).scatter_reduce(0, pq, vals, "amax")
    has_pos = torch.bincount(pq, minlength=n_q) > 0
    pos_at_or_above = torch.zeros(n_q, dtype=torch.long, device=device).index_add_(0, pq, (vals >= thresh[pq]).long())
    ranks = torch.full((n_q,), n_items, dtype=torch.long, device=device)
    todo = has_pos.clone()
    if reuse is not None:
        ground_truth, split_ranks = reuse
        position = torch.full((split_ranks.numel(),), -1, dtype=torch.long, device=device)
        position[queries] = torch.arange(n_q, device=device)
        gpos = position[ground_truth[:, 0]]
        keep = gpos >= 0
        gpos, gitem = gpos[keep], ground_truth[keep, 1]  # ground-truth pairs of the protocol's queries
        gvals = _values(scores, columns, queries[gpos], gitem)
        thresh_gt = torch.full((n_q,), -math.inf, device=device).scatter_reduce(0, gpos, gvals, "amax")
        gt_keys, pos_keys = gpos * n_items + gitem, pq * n_items + pi
        # Usable: every ground-truth item of the query is one of its positives inside the gallery.
        in_pos = _member(gt_keys, torch.sort(pos_keys).values)
        usable = has_pos & (torch.bincount(gpos[~in_pos], minlength=n_q) == 0) & (
            torch.bincount(gpos, minlength=n_q) > 0)
        # Non-positives at or above the best ground truth = the split's rank, less the items
        # outside the gallery and the extra positives (not ground truth) that score that high.
        extra = ~_member(pos_keys, torch.sort(gt_keys).values)
        extra_above = torch.zeros(n_q, dtype=torch.long, device=device).index_add_(
            0, pq[extra], (vals[extra] >= thresh_gt[pq[extra]]).long())
        bound = split_ranks[queries] - _excluded_counts(scores, columns, queries, excluded, thresh_gt) - extra_above
        # Exact where the best positive is the best ground truth; where it scores higher, the rank
        # is at most `bound`, so exact when that is 0.
        known = usable & ((thresh == thresh_gt) | (bound == 0))
        ranks[known] = bound[known]
        todo &= ~known
    idx = todo.nonzero().squeeze(1)
    t = thresh[idx]
    return ranks, idx, t, _excluded_counts(scores, columns, queries[idx], excluded, t) + pos_at_or_above[idx]


def _top_items(matrix: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``length`` best entries of every row of ``matrix`` (Q, N): values (best first) and
    column indices, and per row the largest value an entry left out can have (-inf: none left)."""
    n_q, n = matrix.shape
    top = matrix.topk(min(length + 1, n), dim=1)
    cut = top.values[:, length] if length < n else torch.full((n_q,), -math.inf, device=matrix.device)
    return top.values[:, :length], top.indices[:, :length], cut


def _member(values: Tensor, sorted_set: Tensor) -> Tensor:
    """``torch.isin(values, sorted_set)`` for a sorted ``sorted_set``: a binary search, without
    the sort of both that ``isin`` does on every call."""
    if not sorted_set.numel():
        return torch.zeros_like(values, dtype=torch.bool)
    at = torch.searchsorted(sorted_set, values).clamp_(max=sorted_set.numel() - 1)
    return sorted_set[at] == values


def _top_list_stats(matrix: Tensor, query_pos: Tensor, n_relevant: Tensor, pos_keys: Tensor, n_items: int,
                    length: int) -> tuple[Tensor, Tensor]:
    """mAP@R, R-Precision and R@1 (3, Q) of the queries at positions ``query_pos`` (the rows of
    ``matrix``, (Q, N_items), items outside the gallery at -inf) from their top ``length`` items,
    and which rows need a longer list (ties at the list's end reach into the first R)."""
    values, idx, cut = _top_items(matrix, length)  # (Q, L) best first
    rel = _member(query_pos[:, None] * n_items + idx, pos_keys)  # (Q, L)
    # At equal scores positives rank after the others: lower them by less than the gap to the
    # next fp32 value (as in ranking._positive_stats), then a stable sort of the short list.
    key = values.double()
    key = torch.where(rel, key - (key.abs() * 2.0**-30 + 2.0**-160), key)
    order = key.argsort(dim=1, descending=True, stable=True)
    rel, values = rel.gather(1, order), values.gather(1, order)
    need = n_relevant.clamp(min=1)
    # Positions before any value an item left out could share are exact.
    redo = (values > cut[:, None]).sum(1) < need
    hits = rel.cumsum(1, dtype=torch.float64)  # (Q, L) positives within the top i
    pos = torch.arange(1, length + 1, dtype=torch.float64, device=matrix.device)
    r_prec = hits.gather(1, (need - 1)[:, None]).squeeze(1) / need
    map_at_r = torch.where(rel & (pos <= need[:, None]), hits / pos, 0.0).sum(1) / need
    return torch.stack([map_at_r, r_prec, rel[:, 0].double()]), redo


def eccv_stats(scores: Tensor, query_set: QuerySet, excluded: Tensor, columns: bool) -> Tensor:
    """Per-query mAP@R, R-Precision and R@1 (fractions) of ECCV Caption (its ``compute_eccv_metrics``).

    Each query's top ``max R + 8`` items, ties broken against the query; the rare query whose
    first R positions reach items tied with the list's last score is ranked in full.

    Args:
        scores: (N_img, N_txt) the split's similarity matrix.
        query_set: the queries and their positives (``n_relevant``: R, unretrievable positives
            included, as the package counts them).
        excluded: (E,) int64 items outside the protocol's gallery.
        columns: the queries are captions (columns of ``scores``).

    Returns:
        (3, Q) float64: mAP@R, R-Precision and R@1 of each query.
    """
    n_items = scores.shape[0] if columns else scores.shape[1]
    n_q = query_set.queries.numel()
    out = torch.zeros(3, n_q, dtype=torch.float64, device=scores.device)
    if not n_q:
        return out
    r_max = int(query_set.n_relevant.max())
    if r_max > n_items - excluded.numel():
        raise ValueError(f"a query has R = {r_max} positives, more than the {n_items - excluded.numel()} items of "
                         "the gallery (the package's R-Precision is then another formula)")
    pos_keys = torch.unique(query_set.pairs[:, 0] * n_items + query_set.pairs[:, 1])  # sorted
    length = min(n_items, r_max + TOP_SLACK)
    # Queries are read in the order of their index in S (a column gather in scattered order costs
    # half as much again), ECCV_CPU_QUERIES at a time into buffers reused from step to step: on CPU,
    # copies of all of them at once (two of 27 MB for COCO 5K's caption queries: fresh memory to
    # fault in, a working set beyond the caches) cost more than their top-k. Column queries are
    # gathered with torch.gather (it spreads the copy over the threads; index_select along dim 1
    # does not), then transposed.
    order = torch.argsort(query_set.queries)
    queries = query_set.queries[order]
    step = min(n_q, _block_rows(scores, n_items) if scores.is_cuda else ECCV_CPU_QUERIES)
    buf = torch.empty(step * n_items, dtype=scores.dtype, device=scores.device)
    columns_buf = torch.empty_like(buf) if columns else None
    for start in range(0, n_q, step):
        q = queries[start : start + step]
        matrix = buf[: q.numel() * n_items].view(q.numel(), n_items)  # (b, N_items)
        if columns:
            part = columns_buf[: q.numel() * n_items].view(n_items, q.numel())
            matrix.copy_(torch.gather(scores, 1, q.expand(n_items, -1), out=part).T)
        else:
            torch.index_select(scores, 0, q, out=matrix)
        if excluded.numel():
            matrix[:, excluded] = -math.inf
        query_pos = order[start : start + step]  # their positions in the query set
        need = query_set.n_relevant[query_pos]
        stats, redo = _top_list_stats(matrix, query_pos, need, pos_keys, n_items, length)
        if redo.any():  # ties at the end of the short list: rank those queries in full
            rows = redo.nonzero().squeeze(1)
            stats[:, rows], _ = _top_list_stats(matrix[rows], query_pos[rows], need[rows], pos_keys, n_items,
                                                n_items)
        out[:, query_pos] = stats
    return out


def _coco1k(scores: Tensor, protocol: EccvProtocol) -> dict[str, float]:
    """COCO 1K R@K of the package's folds: each fold's images and captions ranked among the fold's
    items only, the mean of the folds' hit rates. The thresholds and positives of every fold come
    from one sparse pass; each fold then costs one count per direction over its window of S."""
    device = scores.device
    n_img, n_txt = scores.shape
    fold_of = {"i2t": torch.full((n_img,), -1, dtype=torch.long, device=device),
               "t2i": torch.full((n_txt,), -1, dtype=torch.long, device=device)}
    for f, (images, captions) in enumerate(protocol.folds):
        fold_of["i2t"][images], fold_of["t2i"][captions] = f, f
    thresh, above = {}, {}
    for direction, other in (("i2t", "t2i"), ("t2i", "i2t")):
        coco = protocol.query_sets[f"coco5k/{direction}"]
        query, item = coco.queries[coco.pairs[:, 0]], coco.pairs[:, 1]
        keep = (fold_of[direction][query] >= 0) & (fold_of[direction][query] == fold_of[other][item])
        query, item = query[keep], item[keep]  # ground truth inside the query's own fold
        vals = _values(scores, direction == "t2i", query, item)
        n = fold_of[direction].numel()
        thresh[direction] = torch.full((n,), -math.inf, device=device).scatter_reduce(0, query, vals, "amax")
        above[direction] = torch.zeros(n, dtype=torch.long, device=device).index_add_(
            0, query, (vals >= thresh[direction][query]).long())
    totals = torch.zeros(2, len(HIT_KS), dtype=torch.float64, device=device)
    ks = torch.tensor(HIT_KS, device=device)
    for images, captions in protocol.folds:
        rows, row_pos, other_rows = _window(scores, 0, images)
        block, col_pos, other_cols = _window(rows, 1, captions)  # the fold's images x captions, and a few more
        for d, (queries, pos, others, columns) in enumerate(((images, row_pos, other_cols, False),
                                                              (captions, col_pos, other_rows, True))):
            direction = "t2i" if columns else "i2t"
            t = thresh[direction][queries]
            counts = _col_counts(block, pos, t) if columns else _row_counts(block, pos, t)
            ranks = counts - _excluded_counts(block, columns, pos, others, t) - above[direction][queries]
            ranks = torch.where(torch.isinf(t), block.shape[0 if columns else 1], ranks)  # no positive: a miss
            totals[d] += (ranks[:, None] < ks).double().mean(0)
    means = (100.0 * totals / len(protocol.folds)).tolist()
    return {f"coco1k/{d}_r{k}": means[n][j] for n, d in enumerate(("i2t", "t2i")) for j, k in enumerate(HIT_KS)}


def _hit_rates(prefix: str, ranks: Tensor) -> dict[str, float]:
    counts = torch.stack([(ranks < k).sum() for k in HIT_KS]).tolist()
    return {f"{prefix}_r{k}": 100.0 * c / max(ranks.numel(), 1) for k, c in zip(HIT_KS, counts, strict=True)}


@torch.inference_mode()
def protocol_scores(
    scores: Tensor,
    protocol: EccvProtocol,
    reuse: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, float]:
    """ECCV Caption, CxC, COCO 5K and COCO 1K metrics of a split's score matrix, in percent.

    The numbers the ``eccv_caption`` package's ``Metrics`` (``eccv_metrics``, ``cxc_recalls``,
    ``coco_5k_recalls``, ``coco_1k_recalls``) return for the rankings of ``scores`` (every row
    sorted by score, ties against the query), times 100: see the module docstring for what each
    averages over.

    Args:
        scores: (N_img, N_txt) fp32 similarity matrix of the split's images and captions.
        protocol: the protocol's queries, positives, galleries and folds as split indices.
        reuse: optional ``{"i2t": (pairs, ranks), "t2i": (pairs, ranks)}``: the split's
            ground-truth (query, item) pairs and ranks computed from this same ``scores``
            (see :func:`recall_ranks`); spares counting passes, same result.

    Returns:
        ``eccv/{i2t,t2i}_{map_at_r,rprecision,r1}``, ``cxc/{i2t,t2i}_r{1,5,10}``,
        ``coco5k/...`` and ``coco1k/...`` (the latter when the protocol has folds) as floats.
    """
    n_img, n_txt = scores.shape
    protocol = protocol.to(scores.device)
    outside = {}
    for direction, (gallery, n) in {"i2t": (protocol.captions, n_txt), "t2i": (protocol.images, n_img)}.items():
        inside = torch.zeros(n, dtype=torch.bool, device=scores.device)
        inside[gallery] = True
        outside[direction] = (~inside).nonzero().squeeze(1)
    out: dict[str, float] = {}
    for name, query_set in protocol.query_sets.items():
        proto, direction = name.split("/")
        columns = direction == "t2i"
        if proto == "eccv":
            stats = eccv_stats(scores, query_set, outside[direction], columns)
            means = (100.0 * stats.sum(1) / max(stats.shape[1], 1)).tolist()
            out.update({f"eccv/{direction}_{m}": v for m, v in zip(PROTOCOL_METRICS["eccv"], means, strict=True)})
        else:
            ranks = recall_ranks(scores, query_set, outside[direction], columns,
                                 None if reuse is None else reuse.get(direction))
            out.update(_hit_rates(f"{proto}/{direction}", ranks))
    if protocol.folds:
        out.update(_coco1k(scores, protocol))
    return out
