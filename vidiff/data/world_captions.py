"""Captions of the captioned world: the template sets and the functions that fill them in.

Four template sets, picked by ``WorldConfig.templates``:

- ``"train"``: ten short wordings ("a red circle moving left").
- ``"paraphrase"``: verbs and word orders ``"train"`` never uses, to test
  whether a text encoder generalises past the training phrasings.
- ``"varied"``: ``"train"`` plus six subjects x eight direction synonyms
  ("rising", "going off to the left"), so a model learns direction from the
  encoder's meaning rather than from two words.
- ``"diverse"``: ``"varied"`` plus more direction synonyms, shape-before-colour
  and motion-first orders, and a few neutral openings ("we see a ...").

The prompt-adherence paraphrases of :mod:`vidiff.eval.adherence` are a
separate, held-apart list that no set here produces (a test checks it word by
word).
This module knows no vocabulary beyond the direction names; the world
(:mod:`vidiff.data.world`) validates labels before they get here.
"""
from __future__ import annotations

import numpy as np

# Caption templates. Fields: {color} {shape} {size}, and one direction phrase:
# {move} "left" / "up", {toward} "to the left" / "upwards", {drift} "leftward".
_TOWARD = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}
_MOVE = {d: d for d in _TOWARD}
_DRIFT = {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"}
TRAIN_TEMPLATES = (
    "a {color} {shape} moving {move}",
    "a {size} {color} {shape} moving {move}",
    "{color} {shape} going {move}",
    "a {size} {color} {shape} slides {toward}",
    "a {color} {shape} slides {toward}",
    "the {color} {shape} moves {move}",
    "a {size} {color} {shape} travelling {move}",
    "{size} {color} {shape} moving {toward}",
    "a {size} {color} {shape} going {toward}",
    "a {color} {shape} that moves {toward}",
)
# Verbs and word orders the training templates never use, to test whether a
# text encoder generalises beyond the phrasings seen in training.
PARAPHRASE_TEMPLATES = (
    "watch the {color} {shape} drift {drift}",
    "there is a {color} {shape} and it glides {drift}",
    "one {color} {shape}, heading {toward}",
    "the {shape} is {color} and crosses the frame {drift}",
    "a {size} {shape} in {color} drifting {drift}",
    "{drift} floats a {size} {color} {shape}",
)
# "varied" = the training templates + every subject x motion phrase below (58
# wordings). It never uses the words of ``vidiff.eval.adherence.PARAPHRASES``
# ("top", "bottom", "edge", "direction", "towards", "heading", ...): those stay unseen.
_SUBJECTS = ("a {color} {shape}", "the {color} {shape}", "a {size} {color} {shape}", "{color} {shape}",
             "a {color} {shape} is", "the {size} {color} {shape} keeps")
_MOTIONS = {
    "left": ("moving leftwards", "going off to the left", "moving to the left side", "sliding left",
             "shifting left", "going left across the screen", "sweeping to the left", "moving further left"),
    "right": ("moving rightwards", "going off to the right", "moving to the right side", "sliding right",
              "shifting right", "going right across the screen", "sweeping to the right", "moving further right"),
    "up": ("rising", "climbing", "ascending", "moving higher", "going up the screen", "sliding up",
           "shifting up", "sweeping upwards"),
    "down": ("falling", "sinking", "descending", "moving lower", "going down the screen", "sliding down",
             "shifting down", "sweeping downwards"),
}
VARIED_TEMPLATES = TRAIN_TEMPLATES + tuple(
    f"{subject} {{motion{i}}}" for subject in _SUBJECTS for i in range(len(_MOTIONS["left"])))
# "diverse" = "varied" + eight more motion phrases per direction, subjects that put the shape before
# the colour or open with a few neutral words, and motion-first orders (234 wordings). The aim is a
# model that reads colour, shape and direction wherever they sit among words it does not know; the
# same test keeps the paraphrases' own words out of it.
_MORE_MOTIONS = {
    "left": ("drifting left", "sailing to the left", "travelling leftwards", "moving left slowly",
             "passing to the left", "rolling left", "shooting off to the left", "flying left"),
    "right": ("drifting right", "sailing to the right", "travelling rightwards", "moving right slowly",
              "passing to the right", "rolling right", "shooting off to the right", "flying right"),
    "up": ("soaring", "lifting", "floating up", "moving to the upper side", "going up high",
           "flying upwards", "rising up the screen", "shooting up"),
    "down": ("dropping", "plunging", "floating down", "moving to the lower side", "going down low",
             "tumbling downwards", "falling down the screen", "sliding downwards"),
}
_MORE_SUBJECTS = ("we see a {color} {shape}", "here a {color} {shape} is", "a video with a {color} {shape}",
                  "a {shape} that is {color},", "a {size} {shape}, {color},", "look, a {size} {color} {shape}")
_MOTION_FIRST = ("{motion}: a {color} {shape}", "{motion}, the {size} {color} {shape}")
_ALL_MOTIONS = {d: _MOTIONS[d] + _MORE_MOTIONS[d] for d in _MOTIONS}
_MOTION_FIELDS = {d: {f"motion{i}": phrase for i, phrase in enumerate(phrases)} for d, phrases in _ALL_MOTIONS.items()}
_ALL = range(len(_ALL_MOTIONS["left"]))
_NEW = _ALL[len(_MOTIONS["left"]):]  # the motion fields "varied" does not use
DIVERSE_TEMPLATES = VARIED_TEMPLATES + tuple(
    [f"{subject} {{motion{i}}}" for subject in _SUBJECTS for i in _NEW]
    + [f"{subject} {{motion{i}}}" for subject in _MORE_SUBJECTS for i in _ALL]
    + [order.replace("{motion}", f"{{motion{i}}}") for order in _MOTION_FIRST for i in _ALL])
TEMPLATE_SETS = {"train": TRAIN_TEMPLATES, "paraphrase": PARAPHRASE_TEMPLATES, "varied": VARIED_TEMPLATES,
                 "diverse": DIVERSE_TEMPLATES}


def templates_of(template_set: str) -> tuple[str, ...]:
    """The templates of ``template_set`` (one of :data:`TEMPLATE_SETS`)."""
    if template_set not in TEMPLATE_SETS:
        raise ValueError(f"template_set={template_set!r}; use one of {', '.join(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[template_set]


def caption(labels: dict, choice: int | np.random.Generator = 0, template_set: str = "train") -> str:
    """Caption of ``labels`` (both objects when ``labels["objects"]`` holds two).

    ``choice`` picks the template: an int (modulo the number of templates) or
    a ``numpy`` Generator to draw from; ``template_set`` as :func:`templates_of`.
    """
    templates = templates_of(template_set)
    k = int(choice.integers(len(templates))) if isinstance(choice, np.random.Generator) else int(choice) % len(templates)
    return " and ".join(phrase(templates[k], obj) for obj in labels.get("objects", [labels]))


def phrase(template: str, obj: dict) -> str:
    """``template`` filled in for one object's ``color``, ``shape``, ``direction`` (and ``size``)."""
    d = obj["direction"]
    return template.format(
        color=obj["color"], shape=obj["shape"], size=obj.get("size"),
        move=_MOVE[d], toward=_TOWARD[d], drift=_DRIFT[d], **_MOTION_FIELDS[d],
    )
