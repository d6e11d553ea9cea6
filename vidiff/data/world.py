"""The built-in captioned world: procedural clips whose captions can be checked against pixels.

It stands in for scraped video. Every record is a pure function of
``(config, index)``: one object (two optional) of a palette colour and a shape
(circle, square, triangle, or a handwritten digit from scikit-learn's
``load_digits`` as in Moving MNIST) crosses half the frame at constant speed
left, right, up or down over a uniform dark background, and a caption from
one of several paraphrase templates says what it is and where it goes.

This module holds the motion vocabulary (sizes, directions, the held-out
combinations for compositional evaluation), label sampling, rendering, the
random-access source ``CaptionedWorld`` (usable by ``grain.MapDataset.source``),
prompts for given combinations, sample writing and the ``vidiff world``
command. The palette and the shape masks live in
:mod:`vidiff.data.world_sprites`, caption templates in
:mod:`vidiff.data.world_captions` and the pixel-level scorer in
:mod:`vidiff.data.world_score`; all three are re-exported here
(:data:`COLORS`, :data:`SHAPES`, :func:`sprite_mask`, :func:`caption`,
:func:`score`, :func:`score_objects`).

Shape names are ``"circle"``, ``"square"``, ``"triangle"`` and, with
``digits=True``, ``"digit 0"`` ... ``"digit 9"`` (captions use these names
verbatim: "a red digit 3 moving left").
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from vidiff.data.schema import json_safe
from vidiff.data.world_captions import (  # noqa: F401  (re-exported: captions are part of the world's API)
    DIVERSE_TEMPLATES, PARAPHRASE_TEMPLATES, TEMPLATE_SETS, TRAIN_TEMPLATES, VARIED_TEMPLATES, caption, phrase,
    templates_of,
)
from vidiff.data.world_score import readable_glyphs, score, score_objects  # noqa: F401  (re-exported, as captions)
from vidiff.data.world_sprites import (  # noqa: F401  (re-exported: the vocabulary of what is drawn)
    BACKGROUND, COLORS, DIGITS, SHAPES, digit_images, rasterize_digits, sprite_mask,
)

SIZES = ("small", "large")
SIZE_FRACTIONS = {"small": 0.25, "large": 0.4}  # object diameter / frame width
DIRECTIONS = ("left", "right", "up", "down")
MOTION = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx); rows grow downward
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "left"),
    ("blue", "circle", "up"),
    ("green", "square", "right"),
    ("yellow", "triangle", "down"),
    ("magenta", "circle", "left"),
    ("cyan", "square", "up"),
)
HELD_OUT_MODES = ("exclude", "only", "include")

@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What the captioned world draws.

    Attributes:
      num_frames: frames per clip ``T`` (1 gives still images).
      size: frame height = width in pixels (>= 16; the scorer is exact from 32).
      fps: frame rate stored with each record.
      num_objects: 1 or 2 objects per clip (two objects never overlap and
        have different colours, so both stay checkable).
      digits: also draw the digits 0-9 as shapes.
      held_out: ``"exclude"`` the held-out (colour, shape, direction)
        combinations (training), draw ``"only"`` them (compositional
        evaluation), or ``"include"`` everything.
      held_out_combos: the held-out combinations (default :data:`HELD_OUT`).
      length: number of records (``len(CaptionedWorld)``).
      seed: changes every record.
      templates: caption template set, ``"train"``, ``"paraphrase"``,
        ``"varied"`` (train plus direction synonyms) or ``"diverse"`` (varied
        plus more synonyms and word orders); see :mod:`vidiff.data.world_captions`.
    """

    num_frames: int = 17
    size: int = 32
    fps: float = 8.0
    num_objects: int = 1
    digits: bool = False
    held_out: str = "exclude"
    held_out_combos: tuple[tuple[str, str, str], ...] = HELD_OUT
    length: int = 100_000
    seed: int = 0
    templates: str = "train"

    def __post_init__(self):
        # Lists from a config file become tuples so the config stays hashable.
        object.__setattr__(self, "held_out_combos", tuple(tuple(c) for c in self.held_out_combos))
        if self.size < 16:
            raise ValueError(f"WorldConfig.size={self.size} is too small; use size >= 16")
        if self.num_frames < 1:
            raise ValueError(f"WorldConfig.num_frames={self.num_frames}; use num_frames >= 1")
        if not self.fps > 0:
            raise ValueError(f"WorldConfig.fps={self.fps}; use a positive frame rate")
        if self.num_objects not in (1, 2):
            raise ValueError(f"WorldConfig.num_objects={self.num_objects}; use 1 or 2")
        if self.held_out not in HELD_OUT_MODES:
            raise ValueError(f"WorldConfig.held_out={self.held_out!r}; use one of {', '.join(HELD_OUT_MODES)}")
        if self.templates not in TEMPLATE_SETS:
            raise ValueError(f"WorldConfig.templates={self.templates!r}; use one of {', '.join(TEMPLATE_SETS)}")
        if self.length < 1:
            raise ValueError(f"WorldConfig.length={self.length}; use length >= 1")
        if self.seed < 0:
            raise ValueError(f"WorldConfig.seed={self.seed}; use a non-negative seed")
        for combo in self.held_out_combos:
            _check_combo(combo, "WorldConfig.held_out_combos")
        colours = {c for c, _, _ in allowed_combos(self)}
        if len(colours) < self.num_objects:
            raise ValueError(
                f"WorldConfig.held_out={self.held_out!r} leaves {len(colours)} colour(s) for "
                f"num_objects={self.num_objects}; change held_out_combos or held_out"
            )

    @property
    def shapes(self) -> tuple[str, ...]:
        """The shapes this world draws."""
        return SHAPES + DIGITS if self.digits else SHAPES


