"""Small ``torch.distributed`` helpers that degrade to no-ops in a single process.

FNE (Li et al., ACM MM 2023, arXiv 2308.04380) under DDP needs two collectives
(FNE_SPEC sections 2 and 4): every rank gathers the global batch of momentum features
before writing it to the memory bank, so all ranks hold the same bank (MoCo's
``concat_all_gather``), and the per-rank similarity moments are gathered and merged so
the Gaussians are the ones of the global batch. Neither needs a gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks, 1 without an initialised process group."""
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, in rank order, without gradient.

    Args:
        tensor: (n, ...) with the SAME shape and dtype on every rank (``all_gather`` requires
            it; pad beforehand if local batches can differ, e.g. a ragged last batch without
            ``drop_last``).

    Returns:
        (world_size * n, ...); in a single process ``tensor.detach()`` (same storage, no copy).
    """
    if not is_distributed():
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    # `all_gather` into a list works on both gloo and nccl (`all_gather_into_tensor`
    # is not implemented by every backend).
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def gather_with_local_grad(tensor: Tensor) -> Tensor:
    """Like :func:`gather_no_grad`, but this rank's rows keep their gradient (open_clip style).

    The other ranks' rows are constants here; each rank back-propagates through its own
    rows, and DDP's gradient averaging combines the ranks. Identity in a single process.

    Args:
        tensor: (n, ...) of the same shape on every rank.

    Returns:
        (world_size * n, ...).
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts, dim=0)


def rank() -> int:
    """This process's rank, 0 without an initialised process group."""
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, with the gradient flowing back to every rank.

    The backward pass sums each rank's gradient for a row into the rank that owns it
    (``torch.distributed.nn.functional.all_gather``, open_clip's ``gather_with_grad``). With a
    loss that each rank computes over its local anchors against the gathered candidates, DDP's
    gradient averaging then gives exactly the gradient of one process over the global batch
    (the contrastive losses rely on it). Identity in a single process.

    Args:
        tensor: (n, ...) of the same shape on every rank.

    Returns:
        (world_size * n, ...).
    """
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


@torch.no_grad()
def any_rank(flag: Tensor) -> Tensor:
    """True on every rank if ``flag`` is True on any rank; identity in one process.

    Args:
        flag: a 0-d bool tensor.
    """
    if not is_distributed():
        return flag
    value = flag.to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value[0].bool()


@torch.no_grad()
def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor, no gradient); a detached copy in one process.

    Args:
        tensor: the same shape on every rank.
    """
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
