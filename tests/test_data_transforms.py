"""vidiff.data building blocks: buckets, windows, resize/crop, dropout, tokenise hook, schema bytes, config errors."""
import json
import logging

import numpy as np
import pytest

from vidiff.data import schema, skips
from vidiff.data.batching import batch_records
from vidiff.data.config import DataConfig
from vidiff.data.transforms import (
    BucketWindow, CaptionDropout, ResizeCrop, SampleImages, Tokenize, cover_size, nearest_bucket, parse_buckets,
    resample_indices, resize_crop, window_offset,
)


def ramp_video(t=10, h=12, w=20):
    """Frame i is filled with value i, so a window's frames reveal its indices."""
    video = np.zeros((t, h, w, 3), np.uint8)
    video += np.arange(t, dtype=np.uint8)[:, None, None, None]
    return video


def test_parse_buckets_accepts_tuples_and_strings_and_rejects_unknown():
    assert parse_buckets(None, (17, 32, 32)) == [(17, 32, 32)]
    assert parse_buckets(["9x16x32", (5, 32, 16)], (17, 32, 32)) == [(9, 16, 32), (5, 32, 16)]
    assert parse_buckets("9x16x32, 5x8x8", (1, 1, 1)) == [(9, 16, 32), (5, 8, 8)]
    with pytest.raises(ValueError, match=r"data.buckets: unknown bucket 'wide'; write buckets as 'FRAMESxHEIGHTxWIDTH'"):
        parse_buckets(["wide"], (17, 32, 32))
    with pytest.raises(ValueError, match="non-positive"):
        parse_buckets([(0, 8, 8)], (17, 32, 32))
    with pytest.raises(ValueError, match="repeats a bucket"):
        parse_buckets([(5, 8, 8), "5x8x8"], (17, 32, 32))


def test_nearest_bucket_by_aspect_then_longest_fitting_duration():
    buckets = [(9, 32, 32), (9, 24, 48), (5, 24, 48), (9, 48, 24)]
    assert nearest_bucket(buckets, 720, 1280, 100, 1) == 1  # 16:9 -> the 2:1 bucket, longest first
    assert nearest_bucket(buckets, 720, 1280, 6, 1) == 2  # only 6 frames: the 5-frame one
    assert nearest_bucket(buckets, 144, 176, 100, 1) == 0  # 1.22:1 -> square
    assert nearest_bucket(buckets, 640, 360, 100, 1) == 3  # portrait
    assert nearest_bucket(buckets, 720, 1280, 16, 2) == 2  # stride 2: 9 frames need 17 source frames
    assert nearest_bucket(buckets, 720, 1280, 4, 1) is None


def test_window_offset_modes():
    rng = np.random.default_rng(0)
    assert window_offset(10, "first", rng) == 0
    assert window_offset(10, "center", rng) == 5
    draws = {window_offset(3, "random", np.random.default_rng(s)) for s in range(40)}
    assert draws == {0, 1, 2, 3}


def test_bucket_window_cuts_stride_and_resamples_fps():
    record = schema.make_record(ramp_video(t=10), "a ramp", 10.0, "ramp")
    out = BucketWindow([(4, 8, 8)], stride=2, fps=None, window="first").random_map(record, np.random.default_rng(0))
    assert out["video"][:, 0, 0, 0].tolist() == [0, 2, 4, 6]
    assert out["fps"] == np.float32(5.0) and out["bucket"] == 0
    out = BucketWindow([(4, 8, 8)], stride=1, fps=5.0, window="center").random_map(record, np.random.default_rng(0))
    # 10 frames at 10 fps -> 5 frames at 5 fps (indices 0, 2, 4, 6, 8); centred window of 4 of them
    assert out["video"][:, 0, 0, 0].tolist() == [0, 2, 4, 6] and out["fps"] == np.float32(5.0)
    # an instant exactly between two frames takes the earlier one, as decoding a file does
    assert resample_indices(10, 10.0, 20.0).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    short = BucketWindow([(12, 8, 8)]).random_map(record, np.random.default_rng(0))
    assert isinstance(short, skips.Skip) and short.reason == skips.TOO_SHORT and short.key == "ramp"
    grey = dict(record, video=np.zeros((4, 8, 8, 1), np.uint8))
    assert BucketWindow([(4, 8, 8)]).random_map(grey, np.random.default_rng(0))["video"].shape == (4, 8, 8, 3)
    floats = dict(record, video=np.zeros((4, 8, 8, 3), np.float32))
    assert BucketWindow([(4, 8, 8)]).random_map(floats, np.random.default_rng(0)).reason == skips.BAD_ARRAY


