"""Fine-tuning from an exported model (``<model>_train.init_from``): a fresh run starts at the export's
parameters with a fresh optimizer, a DiT keeps the VAE it learned, a resume ignores the field, and every
export that does not fit this run is one line before anything compiles."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import linen as nn

from vidiff.models.block_layout import with_block_layout
from vidiff.io.files import file_mode
from vidiff.models.export import export_vae, load_dit, load_vae, read_manifest
from vidiff.pipeline import BUNDLED
from vidiff.train import config as config_lib
from vidiff.train import init_from, loop, tasks
from vidiff.train.checkpoint import unlock

REPO = Path(__file__).resolve().parents[1]
WORLD_TINY = REPO / "vidiff" / "configs" / "world_tiny.py"
pytestmark = pytest.mark.skipif(not (BUNDLED / "vidiff.json").is_file(), reason="no bundled model installed")


def _config(model, workdir, *overrides):
    config = config_lib.load_config(WORLD_TINY, [f"--config.workdir={workdir}", f"--config.{model}_train.eval_every=0",
                                                 "--config.data.batch_size=8", *overrides])
    config = config_lib.for_stage(config, model)
    config_lib.validate(config, model, jax.device_count())
    return config


def _set_up(config, model, lines):
    """``loop._set_up`` (checks, task, state: no step), its checkpointer closed and workdir unlocked."""
    run = loop._set_up(config, model, lines.append)
    run.checkpointer.close()
    unlock(run.lock)
    return run


def _assert_equal(tree, expected):
    assert jax.tree.structure(tree) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), tree, expected)


def test_a_fresh_run_starts_at_the_exports_parameters_with_a_fresh_optimizer(tmp_path):
    lines = []
    run = _set_up(_config("vae", tmp_path, "--config.vae_train.init_from=bundled"), "vae", lines)
    exported = load_vae(BUNDLED)["params"]
    assert int(run.state.step) == 0 and run.start == 0
    _assert_equal(run.state.params["vae"], exported)
    _assert_equal(run.state.ema_params["vae"], exported)
    _assert_equal(run.state.opt_state, run.tx.init(run.state.params))  # moments and count from zero
    assert lines[-1] == (f"vae: starting from the parameters of {BUNDLED} (vae_train.init_from='bundled'), with a "
                         "fresh optimizer state")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vidiff.cli", "train", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})


@pytest.mark.slow
def test_the_bundled_dit_fine_tunes_end_to_end_and_a_resume_ignores_init_from(tmp_path):
    """The documented command on an empty workdir (scanned blocks: the bundled DiT is unrolled): the bundled VAE
    is copied into its export, two steps train, and the export loads and generates. Then a resume keeps its
    checkpoint whatever init_from says, and a new run from that (scanned) export into an unrolled DiT starts at
    its parameters."""
    workdir = tmp_path / "run"
    done = _cli("--model", "dit", "--config", WORLD_TINY, "--config.dit_train.init_from=bundled",
                f"--config.workdir={workdir}", "--config.dit_train.steps=2", "--config.dit_train.eval_every=0",
                "--config.data.batch_size=8", "--config.dit.overrides.scan_blocks=True")
    assert done.returncode == 0, done.stderr[-3000:]
    export = workdir / "export"
    assert (f"dit_train.init_from: copied {BUNDLED / 'vae.safetensors'} (the VAE its DiT was trained on, latent "
            f"statistics included) and its record into {export}; the DiT trains and exports with it") in done.stderr
    assert len(done.stdout.splitlines()) == 1  # the summary alone: log lines go to stderr
    assert json.loads(done.stdout)["final_loss"] < 0.3  # a trained DiT's (fresh: ~1.5)
    assert (export / "vae.safetensors").read_bytes() == (BUNDLED / "vae.safetensors").read_bytes()
    modes = {name: (export / name).stat().st_mode & 0o777
             for name in ("vae.safetensors", "dit.safetensors", "vidiff.json")}
    assert modes == dict.fromkeys(modes, file_mode())  # the copy too, not a temporary file's 0600
    manifest = read_manifest(export)
    assert manifest["models"]["vae"] == read_manifest(BUNDLED)["models"]["vae"]
    assert manifest["dit_vae_sha256"] == hashlib.sha256((BUNDLED / "vae.safetensors").read_bytes()).hexdigest()
    # What made it, returned and recorded (the bundled VAE's own run config is unknown: not the DiT's taken for it)
    made = json.loads(done.stdout)["provenance"]
    assert manifest["provenance"] == {"dit": made} and "vae_config" not in manifest
    assert made["step"] == 2 and made["config_history"] == [] and made["packages"]["jax"] == jax.__version__
    assert made["mesh"] == {"data": made["device_count"], "fsdp": 1, "tensor": 1, "context": 1}
    from vidiff.pipeline import TextToVideo

    clips = TextToVideo.from_checkpoint(export)(["a red circle moving right"], seed=0, steps=2)
    assert clips.shape == (1, 17, 32, 32, 3) and clips.dtype == np.uint8

    lines = []  # a resume: the checkpoint's parameters, whatever init_from names now (not read at all)
    elsewhere = tmp_path / "nowhere"
    run = _set_up(_config("dit", workdir, f"--config.dit_train.init_from={elsewhere}", "--config.dit_train.steps=3",
                          "--config.dit.overrides.scan_blocks=True"), "dit", lines)
    where = workdir / "dit" / "checkpoints" / "2"
    assert run.start == 2 and int(run.state.step) == 2
    assert lines[-2:] == [f"resumed dit from {where}", f"dit_train.init_from={str(elsewhere)!r} is ignored: the run "
                          f"resumes {where} (init_from starts fresh runs only)"]
    # What the resume changed is said, and carried in its checkpoints' record (for the export)
    assert (f"resuming dit from {where} with 2 config field(s) changed since it was saved: dit_train.init_from="
            f"'bundled' (config now {str(elsewhere)!r}), dit_train.steps=2 (config now 3); the export records them "
            "(provenance.dit.config_history)") in lines
    assert run.record["config_history"] == [{"step": 2, "changes": {
        "dit_train.init_from": {"was": "bundled", "now": str(elsewhere)}, "dit_train.steps": {"was": 2, "now": 3}}}]
    bundled = with_block_layout(load_dit(BUNDLED), run.task.dit.config)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(bundled)))

    lines = []  # scanned export -> unrolled run, into a workdir that already holds that VAE
    other = tmp_path / "other"
    (other / "export").mkdir(parents=True)
    shutil.copy(export / "vae.safetensors", other / "export")
    shutil.copy(export / "vidiff.json", other / "export")
    run = _set_up(_config("dit", other, f"--config.dit_train.init_from={export}"), "dit", lines)
    assert not run.task.dit.config.scan_blocks and "blocks_0" in run.state.params
    _assert_equal(run.state.params, with_block_layout(load_dit(export), run.task.dit.config))
    assert not any("copied" in line for line in lines)


def _prepare(model, workdir, *overrides):
    return init_from.prepare(_config(model, workdir, *overrides), model, print)


def test_an_init_from_that_is_no_export_of_the_model_is_one_line(tmp_path):
    fix = ("give an export directory (vidiff.json and dit.safetensors, as `vidiff train` writes <workdir>/export) "
           "or 'bundled'")
    nowhere = tmp_path / "nowhere"
    with pytest.raises(ValueError) as info:
        _prepare("dit", tmp_path, f"--config.dit_train.init_from={nowhere}")
    assert str(info.value) == f"dit_train.init_from={str(nowhere)!r}: {nowhere} is not a directory; {fix}"
    (nowhere / "export").mkdir(parents=True)
    with pytest.raises(ValueError) as info:
        _prepare("dit", tmp_path, f"--config.dit_train.init_from={nowhere}")
    assert str(info.value) == f"dit_train.init_from={str(nowhere)!r}: {nowhere} is not an export (no vidiff.json); {fix}"
    shutil.copy(BUNDLED / "vidiff.json", nowhere / "export")
    with pytest.raises(ValueError) as info:  # a training workdir
        _prepare("dit", tmp_path, f"--config.dit_train.init_from={nowhere}")
    assert str(info.value) == (f"dit_train.init_from={str(nowhere)!r}: {nowhere} is not an export (no vidiff.json); "
                               f"it is a training workdir: give its export, {nowhere / 'export'}")
    shutil.copy(BUNDLED / "vae.safetensors", nowhere / "export")  # an export of a VAE alone
    vae_only = nowhere / "export"
    with pytest.raises(ValueError) as info:
        _prepare("dit", tmp_path, f"--config.dit_train.init_from={vae_only}")
    assert str(info.value) == (f"dit_train.init_from={str(vae_only)!r}: {vae_only} holds no dit.safetensors (no trained "
                               "DiT); give an export with one, or drop dit_train.init_from")
    assert not (tmp_path / "export").exists()  # nothing copied into the workdir by a refused run


def test_an_export_of_another_architecture_is_named_field_by_field(tmp_path):
    with pytest.raises(ValueError) as info:
        _prepare("dit", tmp_path, "--config.dit_train.init_from=bundled", "--config.dit.overrides.depth=2",
                 "--config.dit.overrides.heads=2")
    assert str(info.value) == ("dit_train.init_from='bundled': its DiT was exported with dit.overrides.depth=4 (config "
                               "now 2), dit.overrides.heads=4 (config now 2); set dit.preset / dit.overrides to the "
                               "export's, or drop dit_train.init_from")
    with pytest.raises(ValueError) as info:  # the DiT trains on the export's VAE: the config must build it
        _prepare("dit", tmp_path, "--config.dit_train.init_from=bundled", "--config.vae.overrides.base_channels=16")
    assert str(info.value) == ("dit_train.init_from='bundled': its VAE was exported with vae.overrides.base_channels=32 "
                               "(config now 16); set vae.preset / vae.overrides to the export's, or drop "
                               "dit_train.init_from")
    with pytest.raises(ValueError, match=r"^vae_train.init_from='bundled': its VAE was exported with "
                                         r"vae.overrides.base_channels=32 \(config now 16\); set vae.preset"):
        _prepare("vae", tmp_path, "--config.vae_train.init_from=bundled", "--config.vae.overrides.base_channels=16")
    assert not (tmp_path / "export").exists()
    # How it computes and how its blocks are laid out are this run's own.
    _prepare("dit", tmp_path, "--config.dit_train.init_from=bundled", "--config.dit.overrides.scan_blocks=True",
             "--config.dit.overrides.remat_policy='block'", "--config.dit.overrides.dtype='bfloat16'")
    assert (tmp_path / "export" / "vae.safetensors").read_bytes() == (BUNDLED / "vae.safetensors").read_bytes()


def test_a_workdir_with_another_vae_is_refused_naming_both(tmp_path):
    config = _config("dit", tmp_path, "--config.dit_train.init_from=bundled")
    vae = tasks.vae_from_config(config)
    shapes = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), np.zeros((1, 1, 4, 4, 3))))
    export_vae(tmp_path / "export", json.loads(config.to_json()),
               jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes), vae_config=vae.config)
    ours = hashlib.sha256((tmp_path / "export" / "vae.safetensors").read_bytes()).hexdigest()
    theirs = hashlib.sha256((BUNDLED / "vae.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ValueError) as info:
        init_from.prepare(config, "dit", print)
    assert str(info.value) == (
        f"dit_train.init_from='bundled': its DiT was trained on the latents of {BUNDLED / 'vae.safetensors'} (sha256 "
        f"{theirs[:12]}) but {tmp_path / 'export' / 'vae.safetensors'} is another VAE (sha256 {ours[:12]}); use a new "
        "workdir (the export's VAE is copied into it), or drop dit_train.init_from")


def test_a_dit_export_needs_this_runs_text_widths_and_latent_channels(tmp_path, monkeypatch):
    """Both are checked from configs alone (the encoder read abstractly), before the export's VAE is copied."""
    t5 = Path(__file__).resolve().parent / "golden" / "tiny_t5"
    config = _config("dit", tmp_path, "--config.dit_train.init_from=bundled", f"--config.text.encoder=t5:{t5}")
    with pytest.raises(ValueError) as info:
        init_from.prepare(config, "dit", print)
    assert str(info.value) == ("dit_train.init_from='bundled': its DiT takes 384-d text (pooled 384-d) from "
                               f"text.encoder='minilm' but text.encoder='t5:{t5}' gives 32-d (pooled 32-d); set "
                               "text.encoder='minilm', or drop dit_train.init_from")
    assert not (tmp_path / "export").exists()  # refused before anything was copied into the workdir
    config = _config("dit", tmp_path, "--config.dit_train.init_from=bundled")
    eight = types.SimpleNamespace(config=types.SimpleNamespace(latent_channels=8))
    monkeypatch.setattr(init_from, "vae_from_config", lambda config: eight)  # an export at odds with its own VAE
    with pytest.raises(ValueError) as info:
        init_from.prepare(config, "dit", print)
    assert str(info.value) == ("dit_train.init_from='bundled': its DiT takes 4-channel latents but this config's "
                               "VAE makes 8; train it on the export's VAE (a new workdir gets a copy of it), or drop "
                               "dit_train.init_from")


def test_a_re_export_over_read_only_or_private_files_refuses_first_or_keeps_their_modes(tmp_path):
    """The weights went through safetensors' rename and vidiff.json through replace_whole: a read-only vidiff.json
    was refused after the weights were replaced, and 0600 weights came back 0644."""
    variables, config = load_vae(BUNDLED), read_manifest(BUNDLED)["config"]
    export_vae(tmp_path, config, variables)
    files = [tmp_path / "vae.safetensors", tmp_path / "vidiff.json"]
    before = [f.read_bytes() for f in files]
    files[1].chmod(0o444)
    with pytest.raises(OSError, match=f"^{re.escape(str(files[1]))} could not be written: it is read-only; make it "
                                      "writable or choose another path$"):
        export_vae(tmp_path, {**config, "seed": 7}, variables)
    assert [f.read_bytes() for f in files] == before  # neither written
    for f in files:
        f.chmod(0o600)
    export_vae(tmp_path, {**config, "seed": 7}, variables)
    assert [f.stat().st_mode & 0o777 for f in files] == [0o600, 0o600] and read_manifest(tmp_path)["config"]["seed"] == 7
