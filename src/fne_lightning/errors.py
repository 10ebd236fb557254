"""User-facing errors.

Anything the user can fix (a config value, a missing file, unavailable weights) raises
:class:`FNEError` with one line that names the key or file and what was expected. The entry
points print that line and exit non-zero without a traceback; everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


class FNEError(Exception):
    """An error in the user's input: reported as one line, exit code 2, no traceback."""


def check(condition: bool, key: str, expected: str, value: Any) -> None:
    """Raise ``FNEError("<key>=<value>: expected <expected>")`` unless ``condition``.

    Args:
        condition: what must hold.
        key: the config key (or file) the value comes from, e.g. ``loss.margin``.
        expected: what was expected, e.g. ``a value >= 0``.
        value: the value given.

    Raises:
        FNEError: ``condition`` is false.
    """
    if not condition:
        raise FNEError(f"{key}={value!r}: expected {expected}")


def number(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool, not a string): guard a range check with it,
    ``check(number(x) and x > 0, ...)``, so that ``loss.tau=high`` is one error line, not a
    ``TypeError`` from the comparison."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextlib.contextmanager
def report_user_errors(exit_code: int = 2) -> Iterator[None]:
    """Context manager: turn an :class:`FNEError` into one ``error: ...`` line on stderr and an exit.

    Other exceptions pass through with their traceback.

    Args:
        exit_code: the exit status of a user error.
    """
    try:
        yield
    except Exception as err:
        # hydra.utils.instantiate wraps errors raised by a target: look through the chain.
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr, flush=True)
        sys.exit(exit_code)


def user_error(err: BaseException | None) -> FNEError | None:
    """The :class:`FNEError` behind ``err`` (itself or a cause of it), if any.

    Hydra wraps errors raised by a target, so the chain of causes is searched. A config value
    left ``???`` (mandatory, e.g. ``data.annotations`` of ``data=karpathy``) is a user error
    too.

    Args:
        err: the exception raised, or None.
    """
    from omegaconf.errors import MissingMandatoryValue

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, FNEError):
            return err
        if isinstance(err, MissingMandatoryValue) and getattr(err, "full_key", None):
            return FNEError(f"{err.full_key}: expected a value, none given (??? in the config: required); "
                            f"give {err.full_key}=...")
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
