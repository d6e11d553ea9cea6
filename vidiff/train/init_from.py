"""A fresh run's parameters from an exported model: ``<model>_train.init_from``.

Fine-tuning the bundled model or an export on other footage, or continuing a pretraining at another clip size
in a new workdir, starts from trained weights with a fresh optimizer. ``init_from`` names an export directory
(``vidiff.json`` and ``<model>.safetensors``, as ``vidiff train`` writes ``<workdir>/export``) or ``"bundled"``
(the package's own model). A run with a checkpoint in its workdir resumes that and ignores the field
(:func:`resume_note`). A fresh one checks, before anything compiles, that the directory is an export holding
the model, that its recorded architecture is this run's (fields named as ``resume_checks.model_changes`` names
them; compute settings and the block layout may differ) and, for the DiT, that the text encoder's widths and
the VAE's latent channels fit; then it starts from the export's (EMA) parameters, the EMA set to them and the
optimizer state fresh (:func:`start_from`).

A DiT learned its own VAE's latents, so it goes on training on that VAE (:func:`prepare`): a
``<workdir>/export`` without a VAE gets a copy of the export's (``vae.safetensors`` byte for byte, latent
statistics inside, and its ``vidiff.json`` record), said in one log line; one holding another VAE is refused.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from vidiff.models.block_layout import with_block_layout
from vidiff.models.export import (BUNDLED, DIT_VAE, MANIFEST, MODELS, check_dit_vae, file_sha256, load_dit,
                                  load_vae, model_fields, portable_config, read_manifest, recorded_config,
                                  save_manifest)
from vidiff.models.export_records import vae_records
from vidiff.io.files import replace_whole
from vidiff.models.text.registry import encoder_shape
from vidiff.train.resume_checks import model_changes
from vidiff.train.tasks import export_dir, vae_from_config

BUNDLED_NAME = "bundled"
# DiT fields a run takes from its text encoder and VAE, not from dit.*: each has its own check.
_GIVEN = ("text_dim", "pooled_dim", "latent_channels")
_LABEL = {"vae": "VAE", "dit": "DiT"}


@dataclasses.dataclass
class Source:
    """The export a run starts from, checked so far as its files and this config allow."""

    model: str
    field: str  # "dit_train.init_from='bundled'": how each message names it
    directory: Path
    manifest: dict


def directory_of(value: str) -> Path:
    return BUNDLED if value == BUNDLED_NAME else Path(value).expanduser()


def resume_note(stage, model: str, where) -> str | None:
    """The log line of a resumed run whose config sets ``init_from``: the checkpoint's parameters win."""
    value = stage.get("init_from")
    return None if value is None else (f"{model}_train.init_from={value!r} is ignored: the run resumes {where} "
                                       "(init_from starts fresh runs only)")


def prepare(config, model: str, log) -> Source | None:
    """Before the task is built, for a fresh run: the export checked against the config and, for the DiT, its VAE
    in ``<workdir>/export`` (copied there if the workdir has none). None without ``init_from``."""
    value = config[f"{model}_train"].get("init_from")
    if value is None:
        return None
    source = _source(value, model)
    current = json.loads(config.to_json())
    _check_architecture(source, current, model)
    if model == "dit":
        _check_architecture(source, current, "vae")  # the DiT trains on the export's VAE: the config must build it
        _check_dit_inputs(source, config, log)
        _place_vae(source, export_dir(config), log)
    return source


def _source(value: str, model: str) -> Source:
    field = f"{model}_train.init_from={value!r}"
    directory = directory_of(value)
    fix = (f"give an export directory (vidiff.json and {model}.safetensors, as `vidiff train` writes "
           f"<workdir>/export) or 'bundled'")
    if not directory.is_dir():
        raise ValueError(f"{field}: {directory} is not a directory; {fix}")
    if not (directory / MANIFEST).is_file():
        workdir = (directory / "export" / MANIFEST).is_file()
        raise ValueError(f"{field}: {directory} is not an export (no {MANIFEST})"
                         + (f"; it is a training workdir: give its export, {directory / 'export'}" if workdir
                            else f"; {fix}"))
    if not (directory / f"{model}.safetensors").is_file():
        raise ValueError(f"{field}: {directory} holds no {model}.safetensors (no trained {_LABEL[model]}); give an "
                         f"export with one, or drop {model}_train.init_from")
    try:
        return Source(model, field, directory, read_manifest(directory))
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from None


def _check_architecture(source: Source, current: dict, model: str) -> None:
    """The export's ``model`` (its recorded fields, else an older export's preset and overrides) against the
    config's, every field that shapes parameters; the layout of a DiT's blocks is converted, so it may differ."""
    try:
        recorded = recorded_config(source.directory, model)
    except ValueError as error:
        raise ValueError(f"{source.field}: {error}") from None
    if recorded is not None:  # resolved through the config's preset: only the fields themselves are compared
        fields = {k: v for k, v in model_fields(recorded).items() if k not in _GIVEN}
        saved = {model: {"preset": (current.get(model) or {}).get("preset"), "overrides": fields}}
    else:
        saved = source.manifest.get("config") if isinstance(source.manifest.get("config"), dict) else {}
    changes = model_changes(saved, current, model, free=("scan_blocks",))
    if changes:
        raise ValueError(f"{source.field}: its {_LABEL[model]} was exported with {', '.join(changes)}; set "
                         f"{model}.preset / {model}.overrides to the export's, or drop {source.model}_train.init_from")


