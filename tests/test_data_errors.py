"""User mistakes on the data side: one-line errors raised early, and nothing lost silently.

`vidiff prepare` (with and without --latents), empty manifests and shard folders,
truncated videos, 0-frame inputs, BOM manifests, TFDS names and DataConfig types.
"""
import json
import logging
import shutil
import types
from pathlib import Path

import av
import numpy as np
import pytest

from vidiff import io as vio
from vidiff.cli import main as cli_main
from vidiff.data import DataConfig, SkipLedger, make_pipeline, read_manifest, record_stream
from vidiff.train import precompute

ASSET = Path(__file__).resolve().parents[1] / "vidiff" / "assets" / "world_tiny"  # its VAE: 4x spatial, 1x time


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 33-frame 32x32 8 fps mp4 (moov first, so a cut copy still decodes), a copy cut in half, a manifest."""
    root = tmp_path_factory.mktemp("clips")
    frames = np.random.default_rng(0).integers(0, 256, (33, 32, 32, 3), dtype=np.uint8)
    with av.open(str(root / "full.mp4"), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = (root / "full.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) // 2])
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": name, "caption": f"clip {name}"}) + "\n"
                                for name in ("full.mp4", "full.mp4")))
    return root


def prepare(clips, out, *extra):
    return cli_main(["prepare", "--videos", str(clips), "--manifest", str(clips / "m.jsonl"), "--out", str(out),
                     "--size", "16", "--frames", "5", "--frame-format", "png", *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


# ----------------------------------------------------------------------- vidiff prepare
def test_prepare_out_file_and_max_pixels_are_flag_errors(clips, tmp_path, capsys):
    (tmp_path / "text.png").write_text("x")
    for extra in ((), ("--latents", str(ASSET))):
        assert prepare(clips, tmp_path / "text.png", *extra) == 2
        assert one_line_error(capsys) == f"vidiff prepare: error: --out {tmp_path / 'text.png'} is a file; give a directory"
    assert prepare(clips, tmp_path / "o", "--max-pixels", "0") == 2
    assert one_line_error(capsys).endswith("--max-pixels is invalid; use a positive pixel count, e.g. 8294400 (3840x2160)")
    assert not (tmp_path / "o").exists()


def test_empty_manifest_is_an_error_naming_it(clips, tmp_path, capsys):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "path,caption\n")):
        (tmp_path / name).write_text(text)
        code = cli_main(["prepare", "--videos", str(clips), "--manifest", str(tmp_path / name), "--out", str(tmp_path / "o")])
        assert code == 2 and f"--manifest {tmp_path / name} has no rows; add one clip per" in one_line_error(capsys)
        with pytest.raises(ValueError, match=rf"^data.manifest {tmp_path / name} has no rows"):
            make_pipeline({"source": "folder", "manifest": str(tmp_path / name), "video_dir": str(clips)})
    assert not (tmp_path / "o").exists()


def test_prepare_that_writes_nothing_fails_and_leaves_no_shards(clips, tmp_path, capsys):
    (tmp_path / "gone.jsonl").write_text('{"path": "a.mp4", "caption": "a"}\n{"path": "b.mp4", "caption": "b"}\n')
    code = cli_main(["prepare", "--videos", str(clips), "--manifest", str(tmp_path / "gone.jsonl"),
                     "--out", str(tmp_path / "o"), "--max-bad-fraction", "1"])
    assert code == 2
    assert one_line_error(capsys).endswith(f"--manifest {tmp_path / 'gone.jsonl'}: none of its 2 rows gave a clip "
                                           "(missing_file=2); fix the inputs (see the warnings logged per row)")
    assert list((tmp_path / "o").iterdir()) == []  # no shard, no summary
    code = cli_main(["prepare", "--videos", str(clips), "--manifest", str(tmp_path / "gone.jsonl"),
                     "--out", str(tmp_path / "o")])  # at the default limit: raising it would not help either
    assert code == 2 and one_line_error(capsys).endswith("100.0% of records were bad (2 of 2: missing_file=2); fix "
                                                         "the inputs (see the warnings logged per file)")


def test_zero_record_shard_folder_fails_when_the_source_is_built(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    ArrayRecordWriter(str(tmp_path / "train-00000-of-00001.array_record"), "group_size:1").close()
    with pytest.raises(ValueError, match=rf"^data.array_record_path: the 1 shard\(s\) in {tmp_path} hold no records; "
                                         r"run `vidiff prepare` again"):
        make_pipeline({"source": "array_record", "array_record_path": str(tmp_path)})


def test_shards_of_two_runs_in_one_folder_are_refused_and_one_picked_shard_is_read(tmp_path):
    from vidiff.data.shards import array_record_paths

    for name in ("train-00000-of-00002", "train-00001-of-00002", "train-00002-of-00003", "eval-00000-of-00001"):
        (tmp_path / f"{name}.array_record").touch()
    with pytest.raises(ValueError, match=rf"^data.array_record_path: {tmp_path} holds train-\*.array_record shards of 2 "
                                         r"runs \(-of-00002, -of-00003\): a `vidiff prepare` into it did not finish; "):
        array_record_paths(str(tmp_path), "train")
    assert len(array_record_paths(str(tmp_path), "eval")) == 1
    (tmp_path / "train-00002-of-00003.array_record").unlink()
    assert array_record_paths(str(tmp_path / "train-00001-of-00002.array_record"), "train") == [
        str(tmp_path / "train-00001-of-00002.array_record")]  # one shard of a whole set, picked on purpose


# ----------------------------------------------------------------------- vidiff prepare --latents
def _no_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("clips were decoded before the inputs were checked")

    monkeypatch.setattr(precompute.data_prepare, "prepare_shards", fail)


def test_latents_model_dir_and_clip_shape_are_checked_before_decoding(clips, tmp_path, capsys, monkeypatch):
    _no_decoding(monkeypatch)
    missing = tmp_path / "nope"
    assert prepare(clips, tmp_path / "o", "--latents", str(missing)) == 2
    assert one_line_error(capsys) == (f"vidiff prepare: error: --latents {missing} does not exist; give the export "
                                      "directory of a trained VAE (`vidiff train --model vae` writes <workdir>/export)")
    (tmp_path / "dit_only").mkdir()
    shutil.copy(ASSET / "vidiff.json", tmp_path / "dit_only")
    assert prepare(clips, tmp_path / "o", "--latents", str(tmp_path / "dit_only")) == 2
    assert f"--latents {tmp_path / 'dit_only'} has no vae.safetensors; give" in one_line_error(capsys)
    assert prepare(clips, tmp_path / "o", "--latents", str(ASSET), "--size", "30") == 2
    assert one_line_error(capsys).endswith(f"--size 30x30 does not fit the VAE in --latents {ASSET}: height and width "
                                           "must be divisible by 4; use e.g. --size 32x32")
    # A 4x-in-time VAE takes 1 + 4k frames (the weights are not needed to judge that).
    model = tmp_path / "tf4"
    shutil.copytree(ASSET, model)
    config = json.loads((model / "vidiff.json").read_text())
    config["models"]["vae"].update(temporal_down=[True, True], time_kernels=[3, 3, 3])  # its recorded fields
    (model / "vidiff.json").write_text(json.dumps(config))
    assert prepare(clips, tmp_path / "o", "--latents", str(model), "--frames", "6") == 2
    assert one_line_error(capsys).endswith("--frames 6 does not fit the VAE in --latents "
                                           f"{model}: it encodes 1 + k*4 frames; use e.g. --frames 5")
    assert not (tmp_path / "o").exists()


def _fake_fields(fail_after=None):
    calls = []

    def latent_fields(model_dir, model=None):
        def add(record):
            calls.append(record["id"])
            if fail_after is not None and len(calls) > fail_after:
                raise RuntimeError("encoder crashed")
            return {"latents": np.full((5, 4, 4, 4), len(calls), np.float32)}
        add.text = types.SimpleNamespace(captions_truncated=0)
        return add

    return latent_fields


def _old_shards(out):
    out.mkdir()
    (out / "train-00000-of-00001.array_record").write_bytes(b"old")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_latents_respects_overwrite_and_leaves_out_untouched_on_failure(clips, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    before = _old_shards(out)
    monkeypatch.setattr(precompute, "latent_fields", _fake_fields())
    assert prepare(clips, out, "--latents", str(ASSET)) == 2
    assert one_line_error(capsys).endswith(f"--out {out} already holds 1 train-*.array_record shards; "
                                           "pass --overwrite or choose an empty directory")
    monkeypatch.setattr(precompute, "latent_fields", _fake_fields(fail_after=1))
    with pytest.raises(RuntimeError, match="encoder crashed"):
        prepare(clips, out, "--latents", str(ASSET), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old shards kept, no staging folder left
    with pytest.raises(RuntimeError, match="encoder crashed"):
        prepare(clips, tmp_path / "new", "--latents", str(ASSET))
    assert not (tmp_path / "new").exists()


def test_latents_summary_names_the_real_out_and_the_model(clips, tmp_path, capsys, monkeypatch):
    from vidiff.train.latent_cache import vae_fingerprint

    out = tmp_path / "o"
    _old_shards(out)
    monkeypatch.setattr(precompute, "latent_fields", _fake_fields())
    assert prepare(clips, out, "--latents", str(ASSET), "--overwrite") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "train-summary.json").read_text())
    vae, variables, _ = precompute.load_vae_model(ASSET)
    for summary in (printed, saved):
        assert summary["out"] == str(out) and summary["latents_from"] == str(ASSET)
        assert summary["vae_fingerprint"] == vae_fingerprint(variables, vae.config)
        assert summary["written"] == 2 and summary["shards"] == ["train-00000-of-00001.array_record"]
    assert sorted(p.name for p in out.iterdir()) == ["train-00000-of-00001.array_record", "train-summary.json"]
    records = list(record_stream({"source": "array_record", "array_record_path": str(out), "num_frames": 5,
                                  "size": 16, "num_epochs": 1, "shuffle": False}))
    assert [float(r["latents"][0, 0, 0, 0]) for r in records] == [1.0, 2.0]



def test_latents_never_leave_an_old_summary_beside_new_shards(clips, tmp_path, monkeypatch):
    """A kill after the new shards moved in left the old summary beside them: its VAE fingerprint, which training
    checks the latents by, described shards that were gone. The old summary now goes before any shard moves."""
    out = tmp_path / "o"
    _old_shards(out)
    (out / "train-summary.json").write_text(json.dumps({"latents_from": "old/export", "vae_fingerprint": "0ld"}))
    monkeypatch.setattr(precompute, "latent_fields", _fake_fields())
    rename = Path.rename

    class Killed(BaseException):
        pass

    def killed_after_a_shard(self, target):
        rename(self, target)
        if Path(target).parent == out and Path(target).suffix == ".array_record":
            raise Killed
    monkeypatch.setattr(Path, "rename", killed_after_a_shard)
    with pytest.raises(Killed):
        prepare(clips, out, "--latents", str(ASSET), "--overwrite")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["train-00000-of-00001.array_record"]

# ----------------------------------------------------------------------- truncated video, 0 frames
def test_truncated_video_warns_by_default_and_raises_on_request(clips, caplog):
    cut = clips / "cut.mp4"
    assert vio.probe(cut).num_frames == 33
    with caplog.at_level(logging.WARNING, logger="vidiff.io"):
        frames, _ = vio.read_video(cut)
    assert 0 < len(frames) < 33
    [message] = [r.getMessage() for r in caplog.records if r.name == "vidiff.io"]
    assert message.startswith(f"{cut}: truncated: ") and "of the 4.12s the container claims" in message
    assert message.endswith(f"{len(frames)} of 33 frames decoded; using the {len(frames)} frames that decoded")
    with pytest.raises(vio.VideoReadError, match=r"of 33 frames decoded$") as err:
        vio.read_video(cut, truncated="error")
    assert err.value.reason == vio.TRUNCATED
    with pytest.raises(vio.VideoReadError, match=r"0 of 9 frames decoded$") as err:
        vio.read_video(cut, start=3)  # a window wholly past the cut: nothing to return, even with "warn"
    assert err.value.reason == vio.TRUNCATED
    # A window that ends before the cut is complete: nothing to judge.
    assert len(vio.read_video(cut, max_frames=5, truncated="error")[0]) == 5
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vidiff.io"):
        assert len(vio.read_video(clips / "full.mp4", fps=4, truncated="error")[0]) == 17
    assert not caplog.records


def test_truncated_training_clip_is_skipped_as_truncated(clips, tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": str(clips / "cut.mp4"), "caption": "cut"}) + "\n"
                                      + json.dumps({"path": str(clips / "full.mp4"), "caption": "full"}) + "\n")
    config = {"source": "folder", "manifest": str(tmp_path / "m.jsonl"), "fps": 8, "window": "first",
              "num_epochs": 1, "shuffle": False, "max_bad_fraction": 1.0}
    ledger = SkipLedger()
    assert [r["caption"] for r in record_stream({**config, "num_frames": 25, "size": 16}, skips=ledger)] == ["full"]
    assert ledger.skipped == {"truncated": 1}
    ledger = SkipLedger()  # the first 5 frames decode: the clip is whole
    assert len(list(record_stream({**config, "num_frames": 5, "size": 16}, skips=ledger))) == 2 and ledger.bad == 0


def test_extend_input_that_is_truncated_warns_once_and_is_used(clips, caplog):
    from vidiff.pipeline import TextToVideo

    with caplog.at_level(logging.WARNING, logger="vidiff.io"):
        frames = TextToVideo.load_frames(None, str(clips / "cut.mp4"), 16, 16, "extend")
    assert frames.shape[1:] == (16, 16, 3) and 0 < len(frames) < 33
    assert len([r for r in caplog.records if "truncated" in r.getMessage()]) == 1


def test_zero_frame_input_is_refused_with_one_line(tmp_path):
    for frames in (np.zeros((0, 32, 32, 3), np.uint8), np.zeros((2, 0, 32, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"^TextToVideo \(extend\): the (image/video has 0 frames|frames are 0x32 pixels)"):
            vio.check_frames(frames, "TextToVideo (extend)")
    with pytest.raises(ValueError, match=r"^vidiff.io: the image/video has 0 frames; give at least one \(H, W, 3\) frame$"):
        vio.write_video(tmp_path / "unused.gif", np.zeros((0, 8, 8, 3), np.uint8))
    assert not (tmp_path / "unused.gif").exists()


# ----------------------------------------------------------------------- manifests, TFDS, config
def test_manifest_with_a_byte_order_mark_reads(clips, tmp_path):
    (tmp_path / "excel.csv").write_bytes("path,caption\nfull.mp4,caf\u00e9\n".encode("utf-8-sig"))
    (tmp_path / "bom.jsonl").write_bytes((json.dumps({"path": "full.mp4", "caption": "x"}) + "\n").encode("utf-8-sig"))
    for name, caption in (("excel.csv", "caf\u00e9"), ("bom.jsonl", "x")):
        ledger = SkipLedger()
        rows = read_manifest(tmp_path / name, clips, ledger)
        assert [r.caption for r in rows] == [caption] and ledger.seen == 0


def test_missing_tfds_dataset_is_one_line(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError) as err:
        make_pipeline({"source": "tfds", "tfds_name": "ucf101", "tfds_data_dir": str(tmp_path)})
    assert str(err.value) == (f"data.tfds_name='ucf101' is not a registered TFDS dataset and no prepared copy is in "
                              f"data.tfds_data_dir='{tmp_path}'; check the name or data.tfds_data_dir")


@pytest.mark.parametrize("field,value,message", [
    ("shuffle", "no", "data.shuffle='no' is invalid; use True or False"),
    ("drop_remainder", "false", "data.drop_remainder='false' is invalid; use True or False"),
    ("tfds_download", 1, "data.tfds_download=1 is invalid; use True or False"),
    ("size", "64", r"data.size='64' is not a side or \(height, width\) of ints; e.g. data.size=64"),
    ("size", 32.5, r"data.size=32.5 is not a side or"),
    ("size", (32, 48, 3), r"data.size=\(32, 48, 3\) is not a side or"),
])
def test_config_types_are_checked(field, value, message):
    with pytest.raises(ValueError, match="^" + message):
        DataConfig.from_any({field: value})


def test_size_height_width_pair_runs_through_the_pipeline():
    config = DataConfig.from_any({"size": (32, 48), "num_frames": 3, "batch_size": 2, "world": {"length": 2},
                                  "num_epochs": 1})
    assert config.height_width == (32, 48) and DataConfig.from_any({"size": [16, 24]}).height_width == (16, 24)
    batch = next(iter(make_pipeline(config)))
    assert batch["video"].shape == (2, 3, 32, 48, 3)
