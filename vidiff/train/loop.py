"""The one training loop: ``train(config, model)`` for the VAE or the DiT.

It validates the config, builds the mesh, the task (model + loss, see
``vidiff.train.tasks``), the sharded state and the Grain pipeline, resumes from
the latest checkpoint in ``<workdir>/<model>/checkpoints`` if there is one (else
starts from random weights, or an export's: :mod:`vidiff.train.init_from`), and
then runs the jitted step. Every ``log_every`` steps it writes metrics (JSONL +
TensorBoard) and checks for non-finite steps; every ``ckpt_every`` steps it
saves asynchronously (state + data iterator + config). Each row says how many
steps its means cover (``steps``). SIGTERM / SIGINT save a checkpoint, log the
steps since the last row, and exit with the shell's code for that signal (143 /
130: a stopped run is not a finished one) and a message naming it, before that
step's evaluation (a preemption's grace period is for the save; how a run stops
early: :mod:`vidiff.train.stopping`). Running the same command again
after any kill resumes exactly: same data order, same per-step RNG.
The main thread draws each batch and dispatches the steps; a worker thread makes
up to ``data.prefetch_to_device`` drawn batches device arrays ahead of their
step (:mod:`vidiff.train.prefetch`: the text encoder's and latent cache's reads
of device values wait there, not in front of the next dispatch), and a
checkpoint saves the data position of the batches the steps consumed. The rates
a log row reports leave out the step's compilations (a batch shape new to the
run, and the wait for that batch's preparation, which compiles too) as well as
evaluations, saves and the rows' own work; the row also says how long the main
thread waited for the data pipeline's batches (``data_wait_s``,
``data_wait_fraction``), and past a fifth of the time, once per run, a line
names the data settings that would feed the steps faster.

Multi-host: the loop starts ``jax.distributed`` first (``vidiff.distributed``, from
the config's ``distributed`` section or the environment), builds a hybrid mesh,
loads ``data.batch_size / process_count`` rows per process (the pipeline slices
the data per process), saves and restores checkpoints collectively, and leaves
metrics, samples and exports to process 0, which evaluates on gathered (host)
parameters. A preemption notice (SIGTERM) is agreed on by all processes at the
same step (jax's preemption sync point) before they save and exit.

User mistakes fail in one line, before compiling where they can be known then
(:mod:`vidiff.train.resume_checks`: a changed or incomplete checkpoint, a DiT resumed onto another VAE;
:mod:`vidiff.train.preflight`: a DiT's VAE or prepared shards that do not fit, finite data that cannot last
``steps``). Data that runs out mid-run anyway (skipped records), an iterator that cannot be restored, and
final parameters that are not finite (nothing is exported) end the run with one line too, after pending
checkpoint saves have finished; with several processes, finite data ends every process at the same step, and
batches of different buckets stop them all in one line (they agree each step on whether all still have a
batch, and on its shape). The summary and every log row count skipped steps (``skipped_steps``, also
``skipped``) apart from skipped data records (``skipped_records_total``, and by reason ``skipped_records``),
and the captions cut to ``text.max_length`` tokens (``captions_truncated``; the first log row with any says so
in a line). Both carry on across resumes: the skipped steps in the train state, the captions cut in each
checkpoint's config record.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from vidiff import distributed, parallel, provenance
from vidiff.models.export import DIT_VAE
from vidiff.train import init_from, prefetch, preflight, resume_checks, stopping, tasks
from vidiff.train.checkpoint import Checkpointer, lock_run, read_config, unlock
from vidiff.train.config import for_stage, name_stage_fields, validate, warnings_for
from vidiff.train.metrics import CompileTimer, DataWaitWarning, LogWindow, MetricsWriter
from vidiff.train.optimizer import make_optimizer
from vidiff.train.profile import StepProfiler
from vidiff.train.resume_checks import CONFIG_HISTORY, restore
from vidiff.train.state import INIT_ON, abstract_state, create_state, jit_train_step, make_train_step

# The key of a checkpoint's config record holding the captions cut so far: a resumed run counts on from it.
CAPTIONS_TRUNCATED = "captions_truncated"


@dataclasses.dataclass
class _Run:
    """Everything a run builds before its first step."""

    stage: Any
    workdir: Path
    config_json: dict
    record: dict  # what each checkpoint saves: the config and, for the DiT, the VAE it trains with
    checkpointer: Checkpointer
    start: int
    mesh: Any
    task: Any
    tx: Any
    schedule: Any
    state: Any
    state_shardings: Any
    iterator: Any
    ledger: Any  # the data's skip counts (vidiff.data.skips), or None
    lock: Any  # process 0's open lock file, closed when the run ends (None elsewhere)


def _set_up(config, model: str, log) -> _Run:
    """Checks, mesh, task, optimizer, sharded state and data iterator, restored from the latest checkpoint."""
    stage = config[f"{model}_train"]
    workdir = Path(config.workdir) / model
    config_json = json.loads(config.to_json())
    lock, checkpointer = _lock_and_open(workdir, stage)
    try:  # a setup error (a check, the restore) leaves no checkpoint manager running
        checkpointer.check_folders()  # a step entry that is no folder would be skipped, then fail its save
        start = checkpointer.latest_step() or 0
        if start:
            resume_checks.check_resume(checkpointer, start, config_json, model)
        source = None if start else init_from.prepare(config, model, log)  # the DiT's VAE too, before it loads
        _check_before_task(config, model)
        mesh = parallel.mesh_from_config(config.mesh)
        task = tasks.build(config, model, mesh)
        loaded = None if source is None else init_from.load(source, task, log)
        history = resume_checks.config_history(checkpointer, start, config_json, model, log)  # logs what changed
        record = {**config_json, CONFIG_HISTORY: history}
        if model == "dit":  # its checkpoints record the VAE it trains with: a resume onto another is refused
            record = {**record, DIT_VAE: task.vae_sha256}
            if start:
                resume_checks.check_resume_vae(checkpointer, start, task.vae_sha256, tasks.export_dir(config))
            preflight.check_dit_task(config, task)
        process_config = _process_config(config)
        pipeline = task.pipeline(process_config)
        preflight.check_data_lasts(pipeline, process_config, model)
        if model == "vae" and stage.get("eval_every", 0):
            task.validation_videos()  # read now, not at the first evaluation: clips it cannot use fail before training
        tx, schedule = make_optimizer(stage.optim, stage.steps, networks=task.networks)
        state, state_shardings = _initial_state(task, tx, mesh, config, stage, resuming=bool(start), loaded=loaded)
        iterator = iter(pipeline)
        if start:
            state = restore(checkpointer, state, start, iterator, config_json)
            task.captions_truncated = captions_truncated_before(checkpointer, start)
            log(f"resumed {model} from {checkpointer.directory / str(start)}")
            if note := init_from.resume_note(stage, model, checkpointer.directory / str(start)):
                log(note)
    except BaseException:
        checkpointer.close()
        unlock(lock)
        raise
    return _Run(stage, workdir, config_json, record, checkpointer, start, mesh, task, tx, schedule, state,
                state_shardings, iterator, getattr(pipeline, "ledger", None), lock)


def _lock_and_open(workdir: Path, stage):
    """The run's lock on ``workdir``, then its checkpoint manager, which tidies the folder another run writes."""
    lock = lock_run(workdir)
    try:
        checkpointer = Checkpointer(workdir / "checkpoints", keep=stage.keep, keep_best=stage.keep_best)
    except BaseException:
        unlock(lock)
        raise
    return lock, checkpointer


