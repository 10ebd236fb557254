"""fne-lightning: image-text retrieval with False Negative Elimination on PyTorch Lightning."""

__version__ = "0.1.0"
