"""Training: optimizer, config checks, exact resume after SIGKILL, SIGTERM, non-finite steps, export."""
import dataclasses
import functools
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from vidiff.models.dit import DiTConfig
from vidiff.models.export import read_manifest
from vidiff.models.vae import VAEConfig
from vidiff.train import config as config_lib
from vidiff.train.metrics import psnr, read_metrics, ssim
from vidiff.train.optimizer import ema_update, learning_rate_schedule, make_optimizer
from vidiff.train.overrides import apply_overrides

REPO = Path(__file__).resolve().parents[1]
WORLD_TINY = REPO / "vidiff" / "configs" / "world_tiny.py"
# Small and quick: 5-frame 16x16 clips, 8 per batch (one per virtual device), logged every step.
FAST = [
    "--config.data.num_frames=5", "--config.data.size=16", "--config.data.batch_size=8",
    "--config.vae_train.log_every=1", "--config.vae_train.stats_batches=1", "--config.eval.num_clips=2",
    "--config.dit_train.log_every=1", "--config.sample.steps=2", "--config.text.max_length=8",
    "--config.vae_train.data.batch_size=8", "--config.dit_train.data.buckets=['5x16x16','1x16x16']",
]
# world_tiny's VAE is per-frame (time factor 1); these make it 4x in time to exercise the frame-count checks.
TIME_4X = ("--config.vae.overrides.temporal_down=(True,True)", "--config.vae.overrides.time_kernels=(3,3,3)")


def optim(**kw):
    base = dict(lr=1e-3, schedule="cosine", warmup_steps=10, end_lr_fraction=0.1, b1=0.9, b2=0.99, eps=1e-8,
                weight_decay=0.01, grad_clip=1.0, accumulate=1)
    return ml_collections.ConfigDict({**base, **kw})


def test_schedule_warms_up_then_decays():
    schedule = learning_rate_schedule(optim(), total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(1e-4)
    # Warm-up is linear: halfway there at step 5. Decay is cosine over steps 10..100 from 1e-3 to 1e-4:
    # lr(s) = 1e-4 + 0.9e-3 * (1 + cos(pi * (s - 10) / 90)) / 2. At its midpoint (step 55) that is 5.5e-4, as
    # a linear decay would give too; a third of the way (step 40) it is 1e-4 + 0.9e-3 * 0.75 = 7.75e-4 where
    # a linear decay gives 7e-4.
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(55)) == pytest.approx(5.5e-4)
    assert float(schedule(40)) == pytest.approx(7.75e-4)
    constant = learning_rate_schedule(optim(schedule="constant"), 100)
    assert float(constant(50)) == pytest.approx(1e-3) and float(constant(5)) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="optim.schedule='linear' is unknown"):
        learning_rate_schedule(optim(schedule="linear"), 100)


