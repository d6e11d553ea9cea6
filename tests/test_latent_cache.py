"""``dit_train.latents = "cached"``: each distinct clip is encoded once, later epochs and resumed runs reuse it."""
import re
import threading

import jax
import numpy as np
import pytest

from vidiff.train.latent_cache import LatentCache, vae_fingerprint


class CountingEncoder:
    """Stands in for the VAE: latents are a deterministic function of the pixels; calls are counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, videos):
        self.calls += 1
        return videos.astype(np.float32).mean(axis=(2, 3))[:, :, None, None, :] / 255.0


def _clips(seed, n=4, shape=(5, 8, 8, 3)):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_second_epoch_skips_the_encoder_and_returns_the_same_latents():
    encoder = CountingEncoder()
    cache = LatentCache(encoder, capacity=100)
    epoch = [_clips(0), _clips(1)]
    first = [cache(batch) for batch in epoch]
    assert encoder.calls == 2 and cache.misses == 8 and cache.hits == 0
    # Reshuffled rows of the same clips: served from the cache, bit-identical to a fresh encoding.
    shuffled = np.concatenate(epoch)[[5, 0, 7, 2]]
    again = cache(shuffled)
    assert encoder.calls == 2 and cache.hits == 4
    np.testing.assert_array_equal(again, encoder(shuffled))
    np.testing.assert_array_equal(first[0], encoder(epoch[0]))


def test_one_new_clip_encodes_the_batch_and_keys_tell_shapes_apart():
    encoder = CountingEncoder()
    cache = LatentCache(encoder, capacity=100)
    batch = _clips(0)
    cache(batch)
    mixed = batch.copy()
    mixed[2] = _clips(9, n=1)[0]
    cache(mixed)
    # Its 3 cached clips count as hits (they were counted as neither: hits + misses fell short of the clips drawn).
    assert encoder.calls == 2 and (cache.misses, cache.hits) == (5, 3) and len(cache.entries) == 5
    # The same bytes in another shape (an image cut, a different size) are a different clip.
    flat = batch.reshape(4, 1, 40, 8, 3)
    cache(flat)
    assert encoder.calls == 3 and len(cache.entries) == 9


def test_capacity_bounds_the_entries():
    encoder = CountingEncoder()
    cache = LatentCache(encoder, capacity=6)
    for seed in range(3):
        cache(_clips(seed))
    assert len(cache.entries) == 6
    cache(_clips(0))  # fully cached
    cache(_clips(2))  # never stored: over capacity
    assert encoder.calls == 4


def test_saved_cache_serves_a_resumed_run_without_encoding(tmp_path):
    cache = LatentCache(CountingEncoder(), capacity=100, fingerprint="vae-a")
    clips, images = _clips(0), _clips(1, shape=(1, 8, 8, 3))  # two latent shapes, saved as two groups
    first, first_images = cache(clips), cache(images)
    path = tmp_path / "latent_cache" / "process_0.npz"
    assert cache.save(path) is True and cache.save(path) is False  # unchanged: not written again
    assert sorted(p.name for p in path.parent.iterdir()) == ["process_0.npz"]  # no partial file left

    encoder = CountingEncoder()
    resumed = LatentCache(encoder, capacity=100, fingerprint="vae-a")
    assert resumed.load(path) == f"latent cache: 8 clips' latents loaded from {path}"
    np.testing.assert_array_equal(resumed(clips[::-1]), first[::-1])
    np.testing.assert_array_equal(resumed(images), first_images)
    assert encoder.calls == 0 and resumed.stats() == {"clips": 8, "hits": 8, "misses": 0, "loaded": 8}
    assert resumed.save(path) is False  # nothing new since the load


def test_save_writes_in_the_background_and_a_failed_write_raises_on_the_next(tmp_path, monkeypatch):
    savez, started, release = np.savez, threading.Event(), threading.Event()

    def slow_savez(file, **arrays):
        started.set()
        release.wait(5)
        savez(file, **arrays)

    monkeypatch.setattr(np, "savez", slow_savez)
    cache = LatentCache(CountingEncoder(), capacity=100, fingerprint="vae-a")
    first = cache(_clips(0))
    path = tmp_path / "process_0.npz"
    assert cache.save(path) is True and started.wait(10)
    assert not path.exists()  # save returned while the file is still being written
    cache(_clips(1))  # training goes on: entries added meanwhile are not in this write
    release.set()
    cache.wait()
    resumed = LatentCache(CountingEncoder(), capacity=100, fingerprint="vae-a")
    assert resumed.load(path) == f"latent cache: 4 clips' latents loaded from {path}"
    np.testing.assert_array_equal(resumed(_clips(0)), first)

    def full_disk(file, **arrays):
        file.write(b"PK")  # half a file ...
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    assert cache.save(path) is True  # the failure happens in the background ...
    with pytest.raises(OSError, match=re.escape(
            f"latent cache: {path} could not be written (No space left on device); free disk space and run again "
            f"(the checkpoints are unaffected but a resumed run would encode those clips again)")):
        cache.save(path)  # ... and ends the run at the next save (or at wait)
    cache.wait()  # told once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["process_0.npz"]  # ... removed; the last good file kept
    monkeypatch.setattr(np, "savez", savez)
    assert cache.save(path) is True  # nothing known to be on disk: written again, whole
    cache.wait()
    assert LatentCache(CountingEncoder(), 100, "vae-a").load(path).startswith("latent cache: 8 clips")


def test_a_cache_from_another_vae_is_ignored_and_capacity_holds_on_load(tmp_path):
    cache = LatentCache(CountingEncoder(), capacity=100, fingerprint="vae-a")
    cache(_clips(0))
    path = tmp_path / "process_0.npz"
    cache.save(path)
    cache.wait()  # another process's load comes after this one's write
    other = LatentCache(CountingEncoder(), capacity=100, fingerprint="vae-b")
    assert other.load(path) == f"latent cache {path} was made with another VAE: ignored, clips are encoded again"
    assert other.entries == {} and other.loaded == 0
    small = LatentCache(CountingEncoder(), capacity=3, fingerprint="vae-a")
    small.load(path)
    assert len(small.entries) == 3 and small.loaded == 3
    assert LatentCache(CountingEncoder(), 10).load(tmp_path / "missing.npz") is None
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # a copy cut short
    torn = LatentCache(CountingEncoder(), capacity=100, fingerprint="vae-a")
    assert torn.load(cut).startswith(f"latent cache {cut} is unreadable (")
    assert torn.load(cut).endswith("): ignored, clips are encoded again") and torn.entries == {} and torn.loaded == 0


def test_vae_fingerprint_follows_every_variable_and_the_config():
    variables = {"params": {"w": np.ones((2, 2), np.float32)}, "latent_stats": {"shift": np.zeros(2, np.float32)}}
    base = vae_fingerprint(variables, "config")
    assert vae_fingerprint({k: dict(v) for k, v in variables.items()}, "config") == base
    nudged = {**variables, "latent_stats": {"shift": np.array([0.0, 1e-7], np.float32)}}
    assert vae_fingerprint(nudged, "config") != base
    assert vae_fingerprint(variables, "another config") != base


def test_the_training_cache_encodes_on_one_device_of_this_process(tmp_path):
    """A miss is one process's alone. Encoded with the mesh's replicated VAE it was a computation over every
    process's devices, which with several processes only some of them start (and all wait for)."""
    from tiny_model import OVERRIDES, REPO, tiny_model_dir

    from vidiff import parallel
    from vidiff.train import config as config_lib
    from vidiff.train import dit_loss, tasks

    (tmp_path / "export").symlink_to(tiny_model_dir())
    config = config_lib.for_stage(config_lib.load_config(
        REPO / "vidiff" / "configs" / "world_tiny.py",
        [*OVERRIDES, f"--config.workdir={tmp_path}", "--config.dit_train.latents=cached"]), "dit")
    mesh = parallel.mesh_from_config(config.mesh)
    assert mesh.size > 1  # the 8 virtual CPU devices of conftest
    task = tasks.build(config, "dit", mesh)
    clips = np.random.default_rng(0).integers(0, 256, (2, 9, 16, 16, 3), dtype=np.uint8)
    latents = task.latent_cache.encode(clips)
    assert latents.sharding.device_set == {jax.local_devices()[0]}
    on_mesh = dit_loss.encode_latents(task.vae, task.frozen["vae"], clips)  # the same numbers either way
    np.testing.assert_allclose(np.asarray(latents), np.asarray(on_mesh), atol=1e-5)