def _check_before_task(config, model: str) -> None:
    """What can be checked before the task loads its models and data (:mod:`vidiff.train.preflight`)."""
    if model == "dit":
        preflight.check_dit_inputs(config)
    else:
        preflight.check_eval_split(config)
    preflight.check_stored_clips(config)  # shards too short or too small for what the run asks of them


def _initial_state(task, tx, mesh, config, stage, *, resuming: bool, loaded):
    """The train state and its shardings. A resume restores into shapes and shardings alone: no fresh state is
    built, held beside it, thrown away. A fresh run draws one, with an export's weights (``loaded``) put in."""
    if resuming:
        return abstract_state(task.init_params, tx, mesh)
    state, shardings = create_state(task.init_params, tx, config.seed, mesh,
                                    on_host=INIT_ON[stage.get("init_on", "auto")])
    if loaded is not None:
        state = init_from.start_from(state, shardings, loaded, tx)
    return state, shardings


def train(config, model: str, *, log=print) -> dict:
    """Train ``model`` ("vae" or "dit") as ``config`` says; returns a summary dict."""
    distributed.initialize(config)  # before anything touches a jax backend
    main = distributed.is_main()
    log = log if main else (lambda *a, **k: None)
    config = for_stage(config, model)
    try:
        validate(config, model, jax.device_count())
        for line in warnings_for(config, model):
            log(line)
        run = _set_up(config, model, log)
    except ValueError as error:  # a data field the stage sets is named as the stage's
        raise name_stage_fields(error, config, model)
    try:
        return _train(config, model, run, log, main)
    finally:
        unlock(run.lock)  # after the last save and the export: another run on this workdir may start