def test_weight_decay_reaches_kernels_only_whatever_their_rank():
    from flax import linen as nn

    from vidiff.models.dit import VideoDiT, dit_preset, dummy_inputs
    from vidiff.train.optimizer import decay_mask

    for scan in (False, True):  # scanned blocks give every bias and norm scale a leading layer axis
        dit = VideoDiT(dit_preset("tiny", scan_blocks=scan))
        params = nn.unbox(jax.eval_shape(dit.init, jax.random.key(0), *dummy_inputs(dit.config)))["params"]
        flat = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
        decayed = {jax.tree_util.keystr(path) for path, on in flat if on}
        assert decayed and all(path.endswith("['kernel']") for path in decayed)
        assert len(decayed) == sum(jax.tree_util.keystr(path).endswith("['kernel']") for path, _ in flat)
        assert "['blocks']['self_attn']['query']['bias']" not in decayed  # (layers, heads, head_dim)
    # ...and the optimizer applies it: one zero-gradient step decays kernels by lr * wd, nothing else.
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}, "norm": {"scale": jnp.ones((2,))}}
    tx, _ = make_optimizer(optim(lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip=None), 10)
    stepped = optax.apply_updates(params, tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)[0])
    np.testing.assert_allclose(stepped["dense"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(stepped["dense"]["bias"], 1.0)
    np.testing.assert_array_equal(stepped["norm"]["scale"], 1.0)


def test_side_by_side_networks_are_clipped_apart():
    """A discriminator's huge gradient must not shrink the VAE's clipped update (one global norm would)."""
    params = {"vae": {"kernel": jnp.ones((2, 2))}, "disc": {"kernel": jnp.ones((2, 2))}}
    grads = {"vae": {"kernel": jnp.full((2, 2), 0.1)}, "disc": {"kernel": jnp.full((2, 2), 1e4)}}
    clip = optim(grad_clip=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, b1=0.0, b2=0.0)
    for networks, vae_grad_scale in ((None, 1 / 2e4), ({"vae": 0, "disc": 0}, 1.0)):  # global norm ~2e4; the VAE's 0.2
        tx, _ = make_optimizer(clip, 10, networks=networks)
        # b1 = 0: Adam's first moment is the clipped gradient itself.
        state = tx.update(grads, tx.init(params), params)[1]
        # (apart, each network's state holds the other's entries as empty MaskedNodes)
        [vae_mu] = [leaf for _, mu in optax.tree.get_all_with_path(state, "mu") for leaf in jax.tree.leaves(mu["vae"])]
        assert float(vae_mu[0, 0]) == pytest.approx(0.1 * vae_grad_scale, rel=1e-3)


def test_a_network_switched_on_later_is_untouched_until_then_and_starts_adam_afresh():
    """Before its first update a discriminator is not decayed; its first step is Adam's first step (size lr),
    not one whose bias correction counted the zero-gradient steps before it (~3x larger with b2 = 0.999)."""
    params = {"vae": {"kernel": jnp.ones((2, 2))}, "disc": {"kernel": jnp.ones((2, 2))}}
    grads = {"vae": {"kernel": jnp.full((2, 2), 0.5)}, "disc": {"kernel": jnp.full((2, 2), 0.5)}}
    zero_disc = {"vae": grads["vae"], "disc": {"kernel": jnp.zeros((2, 2))}}
    lr = 1e-2
    config = optim(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.1, b1=0.9, b2=0.999, grad_clip=None)
    tx, _ = make_optimizer(config, 10, networks={"vae": 0, "disc": 3})
    state, p = tx.init(params), params
    for step in range(4):
        updates, state = tx.update(zero_disc if step < 3 else grads, state, p)
        before, p = p, optax.apply_updates(p, updates)
        disc_move = np.asarray(p["disc"]["kernel"] - before["disc"]["kernel"])
        if step < 3:
            np.testing.assert_array_equal(disc_move, 0.0)  # no weight decay, no moments
        else:  # Adam's bias-corrected first step is lr * sign(g), plus decoupled decay lr * wd * p
            np.testing.assert_allclose(disc_move, -lr * (1.0 + 0.1 * 1.0), rtol=1e-4)
        assert float(np.abs(p["vae"]["kernel"] - before["vae"]["kernel"]).min()) > 0  # the VAE trains throughout
    # Its learning rate is the run's at that update, not its own schedule from 0: switched on at update 5 of a
    # 10-update warm-up to 0.1, its first step is 0.05 (warming up again from 0 it would not move at all).
    config = optim(lr=0.1, warmup_steps=10, schedule="constant", weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=None)
    tx, _ = make_optimizer(config, 100, networks={"vae": 0, "disc": 5})
    state, p = tx.init(params), params
    for step in range(6):
        updates, state = tx.update(grads, state, p)
        before, p = p, optax.apply_updates(p, updates)
    np.testing.assert_allclose(p["disc"]["kernel"] - before["disc"]["kernel"], -0.05, rtol=1e-3)


def test_optimizer_state_has_one_shape_whatever_a_resume_may_change():
    """Turning clipping off or moving the discriminator's start step on resume must still restore the state."""
    params = {"vae": {"kernel": jnp.ones((2, 2))}, "disc": {"kernel": jnp.ones((2, 2))}}
    shape = lambda tx: jax.tree.structure(tx.init(params))  # noqa: E731
    assert shape(make_optimizer(optim(grad_clip=1.0), 10)[0]) == shape(make_optimizer(optim(grad_clip=0.0), 10)[0])
    on = make_optimizer(optim(grad_clip=1.0), 10, networks={"vae": 0, "disc": 0})[0]
    assert shape(on) == shape(make_optimizer(optim(grad_clip=None), 10, networks={"vae": 0, "disc": 500})[0])


def test_tokens_per_second_count_each_batch_at_its_own_clip_size():
    from types import SimpleNamespace

    from vidiff.models.dit import dit_preset
    from vidiff.models.vae import vae_preset
    from vidiff.train.tasks import DiTTask, VAETask

    # The tiny VAE is 4x4x4; (1, 2, 2) patches: a 17x32x32 clip is 5x8x8 latents, 80 tokens; an image 16.
    task = SimpleNamespace(vae=SimpleNamespace(config=vae_preset("tiny")),
                           dit=SimpleNamespace(config=dit_preset("tiny", patch=(1, 2, 2))))
    video = lambda t: jax.ShapeDtypeStruct((2, t, 32, 32, 3), jnp.uint8)
    assert DiTTask.tokens_in(task, {"video": video(17)}) == 160
    assert DiTTask.tokens_in(task, {"video": video(1)}) == 32  # an image bucket's batch, not a clip's
    assert DiTTask.tokens_in(task, {"latents": jax.ShapeDtypeStruct((3, 5, 8, 8, 4), jnp.float32)}) == 240
    assert VAETask.tokens_in(task, {"video": video(17)}) == 34  # frames...
    assert (VAETask.rate_name, DiTTask.rate_name) == ("frames_per_s", "tokens_per_s")  # ...which its rows say


def test_log_rows_average_every_step_since_the_last_row(monkeypatch):
    from types import SimpleNamespace

    from vidiff.train import metrics as metrics_lib
    from vidiff.train.metrics import LogWindow

    clock = [1000.0]
    monkeypatch.setattr(metrics_lib, "time", SimpleNamespace(perf_counter=lambda: clock[0]))  # this module's clock
    window = LogWindow(10)
    for loss in (1.0, 2.0, 6.0):
        window.add({"loss": jnp.float32(loss), "psnr": jnp.array([20.0, 30.0])}, tokens=100)
    clock[0] += 3600.0 + 1.5  # 1.5 s of steps and an hour of evaluation...
    window.pause(3600.0)  # ...which does not count against the steps' rates
    means = window.means(13)
    assert means["loss"] == pytest.approx(3.0) and means["psnr"] == pytest.approx(25.0)
    assert means["steps_per_s"] == pytest.approx(3 / 1.5) and means["tokens_per_s"] == pytest.approx(300 / 1.5)
    assert means["steps"] == 3  # what the means cover: a resumed run's first row may cover fewer than log_every
    window.reset(13)
    window.add({"loss": jnp.float32(np.nan), "psnr": jnp.array([1.0, 1.0])}, tokens=0)
    assert np.isnan(window.means(14)["loss"])  # a skipped step's NaN shows in its window (logged as null)
    frames = LogWindow(0, rate="frames_per_s")  # a VAE's window: its "tokens" are frames
    frames.add({"loss": jnp.float32(1.0)}, tokens=10)
    clock[0] += 2.0
    assert frames.means(1)["frames_per_s"] == pytest.approx(5.0) and "tokens_per_s" not in frames.means(1)


def test_a_step_call_that_compiles_is_left_out_of_the_rates(monkeypatch):
    """The call that first meets a batch's shapes (the first step, a new bucket, a last partial batch)
    compiles before it returns, and its first run is slow too: it is waited for and left out, its step and tokens
    with it (the first row of a 12-step VAE run read 8.2 steps/s against 41-51 after)."""
    from types import SimpleNamespace

    from vidiff.train import metrics as metrics_lib
    from vidiff.train.metrics import CompileTimer, LogWindow

    clock = [1000.0]
    monkeypatch.setattr(metrics_lib, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    window = LogWindow(0)
    timer = CompileTimer(window)
    compiled = set()

    def step(state, batch):  # a stub that "compiles" for 30 s on a shape it has not met, then runs
        new = batch["video"].shape not in compiled
        compiled.add(batch["video"].shape)
        clock[0] += 30.0 + 3.0 if new else 0.5  # a first run is slow too: waited for, and left out with it
        return state + 1, {"loss": jnp.float32(1.0)}

    state = 0
    for frames in (5, 5, 1, 5):  # an image bucket appears at step 3
        batch = {"video": jnp.zeros((2, frames, 4, 4, 3), jnp.uint8)}
        # The main thread waited for the batch's preparation: 1.7 s for a new shape (the latent cache's VAE
        # compiles for it), 0.1 s otherwise (reads behind the steps dispatched: the steps' time).
        preparing = 1.7 if frames != 5 or state == 0 else 0.1
        clock[0] += preparing
        timer.prepared(batch, preparing)
        state, metrics = timer.call(step, state, batch, tokens=10)
        window.add(metrics, tokens=10)
    # The two steps of shapes met before: 0.1 s waits and 0.5 s runs. Each first step of a shape is left out whole.
    assert window.means(4)["steps_per_s"] == pytest.approx(2 / 1.2)  # not 4 / 70.4
    assert window.means(4)["tokens_per_s"] == pytest.approx(20 / 1.2)
    window = LogWindow(4)
    timer = CompileTimer(window)
    timer.call(step, state, {"video": jnp.zeros((2, 9, 4, 4, 3), jnp.uint8)}, tokens=10)
    window.add({"loss": jnp.float32(1.0)}, tokens=10)
    row = window.means(5)  # a row of one compiling step: no rate is known
    assert math.isnan(row["steps_per_s"]) and math.isnan(row["tokens_per_s"]) and row["steps"] == 1


def test_a_rows_own_work_and_the_sums_first_compiles_are_left_out_of_the_rates(monkeypatch):
    """The schedule's first eager call (the row's lr) compiles: the next row's window starts after it. The
    window's jitted sum compiles on its first call for a signature, once per process, whichever window calls."""
    from types import SimpleNamespace

    from vidiff.train import loop
    from vidiff.train import metrics as metrics_lib
    from vidiff.train.metrics import LogWindow

    clock = [1000.0]
    monkeypatch.setattr(metrics_lib, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(metrics_lib, "_ADDED", set())
    add = metrics_lib._add

    def compiling_add(total, new):  # the first call of a signature compiles for 0.2 s
        clock[0] += 0.2 * (metrics_lib._signature(total, new) not in compiled)
        compiled.add(metrics_lib._signature(total, new))
        return add(total, new)

    compiled = set()
    monkeypatch.setattr(metrics_lib, "_add", compiling_add)

    def schedule(count):  # the first call compiles for 0.8 s
        clock[0] += 0.8 * (not lrs)
        lrs.append(count)
        return 0.5

    lrs, written = [], []
    run = SimpleNamespace(schedule=schedule, ledger=None, task=SimpleNamespace(captions_truncated=0))
    writer = SimpleNamespace(write=lambda step, row: written.append((step, row)))
    window, since_save = LogWindow(0), LogWindow(0)
    for step in range(1, 7):
        for w in (window, since_save):  # the loop adds each step's metrics to both
            w.add({"loss": jnp.float32(1.0)}, tokens=10)
        clock[0] += 0.5  # the step runs
        if step % 3 == 0:
            row = loop._log_row(writer, window, SimpleNamespace(skipped=0), step, run)
            assert row["steps_per_s"] == pytest.approx(3 / 1.5) and row["lr"] == 0.5, (step, row)
    assert [step for step, _ in written] == [3, 6] and lrs == [2, 5]  # the lr of each row's last update


class _SleepingSource:
    """A data iterator whose batches take ``seconds`` each to read (the first one ``first`` seconds)."""

    def __init__(self, seconds, first=None):
        self.seconds, self.first, self.drawn = seconds, first, 0

    def __next__(self):
        self.drawn += 1
        time.sleep(self.first if self.first is not None and self.drawn == 1 else self.seconds)
        return {"video": np.zeros((2, 1, 4, 4, 3), np.uint8)}

    def get_state(self):
        return {"drawn": self.drawn}


def _rows_and_lines(source, depth, *, step_s=0.04, log_every=3, steps=12):
    """The log rows and lines of a stub run: each step waits ``step_s`` for the one before, as at a read-back."""
    from types import SimpleNamespace

    from vidiff.train.metrics import DataWaitWarning, LogWindow
    from vidiff.train.prefetch import Prefetcher

    window, lines, rows = LogWindow(0), [], []
    warning = DataWaitWarning(SimpleNamespace(num_workers=0, read_threads=2), lines.append)
    # Batches of later steps are there to draw: the last rows are like the others, read ahead too.
    with Prefetcher(source, lambda step: next(source), lambda raw: raw, pytest.fail, depth=depth, start=0,
                    steps=steps + 10, waited=window.wait) as batches:
        for step in range(1, steps + 1):
            batches.next()
            time.sleep(step_s)
            window.add({"loss": jnp.float32(1.0)}, tokens=2)
            if step % log_every == 0:
                rows.append(window.means(step))
                window.reset(step)
                warning.check(step, rows[-1])
    return rows, lines


@pytest.mark.parametrize("depth", [0, 2])
def test_log_rows_say_how_long_the_steps_waited_for_data_and_warn_once(depth):
    """A pipeline slower than the step: the rows' data_wait_fraction is the share of the time spent reading
    (0.06 s of each 0.10 s step), and one line, at the second row, names the fix. A fast one (after a slow start,
    which the first row holds and is not judged) waits ~0 and says nothing."""
    rows, lines = _rows_and_lines(_SleepingSource(0.06), depth)
    assert [r["steps"] for r in rows] == [3, 3, 3, 3]
    for row in rows[1:]:  # the first row also holds the draws read ahead (depth 2)
        assert row["data_wait_fraction"] == pytest.approx(0.6, abs=0.15)
        assert row["data_wait_s"] == pytest.approx(3 * 0.06, abs=0.05)
    assert len(lines) == 1 and re.fullmatch(
        r"step 6: the steps since the last log row waited \d+% of their time for batches from the data pipeline "
        r"\(data_wait_fraction in the log rows\): the input pipeline slows the run, or nearly does; raise "
        r"data.num_workers \(now 0\) and/or data.read_threads \(now 2\), or train on JPEG shards made by "
        r"`vidiff prepare` rather than a video folder or PNG shards; docs/data.md, 'Feeding a GPU', sizes them",
        lines[0]), lines

    rows, lines = _rows_and_lines(_SleepingSource(0.0, first=0.5), depth)
    assert rows[0]["data_wait_fraction"] > 0.5  # the slow start...
    assert all(row["data_wait_fraction"] < 0.1 for row in rows[1:]) and lines == []  # ...is not judged


def test_accumulated_step_is_one_update_on_the_whole_batch():
    """k micro-batches: the same loss, gradients, parameters, EMA and step count as one full-batch step
    (their per-row losses average alike), and the schedule advances once."""
    from vidiff import parallel
    from vidiff.train.state import create_state, make_train_step, micro_batches

    mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(optim(warmup_steps=2, grad_clip=None), 10)
    init = lambda key: {"w": jax.random.normal(key, (3, 2)), "b": jnp.zeros((2,))}
    loss_fn = lambda p, batch, rng, frozen, step: (
        jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2), {"mean_y": jnp.mean(batch["y"])})
    rows = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    batch = {"x": rows[:, :3], "y": rows[:, 3:]}
    results = []
    for k in (1, 2, 4):
        state, _ = create_state(init, tx, seed=0, mesh=mesh)
        step = jax.jit(make_train_step(loss_fn, tx, ema_decay=0.9, accumulate=k))
        for _ in range(3):
            state, metrics = step(state, batch, {})
        results.append((state, metrics))
    for state, metrics in results[1:]:
        counts = [int(c) for _, c in optax.tree.get_all_with_path(state.opt_state, "count")]
        assert int(state.step) == 3 and counts and set(counts) == {3}  # Adam and the schedule: 3 updates, not 3k
        for got, want in ((state.params, results[0][0].params), (state.ema_params, results[0][0].ema_params),
                          (metrics, results[0][1])):
            jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
    # Each micro-batch draws with its own key: the noise of one is not repeated in the others.
    draws = lambda p, batch, rng, frozen, step: (
        jnp.mean(p["b"]), {"u": jax.random.uniform(rng), "u2": jax.random.uniform(rng) ** 2})
    state, _ = create_state(init, tx, seed=0, mesh=mesh)
    _, drawn = jax.jit(make_train_step(draws, tx, ema_decay=0.9, accumulate=4))(state, batch, {})
    assert float(drawn["u2"]) - float(drawn["u"]) ** 2 > 1e-3  # their variance over the 4 micro-batches
    assert float(schedule(2)) == pytest.approx(1e-3)  # warmup over optimizer updates
    split = micro_batches({"i": jnp.arange(6)}, 3)["i"]
    np.testing.assert_array_equal(split, [[0, 3], [1, 4], [2, 5]])  # interleaved: each device keeps its rows
    with pytest.raises(ValueError, match="a batch of 6 rows does not split into accumulate=4 micro-batches"):
        micro_batches({"i": jnp.arange(6)}, 4)
    with pytest.raises(ValueError, match="accumulate=0 must be an int >= 1"):
        make_train_step(loss_fn, tx, ema_decay=0.9, accumulate=0)


def test_state_built_on_the_host_is_the_one_built_on_the_mesh(monkeypatch):
    """create_state(on_host=True): the same values, placed with the same shardings (an fsdp=2 mesh)."""
    from vidiff import parallel
    from vidiff.models.dit import dit_preset, init_params
    from vidiff.train.state import build_sharded, create_state

    init = functools.partial(init_params, dit_preset("tiny"))  # boxed, logical names
    mesh = parallel.make_mesh(data=1, fsdp=2, devices=jax.devices()[:2])
    tx = optax.adamw(1e-3)
    (on_mesh, shardings), (on_host, host_shardings) = (create_state(init, tx, seed=3, mesh=mesh, on_host=host)
                                                       for host in (False, True))
    assert host_shardings == shardings
    leaves = jax.tree.leaves(on_host)
    assert len(leaves) == len(jax.tree.leaves(on_mesh)) > 50
    sharded = [x for x in leaves if not x.sharding.is_fully_replicated]
    assert sharded and all(x.sharding.mesh.shape["fsdp"] == 2 for x in sharded)  # placed, not gathered
    for got, want, sharding in zip(leaves, jax.tree.leaves(on_mesh), jax.tree.leaves(shardings)):
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
        np.testing.assert_array_equal(jax.device_get(got), jax.device_get(want))

    def no_cpu(backend=None):
        raise RuntimeError(f"Unknown backend {backend}")

    monkeypatch.setattr(jax, "devices", no_cpu)
    with pytest.raises(ValueError, match=r"on_host=True needs JAX's CPU backend, which JAX_PLATFORMS=.* leaves out; "
                                         r"add cpu to it or use on_host=False"):
        build_sharded(lambda key: {"w": jnp.ones(2)}, jax.random.key(0), None, mesh, on_host=True)


def test_the_host_builds_the_state_only_where_that_pays(monkeypatch):
    """init_on="auto": many random draws to compile, accelerators, one process, a CPU backend (H200 figures)."""
    from vidiff.models.dit import VideoDiT, dit_preset, dummy_inputs, init_params
    from vidiff.train import state

    xl = dit_preset("XL")  # unscanned
    per_block = lambda k: VideoDiT(xl).init(k, *dummy_inputs(xl))["params"]  # noqa: E731 (each block its own draws)
    through_scan = functools.partial(init_params, xl)  # one block's draws, laid out unscanned
    assert [state.random_draws(f, jax.random.key(0)) for f in (per_block, through_scan)] == [259, 16]
    assert not state.host_init_pays(per_block)  # on a CPU the host is the device: nothing to gain
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert state.host_init_pays(per_block)
    assert not state.host_init_pays(through_scan)
    monkeypatch.setattr(state, "host_cpu", lambda: None)  # JAX_PLATFORMS without cpu
    assert not state.host_init_pays(per_block)
    monkeypatch.undo()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # no process holds the whole tree
    assert not state.host_init_pays(per_block)
    from vidiff.train.config import INIT_ON_NAMES  # what a config may say, kept free of jax
    assert tuple(state.INIT_ON) == INIT_ON_NAMES and state.INIT_ON["auto"] is None


def test_random_draws_counts_a_loop_body_once_and_every_branch():
    from vidiff.train.state import random_draws

    def fn(key):
        three = [jax.random.normal(jax.random.fold_in(key, i), (2,)) for i in range(3)]
        looped = jax.lax.scan(lambda c, k: (c + jax.random.uniform(k, ()), None), 0.0, jax.random.split(key, 5))[0]
        branch = jax.lax.cond(looped > 0, lambda k: jax.random.normal(k, ()), lambda k: jnp.zeros(()), key)
        return sum(x.sum() for x in three) + looped + branch + jax.jit(lambda k: jax.random.bits(k))(key)

    assert random_draws(fn, jax.random.key(0)) == 3 + 1 + 1 + 1


def test_ema_and_image_metrics():
    ema = ema_update({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, decay=0.9)
    np.testing.assert_allclose(ema["w"], 0.1)
    x = jax.random.uniform(jax.random.key(0), (2, 3, 16, 16, 3), minval=-1, maxval=1)
    assert float(ssim(x, x).min()) == pytest.approx(1.0, abs=1e-5)
    noisy = x + 0.02 * jax.random.normal(jax.random.key(1), x.shape)
    # PSNR of Gaussian noise with std 0.02 on range 2: 10 log10(4 / 4e-4) = 40 dB.
    np.testing.assert_allclose(psnr(noisy, x), 40.0, atol=0.3)
    assert float(ssim(noisy, x).mean()) < 1.0
    # SSIM measures [0, L] intensities: a 2.5/255 brightness error on mid-grey leaves it near 1, as on uint8
    # (in raw [-1, 1] it read 0.33), and the score does not depend on where the clips sit.
    grey = jnp.full((1, 1, 8, 8, 3), 127.0 / 127.5 - 1.0)
    assert float(ssim(grey + 2.5 / 127.5, grey)[0]) == pytest.approx(1.0, abs=1e-3)
    # Flat bright frames: float32's E[x^2] - E[x]^2 gave 1.00003 for 200 against 205 (float64's 0.999695).
    flat = lambda v: jnp.full((1, 2, 16, 16, 3), v / 127.5 - 1.0)
    exact = (2 * 200 * 205 + 2.55**2) / (200**2 + 205**2 + 2.55**2)
    assert float(ssim(flat(200), flat(205))[0]) <= 1.0
    assert float(ssim(flat(200), flat(205))[0]) == pytest.approx(exact, abs=2e-5)


@pytest.mark.parametrize(
    "override,message",
    [
        (("--config.data.num_frames=18", *TIME_4X), "data.num_frames=18 must be 1 \\+ k\\*4"),
        ("--config.data.size=30", "data.size height=30 must be divisible by"),
        ("--config.data.batch_size=3", "data.batch_size=3 is not divisible by the data-parallel devices"),
        ("--config.dit_train.optim.accumulate=3", r"data.batch_size=\d+ does not split into dit_train.optim.accumulate=3 "
         r"micro-batches over mesh.data x mesh.fsdp = 8 devices; use a multiple of 24 or a smaller accumulate"),
        (("--config.dit.overrides.patch=(1,2,4)", "--config.data.size=(32,40)"),
         r"data.size width=40 must be divisible by 16 \(VAE spatial factor x DiT patch\)"),
        ("--config.mesh.data=3", "mesh: axis sizes .* multiply to 3 but there are 8 devices"),
        (("--config.dit_train.profile.steps=2", "--config.dit_train.profile.start=700"),
         "dit_train.profile.start=700 is not before dit_train.steps=700: nothing would be traced"),
        ("--config.dit_train.profile.steps=-1", "dit_train.profile: start=10 and steps=-1 must be >= 0"),
        ("--config.text.encoder=minilm2", r"^text.encoder='minilm2' is not a text encoder; valid: 'minilm', 'bert:"),
    ],
)
def test_bad_configs_fail_before_compiling(override, message):
    config = config_lib.load_config(WORLD_TINY, list(override) if isinstance(override, tuple) else [override])
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config, "dit", device_count=8)


def test_overrides_refuse_unknown_fields_and_wrong_types():
    with pytest.raises(ValueError, match="config has no field 'dit.depth'"):
        config_lib.load_config(WORLD_TINY, ["--config.dit.depth=4"])
    # A typo is answered with the name beside it that is closest, wherever in the path it is.
    for override, field, meant in [("vae_train.stepz=1", "vae_train.stepz", "vae_train.steps"),
                                   ("vae_trian.steps=1", "vae_trian.steps", "vae_train.steps"),
                                   ("dit.overrides.dept=3", "dit.overrides.dept", "dit.overrides.depth")]:
        with pytest.raises(ValueError, match=rf"^override '--config.{override}': config has no field '{field}'; "
                                             rf"did you mean {meant}\?$"):
            config_lib.load_config(WORLD_TINY, [f"--config.{override}"])
    # Only whole paths that exist are offered (vae_trian.stepz has no good neighbour).
    with pytest.raises(ValueError, match=r"config has no field 'vae_trian.stepz'$"):
        config_lib.load_config(WORLD_TINY, ["--config.vae_trian.stepz=1"])
    # A model field the file leaves to the preset can be set too (it was refused), typed by the preset's value.
    unset = ["vae.overrides.latent_channels=8", "dit.overrides.mlp_ratio=2", "dit.overrides.dtype=bfloat16"]
    config = config_lib.load_config(WORLD_TINY, [f"--config.{override}" for override in unset])
    assert (config.vae.overrides.latent_channels, config.dit.overrides.mlp_ratio) == (8, 2.0)
    assert isinstance(config.dit.overrides.mlp_ratio, float) and config.dit.overrides.dtype == "bfloat16"
    assert "latent_channels" not in config_lib.load_config(WORLD_TINY, []).vae.overrides
    config = config_lib.load_config(WORLD_TINY, [])
    with pytest.raises(ValueError, match=r"^override 'vae.overrides.latent_channels=eight': "
                                         r"vae.overrides.latent_channels is a int, got str$"):
        apply_overrides(config, ["vae.overrides.latent_channels=eight"])
    assert "latent_channels" not in config.vae.overrides  # a refused override leaves no trace
    # A field with a default that an older config file leaves out was refused as unknown ("did you mean
    # vae_loss.adversarial_weight?" for adversarial_start_step): it is set, typed by its default.
    config = config_lib.load_config(WORLD_TINY, [])
    for section, field in (("dit_train", "init_from"), ("vae_train", "init_on"), ("text", "batch_size"),
                           ("vae_loss", "adversarial_start_step")):
        with config[section].unlocked():
            del config[section][field]
    apply_overrides(config, ["dit_train.init_from='bundled'", "vae_train.init_on=host", "text.batch_size=8",
                             "vae_loss.adversarial_start_step=5"])
    assert (config.dit_train.init_from, config.vae_train.init_on, config.text.batch_size,
            config.vae_loss.adversarial_start_step) == ("bundled", "host", 8, 5)
    with config.vae_loss.unlocked(), config.text.unlocked(), config.dit_train.unlocked():
        del config.vae_loss["adversarial_start_step"], config.text["batch_size"], config.dit_train["profile"]
    apply_overrides(config, ["dit_train.profile.steps=2", "dit_train.profile.start=3"])  # a section it leaves out
    assert config.dit_train.profile.to_dict() == {"steps": 2, "start": 3}
    with pytest.raises(ValueError, match=r"^override 'text.batch_size=four': text.batch_size is a int, got str$"):
        apply_overrides(config, ["text.batch_size=four"])  # typed by the run's default, 1
    with pytest.raises(ValueError, match=r"^override 'vae_loss.adversarial_start_step=soon': "
                                         r"vae_loss.adversarial_start_step is a int, got str$"):
        apply_overrides(config, ["vae_loss.adversarial_start_step=soon"])
    # Such a field's typo gets its name; a misspelt preset is named as that, not as a missing field.
    with pytest.raises(ValueError, match=r"config has no field 'dit.overrides.scan_unrol'; did you mean "
                                         r"dit.overrides.scan_unroll\?$"):
        config_lib.load_config(WORLD_TINY, ["--config.dit.overrides.scan_unrol=2"])
    with pytest.raises(ValueError, match=r"^override '--config.dit.overrides.scan_unroll=2': unknown DiT preset "
                                         r"'smal'; valid presets: tiny, small, B, L, XL, 1.5B$"):
        config_lib.load_config(WORLD_TINY, ["--config.dit.preset=smal", "--config.dit.overrides.scan_unroll=2"])
    # A section is not a value of another type: it cannot be replaced whole from the command line.
    with pytest.raises(ValueError, match=r"^override '--config.vae.overrides=\{\}': vae.overrides is a section; the "
                                         r"command line cannot replace a whole section, set its fields one by one "
                                         r"\(--config.vae.overrides.<field>=...\)$"):
        config_lib.load_config(WORLD_TINY, ["--config.vae.overrides={}"])
    with pytest.raises(ValueError, match="data.batch_size is a int, got str"):
        config_lib.load_config(WORLD_TINY, ["--config.data.batch_size=many"])
    # A new preset whose own fields the file's overrides set: world_tiny's depth, width and heads made this train
    # and export a 4 x 128 DiT labelled small, silently. Given on the command line too, they are meant.
    with pytest.raises(ValueError, match=r"^override '--config.dit.preset=small': the config file's dit.overrides "
                                         r"set depth=4, width=128, heads=4 over small's own depth=12, width=384, "
                                         r"heads=6, so the model would not be small; give them on the command line "
                                         r"too \(--config.dit.overrides.depth=12 --config.dit.overrides.width=384 "
                                         r"--config.dit.overrides.heads=6 to take small's\) or remove them from the "
                                         r"file$"):
        config_lib.load_config(WORLD_TINY, ["--config.dit.preset=small"])
    with pytest.raises(ValueError, match=r"^override 'vae.preset=base': the config file's vae.overrides set "
                                         r"base_channels=32, temporal_down=\(False, False\), spatial_down=\(True, "
                                         r"False\) over base's own base_channels=128, temporal_down=\(False, True, "
                                         r"True\), spatial_down=\(True, True, True\), .* \(--config.vae.overrides."
                                         r"base_channels=128 --config.vae.overrides.temporal_down=\(False,True,True\) "
                                         r"--config.vae.overrides.spatial_down=\(True,True,True\) to take base's\)"):
        config_lib.load_config(WORLD_TINY, ["vae.preset=base"])  # patch_size and time_kernels: base's are tiny's
    small = config_lib.load_config(WORLD_TINY, ["--config.dit.preset=small", "--config.dit.overrides.depth=12",
                                                "--config.dit.overrides.width=384", "--config.dit.overrides.heads=4"])
    assert (small.dit.preset, small.dit.overrides.depth, small.dit.overrides.heads) == ("small", 12, 4)
    assert config_lib.load_config(WORLD_TINY, ["--config.dit.preset=tiny"]).dit.overrides.depth == 4  # the file's
    # data.size is an int or a (height, width) pair, as docs/configs.md says, whatever the file's default.
    assert tuple(config_lib.load_config(WORLD_TINY, ["--config.data.size=(32,48)"]).data.size) == (32, 48)
    with pytest.raises(ValueError, match="data.size is a int, got str"):
        config_lib.load_config(WORLD_TINY, ["--config.data.size=big"])
    # flow.shift is a number or "auto" (world_tiny's is 3.0, real_tiny's "auto"): either switches to the other.
    assert config_lib.load_config(WORLD_TINY, ["--config.flow.shift=auto"]).flow.shift == "auto"
    shift = config_lib.load_config("real_tiny", ["--config.flow.shift=3"]).flow.shift
    assert shift == 3.0 and isinstance(shift, float)
    for config, kind in ((WORLD_TINY, "float"), ("real_tiny", "str")):  # True is an int to Python, 1.0 no shift
        with pytest.raises(ValueError, match=rf"^override '--config.flow.shift=True': flow.shift is a {kind}, got "
                                             r"bool$"):
            config_lib.load_config(config, ["--config.flow.shift=True"])
    with pytest.raises(ValueError, match=r"^override '--config.flow.timestep_sampler=3': flow.timestep_sampler is a "
                                         r"str, got int$"):  # only the field it documents takes both
        config_lib.load_config(WORLD_TINY, ["--config.flow.timestep_sampler=3"])
    # Through an unset (None) section or a value: one line, not a TypeError; and a bool is no int.
    with pytest.raises(ValueError, match=r"^override '--config.data.buckets.x=1': data.buckets is None, not a "
                                         r"section; set it whole, e.g. --config.data.buckets=\"\{'x': ...\}\"$"):
        config_lib.load_config(WORLD_TINY, ["--config.data.buckets.x=1"])
    with pytest.raises(ValueError, match="^override '--config.data.num_frames.x=5': config has no field "
                                         "'data.num_frames.x'$"):
        config_lib.load_config(WORLD_TINY, ["--config.data.num_frames.x=5"])
    with pytest.raises(ValueError, match="^override '--config.data.batch_size=True': data.batch_size is an int, "
                                         "got bool$"):
        config_lib.load_config(WORLD_TINY, ["--config.data.batch_size=True"])


def test_train_mesh_flag_replaces_the_config_sizes_with_a_preset_or_sizes():
    config = config_lib.set_mesh(config_lib.load_config(WORLD_TINY), "fsdp_tensor")
    assert config.mesh.to_dict() == {"data": 1, "fsdp": -1, "tensor": 2, "context": 1}
    config_lib.validate(config, "dit", device_count=8)
    assert config_lib.set_mesh(config, "fsdp=4,context=2").mesh.to_dict() == {"data": 1, "fsdp": 4, "tensor": 1,
                                                                                "context": 2}
    with pytest.raises(ValueError, match=r"mesh: 'fsdp_tensors' is not a preset \['dp', 'fsdp', "):
        config_lib.set_mesh(config, "fsdp_tensors")


def test_the_example_command_of_docs_configs_md_is_a_valid_config():
    docs = (REPO / "docs" / "configs.md").read_text()
    command = re.search(r"```bash\n(vidiff train .*?)\n```", docs, re.S).group(1).replace("\\\n", " ").split()
    overrides = [arg for arg in command if arg.startswith("--config.")]
    assert len(overrides) == 3
    config = config_lib.load_config(command[command.index("--config") + 1], overrides)  # a shipped config's name
    config_lib.validate(config, command[command.index("--model") + 1], device_count=1)


def test_docs_configs_md_says_what_real_tiny_changes_and_what_a_steps_override_keeps():
    docs = (REPO / "docs" / "configs.md").read_text()
    world, real = (json.loads(config_lib.load_config(name).to_json()) for name in ("world_tiny", "real_tiny"))

    def value(tree, dotted):
        for part in dotted.split("."):
            tree = tree[part]
        return tree

    # Every field the "Fields that differ from world_tiny" table names differs (it listed real_tiny's DiT, which is
    # world_tiny's: abs_pos_embed and normalize_text included).
    table = docs.split("Fields that differ from world_tiny:")[1].split("\n\n")[1]
    rows = [line.split("|")[1] for line in table.splitlines()[2:]]
    fields = [field for row in rows for field in re.findall(r"`([\w.]+)`", row)]
    assert "workdir" in fields and "flow.shift" in fields
    assert [field for field in fields if value(world, field) == value(real, field)] == []
    assert real["dit"] == world["dit"]
    # The warmup is computed when get_config() runs: an override of steps keeps it, as the optim table says.
    assert "a `--config.<model>_train.steps=` override leaves it as it was (world_tiny's VAE keeps 100 at " \
           "`steps=200`)" in docs
    assert config_lib.load_config("world_tiny", ["--config.vae_train.steps=200"]).vae_train.optim.warmup_steps == 100


def test_docs_configs_md_says_which_logged_numbers_are_not_means_of_the_steps():
    """A row's lr is its last update's (test_a_rows_own_work_...: schedule(step - 1)); the summary's final_loss
    is the last row's mean loss (the loop keeps row["loss"]), not the final step's own."""
    docs = " ".join((REPO / "docs" / "configs.md").read_text().split())
    assert "lr, not a mean: the learning rate of the row's last update" in docs
    assert "`final_loss`, the mean loss over the last log row's steps (not the final step's own loss)" in docs


def _command(workdir, *extra, model="vae", steps=8):
    return [sys.executable, "-m", "vidiff.cli", "train", "--config", str(WORLD_TINY), "--model", model,
            f"--config.workdir={workdir}", f"--config.{model}_train.steps={steps}", *FAST, *extra]


# Training subprocesses use one CPU device: compiles are 2x faster, and the
# parallel layouts have their own equivalence tests.
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=ENV)


def _start(cmd):
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _losses(workdir, model="vae"):
    """Loss per step; a resumed run's rows override the killed run's rows for the same step."""
    return {row["step"]: row["loss"] for row in read_metrics(Path(workdir) / model) if "loss" in row}


def _wait_for_step(workdir, step, proc, model="vae", timeout=300, checkpoint=None):
    """Wait until ``step`` is logged (and the checkpoint of step ``checkpoint`` is committed)."""
    deadline = time.time() + timeout
    committed = Path(workdir) / model / "checkpoints" / str(checkpoint) / "commit_success.txt"
    while time.time() < deadline:
        if max(_losses(workdir, model), default=0) >= step and (checkpoint is None or committed.exists()):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise TimeoutError(f"training never reached step {step}")


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_bit_identically(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    extra = ("--config.vae_train.ckpt_every=3",)
    done = _run(_command(reference, *extra))
    assert done.returncode == 0, done.stderr
    proc = _start(_command(killed, *extra))
    _wait_for_step(killed, 5, proc, checkpoint=3)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed, not finished or failed on its own
    resumed = _run(_command(killed, *extra))
    assert resumed.returncode == 0, resumed.stderr
    start = int(re.search(rf"resumed vae from {re.escape(str(killed / 'vae' / 'checkpoints'))}/(\d+)\b",
                          resumed.stderr).group(1))
    assert start in (3, 6)  # a mid-run checkpoint (ckpt_every 3), not the last step's (8)
    expected, got = _losses(reference), _losses(killed)
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bit-identical floats for every step, before and after the kill


@pytest.mark.slow
def test_batches_read_ahead_change_nothing_and_a_resume_restores_into_shapes(tmp_path, monkeypatch):
    """Batches prepared ahead (data.prefetch_to_device=2) give the losses, log rows and final parameters of a
    run without (0), bit for bit; a checkpoint saves the data position of the batches trained on, not of those
    read ahead, so a resume repeats the rest exactly. A resume builds no fresh state (an XL DiT's: 13 GB,
    built then thrown away, held beside the restored one). The rates leave the step's compilation out. Batching
    slowed on purpose (0.8 s a batch) shows in the rows' data_wait_s and in one line naming the fix."""
    from vidiff.data import pipeline
    from vidiff.train import loop, preflight

    def train(workdir, prefetch, log=lambda *a: None):
        config = config_lib.load_config(WORLD_TINY, [
            f"--config.workdir={workdir}", "--config.vae_train.steps=3", "--config.vae_train.ckpt_every=2",
            f"--config.data.prefetch_to_device={prefetch}", *FAST])
        loop.train(config, "vae", log=log)
        rows = [{k: v for k, v in row.items()
                 if k not in ("time", "steps_per_s", "frames_per_s", "data_wait_s", "data_wait_fraction")}
                for row in read_metrics(Path(workdir) / "vae")]
        return rows, jax.device_get(final.pop().params)

    final = []
    monkeypatch.setattr(preflight, "check_finite_params", lambda state, *a: final.append(state))
    batch, lines = pipeline.batch_records, []
    with pytest.MonkeyPatch.context() as slowed:  # the batching runs on the main thread: no read-ahead hides it
        slowed.setattr(pipeline, "batch_records", lambda *a, **k: time.sleep(0.8) or batch(*a, **k))
        rows, params = train(tmp_path / "plain", 0, log=lines.append)
    logged = [r for r in read_metrics(tmp_path / "plain" / "vae") if "loss" in r]
    assert len(logged) == 3 and all(r["data_wait_s"] >= 0.8 for r in logged), logged
    assert len([line for line in lines if "raise data.num_workers (now 0)" in line]) == 1, lines

    compile_seconds = 5.0  # a stub first step that "compiles" this long: left out of the first row's rate
    real_jit = loop.jit_train_step

    def slow_first_call(*args, **kwargs):
        step, calls = real_jit(*args, **kwargs), []

        def timed(*step_args):
            calls.append(time.sleep(compile_seconds) if not calls else None)
            return step(*step_args)
        return timed

    monkeypatch.setattr(loop, "jit_train_step", slow_first_call)
    ahead = tmp_path / "ahead"
    ahead_rows, ahead_params = train(ahead, 2)
    assert ahead_rows == rows  # losses, metrics and counters of every step
    jax.tree.map(np.testing.assert_array_equal, ahead_params, params)
    first, second = [r for r in read_metrics(ahead / "vae") if "loss" in r][:2]
    assert first["steps"] == 1 and first["steps_per_s"] is None  # a row of the compiling step alone: no rate
    assert 1 / second["steps_per_s"] < compile_seconds
    monkeypatch.setattr(loop, "jit_train_step", real_jit)

    # Checkpoint 2 was saved with batch 3 read ahead: resuming from it must train step 3 on batch 3.
    shutil.rmtree(ahead / "vae" / "checkpoints" / "3")
    monkeypatch.setattr(loop, "create_state", lambda *a, **k: pytest.fail("the resume built a fresh state"))
    lines = []
    resumed_rows, resumed_params = train(ahead, 2, log=lines.append)
    assert f"resumed vae from {ahead / 'vae' / 'checkpoints' / '2'}" in lines
    last = lambda rows: [row for row in rows if row["step"] == 3][-2:]  # noqa: E731 (its loss and eval rows)
    assert last(resumed_rows) == last(rows) and "loss" in last(rows)[0]
    jax.tree.map(np.testing.assert_array_equal, resumed_params, params)


def test_keep_best_ranks_each_checkpoint_by_the_steps_since_the_one_before(tmp_path, monkeypatch):
    """Not by the last log row's loss, which with log_every > ckpt_every is older than the checkpoint.
    Each run also waits for the cache write its last save started (the DiT's latent cache is written in
    the background), once, after the loop."""
    from vidiff.train import loop, tasks

    waits = []
    monkeypatch.setattr(tasks.Task, "wait_cache", lambda self: waits.append(self))

    def train(workdir, *extra):
        config = config_lib.load_config(WORLD_TINY, [f"--config.workdir={workdir}", "--config.vae_train.steps=4",
                                                     *FAST, *extra])
        loop.train(config, "vae", log=lambda *a: None)
        return Path(workdir) / "vae" / "checkpoints"

    train(tmp_path / "every_step")
    loss = _losses(tmp_path / "every_step")
    checkpoints = train(tmp_path / "ranked", "--config.vae_train.log_every=3", "--config.vae_train.ckpt_every=2",
                        "--config.vae_train.keep=4")
    ranked = {step: json.loads((checkpoints / str(step) / "metrics" / "metrics").read_text())["loss"]
              for step in (2, 4)}
    assert ranked[2] == pytest.approx((loss[1] + loss[2]) / 2, rel=1e-6)
    assert ranked[4] == pytest.approx((loss[3] + loss[4]) / 2, rel=1e-6)
    assert len(waits) == 2


# A config file that brings its own data: a few generated clips, registered as data.source='ramps'.
RAMPS_CONFIG = """
import importlib.util

import numpy as np

import vidiff.data
from vidiff.data.schema import make_record

spec = importlib.util.spec_from_file_location("world_tiny", {world_tiny!r})
world_tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(world_tiny)


class Ramps:
    def __init__(self, count, split):
        self.count, self.split = count, split

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        video = np.broadcast_to(np.arange(16, dtype=np.uint8)[None, None, :, None] * (index + 1), (5, 16, 16, 3))
        return make_record(video.copy(), f"ramp {{index}}", 8.0, f"ramps/{{self.split}}/{{index}}")


vidiff.data.register_source("ramps", lambda data, split, ledger: Ramps(data.ramp_count, split), fields=("ramp_count",))


def get_config():
    c = world_tiny.get_config()
    c.data.source, c.data.ramp_count, c.data.num_epochs = "ramps", 6, 3
    c.eval.num_frames = 5
    return c
"""


def test_a_source_registered_by_the_config_file_trains_with_no_edit_of_vidiff(tmp_path, monkeypatch, capsys):
    """`vidiff train --config` a file that registers its source: its 6 clips x 3 epochs are 2 batches of 8
    (step 3 is refused as more than they hold), and 2 steps train on them; a misspelt name lists the sources."""
    from vidiff import cli
    from vidiff.data import registry

    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))  # the registration ends with the test
    path = tmp_path / "ramps.py"
    path.write_text(RAMPS_CONFIG.format(world_tiny=str(WORLD_TINY)))

    def train(steps, *extra):
        return cli.main(["train", "--config", str(path), "--model", "vae", f"--config.workdir={tmp_path / 'w'}",
                         f"--config.vae_train.steps={steps}", *FAST, *extra])

    assert train(2, "--config.data.source=ramp") == 2
    *warnings, error = capsys.readouterr().err.splitlines()  # (the config's warnings come first, on stderr too)
    assert error == ("vidiff train: error: data.source='ramp' is invalid; use one of world, folder, "
                     "array_record, tfds, ramps, or register yours with vidiff.data.register_source")
    assert all(line.startswith("warning: ") for line in warnings)
    assert train(3) == 2
    assert "data runs out after 2 steps (6 records, data.num_epochs=3, batch 8)" in capsys.readouterr().err
    assert train(2) == 0
    assert sorted(_losses(tmp_path / "w")) == [1, 2]


def test_a_stop_between_log_rows_logs_its_steps_and_each_row_says_how_many(tmp_path, monkeypatch):
    """SIGTERM after step 2 with log_every=4: the stopped run logs steps 1-2 in a row at step 2 (before, they were
    logged nowhere), and the resumed run's row at step 4 says it covers steps 3-4 only; read_metrics keeps both.
    The stop comes before step 2's evaluation (a preemption's grace period is for the save): an evaluation row
    written before the stop's row at the same step read as a run of its own, which read_metrics dropped."""
    from vidiff.train import loop, stopping

    requested = stopping.StopRequest.requested

    def sigterm_after_step_2(self, step):  # a real signal, caught by the loop's own handler
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return requested(self, step)

    def train():
        config = config_lib.load_config(WORLD_TINY, [f"--config.workdir={tmp_path}", "--config.vae_train.steps=4",
                                                     *FAST, "--config.vae_train.log_every=4",
                                                     "--config.vae_train.eval_every=2"])
        loop.train(config, "vae", log=lambda *a: None)

    monkeypatch.setattr(stopping.StopRequest, "requested", sigterm_after_step_2)
    with pytest.raises(SystemExit) as stopped:
        train()
    assert stopped.value.code == 128 + signal.SIGTERM
    # The checkpoint ranks itself by the mean loss of the steps since the one before: here steps 1-2, the row's too.
    ranked = json.loads((tmp_path / "vae" / "checkpoints" / "2" / "metrics" / "metrics").read_text())["loss"]
    monkeypatch.setattr(stopping.StopRequest, "requested", requested)
    train()
    rows = read_metrics(tmp_path / "vae")
    assert [(row["step"], row.get("steps", "eval")) for row in rows] == [(2, 2), (4, 2), (4, "eval")]
    logged = [json.loads(line) for line in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row.get("steps", "eval")) for row in logged] == [(2, 2), (4, 2), (4, "eval")]
    assert rows[0]["loss"] == pytest.approx(ranked, rel=1e-6)


