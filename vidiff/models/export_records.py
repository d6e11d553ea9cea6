"""What an export's ``vidiff.json`` records of how its models were made, beside what loads them
(:mod:`vidiff.models.export`).

``VAE_CONFIG``: the experiment config the VAE there was trained with (a DiT run's config, which becomes ``config``,
holds its own ``vae_train`` values, not those the VAE ran with); ``vae_records`` reads it and ``PROVENANCE``'s
``vae`` entry from a ``vidiff.json`` (for ``export_dit`` to keep, and a DiT fine-tune's copy of the VAE).
``PROVENANCE``: per model, what made its weights (``record_made``: :func:`vidiff.provenance.collect`'s block).
``DIT_TEXT``: the DiT's text encoder, its name and the sha256 of its weights (``text_record``), which
``text_encoder_changes`` compares with the weights the same name loads now: a name or a directory says nothing of
the weights found there, and other weights give other clips.
"""
from __future__ import annotations

import logging

from vidiff import provenance

VAE_CONFIG = "vae_config"  # vidiff.json: the experiment config the VAE there was trained with
PROVENANCE = "provenance"  # vidiff.json: {"vae": ..., "dit": ...}, what made each model's weights
DIT_TEXT = "dit_text_encoder"  # vidiff.json: the text encoder (name, weights' sha256) the DiT was trained with

log = logging.getLogger("vidiff.models")


def vae_records(manifest: dict) -> dict:
    """What ``manifest`` (a ``vidiff.json``) says of how its VAE was made: ``VAE_CONFIG`` (its run's config; in
    an older export without it, ``config`` where no DiT's config replaced it) and ``PROVENANCE`` (``{"vae": ...}``),
    each None where unknown."""
    config = manifest.get(VAE_CONFIG)
    if VAE_CONFIG not in manifest and not manifest.get("dit") and isinstance(manifest.get("config"), dict):
        config = manifest["config"]  # an older VAE export's: its config is the VAE run's
    made = manifest.get(PROVENANCE) if isinstance(manifest.get(PROVENANCE), dict) else {}
    return {VAE_CONFIG: config, PROVENANCE: {"vae": made["vae"]} if made.get("vae") is not None else None}


def record_made(manifest: dict, model: str, made_with: dict | None) -> None:
    """``manifest[PROVENANCE][model]``: ``made_with``, else this process's software and devices."""
    made = manifest.get(PROVENANCE) if isinstance(manifest.get(PROVENANCE), dict) else {}
    manifest[PROVENANCE] = {**made, model: provenance.collect() if made_with is None else made_with}


def text_record(config: dict) -> dict | None:
    """The text encoder's record (``DIT_TEXT``) ``config`` names; None, in a warning, where it cannot be read."""
    from vidiff.models.text.registry import weights_record

    name = (config.get("text") or {}).get("encoder") if isinstance(config.get("text"), dict) else None
    if not isinstance(name, str):
        return None
    try:
        return weights_record(name)
    except (OSError, ValueError) as error:
        log.warning(f"the DiT's text encoder {name!r} could not be read to record its weights ({error}); its export "
                    "does not record them, and a changed encoder will not be pointed out when it loads")
        return None


def text_encoder_changes(manifest: dict, name: str) -> str | None:
    """One line saying that the encoder ``name`` loads now is not the one the DiT of ``manifest`` was trained
    with (its weights' sha256, ``DIT_TEXT``), or None: the same, or not recorded (an older export, the bundled
    model), or not readable (loading it says why)."""
    from vidiff.models.text import loading
    from vidiff.models.text.registry import resolve_name, weights_record

    recorded = manifest.get(DIT_TEXT)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("weights_sha256"), str):
        return None
    try:
        now, where = weights_record(name), loading.resolve_model_dir(resolve_name(name)[1])
    except (OSError, ValueError):
        return None
    if now["weights_sha256"] == recorded["weights_sha256"]:
        return None
    then, installed = recorded.get("package_version"), now.get("package_version")
    versions = f"; package {now['package']} {installed}, {then} then" if installed not in (None, then) and then else ""
    return (f"the text encoder at {where} is not the one this DiT was trained with (weights sha256 "
            f"{now['weights_sha256'][:12]} vs {recorded['weights_sha256'][:12]}{versions}); its clips will differ "
            f"from those it made then: restore the weights it was trained with, or train the DiT again with these")
