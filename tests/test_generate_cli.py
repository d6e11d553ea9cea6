"""``vidiff generate``: files for every mode and format, and one-line errors for everything a user can get wrong."""
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tiny_model import REPO, tiny_model_dir
from vidiff import io
from vidiff.cli import main
from vidiff.data.world import CaptionedWorld, WorldConfig

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def model():
    return str(tiny_model_dir())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 9-frame 16px world clip as mp4 (and its first 3 frames), its first frame as png, and files that are not
    media."""
    root = tmp_path_factory.mktemp("inputs")
    video = CaptionedWorld(WorldConfig(num_frames=9, size=16))[0]["video"]
    (root / "notes.mp4").write_text("not a video")
    (root / "notes.png").write_text("not an image")
    (root / "clip.m4v").write_bytes(io.write_video(root / "clip.mp4", video).read_bytes())  # Pillow cannot read it
    return {"video": str(root / "clip.mp4"), "image": str(io.write_image(root / "first.png", video[0])),
            "video60": str(io.write_video(root / "clip60.mp4", video, 60.0)),
            "short": str(io.write_video(root / "short.mp4", video[:3])),
            "fake": str(root / "notes.mp4"), "m4v": str(root / "clip.m4v"), "root": root}


def generate(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_videos_gifs_grids_and_images(model, tmp_path, capsys, monkeypatch):
    code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--steps", 2, "--num", 2, "--quiet",
                              "--out", tmp_path / "demo.mp4", "--grid", tmp_path / "grid.png")
    assert code == 0, err
    for k in (0, 1):
        frames, _ = io.read_video(tmp_path / f"demo_{k}.mp4")
        assert frames.shape == (9, 16, 16, 3)
        assert f"wrote {tmp_path / f'demo_{k}.mp4'}  (9 frames, 16x16, seed {k}, {PROMPT!r})" in out
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (2 * 18 + 2, 9 * 18 + 2, 3)  # a row per clip
    assert "sampling" not in err  # --quiet: no progress bar
    code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--steps", 2, "--out", tmp_path / "demo.gif",
                              "--quiet")
    assert code == 0 and Image.open(tmp_path / "demo.gif").n_frames == 9
    monkeypatch.chdir(tmp_path)  # --frames 1 writes vidiff.png by default; any supported aspect ratio
    code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--steps", 2, "--frames", 1, "--width", 32)
    assert code == 0 and "wrote vidiff.png" in out and "sampling" in err  # with the progress bar
    assert np.asarray(Image.open(tmp_path / "vidiff.png")).shape == (16, 32, 3)


def test_clips_are_sampled_and_written_a_batch_at_a_time(model, tmp_path, capsys, monkeypatch):
    """5000 prompts were sampled in one batch, which ran out of device memory after minutes, with no file written:
    now --batch-size clips at a time, each batch's files written before the next is sampled, and running out of
    memory is one line that says what to lower and what was written."""
    import jax

    import vidiff.pipeline

    prompts = [PROMPT, "a blue square moving up", "a green triangle moving right"]
    sample_latents, batches = vidiff.pipeline.sample_latents, []

    def spy(*args, **kwargs):  # the clips written when each batch starts, and its size
        batches.append((sorted(p.name for p in tmp_path.glob("*/*.mp4")), args[4].shape[0]))
        if len(batches) == 3:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 62060840000 bytes.")
        return sample_latents(*args, **kwargs)

    monkeypatch.setattr(vidiff.pipeline, "sample_latents", spy)
    code, out, err = generate(capsys, *prompts, "--checkpoint", model, "--steps", 2, "--quiet", "--batch-size", 2,
                              "--out", tmp_path / "a" / "demo.mp4", "--grid", tmp_path / "grid.png")
    assert code == 0, err
    assert batches == [([], 2), (["demo_0.mp4", "demo_1.mp4"], 2)]  # the last batch padded to one compiled shape
    assert [line.split("  ")[0] for line in out.splitlines()] == [
        f"wrote {tmp_path / 'a' / f'demo_{k}.mp4'}" for k in range(3)] + [f"wrote {tmp_path / 'grid.png'}"]
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (3 * 18 + 2, 9 * 18 + 2, 3)  # every batch's clips
    batches.clear()  # batch 3 runs out of memory
    code, out, err = generate(capsys, *prompts, "--checkpoint", model, "--steps", 2, "--quiet", "--batch-size", 1,
                              "--out", tmp_path / "b" / "demo.mp4")
    assert code == 2 and err.strip() == (
        "vidiff generate: error: the device ran out of memory sampling 1 clip(s) at once; lower --frames, --height "
        "or --width; the first 2 of 3 clip(s) were written")
    from vidiff.generate import _out_of_memory

    assert _out_of_memory(8, 16, 5000) == ("the device ran out of memory sampling 8 clip(s) at once; lower "
                                           "--batch-size (or --frames, --height, --width); the first 16 of 5000 "
                                           "clip(s) were written")
    # On 8 devices a batch of 8 is one clip each: lowering --batch-size would change nothing.
    assert _out_of_memory(8, 0, 100, devices=8) == ("the device ran out of memory sampling 8 clip(s) at once (1 on "
                                                    "each of 8 devices); lower --frames, --height or --width; the "
                                                    "first 0 of 100 clip(s) were written")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["demo_0.mp4", "demo_1.mp4"]


def test_devices_split_each_batch_and_write_the_clips_one_device_writes(model, inputs, tmp_path, capsys, monkeypatch):
    """`vidiff generate` sampled on one device whatever the machine had: --devices N splits every batch (rounded
    up to a multiple of N) over N devices, VAE decode included, and the clips are the one-device clips."""
    import vidiff.pipeline

    real_sample, real_compiled, seen = vidiff.pipeline.sample_latents, vidiff.pipeline.compiled, []

    def sample_spy(*args, **kwargs):  # the starting latents handed to the sampler: rows per device
        seen.append(("sample", sorted(shard.data.shape[0] for shard in args[4].addressable_shards)))
        return real_sample(*args, **kwargs)

    def compiled_spy(vae, method, *more):
        def run(variables, x):
            out = real_compiled(vae, method, *more)(variables, x)
            if method == "decode_normalized":
                seen.append(("decode", sorted(shard.data.shape[0] for shard in out.addressable_shards)))
            return out
        return run

    monkeypatch.setattr(vidiff.pipeline, "sample_latents", sample_spy)
    monkeypatch.setattr(vidiff.pipeline, "compiled", compiled_spy)
    grids = {}
    for devices in ("1", "2"):  # 3 clips in a batch of 3: on 2 devices, padded to 4, 2 on each
        seen.clear()
        code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--steps", 2, "--quiet", "--num", 3,
                                  "--batch-size", 3, "--devices", devices, "--image", inputs["image"],
                                  "--out", tmp_path / f"d{devices}.gif", "--grid", tmp_path / f"d{devices}.png")
        assert code == 0, err
        grids[devices] = np.asarray(Image.open(tmp_path / f"d{devices}.png")).astype(int)  # every frame, lossless
        assert seen == {"1": [("sample", [3]), ("decode", [3])], "2": [("sample", [2, 2]), ("decode", [2, 2])]}[devices]
    assert np.abs(grids["2"] - grids["1"]).max() <= 1  # other batch shapes: rounding, at most 1/255


@pytest.mark.parametrize("value, message", [
    ("0", "--devices=0 must be at least 1; give a device count such as 2, or all (the 8 cpu device(s) here)"),
    ("9", "--devices=9 is more than the 8 cpu device(s) here; give at most 8, or all"),
    ("2.5", "--devices=2.5 is not a whole number; give a device count such as 2, or all (the 8 cpu device(s) "
     "here)"),
    ("two", "--devices=two is not a whole number; give a device count such as 2, or all (the 8 cpu device(s) "
     "here)"),
])
def test_bad_devices_are_one_line_before_the_model_loads(value, message, capsys, monkeypatch):
    from vidiff.cli_flags import sampling_devices
    from vidiff.pipeline import TextToVideo

    monkeypatch.setattr(TextToVideo, "from_checkpoint", lambda *args, **kwargs: pytest.fail("the model loaded"))
    code, out, err = generate(capsys, PROMPT, "--devices", value)
    assert code == 2 and err.strip() == f"vidiff generate: error: {message}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        sampling_devices(value)
    # The tests' 8 virtual CPU devices share 2 cores: without --devices a CPU samples on one.
    assert (sampling_devices(None), sampling_devices("all"), sampling_devices(" ALL "), sampling_devices("3")) == (
        1, 8, 8, 3)


def test_scan_blocks_and_dtype_flags_load_the_dit_as_asked_and_write_the_same_image(model, tmp_path, capsys,
                                                                                     monkeypatch):
    import vidiff.pipeline

    loaded = []
    real = vidiff.pipeline.TextToVideo.from_checkpoint.__func__

    def spy(cls, *args, **kwargs):  # the flags as the library gets them, and what they built
        pipe = real(cls, *args, **kwargs)
        loaded.append((kwargs["scan_blocks"], kwargs["dtype"], pipe.dit.config.dtype, pipe.vae.config.dtype))
        return pipe

    monkeypatch.setattr(vidiff.pipeline.TextToVideo, "from_checkpoint", classmethod(spy))
    images = {}
    for flag in ("", "--scan-blocks", "--no-scan-blocks", "--dtype=bfloat16"):  # one frame as png: exact pixels
        out_path = tmp_path / f"image{len(images)}.png"
        code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--steps", 2, "--quiet", "--frames", 1,
                                  "--out", out_path, *([flag] if flag else []))
        assert code == 0, err
        images[flag] = np.asarray(Image.open(out_path)).astype(int)
    f32, bf16 = ("float32",) * 2, ("bfloat16",) * 2
    assert loaded == [(None, None, *f32), (True, None, *f32), (False, None, *f32), (None, "bfloat16", *bf16)]
    assert np.abs(images["--scan-blocks"] - images[""]).max() <= 1  # the same weights; rounding aside
    np.testing.assert_array_equal(images["--no-scan-blocks"], images[""])
    assert 0 < np.abs(images["--dtype=bfloat16"] - images[""]).max() <= 16  # bfloat16's rounding (test_pipeline)
    # A dtype the models do not compute in is one line, before the model loads.
    monkeypatch.setattr(vidiff.pipeline.TextToVideo, "from_checkpoint", lambda *a, **k: pytest.fail("the model loaded"))
    code, out, err = generate(capsys, PROMPT, "--dtype", "bf16")
    assert code == 2 and err.strip() == ("vidiff generate: error: --dtype=bf16 is not a compute dtype; use float32, "
                                         "bfloat16, float16, or no --dtype to compute as the model was trained")
    code, out, err = generate(capsys, PROMPT, "--dtype", "float16")  # XLA:CPU's matmuls take no float16
    assert code == 2 and err.strip() == ("vidiff generate: error: --dtype=float16 cannot compute on a CPU (XLA:CPU has "
                                         "no float16 matmul); use float32 or bfloat16 there")


def test_every_mode_from_files(model, inputs, tmp_path, capsys):
    modes = {
        "image": (["--image", inputs["image"]], 9),
        "extend": (["--extend", inputs["video"], "--direction", "backward", "--context-frames", 4], 9),
        "connect": (["--connect", inputs["video"], inputs["video"]], 9),
        "edit": (["--edit", inputs["video"], "--strength", 0.3], 9),
        "loop": (["--loop"], 8),
    }
    for name, (flags, frames) in modes.items():
        code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--steps", 2, "--quiet",
                                  "--out", tmp_path / f"{name}.gif", *flags)
        assert code == 0, (name, err)
        assert Image.open(tmp_path / f"{name}.gif").n_frames == frames, name


def _flags_of(record: dict) -> list:
    """The flags docs/cli.md maps a file's record back to: the same clip, sampled in a batch of as many clips
    (``--num`` and ``--batch-size`` its ``batch``: the clip is the first file) on as many devices."""
    sampling, dtype, mode = record["sampling"], record["dtype"], dict(record["mode"])
    flags = [record["prompt"], "--checkpoint", record["checkpoint"], "--seed", record["seed"],
             "--steps", sampling["steps"], "--guidance", sampling["guidance"], "--sampler", sampling["sampler"],
             "--frames", record["frames"], "--height", record["height"], "--width", record["width"],
             "--fps", record["fps"], "--devices", record["devices"], "--num", record["batch"],
             "--batch-size", record["batch"], "--quiet"]
    flags += ["--negative", record["negative"]] if record["negative"] is not None else []
    flags += ["--dtype", dtype["dit"]] if dtype["dit"] == dtype["vae"] else []
    flags += ["--loop"] if mode.pop("name") == "loop" else []
    for key, value in mode.items():
        flags += [f"--{key.replace('_', '-')}", *(value if isinstance(value, list) else [value])]
    return flags


def test_each_file_records_how_it_was_made_and_the_record_makes_it_again(model, inputs, tmp_path, capsys):
    """The files held no record of how they were made (steps, guidance, sampler, negative prompt, dtype, mode,
    model): each now holds its record (vidiff.io.read_record), the defaults filled in, and the flags it maps
    to make the same clip again."""
    import vidiff
    from vidiff.models.export import file_sha256

    prompts = [PROMPT, "a blue square moving up"]
    code, out, err = generate(capsys, *prompts, "--checkpoint", model, "--num", 2, "--batch-size", 4, "--quiet",
                              "--negative", "a green triangle", "--out", tmp_path / "a.gif", "--grid",
                              tmp_path / "grid.png")
    assert code == 0, err
    record = io.read_record(tmp_path / "a_3.gif")
    digests = {name: file_sha256(f"{model}/{name}") for name in ("dit.safetensors", "vae.safetensors", "vidiff.json")}
    assert record == {"prompt": prompts[1], "seed": 1, "vidiff": vidiff.__version__, "checkpoint": model,
                      "sha256": digests, "dtype": {"dit": "float32", "vae": "float32"},
                      "sampling": {"steps": 2, "guidance": 4.0, "sampler": "euler"},  # the model's defaults
                      "negative": "a green triangle", "mode": {"name": "text"}, "fps": 8.0, "batch_size": 4,
                      "devices": 1, "batch": 4, "frames": 9, "height": 16, "width": 16}
    grid = io.read_record(tmp_path / "grid.png")
    assert (grid["prompts"], grid["seeds"], grid["frames"]) == (prompts, [0, 1], 9)
    assert {k: grid[k] for k in ("checkpoint", "sampling", "mode")} == {k: record[k] for k in ("checkpoint",
                                                                                               "sampling", "mode")}
    assert generate(capsys, *_flags_of(record), "--out", tmp_path / "again.gif")[0] == 0
    np.testing.assert_array_equal(io.read_video(tmp_path / "again_0.gif")[0], io.read_video(tmp_path / "a_3.gif")[0])

    # A mode's flags as they were in force: --extend's default direction and context, --edit's strength. Gifs, not
    # mp4s: libx264 (PyAV 18) encodes the same frames to other bytes once the process has decoded an h264 file.
    for name, flags, mode in (
            ("extend", ["--extend", inputs["video"], "--frames", 5],
             {"name": "extend", "extend": inputs["video"], "direction": "forward", "context_frames": 1}),
            ("edit", ["--edit", inputs["video"]], {"name": "edit", "edit": inputs["video"], "strength": 0.6})):
        code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--quiet", "--out", tmp_path / f"{name}.gif",
                                  *flags)
        assert code == 0, err
        record = io.read_record(tmp_path / f"{name}.gif")
        assert record["mode"] == mode and record["fps"] == io.probe(inputs["video"]).fps
        assert generate(capsys, *_flags_of(record), "--out", tmp_path / f"{name}_again.gif")[0] == 0
        np.testing.assert_array_equal(io.read_video(tmp_path / f"{name}_again.gif")[0],
                                      io.read_video(tmp_path / f"{name}.gif")[0])
    code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--frames", 1, "--quiet", "--dtype", "float32",
                              "--out", tmp_path / "image.png")
    assert code == 0 and io.read_record(tmp_path / "image.png")["frames"] == 1


def test_weight_digests_are_remembered_beside_a_large_export_only(model, tmp_path, monkeypatch):
    """Hashing a multi-GB DiT on every run would cost seconds: its digests are kept beside it, keyed by path, size
    and modification time (the text encoder's memo); a small export's folder is left as it was written."""
    import json
    import shutil

    from vidiff import generate_record
    from vidiff.models.export import BUNDLED, file_sha256

    export = tmp_path / "export"
    shutil.copytree(model, export)
    digests = generate_record.weight_digests(export)
    assert digests == {name: file_sha256(export / name) for name in ("dit.safetensors", "vae.safetensors")}
    assert not (export / "weight-digests.json").exists()  # small: hashed each run
    monkeypatch.setattr(generate_record, "MEMO_BYTES", 0)
    assert generate_record.weight_digests(export) == digests
    memo = json.loads((export / "weight-digests.json").read_text())
    key = next(k for k in memo if k.startswith(f"{(export / 'dit.safetensors').resolve()}|"))
    (export / "weight-digests.json").write_text(json.dumps({**memo, key: "0" * 64}))  # read back, not rehashed
    assert generate_record.weight_digests(export)["dit.safetensors"] == "0" * 64
    before = sorted(p.name for p in BUNDLED.iterdir())
    generate_record.weight_digests(BUNDLED)
    assert sorted(p.name for p in BUNDLED.iterdir()) == before  # the package's own folder is never written


def test_clips_from_a_video_play_at_its_frame_rate(model, inputs, tmp_path, capsys):
    """--extend, --edit and --connect keep frames of their input: written at its rate (--connect: A's), not at 8
    fps, where a 24 fps input's kept frames played 3x slower; --fps still decides."""
    fast = str(io.write_video(tmp_path / "in24.mp4", io.read_video(inputs["video"])[0], 24.0))
    runs = {"extend": (["--extend", fast], 24), "edit": (["--edit", fast], 24),
            "connect": (["--connect", fast, inputs["video"]], 24), "connect_8": (["--connect", inputs["video"], fast], 8),
            "fps": (["--extend", fast, "--fps", 12], 12)}
    for name, (flags, fps) in runs.items():
        code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--steps", 2, "--quiet",
                                  "--out", tmp_path / f"{name}.mp4", *flags)
        assert code == 0, (name, err)
        assert io.probe(tmp_path / f"{name}.mp4").fps == fps, name


def test_a_negative_prompt_gives_what_the_library_gives(model, tmp_path, capsys):
    from tiny_model import tiny_pipeline

    images = {}
    for name, flags in (("plain", []), ("negative", ["--negative", "a blue square moving up"])):
        code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--steps", 2, "--quiet", "--frames", 1,
                                  "--out", tmp_path / f"{name}.png", *flags)  # one frame as png: exact pixels
        assert code == 0, err
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    want = tiny_pipeline()(PROMPT, num_frames=1, steps=2, negative_prompt="a blue square moving up")[0, 0]
    np.testing.assert_array_equal(images["negative"], want)
    assert np.abs(images["negative"].astype(int) - images["plain"]).max() > 0