def test_a_signal_during_the_last_evaluation_or_the_export_is_acted_on(tmp_path, monkeypatch, capsys):
    """The loop checks for a stop between the save and the evaluation; a signal in the last step's evaluation
    was caught and then forgotten: the run went on to export and exited 0. It now ends the run like any stop,
    and the same command again exports the saved last step."""
    from vidiff.train import loop, stopping, tasks

    evaluate = tasks.VAETask.evaluate

    def sigterm_while_evaluating(self, state, workdir, step):  # a real signal, caught by the loop's own handler
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, state, workdir, step)

    config = config_lib.load_config(WORLD_TINY, [f"--config.workdir={tmp_path}", "--config.vae_train.steps=1",
                                                 *FAST, "--config.vae_train.eval_every=1"])
    monkeypatch.setattr(tasks.VAETask, "evaluate", sigterm_while_evaluating)
    with pytest.raises(SystemExit) as stopped:
        loop.train(config, "vae", log=lambda line: print(line, file=sys.stderr))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"SIGTERM: saved checkpoint {tmp_path / 'vae' / 'checkpoints' / '1'}; exiting (run the same command again "
        f"to export it)")
    assert not (tmp_path / "export" / "vae.safetensors").exists()
    monkeypatch.setattr(tasks.VAETask, "evaluate", evaluate)
    # The same command again exports that step. A signal while it exports (where a KeyboardInterrupt could be lost
    # in a jax callback: the run exported and exited 0) is said at once and acted on once the export is whole.
    finalize, signals = tasks.VAETask.finalize, []

    def signalled_while_exporting(self, *args):
        for _ in signals:
            os.kill(os.getpid(), signal.SIGTERM)
        return finalize(self, *args)

    monkeypatch.setattr(tasks.VAETask, "finalize", signalled_while_exporting)
    signals[:] = [1]
    with pytest.raises(SystemExit) as stopped:
        loop.train(config, "vae", log=lambda line: print(line, file=sys.stderr))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "SIGTERM: finishing the export first (SIGTERM again: stop at once)",
        f"SIGTERM: exported {tmp_path / 'export'}; exiting"]
    assert (tmp_path / "export" / "vae.safetensors").is_file()
    # A second signal ends the process at once.
    monkeypatch.setattr(stopping.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(f"_exit({code})")))
    signals[:] = [1, 2]
    with pytest.raises(SystemExit, match=rf"^_exit\({128 + signal.SIGTERM}\)$"):
        loop.train(config, "vae", log=lambda line: None)
    monkeypatch.undo()
    summary = loop.train(config, "vae", log=lambda line: None)
    assert (summary["start_step"], summary["final_step"]) == (1, 1)


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_the_signals_code(tmp_path):
    """143 (128 + SIGTERM), not 0: `vidiff train --model vae && vidiff train --model dit` went on to the DiT, and
    retry loops stopped, as if the run had finished. The message is on stderr: stdout holds only a summary."""
    proc = _start(_command(tmp_path, steps=200))
    _wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert out == ""
    line = [l for l in err.splitlines() if l.startswith("SIGTERM: saved checkpoint")][0]
    assert line.endswith("; exiting (run the same command again to resume)")
    step_dir = Path(line.split("saved checkpoint ")[1].split(";")[0])
    assert step_dir.is_dir() and int(step_dir.name) >= 2


