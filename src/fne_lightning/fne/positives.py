"""Which (image, caption) pairs truly match, for false-negative diagnostics (FNE_SPEC section 10).

The pairs of a split's ``.positives.json`` are kept as sorted int64 keys
``image * num_texts + caption``; a membership test is one ``searchsorted``: vectorised, on
the training device, no host sync, and small enough for COCO-scale annotation files.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PositiveIndex(nn.Module):
    """Membership test for truly matching (image index, caption index) pairs."""

    def __init__(self) -> None:
        super().__init__()
        # Not persistent: it is data of the dataset, rebuilt from the annotations at setup.
        self.register_buffer("keys", torch.empty(0, dtype=torch.long), persistent=False)
        self.num_texts = 0

    @property
    def available(self) -> bool:
        return self.keys.numel() > 0

    def set_pairs(self, pairs: Tensor | None, num_texts: int) -> None:
        """``pairs``: (P, 2) LongTensor of (image index, caption index); None clears it."""
        if pairs is None or pairs.numel() == 0:
            self.keys = torch.empty(0, dtype=torch.long, device=self.keys.device)
            self.num_texts = 0
            return
        pairs = pairs.to(self.keys.device, torch.long)
        self.num_texts = int(num_texts)
        self.keys = torch.unique(pairs[:, 0] * self.num_texts + pairs[:, 1])  # sorted

    def contains(self, image_ids: Tensor, text_ids: Tensor) -> Tensor:
        """Bool tensor (broadcast shape of the inputs): does each pair truly match?

        Unknown ids (negative, e.g. never-written bank slots) are never positives.
        """
        if not self.available:
            return torch.zeros(torch.broadcast_shapes(image_ids.shape, text_ids.shape),
                               dtype=torch.bool, device=image_ids.device)
        query = image_ids.long() * self.num_texts + text_ids.long()
        pos = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
        return (self.keys[pos] == query) & (image_ids >= 0) & (text_ids >= 0)
