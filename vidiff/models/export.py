"""Exported models: plain safetensors + JSON, the format generation loads (no orbax, no pickle).

A model directory holds ``vae.safetensors`` (VAE parameters and its ``latent_stats``), optionally
``dit.safetensors``, and ``vidiff.json`` with the experiment config and anything else needed to rebuild the modules.
Nested parameter dicts are flattened with ``/`` between keys.

A DiT is trained on the latents of the VAE in its directory, so ``export_dit`` records that VAE in ``vidiff.json``
(``dit_vae_sha256``: the sha256 of ``vae.safetensors``) and :func:`check_dit_vae` refuses a DiT next to another VAE
(e.g. after ``vidiff train --model vae`` again into the same workdir). Exports without the field (older ones) are
not checked.

``vidiff.json`` also records every field of the networks' configs (``models``: ``{"vae": {...}, "dit": {...}}``,
each describing the weights file of its name), and :func:`model_config` builds a model from those: the config's
preset name and overrides alone would build whatever that preset means where the model is loaded (a preset
registered from a config file is unknown there; one edited in a fork silently changes old exports). Exports without
them (older ones) are built from the preset and overrides.

``config`` is the experiment config of the run that exported the DiT (of the VAE in a VAE-only export): what the
loaders read. ``vae_config`` is the config the VAE there was trained with, carried over from the VAE's own export
by ``export_dit`` (a DiT run's config holds its own ``vae_train`` values, not those the VAE ran with; absent where
unknown: an older export, or a VAE copied without it). ``provenance`` records, per model (``provenance.vae``,
``provenance.dit``), what made its weights (:mod:`vidiff.provenance`: versions, git commit, devices, mesh, step,
and the config fields a resume changed, ``config_history``). ``dit_text_encoder`` records the DiT's text encoder
(the sha256 of its weights). :mod:`vidiff.models.export_records` writes and reads these three.

``vidiff.json`` is replaced, never rewritten in place (a write cut short would leave no valid one), and an export
replaces an unreadable one: an export cut short before writes were atomic must not stop the next.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from vidiff.checks import json_kind
from vidiff.io.files import not_written, replaceable_mode, save_text
from vidiff.models.dit import DIT_PRESETS, DiTConfig
from vidiff.models.dit_inputs import dummy_inputs
from vidiff.models.export_records import DIT_TEXT, PROVENANCE, VAE_CONFIG, record_made, text_record, vae_records
from vidiff.models.vae import PRESETS as VAE_PRESETS
from vidiff.models.vae import VAEConfig, VideoVAE

MANIFEST = "vidiff.json"
# The model shipped in the package, an export directory like any other: `vidiff generate`'s default model,
# `<model>_train.init_from='bundled'`.
BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "world_tiny"
# The fix for a DiT trained with another VAE. Its checkpoints record that VAE too: a plain rerun would resume
# the old DiT, and is refused (vidiff.train.resume_checks.check_resume_vae).
RETRAIN_DIT = "train the DiT again: delete its run (<workdir>/dit), then `vidiff train --config ... --model dit`"
DIT_VAE = "dit_vae_sha256"  # vidiff.json: the VAE (sha256 of vae.safetensors) the DiT there was trained with
MODELS = "models"  # vidiff.json: {"vae": VAEConfig's fields, "dit": DiTConfig's}, of the weights there
_CONFIGS = {"vae": (VAEConfig, VAE_PRESETS, "VAE"), "dit": (DiTConfig, DIT_PRESETS, "DiT")}

FLOAT_WEIGHTS = (np.float32, jnp.bfloat16, np.float16)  # what load_tree reads; loaders cast to their model's dtype

log = logging.getLogger("vidiff.models")


def save_tree(path, tree) -> Path:
    """Write a nested dict of arrays as safetensors (keys joined with '/')."""
    from safetensors.numpy import save_file

    from safetensors import SafetensorError

    flat = traverse_util.flatten_dict(jax.device_get(nn.unbox(tree)), sep="/")  # init's boxed values too
    path = Path(path)
    mode = replaceable_mode(path)  # as replace_whole gives vidiff.json: whoever reads one reads both
    target = Path(os.path.realpath(path))  # through a symlink, as open() writes
    target.parent.mkdir(parents=True, exist_ok=True)
    try:  # safetensors writes a temporary file and renames it: a failed write leaves the old file
        save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}, str(target))
    except SafetensorError as error:  # neither a ValueError nor an OSError: the CLI would print a traceback
        found = re.search(r"I/O error: (.*) \(os error (\d+)\)", str(error))
        raise not_written(path, int(found[2]) if found else None, found[1] if found else str(error)) from None
    target.chmod(mode)  # (safetensors' private temporary file is 0600)
    return path


def _check_replaceable(directory: Path, weights: Path) -> None:
    """Both files an export writes can be replaced, checked before either is: a read-only ``vidiff.json`` refused
    after the weights were written left it describing weights it did not record."""
    for path in (weights, directory / MANIFEST):
        replaceable_mode(path)


def load_tree(path) -> dict:
    """Read a safetensors file written by ``save_tree`` back into a nested dict of numpy arrays."""
    from safetensors.numpy import load_file

    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is {path.parent} a vidiff model directory?")
    try:
        flat = load_file(str(path))
    except SafetensorError as error:  # a copy cut short or another file under this name
        raise unreadable(path, error) from None
    if clash := _tensor_and_folder(flat):  # unflatten_dict would fail inside flax (an IndexError)
        raise unreadable(path, f"{clash!r} is both a tensor and a folder of tensors")
    _check_weights(path, flat)
    return traverse_util.unflatten_dict(flat, sep="/")


def _check_weights(path: Path, flat: dict) -> None:
    """Every tensor floating-point and finite, as ``save_tree`` writes a model's (training refuses to export
    non-finite ones), else a one-line error naming it: integer or bool weights (a cast copy) and a NaN or inf
    (a damaged file) have the right shapes and sample garbage (int32 VAE weights decoded every pixel to 128,
    one NaN DiT tensor every frame to black). Checked here, on the host, before any of it is a device array."""
    for name, array in flat.items():
        if array.dtype not in FLOAT_WEIGHTS:
            raise ValueError(f"{path}: tensor {name} holds {array.dtype} values, not float32, bfloat16 or float16 "
                             "weights; copy or export it again")
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or infinite values; copy or export it again")


def unreadable(path, why) -> ValueError:
    """The one-line error for a weights file vidiff cannot read back: damaged, or not one ``save_tree`` wrote."""
    return ValueError(f"{path} is not a readable safetensors file ({why}); copy or export it again")


def _tensor_and_folder(flat: dict) -> str | None:
    """A key that is also the folder of another (``a/b`` and ``a/b/c``), which no nested dict flattens to."""
    return next((k for key in flat for k in _folders(key) if k in flat), None)


def _folders(key: str):
    """``a/b/c`` -> ``a``, ``a/b``."""
    parts = key.split("/")
    return ("/".join(parts[:i]) for i in range(1, len(parts)))


def save_manifest(directory, manifest: dict) -> Path:
    """Write ``vidiff.json`` whole or not at all (``vidiff.io.files.replace_whole``)."""
    text = json.dumps(manifest, indent=2, sort_keys=True)
    return save_text(Path(directory) / MANIFEST, text)


def _previous_manifest(directory: Path, replacing: str) -> dict:
    """The ``vidiff.json`` an export updates, ``{}`` when there is none; an unreadable one (cut short when an
    older vidiff was killed or ran out of disk space writing it) describes nothing that loads, so this export
    replaces it, said in a warning naming what it no longer describes (``replacing``)."""
    if not (directory / MANIFEST).exists():
        return {}
    try:
        return read_manifest(directory)
    except ValueError as error:
        log.warning(f"{directory / MANIFEST} is unreadable ({error}); this export writes a new one{replacing}")
        return {}


def model_fields(config) -> dict:
    """Every field of a ``VAEConfig`` or ``DiTConfig`` as JSON holds it (tuples as lists, numpy numbers plain)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=_plain_number))


