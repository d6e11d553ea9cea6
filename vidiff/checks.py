"""The small value checks every layer shares: whole numbers, numbers, and a config field's one-line error.

The lowest layer, beside ``vidiff.io``: it imports nothing of vidiff, so
``data`` (which may import only ``io`` and this) and ``models`` use it too.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool (an int to Python, but never a count) nor a float (``int()`` would
    cut 5.9 to 5)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A Python int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def field_checker(prefix: str, get: Callable[[str], Any]) -> Callable[[bool, str, str], None]:
    """``need(ok, field, fix)``: unless ``ok``, a one-line ``ValueError`` "<prefix>.<field>=<value> is invalid;
    <fix>", the value read with ``get(field)``."""

    def need(ok: bool, field: str, fix: str) -> None:
        if not ok:
            raise ValueError(f"{prefix}.{field}={get(field)!r} is invalid; {fix}")

    return need
