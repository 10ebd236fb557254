"""Retrieval examples: the top-k results of a few fixed queries, each marked as the query's own
pair, another true match (the dataset's extra positives, FNE_SPEC section 10) or no match.

What the retrieval figure (:func:`~fne_lightning.retrieval.plots.retrieval_figure`), the W&B
example tables (:class:`~fne_lightning.callbacks.RetrievalFigures`) and the notebooks show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fne_lightning.fne.positives import PositiveIndex
from fne_lightning.retrieval.ranking import topk_neighbours

# Marks of a retrieved item; None = unknown (e.g. a free-text query).
PAIRED, TRUE_MATCH, NO_MATCH = 2, 1, 0
MARKS = {PAIRED: ("paired", "#2ca02c", "✓"), TRUE_MATCH: ("true match", "#1f77b4", "≈"),
         NO_MATCH: ("no match", "#d62728", "✗"), None: ("", "#7f7f7f", "")}


@dataclass
class RetrievalExamples:
    """Top-k results of a few caption and image queries, each result marked.

    A mark is ``PAIRED`` (2: the query's own pair), ``TRUE_MATCH`` (1: another listed positive)
    or ``NO_MATCH`` (0).
    """

    text_queries: np.ndarray  #: (Q,) caption indices of the caption queries.
    text_results: np.ndarray  #: (Q, k) image indices, best first.
    text_marks: np.ndarray  #: (Q, k) the mark of each image result.
    image_queries: np.ndarray  #: (Q,) image indices of the image queries.
    image_results: np.ndarray  #: (Q, k) caption indices, best first.
    image_marks: np.ndarray  #: (Q, k) the mark of each caption result.


@torch.no_grad()
def retrieval_examples(image_features: Tensor, text_features: Tensor, text_to_image: Tensor,
                       positive_pairs: Tensor | None = None, num_queries: int = 4, k: int = 5,
                       seed: int = 0) -> RetrievalExamples:
    """Top-``k`` images of ``num_queries`` captions and top-``k`` captions of as many images.

    Args:
        image_features: (N_img, D) image features in dataset order.
        text_features: (N_txt, D) caption features in dataset order.
        text_to_image: (N_txt,) image index of each caption.
        positive_pairs: (P, 2) (image index, caption index) true matches, or None.
        num_queries: queries of each kind (at most the images, and the captions, there are).
        k: results per query.
        seed: draws the queries, so every epoch shows the same ones.

    Returns:
        The queries, their results and the marks of the results.
    """
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    rng = np.random.default_rng(seed)
    text_q = np.sort(rng.choice(n_txt, size=min(num_queries, n_txt), replace=False))
    image_q = np.sort(rng.choice(n_img, size=min(num_queries, n_img), replace=False))
    img, txt = image_features.float().cpu(), text_features.float().cpu()
    t2i = text_to_image.long().cpu()
    index = PositiveIndex()
    index.set_pairs(None if positive_pairs is None else positive_pairs.cpu(), n_txt)

    def marks(images: Tensor, captions: Tensor) -> np.ndarray:
        mark = torch.where(index.contains(images, captions), TRUE_MATCH, NO_MATCH)
        return torch.where(t2i[captions] == images, PAIRED, mark).numpy()

    text_res = topk_neighbours(txt[text_q], img, k)[1]  # (Q, k)
    image_res = topk_neighbours(img[image_q], txt, k)[1]  # (Q, k)
    text_q_t, image_q_t = torch.from_numpy(text_q), torch.from_numpy(image_q)
    return RetrievalExamples(
        text_q, text_res.numpy(), marks(text_res, text_q_t[:, None]),
        image_q, image_res.numpy(), marks(image_q_t[:, None], image_res),
    )
