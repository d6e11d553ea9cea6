"""A device profile of a few training steps: ``<model>_train.profile = dict(start=S, steps=N)``.

The trace covers steps ``S + 1 .. S + N`` (absolute step numbers: a run resumed
past them traces nothing), each step marked with
``jax.profiler.StepTraceAnnotation`` so profile viewers show step boundaries.
Start after the first step (``S >= 1``), or the trace is mostly compilation.
Files go to ``<workdir>/<model>/profile/plugins/profile/<run>/``, one pair per
process: ``<host>.xplane.pb`` (TensorBoard's profile plugin, XProf) and
``<host>.trace.json.gz`` (Perfetto, chrome://tracing). ``N = 0`` turns it off.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import jax


def profile_window(stage) -> tuple[int, int]:
    """``(start, steps)`` of a ``<model>_train`` section; ``(0, 0)`` where it has no ``profile``."""
    profile = stage.get("profile")
    if not profile:
        return 0, 0
    return int(profile.get("start", 0)), int(profile.get("steps", 0))


def check_profile(stage, model: str) -> None:
    """One-line errors for a window that is negative or lies past the end of training."""
    start, steps = profile_window(stage)
    if start < 0 or steps < 0:
        raise ValueError(f"{model}_train.profile: start={start} and steps={steps} must be >= 0 (steps=0: no profile)")
    if steps and start >= int(stage.steps):
        raise ValueError(f"{model}_train.profile.start={start} is not before {model}_train.steps={stage.steps}: "
                         f"nothing would be traced; use a start below {stage.steps}")


class StepProfiler(contextlib.AbstractContextManager):
    """Starts the trace before step ``start + 1``, stops it after step ``start + steps``, at ``stop``,
    or when the ``with`` block it guards exits."""

    def __init__(self, stage, directory: Path, log=print):
        self.start, self.steps = profile_window(stage)
        self.directory, self.log = Path(directory), log
        self.active = False
        self.traced: list[int] = []

    def step(self, number: int):
        """Context for running step ``number`` (1-based): annotated while tracing."""
        if self.steps and number == self.start + 1 and not self.active:
            jax.profiler.start_trace(str(self.directory))
            self.active = True
        if not self.active:
            return contextlib.nullcontext()
        self.traced.append(number)
        return jax.profiler.StepTraceAnnotation("train", step_num=number)

    def after(self, number: int, state) -> None:
        if self.active and number >= self.start + self.steps:
            self.stop(state)

    def stop(self, state=None) -> None:
        """End the trace (idempotent); waits for ``state`` so the traced steps' device work is in it."""
        if not self.active:
            return
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        self.log(f"profile of steps {self.traced[0]}-{self.traced[-1]}: {self.directory} "
                 f"(trace.json.gz opens in Perfetto, xplane.pb in TensorBoard's profile plugin)")

    def __exit__(self, *exc):
        self.stop()