@pytest.mark.slow
def test_nonfinite_stops_naming_the_step_or_is_skipped(tmp_path):
    blow_up = ("--config.vae_train.optim.lr=1e30", "--config.vae_train.optim.warmup_steps=0",
               "--config.vae_train.optim.grad_clip=0.0")
    # Checkpoints every step, logs every 5: the bad step is caught before a checkpoint could carry it.
    stopped = _run(_command(tmp_path / "stop", *blow_up, "--config.vae_train.log_every=5",
                            "--config.vae_train.ckpt_every=1", steps=6))
    assert stopped.returncode != 0
    bad = int(re.search(r"non-finite loss or gradient at step (\d+); stopped", stopped.stderr).group(1))
    saved = [int(p.name) for p in (tmp_path / "stop" / "vae" / "checkpoints").iterdir() if p.name.isdigit()]
    assert all(step < bad for step in saved)  # so a resume does not meet the old bad step again
    skipped = _run(_command(tmp_path / "skip", *blow_up, "--config.vae_train.on_nonfinite=skip", steps=6))
    # Skipping carries on to the last step, but a model blown up this far is refused, not exported.
    assert skipped.returncode == 2, skipped.stderr
    last = skipped.stderr.strip().splitlines()[-1]
    assert last.startswith("vidiff train: error: the vae's latents of training clips are not finite after step 6; ")
    assert "non-finite steps were skipped" in last and "Lower vae_train.optim.lr" in last
    assert not (tmp_path / "skip" / "export" / "vae.safetensors").exists()
    rows = [r for r in read_metrics(tmp_path / "skip" / "vae") if "loss" in r]  # (not the evaluation rows)
    assert rows[-1]["step"] == 6 and rows[-1]["skipped_steps"] >= 1 and any(r["loss"] is None for r in rows)  # NaN: null


