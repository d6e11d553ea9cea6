"""Experiment configs: load a ``get_config()`` file, apply command-line overrides, validate.

Config files live in ``experiments/configs/`` and return an
``ml_collections.ConfigDict``. Overrides look like ``--config.dit.depth=4``
(values parsed as Python literals, else taken as strings); a path that does not
exist in the config is an error, not a silent new field. ``validate`` checks
everything that can be checked without compiling and fails with one line that
names the field and the fix.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Sequence

import ml_collections

MODELS = ("vae", "dit")


def load_config(path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Import ``path``, call its ``get_config()`` and apply ``overrides`` (``--config.a.b=v`` or ``a.b=v``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass a file from experiments/configs/")
    spec = importlib.util.spec_from_file_location(f"vidiff_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config() function")
    config = module.get_config()
    apply_overrides(config, overrides)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Set ``a.b.c=value`` entries in place, refusing unknown paths and wrong types."""
    for item in overrides:
        text = item[len("--config."):] if item.startswith("--config.") else item.lstrip("-")
        if "=" not in text:
            raise ValueError(f"override {item!r} needs the form --config.field=value")
        dotted, raw = text.split("=", 1)
        parent, _, leaf = dotted.rpartition(".")
        node = config
        for part in filter(None, parent.split(".")):
            if part not in node:
                raise ValueError(f"override {item!r}: config has no field {dotted!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {item!r}: config has no field {dotted!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and value is not None and not isinstance(value, type(old)) and not (
            isinstance(old, (list, tuple)) and isinstance(value, (list, tuple))
        ):
            raise ValueError(f"override {item!r}: {dotted} is a {type(old).__name__}, got {type(value).__name__}")
        with node.ignore_type():
            node[leaf] = value
    return config


def for_stage(config, model: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``data`` carries the stage's own overrides (``<model>_train.data``).

    The VAE, being convolutional and causal, can train on shorter clips than
    the DiT generates; each stage says so without a second config file.
    """
    config = config.copy_and_resolve_references()
    overrides = config[f"{model}_train"].get("data")
    if overrides:
        unknown = sorted(set(overrides) - set(config.data))
        if unknown:
            raise ValueError(f"{model}_train.data has fields {unknown} that data does not; valid: {sorted(config.data)}")
        with config.data.ignore_type():
            config.data.update(dict(overrides))
    return config


def validate(config, model: str, device_count: int) -> None:
    """Fail early, one line per problem, for configs that cannot work (before anything compiles)."""
    from vidiff.models.dit import dit_preset

    if model not in MODELS:
        raise ValueError(f"model={model!r} is unknown; train one of {MODELS}")
    from vidiff.train.profile import check_profile

    check_profile(config[f"{model}_train"], model)
    from vidiff.train.tasks import dit_overrides, vae_from_config

    vae_cfg = vae_from_config(config).config
    frames = int(config.data.num_frames)
    if (frames - 1) % vae_cfg.time_factor:
        good = 1 + round((frames - 1) / vae_cfg.time_factor) * vae_cfg.time_factor
        raise ValueError(
            f"data.num_frames={frames} must be 1 + k*{vae_cfg.time_factor} (the VAE's time factor), e.g. {good}"
        )
    size = config.data.size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    divisor, why = vae_cfg.spatial_factor, "the VAE's spatial factor"
    if model == "dit":
        if config.dit_train.get("latents") == "prepared" and config.data.source != "array_record":
            raise ValueError(
                f"dit_train.latents='prepared' needs data.source='array_record' (shards from `vidiff prepare "
                f"--latents`), got data.source={config.data.source!r}"
            )
        dit_cfg = dit_preset(config.dit.preset, **dit_overrides(config))
        divisor, why = divisor * dit_cfg.patch[1], "VAE spatial factor x DiT patch"
        latent_frames = 1 + (frames - 1) // vae_cfg.time_factor
        if latent_frames % dit_cfg.patch[0]:
            raise ValueError(
                f"data.num_frames={frames} gives {latent_frames} latent frames, not divisible by dit patch time "
                f"{dit_cfg.patch[0]}; change data.num_frames or dit.overrides.patch"
            )
    for name, value in (("height", height), ("width", width)):
        if value % divisor:
            raise ValueError(
                f"data.size {name}={value} must be divisible by {divisor} ({why}); "
                f"use e.g. {max(1, round(value / divisor)) * divisor}"
            )
    from vidiff import parallel

    sizes = parallel.resolve_sizes(parallel.mesh_sizes(config.mesh.to_dict()), device_count)  # presets, dcn, -1
    data_parallel = sizes["data"] * sizes["fsdp"]
    batch = int(config.data.batch_size)
    if batch % data_parallel:
        raise ValueError(
            f"data.batch_size={batch} is not divisible by the data-parallel devices mesh.data x mesh.fsdp = "
            f"{data_parallel}; use a multiple of {data_parallel}"
        )
