"""Rectified flow and samplers checked against closed-form velocity fields."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidiff import diffusion

SHAPE = (2, 3, 4, 4, 2)


def test_the_package_docstring_names_every_submodule():
    import pkgutil

    names = [m.name for m in pkgutil.iter_modules(diffusion.__path__)]
    assert sorted(names) == ["conditioning", "flow", "samplers", "sampling"]
    assert [n for n in names if f"``{n}``" not in diffusion.__doc__] == []


def point_mass_velocity(c):
    """Exact velocity when all data equals ``c``: x_t = (1-t)c + t eps  =>  v = (x_t - c) / t."""
    return lambda x, t: (x - c) / t.reshape(-1, 1, 1, 1, 1)


def gaussian_velocity(s):
    """Exact velocity for data ~ N(0, s^2): E[eps - x0 | x_t] is linear in x_t."""

    def v(x, t):
        t = t.reshape(-1, 1, 1, 1, 1)
        return x * (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2)

    return v


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
def test_samplers_reach_point_mass(sampler):
    c = jnp.full(SHAPE, 0.7)
    noise = jax.random.normal(jax.random.key(0), SHAPE)
    out = diffusion.sample(point_mass_velocity(c), noise, steps=6, sampler=sampler, shift=3.0)
    np.testing.assert_allclose(out, c, atol=1e-4)


def test_second_order_samplers_beat_euler_on_gaussian_flow():
    s = 0.5
    noise = jax.random.normal(jax.random.key(1), SHAPE)
    exact = s * noise  # the flow of N(0,1) -> N(0,s^2) is the linear map x -> s x

    def error(name, steps):
        return float(jnp.abs(diffusion.sample(gaussian_velocity(s), noise, steps=steps, sampler=name) - exact).max())

    euler, heun, dpm = (error(name, 16) for name in ("euler", "heun", "dpmpp_2m"))
    assert heun < euler / 4 and dpm < euler / 4, (euler, heun, dpm)
    # Halving the step: Euler's error halves, Heun's falls about fourfold.
    assert 1.7 < euler / error("euler", 32) < 2.3
    assert 3.5 < heun / error("heun", 32) < 4.5
    assert error("dpmpp_2m", 128) < 2e-3


def dpmpp_2m_reference(velocity_fn, x, ts):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in float64 numpy for alpha = 1 - t, sigma = t over times ``ts``:
    second order wherever the previous log-SNR step is finite, first order on the step to t = 0."""
    def log_snr(t):
        return np.inf if t == 0 else -np.inf if t == 1 else np.log(1 - t) - np.log(t)

    x, x0_prev, h_prev = np.asarray(x, np.float64), None, np.inf
    for t, t_next in zip(ts[:-1], ts[1:]):
        x0 = x - t * np.asarray(velocity_fn(x, np.full(x.shape[0], t)), np.float64)
        if t_next == 0:
            return x0
        h = log_snr(t_next) - log_snr(t)
        d = x0 if x0_prev is None or not np.isfinite(h_prev) else x0 + h / (2 * h_prev) * (x0 - x0_prev)
        x = (t_next / t) * x - (1 - t_next) * np.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@pytest.mark.parametrize("t_start, shift, steps", [(1.0, 3.0, 4), (0.75, 1.0, 3)])
def test_dpmpp_2m_matches_a_reference_implementation(t_start, shift, steps):
    """From pure noise the second step is still first order (the first log-SNR step is infinite); from
    t_start < 1 (SDEdit) the second step is already second order."""
    noise = jax.random.normal(jax.random.key(1), SHAPE)
    u = np.linspace(t_start / (shift - (shift - 1) * t_start), 0.0, steps + 1)  # unshifted times
    ts = shift * u / (1 + (shift - 1) * u)
    want = dpmpp_2m_reference(gaussian_velocity(0.5), noise, ts)
    got = diffusion.sample(gaussian_velocity(0.5), noise, steps=steps, sampler="dpmpp_2m", shift=shift,
                           t_start=t_start)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
