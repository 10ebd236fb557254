"""Retrieval: exact ranking metrics (functions), the published protocols computed on the same
scores, the torchmetrics Metric that accumulates features for them, retrieval examples and the
figures of FNE at work."""

from fne_lightning.retrieval.metric import RetrievalMetric
from fne_lightning.retrieval.protocols import EccvProtocol, QuerySet, protocol_scores
from fne_lightning.retrieval.ranking import coco_1k_scores, retrieval_scores, topk_neighbours

__all__ = ["EccvProtocol", "QuerySet", "RetrievalMetric", "coco_1k_scores", "protocol_scores", "retrieval_scores",
           "topk_neighbours"]