def _train(config, model: str, run: _Run, log, main: bool) -> dict:
    """The steps, saves and evaluations of a set-up run, then its export; returns the summary."""
    stage, workdir, checkpointer, task, mesh, iterator = (run.stage, run.workdir, run.checkpointer, run.task,
                                                          run.mesh, run.iterator)
    state, start = run.state, run.start
    # The steps a resumed checkpoint skipped (under on_nonfinite='skip') were its run's: this one stops at new ones.
    stop_if_nonfinite = functools.partial(stopping.stop_if_nonfinite, stage=stage, model=model,
                                          checkpointer=checkpointer, skipped_before=int(state.skipped), start=start)
    cache_message = task.load_cache(workdir)  # host-side caches a checkpoint left (the DiT's latents)
    if cache_message:
        log(cache_message)
    step_fn = jit_train_step(
        make_train_step(task.loss_fn, run.tx, ema_decay=stage.ema_decay, accumulate=stage.optim.accumulate,
                        networks=task.networks),
        run.state_shardings, task.batch_shardings, task.frozen_shardings, mesh,
    )
    writer = MetricsWriter(workdir)
    window = LogWindow(start, rate=task.rate_name)
    since_save = LogWindow(start)  # keep_best ranks a checkpoint by its own steps' mean loss
    bar = tqdm(total=stage.steps, initial=start, desc=f"train {model}", disable=not main,
               dynamic_ncols=True, leave=False)
    profiler = StepProfiler(stage, workdir / "profile", log)
    last_loss = float("nan")
    truncation_told = False

    from vidiff.data.config import DataConfig  # here, not above: importing the loop needs no data packages

    data = DataConfig.from_any(config.data)
    compiles = CompileTimer(window)
    # Host batches are drawn here, in order; the worker makes them device arrays (host work, off the mesh).
    batches = prefetch.Prefetcher(
        iterator, lambda step: stopping.draw_batch(iterator, step, config), lambda raw: task.device_batch(raw, mesh),
        lambda missing: stopping.fail(missing, stage, model, checkpointer, run.ledger, config),
        depth=data.prefetch_to_device, start=start, steps=stage.steps, waited=window.wait,
        prepare_waited=lambda prepared, seconds: compiles.prepared(prepared[0], seconds))
    data_wait = DataWaitWarning(data, log)
    saved = {start}

    def save(step):
        if step in saved:
            return
        stop_if_nonfinite(state)  # nothing after a bad step is kept as "good"
        saved.add(step)
        began = time.perf_counter()
        loss = since_save.means(step)["loss"] if step > since_save.first_step else float("nan")
        since_save.reset(step)
        checkpointer.save(step, state, data_iterator=batches.position,
                          config={**run.record, CAPTIONS_TRUNCATED: task.captions_truncated},
                          metrics=None if not np.isfinite(loss) else {"loss": loss})
        with batches.lock:  # the latent cache is not written while the worker adds to it
            task.save_cache(workdir)
        window.pause(time.perf_counter() - began)

    def end_on_signal(signal_name, step):
        save(step)
        if step > window.first_step:  # steps since the last row: the resumed run's rows start after them
            _log_row(writer, window, state, step, run)
        checkpointer.close()
        task.wait_cache()
        bar.close()
        again = "export it" if step == stage.steps else "resume"
        log(f"{signal_name}: saved checkpoint {checkpointer.directory / str(step)}; exiting (run the same command "
            f"again to {again})")
        writer.close()
        # The shell's code for a signal's end: `vidiff train ... && next` and retry loops must not take a stopped
        # run for a finished one.
        sys.exit(128 + signal.Signals[signal_name].value)

    try:  # whatever ends the loop, pending asynchronous saves finish before the process does
        with stopping.StopRequest() as stop, profiler:  # leaving the block ends a trace still running (error, signal)
            step = start
            while step < stage.steps:
                with profiler.step(step + 1):
                    batch, truncated = batches.next()
                    tokens = task.tokens_in(batch)  # each batch counted at its own bucket's clip size
                    with jax.set_mesh(mesh), parallel.axis_rules():  # the step traces its logical constraints on the mesh
                        state, metrics = compiles.call(step_fn, state, batch, task.frozen, tokens=tokens)
                    task.captions_truncated += truncated
                    window.add(metrics, tokens)
                    since_save.add(metrics, 0)  # all of them: the sum window.add compiled, not a second one
                step += 1
                profiler.after(step, state)
                bar.update(1)
                if step % stage.log_every == 0 or step == stage.steps:
                    stop_if_nonfinite(state)
                    row = _log_row(writer, window, state, step, run)
                    last_loss = row["loss"]
                    data_wait.check(step, row)
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                    if task.captions_truncated and not truncation_told:
                        truncation_told = True
                        log(f"step {step}: {task.captions_truncated} caption(s) so far were longer than "
                            f"text.max_length={config.text.max_length} tokens and were cut to it; log rows count "
                            f"them (captions_truncated); raise text.max_length to keep them whole")
                if step % stage.ckpt_every == 0 or step == stage.steps:  # saved first: an evaluation may fail
                    save(step)
                if stop.requested(step):  # before an evaluation: a preemption's grace period is for the save
                    end_on_signal(stop.signal_name, step)
                if stage.eval_every and (step % stage.eval_every == 0 or step == stage.steps):
                    began = time.perf_counter()
                    with batches.lock:  # the text encoder's cache is not shared with the worker meanwhile
                        writer.write(step, _on_process_0(task, state, lambda t, s: t.evaluate(s, workdir, step)))
                    window.pause(time.perf_counter() - began)
            profiler.stop(state)  # a window reaching past the last step ends here
            if stop.signal_name:  # one during the last evaluation ends the run too, not after an export
                end_on_signal(stop.signal_name, step)
    finally:
        batches.close()  # no worker outlives the loop, whatever ended it
        bar.close()
        checkpointer.close()
        writer.close()
    with stopping.ExportGuard(log) as guard:
        task.wait_cache()  # not in `finally`: a failed last cache write must not hide the error that ended the loop
        preflight.check_finite_params(state, model, step, checkpointer.directory)
        made_with = provenance.collect(mesh, step, config_history=run.record[CONFIG_HISTORY])
        exported = _on_process_0(task, state, lambda t, s: t.finalize(s, run.config_json, tasks.export_dir(config),
                                                                      made_with))
    if guard.signal_name:  # the run is whole; a script's `vidiff train ... && next` must still stop
        log(f"{guard.signal_name}: exported {tasks.export_dir(config)}; exiting")
        sys.exit(128 + signal.Signals[guard.signal_name].value)
    skips = stopping.skip_totals(run.ledger)
    return {"model": model, "workdir": str(workdir), "start_step": start, **exported,
            **({"profile": str(profiler.directory)} if profiler.traced else {}),
            # final_loss: the mean over the last log row's steps (docs/configs.md), not the final step's own loss.
            "provenance": made_with, "final_step": step, "final_loss": last_loss if math.isfinite(last_loss) else None,
            "skipped": int(state.skipped), "skipped_steps": int(state.skipped),
            "skipped_records_total": skips["bad"], "skipped_records": skips["skipped"],
            "captions_truncated": task.captions_truncated, "checkpoint": str(checkpointer.directory / str(step))}


