"""``dit_train.latents = "cached"``: each distinct clip's VAE latents, encoded once, kept across epochs and resumes.

For finite data (a world of ``length`` clips, a video folder) every epoch after
the first skips the VAE: on a CPU, encoding costs as much as a tiny DiT step.
Every checkpoint also writes the cache to
``<workdir>/dit/latent_cache/process_<i>.npz`` (one file per process, each of
which sees its own share of the data), tagged with a fingerprint of the VAE's
variables and config. The file is written in a background thread (seconds for
100,000 clips), under a temporary name renamed when complete, so training goes
on meanwhile and a kill never leaves half a file. A resumed run loads it, so it
does not spend its first epoch re-encoding what the killed run had encoded; a
cache from another VAE is ignored, and the log says so.
"""
from __future__ import annotations

import hashlib
import threading
import zipfile
from pathlib import Path

import jax
import numpy as np

from vidiff.io.files import save_npz

KEY_BYTES = 16


def clip_key(video: np.ndarray) -> bytes:
    """A clip's identity: a hash of its uint8 pixels and shape (crops and image cuts are new clips)."""
    return hashlib.blake2b(repr(video.shape).encode() + video.tobytes(), digest_size=KEY_BYTES).digest()


def vae_fingerprint(variables, config) -> str:
    """Hash of the VAE's variables (parameters and latent statistics) and config: latents are only
    reusable from the same VAE."""
    digest = hashlib.blake2b(repr(config).encode(), digest_size=16)
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(variables))
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = np.asarray(leaf)
        digest.update(jax.tree_util.keystr(path).encode() + str(leaf.dtype).encode() + leaf.tobytes())
    return digest.hexdigest()


class LatentCache:
    """Normalised VAE latents (posterior mode) of every clip seen, keyed by :func:`clip_key`.

    A batch with any new clip is encoded whole (one compiled shape per bucket); at most
    ``capacity`` clips are kept.
    """

    def __init__(self, encode, capacity: int, fingerprint: str = ""):
        self.encode, self.capacity, self.fingerprint = encode, int(capacity), fingerprint
        self.entries: dict[bytes, np.ndarray] = {}
        self.hits = self.misses = self.loaded = 0
        self._saved = 0  # entries already on disk: an unchanged cache is not written again
        self._writer: threading.Thread | None = None
        self._failure: tuple[Path, Exception] | None = None  # a background write's error, raised by the next wait

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        keys = [clip_key(v) for v in videos]
        if all(k in self.entries for k in keys):
            self.hits += len(keys)
            return np.stack([self.entries[k] for k in keys])
        cached = sum(k in self.entries for k in keys)
        self.hits, self.misses = self.hits + cached, self.misses + len(keys) - cached
        latents = np.asarray(self.encode(videos), np.float32)
        for key, z in zip(keys, latents):
            if len(self.entries) < self.capacity:
                self.entries[key] = z
        return latents

    def save(self, path) -> bool:
        """Start writing the entries (grouped by latent shape) to ``path`` in the background; False when nothing
        changed. The previous write is waited for first, and raises here if it failed."""
        self.wait()
        if len(self.entries) == self._saved:
            return False
        snapshot = dict(self.entries)  # the loop goes on adding entries while this is written
        self._saved = len(snapshot)
        # Not a daemon: a process that ends right after its last checkpoint still finishes the file.
        self._writer = threading.Thread(target=self._write, args=(snapshot, Path(path)), name="latent-cache-save")
        self._writer.start()
        return True

    def wait(self) -> None:
        """Block until the last :meth:`save` is on disk; a failed write raises here in one line."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        failure, self._failure = self._failure, None
        if failure is not None:
            self._saved = -1  # what is on disk is unknown: the next save writes everything
            path, error = failure
            unaffected = "the checkpoints are unaffected but a resumed run would encode those clips again"
            if isinstance(error, OSError):  # save_npz's one line: the path, why, and the fix
                raise OSError(f"latent cache: {error} ({unaffected})")
            raise OSError(f"latent cache: writing {path} failed ({error!r}); {unaffected}")

    def _write(self, entries: dict, path: Path) -> None:
        try:
            groups: dict[tuple, list] = {}
            for key, z in entries.items():
                groups.setdefault(z.shape, []).append((key, z))
            arrays = {"fingerprint": np.array(self.fingerprint)}
            for i, items in enumerate(groups.values()):
                arrays[f"keys_{i}"] = np.frombuffer(b"".join(k for k, _ in items), np.uint8).reshape(-1, KEY_BYTES)
                arrays[f"latents_{i}"] = np.stack([z for _, z in items])
            save_npz(path, arrays)
        except Exception as error:  # the thread cannot raise to the loop: the next save or wait does
            self._failure = (path, error)

    def load(self, path) -> str | None:
        """Add the entries saved at ``path`` (up to ``capacity``); a line for the log, or None if no file."""
        self.wait()  # a write still running would be missed, or seen half done
        path = Path(path)
        if not path.is_file():
            return None
        try:  # all of it read before any is kept: a file cut short adds nothing
            with np.load(path) as saved:
                if str(saved["fingerprint"]) != self.fingerprint:
                    return f"latent cache {path} was made with another VAE: ignored, clips are encoded again"
                groups = [(saved[f"keys_{group}"], saved[f"latents_{group}"]) for group in
                          sorted(name[len("keys_"):] for name in saved.files if name.startswith("keys_"))]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            return f"latent cache {path} is unreadable ({error}): ignored, clips are encoded again"
        before = len(self.entries)
        for keys, latents in groups:
            for key, z in zip(keys, latents):
                if len(self.entries) >= self.capacity:
                    break
                self.entries.setdefault(key.tobytes(), z)
        self.loaded += len(self.entries) - before
        self._saved = len(self.entries)
        return f"latent cache: {self.loaded} clips' latents loaded from {path}"

    def stats(self) -> dict:
        """Clips held, and of every clip looked up: ``hits`` were cached, ``misses`` new (a batch with a miss is
        encoded whole, its hits too: one compiled shape per bucket), ``loaded`` came from a saved cache."""
        return {"clips": len(self.entries), "hits": self.hits, "misses": self.misses, "loaded": self.loaded}