def test_cli_reports_config_errors_in_one_line(tmp_path):
    result = _run(_command(tmp_path, "--config.data.size=30"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vidiff train: error: data.size height=30 must be divisible by 4 (the VAE's spatial factor); use e.g. 32"]
    no_vae = _run(_command(tmp_path / "fresh", model="dit"))
    assert no_vae.returncode == 2 and "no trained VAE in" in no_vae.stderr and "--model vae" in no_vae.stderr
    said = [line for line in no_vae.stderr.strip().splitlines() if not line.startswith("warning: ")]  # (the config's)
    assert len(said) == 1 and "PyTorch" not in no_vae.stderr  # no transformers advice
    # The VAE stage trains on its own clip length (vae_train.data), checked the same way.
    result = _run(_command(tmp_path, "--config.vae_train.data.num_frames=6", *TIME_4X))
    assert result.returncode == 2
    assert "error: vae_train.data.num_frames=6 must be 1 + k*4 (the VAE's time factor), e.g. 5" in result.stderr


@pytest.mark.slow
def test_vae_then_dit_train_export_and_sample(tmp_path):
    vae = _run(_command(tmp_path, "--config.vae_train.eval_every=4", "--config.vae_train.profile.start=1",
                        "--config.vae_train.profile.steps=2", steps=4))
    assert vae.returncode == 0, vae.stderr
    # The profile: steps 2 and 3, each marked, in a Perfetto trace and an xplane file.
    (trace,) = (tmp_path / "vae" / "profile").glob("plugins/profile/*/*.trace.json.gz")
    assert list(trace.parent.glob("*.xplane.pb"))
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert sorted({int(e["args"]["step_num"]) for e in events if e.get("name") == "train"}) == [2, 3]
    assert f"profile of steps 2-3: {tmp_path / 'vae' / 'profile'}" in vae.stdout + vae.stderr
    assert (tmp_path / "export" / "vae.safetensors").is_file()
    assert list((tmp_path / "vae" / "samples").glob("recon_*.gif"))
    rows = read_metrics(tmp_path / "vae")
    assert {"loss", "grad_norm", "lr", "steps_per_s", "frames_per_s", "psnr"} <= set(rows[0])
    assert any("val_psnr" in r for r in rows) and (tmp_path / "vae" / "tb").is_dir()
    # A world of 8 clips, all in every batch: the latent cache fills at step 1 and serves steps 2 and 3. A constant
    # learning rate keeps the compiled step the same when the resumed run below asks for 4 steps (a compile-cache hit).
    eight_clips = ("--config.dit_train.data.world.length=8", "--config.dit_train.data.buckets=None",
                   "--config.dit_train.data.image_fraction=0.0", "--config.dit_train.optim.schedule=constant",
                   "--config.data.fps=4")
    dit = _run(_command(tmp_path, "--config.dit_train.eval_every=3", *eight_clips, model="dit", steps=3))
    assert dit.returncode == 0, dit.stderr
    assert (tmp_path / "export" / "dit.safetensors").is_file()
    recorded = read_manifest(tmp_path / "export")["models"]  # every field of both configs, whatever the presets say
    assert [set(recorded[m]) for m in ("vae", "dit")] == [{f.name for f in dataclasses.fields(c)}
                                                          for c in (VAEConfig, DiTConfig)]
    (samples,) = (tmp_path / "dit" / "samples").glob("samples_*.gif")
    with Image.open(samples) as gif:  # played at the data's frame rate (it was always 8 fps)
        assert gif.info["duration"] == 250
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "dit") if "loss" in r)
    assert json.loads(dit.stdout.strip().splitlines()[-1])["latent_cache"] == {"clips": 8, "hits": 16, "misses": 8,
                                                                              "loaded": 0}
    # Captions longer than text.max_length=8 tokens are cut: counted in every row and the summary, and said once.
    cut = json.loads(dit.stdout.strip().splitlines()[-1])["captions_truncated"]
    assert cut > 0 and [r["captions_truncated"] for r in read_metrics(tmp_path / "dit") if "loss" in r][-1] == cut
    assert dit.stderr.count("tokens and were cut to it; log rows count them (captions_truncated); raise "
                            "text.max_length to keep them whole") == 1
    # Resumed, the run reads the latents its checkpoint saved instead of encoding the clips again.
    more = _run(_command(tmp_path, "--config.dit_train.eval_every=0", *eight_clips, model="dit", steps=4))
    assert more.returncode == 0, more.stderr
    cache_file = tmp_path / "dit" / "latent_cache" / "process_0.npz"
    assert f"latent cache: 8 clips' latents loaded from {cache_file}" in more.stderr
    assert json.loads(more.stdout.strip().splitlines()[-1])["latent_cache"] == {"clips": 8, "hits": 8, "misses": 0,
                                                                               "loaded": 8}
    # The truncated captions count on across the resume, as in one uninterrupted run of 4 steps (they restarted at 0).
    whole = tmp_path / "uninterrupted"
    shutil.copytree(tmp_path / "export", whole / "export")
    uninterrupted = _run(_command(whole, "--config.dit_train.eval_every=0", *eight_clips, model="dit", steps=4))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    counts = lambda workdir: [r["captions_truncated"] for r in read_metrics(workdir / "dit") if "loss" in r]  # noqa: E731
    assert counts(tmp_path) == counts(whole) and len(counts(whole)) == 4
    summary = lambda result: json.loads(result.stdout.strip().splitlines()[-1])["captions_truncated"]  # noqa: E731
    assert summary(more) == summary(uninterrupted) == counts(whole)[-1] > cut

    # Precomputed latents: world clips as mp4 + manifest -> shards with latents -> DiT training reads them.
    clips, shards = tmp_path / "clips", tmp_path / "shards"
    assert _run([sys.executable, "-m", "vidiff.cli", "world", "--out", str(clips), "--num", "8", "--size", "16",
                 "--frames", "5"]).returncode == 0
    prepared = _run([sys.executable, "-m", "vidiff.cli", "prepare", "--videos", str(clips), "--manifest",
                     str(clips / "captions.jsonl"), "--out", str(shards), "--size", "16", "--frames", "5",
                     "--latents", str(tmp_path / "export")])
    assert prepared.returncode == 0, prepared.stderr
    assert json.loads(prepared.stdout.strip().splitlines()[-1])["written"] == 8
    assert json.loads(prepared.stdout.strip().splitlines()[-1])["captions_truncated"] > 0  # cut to the export's 8
    from vidiff.data.shards import ArrayRecordSource, array_record_paths

    record = ArrayRecordSource(array_record_paths(str(shards), "train"))[0]
    assert record["latents"].shape == (5, 4, 4, 4) and record["text_embedding"].shape == (8, 384)
    assert record["text_mask"].dtype == bool and record["text_pooled"].shape == (384,)
    workdir = tmp_path / "from_shards"
    shutil.copytree(tmp_path / "export", workdir / "export")  # the VAE that decodes its samples
    # world_tiny's DiT stage sets its own buckets: the error names the field in force, which is the one to change.
    refused = _run(_command(workdir, "--config.data.source=array_record", f"--config.data.array_record_path={shards}",
                            "--config.dit_train.latents=prepared", model="dit", steps=3))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].endswith(
        "set dit_train.data.image_fraction=0.0 and dit_train.data.buckets=None")  # both at once: no second error
    from_shards = ("--config.data.source=array_record", f"--config.data.array_record_path={shards}",
                   "--config.dit_train.latents=prepared", "--config.dit_train.data.buckets=None",
                   "--config.dit_train.data.image_fraction=0.0")
    lean = _run([sys.executable, "-c", SPY_ON_BATCHES, "as_is", *_command(workdir, *from_shards, model="dit", steps=3)[3:]])
    assert lean.returncode == 0, lean.stderr
    assert "'latents'" in lean.stdout and "'video'" not in lean.stdout.split("batch keys: ")[1]  # frames never read
    # The same run reading every record's frames, as before: the same losses, bit for bit.
    shutil.copytree(tmp_path / "export", tmp_path / "with_frames" / "export")
    full = _run([sys.executable, "-c", SPY_ON_BATCHES, "with_frames",
                 *_command(tmp_path / "with_frames", *from_shards, model="dit", steps=3)[3:]])
    assert full.returncode == 0, full.stderr
    assert "'video'" in full.stdout.split("batch keys: ")[1]
    assert _losses(workdir, "dit") == _losses(tmp_path / "with_frames", "dit") and len(_losses(workdir, "dit")) == 3


