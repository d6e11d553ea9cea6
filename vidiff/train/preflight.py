"""What is checked before a training run compiles (and before it exports), so a mistake costs one line.

``vidiff.train.loop`` calls these at the points where each can first be known:

- resuming: the checks of what a resume may change live in ``vidiff.train.resume_checks``;
- starting from an export (``<model>_train.init_from``): its checks live in ``vidiff.train.init_from``;
- the DiT's inputs: the exported VAE fits this config, and prepared shards
  carry latents from that VAE and text embeddings of this config's encoder
  width (``check_dit_inputs`` before the task loads them, ``check_dit_task`` after);
- the eval split: ``eval.split`` names a split the data can select (a
  manifest entry, a ``vidiff prepare`` folder's shards), with clips of at
  least ``eval.num_frames`` (``check_eval_split``), before the VAE trains;
- the data: ``array_record`` shards hold clips as long and as large as training asks for (``check_stored_clips``),
  and a finite dataset lasts ``<model>_train.steps`` (``check_data_lasts``);
- the end: parameters about to be exported are finite (``check_finite_params``).

Each raises a one-line ``ValueError`` naming the field or folder and the fix,
instead of an orbax, Flax or ``KeyError`` traceback minutes later.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vidiff.checks import height_width
from vidiff.models.export import read_manifest, recorded_config, variable_shapes
from vidiff.models.vae import vae_preset
from vidiff.train.latent_cache import vae_fingerprint
from vidiff.train.resume_checks import model_changes
from vidiff.train.state import skipped_steps_clause
from vidiff.train.tasks import export_dir, vae_from_config


class NonFiniteError(RuntimeError, ValueError):
    """Training hit a non-finite loss or gradient with ``train.on_nonfinite = "stop"``, or ended with
    non-finite parameters. A ``ValueError`` too, so ``vidiff train`` reports it in one line."""


class DataExhaustedError(ValueError):
    """The data pipeline ended (finite ``data.num_epochs``, or no records) before ``<model>_train.steps``."""


def check_dit_inputs(config) -> None:
    """Before the DiT task loads anything: the exported VAE was trained with this config's VAE settings
    (named field by field), and ``dit_train.latents='prepared'`` shards carry latents."""
    directory = export_dir(config)
    if (directory / "vae.safetensors").is_file():  # else tasks.load_vae_variables says how to train one
        exported = read_manifest(directory).get("config") or {}
        changes = model_changes(exported, json.loads(config.to_json()), "vae") if exported.get("vae") else []
        if changes:
            raise ValueError(f"the VAE in {directory} was trained with {', '.join(changes)}; use the VAE's config "
                             f"or train the VAE again with --model vae")
    if config.dit_train.get("latents") == "prepared":
        check_prepared_shards(config)


def check_dit_task(config, task) -> None:
    """Once the DiT task is built, before compiling: its VAE's parameter shapes fit the config (a backstop
    for exports without a readable config) and prepared shards were made with this VAE and text encoder."""
    _check_vae_shapes(config, task.frozen["vae"], export_dir(config))
    if task.prepared:
        check_prepared_text(config, task.text.dim, task.text.max_length)
        check_prepared_vae(config, jax.device_get(task.frozen["vae"]))  # the fingerprint hashes the values


def _check_vae_shapes(config, variables: dict, directory: Path) -> None:
    """The first parameter whose shape differs from what this config's VAE builds, named."""
    want = traverse_util.flatten_dict(variable_shapes(vae_from_config(config))["params"], sep="/")
    have = traverse_util.flatten_dict(jax.tree.map(np.shape, variables["params"]), sep="/")
    for name in sorted(set(want) | set(have)):
        old, new = have.get(name), want.get(name)
        if old != new:
            raise ValueError(
                f"the VAE in {directory} does not fit this config's vae settings: parameter {name} is "
                f"{old or 'missing'} there but {new or 'absent'} here; use the VAE's config or train the VAE "
                f"again with --model vae"
            )


PREPARED_KEYS = ("latents", "text_embedding", "text_mask", "text_pooled")


def _first_prepared_record(config, split: str = "train"):
    """The first decodable record of a split of the ``array_record`` shards, or None (no records: the loop says so)."""
    from vidiff.data.shards import ArrayRecordSource, array_record_paths

    source = ArrayRecordSource(array_record_paths(config.data.array_record_path, split))
    for index in range(min(len(source), 8)):  # a corrupt first entry is a Skip: look a little further
        record = source[index]
        if isinstance(record, dict):
            return record
    return None


