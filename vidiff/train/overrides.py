"""Command-line overrides of a config: ``--config.a.b=value`` set in place, checked (an unknown path gets
the name it likely meant; a wrong type, a whole section, a value through ``None`` or a new preset that the
file's model overrides would shadow is refused in one line), and remembered, so a run can say when a training
stage's own ``data`` replaces one."""
from __future__ import annotations

import ast
import dataclasses
import difflib
from typing import Sequence

import ml_collections

# Fields whose documented values have two types, so an override may switch from the config file's type to the
# other: data.size (a side or a (height, width) pair, also as a stage's own vae_train.data.size) and flow.shift
# (a number or "auto"). Matched by path, so another section's `size` or `shift` keeps its type.
_EITHER_TYPE = {".data.size": (int, list, tuple), ".flow.shift": (int, float, str)}
# apply_overrides notes {dotted path: value} here, an attribute of the ConfigDict and not a field (no checkpoint
# or export records it), so the loop can say when a stage's own data replaces an override of data.
_OVERRIDDEN = "_vidiff_overridden"
_MISSING = object()
_MODELS = ("vae", "dit")  # the sections with a preset and overrides


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Set ``a.b.c=value`` entries in place, refusing unknown paths and wrong types, and a new preset whose
    fields the config file's own overrides would keep (``_check_preset_changes``)."""
    from vidiff.train.config_file import field_default, known_section  # here: config_file imports this module

    presets = {model: (config[model].get("preset"), None) for model in _MODELS
               if isinstance(config.get(model), ml_collections.ConfigDict)}
    for item in overrides:
        text = item[len("--config."):] if item.startswith("--config.") else item.lstrip("-")
        if "=" not in text:
            raise ValueError(f"override {item!r} needs the form --config.field=value")
        dotted, raw = text.split("=", 1)
        parent, _, leaf = dotted.rpartition(".")
        node, sections = config, [p for p in parent.split(".") if p]
        old = _MISSING
        for depth, part in enumerate([*sections, leaf]):
            if node is None:  # an optional section left unset can only be given whole
                where = ".".join(sections[:depth])
                raise ValueError(f"override {item!r}: {where} is None, not a section; set it whole, e.g. "
                                 f"--config.{where}=\"{{'{part}': ...}}\"")
            if depth == len(sections) and isinstance(node, ml_collections.ConfigDict) and part not in node:
                old = _preset_value(config, sections, part, item)  # a model field the file leaves to the preset
                if old is _MISSING:  # a field with a default that an older config file does not spell out
                    old = field_default(".".join(sections), part, _MISSING)
            if depth < len(sections) and isinstance(node, ml_collections.ConfigDict) and part not in node \
                    and known_section(".".join(sections[:depth + 1])):
                with node.unlocked():  # a section an older config file leaves out (a stage's profile)
                    node[part] = ml_collections.ConfigDict()
            if old is _MISSING and (not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node):
                raise ValueError(f"override {item!r}: config has no field {dotted!r}"
                                 f"{_did_you_mean(config, node, [*sections, leaf], depth)}")
            node = node[part] if depth < len(sections) else node
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        old = node[leaf] if old is _MISSING else old
        if isinstance(old, ml_collections.ConfigDict) and value is not None:
            # A dict would replace the section's fields with the few it names; the command line sets fields.
            raise ValueError(f"override {item!r}: {dotted} is a section; the command line cannot replace a whole "
                             f"section, set its fields one by one (--config.{dotted}.<field>=...)")
        types = next((types for suffix, types in _EITHER_TYPE.items() if f".{dotted}".endswith(suffix)), ())
        either = bool(types) and all(isinstance(v, types) and not isinstance(v, bool) for v in (old, value))
        if (isinstance(old, float) or (either and float in types)) and isinstance(value, int) \
                and not isinstance(value, bool):
            value = float(value)
        sequences = (list, tuple)
        if isinstance(value, bool) and isinstance(old, int) and not isinstance(old, bool):  # True is an int too
            raise ValueError(f"override {item!r}: {dotted} is an int, got bool")
        if old is not None and value is not None and not isinstance(value, type(old)) and not (
            isinstance(old, sequences) and isinstance(value, sequences)
        ) and not either:
            raise ValueError(f"override {item!r}: {dotted} is a {type(old).__name__}, got {type(value).__name__}")
        with node.ignore_type(), node.unlocked():
            node[leaf] = value
        object.__setattr__(config, _OVERRIDDEN, {**overridden(config), dotted: value})
        if dotted in (f"{m}.preset" for m in presets):
            presets[sections[0]] = (presets[sections[0]][0], item)
    _check_preset_changes(config, presets)
    return config


