"""What clips a model makes and what each prompting mode asks of its inputs, as checks on plain numbers.

``ClipRules`` holds the VAE's time factor, the DiT's time patch, the step of heights and widths and the
training clip. ``TextToVideo`` checks every call with them; ``vidiff generate`` reads them from an export's
``vidiff.json`` alone (``vidiff.pipeline_load.read_clip_rules``) and applies the same checks, in the same
words, before the model loads.
"""
from __future__ import annotations

import dataclasses
import math

from vidiff.models.vae import latent_count, pixel_count

DIRECTIONS = ("forward", "backward")  # which way an extension adds frames

@dataclasses.dataclass(frozen=True)
class ClipRules:
    """The clips a model makes and what each prompting mode asks of its inputs, from plain numbers: the VAE's time
    factor, the DiT's time patch, the step of heights and widths and the training clip. Each check takes whole
    numbers (``TextToVideo`` checks its arguments are) and raises the one-line ``ValueError`` the user sees."""

    time_factor: int
    time_patch: int
    size_step: int  # height and width must be multiples of it (VAE spatial factor x DiT patch)
    train_frames: int
    train_size: tuple[int, int]

    @classmethod
    def of(cls, vae, dit, train_frames: int, train_size: tuple[int, int]) -> "ClipRules":
        """The rules of a VAE and a DiT (their configs) trained on ``train_frames`` frames of ``train_size``."""
        sf, (pt, ph, pw) = vae.spatial_factor, dit.patch
        return cls(vae.time_factor, pt, math.lcm(sf * ph, sf * pw), train_frames, tuple(train_size))

    def supported_sizes(self) -> str:
        """One line saying which clip sizes this model can make."""
        tf, pt = self.time_factor, self.time_patch
        frames = ", ".join(str(pixel_count(L, tf)) for L in range(pt, 6 * pt, pt))
        rule = f"1 + {tf}k" + (f" with k + 1 divisible by {pt}" if pt > 1 else "")
        return (f"frames {rule} ({frames}, ...), height and width multiples of {self.size_step} (trained on "
                f"{self.train_frames} frames of {self.train_size[0]}x{self.train_size[1]})")

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        """A one-line ``ValueError`` naming the sizes that work, unless the model can make this clip."""
        tf, pt = self.time_factor, self.time_patch
        bad = []
        if num_frames < 1 or (num_frames - 1) % tf or latent_count(num_frames, tf) % pt:
            bad.append(f"num_frames={num_frames}")
        bad += [f"{n}={v}" for n, v in (("height", height), ("width", width)) if v < 1 or v % self.size_step]
        if bad:
            raise ValueError(f"this model cannot make {', '.join(bad)}: it makes {self.supported_sizes()}")

    def sizes(self, num_frames: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
        """The clip size asked for (None = the training size), checked."""
        num_frames = self.train_frames if num_frames is None else num_frames
        height = self.train_size[0] if height is None else height
        width = self.train_size[1] if width is None else width
        self.check_size(num_frames, height, width)
        return num_frames, height, width

    def animated_latents(self, num_frames: int) -> int:
        """Image-to-video's latent frames: the image is latent 0, and at least one more is sampled."""
        L = latent_count(num_frames, self.time_factor)
        if L < 2:  # the image is the only latent: sampling would return its VAE round trip
            raise ValueError(f"num_frames={num_frames} leaves nothing to animate; use at least "
                             f"{pixel_count(2, self.time_factor)}")
        return L

    def extend_reads(self, direction: str, num_frames: int) -> dict:
        """The video frames extending it ``direction`` into a ``num_frames`` clip reads: ``first=`` or ``last=``
        (``TextToVideo.load_frames``'s arguments)."""
        tf, L = self.time_factor, latent_count(num_frames, self.time_factor)
        if L < 2:
            raise ValueError(f"num_frames={num_frames} leaves no room to extend; use at least {pixel_count(2, tf)}")
        # At most L - 1 latents of context: forward, the video's last 1 + tf (L - 2) frames; backward, its first
        # 1 + tf (L - 1), frame 0 included as their causal context.
        return {"forward": dict(last=pixel_count(L - 1, tf)), "backward": dict(first=num_frames)}[direction]

    def extend_context(self, direction: str, num_frames: int, video_frames: int, context_frames: int | None) -> int:
        """Known latents ``k`` of the clip, from the ``video_frames`` frames read (``extend_reads``): forward its
        last ``context_frames = 1 + tf (k - 1)``, backward its frames ``1 .. tf k``. None: half the clip's
        latents, at least one, as many as the video has."""
        tf, L = self.time_factor, latent_count(num_frames, self.time_factor)
        available = latent_count(video_frames, tf) - (direction == "backward")  # backward needs frame 0 as context
        if available < 1:
            need = 1 + tf if direction == "backward" else 1
            raise ValueError(f"the video has {video_frames} frame(s); extending {direction} needs at least {need}")
        if context_frames is None:
            return min(max(1, L // 2), available)
        return _context_latents(context_frames, direction, tf, min(available, L - 1))

    def connect_latents(self, num_frames: int) -> int:
        """A transition's latent frames: A's end, B's start and at least one between."""
        L = latent_count(num_frames, self.time_factor)
        if L < 3:
            raise ValueError(f"num_frames={num_frames} is too short to connect two clips; use at least "
                             f"{pixel_count(3, self.time_factor)}")
        return L

    def check_second_video(self, frames: int) -> None:
        """B's frames ``1 .. tf`` close a transition: ``frames`` (of its first ``1 + tf`` read) must hold them."""
        if frames < 1 + self.time_factor:
            raise ValueError(f"the second video has {frames} frame(s); connecting needs at least "
                             f"{1 + self.time_factor}")

    def edit_frames(self, video_frames: int, num_frames: int, asked: bool) -> int:
        """An edit's clip length from the ``video_frames`` frames read of the video's first ``num_frames``: those
        asked for (``asked``), else the video's longest prefix the model can make, at most the training length."""
        tf, pt = self.time_factor, self.time_patch
        video_latents = latent_count(video_frames, tf)
        if video_latents < pt:
            raise ValueError(f"the video has {video_frames} frame(s); this model edits at least {pixel_count(pt, tf)}")
        longest = pixel_count(video_latents - video_latents % pt, tf)  # the longest prefix the model can make
        if asked and num_frames > longest:
            raise ValueError(f"num_frames={num_frames} is longer than the video ({video_frames} frames); use at "
                             f"most {longest}")
        return num_frames if asked else min(longest, self.train_frames)

    def loop_sizes(self, num_frames: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
        """A loop's length ``tf m`` (None: the longest shorter than the training clip) and frame size, checked: it
        is sampled as ``m + 2`` latents, which the DiT's time patch must divide, and the ``tf + 1`` frames past
        its end (the wrap-around) must be a clip the model makes."""
        tf, pt = self.time_factor, self.time_patch
        # Lengths tf m with (m + 2) % pt == 0; at least 2 frames: one frame "looping" is a still image.
        loops = lambda upto: [tf * m for m in range(1, upto // tf + 2 * pt + 1)  # noqa: E731
                              if (m + 2) % pt == 0 and tf * m >= 2]
        if num_frames is None:
            num_frames = max([n for n in loops(self.train_frames) if n < self.train_frames] or [loops(tf)[0]])
        if num_frames not in loops(num_frames):
            near = sorted(sorted(loops(num_frames), key=lambda n: abs(n - num_frames))[:2])
            rule = f"{tf}m frames" + (f" with m + 2 divisible by {pt}" if pt > 1 else "")
            raise ValueError(f"a loop of num_frames={num_frames} cannot be made: loop lengths are {rule}, at least "
                             f"{loops(tf)[0]} (the frame after the last is the first), e.g. "
                             f"{' or '.join(map(str, near))}")
        _, height, width = self.sizes(num_frames + tf + 1, height, width)
        return num_frames, height, width


def _context_latents(frames: int, direction: str, tf: int, most: int) -> int:
    """Known latents ``k`` for ``frames`` context frames (forward ``1 + tf (k - 1)``, backward ``tf k``), k <= most."""
    frames_of = (lambda k: pixel_count(k, tf)) if direction == "forward" else (lambda k: tf * k)
    k = latent_count(frames, tf) if direction == "forward" else frames // tf
    if frames_of(k) == frames and 1 <= k <= most:
        return k
    options = [frames_of(j) for j in range(1, most + 1)] or "none"
    raise ValueError(f"context_frames={frames} does not fit extending {direction} here; use one of {options} "
                     "(the video's length and num_frames bound it)")