def check_prepared_shards(config) -> None:
    """``dit_train.latents='prepared'`` needs shards written by ``vidiff prepare --latents``: say so before
    anything compiles, not with a ``KeyError`` at the first step."""
    record = _first_prepared_record(config)
    missing = [k for k in PREPARED_KEYS if record is not None and k not in record]
    if missing:
        raise ValueError(
            f"dit_train.latents='prepared' but the shards in data.array_record_path={config.data.array_record_path!r} "
            f"have no {', '.join(missing)} (written without --latents); run `vidiff prepare --latents MODEL_DIR` "
            f"on the videos, or set dit_train.latents='cached'"
        )


def check_prepared_text(config, text_dim: int, max_length: int) -> None:
    """Prepared text embeddings must have this config's text encoder's shape: ``max_length`` tokens of
    ``text_dim`` (a blanked caption's embedding, computed here, replaces a stored one mid-run)."""
    record = _first_prepared_record(config)
    if record is None:
        return
    length, width = np.shape(record["text_embedding"])[-2:]
    if width != text_dim:
        raise ValueError(
            f"the shards in data.array_record_path={config.data.array_record_path!r} hold {width}-d "
            f"text embeddings but text.encoder={config.text.encoder!r} gives {text_dim}-d; use the encoder the shards "
            f"were prepared with, or run `vidiff prepare --latents MODEL_DIR` again"
        )
    if length != max_length:
        raise ValueError(
            f"the shards in data.array_record_path={config.data.array_record_path!r} hold text embeddings of "
            f"{length} tokens but text.max_length={max_length}; set text.max_length={length}, the length "
            f"`vidiff prepare --latents` took from its VAE export's config"
        )


def check_prepared_vae(config, vae_variables: dict) -> None:
    """Prepared latents come from the exported VAE the DiT will be paired with.

    ``vidiff prepare --latents`` records its VAE's fingerprint in ``train-summary.json``
    beside the shards; a DiT trained on another VAE's latents would pair with a
    decoder whose latent space it never saw. Latents an older prepare wrote without it are refused too; shards
    without a summary (written by other tools) are taken as they are.
    """
    from vidiff.data.shards import array_record_paths

    # Each `vidiff prepare --out` folder holding training shards (the path may be a folder, glob, file or list).
    folders = sorted({Path(path).parent for path in array_record_paths(config.data.array_record_path, "train")})
    directory = export_dir(config)
    fingerprint = vae_fingerprint(vae_variables, _exported_vae_config(config, directory))
    for folder in folders:
        try:
            summary = json.loads((folder / "train-summary.json").read_text())
        except (OSError, ValueError):  # no summary (shards written by other tools): nothing to compare
            continue
        if "vae_fingerprint" not in summary and summary.get("latents_from"):
            raise ValueError(
                f"the latents in {folder} (data.array_record_path={config.data.array_record_path!r}) were prepared "
                f"(with --latents {summary['latents_from']}) by a vidiff that did not record their VAE, so they "
                f"cannot be checked against the one in {directory}; run `vidiff prepare --latents {directory}` again"
            )
        if summary.get("vae_fingerprint") not in (None, fingerprint):
            raise ValueError(
                f"the latents in {folder} (data.array_record_path={config.data.array_record_path!r}) come from "
                f"another VAE (prepared with --latents {summary.get('latents_from')}) than the one in "
                f"{directory}; run `vidiff prepare --latents {directory}` again"
            )


def _exported_vae_config(config, directory: Path):
    """The exported VAE's config as `vidiff prepare` fingerprinted it: the fields the export records (an older
    export: its preset and overrides; none: this config's). Its compute-only fields (dtype) this run may have
    changed; ``check_dit_inputs`` compares the rest."""
    recorded = recorded_config(directory, "vae")
    if recorded is not None:
        return recorded
    exported = (read_manifest(directory).get("config") or {}).get("vae")
    if exported:
        return vae_preset(exported["preset"], **(exported.get("overrides") or {}))
    return vae_from_config(config).config


def _source_of(config) -> str:
    """Where the records come from, as the config fields that say so."""
    from vidiff.data.registry import FIELD_SOURCES  # what a registered source was registered with

    data = config.data
    length = (data.get("world") or {}).get("length", "default")
    where = {"array_record": f"data.array_record_path={data.get('array_record_path')!r}",
             "folder": f"data.manifest={data.get('manifest')!r}",
             "tfds": f"data.tfds_name={data.get('tfds_name')!r}",
             "world": f"data.source='world' with data.world.length={length}"}
    named = [f"data.{field}={data.get(field)!r}" for field, source in FIELD_SOURCES.items() if source == data.source]
    return where.get(data.source, f"data.source={data.source!r}" + (f" with {', '.join(named)}" if named else ""))