def test_bfloat16_latents_sample_close_to_the_exact_flow(sampler):
    """In bfloat16 the 100-step shift-3 schedule has two equal neighbouring times near t = 1; DPM++ used to
    divide by that zero step and return NaN everywhere. The times stay float32, whatever the latents."""
    assert int(jnp.sum(jnp.diff(diffusion.timestep_schedule(100, 3.0).astype(jnp.bfloat16)) == 0)) == 1
    s = 0.5
    noise = jax.random.normal(jax.random.key(1), SHAPE)
    out = diffusion.sample(gaussian_velocity(s), noise.astype(jnp.bfloat16), steps=100, sampler=sampler, shift=3.0)
    assert out.dtype == jnp.bfloat16
    seen = []  # the model gets float32 times, as in training (bfloat16 would move t by up to ~0.002 near 1),
    # and latents of the caller's dtype
    diffusion.sample(lambda x, t: seen.append((x.dtype, t.dtype)) or x, noise.astype(jnp.bfloat16), steps=2,
                     sampler=sampler)
    assert seen and set(seen) == {(jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))}
    # The state is float32: a bfloat16 state rounded 100 small steps away (0.017-0.026 on average from the
    # float32 run); now only the model's bfloat16 inputs and the result's rounding remain (< 0.001).
    float32_run = diffusion.sample(gaussian_velocity(s), noise, steps=100, sampler=sampler, shift=3.0)
    drift = np.abs(np.asarray(out, np.float32) - np.asarray(float32_run))
    assert drift.mean() < 0.002 and drift.max() < 0.01, (drift.mean(), drift.max())


def test_sampling_is_jittable_and_deterministic():
    noise = jax.random.normal(jax.random.key(2), SHAPE)
    run = jax.jit(lambda x: diffusion.sample(gaussian_velocity(0.5), x, steps=4, sampler="dpmpp_2m"))
    np.testing.assert_array_equal(run(noise), run(noise))


def calls_seen(velocity_fn, record):
    """``velocity_fn`` that also appends what it is called with (host values, through the traced loop) to ``record``."""

    def spy(x, t):
        jax.debug.callback(lambda *a: record.append(tuple(np.asarray(v) for v in a)), x, t, ordered=True)
        return velocity_fn(x, t)

    return spy


def sampled(*args, **kwargs):
    """``diffusion.sample`` with every host callback of the run delivered."""
    out = jax.block_until_ready(diffusion.sample(*args, **kwargs))
    jax.effects_barrier()
    return out


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
def test_known_frames_stay_fixed(sampler):
    noise = jax.random.normal(jax.random.key(3), SHAPE)
    known = jnp.full(SHAPE, -0.25)
    mask = jnp.array([[1, 0, 0], [0, 0, 1]])
    calls = []
    out = sampled(calls_seen(gaussian_velocity(0.5), calls), noise, steps=3, sampler=sampler, known_latents=known,
                  known_mask=mask)
    np.testing.assert_array_equal(out[0, 0], known[0, 0])
    np.testing.assert_array_equal(out[1, 2], known[1, 2])
    assert not np.allclose(out[0, 1], known[0, 1])
    # The model was trained to see known frames clean: every call gets them exactly, the first (from noise) and
    # Heun's second evaluation of a step included.
    assert len(calls) == {"euler": 3, "heun": 5, "dpmpp_2m": 3}[sampler]
    for x, _ in calls:
        np.testing.assert_array_equal(x[0, 0], known[0, 0])
        np.testing.assert_array_equal(x[1, 2], known[1, 2])