# `vidiff train ARGS` with the keys of the batches the DiT task was given printed at the end; "with_frames" reads
# prepared shards as a DiT did before it read them without their frames.
SPY_ON_BATCHES = """
import sys
from vidiff import cli
from vidiff.train import tasks

if sys.argv[1] == "with_frames":
    tasks.DiTTask.pipeline = tasks.Task.pipeline
keys, host_arrays = set(), tasks.DiTTask.host_arrays
tasks.DiTTask.host_arrays = lambda self, raw: (keys.update(raw), host_arrays(self, raw))[1]
code = cli.main(sys.argv[2:])
print("batch keys:", sorted(keys))
sys.exit(code)
"""


def test_train_step_ema_warms_up_and_bad_steps_keep_the_last_good_state():
    from vidiff import parallel
    from vidiff.train.state import create_state, make_train_step

    mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])
    init = lambda key: {"w": jnp.zeros((2,))}
    tx = optax.sgd(1.0)
    state, _ = create_state(init, tx, seed=0, mesh=mesh)
    bf16, _ = create_state(lambda key: {"w": jnp.zeros((2,), jnp.bfloat16)}, tx, seed=0, mesh=mesh)
    assert bf16.params["w"].dtype == jnp.bfloat16 and bf16.ema_params["w"].dtype == jnp.float32
    loss_fn = lambda p, batch, rng, frozen, step: (jnp.sum((p["w"] - batch["target"]) ** 2) / 2, {})
    step = jax.jit(make_train_step(loss_fn, tx, ema_decay=0.999))
    state, metrics = step(state, {"target": jnp.ones(2)}, {})
    np.testing.assert_allclose(state.params["w"], 1.0)  # one SGD step onto the target
    np.testing.assert_allclose(state.ema_params["w"], 0.9)  # decay min(0.999, 1/10) at step 0
    state, metrics = step(state, {"target": jnp.array([jnp.nan, 0.0])}, {})
    assert int(state.skipped) == 1 and int(state.first_bad_step) == 1 and int(state.step) == 2
    np.testing.assert_allclose(state.params["w"], 1.0)  # the bad step changed nothing
    # A finite loss whose gradient is not (sqrt's at 0) is skipped too; the first bad step stays the one named.
    grad_bad = lambda p, batch, rng, frozen, step: (jnp.sum(jnp.sqrt(jnp.abs(p["w"] - 1.0))), {})
    state, metrics = jax.jit(make_train_step(grad_bad, tx, ema_decay=0.999))(state, {}, {})
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert int(state.skipped) == 2 and int(state.first_bad_step) == 1 and int(state.step) == 3
    np.testing.assert_allclose(state.params["w"], 1.0)
    # The EMA's warm-up counts updates, as the schedule does: the next one is update 1 (decay 2/11), not step 3.
    state, metrics = step(state, {"target": jnp.ones(2)}, {})
    np.testing.assert_allclose(state.ema_params["w"], 0.9 * 2 / 11 + 1.0 * 9 / 11, rtol=1e-6)


