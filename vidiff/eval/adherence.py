"""Prompt adherence on the captioned world: generate clips for (colour, shape, direction) prompts, score the pixels.

Two prompt sets test two kinds of generalisation:

- ``heldout`` (default): every held-out combination of ``vidiff.data.world``
  (never drawn in training), worded as training captions are ("a red
  triangle moving left"): does the model compose attributes it saw apart?
- ``paraphrase``: the same combinations in :data:`PARAPHRASES`, wordings no
  training template produces (and distinct from ``world.PARAPHRASE_TEMPLATES``):
  does the text encoder carry meaning past the training phrasings?

Each case is scored by ``vidiff.data.world_score.score`` (colour, shape,
direction read from the pixels); the summary has per-attribute and
all-correct accuracy, per combination and overall. ``evaluate`` takes any
``generate(prompts, seed) -> uint8 (N, T, H, W, 3)``, so the same scoring
path runs on a model or on ground-truth clips.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vidiff.data import world, world_score
from vidiff.io.files import save_text

ATTRIBUTES = ("color", "shape", "direction", "all")
PROMPT_SETS = ("heldout", "paraphrase")
_TOWARD = {"left": "towards the left edge", "right": "towards the right edge", "up": "towards the top",
           "down": "towards the bottom"}
_HEADING = {"left": "in the left direction", "right": "in the right direction", "up": "in the upward direction",
            "down": "in the downward direction"}
# Written for this evaluation: verbs, word orders and direction words no training template uses.
PARAPHRASES = (
    "a {color} {shape} makes its way {toward}",
    "an animation of a {color} {shape} heading {heading}",
    "the clip shows one {color} {shape} travelling {toward}",
    "{color}-coloured {shape}, moving {heading}",
    "a lone {shape}, {color}, gliding {toward}",
    "there goes a {color} {shape}, {heading}",
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One clip to generate and score."""

    prompt: str
    color: str
    shape: str
    direction: str
    seed: int

    @property
    def labels(self) -> dict:
        """The world labels the scorer checks: colour, shape, direction."""
        return {"color": self.color, "shape": self.shape, "direction": self.direction}


def paraphrase(combo: Sequence[str], k: int = 0) -> str:
    """The ``k``-th of :data:`PARAPHRASES` (cyclic) for a (colour, shape, direction) combination."""
    colour, shape, direction = combo
    return PARAPHRASES[k % len(PARAPHRASES)].format(color=colour, shape=shape, toward=_TOWARD[direction],
                                                    heading=_HEADING[direction])


def cases(prompt_set: str = "heldout", seeds: int | Sequence[int] = 4,
          combos: Sequence[Sequence[str]] | None = None) -> list[Case]:
    """Every combination (default: ``world.HELD_OUT``) x seed, worded by ``prompt_set``.

    Paraphrases rotate with the combination and the seed, so every wording is used.
    """
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"prompt set {prompt_set!r} is unknown; use one of {', '.join(PROMPT_SETS)}")
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds: use at least one")
    combos = [tuple(c) for c in (world.HELD_OUT if combos is None else combos)]
    out = []
    for i, combo in enumerate(combos):
        for j, seed in enumerate(seeds):
            prompt = world.prompts_for([combo])[0] if prompt_set == "heldout" else paraphrase(combo, i + j)
            out.append(Case(prompt, *combo, seed))
    return out


def score(case: Case, clip: np.ndarray) -> dict:
    """The world scorer's verdict on one generated clip: prompt, seed, labels, correct (per attribute), predicted."""
    verdict = world_score.score(clip, case.labels)
    return {"prompt": case.prompt, "seed": case.seed, "labels": case.labels,
            "correct": {k: None if verdict[k] is None else bool(verdict[k]) for k in ATTRIBUTES},
            "predicted": {k: verdict["predicted"][k] for k in ("color", "shape", "direction")}}


def evaluate(generate: Callable[[list[str], int], np.ndarray], eval_cases: Sequence[Case]) -> dict:
    """Generate every case (one call per seed, all its prompts batched) and summarise the scores.

    ``generate(prompts, seed)`` returns ``uint8 (len(prompts), T, H, W, 3)``.
    """
    results = []
    for seed in dict.fromkeys(c.seed for c in eval_cases):
        group = [c for c in eval_cases if c.seed == seed]
        clips = np.asarray(generate([c.prompt for c in group], seed))
        if clips.shape[0] != len(group):
            raise ValueError(f"generate returned {clips.shape[0]} clips for {len(group)} prompts")
        results += [score(c, clip) for c, clip in zip(group, clips)]
    return summarize(results)


def summarize(results: Sequence[dict]) -> dict:
    """Accuracy per attribute (``direction`` over clips where it is checkable) overall and per combination."""

    def accuracy(rows):
        out = {}
        for key in ATTRIBUTES:
            judged = [r["correct"][key] for r in rows if r["correct"][key] is not None]
            out[key] = float(np.mean(judged)) if judged else None
        return out

    combos = {}
    for r in results:
        combos.setdefault(" ".join(r["labels"].values()), []).append(r)
    return {
        "num_clips": len(results),
        "accuracy": accuracy(results),
        "per_combination": {name: {"clips": len(rows), **accuracy(rows)} for name, rows in combos.items()},
        "clips": list(results),
    }


def format_table(summary: dict) -> str:
    """A plain-text table: one row per combination, then the overall accuracy."""
    header = f"{'combination':<28} {'clips':>5} " + " ".join(f"{k:>9}" for k in ATTRIBUTES)
    fmt = lambda v: f"{'-':>9}" if v is None else f"{100 * v:8.1f}%"
    rows = [header, "-" * len(header)]
    for name, acc in summary["per_combination"].items():
        rows.append(f"{name:<28} {acc['clips']:>5} " + " ".join(fmt(acc[k]) for k in ATTRIBUTES))
    rows.append("-" * len(header))
    rows.append(f"{'all':<28} {summary['num_clips']:>5} " + " ".join(fmt(summary["accuracy"][k]) for k in ATTRIBUTES))
    return "\n".join(rows)


def write_json(summary: dict, path) -> Path:
    """Write the summary (and every clip's verdict) as JSON, whole or not at all: a failed write leaves the file
    that was there as it was."""
    try:
        return save_text(path, json.dumps(summary, indent=2))
    except OSError as error:  # save_text's line names the file, why and the fix; the flag is a fix too
        raise OSError(f"{error}, or choose a writable --out") from None