def test_classifier_free_guidance_combines_branches():
    def velocity_fn(x, t, context):
        return x * 0 + context["bias"].reshape(-1, 1, 1, 1, 1)

    cond, uncond = {"bias": jnp.array([1.0, 2.0])}, {"bias": jnp.array([0.5, 0.5])}
    x = jnp.zeros(SHAPE)
    guided = diffusion.classifier_free_guidance(velocity_fn, cond, uncond, scale=3.0)
    np.testing.assert_allclose(guided(x, jnp.array([0.5, 0.5]))[:, 0, 0, 0, 0], [0.5 + 3 * 0.5, 0.5 + 3 * 1.5])
    # The default interval includes both ends: the first step (t = 1) and the last (t = 0) are guided.
    np.testing.assert_allclose(guided(x, jnp.array([1.0, 0.0]))[:, 0, 0, 0, 0], [0.5 + 3 * 0.5, 0.5 + 3 * 1.5])
    late_only = diffusion.classifier_free_guidance(velocity_fn, cond, uncond, scale=3.0, interval=(0.0, 0.4))
    np.testing.assert_allclose(late_only(x, jnp.array([0.5, 0.2]))[:, 0, 0, 0, 0], [1.0, 5.0])
    plain = diffusion.classifier_free_guidance(velocity_fn, cond, uncond, scale=1.0)
    np.testing.assert_allclose(plain(x, jnp.array([0.5, 0.5]))[:, 0, 0, 0, 0], [1.0, 2.0])
    one_empty_prompt = diffusion.classifier_free_guidance(velocity_fn, cond, {"bias": jnp.array([0.5])}, scale=3.0)
    np.testing.assert_allclose(one_empty_prompt(x, jnp.array([0.5, 0.5]))[:, 0, 0, 0, 0], [2.0, 5.0])
    with pytest.raises(ValueError, match=r"^uncond\['bias'\]: shape \(3,\) does not fit cond's \(2,\); build both "
                                         r"the same way \(or uncond with batch 1\)$"):
        diffusion.classifier_free_guidance(velocity_fn, cond, {"bias": jnp.zeros(3)}, scale=3.0)
    with pytest.raises(ValueError, match=r"^uncond: its structure .* differs from cond's"):
        diffusion.classifier_free_guidance(velocity_fn, cond, {"bias": jnp.zeros(2), "mask": jnp.ones(2)}, scale=3.0)


def test_flow_loss_is_zero_for_the_exact_velocity_and_ignores_known_frames():
    c = jnp.full(SHAPE, 0.3)
    loss, aux = diffusion.flow_loss(point_mass_velocity(c), c, jax.random.key(4))
    assert float(loss) < 1e-8 and aux["t"].shape == (2,)

    def wrong_on_frame0(x, t):
        return point_mass_velocity(c)(x, t).at[:, 0].add(5.0)

    known = jnp.array([[1, 0, 0], [1, 0, 0]])
    masked, _ = diffusion.flow_loss(wrong_on_frame0, c, jax.random.key(4), known_frames=known)
    unmasked, _ = diffusion.flow_loss(wrong_on_frame0, c, jax.random.key(4))
    assert float(masked) < 1e-8
    np.testing.assert_allclose(float(unmasked), 25.0 / 3, rtol=1e-5)
    # Its noise is the VAE posterior's flat draw, written once (vidiff.models.gaussian).
    from vidiff.diffusion import flow
    from vidiff.models import gaussian
    assert flow.standard_normal is gaussian.standard_normal


def test_flow_loss_mixes_bfloat16_latents_in_float32():
    """The model is told a float32 t; the mix used to take a bfloat16 t (up to 2e-3 away) and bfloat16 noise."""
    c = jnp.full(SHAPE, 0.375)  # exact in bfloat16
    seen = {}

    def record(dtype):
        def velocity_fn(x, t):
            seen[dtype] = (x, t)
            return x
        return velocity_fn

    for dtype in (jnp.float32, jnp.bfloat16):
        diffusion.flow_loss(record(dtype), c.astype(dtype), jax.random.key(4))
    (x32, t32), (x16, t16) = seen[jnp.float32], seen[jnp.bfloat16]
    assert x16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(t16, t32)
    np.testing.assert_array_equal(x16, x32.astype(jnp.bfloat16))  # the float32 mix, rounded once