def _check_preset_changes(config, presets: dict) -> None:
    """Refuse a preset changed on the command line whose fields the config file's own overrides still set.

    ``dit_preset(preset, **overrides)`` lets the overrides win, so world_tiny's depth, width and heads made
    ``--config.dit.preset=XL`` train and export its 4 x 128 DiT labelled XL, silently. ``vidiff plan --preset``
    drops the file's overrides; here each such field must say where it comes from: the preset or the command line.
    """
    given = overridden(config)
    for model, (before, item) in presets.items():
        preset = config[model].get("preset")
        if item is None or _same(preset, before):
            continue
        changed = _preset_changes(model, before, preset)
        file_set = dict(config[model].get("overrides") or {})
        kept = [f for f in changed if f in file_set and f"{model}.overrides.{f}" not in given
                and not _same(file_set[f], changed[f])]
        if kept:
            show = lambda values: ", ".join(f"{f}={values[f]!r}" for f in kept)  # noqa: E731
            # No spaces in a flag: "(True, False)" would split into two shell words.
            flags = " ".join(f"--config.{model}.overrides.{f}={changed[f]!r}".replace(" ", "") for f in kept)
            raise ValueError(f"override {item!r}: the config file's {model}.overrides set {show(file_set)} over "
                             f"{preset}'s own {show(changed)}, so the model would not be {preset}; give them on the "
                             f"command line too ({flags} to take {preset}'s) or remove them from the file")


def _preset_changes(model: str, before, after) -> dict:
    """``{field: value}`` of preset ``after`` where it differs from preset ``before`` (every field when ``before``
    is unknown); ``{}`` when ``after`` is unknown, which building the model names."""
    from vidiff.models.dit import dit_preset
    from vidiff.models.vae import vae_preset

    build = {"vae": vae_preset, "dit": dit_preset}[model]
    try:
        new = dataclasses.asdict(build(after))
    except (ValueError, TypeError):
        return {}
    try:
        old = dataclasses.asdict(build(before))
    except (ValueError, TypeError):
        old = {}
    return {field: value for field, value in new.items() if field not in old or not _same(old[field], value)}


def keep_overridden(source, copy):
    """``copy`` with ``source``'s noted overrides (an attribute, which ``ConfigDict`` copies drop)."""
    object.__setattr__(copy, _OVERRIDDEN, overridden(source))
    return copy


def overridden(config) -> dict:
    """``{dotted path: value}`` of the overrides ``apply_overrides`` set on ``config`` (kept by ``for_stage``)."""
    return getattr(config, _OVERRIDDEN, {})


def _model_fields(sections: list[str]) -> set[str]:
    """The fields of the model config that ``sections`` (``vae.overrides`` / ``dit.overrides``) sets, else none."""
    if len(sections) != 2 or sections[1] != "overrides" or sections[0] not in ("vae", "dit"):
        return set()
    from vidiff.models.dit import DiTConfig
    from vidiff.models.vae import VAEConfig

    return {f.name for f in dataclasses.fields({"vae": VAEConfig, "dit": DiTConfig}[sections[0]])}


def _preset_value(config, sections: list[str], field: str, item: str):
    """The preset's value of a model ``field`` the config file's overrides leave unset (the type an override of it
    must have); ``_MISSING`` when ``sections.field`` is no model field."""
    if field not in _model_fields(sections):
        return _MISSING
    from vidiff.models.dit import dit_preset
    from vidiff.models.vae import vae_preset

    model = sections[0]
    try:
        return getattr({"vae": vae_preset, "dit": dit_preset}[model](config[model].get("preset")), field)
    except (ValueError, TypeError) as e:  # the preset's name is wrong: say so, not that the field is unknown
        raise ValueError(f"override {item!r}: {e}") from None


def did_you_mean(name: str, known, section: str = "") -> str:
    """``"; did you mean <section>.<field>?"``: the field of ``known`` closest to a misspelt ``name``; else ``""``."""
    close = difflib.get_close_matches(str(name), sorted(map(str, known)), n=1)
    return f"; did you mean {'.'.join(filter(None, [section, close[0]]))}?" if close else ""


def one_of(value, names) -> str:
    """The fix for a value not in ``names``: use one of them, and the one a misspelt ``value`` likely meant."""
    close = difflib.get_close_matches(value, names, n=1) if isinstance(value, str) else []
    return f"use one of {', '.join(names)}{f' (did you mean {close[0]!r}?)' if close else ''}"