def _record_counts(pipeline) -> tuple[int, int] | None:
    """``(records in the source, records the pipeline reads over all epochs in this process)``, from the
    grain graph: the source and the first random-access stage above it know their lengths. None when the
    graph is not the one ``vidiff.data.make_pipeline`` builds."""
    import grain  # the data layer's package: imported only when a pipeline is checked

    node, lengths = pipeline, []
    try:
        while node is not None:
            if isinstance(node, grain.MapDataset):
                lengths.append(len(node))
            parents = getattr(node, "parents", ())
            node = parents[0] if parents else None
    except (TypeError, AttributeError, IndexError):
        return None
    return (lengths[-1], lengths[0]) if lengths else None


def check_data_lasts(pipeline, config, model: str) -> None:
    """Fail before compiling when finite data cannot give ``<model>_train.steps`` batches (or has no records).

    With one bucket and ``drop_remainder`` the count is exact (before skipped
    records); with several buckets it is an upper bound, so this only refuses
    what certainly runs out. The loop still catches a stream that ends early.
    """
    counts = _record_counts(pipeline)
    if counts is None:
        return
    records, read = counts
    if jax.process_count() > 1:  # decide on the same numbers everywhere: a process that raised alone would
        from jax.experimental import multihost_utils  # leave the others waiting at the first collective

        records, read = (int(v) for v in multihost_utils.process_allgather(np.array([records, read])).min(axis=0))
    if records == 0:
        raise DataExhaustedError(f"the data has no records ({_source_of(config)}); point data at a non-empty "
                                 f"dataset (for shards, check `vidiff prepare` wrote any)")
    epochs = config.data.num_epochs
    if epochs is None:
        return
    batch, steps = int(config.data.batch_size), int(config[f"{model}_train"].steps)
    buckets = len(config.data.buckets) if config.data.get("buckets") else 1
    available = read // batch if config.data.drop_remainder else -(-read // batch) + buckets - 1
    if steps > available:
        bound = "at most " if buckets > 1 or not config.data.drop_remainder else ""
        raise DataExhaustedError(
            f"data runs out after {bound}{available} steps ({records} records, data.num_epochs={epochs}, batch {batch}) "
            f"but {model}_train.steps={steps}; set data.num_epochs=None or {model}_train.steps<={available}"
        )


def check_eval_split(config) -> None:
    """One line when ``eval.split`` names a split the data cannot select: validation would score training clips."""
    data, evaluation = config.data, config.get("eval") or {}
    if not config.vae_train.get("eval_every", 0) or data.source in ("world", "tfds"):
        return
    split = evaluation.get("split", "eval")
    if data.source == "folder" and hasattr(data.manifest, "keys"):
        if split not in data.manifest:  # found at the first evaluation, after eval_every steps of training
            raise ValueError(f"eval.split={split!r} but data.manifest has no {split!r} entry (it has "
                             f"{sorted(data.manifest)}); add one, or set eval.split to one of those")
        return
    if split == "train":
        return
    fix = "or set eval.split='train' to score training clips knowingly, or vae_train.eval_every=0"
    if data.source == "folder":
        raise ValueError(f"eval.split={split!r} but data.manifest={data.manifest!r} is one manifest, which has no "
                         f"splits; give data.manifest={{'train': ..., {split!r}: ...}}, {fix}")
    if data.source == "array_record":
        _check_eval_shards(config, split, fix)


def _check_eval_shards(config, split: str, fix: str) -> None:
    """``array_record`` shards have splits only as a `vidiff prepare` folder's, and an eval split's clips must be
    as long as ``eval.num_frames``."""
    data = config.data
    specs = ([data.array_record_path] if isinstance(data.array_record_path, (str, Path))
             else list(data.array_record_path or []))
    if not specs or not all(Path(str(one)).is_dir() for one in specs):
        raise ValueError(f"eval.split={split!r} but data.array_record_path={data.array_record_path!r} names shard "
                         f"files, which have no splits; point it at the `vidiff prepare` folder holding "
                         f"{split}-*.array_record shards, {fix}")
    if not any(next(Path(str(one)).glob(f"{split}-*.array_record"), None) for one in specs):
        raise ValueError(f"eval.split={split!r} but data.array_record_path={data.array_record_path!r} holds no "
                         f"{split}-*.array_record shards (`vidiff prepare` writes --split train unless told); "
                         f"run `vidiff prepare --split {split} --out <that folder>` on held-out clips, {fix}")
    record = _first_prepared_record(config, split)
    frames = (config.get("eval") or {}).get("num_frames") or data.num_frames
    if record is not None and len(record["video"]) < frames:  # every clip would be skipped as too short
        raise ValueError(f"eval.num_frames={frames} but the {split!r} shards hold {len(record['video'])}-frame "
                         f"clips; set eval.num_frames={len(record['video'])} (or prepare longer clips)")


