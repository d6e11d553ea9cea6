"""What a resumed run may change: the checkpoint it resumes must have been written for the same model.

``check_resume`` (before compiling) refuses a step folder that is incomplete, written by another number of
processes, or written with other model settings, text encoder or seed, naming each differing field
(``model_changes`` for a model's architecture, ``config_changes`` for any config field); ``check_resume_vae``
refuses a DiT checkpoint trained with another exported VAE. Everything else (steps, learning rate, data
sizes, the mesh) may change on resume. Each raises a one-line ``ValueError`` naming the field and the fix;
``restore`` does so for a restore that fails all the same (orbax's first sentence quoted when no field changed).

What did change is not silent: ``config_history`` logs one line naming every config field (but where the run
lives, ``RUN_LOCATION``) that differs from the checkpoint's saved config, and returns the run's history of such
changes, ``[{"step": N, "changes": {field: {"was": ..., "now": ...}}}, ...]`` (steps up to N ran with ``was``;
a side without the field has no key): each checkpoint saves it in its config record (``CONFIG_HISTORY``) and
the export records it (``provenance.<model>.config_history``), so the final config is not taken for every step's.
"""
from __future__ import annotations

import dataclasses

import jax

from vidiff.models.dit import dit_preset
from vidiff.models.export import DIT_VAE, RETRAIN_DIT, read_manifest
from vidiff.models.vae import vae_preset
from vidiff.train.checkpoint import read_config

_RESTORE_FIELDS = ("data", "vae", "dit", "text", "vae_loss")  # named when a restore fails and they changed
CONFIG_HISTORY = "config_history"  # a checkpoint's config record: the config changes its run resumed with
# Where a run lives, not how it trains: a moved workdir or another coordinator address changes no value.
RUN_LOCATION = ("workdir", "distributed")
RESTORE_ERROR_CHARS = 200  # of the library's message quoted in a failed restore's one line
_UNSET = object()  # a config side without the field


def check_resume(checkpointer, step: int, config_json: dict, model: str) -> None:
    """Before compiling: the checkpoint to resume is complete and was written for the same model shapes.

    Parameter shapes come from the model sections (and, for the DiT, the text
    encoder's width and the VAE's latent channels); a difference is named field
    by field instead of surfacing as an orbax shape error. A changed ``seed`` is refused too: the random draws
    continue from the checkpoint's key, so the new seed would be ignored while the next checkpoint recorded it;
    and a changed ``data.seed``: the saved data position would count in another order of the records.
    Other fields (steps, learning rate, data.world.length, ...) may change on resume.
    """
    checkpointer.check_complete(step)
    checkpointer.check_processes(step, jax.process_count())
    _check_steps_ahead(checkpointer, step, config_json, model)
    try:  # a record that is there but unreadable is a one-line ValueError: it holds what is checked here
        saved = read_config(checkpointer.directory, step)
    except FileNotFoundError:  # a checkpoint saved without a config record: nothing to compare with
        return
    changes = model_changes(saved, config_json, model)
    if model == "dit":
        changes += model_changes(saved, config_json, "vae")
        changes += config_changes(saved, config_json, ("text.encoder",))
    if changes:
        raise ValueError(f"{checkpointer.directory / str(step)} was written with {', '.join(changes)}; "
                         f"use a new workdir or the original config")
    roles = {"seed": "fixes this run's random draws",
             # in another order the saved position would repeat some records and leave others out, silently
             "data.seed": "orders the records its data position counts in"}
    for field, role in roles.items():
        changed = config_changes(saved, config_json, (field,))
        if changed:
            raise ValueError(f"{checkpointer.directory / str(step)} was written with {changed[0]}, which {role}; "
                             f"use a new workdir or the original config")


def _check_steps_ahead(checkpointer, step: int, config_json: dict, model: str) -> None:
    """``steps`` below the checkpoint's step trains nothing: the run would export that checkpoint again, as if it
    had trained to ``steps``. (Equal is a finished run started again, which exports it again, knowingly.)"""
    steps = (config_json.get(f"{model}_train") or {}).get("steps")
    if isinstance(steps, int) and steps < step:
        raise ValueError(f"{model}_train.steps={steps} but {checkpointer.directory / str(step)} is at step {step}: "
                         f"the run would train nothing and export step {step} again; raise {model}_train.steps above "
                         f"{step} to train further, or use a new workdir to train from scratch")


def check_resume_vae(checkpointer, step: int, vae_sha256: str, export_dir=None) -> None:
    """A DiT's checkpoints record the exported VAE they train with (``DIT_VAE``, the sha256 of the file the task
    loaded): one trained with another VAE is refused before anything compiles, since its latents were not this
    VAE's. A checkpoint written before vidiff kept that record is checked against the record of the run's
    export in ``export_dir`` (its ``vidiff.json`` keeps the VAE its DiT was trained with when a new VAE is
    exported over it); with neither, it is not checked."""
    try:
        trained_with = read_config(checkpointer.directory, step).get(DIT_VAE)
    except (OSError, ValueError):  # a checkpoint without a readable config: the restore will tell
        return
    if trained_with is None and export_dir is not None:
        try:
            manifest = read_manifest(export_dir)
        except (OSError, ValueError):  # no export yet, or one the load will name
            manifest = {}
        trained_with = manifest.get(DIT_VAE) if manifest.get("dit") else None
    if trained_with not in (None, vae_sha256):
        raise ValueError(f"{checkpointer.directory / str(step)} was trained with another VAE than the one exported "
                         f"now; {RETRAIN_DIT}, or restore the VAE it was trained with")


