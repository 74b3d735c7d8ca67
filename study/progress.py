"""Progress bars that behave the same in every stage, on a terminal and in a log.

On a terminal a bar redraws in place, at most every ``mininterval`` seconds (0.1 s unless the caller asks for less
often). In a log (stderr is not a terminal: under ``dvc repro``, a Prefect worker, CI) every redraw is a new line, so
the bar redraws at most every :data:`LOG_INTERVAL_S` seconds: a few lines a minute instead of thousands.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

LOG_INTERVAL_S = 30.0


def bar(iterable: Iterable[T], **kwargs: Any) -> Iterable[T]:
    """``tqdm(iterable, **kwargs)`` (on stderr, resizing with the terminal) with the redraw interval of this module."""
    from tqdm import tqdm

    interval = kwargs.pop("mininterval", 0.1)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, mininterval=interval if sys.stderr.isatty() else LOG_INTERVAL_S, **kwargs)