def test_timestep_sampling_and_shift():
    t = diffusion.sample_timesteps(jax.random.key(5), 4096, "logit_normal")
    assert 0 < float(t.min()) and float(t.max()) < 1 and abs(float(jnp.median(t)) - 0.5) < 0.03
    shifted = diffusion.sample_timesteps(jax.random.key(5), 4096, "logit_normal", shift=3.0)
    assert float(jnp.median(shifted)) == pytest.approx(0.75, abs=0.03)  # 3*0.5 / (1 + 2*0.5)
    _, aux = diffusion.flow_loss(lambda x, t: x, jnp.zeros((4096, 1, 1, 1, 1)), jax.random.key(5), shift=3.0)
    assert float(jnp.median(aux["t"])) == pytest.approx(0.75, abs=0.03)  # the loss trains at the shifted times
    assert diffusion.shift_for_tokens(256) == pytest.approx(np.exp(0.5))
    assert diffusion.shift_for_tokens(4096) == pytest.approx(np.exp(1.15))
    schedule = diffusion.timestep_schedule(4, shift=1.0, t_start=0.5)
    np.testing.assert_allclose(schedule, [0.5, 0.375, 0.25, 0.125, 0.0])
    # SDEdit from t_start = shift(0.5) = 0.75 walks the second half of the full shifted schedule, not a squeezed copy.
    np.testing.assert_allclose(diffusion.timestep_schedule(4, shift=3.0, t_start=0.75),
                               diffusion.timestep_schedule(8, shift=3.0)[4:], rtol=1e-6)
    assert float(diffusion.timestep_schedule(3, shift=float(np.exp(1.15)))[0]) == 1.0
    # These shifts put a float32 schedule's first time at 1 + 1.2e-7 ("auto" picks the second for 80 tokens), where
    # DPM++'s log(1 - t) is NaN: the whole clip came out NaN, black once decoded.
    for shift in (2.034135, diffusion.shift_for_tokens(80)):
        schedule = np.asarray(diffusion.timestep_schedule(8, shift=shift))
        assert schedule[0] == 1.0 and schedule[-1] == 0.0 and (np.diff(schedule) < 0).all()
        out = diffusion.sample(gaussian_velocity(0.5), jnp.ones(SHAPE), steps=8, sampler="dpmpp_2m", shift=shift)
        assert np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match="timestep sampler 'beta' is unknown"):
        diffusion.sample_timesteps(jax.random.key(0), 2, "beta")
    with pytest.raises(ValueError, match="sampler 'ddim' is unknown"):
        diffusion.sample(point_mass_velocity(0.0), jnp.zeros(SHAPE), steps=2, sampler="ddim")


def test_loss_weights_uniform_timesteps_and_auto_shift():
    from vidiff.diffusion.flow import loss_weight

    t = jnp.array([0.0, 0.25, 0.5, 1.0])
    np.testing.assert_array_equal(loss_weight(t), np.ones(4))
    # cosmap: 2 / (pi (1 - 2t + 2t^2)); the denominator's bracket is 1, 0.625, 0.5, 1 at these t.
    np.testing.assert_allclose(loss_weight(t, "cosmap"), [2 / np.pi, 3.2 / np.pi, 4 / np.pi, 2 / np.pi], rtol=1e-6)
    with pytest.raises(ValueError, match=r"^loss weighting 'snr' is unknown; use one of \('none', 'cosmap'\)$"):
        loss_weight(t, "snr")
    # flow_loss weights each sample's loss by its time.
    x0, zero = jnp.full(SHAPE, 0.3), (lambda x, t: jnp.zeros_like(x))
    cosmap, aux = diffusion.flow_loss(zero, x0, jax.random.key(1), weighting="cosmap")
    np.testing.assert_allclose(float(cosmap), float(jnp.mean(aux["per_sample"] * loss_weight(aux["t"], "cosmap"))),
                               rtol=1e-6)
    assert abs(float(cosmap) - float(jnp.mean(aux["per_sample"]))) > 1e-3

    uniform = np.asarray(diffusion.sample_timesteps(jax.random.key(11), 10_000, "uniform"))
    assert uniform.shape == (10_000,) and 1e-5 <= uniform.min() and uniform.max() <= 1 - 1e-5
    assert abs(uniform.mean() - 0.5) < 0.03  # standard error of the mean ~0.003
    assert abs(np.mean(uniform < 0.25) - 0.25) < 0.03  # flat, not merely centred
    shifted = np.asarray(diffusion.sample_timesteps(jax.random.key(11), 10_000, "uniform", shift=3.0))
    np.testing.assert_allclose(shifted, 3 * uniform / (1 + 2 * uniform), rtol=1e-5)

    # "auto": the shift of the token count; (5, 8, 8, 4) latents in (1, 2, 2) patches are 5 * 4 * 4 = 80 tokens.
    auto = diffusion.resolve_shift("auto", (5, 8, 8, 4), (1, 2, 2))
    assert auto == diffusion.shift_for_tokens(80)
    assert auto == pytest.approx(np.exp(0.5 + (1.15 - 0.5) / (4096 - 256) * (80 - 256)))
    assert diffusion.resolve_shift("auto", (1, 8, 8, 4), (1, 2, 2)) == diffusion.shift_for_tokens(16) < auto
    assert diffusion.resolve_shift(3, (5, 8, 8, 4), (1, 2, 2)) == 3.0