def _check_combo(combo, where: str) -> None:
    colour, shape, direction = combo
    if colour not in COLORS or shape not in SHAPES + DIGITS or direction not in DIRECTIONS:
        raise ValueError(
            f"{where}: unknown combination {combo!r}; colours are {', '.join(COLORS)}, shapes "
            f"{', '.join(SHAPES)} or 'digit N', directions {', '.join(DIRECTIONS)}"
        )


@functools.lru_cache(maxsize=64)
def allowed_combos(config: WorldConfig) -> tuple[tuple[str, str, str], ...]:
    """The (colour, shape, direction) combinations ``config`` may draw, in a fixed order."""
    held = set(map(tuple, config.held_out_combos))
    every = [(c, s, d) for c in COLORS for s in config.shapes for d in DIRECTIONS]
    if config.held_out == "exclude":
        return tuple(combo for combo in every if combo not in held)
    if config.held_out == "only":
        return tuple(combo for combo in every if combo in held)
    return tuple(every)


def sprite_size(size: str, frame_size: int) -> int:
    """Side in pixels of an object of ``size`` ("small" / "large") in a ``frame_size`` frame."""
    return max(3, int(round(SIZE_FRACTIONS[size] * frame_size)))


def travel(frame_size: int) -> int:
    """Pixels an object moves between the first and the last frame: half the frame."""
    return frame_size // 2


def _labels_rng(config: WorldConfig, index: int, stream: int) -> np.random.Generator:
    # Independent streams per purpose, so captions never shift the labels.
    return np.random.default_rng([config.seed, int(index), stream])


def sample_labels(index: int, config: WorldConfig = WorldConfig()) -> dict:
    """The labels of record ``index``: a pure function of ``(config.seed, index)``.

    Returns the first object's ``color``, ``shape``, ``size``, ``direction``
    (str), ``start`` (``int32 (2,)``, (y, x) of the object's centre pixel on
    the first frame) and ``glyph`` (``int32``, the ``load_digits`` sample of a
    digit, -1 otherwise); with ``num_objects > 1`` also ``objects``, the list
    of every object's labels (the first equal to the top level). Respects
    ``config.held_out`` for every object.
    """
    rng = _labels_rng(config, index, 0)
    combos = allowed_combos(config)
    objects: list[dict] = []
    for _attempt in range(10_000):  # rejection sampling; two objects fit apart within a few tries
        colour, shape, direction = combos[rng.integers(len(combos))]
        if any(o["color"] == colour for o in objects):
            continue  # one colour per object keeps every object separable by colour
        size = SIZES[rng.integers(len(SIZES))]
        side = sprite_size(size, config.size)
        glyph = -1
        if shape in DIGITS:
            pool = readable_glyphs(side)[int(shape[-1])]
            glyph = int(pool[rng.integers(len(pool))])
        candidate = {
            "color": colour,
            "shape": shape,
            "size": size,
            "direction": direction,
            "start": _sample_start(rng, side, direction, config),
            "glyph": np.int32(glyph),
        }
        if all(_apart(candidate, other, config) for other in objects):
            objects.append(candidate)
            if len(objects) == config.num_objects:
                break
    else:
        raise RuntimeError(f"could not place {config.num_objects} objects apart in a {config.size}px frame")
    labels = dict(objects[0])
    if config.num_objects > 1:
        labels["objects"] = objects
    return labels


