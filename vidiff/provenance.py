"""What a model was made with, for an export's ``vidiff.json`` (``provenance.vae``, ``provenance.dit``).

The same command gives other weights on another number of devices (the reductions group differently) or with
other library versions, so an export records, beside its config: ``software`` (vidiff's and its libraries'
versions, Python, the platform), ``git_commit`` (when vidiff runs from a git checkout), ``devices`` (the process
and device counts, the device kind, a mesh's resolved axis sizes: the config's ``{"data": -1}`` says none of
them) and the step. ``collect`` (mesh, step and extra fields) is the whole block. Only the standard library and
jax: every layer may call it.
"""
from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path

import jax

# The libraries whose versions change a run's numbers or how its checkpoints and data are read.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
_CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root when vidiff runs from a checkout


def collect(mesh=None, step: int | None = None, **extra) -> dict:
    """``software()``, ``git_commit()``, ``devices(mesh)``, ``step`` and ``extra`` (e.g. a run's config history)."""
    made = {**software(), "git_commit": git_commit(), **devices(mesh)}
    if step is not None:
        made["step"] = int(step)
    return {**made, **extra}


def software() -> dict:
    """vidiff's version, each of ``PACKAGES`` installed (by distribution name), Python's and the platform."""
    packages = {name: version for name in PACKAGES if (version := _version(name)) is not None}
    return {"vidiff": _version("vidiff"), "packages": packages, "python": platform.python_version(),
            "platform": f"{sys.platform}-{platform.machine()}"}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def devices(mesh=None) -> dict:
    """Process and device counts, the devices' kind and backend, and ``mesh``'s axis sizes (when given)."""
    found = {"process_count": jax.process_count(), "device_count": jax.device_count(),
             "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend()}
    if mesh is not None:
        found["mesh"] = {str(name): int(size) for name, size in mesh.shape.items()}
    return found


def git_commit(root: Path = _CHECKOUT) -> str | None:
    """The commit checked out in ``root`` (vidiff's checkout), read from ``.git`` without running git; None for
    an installed vidiff, or a ``.git`` this cannot read (uncommitted changes are not seen)."""
    try:
        git = _git_dir(root / ".git")
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):  # a detached HEAD holds the commit itself
            return head or None
        return _ref(git, head[len("ref: "):])
    except (OSError, ValueError):
        return None


def _git_dir(dot_git: Path) -> Path:
    """``.git``, or the directory a worktree's or submodule's ``.git`` file points to."""
    if dot_git.is_file():
        where = dot_git.read_text().strip().removeprefix("gitdir: ")
        return (dot_git.parent / where).resolve()
    return dot_git


def _ref(git: Path, ref: str) -> str | None:
    """A branch's commit: its own file, else its line in ``packed-refs`` (a worktree's are in the common dir)."""
    common = git / "commondir"
    roots = [git] + ([(git / common.read_text().strip()).resolve()] if common.is_file() else [])
    for root in roots:
        if (root / ref).is_file():
            return (root / ref).read_text().strip()
    for root in roots:
        if (root / "packed-refs").is_file():
            for line in (root / "packed-refs").read_text().splitlines():
                commit, _, name = line.partition(" ")
                if name == ref:
                    return commit
    return None
