"""Loading a config file: ``load_config`` reads a shipped config by name (``"world_tiny"``) or a file by path.

A config is a Python file with a ``get_config()`` that returns an ``ml_collections.ConfigDict``. The ones that
ship in the package (``vidiff/configs/``) are named by their file's stem (``--config world_tiny``; ``config_path``
says which file a name or path means); any other is given by its path (a copy of a shipped one, edited, is the
usual start). A file that cannot be loaded (missing,
not a ``.py`` file, a syntax error, an exception in ``get_config()``, which returns neither a ``ConfigDict`` nor a
dict) fails with one line naming the file (and
line); the overrides (``--config.dit.overrides.depth=4``) are set and checked in ``vidiff.train.overrides``.
``check_fields`` (run by ``vidiff.train.config.validate``) refuses a field the code does not read (a typo in
the file: ``sample.guidence``), naming the field it likely meant, and a field a run reads that is missing;
``field_default`` says what a run reads for a known field the file leaves out, so the command line may set it
(``known_section``: in a section the file leaves out too).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import traceback
from pathlib import Path
from typing import Sequence

import ml_collections

from vidiff.train.overrides import apply_overrides, did_you_mean

# The configs that ship in the package, each loadable by name.
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The fields check_fields knows by name, per section ("" is the top level; the stages', their optim's and
# vae_loss's come from train_stage and VAELossConfig). mesh, data (and a stage's data), distributed,
# dit_train.condition and the models' overrides refuse unknown fields where they are read.
TOP_LEVEL = ("workdir", "seed", "mesh", "data", "text", "vae", "vae_loss", "dit", "flow", "vae_train", "dit_train",
             "eval", "sample", "distributed")
SECTIONS = {"text": ("encoder", "max_length", "batch_size"), "flow": ("timestep_sampler", "shift", "weighting"),
            "eval": ("num_clips", "split", "num_frames"), "sample": ("prompts", "steps", "sampler", "guidance"),
            "vae": ("preset", "overrides"), "dit": ("preset", "overrides")}
# A stage's own fields, beside those train_stage writes for both models.
STAGE_FIELDS = {"vae": ("data", "stats_batches"), "dit": ("data", "latents", "cache_clips", "condition")}
# The train_stage fields a run reads only with a default; every other one must be there.
_STAGE_OPTIONAL = ("profile", "init_on", "init_from")


def _sample_defaults() -> dict:
    from vidiff.diffusion.samplers import SAMPLE_DEFAULTS

    return SAMPLE_DEFAULTS


# What a run reads for a field of SECTIONS that the file leaves out, where it has a default (field_default).
_SECTION_DEFAULTS = {"text": lambda: {"batch_size": 1}, "eval": lambda: {"split": "eval"}, "sample": _sample_defaults}


def load_config(path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Import ``path``, call its ``get_config()`` and apply ``overrides`` (``--config.a.b=v`` or ``a.b=v``).

    ``path`` is a config file, or the name of one shipped in ``vidiff/configs/`` (``"world_tiny"``)."""
    path = config_path(path)
    if path.is_dir():
        raise ValueError(f"config {path} is a directory; pass a config file, or a name: {_shipped_names()}")
    if not path.is_file():
        shipped = f"; the shipped configs are named {_shipped_names()}"
        if (SHIPPED_CONFIGS / path.name).is_file():  # e.g. experiments/configs/world_tiny.py, where it used to be
            shipped = f"; it ships in the package: --config {path.stem}"
        raise FileNotFoundError(f"config file {path} does not exist{shipped}")
    if path.suffix != ".py":
        # importlib finds no loader for other suffixes (spec is None); say what a config is instead.
        raise ValueError(f"config file {path} is not a Python file; a vidiff config is a .py file with a "
                         f"get_config() function (see {SHIPPED_CONFIGS / 'world_tiny.py'})")
    spec = importlib.util.spec_from_file_location(f"vidiff_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with _config_errors(path):
        spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config() function")
    with _config_errors(path):
        config = module.get_config()
    if isinstance(config, dict):  # a plain dict says the same: made a ConfigDict as the rest expects
        config = ml_collections.ConfigDict(config)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"{path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict; "
                         f"return the config (see {SHIPPED_CONFIGS / 'world_tiny.py'})")
    apply_overrides(config, overrides)
    return config


def check_fields(config, model: str) -> None:
    """Each section's fields by name: one the code does not read is a typo that would be ignored (or fail late,
    deep inside a library), one that a ``model`` run reads and is missing a late ``AttributeError``."""
    from vidiff.train.config import train_stage  # here: vidiff.train.config imports this module

    stage = train_stage(1, 1.0)
    known = _known_fields(stage)
    for path, fields in known.items():
        for field in _section(config, path) or ():
            if field not in fields:
                owner = f"{path}'s fields" if path else "the top level's fields"
                raise ValueError(f"config field {'.'.join(filter(None, [path, str(field)]))} is unknown"
                                 f"{did_you_mean(field, fields, path) or '; remove it'} ({owner}: "
                                 f"{', '.join(sorted(fields))})")
    for path, fields in _required(config, model, stage).items():
        section = config if not path else _section(config, path)
        if section is None:
            parent, _, leaf = path.rpartition(".")
            raise ValueError(f"config field {path}={_section(config, parent)[leaf]!r} is not a section; make it a "
                             f"dict with {', '.join(known[path])}")
        if missing := [f for f in fields if f not in section]:
            where = ".".join(filter(None, [path, missing[0]]))
            raise ValueError(f"config field {where} is missing; a {model} run reads it: add it to the config file "
                             f"(docs/configs.md lists every field)")


