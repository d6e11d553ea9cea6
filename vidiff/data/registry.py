"""Data sources by name: what ``data.source`` may say, how each builds its records, which fields point at its data.

A source is registered once per process, from anywhere that runs before the
pipeline is built (a training config file, a module it imports)::

    import vidiff.data

    def build(config, split, ledger):      # a DataConfig, "train" / "eval" / ..., the SkipLedger
        return PngClips(config.png_dir, split)  # random access: __len__ / __getitem__ -> records (or Skips)

    vidiff.data.register_source("png_dir", build, fields=("png_dir",))

after which ``data.source = "png_dir"`` and ``data.png_dir = ...`` are valid
data fields and ``vidiff train`` reads those records. ``fields`` are the
data fields that say where the source's records are: a ``DataConfig``
accepts them (``config.png_dir``, None when unset), and ``vidiff train``
refuses them with another source (``vidiff.train.config.SOURCE_FIELDS``).

This module imports no data package (naming the sources needs no grain); the
built-in builders live in ``vidiff.data.pipeline`` and load on first use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping


@dataclasses.dataclass(frozen=True)
class Source:
    """A registered ``data.source``.

    ``build(config, split, ledger)`` returns a random-access sequence of items;
    ``first_stage(config)`` returns the grain ``RandomMapTransform`` that cuts an
    item to its bucket, None for records cut by ``BucketWindow`` (what a user
    source gives: whole clips as ``make_record`` makes them).
    """

    name: str
    build: Callable[[Any, str, Any], Any]
    fields: tuple[str, ...] = ()
    first_stage: Callable[[Any], Any] | None = None


_SOURCES: dict[str, Source] = {}


def register_source(name: str, build: Callable[[Any, str, Any], Any], *, fields=(), first_stage=None) -> Source:
    """Make ``data.source = name`` build its records with ``build(config, split, ledger)``.

    ``fields`` are the new data fields naming where the records are. Registering
    a name again replaces that source (a config file loaded twice), but not a
    built-in one: a one-line ``ValueError`` names what clashes.
    """
    fields = (fields,) if isinstance(fields, str) else tuple(fields)
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"register_source: name {name!r} is not a name; use an identifier such as 'png_dir'")
    if name in _BUILT_IN:
        raise ValueError(f"register_source: data.source={name!r} is built in; register yours under another name")
    if not callable(build):
        raise ValueError(f"register_source({name!r}): build={build!r} is not callable; pass a function "
                         f"(config, split, ledger) -> records")
    others = {field: source.name for source in _SOURCES.values() if source.name != name for field in source.fields}
    for field in fields:
        if not (isinstance(field, str) and field.isidentifier()):
            raise ValueError(f"register_source({name!r}): field {field!r} is not a name; use an identifier")
        if field in others or field in _data_config_fields():
            whose = f"data.source={others[field]!r} reads it" if field in others else "a DataConfig field"
            raise ValueError(f"register_source({name!r}): data.{field} is taken ({whose}); name yours another way")
    source = Source(name, build, fields, first_stage)
    _SOURCES[name] = source
    return source


def get_source(name: str) -> Source:
    """The source registered as ``name``; a one-line ``ValueError`` listing the registered names otherwise."""
    if name not in _SOURCES:
        raise ValueError(f"data.source={name!r} is invalid; {source_hint()}")
    return _SOURCES[name]


def source_names() -> tuple[str, ...]:
    """The registered names, the built-in ones first."""
    return tuple(_SOURCES)


def source_hint() -> str:
    """What to set ``data.source`` to: the registered names, and how to add one."""
    return f"use one of {', '.join(_SOURCES)}, or register yours with vidiff.data.register_source"


class _FieldSources(Mapping):
    """``{data field: the source that reads it}`` over the sources registered now (not at import)."""

    def _table(self) -> dict[str, str]:
        return {field: source.name for source in _SOURCES.values() for field in source.fields}

    def __getitem__(self, field: str) -> str:
        return self._table()[field]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table())


FIELD_SOURCES: Mapping[str, str] = _FieldSources()


def _data_config_fields() -> set[str]:
    # Only a registration needs them: DataConfig's module imports grain, which naming the sources does not.
    from vidiff.data.config import DataConfig

    return {field.name for field in dataclasses.fields(DataConfig)}


def _from_pipeline(function: str) -> Callable:
    """A built-in builder, imported from ``vidiff.data.pipeline`` (grain) when first called."""
    def call(*args):
        from vidiff.data import pipeline

        return getattr(pipeline, function)(*args)
    call.__name__ = call.__qualname__ = function
    return call


_SOURCES.update({
    "world": Source("world", _from_pipeline("build_world")),
    "folder": Source("folder", _from_pipeline("build_folder"), ("manifest", "video_dir"),
                     first_stage=_from_pipeline("folder_first_stage")),
    "array_record": Source("array_record", _from_pipeline("build_array_record"), ("array_record_path",)),
    "tfds": Source("tfds", _from_pipeline("build_tfds"), ("tfds_name", "tfds_data_dir")),
})
_BUILT_IN = tuple(_SOURCES)