def _sample_start(rng, side: int, direction: str, config: WorldConfig) -> np.ndarray:
    distance = travel(config.size) if config.num_frames > 1 else 0
    start = np.zeros(2, np.int32)
    for axis, step in enumerate(MOTION[direction]):
        # Centre c puts the sprite on pixels [c - side//2, c - side//2 + side).
        low, high = side // 2, config.size - side + side // 2
        if step > 0:
            high -= distance
        elif step < 0:
            low += distance
        start[axis] = rng.integers(low, high + 1)
    return start


def object_track(labels: dict, config: WorldConfig = WorldConfig()) -> np.ndarray:
    """``int (T, 2)`` centre pixel (y, x) of one object on every frame (constant speed, rounded)."""
    steps = config.num_frames - 1
    progress = np.round(travel(config.size) * np.arange(config.num_frames) / max(steps, 1)).astype(np.int64)
    return np.asarray(labels["start"], np.int64)[None] + progress[:, None] * np.asarray(MOTION[labels["direction"]])


def _boxes(labels: dict, config: WorldConfig) -> np.ndarray:
    side = sprite_size(labels["size"], config.size)
    top_left = object_track(labels, config) - side // 2
    return np.concatenate([top_left, top_left + side], axis=1)  # (T, 4): y0, x0, y1, x1 (exclusive)


def _apart(a: dict, b: dict, config: WorldConfig) -> bool:
    # At least one background pixel between the two boxes on every frame.
    ba, bb = _boxes(a, config), _boxes(b, config)
    apart_y = (ba[:, 2] < bb[:, 0]) | (bb[:, 2] < ba[:, 0])
    apart_x = (ba[:, 3] < bb[:, 1]) | (bb[:, 3] < ba[:, 1])
    return bool(np.all(apart_y | apart_x))


def render(labels: dict, config: WorldConfig = WorldConfig()) -> np.ndarray:
    """Draw the clip of ``labels`` (every entry of ``labels["objects"]`` if present): ``uint8 (T, H, W, 3)``."""
    video = np.repeat(_background_frame(config.size)[None], config.num_frames, axis=0)
    frame_index = np.arange(config.num_frames)[:, None]
    for obj in labels.get("objects", [labels]):
        if obj["color"] not in COLORS:
            raise ValueError(f"unknown colour {obj['color']!r}; use one of {', '.join(COLORS)}")
        side = sprite_size(obj["size"], config.size)
        boxes = _boxes(obj, config)
        if boxes[:, :2].min() < 0 or boxes[:, 2:].max() > config.size:
            raise ValueError(f"object {obj['shape']!r} starting at {obj['start']} leaves the {config.size}px frame")
        ys, xs = np.nonzero(sprite_mask(obj["shape"], side, int(obj.get("glyph", -1))))
        video[frame_index, boxes[:, :1] + ys, boxes[:, 1:2] + xs] = np.asarray(COLORS[obj["color"]], np.uint8)
    return video


@functools.lru_cache(maxsize=16)
def _background_frame(size: int) -> np.ndarray:
    # Copying one cached frame is ~50x faster than broadcasting the RGB triple into every pixel.
    frame = np.empty((size, size, 3), np.uint8)
    frame[:] = BACKGROUND
    return frame