def test_a_loss_counts_updates_as_the_optimizer_does_not_skipped_steps():
    """A GAN term switched on at step 2 starts with the discriminator's optimizer (it counts updates), even
    after a skipped step: both wait for the second real update."""
    from vidiff import parallel
    from vidiff.train.state import create_state, make_train_step

    mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])
    tx, _ = make_optimizer(optim(lr=0.1, warmup_steps=0, schedule="constant", grad_clip=None), 10,
                           networks={"vae": 0, "disc": 2})

    def loss_fn(params, batch, rng, frozen, step):
        gan_on = (step >= 2).astype(jnp.float32)
        loss = jnp.sum(params["vae"] ** 2) + gan_on * jnp.sum((params["disc"] - 1.0) ** 2) + batch["bad"]
        return loss, {"gan_on": gan_on, "step_seen": step}

    state, _ = create_state(lambda key: {"vae": jnp.ones(2), "disc": jnp.zeros(2)}, tx, seed=0, mesh=mesh)
    step = jax.jit(make_train_step(loss_fn, tx, ema_decay=0.0))
    seen = []
    for bad in (jnp.nan, 0.0, 0.0, 0.0):  # the first step is skipped
        before = state.params["disc"]
        state, metrics = step(state, {"bad": bad}, {})
        seen.append((int(metrics["step_seen"]), float(metrics["gan_on"]), bool(jnp.any(state.params["disc"] != before))))
    assert seen == [(0, 0.0, False), (0, 0.0, False), (1, 0.0, False), (2, 1.0, True)]