def check_stored_clips(config) -> None:
    """Training clips that ``array_record`` shards cannot give, refused before training: the shards hold the clips
    `vidiff prepare` stored, and a longer clip asked for skips every record as too short (or, beside a 1-frame
    bucket, leaves only images to train on)."""
    from vidiff.data.transforms import frames_needed, parse_buckets, resample_indices

    data = config.data
    if data.source != "array_record":
        return
    record = _first_prepared_record(config)
    if record is None:  # no records: check_data_lasts says so
        return
    stored, stride = len(record["video"]), int(data.frame_stride)
    frames = len(resample_indices(stored, float(record["fps"]), data.fps))  # at data.fps, as the pipeline cuts
    where = f"the 'train' shards in data.array_record_path={data.array_record_path!r}"
    held = f"{stored}-frame clips" + (f" ({frames} frames at data.fps={data.fps})" if frames != stored else "")
    time_factor = vae_from_config(config).config.time_factor
    fit = 1 + max(0, (frames - 1) // stride) // time_factor * time_factor  # the longest clip the VAE takes
    buckets = data.get("buckets")
    parsed = parse_buckets(buckets, (int(data.num_frames), *height_width(data.size)))
    if not buckets and frames_needed(int(data.num_frames), stride) > frames:
        raise ValueError(f"data.num_frames={data.num_frames} but {where} hold {held}; set data.num_frames={fit} "
                         f"(or prepare longer clips)")
    videos = [f for f, _, _ in parsed if f > 1]
    if videos and all(frames_needed(f, stride) > frames for f in videos):
        outcome = ("only its 1-frame buckets would train" if len(videos) < len(parsed) else
                   "every record would be skipped as too_short")
        example = list(dict.fromkeys(f"{min(f, fit)}x{h}x{w}" for f, h, w in parsed))
        raise ValueError(f"data.buckets={list(buckets)!r} need clips of {min(videos)} frames or more but {where} "
                         f"hold {held}, so {outcome}; set data.buckets={example!r} (or prepare longer clips)")
    _check_stored_size(data, parsed, np.shape(record["video"])[1:3], where)


def _check_stored_size(data, parsed, stored: tuple[int, int], where: str) -> None:
    """Frames larger than the stored ones would be upscaled (resize_crop covers the target): refused, naming the
    stored size and the `vidiff prepare --size` that stores enough."""
    height, width = stored
    if all(h <= height and w <= width for _, h, w in parsed):
        return
    need_h, need_w = max(h for _, h, _ in parsed), max(w for _, _, w in parsed)
    field = f"data.buckets={list(data.buckets)!r}" if data.get("buckets") else f"data.size={data.size!r}"
    size = f"{need_h}" if need_h == need_w else f"{need_h}x{need_w}"
    raise ValueError(f"{field} asks for frames larger than the {height}x{width} ones {where} hold, which training "
                     f"would upscale; ask for at most {height}x{width}, or run `vidiff prepare --size {size}` again")


@jax.jit
def _all_finite(tree) -> jax.Array:
    # One program over the whole tree: eager jnp.all per sharded leaf dispatches one all-reduce per leaf, and
    # XLA:CPU's rendezvous for those can deadlock (a tensor mesh's run aborted here after its last checkpoint).
    return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree), jnp.asarray(True))


def check_finite_params(state, model: str, step: int, checkpoints: Path) -> None:
    """Refuse to export parameters (or their EMA) that are not finite: one line naming the step and the skips."""
    if bool(_all_finite((state.params, state.ema_params))):
        return
    raise NonFiniteError(
        f"{model} parameters are not finite after step {step}{skipped_steps_clause(state)}; nothing exported. Lower "
        f"{model}_train.optim.lr (or set optim.grad_clip) and train again from a new workdir or an earlier "
        f"checkpoint in {checkpoints}"
    )
