"""Losses of conf/loss/: the module-loss contract (base), in-batch VSE0/VSE++ (vse), FNE (fne)."""

from fne_lightning.losses.base import PosteriorView, RetrievalLoss
from fne_lightning.losses.fne import FNELoss
from fne_lightning.losses.vse import TripletLoss, VSELoss

__all__ = ["FNELoss", "PosteriorView", "RetrievalLoss", "TripletLoss", "VSELoss"]
