"""What makes a list of prompts usable, worded in one place.

``vidiff generate`` runs these checks before a model loads (an empty prompt
should not wait seconds to minutes of loading to be reported), in the wording
the pipeline uses when it encodes prompts. Imports nothing of vidiff, so any
layer may use it.
"""
from __future__ import annotations

from typing import Sequence


def prompt_name(prompts: Sequence, i: int) -> str:
    """How a message names prompt ``i``: "the prompt" when it is the only one, else "prompt <i + 1>"."""
    return "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"


def check_prompts(prompts: Sequence) -> None:
    """A one-line ``ValueError`` for no prompts, a prompt that is not a string, or an empty (blank) one."""
    if not prompts:
        raise ValueError("no prompts given; pass at least one, e.g. 'a red circle moving left'")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{prompt_name(prompts, i)} is a {type(prompt).__name__} ({prompt!r}); "
                             "prompts are strings")
        if not prompt.strip():
            raise ValueError(f"{prompt_name(prompts, i)} is empty; describe the video, e.g. 'a red circle moving left'")