def _known_fields(stage) -> dict[str, tuple]:
    """``{section: fields}`` of the sections whose field names are checked (``stage``: ``train_stage``'s)."""
    from vidiff.models.vae_losses import VAELossConfig

    known = {"": TOP_LEVEL, **SECTIONS, "vae_loss": tuple(f.name for f in dataclasses.fields(VAELossConfig))}
    for name, own in STAGE_FIELDS.items():
        known.update({f"{name}_train": (*stage, *own), f"{name}_train.optim": tuple(stage.optim),
                      f"{name}_train.profile": tuple(stage.profile)})
    return known


def known_section(path: str) -> bool:
    """Whether ``path`` is a section whose field names are checked (so a file that leaves it out may have it
    created by an override of one of its fields)."""
    from vidiff.train.config import train_stage  # here: vidiff.train.config imports this module

    return bool(path) and path in _known_fields(train_stage(1, 1.0))


def field_default(section: str, field: str, missing):
    """What a run reads for ``section.field`` when the config file leaves it out (an older file, written before
    the field existed): the value ``train_stage`` or ``VAELossConfig`` gives it, else None (a field without a
    default here); ``missing`` when ``section`` has no such field, or is the top level (whose fields are sections).
    The command line may set such a field: its default's type is the type an override must have."""
    from vidiff.models.vae_losses import VAELossConfig
    from vidiff.train.config import train_stage  # here: vidiff.train.config imports this module

    stage = train_stage(1, 1.0)
    if not section or field not in _known_fields(stage).get(section, ()):
        return missing
    if section == "vae_loss":
        return getattr(VAELossConfig(), field)
    if section in _SECTION_DEFAULTS:
        return _SECTION_DEFAULTS[section]().get(field)
    node = stage
    for part in section.split(".")[1:]:  # <model>_train.optim / .profile: train_stage's own sections
        node = node[part]
    value = node.get(field) if section.endswith("_train") or "." in section else None
    return None if isinstance(value, ml_collections.ConfigDict) else value


def _required(config, model: str, stage) -> dict[str, tuple]:
    """``{section: fields}`` that a ``model`` run reads without a default (the sections in the order they are
    read: a missing section is named before its fields)."""
    name = f"{model}_train"
    required = {"": ("workdir", "seed", "mesh", "data", "vae", name), "vae": ("preset", "overrides"),
                name: tuple(f for f in stage if f not in _STAGE_OPTIONAL), f"{name}.optim": tuple(stage.optim)}
    if model == "vae":
        required[""] += ("vae_loss",)
        required[name] += ("stats_batches",)  # the latent statistics after the last step read it
        if (_section(config, name) or {}).get("eval_every"):  # the validation clips
            required = {**required, "": (*required[""], "eval"), "eval": ("num_clips",)}
    else:
        required[""] += ("text", "dit", "flow")
        required.update(text=("encoder", "max_length"), flow=SECTIONS["flow"], dit=("preset", "overrides"))
        if (_section(config, name) or {}).get("eval_every"):  # the preview clips' prompts (the rest has defaults)
            required = {**required, "": (*required[""], "sample"), "sample": ("prompts",)}
    return required


def _section(config, path: str):
    """The section at dotted ``path`` ("" the top level), or None where it is missing or no section."""
    node = config
    for part in filter(None, path.split(".")):
        node = node.get(part) if isinstance(node, (dict, ml_collections.ConfigDict)) else None
    return node if isinstance(node, (dict, ml_collections.ConfigDict)) else None


def config_path(name_or_path) -> Path:
    """The file ``--config`` names: a shipped config's name (no folder, no suffix) is its file in
    ``vidiff/configs/``; anything else is a path."""
    text = str(name_or_path)
    shipped = SHIPPED_CONFIGS / f"{text}.py"
    if "/" not in text and "\\" not in text and not Path(text).suffix and text != "__init__" and shipped.is_file():
        return shipped
    return Path(name_or_path)


def _shipped_names() -> str:
    return ", ".join(p.stem for p in sorted(SHIPPED_CONFIGS.glob("*.py")) if p.stem != "__init__")


class _config_errors:
    """Turns an exception raised by a config file into one line naming ``file:line``.

    The file is user input: a typo in it is the user's mistake, not a vidiff bug,
    so no traceback into importlib (and for a shipped config, no advice to edit it).
    """

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, Exception):
            return False
        if isinstance(error, SyntaxError):
            where = f"{error.filename or self.path}:{error.lineno}"
            raise ValueError(f"{where}: syntax error in the config file: {error.msg}; fix that line") from None
        # The innermost frame inside the config file is the line to fix.
        frames = [f for f in traceback.extract_tb(tb) if Path(f.filename).resolve() == self.path.resolve()]
        where = f"{self.path}:{frames[-1].lineno}" if frames else str(self.path)
        # A shipped config is not the user's to fix: what it raised says what is missing (a package, a file).
        fix = "" if self.path.resolve().parent == SHIPPED_CONFIGS.resolve() else "; fix the config file"
        raise ValueError(f"{where}: loading the config file raised {type(error).__name__}: {error}{fix}") from None