def _log_row(writer, window, state, step: int, run: _Run) -> dict:
    """Write the means since the last row (plus the last update's lr and skip counts); returns the row.

    The next row's window starts after this row's own host work: the schedule's first eager call compiles
    (0.8 s on a CPU), which no step's rate should hold."""
    scalars = window.means(step)
    skipped = int(state.skipped)  # skipped steps left the optimizer's (and schedule's) count behind
    scalars.update(lr=float(run.schedule(max(step - skipped - 1, 0))), skipped=skipped, skipped_steps=skipped,
                   skipped_records_total=stopping.skip_totals(run.ledger)["bad"],
                   captions_truncated=run.task.captions_truncated)
    writer.write(step, scalars)
    window.reset(step)
    return scalars


def captions_truncated_before(checkpointer, step: int) -> int:
    """The captions cut to ``text.max_length`` up to ``step``, as its checkpoint saved them (0 for a checkpoint
    written before vidiff saved the count, or one without a readable config, which the restore names)."""
    try:
        return int(read_config(checkpointer.directory, step).get(CAPTIONS_TRUNCATED, 0))
    except (OSError, ValueError):
        return 0


def _process_config(config):
    """The config this process's data pipeline is built from: its share of the global batch."""
    if jax.process_count() == 1:
        return config
    local = config.copy_and_resolve_references()
    local.data.batch_size = distributed.local_batch_size(int(config.data.batch_size))
    return local


def _host_view(task, state):
    """(task, state) with the EMA parameters and frozen inputs as host arrays gathered from every
    process (a collective), so process 0 alone can evaluate or export on its own devices."""
    local_task = copy.copy(task)
    local_task.frozen = parallel.gather(task.frozen)
    return local_task, state.replace(ema_params=parallel.gather(state.ema_params))


def _on_process_0(task, state, work) -> dict:
    """``work(task, state)`` (an evaluation, the export) on process 0 alone; with several processes, every one
    takes part in gathering the host copies it works on, and the others return {}."""
    if jax.process_count() == 1:
        return work(task, state)
    local_task, local_state = _host_view(task, state)
    return work(local_task, local_state) if distributed.is_main() else {}