def test_bucket_window_takes_an_evenly_stepped_window_as_a_read_only_view():
    """A window at a stride, or the whole clip, is a view of the source's frames, not a copy of them; the stages
    after it leave the source's clip as it was, and one that wrote into the view would fail."""
    video = ramp_video(t=10, h=8, w=8)
    record = schema.make_record(video, "a ramp", 10.0, "ramp")
    rng = np.random.default_rng(0)
    cases = [(BucketWindow([(10, 8, 8)]), list(range(10))),  # the whole stored clip
             (BucketWindow([(4, 8, 8)], stride=2, window="first"), [0, 2, 4, 6]),
             (BucketWindow([(4, 8, 8)], fps=5.0, window="center"), [0, 2, 4, 6]),  # resampled evenly
             (BucketWindow([(3, 8, 8)], fps=15.0, window="first"), [0, 1, 1])]  # resampled unevenly: copied
    for window, frames in cases:
        out = window.random_map(record, rng)
        assert out["video"][:, 0, 0, 0].tolist() == frames
        assert np.shares_memory(out["video"], video) == (frames != [0, 1, 1])
        staged = CaptionDropout(0.0).random_map(ResizeCrop(window.buckets).random_map(out, rng), rng)
        assert np.array_equal(batch_records([staged, staged])["video"][0], video[frames])
        if staged["video"].flags.writeable:  # a copy: the stride's frames made contiguous, or resampled
            staged["video"][...] = 255
        else:
            with pytest.raises(ValueError, match="read-only"):
                staged["video"][0, 0, 0, 0] = 255
    assert not BucketWindow([(10, 8, 8)]).random_map(record, rng)["video"].flags.writeable
    assert np.array_equal(record["video"], ramp_video(t=10, h=8, w=8)) and record["video"].flags.writeable


def test_resize_crop_shorter_side_then_centre_or_random_crop():
    assert cover_size(720, 1280, 32, 32) == (32, 57)
    assert cover_size(100, 50, 32, 48) == (96, 48)
    video = np.zeros((2, 10, 40, 3), np.uint8)
    video[:, :, 15:25] = 255  # a bright centre band survives a centre crop
    out = resize_crop(video, 10, 10, "center", None)
    assert out.shape == (2, 10, 10, 3) and out[:, :, 2:8].min() == 255
    ramp = np.tile(np.arange(40, dtype=np.uint8)[None, None, :, None], (1, 10, 1, 3))
    lefts = {int(resize_crop(ramp, 10, 10, "random", np.random.default_rng(s))[0, 0, 0, 0]) for s in range(400)}
    assert lefts == set(range(31))  # every offset, both edges included (each ~13 times in 400 draws)
    record = {"video": ramp_video(2, 24, 24), "bucket": np.int32(1)}
    assert ResizeCrop([(2, 8, 8), (2, 12, 6)]).random_map(record, None)["video"].shape == (2, 12, 6, 3)


def test_resize_crop_resizes_through_vidiff_io_only_when_the_size_changes(monkeypatch):
    from vidiff import io as vio

    sizes = []
    real = vio.resize_frames
    monkeypatch.setattr(vio, "resize_frames", lambda frames, h, w: sizes.append((h, w)) or real(frames, h, w))
    video = np.zeros((2, 10, 40, 3), np.uint8)
    assert resize_crop(video, 10, 10, "center", None).shape == (2, 10, 10, 3)
    assert resize_crop(video, 5, 20, "center", None).shape == (2, 5, 20, 3)
    assert np.shares_memory(resize_crop(video, 10, 40, "center", None), video)  # already the size: no Pillow pass
    assert sizes == [(5, 20)]  # the one resize of vidiff (bicubic, Pillow), not a copy in vidiff.data


