"""Image-text retrieval metrics: R@K, medr, meanr, rsum, the COCO 1K protocol, and the
multi-positive R-Precision / mAP@R / any-positive R@K.

Protocol: FNE_SPEC section 9 (VSE++ ranks, Faghri et al. 2018: the rank of an image is the best
rank among all its ground-truth captions, never assuming five; R@K = percent of queries with
0-based rank < K; medr = floor(median rank) + 1; meanr = mean rank + 1; rsum = sum of the six R@K;
COCO 1K = mean over the five consecutive 1,000-image folds of the 5K test set) and section 10
(extra positives: R-Precision and mAP@R of Musgrave et al. 2020, "A Metric Learning Reality
Check", and R@K where any positive counts). Ties count against the query (see
:func:`retrieval_scores`).

Our R@K is a hit rate: torchmetrics' ``RetrievalHitRate`` computes the same quantity, whereas
``RetrievalRecall`` divides by the number of relevant items (different when an image has several
captions) and, since torchmetrics 1.8, drops candidates whose score is <= 0, which cosine scores
often are.

The ranking itself is pure PyTorch in :mod:`fne_lightning.retrieval.ranking` (``retrieval_scores``,
``coco_1k_scores``); :class:`RetrievalMetric` only accumulates features across batches and ranks
(DDP-safe) and calls them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from fne_lightning.errors import FNEError
from fne_lightning.retrieval.ranking import coco_1k_scores, retrieval_scores

if TYPE_CHECKING:
    from fne_lightning.retrieval.protocols import EccvProtocol


def _unique_by_index(features: Tensor, indices: Tensor, expected: int, modality: str) -> Tensor:
    """Features (N, D) of dataset indices 0..expected-1, in index order, one row per index.

    DistributedSampler pads the last batches with repeated samples; the first copy (in gathered
    order) is kept.
    """
    features, unique = _dedup(features, indices)
    n = unique.numel()
    if n != expected or (n and (int(unique[0]) != 0 or int(unique[-1]) != expected - 1)):
        span = f" in [{int(unique[0])}, {int(unique[-1])}]" if n else ""
        raise FNEError(
            f"RetrievalMetric: got {n} distinct {modality} indices{span}, expected all {expected} "
            f"(0..{expected - 1}): was part of the split skipped (e.g. limit_val_batches < 1.0), or do the "
            f"targets belong to another split?"
        )
    return features


def _dedup(features: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of the distinct dataset ``indices``, in index order (the first copy of each), and those indices."""
    ordered, perm = torch.sort(indices, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]  # (M,) first copy of each index
    return features[perm[first]], ordered[first]