def _plain_number(value):
    if isinstance(value, np.generic):  # e.g. an override given as a numpy int
        return value.item()
    raise TypeError(f"{value!r} has no JSON form")


def model_config(directory, manifest: dict, model: str, given: dict | None = None, adjust=None):
    """The ``VAEConfig`` (``model="vae"``) or ``DiTConfig`` (``"dit"``) of the export in ``directory``: its
    recorded fields (``models``), else (an older export) its config's preset with ``given`` fields (e.g. the
    text encoder's width) and its overrides. ``adjust(fields)`` changes how it computes before the config is
    checked (e.g. scanned blocks); a field that does not fit is a one-line error naming ``vidiff.json``."""
    config_class, presets, label = _CONFIGS[model]
    path = Path(directory) / MANIFEST
    recorded = _records(manifest).get(model)
    if recorded is not None:
        where = f"{path}: {MODELS}.{model}"
        if not isinstance(recorded, dict):
            raise ValueError(f"{where} is not an object of {config_class.__name__} fields; re-export the model "
                             "with `vidiff train`")
        fields = dict(recorded)
    else:
        section = manifest["config"][model]
        where, name = f"{path}: config.{model}", section["preset"]
        if name not in presets:
            raise ValueError(f"{path}: config.{model}.preset {name!r} is not a {label} preset here (valid: "
                             f"{', '.join(presets)}); register it before loading, or re-export the model with a "
                             "vidiff that records its fields")
        base = presets[name]
        base = dataclasses.asdict(base) if dataclasses.is_dataclass(base) else dict(base)
        fields = {**base, **(given or {}), **section.get("overrides", {})}
    fields = adjust(fields) if adjust else fields
    if unknown := sorted(set(fields) - {f.name for f in dataclasses.fields(config_class)}):
        raise ValueError(f"{where} has unknown {config_class.__name__} field(s) {unknown} (exported by another "
                         "vidiff version?); re-export the model with `vidiff train`")
    try:
        return config_class(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}; re-export the model with `vidiff train`") from None