def test_sample_images_takes_any_frame_into_the_image_bucket():
    sample = SampleImages([(4, 8, 8), (1, 8, 8)], fraction=1.0, seed=0)
    images = [sample.map_with_index(i, {"video": ramp_video(12, 8, 8), "bucket": np.int32(0)}) for i in range(200)]
    assert {int(image["video"][0, 0, 0, 0]) for image in images} == set(range(12))  # each ~17 times in 200
    assert all(image["video"].shape == (1, 8, 8, 3) and image["bucket"] == 1 for image in images)


def test_caption_dropout_rate_and_determinism():
    record = {"caption": "a red ball"}
    dropout = CaptionDropout(0.3)
    drops = [bool(dropout.random_map(record, np.random.default_rng(i))["caption_dropped"]) for i in range(2000)]
    assert 0.26 < np.mean(drops) < 0.34
    again = [bool(dropout.random_map(record, np.random.default_rng(i))["caption_dropped"]) for i in range(2000)]
    assert drops == again
    dropped = next(dropout.random_map(record, np.random.default_rng(i)) for i in range(2000) if drops[i])
    assert dropped["caption"] == "" and record["caption"] == "a red ball"
    assert not any(CaptionDropout(0.0).random_map(record, np.random.default_rng(i))["caption_dropped"] for i in range(50))


def test_tokenize_hook_forms():
    def ids_only(caption):
        return [len(caption), 0, 0]

    assert Tokenize(ids_only).map({"caption": "abc"})["token_mask"].tolist() == [True, True, True]
    pair = Tokenize(lambda c: ([1, 2], [1, 0])).map({"caption": "x"})
    assert pair["token_ids"].dtype == np.int32 and pair["token_mask"].tolist() == [True, False]
    hf = Tokenize(lambda c: {"input_ids": [5, 6], "attention_mask": [1, 1]}).map({"caption": "x"})
    assert hf["token_ids"].tolist() == [5, 6]
    skip = skips.Skip("x", "y")
    assert Tokenize(ids_only).map(skip) is skip


def test_record_bytes_roundtrip_png_exact_jpeg_close_and_extra_arrays():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (3, 8, 12, 3), dtype=np.uint8)
    latents = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    mask = np.array([True, False, True])
    labels = {"shape": "ball", "count": np.int64(2), "score": np.float32("nan"), "depth": [float("inf"), 1.5]}
    record = schema.make_record(video, "un café ☕", 8, "clip-1", labels, latents=latents, text_mask=mask)
    back = schema.decode_record(schema.encode_record(record, frame_format="png"))
    assert np.array_equal(back["video"], video) and back["caption"] == "un café ☕" and back["id"] == "clip-1"
    # A label's NaN and inf come back as they were (not as None, which a training log's JSON writes).
    score = back["labels"].pop("score")
    assert np.isnan(score) and back["labels"] == {"shape": "ball", "count": 2, "depth": [float("inf"), 1.5]}
    assert back["fps"] == np.float32(8)
    assert np.array_equal(back["latents"], latents) and back["latents"].dtype == np.float32
    assert back["text_mask"].tolist() == [True, False, True]
    smooth = np.tile(np.linspace(0, 255, 12, dtype=np.uint8)[None, None, :, None], (3, 8, 1, 3))
    jpeg = schema.decode_record(schema.encode_record(schema.make_record(smooth, "c", 8, "j"), quality=95))
    assert np.abs(jpeg["video"].astype(int) - smooth).mean() < 3
    data = schema.encode_record(record, frame_format="png")
    for damaged, message in ((b"junk", r"^not a vidiff record \(bad magic bytes\)$"),
                             (data[:-5], r"^array latents is truncated$"),  # (the last blob)
                             (data[:4] + b"\xff\xff\x00\x00" + data[8:],  # a header length past the end
                              r"^damaged record \(UnicodeDecodeError: ")):
        with pytest.raises(ValueError, match=message):
            schema.decode_record(damaged)
    # Without its frames: the header's clip shape in place of the video, every other field as a full read gives it.
    lean = schema.decode_record(data, frames=False)
    full = schema.decode_record(data)
    assert lean["video_shape"].tolist() == [3, 8, 12, 3] and "video" not in lean
    assert sorted(lean) == sorted({*full, "video_shape"} - {"video"}) and lean["fps"] == full["fps"]
    assert all(np.array_equal(lean[k], full[k]) for k in ("latents", "text_mask")) and lean["latents"].flags.writeable
    with pytest.raises(ValueError, match=r"^array latents is truncated$"):
        schema.decode_record(data[:-5], frames=False)
    head_len = int.from_bytes(data[4:8], "little")
    header = json.loads(data[8 : 8 + head_len])
    header["video"]["sizes"].pop()  # a frame's blob no longer named: the array blobs would be read from its bytes
    head = json.dumps(header).encode()
    with pytest.raises(ValueError, match=r"^the header lists 2 frames for its video shape \[3, 8, 12, 3\]$"):
        schema.decode_record(data[:4] + len(head).to_bytes(4, "little") + head + data[8 + head_len :], frames=False)
    # Bucketed by its stored shape: the whole clip, or skipped when a bucket would cut what its latents belong to.
    rng = np.random.default_rng(0)
    kept = ResizeCrop([(3, 8, 12)]).random_map(BucketWindow([(3, 8, 12)]).random_map(lean, rng), rng)
    assert kept["bucket"] == 0 and kept["fps"] == np.float32(8) and "video" not in kept
    cut = BucketWindow([(2, 8, 12)], window="first").random_map(lean, rng)
    assert cut.reason == skips.BAD_ARRAY and cut.detail == ("its latents belong to its stored 3x8x12 clip, which "
                                                            "bucket 2x8x12 at frame_stride=1, fps=None would cut")
    assert BucketWindow([(4, 8, 12)]).random_map(lean, rng).reason == skips.TOO_SHORT
    frames_only = schema.encode_record(schema.make_record(video, "x", 8, "clip-1"), frame_format="png")
    with pytest.raises(ValueError, match=r"^frame 2 is truncated$"):  # PIL alone decodes a PNG missing its end
        schema.decode_record(frames_only[:-5])
    assert b"pickle" not in data and data[:4] == b"VDR1"


