"""Random conditioning masks for the prompting modes (vidiff.diffusion.conditioning)."""
import jax
import numpy as np
import pytest

from vidiff.diffusion.conditioning import MODES, mode_probabilities, sample_condition_masks


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_draws_its_pattern(mode):
    masks = np.asarray(sample_condition_masks(jax.random.key(0), 256, 5, {mode: 1.0}))
    assert masks.shape == (256, 5)
    assert masks.sum(1).max() <= 4, "every clip keeps a frame to predict"
    known = masks.astype(bool)
    if mode == "none":
        assert not known.any()
    elif mode == "first_frame":
        assert (known == np.array([1, 0, 0, 0, 0], bool)).all()
    elif mode == "first_k":
        k = known.sum(1)
        assert set(k) == {1, 2, 3, 4}
        assert all(row[:n].all() and not row[n:].any() for row, n in zip(known, k))
    elif mode == "last_k":
        k = known.sum(1)
        assert set(k) == {1, 2, 3, 4}
        assert all(row[5 - n:].all() and not row[:5 - n].any() for row, n in zip(known, k))
    elif mode == "first_last":
        assert (known == np.array([1, 0, 0, 0, 1], bool)).all()
    else:
        assert 0.35 < masks.mean() < 0.55 and len({tuple(r) for r in known}) > 10


def test_mode_mixture_follows_probabilities_and_images_are_never_conditioned():
    masks = np.asarray(sample_condition_masks(jax.random.key(1), 4000, 5, {"none": 0.5, "first_frame": 0.5}))
    assert abs(masks[:, 0].mean() - 0.5) < 0.03 and masks[:, 1:].sum() == 0
    assert np.asarray(sample_condition_masks(jax.random.key(1), 8, 1, {"first_frame": 1.0})).sum() == 0
    assert np.allclose(mode_probabilities(None), [1, 0, 0, 0, 0, 0])
    sparse = np.asarray(sample_condition_masks(jax.random.key(2), 1000, 5, {"random": 1.0}, random_frame_rate=0.2))
    assert 0.17 < sparse.mean() < 0.23  # random_frame_rate sets how many frames the random mode knows


def test_bad_modes_fail_with_the_field_name():
    with pytest.raises(ValueError, match="dit_train.condition has unknown mode.*'first'"):
        mode_probabilities({"first": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        mode_probabilities({"none": 0.0})
    for bad in ({"none": float("nan")}, {"none": 0.5, "first_frame": float("inf")}, {"none": -0.1, "first_k": 1}):
        with pytest.raises(ValueError, match="^dit_train.condition probabilities must be finite and >= 0 with a "
                                             "positive sum, got "):
            mode_probabilities(bad)
    with pytest.raises(ValueError, match=r"random_frame_rate=1.5 must be a probability in \[0, 1\]"):
        sample_condition_masks(jax.random.key(0), 2, 5, {"random": 1.0}, random_frame_rate=1.5)


def test_masks_are_pinned_and_a_mode_without_one_is_named(monkeypatch):
    """Masks are built by mode name: the draws are those of the list matched by position, and a mode added to
    MODES without its mask fails naming it (the list was read past its end: [1 1 1 1 0] for every clip)."""
    import hashlib

    masks = np.asarray(sample_condition_masks(jax.random.key(3), 12, 5, {m: 1.0 for m in MODES})).astype(int)
    assert ["".join(map(str, row)) for row in masks] == [
        "11000", "11110", "10001", "10001", "11110", "00000", "10000", "10111", "00000", "11101", "10000", "10000"]
    probs = dict(zip(MODES, (0.3, 0.1, 0.2, 0.1, 0.1, 0.2)))
    for frames, digest in ((2, "6158f27fc42b1865"), (6, "f9348ea00c9cd775"), (9, "fdc5987c21783a0b")):
        drawn = np.asarray(sample_condition_masks(jax.random.key(7), 64, frames, probs)).astype(np.uint8)
        assert hashlib.sha256(drawn.tobytes()).hexdigest()[:16] == digest
    from vidiff.diffusion import conditioning

    monkeypatch.setattr(conditioning, "MODES", (*MODES, "middle"))
    with pytest.raises(KeyError, match="^'middle'$"):
        sample_condition_masks(jax.random.key(0), 4, 5, {"middle": 1.0})
