"""A training sampler and loader that resume exactly, mid-epoch included.

The order of each epoch is a function of (seed, epoch) only, as in ``DistributedSampler``
(which Lightning then leaves in place under DDP and tells the epoch), never of the global
RNG. The loader is *stateful* in Lightning's sense (``state_dict``/``load_state_dict``): a
checkpoint records the epoch and how many of its batches were trained, and a resumed run
skips exactly those, so N uninterrupted steps and N/2 + resume + N/2 steps see the same
batches in the same order. Worker seeds (random augmentation) come from the loader's
generator, seeded from (seed, epoch) when the loader is first iterated; persistent workers
keep them afterwards, so augmentation draws after a resume differ from an uninterrupted run
(the data order does not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffled per epoch from ``(seed, epoch)``; can skip the first batches of one epoch.

    Full batches only (``drop_last``), so every rank takes the same number of steps.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        """A ``DistributedSampler`` that shuffles and drops the last, ragged part.

        Args:
            dataset: the training pairs.
            batch_size: pairs per batch (to skip whole batches on resume).
            num_replicas: the number of processes (from the trainer; 1 in a single process).
            rank: this process's rank (0 in a single process).
            seed: the shuffle seed (the run's ``seed``).
        """
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self._skip: tuple[int, int] | None = None  # (epoch, batches already trained)

    def resume(self, epoch: int, batches: int) -> None:
        """Make the next iteration of ``epoch`` start after its first ``batches`` batches.

        Args:
            epoch: the epoch being resumed.
            batches: its batches already trained.
        """
        self.set_epoch(epoch)
        self._skip = (epoch, batches)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._skip is not None:
            epoch, batches = self._skip
            self._skip = None
            if epoch == self.epoch:
                indices = indices[batches * self.batch_size:]
        return iter(indices)


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints.

    Lightning calls :meth:`state_dict` when it saves a checkpoint and :meth:`load_state_dict`
    when it resumes from one.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, progress: Callable[[], tuple[int, int]],
                 **kwargs: Any) -> None:
        """A loader of full batches of ``sampler.batch_size``.

        Args:
            dataset: the training pairs.
            sampler: their sampler.
            progress: returns ``(epoch, batches trained in that epoch)`` from the training loop
                (the loader itself runs ahead of the loop by its prefetch, so it cannot count
                them).
            **kwargs: passed to ``DataLoader`` (``num_workers``, ``pin_memory``, ...).
        """
        super().__init__(dataset, sampler=sampler, batch_size=sampler.batch_size, drop_last=True,
                         generator=torch.Generator(), **kwargs)
        self.progress = progress

    def __iter__(self):
        # Worker seeds are drawn when workers start (the first iteration, with persistent ones).
        self.generator.manual_seed(self.sampler.seed * 100_003 + self.sampler.epoch)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        """The position to save, ``{"epoch": e, "batches": n}`` (batches trained in epoch e)."""
        epoch, batches = self.progress()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after the saved position (a whole epoch saved: the next epoch from its start).

        Args:
            state: what :meth:`state_dict` returned.
        """
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self.sampler.resume(epoch, batches)
