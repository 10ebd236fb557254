"""Retrieval: exact ranking metrics (functions), the torchmetrics Metric that accumulates features
for them, retrieval examples and the figures of FNE at work."""

from fne_lightning.retrieval.metric import RetrievalMetric
from fne_lightning.retrieval.ranking import coco_1k_scores, retrieval_scores, topk_neighbours

__all__ = ["RetrievalMetric", "coco_1k_scores", "retrieval_scores", "topk_neighbours"]
