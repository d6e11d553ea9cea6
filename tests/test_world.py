"""The built-in captioned world: exact pixels, determinism, held-out splits, captions, the scorer, the CLI."""
import json
import re

import ml_collections
import numpy as np
import pytest

from vidiff.data import world as W
from vidiff.data import world_score


def _labels_of(record):
    """Record labels in the form render/caption/score take (objects folded back in)."""
    return {**record["labels"], **({"objects": record["objects"]} if "objects" in record else {})}


def _degrade(video, rng, noise=12.0, cast=25.0):
    """What a generator might produce: 3x3 blur, a colour cast over the clip, per-pixel noise."""
    x = video.astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    x = sum(padded[:, i : i + x.shape[1], j : j + x.shape[2]] for i in range(3) for j in range(3)) / 9
    x = x + rng.uniform(-cast, cast, 3) + rng.normal(0, noise, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def test_pixels_are_exactly_background_and_palette_colour():
    world = W.CaptionedWorld(W.WorldConfig(held_out="include"))
    for index in range(12):
        record = world[index]
        video = record["video"]
        assert video.dtype == np.uint8 and video.shape == (17, 32, 32, 3)
        colours = {tuple(c) for c in np.unique(video.reshape(-1, 3), axis=0)}
        assert colours == {W.BACKGROUND, W.COLORS[record["labels"]["color"]]}
    assert W.COLORS["red"] == (230, 40, 40) and W.COLORS["cyan"] == (40, 210, 220)


def test_same_index_gives_identical_record():
    config = W.WorldConfig(size=64, num_frames=5, length=1000)
    a, b = W.CaptionedWorld(config)[123], W.CaptionedWorld(config)[123]
    np.testing.assert_array_equal(a["video"], b["video"])
    assert a["caption"] == b["caption"] and a["id"] == "world-000123"
    assert a["labels"]["color"] == b["labels"]["color"]
    np.testing.assert_array_equal(a["labels"]["start"], b["labels"]["start"])
    assert a["labels"]["start"].dtype == np.int32 and a["fps"] == np.float32(8.0)
    other_seed = W.CaptionedWorld(W.WorldConfig(size=64, num_frames=5, length=1000, seed=1))
    assert not np.array_equal(a["video"], other_seed[123]["video"])
    world = W.CaptionedWorld(config)
    assert len(world) == 1000
    np.testing.assert_array_equal(world[-1]["video"], world[999]["video"])
    with pytest.raises(IndexError):
        world[1000]


def test_held_out_combinations_respected():
    def combos(config, n):
        return [(lab["color"], lab["shape"], lab["direction"]) for lab in (W.sample_labels(i, config) for i in range(n))]

    assert not set(combos(W.WorldConfig(held_out="exclude"), 3000)) & set(W.HELD_OUT)
    only = combos(W.WorldConfig(held_out="only"), 300)
    assert set(only) == set(W.HELD_OUT)
    assert set(combos(W.WorldConfig(held_out="include"), 3000)) & set(W.HELD_OUT)
    two = W.WorldConfig(held_out="exclude", num_objects=2)
    for i in range(200):
        for obj in W.sample_labels(i, two)["objects"]:
            assert (obj["color"], obj["shape"], obj["direction"]) not in W.HELD_OUT


@pytest.mark.parametrize("size", [32, 64, 128])
def test_object_stays_inside_and_travels_half_the_frame(size):
    config = W.WorldConfig(size=size, held_out="include", length=64)
    seen = set()
    for index in range(48 if size < 128 else 16):
        labels = W.sample_labels(index, config)
        seen.add(labels["size"])
        video = W.render(labels, config)
        side = W.sprite_size(labels["size"], size)
        track = W.object_track(labels, config)
        assert (track - side // 2 >= 0).all() and (track - side // 2 + side <= size).all()
        mask = np.any(video != np.array(W.BACKGROUND, np.uint8), axis=-1)
        counts = mask.sum((1, 2))
        assert (counts == W.sprite_mask(labels["shape"], side).sum()).all()  # never clipped by the border
        first, last = np.argwhere(mask[0]).mean(0), np.argwhere(mask[-1]).mean(0)
        np.testing.assert_allclose(last - first, size // 2 * np.array(W.MOTION[labels["direction"]]), atol=1e-9)
        np.testing.assert_array_equal(track[0], labels["start"])
    assert seen == set(W.SIZES)
    assert abs(W.sprite_size("small", size) - 0.25 * size) <= 0.5
    assert abs(W.sprite_size("large", size) - 0.4 * size) <= 0.5


def test_scorer_is_exact_on_rendered_clips():
    shapes_seen, sizes_seen = set(), set()
    every_shape = W.SHAPES + W.DIGITS
    for size, count, objects in [(32, 120, 1), (64, 40, 1), (128, 12, 1), (32, 30, 2), (64, 8, 2)]:
        world = W.CaptionedWorld(W.WorldConfig(size=size, digits=True, held_out="include", num_objects=objects))
        for index in range(count):
            record = world[index]
            labels = _labels_of(record)
            # Odd records: a circle must not even pass for a digit when digits are allowed answers.
            shapes = every_shape if index % 2 else None
            result = world_score.score(record["video"], labels, shapes=shapes)
            assert result["all"], (size, index, labels["shape"], result["predicted"])
            for obj in labels.get("objects", [labels]):
                shapes_seen.add(obj["shape"])
                sizes_seen.add((size, obj["size"]))
    assert set(W.SHAPES) <= shapes_seen and len(shapes_seen & set(W.DIGITS)) >= 8
    assert sizes_seen == {(s, z) for s in (32, 64, 128) for z in W.SIZES}


def test_scorer_reports_predictions_and_rejects_wrong_labels():
    record = W.CaptionedWorld(W.WorldConfig(held_out="include"))[3]
    video, labels = record["video"], record["labels"]
    result = world_score.score(video, labels)
    predicted = result["predicted"]
    assert (predicted["color"], predicted["shape"], predicted["direction"]) == (
        labels["color"], labels["shape"], labels["direction"])
    expected_fill = {"circle": 0.785, "square": 1.0, "triangle": 0.5}[labels["shape"]]
    assert abs(predicted["fill"] - expected_fill) < 0.15
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    flipped = world_score.score(video, {**labels, "direction": opposite[labels["direction"]]})
    assert flipped["direction"] is False and flipped["color"] and flipped["shape"] and not flipped["all"]
    other_colour = next(c for c in W.COLORS if c != labels["color"])
    assert world_score.score(video, {**labels, "color": other_colour})["color"] is False
    other_shape = next(s for s in W.SHAPES if s != labels["shape"])
    assert world_score.score(video, {**labels, "shape": other_shape})["shape"] is False
    # Another object recoloured in the pixels: the scorer names the colour it sees.
    recoloured = W.render({**labels, "color": other_colour}, W.WorldConfig())
    assert world_score.score(recoloured, labels)["predicted"]["color"] == other_colour
    static = np.repeat(video[:1], len(video), axis=0)
    assert world_score.score(static, labels)["predicted"]["direction"] == "none"
    empty = world_score.score(np.full_like(video, 32), labels)
    assert empty["predicted"]["color"] is None and not empty["all"]
    # Grey and white lie off every palette hue (magenta, the nearest, 29 degrees away): no colour, not magenta.
    drawn = (video == np.array(W.COLORS[labels["color"]], np.uint8)).all(-1, keepdims=True)
    for grey in ((255, 255, 255), (160, 160, 160)):
        greyed = world_score.score(np.where(drawn, np.array(grey, np.uint8), video), labels)
        assert greyed["predicted"]["color"] is None and greyed["color"] is False and not greyed["all"]


def _chipped_square(side, cut):
    """A ``side`` px square missing a staircase of ``cut`` pixels (1, 3, ...) at each corner."""
    mask = np.ones((side, side), bool)
    for i in range(cut):
        for j in range(cut - i):
            mask[[i, i, -1 - i, -1 - i], [j, -1 - j, j, -1 - j]] = False
    return mask


@pytest.mark.parametrize("side, cut", [(8, 1), (13, 2)])
def test_scorer_reads_small_squares_with_chipped_corners_as_squares(side, cut):
    # Against ideal 64 px templates these read as circles (the renderer's 8 px circle fills 0.81 of its box).
    mask = _chipped_square(side, cut)
    video = np.repeat(np.array(W.BACKGROUND, np.uint8)[None, None, None], 17, 0).repeat(32, 1).repeat(32, 2)
    for t in range(17):
        video[t, 10 : 10 + side, t : t + side][mask] = W.COLORS["green"]
    result = world_score.score(video, {"color": "green", "shape": "square", "direction": "right"})
    assert result["predicted"]["shape"] == "square" and result["all"], result["predicted"]


def test_scorer_survives_blur_noise_and_colour_cast():
    rng = np.random.default_rng(0)
    for size in (32, 64):
        world = W.CaptionedWorld(W.WorldConfig(size=size, held_out="include", seed=5))
        right = [world_score.score(_degrade(world[i]["video"], rng), world[i]["labels"])["all"] for i in range(60)]
        assert np.mean(right) >= 0.9, (size, np.mean(right))


def test_single_frame_direction_is_not_checkable():
    config = W.WorldConfig(num_frames=1, held_out="include")
    record = W.CaptionedWorld(config)[0]
    assert record["video"].shape == (1, 32, 32, 3)
    result = world_score.score(record["video"][0], record["labels"])
    assert result["direction"] is None and result["predicted"]["direction"] is None
    assert result["all"] and result["color"] and result["shape"]


def test_captions_name_colour_shape_and_direction():
    world = W.CaptionedWorld(W.WorldConfig(held_out="include"))
    forms = set()
    for index in range(300):
        record = world[index]
        text, labels = record["caption"], record["labels"]
        assert labels["color"] in text and labels["shape"] in text and labels["direction"] in text
        form = text
        for word in (labels["color"], labels["shape"], labels["size"]):
            form = re.sub(rf"\b{word}\b", "<>", form)
        forms.add(form.replace(labels["direction"], "<dir>"))
    with_size = [t for t in W.TRAIN_TEMPLATES if "{size}" in t]
    assert len(W.TRAIN_TEMPLATES) >= 8 and 0 < len(with_size) < len(W.TRAIN_TEMPLATES)
    assert len(forms) >= 8

    every = [{"color": c, "shape": s, "size": z, "direction": d}
             for c in W.COLORS for s in W.SHAPES for z in W.SIZES for d in W.DIRECTIONS]
    train = {W.caption(lab, k) for lab in every for k in range(len(W.TRAIN_TEMPLATES))}
    paraphrase = {W.caption(lab, k, "paraphrase") for lab in every for k in range(len(W.PARAPHRASE_TEMPLATES))}
    assert not train & paraphrase
    assert W.prompts_for(W.HELD_OUT[:2]) == ["a red triangle moving left", "a blue circle moving up"]
    assert W.prompts_for([("cyan", "square", "up")], "paraphrase") == ["watch the cyan square drift upward"]
    with pytest.raises(ValueError, match="unknown combination"):
        W.prompts_for([("purple", "circle", "up")])
    paraphrased = W.CaptionedWorld(W.WorldConfig(templates="paraphrase"))[0]["caption"]
    assert paraphrased in paraphrase


def test_two_objects_differ_in_colour_never_touch_and_share_the_caption():
    config = W.WorldConfig(num_objects=2, held_out="include")
    world = W.CaptionedWorld(config)
    for index in range(30):
        record = world[index]
        first, second = record["objects"]
        assert first["color"] != second["color"] and record["labels"]["color"] == first["color"]
        assert record["caption"].count(" and ") >= 1
        for obj in (first, second):
            assert obj["color"] in record["caption"] and obj["shape"] in record["caption"]
            pixels = np.all(record["video"] == np.array(W.COLORS[obj["color"]], np.uint8), axis=-1).sum((1, 2))
            side = W.sprite_size(obj["size"], config.size)
            assert (pixels == W.sprite_mask(obj["shape"], side).sum()).all()  # never covered by the other
    assert W.caption({"objects": [
        {"color": "red", "shape": "circle", "size": "small", "direction": "left"},
        {"color": "blue", "shape": "square", "size": "large", "direction": "up"},
    ]}) == "a red circle moving left and a blue square moving up"


def test_digits_render_from_load_digits():
    config = W.WorldConfig(digits=True, size=64, held_out="include")
    records = [r for r in (W.CaptionedWorld(config)[i] for i in range(40)) if r["labels"]["shape"] in W.DIGITS]
    assert records
    images, targets = W.digit_images()
    for record in records:
        labels = record["labels"]
        glyph = int(labels["glyph"])
        assert f"digit {targets[glyph]}" == labels["shape"] and labels["shape"] in record["caption"]
        side = W.sprite_size(labels["size"], 64)
        mask = np.any(record["video"][0] != np.array(W.BACKGROUND, np.uint8), axis=-1)
        y0, x0 = labels["start"] - side // 2
        np.testing.assert_array_equal(mask[y0 : y0 + side, x0 : x0 + side], W.sprite_mask(labels["shape"], side, glyph))


@pytest.mark.parametrize(
    "field, match",
    [({"size": 8}, "size"), ({"num_frames": 0}, "num_frames"), ({"held_out": "sometimes"}, "held_out"),
     ({"num_objects": 3}, "num_objects"), ({"templates": "poetry"}, "templates"),
     ({"held_out_combos": (("purple", "circle", "up"),)}, "held_out_combos")],
)
def test_bad_config_is_one_line_value_error(field, match):
    with pytest.raises(ValueError, match=match) as error:
        W.WorldConfig(**field)
    assert "\n" not in str(error.value)


def test_cli_writes_readable_mp4_and_gif(tmp_path, capsys):
    from vidiff.cli import main
    from vidiff.io import read_video

    assert main(["world", "--out", str(tmp_path), "--num", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    world = W.CaptionedWorld(W.WorldConfig())
    for index in range(2):
        record = world[index]
        assert any(f"world-{index:06d}.mp4" in line and repr(record["caption"]) in line for line in printed)
        gif, _ = read_video(tmp_path / f"world-{index:06d}.gif")
        np.testing.assert_array_equal(gif, record["video"])  # gif keeps the exact colours
        mp4, fps = read_video(tmp_path / f"world-{index:06d}.mp4")
        assert mp4.shape == (17, 32, 32, 3) and fps == pytest.approx(8.0)
        assert world_score.score(mp4, record["labels"])["all"]  # H.264 artefacts do not fool the scorer
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [line["path"] for line in lines] == ["world-000000.mp4", "world-000001.mp4"]
    assert lines[0]["caption"] == world[0]["caption"] and lines[0]["labels"]["color"] == world[0]["labels"]["color"]

    assert main(["world", "--out", str(tmp_path / "bad"), "--size", "8"]) == 2
    assert "size" in capsys.readouterr().err
    existing_file = tmp_path / "captions.jsonl"
    assert main(["world", "--out", str(existing_file)]) == 2
    assert capsys.readouterr().err.strip() == f"vidiff world: error: --out {existing_file} is a file; give a directory"


def test_write_samples_two_objects_and_digits(tmp_path):
    config = W.WorldConfig(num_objects=2, digits=True, num_frames=3)
    paths = W.write_samples(tmp_path, num=1, config=config, formats=("gif",))
    assert [p.name for p in paths] == ["world-000000.gif"]
    line = json.loads((tmp_path / "captions.jsonl").read_text())
    assert len(line["objects"]) == 2 and " and " in line["caption"]
    # A rate a gif cannot play is refused before anything is rendered or written.
    with pytest.raises(ValueError, match=r"world-out/clip.gif: WorldConfig.fps=60 does not fit a .gif file, which "
                                         r"stores .* to 50 fps"):
        W.write_samples(tmp_path / "world-out", num=1, config=W.WorldConfig(fps=60.0), formats=("mp4", "gif"))
    assert not (tmp_path / "world-out").exists()
    from vidiff.train.tasks import preview_fps  # training's preview gifs play 60 fps footage at 50 fps

    assert [preview_fps(ml_collections.ConfigDict({"data": {"fps": fps}})) for fps in (60.0, 4.0, None)] == [50.0, 4.0, 8]


def test_grain_map_dataset_batches_records():
    grain = pytest.importorskip("grain")
    config = W.WorldConfig(num_frames=5, length=6)
    batch = grain.MapDataset.source(W.CaptionedWorld(config)).batch(3)[1]
    assert batch["video"].shape == (3, 5, 32, 32, 3) and batch["video"].dtype == np.uint8
    assert list(batch["id"]) == ["world-000003", "world-000004", "world-000005"]
    assert batch["labels"]["start"].shape == (3, 2)
