"""Skip accounting: bad input never stops the stream and never vanishes silently.

A stage that meets an unusable item (a corrupt file, a malformed manifest row,
an empty caption, ...) returns a ``Skip`` in place of the record. One filter,
``CountSkips``, drops it from the stream after counting it by reason in a
``SkipLedger`` and logging a warning with the file name. The ledger also
enforces ``max_bad_fraction``: past it the stream stops with one ``ValueError``
naming the fraction, the limit and the config field that raises the limit.

Where counts live. Grain runs the filter in whichever process reads the data:
the main process with ``num_workers=0`` (counts are then exact), or each
``mp_prefetch`` worker, which gets its own copy of the ledger (zeroed when it
is unpickled). To aggregate worker counts, give the ledger a ``directory``:
every process then keeps its counts in ``<directory>/skips-<pid>.json`` and
``SkipLedger.totals()`` in the main process sums them. Skips are written as
they happen; the ``seen`` count of a worker is written every
``_FLUSH_EVERY`` records and at the end of its stream, so once a finite
stream has ended in the main process the totals are exact.

When the fraction is judged: while streaming, by each process on its own
counts once it has ``min_records`` of them; at the end of a finite stream, by
the main process on the totals of all processes (``EndOfStream``). Counts include items
read ahead of the consumer (prefetch buffers), and a repeated dataset counts
an item once per epoch; manifest rows refused when the manifest is read are
counted once, in the process that read it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import grain

from vidiff.io.files import save_text

log = logging.getLogger("vidiff.data")

# Reasons beyond vidiff.io's (missing_file, not_video, corrupt, no_frames,
# too_large, truncated), one per kind of bad input the data layer can meet.
BAD_MANIFEST_ROW = "bad_manifest_row"  # not JSON / not an object / wrong number of CSV fields
MISSING_PATH = "missing_path"
BAD_TIME_RANGE = "bad_time_range"  # start/end not numbers, negative, or end <= start
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
NON_UTF8_CAPTION = "non_utf8_caption"
TOO_SHORT = "too_short"  # fewer frames than the shortest bucket needs
CORRUPT_RECORD = "corrupt_record"  # a prepared ArrayRecord entry that does not decode
BAD_ARRAY = "bad_array"  # a dataset's video is not uint8 (T, H, W, 1|3)

_FLUSH_EVERY = 16


@dataclasses.dataclass(frozen=True)
class Skip:
    """Stands in for a record that cannot be used; dropped (and counted) by ``CountSkips``."""

    reason: str
    key: str  # what the user can look up: a file name, a manifest line, a record index
    detail: str = ""


def check_caption(value: Any) -> str | tuple[str, str]:
    """A usable caption as ``str``, or ``(reason, detail)`` when it cannot be used."""
    if value is None:
        return MISSING_CAPTION, "no caption"
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return NON_UTF8_CAPTION, f"caption is not UTF-8 ({e.reason} at byte {e.start})"
    if not isinstance(value, str):
        return MISSING_CAPTION, f"caption is a {type(value).__name__}, not text"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Manifests are decoded with surrogateescape, so undecodable bytes
        # arrive here as lone surrogates.
        return NON_UTF8_CAPTION, "caption is not UTF-8"
    if not value.strip():
        return EMPTY_CAPTION, "caption is empty"
    return value


class SkipLedger:
    """Counts records by outcome (``seen``, and ``skipped`` by reason), thread-safely.

    Args:
      directory: where each process keeps its counts so the main process can
        sum the counts of ``mp_prefetch`` workers (see the module docstring);
        ``None`` keeps counts in this process only. ``SkipLedger.temporary()``
        makes one in a temporary directory removed with the ledger.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = None if directory is None else str(directory)
        self._reset()

    @classmethod
    def temporary(cls) -> "SkipLedger":
        """A ledger aggregating across processes in a temporary directory it owns."""
        directory = tempfile.mkdtemp(prefix="vidiff-skips-")
        ledger = cls(directory)
        weakref.finalize(ledger, shutil.rmtree, directory, True)
        return ledger

    def _reset(self):
        self._lock = threading.Lock()
        self._seen = 0
        self._skipped: dict[str, int] = {}
        self._logged: set[str] = set()
        self._unflushed = 0

    # A worker gets a zeroed copy: what the main process counted before the
    # workers started (manifest rows) must not be counted again per worker.
    def __getstate__(self):
        return {"directory": self.directory}

    def __setstate__(self, state):
        self.directory = state["directory"]
        self._reset()

    @property
    def seen(self) -> int:
        """Records counted by this process, good and bad."""
        return self._seen

    @property
    def skipped(self) -> dict[str, int]:
        """Bad records counted by this process, by reason."""
        with self._lock:
            return dict(sorted(self._skipped.items()))

    @property
    def bad(self) -> int:
        """Bad records counted by this process, all reasons together."""
        return sum(self._skipped.values())

    def ok(self) -> None:
        """Count one usable record."""
        with self._lock:
            self._seen += 1
            self._unflushed += 1
            flush = self.directory is not None and self._unflushed >= _FLUSH_EVERY
        if flush:
            self.flush()

    def skip(self, skip: Skip) -> None:
        """Count one unusable record and log it (once per key and reason in this process)."""
        with self._lock:
            self._seen += 1
            self._skipped[skip.reason] = self._skipped.get(skip.reason, 0) + 1
            tag = f"{skip.reason}:{skip.key}"
            first = tag not in self._logged
            self._logged.add(tag)
        if first:
            log.warning("skipped %s: %s%s", skip.key, skip.reason, f" ({skip.detail})" if skip.detail else "")
        if self.directory is not None:
            self.flush()

    def count(self, item: Any) -> bool:
        """Count ``item`` (a record or a ``Skip``); True when it is a usable record."""
        if isinstance(item, Skip):
            self.skip(item)
            return False
        self.ok()
        return True

    def check(self, max_bad_fraction: float, *, field: str, min_records: int = 0, uncounted: int = 0,
              totals: bool = False) -> None:
        """Raise ``ValueError`` when more than ``max_bad_fraction`` of the records counted so far were bad.

        Checked only once ``min_records`` records were counted, so that the
        first bad file of a large corpus does not read as 100% bad.
        ``uncounted`` adds records known to exist but not counted yet (the
        good rows of a manifest, before they are decoded). ``totals`` judges
        the counts of all processes (``totals()``) instead of this one's.
        """
        if totals:
            summed = self.totals()
            seen, skipped = summed["seen"] + uncounted, summed["skipped"]
        else:
            with self._lock:
                seen, skipped = self._seen + uncounted, dict(self._skipped)
        bad = sum(skipped.values())
        if seen == 0 or seen < min_records or bad <= max_bad_fraction * seen:
            return
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        fix = "fix the inputs (see the warnings logged per file)"
        if bad == seen:  # no limit lets anything through: raising it cannot help
            raise ValueError(f"{bad / seen:.1%} of records were bad ({bad} of {seen}: {reasons}); {fix}")
        raise ValueError(
            f"{bad / seen:.1%} of records were bad ({bad} of {seen}: {reasons}), above the limit "
            f"max_bad_fraction={max_bad_fraction:g}; {fix} or raise {field}"
        )

    def _file(self) -> Path:
        return Path(self.directory) / f"skips-{os.getpid()}.json"

    def flush(self) -> None:
        """Write this process's counts to its file in ``directory`` (no-op without one)."""
        if self.directory is None:
            return
        with self._lock:
            payload = json.dumps({"seen": self._seen, "skipped": self._skipped})
            self._unflushed = 0
        save_text(self._file(), payload, sync=False)

    def totals(self) -> dict[str, Any]:
        """Counts of this process plus those other processes wrote to ``directory``.

        Returns ``{"seen": int, "skipped": {reason: int}, "bad": int}``.
        """
        with self._lock:
            seen, skipped = self._seen, dict(self._skipped)
        if self.directory is not None and Path(self.directory).is_dir():
            own = self._file().name
            for path in Path(self.directory).glob("skips-*.json"):
                if path.name == own:
                    continue
                try:
                    other = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # a worker is replacing it this instant; next read sees it
                seen += other["seen"]
                for reason, n in other["skipped"].items():
                    skipped[reason] = skipped.get(reason, 0) + n
        return {"seen": seen, "skipped": dict(sorted(skipped.items())), "bad": sum(skipped.values())}


