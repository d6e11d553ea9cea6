"""Checkpoints: orbax ``CheckpointManager`` holding the train state, the Grain
iterator state and the config, saved asynchronously, restorable onto another
mesh or device count, but only by as many processes as saved it (the data
position is one file per process; ``check_processes`` says so in one line).

Layout of ``<workdir>/checkpoints/<step>/``: ``state`` (orbax arrays, sharded
as saved; restored with the shardings of the caller's abstract state, so a
different mesh shape works), ``data`` (the Grain iterator's JSON state, one
file per process) and ``config`` (JSON: the run's config, plus what the loop
records beside it: a DiT's VAE, the captions cut so far, the config changes its
resumes made, ``config_history``). No pickle anywhere.
Retention: the last ``keep`` checkpoints plus the ``keep_best`` with the
lowest value of the chosen metric (stored with each step as JSON, so a resumed
run ranks the earlier checkpoints too; a step saved without metrics counts only
towards the last ``keep``). ``check_complete`` refuses, in one line, a step
folder that lacks an item (a copy or save cut short) instead of orbax's
``KeyError``, and ``check_folders`` a step entry that is not a folder (a file,
a broken symlink or a loop), which orbax would skip and a later save trip
over. A save that cannot be written (a full disk) is one
``CheckpointWriteError`` line naming the step and the one a rerun resumes
from, raised by the call that finds it (``save``, ``wait`` or ``close``);
``close`` waits for pending saves and may be called again.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vidiff import distributed


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written; a ``ValueError``, so ``vidiff train`` reports it in one line."""


# Errors a user fixes by freeing space (errno codes, as tensorstore quotes them: os_error_code='27').
_SPACE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


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
        self._writing: int | None = None  # the step whose asynchronous save may still be running
        self._failed = False

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
        self.wait()  # a failure of the previous save is that step's, not this one's
        with self._writes(step):
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=scalars, force=True)
        self._writing = step

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
        with self._writes(self._writing):
            self.manager.wait_until_finished()
        self._writing = None

    def close(self) -> None:
        """Wait for pending saves, then release the manager; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
            self.manager.close()
        except CheckpointWriteError:
            raise
        except Exception:
            if not self._failed:  # after a failed save, that one line is the run's error, not what closing adds
                raise

    @contextlib.contextmanager
    def _writes(self, step: int | None):
        """Turn orbax's failure to write ``step`` (tensorstore's OUT_OF_RANGE, an ``OSError``) into one line."""
        try:
            yield
        except Exception as error:
            if step is None or self._failed:
                raise
            self._failed = True
            raise CheckpointWriteError(self._write_failure(step, error)) from None

    def _write_failure(self, step: int, error: Exception) -> str:
        code = getattr(error, "errno", None)
        if code is None:
            quoted = re.search(r"os_error_code='(\d+)'", str(error))
            code = int(quoted.group(1)) if quoted else None
        if code:
            reason = f"{os.strerror(code)}, errno {code}"
        else:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            reason = reason if len(reason) <= 200 else reason[:200] + " ..."
        fix = (f"free space in {self.directory}" if code in _SPACE_ERRORS else
               f"make {self.directory} writable" if code in (errno.EACCES, errno.EPERM, errno.EROFS) else
               f"check that {self.directory} can be written")
        earlier = self.without(step).replace("resume from", "it resumes from").replace("start afresh",
                                                                                           "it starts afresh")
        return f"checkpoint {step} could not be written ({reason}); {fix}, then run the same command again: {earlier}"

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

    def check_folders(self) -> None:
        """Raise a one-line ``ValueError`` for a step entry that is not a folder: orbax leaves it out of the steps
        (so an older checkpoint resumes, silently) and the save of that step fails minutes later."""
        for entry in sorted(self.directory.iterdir(), key=lambda p: p.name):
            kind = _not_a_folder(entry) if entry.name.isdigit() else None
            if kind:
                raise ValueError(f"checkpoint {entry} is not a folder ({kind}); delete it to "
                                 f"{self.without(int(entry.name))}")

    def check_processes(self, step: int, count: int) -> None:
        """Raise a one-line ``ValueError`` unless ``count`` processes can restore ``step``: grain saves the data
        position as ``data/process_<i>-of-<n>.json`` and restores it only with ``n`` (the state restores onto
        any mesh or device count). A folder without such files is not checked."""
        counts = {int(m.group(1)) for f in (self.directory / str(step) / "data").glob("process_*-of-*.json")
                  if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name))}
        if counts and count not in counts:
            saved = max(counts)
            processes = f"{saved} process{'es' if saved > 1 else ''}"
            raise ValueError(f"checkpoint {self.directory / str(step)} was written by {processes}; resume it with "
                             f"{processes}, or use a new workdir")

    def without(self, step: int, items=("state", "data")) -> str:
        """What deleting the folder of ``step`` leaves: "resume from step N" (the newest complete earlier
        checkpoint) or "start afresh"."""
        earlier = [s for s in sorted(self.all_steps()) if s < step and not self.missing_items(s, items)]
        return f"resume from step {earlier[-1]}" if earlier else "start afresh"


def _not_a_folder(path: Path) -> str | None:
    """What ``path`` is when it is not a folder (following symlinks), or None."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symlink loop"
        return "a broken symlink" if path.is_symlink() else None  # else it went away meanwhile
    return None if stat.S_ISDIR(mode) else "a file"