class RetrievalMetric(Metric):
    """Accumulates image and caption features over batches and computes :func:`retrieval_scores`.

    States are lists gathered with ``dist_reduce_fx="cat"``, so under DDP every rank ranks the
    whole split; duplicated dataset indices (DistributedSampler padding) are dropped and rows are
    ordered by index before ranking. The targets are plain attributes, identical on every rank.

    Use :meth:`update` per batch and :meth:`compute` per epoch; calling the metric (``forward``)
    would rank a single batch against the whole split's targets and fail the size check.

    Example::

        metric = RetrievalMetric(text_to_image)
        for images, indices in image_loader:
            metric.update(encoder.encode_image(images), indices, "image")
        for tokens, indices in text_loader:
            metric.update(encoder.encode_text(tokens), indices, "text")
        scores = metric.compute()  # {"i2t_r1": ..., "rsum": ...}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        text_to_image: Tensor,
        positive_pairs: Tensor | None = None,
        chunk_size: int | None = None,
        protocol: EccvProtocol | None = None,
        **kwargs: Any,
    ) -> None:
        """Set the targets of the split to be scored.

        Args:
            text_to_image: (N_txt,) int64 image index of each caption (dataset index space).
            positive_pairs: optional (P, 2) (image index, caption index) extra positives.
            chunk_size: passed to :func:`retrieval_scores`.
            protocol: optional published protocol on the split, passed to
                :func:`retrieval_scores` (its keys are ``<protocol>/<name>``).
            **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``compute_on_cpu``).
        """
        super().__init__(**kwargs)
        self.chunk_size = chunk_size
        self.set_targets(text_to_image, positive_pairs, protocol)
        for modality in ("image", "text"):
            self.add_state(f"{modality}_features", default=[], dist_reduce_fx="cat")
            self.add_state(f"{modality}_indices", default=[], dist_reduce_fx="cat")

    def set_targets(self, text_to_image: Tensor, positive_pairs: Tensor | None = None,
                    protocol: EccvProtocol | None = None) -> None:
        """Replace the ground truth (e.g. when the evaluation split changes).

        Args:
            text_to_image: (N_txt,) image index of each caption.
            positive_pairs: optional (P, 2) (image index, caption index) extra positives.
            protocol: optional published protocol on the split (scored by :meth:`compute`).
        """
        self.text_to_image = text_to_image.detach().long()  # (N_txt,)
        self.positive_pairs = None if positive_pairs is None else positive_pairs.detach().long()  # (P, 2)
        self.protocol = protocol
        # Every image has >= 1 caption, so the largest index names the last image.
        self.num_images = int(self.text_to_image.max()) + 1 if self.text_to_image.numel() else 0

    def update(self, features: Tensor, indices: Tensor, modality: str) -> None:
        """Add a batch of image or caption features.

        Args:
            features: (B, D) features.
            indices: (B,) their dataset indices (image indices, or caption indices).
            modality: ``"image"`` or ``"text"``.

        Raises:
            ValueError: an unknown modality or inputs of the wrong shape.
        """
        if modality not in ("image", "text"):
            raise ValueError(f"modality={modality!r}: expected 'image' or 'text'")
        if features.ndim != 2 or indices.shape != (features.shape[0],):
            raise ValueError(
                f"expected features (B, D) and indices (B,), got {tuple(features.shape)} and {tuple(indices.shape)}"
            )
        getattr(self, f"{modality}_features").append(features.detach().float())
        getattr(self, f"{modality}_indices").append(indices.detach().to(features.device).long())

    def _features(self) -> tuple[Tensor, Tensor]:
        feats = {}
        for modality, expected in (("image", self.num_images), ("text", self.text_to_image.numel())):
            stored = getattr(self, f"{modality}_features")
            if isinstance(stored, list) and not stored:
                raise FNEError(f"RetrievalMetric: no {modality} features were added before compute()")
            feats[modality] = _unique_by_index(
                dim_zero_cat(stored), dim_zero_cat(getattr(self, f"{modality}_indices")), expected, modality
            )
        return feats["image"], feats["text"]

    def features(self) -> tuple[Tensor, Tensor]:
        """The accumulated features, gathered across ranks, deduplicated and ordered by dataset index.

        Exactly what :meth:`compute` ranks (e.g. for the COCO 1K folds or for saving embeddings).

        Returns:
            ``(image_features, text_features)``: (N_img, D) and (N_txt, D), fp32.

        Raises:
            FNEError: some image or caption of the split was never added.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            return self._features()

    def fold_scores(self, num_folds: int) -> dict[str, float]:
        """:func:`coco_1k_scores` of the accumulated features: the mean over consecutive folds.

        Args:
            num_folds: the number of equal folds of the images (COCO 1K: 5 folds of the 5K
                test set).
        """
        images, texts = self.features()
        return coco_1k_scores(images, texts, self.text_to_image, self.positive_pairs, num_folds,
                              chunk_size=self.chunk_size)

    def subset_scores(self) -> tuple[dict[str, float], int, int]:
        """Scores over the part of the split that was added (``limit_val_batches < 1``).

        The captions seen whose image was seen, and those images, re-indexed. Not comparable
        with scores of the whole split (fewer candidates make retrieval easier), but a
        consistent number to select checkpoints by when every pass sees the same part.

        Returns:
            ``(scores, n_images, n_captions)``: the scores of :func:`retrieval_scores` and the
            numbers of images and captions they rank.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            images, image_idx = _dedup(dim_zero_cat(self.image_features), dim_zero_cat(self.image_indices))
            texts, text_idx = _dedup(dim_zero_cat(self.text_features), dim_zero_cat(self.text_indices))
        t2i = self.text_to_image.to(text_idx.device)[text_idx]  # (n_txt,) dataset image index
        keep = torch.isin(t2i, image_idx)
        texts, text_idx, t2i = texts[keep], text_idx[keep], t2i[keep]
        with_caption = torch.isin(image_idx, t2i)  # an image ranks its captions: it needs one
        images, image_idx = images[with_caption], image_idx[with_caption]
        local_t2i = torch.searchsorted(image_idx, t2i)  # image position in the subset
        pairs = None
        if self.positive_pairs is not None:
            p = self.positive_pairs.to(image_idx.device)
            inside = torch.isin(p[:, 0], image_idx) & torch.isin(p[:, 1], text_idx)
            pairs = torch.stack([torch.searchsorted(image_idx, p[inside, 0]),
                                 torch.searchsorted(text_idx, p[inside, 1])], 1)
        scores = retrieval_scores(images, texts, local_t2i, pairs, chunk_size=self.chunk_size)
        return scores, images.shape[0], texts.shape[0]

    def compute(self) -> dict[str, float]:
        """Scores of the whole split: the features deduplicated, ordered by index and ranked.

        Returns:
            The dict of Python floats of :func:`retrieval_scores`, with the protocol's
            ``<protocol>/<name>`` keys when one is set.

        Raises:
            FNEError: some image or caption of the split was never added.
        """
        images, texts = self._features()
        return retrieval_scores(images, texts, self.text_to_image, self.positive_pairs, chunk_size=self.chunk_size,
                                protocol=self.protocol)