def test_with_a_discriminator_the_row_logs_the_vaes_loss_and_each_networks_grad_norm_before_clipping():
    """The loss a row logs (and keep_best ranks) is the loss_fn's own metrics["loss"], the VAE's generator side,
    not its sum with the discriminator's loss; each network, clipped apart, has its gradient norm, unclipped."""
    from vidiff import parallel
    from vidiff.train.state import create_state, make_train_step

    mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])
    networks = {"vae": 0, "disc": 0}
    tx, _ = make_optimizer(optim(grad_clip=1.0), 10, networks=networks)

    def loss_fn(params, batch, rng, frozen, step):
        vae, disc = jnp.sum(params["vae"] ** 2), jnp.sum((params["disc"] - 1.0) ** 2)
        return vae + disc, {"loss": vae, "discriminator": disc}

    state, _ = create_state(lambda key: {"vae": jnp.full(2, 10.0), "disc": jnp.zeros(2)}, tx, seed=0, mesh=mesh)
    _, metrics = jax.jit(make_train_step(loss_fn, tx, ema_decay=0.0, networks=networks))(state, {}, {})
    assert float(metrics["loss"]) == pytest.approx(200.0) and float(metrics["discriminator"]) == pytest.approx(2.0)
    assert float(metrics["grad_norm"]) == pytest.approx(20 * 2**0.5, rel=1e-5)  # not clipped to 1
    assert float(metrics["grad_norm_disc"]) == pytest.approx(2 * 2**0.5, rel=1e-5)


def test_the_export_guard_says_a_signal_even_when_the_stream_is_mid_write(capfd):
    """Printing from a signal handler into a stream the main thread is writing raises RuntimeError (buffered
    writers are not reentrant); the guard's line then goes to file descriptor 2 directly."""
    from vidiff.train.stopping import ExportGuard

    def busy(line):
        raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

    guard = ExportGuard(busy)
    guard._handle(signal.SIGINT, None)
    assert guard.signal_name == "SIGINT"
    assert capfd.readouterr().err == "SIGINT: finishing the export first (SIGINT again: stop at once)\n"
