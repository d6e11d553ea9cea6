"""ArrayRecord shards, what ``vidiff prepare`` writes, read back: the source and the shard files a path names.

A damaged record becomes a ``Skip`` named by its shard and place; a shard the reader cannot open, a set of
shards with some missing (a ``vidiff prepare`` killed while moving them in) or shards holding no record are
refused when the source is opened, in one line naming the folder and the fix.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

import grain
import numpy as np

from vidiff.data import skips as sk
from vidiff.data.schema import decode_record


class ArrayRecordSource:
    """Random access to shards written by ``vidiff prepare``; damaged entries become ``Skip``s.

    Shards that hold no record at all are refused when the source is opened:
    an empty source would give an empty epoch, or spin forever when repeated.
    ``frames=False`` reads records without their frames (``decode_record``'s latents-only read).
    """

    def __init__(self, paths: Sequence[str], field: str = "data.array_record_path", *, frames: bool = True):
        self.paths, self.frames = list(paths), frames
        self._source = _open_shards(self.paths, field)
        self._ends = None  # cumulative records per shard, counted when a damaged record first needs naming
        if not len(self._source):
            folders = sorted({str(Path(p).parent) for p in self.paths})
            raise ValueError(f"{field}: the {len(self.paths)} shard(s) in {', '.join(folders)} hold no records; "
                             "run `vidiff prepare` again with a manifest that yields clips")

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        try:
            data = self._source[index]
        except RuntimeError as e:  # how the Riegeli reader reports a chunk whose checksum fails
            return sk.Skip(sk.CORRUPT_RECORD, self._where(index), f"unreadable record ({_one_line(e)})")
        try:
            return decode_record(data, frames=self.frames)
        except ValueError as e:
            return sk.Skip(sk.CORRUPT_RECORD, self._where(index), str(e))

    def _where(self, index: int) -> str:
        """``"<shard path> record <i>"``: the shard holding the source's ``index``-th record, and its place there."""
        if self._ends is None:
            self._ends = np.cumsum([len(grain.sources.ArrayRecordDataSource([p])) for p in self.paths])
        shard = int(np.searchsorted(self._ends, index, side="right"))
        return f"{self.paths[shard]} record {index - (int(self._ends[shard - 1]) if shard else 0)}"


def _open_shards(paths: list[str], field: str):
    """The shards as one source; a shard the reader cannot open (cut short, its index damaged) is a one-line error."""
    try:
        return grain.sources.ArrayRecordDataSource(paths)
    except RuntimeError as e:
        error, bad = e, ", ".join(paths)
    for path in paths:  # the reader's error names no file: open the shards one by one to find the one it means
        try:
            grain.sources.ArrayRecordDataSource([path])
        except RuntimeError as e:
            error, bad = e, path
            break
    raise ValueError(f"{field}: shard {bad} is damaged or cut short ({_one_line(error)}); "
                     "run `vidiff prepare` again to write it") from None


def _one_line(error: Exception) -> str:  # the reader's message, on one line as every error the CLI prints
    return " ".join(str(error).split())


def array_record_paths(spec, split: str, field: str = "data.array_record_path") -> list[str]:
    """Shard files from a directory (``{split}-*.array_record`` in it), a glob, a file, or a list of them."""
    if spec is None or spec == "":
        raise ValueError(f"{field} is not set; give the --out directory of `vidiff prepare`")
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths = []
    for one in specs:
        one = str(one)
        if Path(one).is_dir():
            paths += sorted(glob.glob(str(Path(one) / f"{split}-*.array_record")))
        else:
            paths += sorted(glob.glob(one))
    if not paths:
        raise ValueError(f"{field}={spec!r}: no {split}-*.array_record shards found; run `vidiff prepare --out DIR` and point {field} at DIR")
    _check_whole_sets(paths, field)
    return paths


def _shard_place(name: str) -> tuple[str, int, int] | None:
    """``(prefix, index, count)`` of a ``{prefix}-{index}-of-{count}.array_record`` name, else None."""
    parts = name.removesuffix(".array_record").rsplit("-", 3)
    if not name.endswith(".array_record") or len(parts) != 4 or parts[2] != "of" or not (parts[1] + parts[3]).isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[3])


def _check_whole_sets(paths: list[str], field: str) -> None:
    """Every ``-of-N`` set the shards come from is whole in its folder: a `vidiff prepare` killed while it moved its
    shards in leaves only some of them, and training on those would read part of the data without a word."""
    named = {(str(Path(p).parent), place[0]) for p in paths if (place := _shard_place(Path(p).name))}
    for folder, prefix in sorted(named):
        places = {place for p in Path(folder).glob(f"{glob.escape(prefix)}-*-of-*.array_record")
                  if (place := _shard_place(p.name)) and place[0] == prefix}
        counts = sorted({count for _, _, count in places}) or [0]  # [0]: the shards went while this looked
        count = counts[0]
        missing = [f"{prefix}-{i:05d}-of-{count:05d}" for i in range(count) if (prefix, i, count) not in places]
        if len(counts) > 1:
            problem = f"{prefix}-*.array_record shards of {len(counts)} runs ({', '.join(f'-of-{n:05d}' for n in counts)})"
        elif missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            problem = (f"{len(places)} of the {count} {prefix}-*-of-{count:05d}.array_record shards "
                       f"(missing {', '.join(missing[:3])}{more})")
        else:
            continue
        raise ValueError(f"{field}: {folder} holds {problem}: a `vidiff prepare` into it did not finish; "
                         f"run `vidiff prepare ... --out {folder} --overwrite` again")
