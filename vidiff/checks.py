"""The small value checks every layer shares: whole numbers, numbers, a clip size, a compute dtype, a config field's
one-line error, a JSON value's type in words.

The lowest layer, beside ``vidiff.io``: it imports nothing of vidiff, so
``data`` (which may import only ``io`` and this) and ``models`` use it too.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

# text.max_length's bounds, for a run and for loading its export (a run must not export a model `vidiff generate`
# refuses): BERT and MiniLM embed 512 positions, CLIP 77; T5 has no limit, but attends quadratically.
MAX_TEXT_TOKENS = 8192


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool (an int to Python, but never a count) nor a float (``int()`` would
    cut 5.9 to 5)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A Python int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_number(value) -> bool:
    """An int or float (not a bool, which is an int to Python) that is finite."""
    return is_number(value) and math.isfinite(value)


def config_int(value) -> bool:
    """A Python int, not a bool: unlike :func:`is_int`, no numpy int, which ``ConfigDict.to_json`` (a run's
    config saved with its checkpoints) cannot write."""
    return isinstance(value, int) and not isinstance(value, bool)


def height_width(size, field: str = "data.size") -> tuple[int, int]:
    """``(height, width)`` from ``size`` (an int side or a pair of ints), with a one-line error otherwise.

    The one reading of a size for every user of ``data.size``: strictly ints,
    since a string would iterate to digits ("64" -> 6x4) and a float would be
    cut silently.
    """
    if is_int(size):
        return int(size), int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(is_int(v) for v in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"{field}={size!r} is not a side or (height, width) of ints; "
                     f"e.g. {field}=64 or {field}=(48, 64)")


# What the VAE and the DiT compute in (VAEConfig.dtype, DiTConfig.dtype); their parameters keep their own dtype.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(value, backend: str | None = None) -> str:
    """``value``, one of :data:`COMPUTE_DTYPES` as a name or a numpy / jax dtype (``jnp.bfloat16``), as its name;
    else a one-line ``ValueError`` naming the valid ones. A name is taken only as written: numpy reads "float" as
    float64 and "f2" as float16. ``backend`` (``jax.default_backend()``): "cpu" refuses float16, which XLA:CPU's
    matmuls do not take (they fail mid-sampling with "precision 'F16_F16_F32' is not supported")."""
    if isinstance(value, str):
        name, shown = value, repr(value)
    else:
        try:
            name = shown = np.dtype(value).name
        except (TypeError, ValueError):
            name, shown = None, repr(value)
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype={shown} is not a compute dtype; use {', '.join(COMPUTE_DTYPES)}, or None to "
                         "compute as the model was trained")
    if name == "float16" and backend == "cpu":
        raise ValueError(f"dtype={shown} cannot compute on a CPU (XLA:CPU has no float16 matmul); use float32 or "
                         "bfloat16 there")
    return name


def field_checker(prefix: str, get: Callable[[str], Any]) -> Callable[[bool, str, str], None]:
    """``need(ok, field, fix)``: unless ``ok``, a one-line ``ValueError`` "<prefix>.<field>=<value> is invalid;
    <fix>", the value read with ``get(field)``."""

    def need(ok: bool, field: str, fix: str) -> None:
        if not ok:
            raise ValueError(f"{prefix}.{field}={get(field)!r} is invalid; {fix}")

    return need


def json_kind(value: Any) -> str:
    """What ``json.loads`` returned, in JSON's words ("object", "array", ...), for an error about a file's contents."""
    words = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return words.get(type(value), "number")