def test_long_prompts_are_truncated_with_a_warning(model, tmp_path, capsys):
    code, out, err = generate(capsys, " ".join([PROMPT] * 4), "--checkpoint", model, "--steps", 2, "--quiet",
                              "--out", tmp_path / "long.gif")
    assert code == 0
    assert err.strip().splitlines() == [
        "vidiff generate: warning: the prompt is longer than the text encoder's 8 tokens; the model reads only "
        "'a red circle moving left a'"]


@pytest.mark.parametrize("argv,message", [
    (["   "], "the prompt is empty; describe the video, e.g. 'a red circle moving left'"),
    ([PROMPT, ""], "prompt 2 is empty"),
    ([PROMPT, "--edit", "{video}", "--strength", "1.5"], "--strength=1.5 must be in (0, 1]"),
    ([PROMPT, "--edit", "{video}", "--strength", "0"], "--strength=0.0 must be in (0, 1]"),
    ([PROMPT, "--strength", "0.5"], "--strength applies only to --edit VIDEO"),
    ([PROMPT, "--direction", "backward"], "--direction and --context-frames apply only to --extend VIDEO"),
    ([PROMPT, "--image", "{image}", "--frames", "1"], "--image with --frames 1 leaves nothing to animate (the image "
     "is the first frame); ask for more frames"),
    ([PROMPT, "--num", "0"], "--num=0 must be at least 1"),
    ([PROMPT, "--batch-size", "0"], "--batch-size=0 must be at least 1"),
    ([PROMPT, "--out", "{root}/notes.mp4/demo.mp4"], "cannot write {root}/notes.mp4/demo.mp4: {root}/notes.mp4 is a "
     "file, not a folder; choose another output path"),  # was "File exists"
    ([PROMPT, "--out", ""], "--out is empty; give a file name such as demo.mp4 (without --out: vidiff.mp4)"),
    ([PROMPT, "--grid", ""], "--grid is empty; give an image file name such as grid.png, or drop --grid"),
    ([PROMPT, "--frames", "1", "--out", "{root}/same.png", "--grid", "{root}/same.png"], "--grid {root}/same.png is "
     "also the --out file; give the grid its own name, e.g. {root}/same_grid.png"),
    ([PROMPT, "--out", "{root}"], "cannot write {root}: it is a directory"),
    ([PROMPT, "--out", "demo.avi"], "--out demo.avi: unknown suffix '.avi'; use .mp4, .webm, .gif or .png"),
    ([PROMPT, "--out", "demo.png"], "--out demo.png: a png holds one frame; use .mp4 or .gif, or --frames 1"),
    ([PROMPT, "--grid", "grid.gif"], "--grid grid.gif: the grid is one image; use .png or .jpg"),
    ([PROMPT, "--fps", "0.0001", "--out", "{root}/slow.gif"], "{root}/slow.gif: --fps=0.0001 does not fit a .gif "
     "file, which stores 0.001526 to 50 fps; choose a rate in that range or write .mp4"),
    ([PROMPT, "--fps", "60", "--out", "{root}/fast.gif"], "{root}/fast.gif: --fps=60 does not fit a .gif file"),
    ([PROMPT, "--fps", "0.00001"], "vidiff.mp4: --fps=1e-05 does not fit a .mp4 file, which stores 0.0001 to 1e+06"),
    ([PROMPT, "--extend", "{video60}", "--out", "{root}/ext.gif"], "{root}/ext.gif: --fps (default: {video60}'s "
     "rate)=60 does not fit a .gif file, which stores 0.001526 to 50 fps; choose a rate in that range or write .mp4"),
    ([PROMPT, "--image", "{root}/missing.png"], "{root}/missing.png: missing_file: no such file"),
    ([PROMPT, "--image", "{root}"], "{root} is a directory; give a video or image file"),
    ([PROMPT, "--extend", "{fake}"], "{fake}: not_video: FFmpeg cannot open it"),
    ([PROMPT, "--checkpoint", "{root}/nowhere"], "model directory {root}/nowhere does not exist"),
    ([PROMPT, "--checkpoint", "{root}"], "{root} is not a vidiff model directory (no vidiff.json)"),
    ([PROMPT, "--checkpoint", "{model}/dit.safetensors"], "model directory {model}/dit.safetensors is a file; pass the "
     "folder that holds vidiff.json: {model}"),
    ([PROMPT, "--checkpoint", "{root}/nowhere", "--image", "{m4v}"], "model directory {root}/nowhere does not exist"),
    ([PROMPT, "--image", "{root}/notes.png"], "{root}/notes.png: not_video: not a readable image (cannot identify "
     "image file '{root}/notes.png') nor video (corrupt: decoding failed"),
    ([PROMPT, "--checkpoint", "{model}", "--height", "20"], "this model cannot make height=20: it makes frames 1 + 4k "
     "(1, 5, 9, 13, 17, ...), height and width multiples of 8 (trained on 9 frames of 16x16)"),
    ([PROMPT, "--checkpoint", "{model}", "--loop", "--frames", "9"], "a loop of num_frames=9 cannot be made"),
    ([PROMPT, "--steps", "0"], "--steps=0 must be at least 1"),
    # One line, not argparse's usage block and error (choices=).
    ([PROMPT, "--sampler", "eulr"], "--sampler=eulr is unknown; use euler, heun or dpmpp_2m"),
    ([PROMPT, "--extend", "{video}", "--direction", "back"], "--direction=back is unknown; use forward or backward"),
    ([PROMPT, "--guidance", "nan"], "--guidance=nan must be a finite number (1 = off)"),
    ([PROMPT, "--negative", " "], "--negative is empty; give what the clips should not show, e.g. 'blurry', or "
     "drop --negative"),
    (["a red \udcff circle"], "the prompt is not valid UTF-8 (byte \\xff at position 6); pass UTF-8 text"),
    ([PROMPT, "--negative", "blurry \udcfe"], "--negative is not valid UTF-8 (byte \\xfe at position 7); pass UTF-8 "
     "text"),
    ([PROMPT, "--negative", "blurry", "--guidance", "1"], "--negative has no effect with --guidance 1 (no "
     "classifier-free guidance); raise --guidance, e.g. to 4, or drop --negative"),
    ([PROMPT, "--seed", "-1"], "--seed=-1 must be in [0, 2**32 - --num]"),
    ([PROMPT, "--fps", "0"], "--fps=0.0 must be a positive frame rate"),
    ([PROMPT, "--fps", "-8"], "--fps=-8.0 must be a positive frame rate"),
    ([PROMPT, "--checkpoint", "{model}", "--extend", "{video}", "--context-frames", "3"],
     "context_frames=3 does not fit extending forward here; use one of [1, 5]"),
])
def test_bad_input_is_one_line(argv, message, model, inputs, capsys):
    fill = {**inputs, "model": model}
    code, out, err = generate(capsys, *[a.format(**fill) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vidiff generate: error: "), err
    assert message.format(**fill) in lines[0]


@pytest.mark.parametrize("argv,message", [
    (["--extend", "{short}", "--direction", "backward"], "the video has 3 frame(s); extending backward needs at "
     "least 5"),
    (["--extend", "{video}", "--context-frames", "3"], "context_frames=3 does not fit extending forward here; use "
     "one of [1, 5] (the video's length and num_frames bound it)"),
    (["--connect", "{video}", "{short}"], "the second video has 3 frame(s); connecting needs at least 5"),
    (["--edit", "{video}", "--frames", "13"], "num_frames=13 is longer than the video (9 frames); use at most 9"),
    (["--loop", "--frames", "1"], "a loop of num_frames=1 cannot be made: loop lengths are 4m frames, at least 4 "
     "(the frame after the last is the first), e.g. 4 or 8"),
    (["--image", "{image}", "--height", "20"], "this model cannot make height=20: it makes frames 1 + 4k (1, 5, 9, "
     "13, 17, ...), height and width multiples of 8 (trained on 9 frames of 16x16)"),
])
def test_a_clip_the_model_cannot_make_is_refused_before_it_loads(argv, message, model, inputs, capsys,
                                                                monkeypatch):
    """These were refused by TextToVideo only after the model had loaded (7-12 s in): generate now checks sizes and
    its inputs' frame counts before, with the pipeline's rules read from vidiff.json, in the pipeline's words."""
    from vidiff.pipeline import TextToVideo

    monkeypatch.setattr(TextToVideo, "from_checkpoint", lambda *args, **kwargs: pytest.fail("the model loaded"))
    code, out, err = generate(capsys, PROMPT, "--checkpoint", model, *[a.format(**inputs) for a in argv])
    assert code == 2 and err.strip() == f"vidiff generate: error: {message}"


def test_a_video_whose_container_miscounts_its_frames_is_counted_by_decoding(model, inputs, capsys, monkeypatch):
    """The frame counts generate checks a mode with are those that decode. A container's count may be short (a
    webm's is its duration x its rate): a request the pipeline makes must not be refused for it. It may be long (a
    truncated file): that was trusted, and the pipeline refused the request only after the model had loaded."""
    import dataclasses

    import vidiff.generate
    from vidiff.pipeline import TextToVideo

    probe = io.probe
    monkeypatch.setattr(TextToVideo, "from_checkpoint", lambda *args, **kwargs: pytest.fail("the model loaded"))
    for counted in (2, 100):
        monkeypatch.setattr(io, "probe", lambda path: dataclasses.replace(probe(path), num_frames=counted))
        code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--connect", inputs["video"], inputs["short"])
        assert code == 2 and err.strip() == "vidiff generate: error: the second video has 3 frame(s); connecting " \
                                            "needs at least 5"
    monkeypatch.setattr(io, "probe", lambda path: dataclasses.replace(probe(path), num_frames=2))
    monkeypatch.setattr(TextToVideo, "from_checkpoint", lambda *args, **kwargs: _Loaded())
    monkeypatch.setattr(vidiff.generate, "run_settings", lambda *args: {})  # nothing is sampled to record
    for argv, method, kept in [(["--extend", inputs["video"]], "extend", {"video": 5}),
                               (["--extend", inputs["video"], "--direction", "backward"], "extend", {"video": 9}),
                               (["--connect", inputs["video"], inputs["video"]], "connect",
                                {"video_a": 1, "video_b": 5}),
                               (["--edit", inputs["video"]], "edit", {"video": 9}),
                               (["--image", inputs["image"]], "image_to_video", {"image": 1})]:
        _Loaded.calls.clear()
        code, out, err = generate(capsys, PROMPT, "--checkpoint", model, "--quiet", *argv)
        assert code == 0, err
        ((called, frames),) = _Loaded.calls  # the frames read before the load, each input decoded once
        assert called == method and {name: len(f) for name, f in frames.items()} == kept


class _Loaded:
    """A loaded pipeline that records which method got which frames (no sampling)."""
    calls = []

    def __getattr__(self, method):
        def record(prompts, **kwargs):
            self.calls.append((method, {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}))
        return record


def test_help_gives_frame_counts_for_any_time_factor(capsys):
    """The bundled model's VAE has time factor 1 (any count works); the help must not promise 1 + 4k only."""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "4k" not in text and "multiple of 4" not in text
    assert "frames per clip, 1 + k x the VAE's time factor tf (tf = 1 for the bundled model, 4 for the" in text
    assert "(forward 1 + tf k, backward tf k, for the VAE's time factor tf as in" in text
    assert "(--frames a multiple of the VAE's time factor: any count from 2 for the bundled model, 4, 8, ..." in text


def test_an_unquoted_prompt_is_pointed_out(capsys):
    """The shell splits ``vidiff generate a red circle``: warn before sampling one clip per word."""
    code, out, err = generate(capsys, "a", "red", "circle", "--out", "demo.avi")  # stops before the model loads
    assert code == 2 and err.splitlines()[0] == ('vidiff generate: warning: 3 one-word prompts, one clip each; for '
                                                 'one prompt, quote it: vidiff generate "a red circle"')


def test_an_empty_prompt_reads_as_the_pipeline_words_it_before_the_model_loads(model, capsys, monkeypatch):
    from vidiff.pipeline import TextToVideo

    with pytest.raises(ValueError) as raised:
        TextToVideo.from_checkpoint(model)([PROMPT, " "])

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the empty prompt was reported")

    monkeypatch.setattr(TextToVideo, "from_checkpoint", no_loading)
    code, out, err = generate(capsys, PROMPT, " ", "--checkpoint", model)
    assert code == 2 and err.strip() == f"vidiff generate: error: {raised.value}"
    assert str(raised.value) == "prompt 2 is empty; describe the video, e.g. 'a red circle moving left'"


def test_a_grid_path_that_is_a_folder_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A .jpg grid was checked as the .png beside it: a folder named grid.jpg failed only after sampling."""
    from vidiff.pipeline import TextToVideo

    (tmp_path / "grid.jpg").mkdir()
    monkeypatch.setattr(TextToVideo, "from_checkpoint", lambda *args, **kwargs: pytest.fail("the model loaded"))
    code, out, err = generate(capsys, PROMPT, "--out", str(tmp_path / "clip.mp4"), "--grid", str(tmp_path / "grid.jpg"))
    assert code == 2 and err.strip() == f"vidiff generate: error: cannot write {tmp_path / 'grid.jpg'}: it is a " \
                                        f"directory; give a file name"


def test_a_jpg_grid_too_small_for_its_record_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A jpg's comment holds 65533 bytes: a grid of many long prompts could not record them all."""
    from vidiff.pipeline import TextToVideo

    monkeypatch.setattr(TextToVideo, "from_checkpoint", lambda *args, **kwargs: pytest.fail("the model loaded"))
    prompts = [f"{PROMPT} number {k} " + "very " * 60 for k in range(200)]
    code, out, err = generate(capsys, *prompts, "--out", tmp_path / "clip.mp4", "--grid", tmp_path / "grid.jpg")
    assert code == 2 and re.fullmatch(rf"vidiff generate: error: {re.escape(str(tmp_path / 'grid.jpg'))}: the record "
                                      r"of how it was made takes \d+ bytes, more than a jpg's comment holds \(65533\); "
                                      r"write a \.png", err.strip()), err


def test_a_read_only_out_or_grid_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Refused only after sampling (by the writer, which no longer renames over a read-only file)."""
    from vidiff.pipeline import TextToVideo

    monkeypatch.setattr(TextToVideo, "from_checkpoint", lambda *args, **kwargs: pytest.fail("the model loaded"))
    for flag in ("--out", "--grid"):
        kept = tmp_path / f"kept{flag[2:]}.{'mp4' if flag == '--out' else 'png'}"
        kept.write_bytes(b"mine")
        kept.chmod(0o444)
        link = tmp_path / f"link{kept.suffix}"
        link.symlink_to(kept)  # through a link as well: its target is what would be written
        for given in (kept, link):
            args = [flag, str(given)] + (["--out", str(tmp_path / "clip.mp4")] if flag == "--grid" else [])
            code, out, err = generate(capsys, PROMPT, *args)
            assert code == 2 and err.strip() == f"vidiff generate: error: {given} could not be written: it is " \
                                                f"read-only; make it writable or choose another path"


def test_the_command_line_entry_point_never_shows_a_traceback():
    for prompt, message in [(" ", "the prompt is empty; describe the video, e.g. 'a red circle moving left'"),
                            (b"a red \xff circle", "the prompt is not valid UTF-8 (byte \\xff at position 6); pass "
                                                  "UTF-8 text")]:  # raw bytes, as a shell passes them
        result = subprocess.run([sys.executable, "-m", "vidiff.cli", "generate", prompt], capture_output=True,
                                text=True, cwd=REPO, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip() == f"vidiff generate: error: {message}"


def test_ctrl_c_is_one_line_and_the_shells_code(capsys, monkeypatch):
    """A KeyboardInterrupt (Ctrl-C while the model loads or compiles) printed a ~40-line traceback, and the
    interpreter's teardown after it often crashed in XLA (exit 139)."""
    import os

    from vidiff import generate as command

    import threading
    import time

    written = []

    def interrupted(args):
        print("wrote a.gif")
        threading.Thread(target=lambda: (time.sleep(0.3), written.append("cache"))).start()  # a background save
        raise KeyboardInterrupt

    def exits(code):
        raise SystemExit(code)

    monkeypatch.setattr(command, "run", interrupted)
    monkeypatch.setattr(os, "_exit", exits)
    with pytest.raises(SystemExit) as stopped:
        main(["generate", "a red ball"])
    assert stopped.value.code == 130
    assert written == ["cache"]  # finished before the exit, as a normal exit waits for it (os._exit would not)
    assert capsys.readouterr() == ("wrote a.gif\n", "vidiff generate: interrupted\nwaiting up to 60 s for 1 "
                                   "background write(s) to finish (Ctrl-C again: stop now)\n")


def test_unrecognized_arguments_name_only_the_bad_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", "c.py", "--configvae_train.steps=3", "--config.workdir=/tmp/w"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: vidiff plan ")  # the subcommand's usage and name, as its other errors give
    assert err[-1] == "vidiff plan: error: unrecognized arguments: --configvae_train.steps=3"
    # "--config.a.b 1", a space as other flags take: the left-over value is shown written with '='.
    for args, message in [(["--config.dit.overrides.depth", "3"], "write --config.dit.overrides.depth=3"),
                          (["--config.mesh.data", "2", "extra"],
                           "write --config.mesh.data=2; unrecognized arguments: extra")]:
        with pytest.raises(SystemExit):
            main(["plan", "--config", "c.py", "--config.workdir=/tmp/w", *args])
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"vidiff plan: error: a config override takes its value after '=': {message}")


def test_a_failed_run_leaves_no_output_folders_behind(tmp_path, capsys):
    # --out passes its check (which creates and tests the folders), then the missing --image stops the run.
    code, out, err = generate(capsys, PROMPT, "--out", tmp_path / "new" / "deeper" / "clip.mp4",
                              "--image", tmp_path / "missing.png")
    assert code == 2 and "missing_file" in err and not (tmp_path / "new").exists()
    from vidiff.cli_flags import check_writable
    from vidiff.generate import _check_output_file

    check_writable(tmp_path / "a" / "b" / "clip.mp4")  # writable, and still no folders until something is written
    assert list(tmp_path.iterdir()) == []
    # The output-file check is its own name: the suffix and frame count first, then check_writable.
    with pytest.raises(ValueError, match=r"^--out .*clip\.png: a png holds one frame; use \.mp4 or \.gif, or "
                       r"--frames 1 for an image$"):
        _check_output_file(tmp_path / "a" / "clip.png", frames=9)
    _check_output_file(tmp_path / "a" / "clip.png", frames=1)
    assert list(tmp_path.iterdir()) == []