def recorded_config(directory, model: str, **compute):
    """The config ``directory``'s ``vidiff.json`` records for ``model`` ("vae" | "dit") with the ``compute``
    fields (how it computes, not what it holds) replaced; None where it records none (an older export, no
    export, or an unreadable ``vidiff.json``, which the next export replaces with a warning)."""
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError):
        return None
    if model not in _records(manifest):
        return None
    return model_config(directory, manifest, model, adjust=lambda fields: {**fields, **compute})


def portable_config(config_json: dict) -> dict:
    """``config_json`` with a text encoder read from a relative directory (``t5:tests/golden/tiny_t5``) made
    absolute: the export is loaded from other working directories. A named encoder or a Hub id stays as is."""
    text = config_json.get("text") if isinstance(config_json.get("text"), dict) else {}
    kind, sep, where = str(text.get("encoder", "")).partition(":")
    if not sep or not where or not Path(where).expanduser().is_dir():
        return config_json
    return {**config_json, "text": {**text, "encoder": f"{kind}:{os.path.abspath(Path(where).expanduser())}"}}


def read_manifest(directory) -> dict:
    """The ``vidiff.json`` of a model directory, with a one-line error when it is not one."""
    path = _model_directory(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it from the export or export again") from None
    except RecursionError:  # json's decoder recurses once per nested bracket
        raise ValueError(f"{path} is not valid JSON (nested too deeply); restore it from the export or export "
                         "again") from None
    if not isinstance(manifest, dict):  # every reader asks it for fields
        raise ValueError(f"{path} holds a JSON {json_kind(manifest)}, not the object vidiff exports; restore "
                         "it from the export or export again")
    return manifest


def _model_directory(directory) -> Path:
    """``directory``, or a one-line error when it is no folder holding a ``vidiff.json``."""
    directory = Path(directory)
    if directory.is_file():  # e.g. the dit.safetensors inside it
        raise ValueError(f"model directory {directory} is a file; pass the folder that holds {MANIFEST}"
                         + (f": {directory.parent}" if (directory.parent / MANIFEST).is_file() else ""))
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not (directory / MANIFEST).is_file():
        raise ValueError(f"{directory} is not a vidiff model directory (no {MANIFEST}); export one with vidiff train")
    return directory


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_vae(directory, config_json: dict, variables: dict, vae_config: VAEConfig | None = None, *,
               made_with: dict | None = None) -> Path:
    """Write the VAE's ``params`` + ``latent_stats`` and the config into ``directory``. A DiT already there is kept,
    and so is its config when this is the VAE it was trained with (re-exporting a finished VAE run changes nothing);
    if it was trained with another VAE, a warning is logged and loading the directory fails until the DiT is trained
    again. ``vae_config``: the VAE's, recorded field by field. ``made_with``: ``provenance.vae`` (training's
    :func:`vidiff.provenance.collect`; by default this process's software and devices)."""
    if missing := [k for k in ("params", "latent_stats") if k not in variables]:
        raise ValueError(f"export_vae: the variables have no {missing[0]!r} collection; pass vae.init's full "
                         "variables (params and latent_stats; set the stats with compute_latent_stats)")
    directory = Path(directory)
    vae_path = directory / "vae.safetensors"
    _check_replaceable(directory, vae_path)
    manifest = _previous_manifest(directory, "; the DiT there (dit.safetensors) is not in it: train the DiT "
                                  "again" if (directory / "dit.safetensors").is_file() else "")
    dit_there = bool(manifest.get("dit")) and (directory / "dit.safetensors").is_file()
    if dit_there and DIT_VAE not in manifest and vae_path.is_file():
        manifest[DIT_VAE] = file_sha256(vae_path)  # an older export's DiT: trained with the VAE there until now
    save_tree(vae_path, {k: variables[k] for k in ("params", "latent_stats")})
    dit_kept = dit_there and manifest.get(DIT_VAE) in (None, file_sha256(vae_path))
    if dit_there and not dit_kept:
        log.warning(f"{directory}: the new vae.safetensors replaces the VAE its DiT (dit.safetensors) was trained "
                    f"with; that DiT will not load with it: {RETRAIN_DIT}")
    if not dit_kept:  # the DiT's config describes the model pair, this VAE included
        manifest["config"] = portable_config(config_json)
    manifest["vae"], manifest[VAE_CONFIG] = True, portable_config(config_json)
    record_made(manifest, "vae", made_with)
    if not (dit_kept and "vae" in _records(manifest)):  # else its DiT's record of it stays, as its config
        _record(manifest, vae=vae_config)
    save_manifest(directory, manifest)
    return directory


def export_dit(directory, config_json: dict, params, vae_sha256: str | None = None, *,
               dit_config: DiTConfig | None = None, vae_config: VAEConfig | None = None,
               made_with: dict | None = None) -> Path:
    """Write the DiT's (EMA) params into ``directory`` next to its VAE, recording that VAE's sha256.

    ``vae_sha256``: the VAE file's hash when training loaded it (a VAE exported there since then is
    not the one the DiT learned); by default the file there now. ``dit_config`` and ``vae_config`` (the VAE
    it was trained with): recorded field by field. The VAE's own export's records (its run's config,
    ``vae_config``, and ``provenance.vae``) stay when the VAE there is the one the DiT was trained with.
    ``made_with``: ``provenance.dit``, as ``export_vae``'s. The text encoder ``config_json`` names is recorded
    (``DIT_TEXT``); one that cannot be read now is not, said in a warning.
    """
    directory = Path(directory)
    _check_replaceable(directory, directory / "dit.safetensors")
    save_tree(directory / "dit.safetensors", {"params": params})
    manifest = _previous_manifest(directory, "")
    vae_now = file_sha256(directory / "vae.safetensors") if (directory / "vae.safetensors").is_file() else None
    vae_sha256 = vae_now if vae_sha256 is None else vae_sha256  # by default, the VAE DiT training loads from here
    its_vae = vae_records(manifest) if vae_now is not None and vae_now == vae_sha256 else {}
    config = portable_config(config_json)
    manifest.update(config=config, dit=True, **({} if vae_now is None else {"vae": True}))
    for key, value in {DIT_VAE: vae_sha256, VAE_CONFIG: its_vae.get(VAE_CONFIG), DIT_TEXT: text_record(config),
                       PROVENANCE: its_vae.get(PROVENANCE)}.items():
        manifest.pop(key, None)
        if value is not None:
            manifest[key] = value
    record_made(manifest, "dit", made_with)
    _record(manifest, dit=dit_config, **({} if vae_config is None else {"vae": vae_config}))  # the VAE there stays
    save_manifest(directory, manifest)
    return directory


def _records(manifest: dict) -> dict:
    """``manifest[MODELS]``: the models' recorded fields by name, ``{}`` in an older export (or a damaged one)."""
    return manifest[MODELS] if isinstance(manifest.get(MODELS), dict) else {}


def _record(manifest: dict, **configs) -> None:
    """Each model config's fields into ``manifest[MODELS]``, beside those it holds of the other model. A model
    given as None (its weights just written by a caller that passed no config) loses its record, which would
    describe the weights it replaced: it loads by its preset, as an older export does."""
    models = {k: v for k, v in _records(manifest).items() if configs.get(k, v) is not None}
    manifest[MODELS] = {**models, **{k: model_fields(c) for k, c in configs.items() if c is not None}}
    if not manifest[MODELS]:
        del manifest[MODELS]


def check_dit_vae(directory, manifest: dict) -> None:
    """A one-line ``ValueError`` when the DiT in ``directory`` records a VAE other than its ``vae.safetensors``."""
    directory = Path(directory)
    recorded = manifest.get(DIT_VAE)
    if recorded is not None and not (directory / "vae.safetensors").is_file():
        raise ValueError(f"{directory}: its DiT was trained with a VAE, but vae.safetensors is missing; copy the "
                         "exported VAE next to dit.safetensors (vidiff train --model vae writes it)")
    if recorded is not None and recorded != file_sha256(directory / "vae.safetensors"):
        raise ValueError(f"{directory}: its DiT (dit.safetensors) was trained with another VAE than its "
                         f"vae.safetensors; {RETRAIN_DIT}, or restore the VAE it was trained with")


def load_vae(directory) -> dict:
    """``{"params", "latent_stats"}`` of an exported VAE, as jax arrays (its ``vidiff.json`` is the caller's to
    read: a DiT run re-exporting next to one cut short reads the weights alone)."""
    _model_directory(directory)
    return jax.tree.map(jax.numpy.asarray, load_tree(Path(directory) / "vae.safetensors"))


def load_dit(directory) -> dict:
    """The DiT params of an exported model, as jax arrays (its ``vidiff.json`` is the caller's to read)."""
    _model_directory(directory)
    path = Path(directory) / "dit.safetensors"
    tree = load_tree(path)
    stray = sorted(set(tree) - {"params"})
    if not isinstance(tree.get("params"), dict) or stray:  # export_dit writes every tensor under params/
        raise unreadable(path, f"{stray[0]!r} is outside params/" if "params" in tree else "no tensors under params/")
    return jax.tree.map(jax.numpy.asarray, tree["params"])


@functools.lru_cache(maxsize=8)
def variable_specs(module) -> dict:
    """Shape and dtype (``jax.ShapeDtypeStruct``) of every variable ``module.init`` creates (a ``VideoVAE`` or
    ``VideoDiT``), what a loaded export must match; traced once per architecture (~2 s for a VAE), unallocated."""
    if isinstance(module, VideoVAE):  # one latent cell is the smallest clip it takes
        example = [jnp.zeros((1, 1, module.config.spatial_factor, module.config.spatial_factor, 3))]
    else:
        example = dummy_inputs(module.config)
    return nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *example))


def variable_shapes(module) -> dict:
    """The shapes of :func:`variable_specs`."""
    return jax.tree.map(np.shape, variable_specs(module))
