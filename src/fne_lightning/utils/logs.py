"""One quiet, single log for the entry points.

Hydra installs its console and file handlers on the root logger before the task runs; Lightning,
imported later, adds console handlers of its own to ``lightning``, ``lightning.pytorch`` and
``lightning.fabric``, so each of its lines would be printed twice. open_clip logs its tokenizer
and config look-ups at INFO on the root logger, matplotlib its font cache, Lightning its
advertising tips. :func:`configure_logging` routes everything through Hydra's handlers once and
shows INFO only from this package and Hydra itself (sweep progress) unless ``verbose``.
Warnings and errors of every library are always shown.
"""

from __future__ import annotations

import logging
import warnings

# Loggers whose INFO lines are the run's own progress.
OWN_LOGGERS = ("fne_lightning", "__main__", "hydra", "hydra_plugins")
# Console handlers that libraries attach to their own loggers at import time.
LIBRARY_HANDLER_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class QuietLibraries(logging.Filter):
    """Pass warnings and errors of everyone, and INFO/DEBUG of :data:`OWN_LOGGERS` only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.name.split(".")[0] in OWN_LOGGERS or record.name == "__main__"


def configure_logging(verbose: bool = False) -> None:
    """Route every library's log lines through Hydra's handlers once, quietly.

    Call once at the start of an entry point's task, after Hydra configured logging. Imports
    Lightning first so that its import-time handlers exist and can be removed here.

    Args:
        verbose: show INFO lines of every library, not only this package's and Hydra's.
    """
    import lightning  # noqa: F401  (its import adds the handlers removed below)

    for name in LIBRARY_HANDLER_LOGGERS:
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            lib.removeHandler(handler)
        lib.propagate = True  # to the root logger's (Hydra's) handlers: one line each
    root = logging.getLogger()
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, QuietLibraries)]:
            handler.removeFilter(old)
        if not verbose:
            handler.addFilter(QuietLibraries())
    if not verbose:
        # Raised inside Lightning with current torch at every fit; nothing a user can act on.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