@dataclasses.dataclass
class CountSkips(grain.transforms.Filter):
    """Grain filter: counts every item in ``ledger``, drops ``Skip``s, enforces the bad fraction."""

    ledger: SkipLedger
    max_bad_fraction: float
    min_records: int
    field: str = "data.max_bad_fraction"

    def filter(self, element) -> bool:
        """Count ``element``; keep it unless it is a ``Skip``; stop the stream past the bad fraction."""
        keep = self.ledger.count(element)
        self.ledger.check(self.max_bad_fraction, field=self.field, min_records=self.min_records)
        return keep


class _EndOfStreamIterator(grain.DatasetIterator):
    def __init__(self, parent, ledger: SkipLedger, max_bad_fraction: float | None, field: str):
        super().__init__(parent)
        self._ledger, self._max, self._field = ledger, max_bad_fraction, field

    def __next__(self):
        try:
            return next(self._parent)
        except StopIteration:
            self._ledger.flush()
            if self._max is not None:
                self._ledger.check(self._max, field=self._field, totals=True)
            raise

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class EndOfStream(grain.IterDataset):
    """Passes elements through; when a finite stream ends, flushes ``ledger`` and checks the bad fraction.

    Inside a worker it only flushes (``max_bad_fraction=None``); placed in the
    main process after ``mp_prefetch`` it judges the summed counts of all
    processes, which are final once every worker has ended its stream.
    """

    def __init__(self, parent: grain.IterDataset, ledger: SkipLedger, max_bad_fraction: float | None,
                 field: str = "data.max_bad_fraction"):
        super().__init__(parent)
        self._ledger, self._max, self._field = ledger, max_bad_fraction, field

    @property
    def ledger(self) -> SkipLedger:
        """The ledger this pipeline counts bad items in (``.totals()`` sums all processes)."""
        return self._ledger

    def __iter__(self):
        return _EndOfStreamIterator(self._parent.__iter__(), self._ledger, self._max, self._field)

    def __str__(self):
        return f"EndOfStream(max_bad_fraction={self._max})"