def read_config(checkpoint_dir, step: int | None = None) -> dict:
    """The JSON config saved with a checkpoint (latest step by default), without touching arrays.

    ``FileNotFoundError`` when the step has no config record (nothing to compare with); a one-line ``ValueError``
    when it has one that is not a JSON object with object sections (a record edited by hand, or cut short), since
    the checks that read it would otherwise crash on it or pass over it silently."""
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
    try:
        record = json.loads(path.read_text())
        problem = _record_problem(record)
    except (OSError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        raise ValueError(f"checkpoint {root / str(step)}'s config record is not readable ({problem}); restore it "
                         f"or use a new workdir")
    return record


# Sections of a vidiff config a resume compares (model shapes, data order): each a JSON object when present.
_RECORD_SECTIONS = ("data", "text", "vae", "dit", "vae_loss", "vae.overrides", "dit.overrides")


def _record_problem(record) -> str | None:
    """What makes ``record`` no config record, or None."""
    if not isinstance(record, dict):
        return f"{json.dumps(record)[:40]} is not an object"
    for name in _RECORD_SECTIONS:
        value = record
        for key in name.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and not isinstance(value, dict):
            return f"{name}={json.dumps(value)[:40]} is not an object"
    return None


def lock_run(run_dir: Path):
    """Process 0 holds an exclusive ``flock`` on ``<run_dir>/.lock`` for the run, else one line names the pid
    holding it: two runs on one workdir would interleave their saves and fail deep inside orbax. The kernel
    releases it when the process ends, kill -9 included. Returns the open file for ``unlock`` (None on other
    processes, and on a filesystem without locks, where the run goes on unguarded)."""
    held, holder = None, 0
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        held = open(run_dir / ".lock", "a+")  # not truncated on open: a refused run reads the holder's pid
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.seek(0)
            pid = held.read().strip()
            holder = int(pid) if pid.isdigit() else -1
        except OSError:
            held.close()
            held = None
        else:
            held.truncate(0)
            held.write(f"{os.getpid()}\n")
            held.flush()
    holder = int(distributed.every_process([holder])[0, 0])  # all refuse together: none waits alone at a collective
    if holder:
        unlock(held)
        pid = f" (pid {holder})" if holder > 0 else ""
        raise ValueError(f"another vidiff train{pid} is using {run_dir}; wait for it to end or use another workdir")
    return held


def unlock(held) -> None:
    """Release ``lock_run``'s lock (closing the file does)."""
    if held is not None:
        held.close()
