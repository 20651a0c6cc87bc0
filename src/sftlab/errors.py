"""The one exception type whose message a user sees, and the friendly exit.

Why: a fine-tuning run is expensive, and a typo discovered as a 40-line traceback after
tokenizing is the most common way users lose time. Everything we can check up front raises
:class:`SftlabError` with one sentence that names the problem and the fix; the entry points
catch it, print that sentence, and exit non-zero without a traceback (unless
``HYDRA_FULL_ERROR=1``, the switch Hydra users already know).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_CODE = 2

F = TypeVar("F", bound=Callable)


class SftlabError(Exception):
    """An error caused by the user's input or configuration; its message is the whole story."""


class ConfigError(SftlabError):
    """A configuration value is invalid or does not fit the model or data."""


class DataError(SftlabError):
    """A data file is missing, malformed, or does not match the configuration."""


class TrainingError(SftlabError):
    """Training went wrong in a way the user can fix (a diverging loss, say)."""


def friendly_errors(fn: F) -> F:
    """Wrap an entry point so that an :class:`SftlabError` ends with one line and exit code 2.

    Hydra wraps exceptions of the task function in its own message and a traceback; we
    catch ours first, inside the task function, so the user sees only our sentence.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SftlabError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CODE)

    return wrapper  # type: ignore[return-value]


def checked(key: str, value: object, kind: type = float, lo: float | None = None,
            hi: float | None = None, *, lo_open: bool = False, hint: str = "",
            allow_none: bool = False, positive: bool = False):
    """``value`` as ``kind`` within ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), else one sentence.

    The one number check of the project: every config number a user can get wrong (an LR, a
    batch size, a layer count, a probability) goes through here, so the message always names
    the full key (``optimizer.lr``, ``strategy.trainable_layers``), what it must be and what it
    got. ``allow_none`` lets ``null`` through as ``None`` (an optional setting).
    """
    import math

    if positive:
        lo, lo_open = 0, True
    if value is None and allow_none:
        return None
    what = "an integer" if kind is int else "a number"
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        out = kind(value)
        if kind is int and out != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {what}, got {value!r}{'; ' + hint if hint else ''}.") from None
    bad = not math.isfinite(out) or (lo is not None and (out <= lo if lo_open else out < lo)) or (
        hi is not None and out > hi)
    if bad:
        if positive:
            rng = f"a positive {'integer' if kind is int else 'number'}"
        else:
            lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
            hi_s = "" if hi is None else f"<= {hi}"
            rng = " and ".join(s for s in (lo_s, hi_s) if s)
        raise ConfigError(f"{key} must be {rng}, got {value!r}{'; ' + hint if hint else ''}.")
    return out