# Fields that leave a model's parameters as they are: changing them between runs is fine.
_FREE_FIELDS = {"vae": {"dtype"},
                "dit": {"dtype", "attention_impl", "attention_head_pad", "remat_policy", "scan_unroll",
                        "fused_qk_rope"}}


def model_changes(saved: dict, current: dict, model: str, free=()) -> list[str]:
    """``"vae.overrides.base_channels=32 (config now 16)"`` for each field of ``model``'s architecture
    that differs between two JSON configs (``saved`` first); both are resolved through the preset, so
    an override equal to the preset's value is no change. ``free``: more fields left out (``scan_blocks``,
    for parameters that are converted between layouts rather than restored)."""
    old, new = saved.get(model) or {}, current.get(model) or {}
    if old.get("preset") != new.get("preset"):
        return [f"{model}.preset={old.get('preset')!r} (config now {new.get('preset')!r})"]
    make = vae_preset if model == "vae" else dit_preset
    try:
        before = dataclasses.asdict(make(old["preset"], **(old.get("overrides") or {})))
        after = dataclasses.asdict(make(new["preset"], **(new.get("overrides") or {})))
    except (KeyError, TypeError, ValueError):  # a config from another vidiff version: nothing to compare
        return []
    as_json = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return [f"{model}.overrides.{k}={as_json(before[k])!r} (config now {as_json(after.get(k))!r})"
            for k in sorted(before) if k not in _FREE_FIELDS[model] | set(free) and before[k] != after.get(k)]


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: dict, current: dict, prefixes, *, saved_fields_only: bool = False) -> list[str]:
    """``"data.buckets=None (config now [...])"`` for each JSON config field under ``prefixes`` that differs;
    ``saved_fields_only``: not the fields ``saved`` lacks (a newer config file spelling out a default)."""
    return _described(_changed(saved, current, prefixes, saved_fields_only))


def _described(changed: dict) -> list[str]:
    """``_changed``'s fields as ``config_changes`` names them."""
    show = lambda value: "not set" if value is _UNSET else repr(value)  # noqa: E731
    return [f"{key}={show(was)} (config now {show(now)})" for key, (was, now) in changed.items()]


def _changed(saved: dict, current: dict, prefixes, saved_fields_only: bool = False) -> dict:
    """``{field: (saved value, current value)}`` for each field under ``prefixes`` that differs, ``_UNSET`` on a
    side that lacks the field."""
    old, new = _flatten(saved), _flatten(current)
    under = lambda key: any(key == p or key.startswith(p + ".") for p in prefixes)  # noqa: E731
    keys = sorted(set(old) if saved_fields_only else set(old) | set(new))
    return {key: pair for key in keys
            if under(key) and (pair := (old.get(key, _UNSET), new.get(key, _UNSET)))[0] != pair[1]}


def config_history(checkpointer, step: int, config_json: dict, model: str, log) -> list[dict]:
    """The config changes of the run resuming ``step`` (none for a fresh run, ``step`` 0): the checkpoint's
    history, plus this resume's changes, which ``log`` is told in one line. Every field of the config counts
    but ``RUN_LOCATION``'s; a checkpoint without a config record has no history."""
    if not step:
        return []
    try:
        saved = read_config(checkpointer.directory, step)
    except FileNotFoundError:
        return []
    history = saved.get(CONFIG_HISTORY) if isinstance(saved.get(CONFIG_HISTORY), list) else []
    changed = _changed(saved, config_json, [key for key in config_json if key not in RUN_LOCATION])
    if not changed:
        return history
    log(f"resuming {model} from {checkpointer.directory / str(step)} with {len(changed)} config field(s) changed "
        f"since it was saved: {', '.join(_described(changed))}; the export records "
        f"them (provenance.{model}.config_history)")
    return history + [{"step": step, "changes": {key: {side: value for side, value in (("was", was), ("now", now))
                                                       if value is not _UNSET}
                                                 for key, (was, now) in changed.items()}}]


def restore(checkpointer, target, step: int, iterator, config_json: dict):
    """``checkpointer.restore``; a failure is one line, naming the config fields that changed since the save.

    Fields the saved config does not have at all are left out: a newer config file spelling out a default
    (``vae_loss.adversarial_start_step=0``) changes nothing, and naming it would hide the real cause.
    """
    where = checkpointer.directory / str(step)
    try:
        return checkpointer.restore(target, step, data_iterator=iterator)
    except Exception as error:  # orbax and grain raise KeyError, ValueError, ... for a mismatched item
        try:
            saved = read_config(checkpointer.directory, step)
        except (OSError, ValueError):
            saved = None
        changes = [] if saved is None else config_changes(saved, config_json, _RESTORE_FIELDS, saved_fields_only=True)
        if changes:
            raise ValueError(f"cannot restore {where}: it was written with {', '.join(changes)}; use a new "
                             f"workdir or the original config") from None
        first = _first_sentence(error)
        raise ValueError(f"cannot restore {where}: the saved state does not fit this run or cannot be read ({first}); "
                         f"if a save or copy was cut short, delete that folder to {checkpointer.without(step)}; "
                         f"else use a new workdir, or the vidiff version and config that wrote it") from None


def _first_sentence(error: Exception) -> str:
    """The first sentence of orbax's message, which says what differs; the advice after it (partial_restore,
    strict=False) is for orbax's own API, which a vidiff user does not call. A file cut short gets a tensorstore
    spec of some kilobytes there: its start, which names the file, is kept."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0].rstrip(".:")
    return first if len(first) <= RESTORE_ERROR_CHARS else first[:RESTORE_ERROR_CHARS] + " ..."