def test_batch_records_stacks_arrays_and_keeps_text_as_str_objects():
    records = [{"video": np.full((2, 4, 4, 3), i, np.uint8), "caption": f"c{i}", "fps": np.float32(8),
                "labels": {"shape": "ball", "n": i}} for i in range(3)]
    batch = batch_records(records)
    assert batch["video"].shape == (3, 2, 4, 4, 3) and batch["fps"].dtype == np.float32
    assert batch["caption"].dtype == object and list(batch["caption"]) == ["c0", "c1", "c2"]
    assert type(batch["caption"][0]) is str and batch["labels"]["n"].tolist() == [0, 1, 2]


def test_skip_ledger_counts_logs_and_limits(caplog, tmp_path):
    ledger = skips.SkipLedger()
    with caplog.at_level(logging.WARNING, logger="vidiff.data"):
        for item in [{"ok": 1}, skips.Skip("not_video", "a.mp4", "text"), skips.Skip("not_video", "a.mp4"), {"ok": 2}]:
            ledger.count(item)
    assert (ledger.seen, ledger.bad, ledger.skipped) == (4, 2, {"not_video": 2})
    assert caplog.text.count("skipped a.mp4: not_video") == 1  # one line per file, not per epoch
    ledger.check(0.5, field="data.max_bad_fraction")
    with pytest.raises(ValueError, match=r"^50.0% of records were bad \(2 of 4: not_video=2\), above the limit max_bad_fraction=0.4;.*raise data.max_bad_fraction$"):
        ledger.check(0.4, field="data.max_bad_fraction")
    ledger.check(0.4, field="data.max_bad_fraction", min_records=5)  # too few records to judge yet
    with pytest.raises(ValueError, match=r"^50.0% of records were bad"):  # judged from min_records on
        ledger.check(0.4, field="data.max_bad_fraction", min_records=4)
    all_bad = skips.SkipLedger()  # no limit lets a record through: raising it is no fix, and is not offered
    for item in [skips.Skip("too_short", "a"), skips.Skip("too_short", "b")]:
        all_bad.count(item)
    with pytest.raises(ValueError, match=r"^100.0% of records were bad \(2 of 2: too_short=2\); fix the inputs "
                                         r"\(see the warnings logged per file\)$"):
        all_bad.check(0.1, field="data.max_bad_fraction")
    # Cross-process aggregation: a copy (as a worker gets) starts at zero and writes its own file.
    shared = skips.SkipLedger(tmp_path)
    shared.skip(skips.Skip("corrupt", "b.mp4"))
    (tmp_path / "skips-999999.json").write_text(json.dumps({"seen": 7, "skipped": {"corrupt": 2, "too_short": 1}}))
    import pickle
    assert pickle.loads(pickle.dumps(shared)).seen == 0
    assert shared.totals() == {"seen": 8, "skipped": {"corrupt": 3, "too_short": 1}, "bad": 4}


