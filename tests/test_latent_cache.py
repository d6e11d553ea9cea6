"""``dit_train.latents = "cached"``: each distinct clip is encoded once, later epochs reuse the latents."""
import numpy as np

from vidiff.train.tasks import LatentCache


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
    assert encoder.calls == 2 and cache.misses == 5 and len(cache.entries) == 5
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