def prompts_for(
    combos: Iterable[Sequence[str]], template_set: str = "train", template: int = 0
) -> list[str]:
    """One prompt per (colour, shape, direction) combination, e.g. for held-out evaluation.

    Uses the ``template``-th template of the set that does not mention size
    (the combination does not fix one): ``"a red triangle moving left"`` for
    ``"train"``, ``"watch the red triangle drift leftward"`` for ``"paraphrase"``.
    """
    sizeless = [t for t in templates_of(template_set) if "{size}" not in t]
    chosen = sizeless[template % len(sizeless)]
    prompts = []
    for combo in combos:
        _check_combo(tuple(combo), "prompts_for")
        colour, shape, direction = combo
        prompts.append(phrase(chosen, {"color": colour, "shape": shape, "direction": direction}))
    return prompts


class CaptionedWorld:
    """Random-access source of captioned clips: ``grain.MapDataset.source(CaptionedWorld(config))``.

    ``world[i]`` is ``{"video": uint8 (T, H, W, 3), "caption": str, "fps":
    float32, "id": "world-000123", "labels": {...}}`` (see
    :func:`sample_labels`; with two objects also ``"objects"``), identical for
    the same config and index on any machine.
    """

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = config

    def __len__(self) -> int:
        return self.config.length

    def __getitem__(self, index) -> dict:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a world of length {len(self)}")
        labels = sample_labels(index, self.config)
        record = {
            "video": render(labels, self.config),
            "caption": caption(labels, _labels_rng(self.config, index, 1), self.config.templates),
            "fps": np.float32(self.config.fps),
            "id": f"world-{index:06d}",
        }
        objects = labels.pop("objects", None)
        record["labels"] = labels
        if objects is not None:
            record["objects"] = objects
        return record

    def __repr__(self) -> str:
        return f"CaptionedWorld({self.config})"


def write_samples(
    out_dir, num: int = 4, config: WorldConfig = WorldConfig(), formats: Sequence[str] = ("mp4", "gif")
) -> list[Path]:
    """Write records ``0 .. num-1`` as ``world-000000.<format>`` files plus ``captions.jsonl``.

    Each jsonl line holds ``id``, ``path`` (the first format's file name,
    relative to ``out_dir``), ``caption``, ``fps``, ``labels`` (and
    ``objects`` for two-object worlds). Returns the video paths, record by
    record in the order of ``formats``.
    """
    return [path for path, _ in _write_samples(out_dir, num, config, formats)]


def _write_samples(out_dir, num, config, formats) -> list[tuple[Path, str]]:
    from vidiff.io import check_fps, write_video

    for fmt in formats:  # before any clip is rendered
        check_fps(Path(out_dir) / f"clip.{fmt.lstrip('.')}", config.fps, "WorldConfig.fps")
    if not 1 <= num <= config.length:
        raise ValueError(f"num={num}; use 1 <= num <= config.length ({config.length})")
    if not formats:
        raise ValueError("formats is empty; pass e.g. ('mp4', 'gif')")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    world = CaptionedWorld(config)
    written, lines = [], []
    for index in range(num):
        record = world[index]
        paths = [write_video(out_dir / f"{record['id']}.{fmt.lstrip('.')}", record["video"], config.fps)
                 for fmt in formats]
        written.extend((path, record["caption"]) for path in paths)
        line = {"id": record["id"], "path": paths[0].name, "caption": record["caption"], "fps": config.fps,
                "labels": json_safe(record["labels"], nan_to_null=False)}
        if "objects" in record:
            line["objects"] = json_safe(record["objects"], nan_to_null=False)
        lines.append(json.dumps(line))
    (out_dir / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``vidiff world``."""
    parser.add_argument("--out", required=True, help="directory to write clips and captions.jsonl into")
    parser.add_argument("--num", type=int, default=4, help="number of clips (records 0 .. num-1)")
    parser.add_argument("--size", type=int, default=32, help="frame height = width in pixels (>= 16)")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--digits", action="store_true", help="also draw the digits 0-9")
    parser.add_argument("--objects", type=int, default=1, choices=(1, 2), help="objects per clip")


def run(args: argparse.Namespace) -> int:
    """Render the first ``--num`` clips to mp4 + gif and print what was written."""
    config = WorldConfig(num_frames=args.frames, size=args.size, seed=args.seed, digits=args.digits,
                         num_objects=args.objects)
    written = _write_samples(args.out, args.num, config, ("mp4", "gif"))
    for path, text in written:
        print(f"wrote {path}  {text!r}")
    print(f"wrote {Path(args.out) / 'captions.jsonl'}  ({args.num} captions)")
    return 0
