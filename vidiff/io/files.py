"""Files written whole or not at all, and the one-line error when one cannot be written.

Every file vidiff replaces while another process may read it (an export's ``vidiff.json``, the caption and
latent caches, the weight-digest memo, the skip counts, a config's manifests), and every clip it writes, goes through
:func:`replace_whole`: a temporary file beside the target, named by ``mkstemp`` so that processes on several
hosts sharing a folder (which may share a pid, as identical containers do) never write into one another's
temporary file, then renamed over the target, which readers therefore see old or new, never half written.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

import numpy as np

_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def not_written(path, code: int | None, why: str) -> OSError:
    """The one-line error for a file that could not be written (the old one, if any, is left as it was)."""
    fix = "free disk space and run again" if code in _DISK_FULL else f"check that {Path(path).parent} is writable"
    return OSError(f"{path} could not be written ({why}); {fix}")


def _umask_now() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_now()  # (imported on the main thread, before any writer thread runs)


def file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (a temporary file gets 0600). Read from
    /proc where there is one: setting the umask to read it, on writer threads, would race with other threads."""
    try:
        with open("/proc/self/status") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = _UMASK_AT_IMPORT
    return 0o666 & ~mask


def replaceable_mode(path) -> int:
    """The mode a file written whole at ``path`` gets (an existing file's own; else what ``open()`` gives), once
    it can be replaced: a one-line ``OSError`` for a folder or a read-only file (``open()`` would refuse it; as
    root, whose access checks pass, by its mode bits). Writers of several files call it for each before any."""
    try:
        target = Path(os.path.realpath(path))
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder; give a file name")
        if not target.exists():
            return file_mode()
        if not (os.access(target, os.W_OK) and target.stat().st_mode & 0o222):
            raise PermissionError(errno.EACCES, "it is read-only; make it writable or choose another path")
        return stat.S_IMODE(target.stat().st_mode)
    except OSError as error:
        if error.errno in (errno.EISDIR, errno.EACCES) and error.filename is None:  # said above, with its fix
            raise OSError(f"{path} could not be written: {error.strerror}") from None
        raise not_written(path, error.errno, error.strerror or str(error)) from None


def replace_whole(path, fill, *, sync: bool = True, keep_suffix: bool = False) -> Path:
    """``path`` written whole or not at all: ``fill(temporary)`` writes a file beside it, which is given the
    mode ``open()`` gives (not mkstemp's 0600; an existing file's own mode) and renamed over ``path``; an
    ``OSError`` is one line. A symlink's target is replaced, the link kept; a folder or a read-only file is refused
    (:func:`replaceable_mode`).

    ``sync``: flush the bytes to disk before the rename, so a crash of the machine cannot leave ``path`` empty.
    Caches whose readers recompute an unreadable entry skip it: one fsync per caption would slow their writes.
    ``keep_suffix``: the temporary file ends in ``path``'s suffix too, for writers that pick the format by it.
    """
    path = Path(path)
    mode = replaceable_mode(path)
    target = Path(os.path.realpath(path))
    temporary = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.",
                                             suffix=".partial" + (target.suffix if keep_suffix else ""),
                                             dir=target.parent)
        os.close(handle)
        fill(temporary)
        if sync:
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise not_written(path, error.errno, error.strerror or str(error)) from None
        raise
    return path


def save_text(path, text: str, *, sync: bool = True) -> Path:
    """``text`` to ``path`` through :func:`replace_whole`."""
    return replace_whole(path, lambda temporary: Path(temporary).write_text(text), sync=sync)


def save_npz(path, arrays: dict, *, sync: bool = True) -> Path:
    """``np.savez`` of ``arrays`` to ``path`` through :func:`replace_whole` (a file object, so that numpy adds no
    ``.npz`` to the temporary name)."""
    def fill(temporary):
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)

    return replace_whole(path, fill, sync=sync)
