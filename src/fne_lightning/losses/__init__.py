"""Losses of conf/loss/: the module-loss contract (base), in-batch VSE0/VSE++ (vse), FNE (fne),
InfoNCE and SigLIP with false-negative handling (contrastive)."""

from fne_lightning.losses.base import PosteriorView, RetrievalLoss
from fne_lightning.losses.contrastive import ContrastiveLoss, InfoNCELoss, SigLIPLoss
from fne_lightning.losses.fne import FNELoss
from fne_lightning.losses.vse import TripletLoss, VSELoss

__all__ = ["ContrastiveLoss", "FNELoss", "InfoNCELoss", "PosteriorView", "RetrievalLoss", "SigLIPLoss",
           "TripletLoss", "VSELoss"]
