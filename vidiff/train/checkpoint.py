"""Checkpoints: orbax ``CheckpointManager`` holding the train state, the Grain
iterator state and the config, saved asynchronously, restorable onto any mesh.

Layout of ``<workdir>/checkpoints/<step>/``: ``state`` (orbax arrays, sharded
as saved; restored with the shardings of the caller's abstract state, so a
different mesh shape works), ``data`` (the Grain iterator's JSON state, one
file per process) and ``config`` (JSON: the run's config, plus what the loop
records beside it: a DiT's VAE, the captions cut so far). No pickle anywhere.
Retention: the last ``keep`` checkpoints plus the ``keep_best`` with the
lowest value of the chosen metric (stored with each step as JSON, so a resumed
run ranks the earlier checkpoints too; a step saved without metrics counts only
towards the last ``keep``). ``check_complete`` refuses, in one line, a step
folder that lacks an item (a copy or save cut short) instead of orbax's
``KeyError``; ``close`` waits for pending saves and may be called again.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class Checkpointer:
    """Thin policy layer over ``ocp.CheckpointManager`` for vidiff's train state."""

    def __init__(self, directory, *, keep: int = 3, keep_best: int = 1, best_metric: str = "loss",
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        metric = lambda metrics: metrics[best_metric]  # noqa: E731
        policies = [checkpoint_managers.LatestN(n=max(1, keep))]
        if keep_best > 0:
            # A checkpoint saved without metrics (no finite loss logged yet) is kept only while it is recent.
            policies.append(checkpoint_managers.BestN(get_metric_fn=metric, reverse=True, n=keep_best,
                                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            # best_fn makes orbax write each step's metrics to disk and read them back when a resumed run
            # reopens the directory; without it older checkpoints have no metrics and BestN keeps them all.
            best_fn=metric if keep_best > 0 else None,
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=True,
        )
        # Opening a directory with an incomplete step folder makes orbax log a warning about its missing
        # metadata; check_complete names that folder and the fix instead, in one line.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logger.setLevel(level)
        self._closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, *, data_iterator=None, config: dict | None = None,
             metrics: dict | None = None) -> None:
        """Start saving ``state`` (and the data iterator / config) at ``step``; returns before it is on disk."""
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        scalars = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=scalars, force=True)

    def restore(self, abstract_state, step: int | None = None, *, data_iterator=None):
        """Restore the state at ``step`` (default latest) into the shapes/shardings of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``
        set (e.g. from ``jax.eval_shape`` + the mesh's shardings). The data
        iterator, if given, is moved to the saved position in place.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then release the manager; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self.manager.wait_until_finished()
        self.manager.close()

    def missing_items(self, step: int, items=("state", "data")) -> list[str]:
        """The items of ``items`` that the folder of ``step`` lacks (none for a complete checkpoint)."""
        folder = self.directory / str(step)
        return [name for name in items if not (folder / name).is_dir()]

    def check_complete(self, step: int, items=("state", "data")) -> None:
        """Raise a one-line ``ValueError`` when the checkpoint of ``step`` lacks one of ``items``.

        Not skipped over silently: the user should know the newest checkpoint is
        unusable, and removing the folder is their call.
        """
        missing = self.missing_items(step, items)
        if missing:
            raise ValueError(f"checkpoint {self.directory / str(step)} is incomplete (no {', '.join(missing)}: a save "
                             f"or copy was cut short); delete that folder to {self.without(step, items)}")

    def without(self, step: int, items=("state", "data")) -> str:
        """What deleting the folder of ``step`` leaves: "resume from step N" (the newest complete earlier
        checkpoint) or "start afresh"."""
        earlier = [s for s in sorted(self.all_steps()) if s < step and not self.missing_items(s, items)]
        return f"resume from step {earlier[-1]}" if earlier else "start afresh"


def read_config(checkpoint_dir, step: int | None = None) -> dict:
    """The JSON config saved with a checkpoint (latest step by default), without touching arrays."""
    root = Path(checkpoint_dir)
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{root} holds no vidiff checkpoint (no numbered step folders)")
    step = steps[-1] if step is None else step
    path = root / str(step) / "config" / "metadata"
    if not path.exists():
        candidates = list((root / str(step) / "config").glob("*"))
        if not candidates:
            raise FileNotFoundError(f"{root / str(step)} has no saved config")
        path = candidates[0]
    return json.loads(path.read_text())