def test_schedule_guidance_and_known_frames_are_checked_before_sampling():
    for shift in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"shift={shift} must be a positive number \(1 = no shift\)"):
            diffusion.timestep_schedule(4, shift=shift)
    with pytest.raises(ValueError, match="steps=2.5 must be an int, at least 1"):
        diffusion.timestep_schedule(2.5)
    from vidiff.diffusion.samplers import check_guidance

    with pytest.raises(ValueError, match="guidance=nan must be a finite number"):
        check_guidance(float("nan"), (0.0, 1.0))
    for interval in ((1.0, 0.0), (0.5,), (-0.1, 0.5), 0.5):
        with pytest.raises(ValueError, match="must be \\(lo, hi\\) with 0 <= lo <= hi <= 1"):
            diffusion.classifier_free_guidance(lambda x, t, c: x, {}, {}, 4.0, interval)
    x = jnp.zeros(SHAPE)  # 3 latent frames
    velocity = point_mass_velocity(0.0)
    with pytest.raises(ValueError, match=r"known_mask: must be per latent frame \(2, 3\), got \(2, 4\)"):
        diffusion.sample(velocity, x, steps=2, known_mask=jnp.ones((2, 4)), known_latents=x)
    with pytest.raises(ValueError, match=r"known_latents: needs known_mask \(B, t\), the latent frames they fix"):
        diffusion.sample(velocity, x, steps=2, known_latents=x)  # would be ignored
    with pytest.raises(ValueError, match=r"known_latents: must have x_start's shape \(2, 3, 4, 4, 2\)"):
        diffusion.sample(velocity, x, steps=2, known_mask=jnp.ones((2, 3)), known_latents=x[:, :2])
    with pytest.raises(ValueError, match=r"tie=\(\(5,\), \(0,\)\): needs \(targets, sources\) of equal length, "
                                         r"latent frames in \[0, 3\)"):
        diffusion.sample(velocity, x, steps=2, tie=((5,), (0,)))
    with pytest.raises(ValueError, match=r"known_frames: must be per latent frame \(2, 3\), got \(1, 3\)"):
        diffusion.flow_loss(lambda x, t: x, x, jax.random.key(0), known_frames=jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"x_start: known frames need latents \(B, t, h, w, c\)"):
        diffusion.sample(velocity, jnp.zeros((2, 2, 4)), steps=2, known_mask=jnp.ones((2, 2)))


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
def test_tied_frames_end_equal_to_their_source(sampler):
    noise = jax.random.normal(jax.random.key(6), SHAPE)
    free = diffusion.sample(gaussian_velocity(0.5), noise, steps=4, sampler=sampler)
    tied = diffusion.sample(gaussian_velocity(0.5), noise, steps=4, sampler=sampler, tie=((2,), (0,)),
                            known_mask=jnp.array([[0, 0, 1], [0, 0, 1]]))
    np.testing.assert_array_equal(tied[:, 2], tied[:, 0])
    # This velocity acts per element, so the untied frames are exactly what they would be without the tie.
    np.testing.assert_allclose(tied[:, :2], free[:, :2], atol=1e-6)
    assert not np.allclose(free[:, 2], free[:, 0])
    # During sampling the target holds the source's clean estimate x0 = x - t v, not the source's noisy x: at the
    # second model call it is the estimate from the first. (From t < 1: at t = 1 this estimate is 0, the start.)
    calls = []
    sampled(calls_seen(gaussian_velocity(0.5), calls), noise, steps=4, sampler=sampler, t_start=0.5,
            tie=((2,), (0,)), known_mask=jnp.array([[0, 0, 1], [0, 0, 1]]))
    (x_a, t_a), (x_b, _) = calls[:2]
    estimate = x_a[:, 0] - t_a[0] * np.asarray(gaussian_velocity(0.5)(x_a, t_a))[:, 0]
    assert np.abs(estimate).mean() > 0.1
    np.testing.assert_allclose(x_b[:, 2], estimate, atol=1e-6)


def test_progress_reports_every_step():
    from vidiff.diffusion.sampling import _report_step, on_sampler_step

    seen = []
    noise = jax.random.normal(jax.random.key(7), SHAPE)
    with on_sampler_step(seen.append):
        out = diffusion.sample(gaussian_velocity(0.5), noise, steps=5, sampler="heun", progress=_report_step)
        jax.block_until_ready(out)
        jax.effects_barrier()
    assert sorted(seen) == [0, 1, 2, 3, 4]
