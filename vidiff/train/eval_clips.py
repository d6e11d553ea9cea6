"""The VAE's evaluation clips: fixed, whole clips its PSNR / SSIM are scored on at every evaluation.

From the captioned world, its held-out combinations (clips training never sees), at the training clips' size;
from any other source, the first clips of the data's ``eval.split``. The same clips on every process and for
any number of them.
"""
from __future__ import annotations

import numpy as np

from vidiff.checks import height_width


def validation_clips(config) -> np.ndarray:
    """``config.eval.num_clips`` fixed clips, ``eval.num_frames`` long (default the training length):
    the world's held-out combinations, or the data's eval split."""
    n = int(config.eval.num_clips)
    num_frames = config.eval.get("num_frames") or config.data.num_frames
    if config.data.source == "world":
        return _held_out_world_clips(config, n, num_frames)
    return _eval_split_clips(config, n, num_frames)


def _held_out_world_clips(config, n: int, num_frames: int) -> np.ndarray:
    """The world's first ``n`` held-out clips, at the training clips' size."""
    from vidiff.data.transforms import resize_crop
    from vidiff.data.world import CaptionedWorld, WorldConfig

    # The eval clips' length, size, split and seed are fixed here, whatever the training stage's world says.
    fixed = ("held_out", "num_frames", "size", "seed")
    world_fields = {k: v for k, v in dict(config.data.get("world") or {}).items() if k not in fixed}
    height, width = height_width(config.data.size)
    world = CaptionedWorld(WorldConfig(num_frames=num_frames, size=max(height, width),
                                       **{**world_fields, "held_out": "only", "seed": 12345}))
    # Square clips, cut to (height, width) as the training pipeline cuts the world's (a centre crop).
    return np.stack([resize_crop(world[i]["video"], height, width, "center", None) for i in range(n)])


def _eval_split_clips(config, n: int, num_frames: int) -> np.ndarray:
    """The first ``n`` clips of the data's ``eval.split`` (default ``"eval"``, as the set-up checks it)."""
    from vidiff.data import record_stream

    split = config.eval.get("split", "eval")

    # Whole clips of eval.num_frames at data.size (training's buckets and image mix would cut images or other
    # lengths, and mixed shapes fail to stack), from the whole split on every process (process_count=1): the
    # same clips for any number of processes, and a split too small for one process's slice fails none alone.
    records = record_stream({**config.data.to_dict(), "num_frames": num_frames, "shuffle": False, "num_epochs": 1,
                             "caption_dropout": 0.0, "buckets": None, "image_fraction": 0.0}, split=split,
                            process_index=0, process_count=1)
    try:
        clips = [r["video"] for _, r in zip(range(n), records)]
    except ValueError as e:  # the skip ledger's refusal: say which clips it was refusing
        raise ValueError(f"the VAE's evaluation clips (eval.split={split!r}, {num_frames} frames, "
                         f"eval.num_frames): {e}; or set eval.num_frames to a length they have") from None
    if not clips:
        raise ValueError(f"eval.split={split!r} yielded no clips; point data at an eval split")
    if len(clips) < n:  # scoring fewer would change what val_psnr averages, unsaid
        raise ValueError(f"eval.num_clips={n} but eval.split={split!r} gave {len(clips)} clips of "
                         f"{num_frames} frames (bad or short ones are skipped, named above); set "
                         f"eval.num_clips={len(clips)}, or add clips to that split")
    return np.stack(clips)