def _did_you_mean(config, node, parts: list[str], depth: int) -> str:
    """What the user likely meant by ``parts``, missing at ``parts[depth]``: a typo's neighbour whose whole path
    exists (``vae_train.steps``), or a model field (``dit.overrides.scan_unroll``); else ``""``."""
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
        return ""
    if depth == len(parts) - 1 and (fields := _model_fields(parts[:-1])):
        return did_you_mean(parts[depth], fields, ".".join(parts[:-1]))
    for close in difflib.get_close_matches(parts[depth], [str(k) for k in node], n=3):
        guess, found = [*parts[:depth], close, *parts[depth + 1:]], config
        for part in guess:
            found = found.get(part) if isinstance(found, (ml_collections.ConfigDict, dict)) and part in found \
                else _MISSING
        if found is not _MISSING:
            return f"; did you mean {'.'.join(guess)}?"
    return ""


def stage_override_warnings(config, model: str) -> list[str]:
    """A line for each override of a ``data`` field that the ``<model>_train.data`` in force replaces."""
    out = []
    for path, value in overridden(config).items():
        if not path.startswith("data."):
            continue
        replaced = {name: _lookup(config[f"{name}_train"].get("data"), path.removeprefix("data."))
                    for name in _stages(config)}
        mine = replaced.get(model, _MISSING)
        if mine is _MISSING or _same(mine, value):
            continue
        line = f"warning: the override {path}={value!r} does not reach the {model} stage: {model}_train.{path}={mine!r}"
        # One list of overrides for both stages is how the notebooks train: then it is meant for the other one.
        readers = [name for name, r in replaced.items() if name != model and r is _MISSING
                   and not _sized_by_buckets(config, model, name, path)]
        out.append(f"{line} replaces it (the {' and '.join(readers)} stage reads it)" if readers else
                   f"{line} replaces it; override {model}_train.{path} instead")
    return out + _bucketed_clip_warnings(config, model)


def _sized_by_buckets(config, model: str, other: str, path: str) -> bool:
    """Whether ``other``'s stage has buckets, which leave its ``data.num_frames`` / ``data.size`` unread (``config``
    is ``model``'s stage: its ``data.buckets`` is the file's own unless that stage sets them)."""
    if path not in ("data.num_frames", "data.size"):
        return False
    mine = config[f"{model}_train"].get("data") or {}
    theirs = config[f"{other}_train"].get("data") or {}
    return bool(theirs["buckets"] if "buckets" in theirs else "buckets" not in mine and config.data.get("buckets"))


def _bucketed_clip_warnings(config, model: str) -> list[str]:
    """A line for each override of ``data.num_frames`` / ``data.size`` that the buckets in force leave unused: with
    ``data.buckets`` set, they alone size the clips (world_tiny's DiT kept 17-frame buckets, 1-frame ones trained)."""
    from vidiff.checks import height_width
    from vidiff.data.transforms import parse_buckets

    buckets, stage_data = config.data.get("buckets"), config[f"{model}_train"].get("data") or {}
    if not buckets:
        return []
    field = f"{model}_train.data.buckets" if "buckets" in stage_data else "data.buckets"
    parsed, out = parse_buckets(buckets, (1, 1, 1), field), []
    sizing = {f"{prefix}{name}": name for prefix in ("data.", f"{model}_train.data.") for name in ("num_frames", "size")}
    for path, value in overridden(config).items():
        name = sizing.get(path)
        if name is None or (path.startswith("data.") and name in stage_data):  # stage_override_warnings names that
            continue
        if name == "num_frames":
            fits = [(value if f > 1 else 1, h, w) for f, h, w in parsed]
        else:
            fits = [(f, *height_width(value)) for f, _, _ in parsed]
        if set(fits) == set(parsed):
            continue
        example = ["x".join(map(str, b)) for b in dict.fromkeys(fits)]
        out.append(f"warning: the override {path}={value!r} does not reach the {model} stage: {field}="
                   f"{list(buckets)!r} sizes its clips; set {field}={example!r} instead")
    return out


def _stages(config) -> list[str]:
    return [key.removesuffix("_train") for key in config if str(key).endswith("_train")]


def _same(a, b) -> bool:
    """Equal as config values: a tuple and a list of the same items are (the file writes one, JSON the other)."""
    plain = lambda v: [plain(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return plain(a) == plain(b)


def _lookup(tree, dotted: str):
    """The value at ``dotted`` in nested dicts ``tree``, or ``_MISSING``; a dict there is merged key by key
    (``for_stage``), not a replacement, so it counts as missing."""
    for part in dotted.split("."):
        if not isinstance(tree, (ml_collections.ConfigDict, dict)) or part not in tree:
            return _MISSING
        tree = tree[part]
    return _MISSING if isinstance(tree, (ml_collections.ConfigDict, dict)) else tree
