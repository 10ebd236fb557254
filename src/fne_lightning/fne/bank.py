"""Memory bank of momentum features: a ring buffer of K slots (FNE_SPEC section 2).

FNE (Li et al., ACM MM 2023, arXiv 2308.04380) draws negatives from the momentum
features of the current batch followed by those of earlier batches kept here, MoCo-style:
every tensor is a registered buffer, so the bank follows the module across devices and
is saved in (and restored from) checkpoints, and the write is a ``@torch.no_grad()``
in-place copy.

Differences from the published code (FNE_SPEC sections 2 and 11): slots that were never
written are invalid (``valid_mask``) instead of holding random vectors, and any batch size
works (no ``K % B == 0`` assert; a batch larger than the bank keeps its last K rows).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MemoryBank(nn.Module):
    """Ring buffers of K momentum image and caption features of dimension D, with their ids.

    Every buffer is persistent (saved in checkpoints). A bank of size 0 is empty:
    :meth:`enqueue` does nothing and no slot is valid.
    """

    #: (K, D) float32 momentum image features.
    image_features: Tensor
    #: (K, D) float32 momentum caption features.
    text_features: Tensor
    #: (K,) long, the image index of each slot (-1 until written).
    image_ids: Tensor
    #: (K,) long, the caption index of each slot (-1 until written), for false-negative
    #: diagnostics.
    text_ids: Tensor
    #: () long, the next slot to write.
    ptr: Tensor
    #: () long, the number of slots holding data.
    filled: Tensor

    def __init__(self, size: int, dim: int) -> None:
        """Create an empty bank (every slot invalid).

        Args:
            size: the number of slots K (0 for no bank).
            dim: the feature dimension D.

        Raises:
            ValueError: ``size < 0`` or ``dim <= 0``.
        """
        super().__init__()
        if size < 0 or dim <= 0:
            raise ValueError(f"MemoryBank(size={size}, dim={dim}): expected size >= 0 and dim > 0")
        self.register_buffer("image_features", torch.zeros(size, dim))
        self.register_buffer("text_features", torch.zeros(size, dim))
        self.register_buffer("image_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("text_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """Number of slots K (a Python int, fixed at construction)."""
        return self.image_features.shape[0]

    def __len__(self) -> int:
        return self.size

    @torch.no_grad()
    def enqueue(
        self, image_features: Tensor, text_features: Tensor, image_ids: Tensor, text_ids: Tensor
    ) -> None:
        """Write a batch at the pointer, wrapping around; detached copies, no host sync.

        Under DDP pass the already gathered global batch
        (:func:`~fne_lightning.utils.distributed.gather_no_grad`) so every rank writes the same
        rows and all banks stay identical. Any B works; B > K keeps the last K rows, which is
        exactly what B sequential one-row writes would leave.

        Args:
            image_features: (B, D) momentum image features.
            text_features: (B, D) momentum caption features.
            image_ids: (B,) their image indices.
            text_ids: (B,) their caption indices.
        """
        k, b = self.size, image_features.shape[0]
        if k == 0 or b == 0:  # Python ints from shapes: no host sync.
            return
        start = b - min(b, k)  # rows [start, b) survive; earlier ones would be overwritten
        # Row j of the batch lands in slot (ptr + j) % K; pointer arithmetic stays on
        # the device so no `.item()` is needed. Slots are distinct since b - start <= K.
        slots = (self.ptr + torch.arange(start, b, device=self.ptr.device)) % k  # (min(B, K),)
        self.image_features.index_copy_(0, slots, image_features[start:].to(self.image_features))
        self.text_features.index_copy_(0, slots, text_features[start:].to(self.text_features))
        self.image_ids.index_copy_(0, slots, image_ids[start:].to(self.image_ids))
        self.text_ids.index_copy_(0, slots, text_ids[start:].to(self.text_ids))
        self.ptr.copy_((self.ptr + b) % k)
        self.filled.copy_((self.filled + b).clamp_(max=k))

    @torch.no_grad()
    def advance(self, n: int) -> None:
        """Move the pointer and the filled count as :meth:`enqueue` of ``n`` rows would, writing nothing.

        For steps whose features are overwritten before anyone reads them (the early warm-up
        steps, see :meth:`FNELoss.momentum_horizon
        <fne_lightning.losses.fne.FNELoss.momentum_horizon>`): the slots they would have written
        are written again before FNE starts, so the bank ends up exactly as if every step had
        been enqueued.

        Args:
            n: the rows the skipped write would have held.
        """
        k = self.size
        if k == 0 or n == 0:
            return
        self.ptr.copy_((self.ptr + n) % k)
        self.filled.copy_((self.filled + n).clamp_(max=k))

    def valid_mask(self) -> Tensor:
        """The slots that hold data, as a (K,) bool tensor.

        Writes start at slot 0 and advance contiguously, so before the first wrap-around
        the written slots are exactly [0, filled); afterwards all K are.
        """
        return torch.arange(self.size, device=self.filled.device) < self.filled

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.image_features.shape[1]}"