def _place_vae(source: Source, target: Path, log) -> None:
    """The DiT's VAE in ``target`` (``<workdir>/export``): the export's, copied there when ``target`` has none."""
    try:
        check_dit_vae(source.directory, source.manifest)  # its DiT next to the VAE it was trained with
    except ValueError as error:
        raise ValueError(f"{source.field}: {error}") from None
    theirs = source.directory / "vae.safetensors"
    trained_on = source.manifest.get(DIT_VAE) or (file_sha256(theirs) if theirs.is_file() else None)
    here = target / "vae.safetensors"
    if here.is_file() and trained_on is not None:
        ours = file_sha256(here)
        if ours != trained_on:
            raise ValueError(f"{source.field}: its DiT was trained on the latents of {theirs} (sha256 "
                             f"{trained_on[:12]}) but {here} is another VAE (sha256 {ours[:12]}); use a new workdir "
                             "(the export's VAE is copied into it), or drop dit_train.init_from")
        return
    if not theirs.is_file():
        raise ValueError(f"{source.field}: {source.directory} holds no vae.safetensors, the VAE its DiT was trained "
                         "on; copy that VAE next to its dit.safetensors")
    _copy_vae(source, target)
    log(f"dit_train.init_from: copied {theirs} (the VAE its DiT was trained on, latent statistics included) and "
        f"its record into {target}; the DiT trains and exports with it")


def _copy_vae(source: Source, target: Path) -> None:
    """``vae.safetensors`` byte for byte (its sha256 is what the DiT's export records) and a ``vidiff.json`` of the
    export's config and VAE record; a vidiff.json already there describes no VAE, so nothing loadable is lost."""
    theirs = source.directory / "vae.safetensors"
    replace_whole(target / "vae.safetensors", lambda temporary: shutil.copyfile(theirs, temporary))
    # The VAE run's config and provenance, null where unknown: the config here is the export's DiT's
    manifest = {"config": portable_config(source.manifest.get("config") or {}), "vae": True,
                **vae_records(source.manifest)}
    if (vae := recorded_config(source.directory, "vae")) is not None:
        manifest[MODELS] = {"vae": model_fields(vae)}
    save_manifest(target, manifest)


def load(source: Source, task, log) -> dict:
    """The export's parameters laid out as ``task.init_params`` draws them, every parameter's shape checked against
    the built task's; host arrays, nothing compiled."""
    if source.model == "dit":
        params = with_block_layout(load_dit(source.directory), task.dit.config)
    else:  # a discriminator is no part of an export: it keeps its fresh draw
        params = {"vae": load_vae(source.directory)["params"]}
    params = jax.device_get(params)
    drawn = nn.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
    _check_shapes(source, params, {k: drawn.get(k, {}) for k in params} if source.model == "vae" else drawn)
    log(f"{source.model}: starting from the parameters of {source.directory} ({source.field}), with a fresh "
        "optimizer state")
    return params


def _check_dit_inputs(source: Source, config, log) -> None:
    """The widths the export's DiT takes against what this run feeds it: its text encoder's (read abstractly, no
    weight converted) and its VAE's latent channels, before the VAE is copied anywhere."""
    recorded = recorded_config(source.directory, "dit")
    if recorded is None:  # an older export: the shapes say it
        return
    text = (source.manifest.get("config") or {}).get("text") or {}
    theirs, ours = text.get("encoder"), config.text.encoder
    dim, pooled, _ = encoder_shape(ours, int(config.text.max_length))
    if (recorded.text_dim, recorded.pooled_dim) != (dim, pooled):
        raise ValueError(f"{source.field}: its DiT takes {recorded.text_dim}-d text (pooled {recorded.pooled_dim}-d) "
                         f"from text.encoder={theirs!r} but text.encoder={ours!r} gives {dim}-d (pooled "
                         f"{pooled}-d); set text.encoder={theirs!r}, or drop dit_train.init_from")
    channels = vae_from_config(config).config.latent_channels
    if recorded.latent_channels != channels:
        raise ValueError(f"{source.field}: its DiT takes {recorded.latent_channels}-channel latents but this "
                         f"config's VAE makes {channels}; train it on the export's VAE (a new workdir gets a copy of "
                         "it), or drop dit_train.init_from")
    here = portable_config({"text": {"encoder": ours}})["text"]["encoder"]
    if theirs is not None and here != theirs:  # the same widths, but another encoder's embedding space
        log(f"warning: {source.field}: its DiT was trained on text.encoder={theirs!r} embeddings; this run's "
            f"text.encoder={ours!r} has the same widths, but its text conditioning starts from another encoder's")


def _check_shapes(source: Source, loaded: dict, drawn: dict) -> None:
    """The first parameter the export holds in another shape than this run builds (or not at all), named."""
    have = traverse_util.flatten_dict(jax.tree.map(np.shape, loaded), sep="/")
    want = traverse_util.flatten_dict(jax.tree.map(np.shape, drawn), sep="/")
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            raise ValueError(f"{source.field}: parameter {name} is {have.get(name) or 'missing'} there but "
                             f"{want.get(name) or 'absent'} here; set {source.model}.preset / {source.model}.overrides "
                             f"to the export's, or drop {source.model}_train.init_from")


def start_from(state, shardings, params: dict, tx):
    """``state`` (fresh, step 0) with ``params`` in place of its drawn ones, in their dtypes and shardings, the EMA
    set to them and the optimizer state initialised for them."""
    placed = lambda tree, like: {**like, **{k: _placed(v, like[k]) for k, v in tree.items()}}  # noqa: E731
    trained = placed(params, state.params)  # from the host arrays each time: no process reads another's shards
    return state.replace(params=trained, ema_params=placed(params, state.ema_params),
                         opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(trained))


def _placed(host, like):
    """``host`` arrays as global arrays of ``like``'s dtypes and shardings (each process fills its own shards)."""
    def one(value, target):
        value = np.asarray(value).astype(target.dtype)
        return jax.make_array_from_callback(value.shape, target.sharding, lambda index: value[index])

    return jax.tree.map(one, host, like)
