"""Named model configs: a preset's fields with a caller's overrides, checked.

The VAE and the DiT keep frozen dataclass configs, which jit takes as static arguments, so every
field must hash. Overrides arrive from Python, from ml_collections configs and from exported
``vidiff.json`` files; JSON has no tuples, so each config's ``__post_init__`` turns its lists back
into tuples: a config built directly from JSON, without a preset, must hash too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

Config = TypeVar("Config")


def from_preset(config_class: type[Config], presets: Mapping[str, Any], name: str, overrides: Mapping[str, Any],
                model: str) -> Config:
    """``presets[name]`` (a config or a dict of fields) with ``overrides`` replacing fields of ``config_class``."""
    if name not in presets:
        raise ValueError(f"unknown {model} preset {name!r}; valid presets: {', '.join(presets)}")
    fields = {f.name for f in dataclasses.fields(config_class)}
    if unknown := sorted(set(overrides) - fields):
        raise ValueError(f"unknown {config_class.__name__} field(s) {unknown}; "
                         f"valid fields: {', '.join(sorted(fields))}")
    base = presets[name]
    base = dataclasses.asdict(base) if dataclasses.is_dataclass(base) else dict(base)
    return config_class(**{**base, **overrides})
