"""Learning-rate schedules stepped every optimizer step (``optim.interval: step``).

CLIP fine-tunes warm the learning rate up linearly, then decay it along a cosine to 0 over the
run (open_clip's ``cosine_lr``; the CLIP_ITM baseline, Li 2023, ``conf/optim/adamw_cosine.yaml``).
The run's number of optimizer steps is known only once the data is: the module passes it as
``total_steps`` (``trainer.estimated_stepping_batches``).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from fne_lightning.errors import check


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 500) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then a cosine from the base rate to 0.

    Args:
        optimizer: the optimizer whose learning rates it scales.
        total_steps: optimizer steps of the whole run (the module passes it).
        warmup_steps: steps of the linear warm-up (``optim.scheduler.warmup_steps``).

    Returns:
        A ``LambdaLR`` to step after every optimizer step.

    Raises:
        FNEError: a negative ``warmup_steps`` or fewer than one step in all.
    """
    check(isinstance(warmup_steps, int) and warmup_steps >= 0, "optim.scheduler.warmup_steps", "an integer >= 0",
          warmup_steps)
    check(total_steps >= 1, "optim.scheduler (total_steps)", "a run of at least one optimizer step", total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