def test_check_caption_reasons():
    assert skips.check_caption("a cat") == "a cat"
    assert skips.check_caption(b"caf\xc3\xa9") == "café"
    assert skips.check_caption(None)[0] == skips.MISSING_CAPTION
    assert skips.check_caption(7)[0] == skips.MISSING_CAPTION
    assert skips.check_caption("  ")[0] == skips.EMPTY_CAPTION
    assert skips.check_caption(b"\xff\xfe")[0] == skips.NON_UTF8_CAPTION
    assert skips.check_caption("caf\udce9")[0] == skips.NON_UTF8_CAPTION


@pytest.mark.parametrize("overrides, message", [
    ({"source": "webdataset"}, r"^data.source='webdataset' is invalid; use one of world, folder, array_record, tfds, "
                               r"or register yours with vidiff.data.register_source$"),
    ({"num_frames": 0}, r"data.num_frames=0 is invalid"),
    ({"size": "big"}, r"data.size='big' is not a side or \(height, width\)"),
    ({"window": "middle"}, r"data.window='middle' is invalid; use one of random, first, center"),
    ({"caption_dropout": 1.5}, r"data.caption_dropout=1.5 is invalid; use a probability"),
    ({"batch_size": 0}, r"data.batch_size=0 is invalid"),
    ({"num_epochs": 0}, r"data.num_epochs=0 is invalid; use an int >= 1, or None"),
    ({"max_bad_fraction": 2}, r"data.max_bad_fraction=2 is invalid"),
    ({"prefetch_to_device": -1}, r"^data.prefetch_to_device=-1 is invalid; use an int >= 0 \(0 = prepare each "
                                 r"batch on the main thread\)$"),
    ({"prefetch_to_device": 2.0}, r"^data.prefetch_to_device=2.0 is invalid; use an int >= 0"),
    ({"buckets": ["17x32"]}, r"data.buckets: unknown bucket '17x32'"),
    ({"source": "folder"}, r"data.manifest=None is invalid; set it to a .jsonl or .csv manifest"),
    ({"num_frame": 17}, r"data config has unknown field\(s\) \['num_frame'\]"),
])
def test_config_mistakes_raise_one_line_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        DataConfig.from_any({**overrides})
    assert "\n" not in str(info.value)


def test_config_accepts_configdict_dataclass_and_objects():
    import ml_collections

    cfg = ml_collections.ConfigDict({"num_frames": 9, "size": (16, 24), "world": {"seed": 3}})
    parsed = DataConfig.from_any(cfg)
    assert parsed.num_frames == 9 and parsed.height_width == (16, 24) and parsed.world == {"seed": 3}
    assert parsed.bucket_list() == [(9, 16, 24)]
    assert DataConfig.from_any(parsed) == parsed

    class Attrs:
        def __init__(self):
            self.batch_size = 3

    assert DataConfig.from_any(Attrs()).batch_size == 3
    # Whole numbers are vidiff.checks.is_int's: a numpy int is one, a bool is not.
    import vidiff.checks
    import vidiff.data.config

    assert vidiff.data.config.is_int is vidiff.checks.is_int
    assert DataConfig.from_any({"num_frames": np.int64(9), "size": (np.int32(16), 24)}).height_width == (16, 24)
    with pytest.raises(ValueError, match=r"^data.batch_size=True is invalid; use an int >= 1$"):
        DataConfig.from_any({"batch_size": True})
