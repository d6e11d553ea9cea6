"""Multi-host training on one machine: two CPU processes of 4 devices each, joined by jax.distributed.

Both processes (and a reference process with 8 devices) run this file as a script: a
tiny DiT trained with the library's sharded state, step and checkpointer on a
(data 2, fsdp 2, context 2) mesh with ring attention; processes sit on the ``data``
axis (hybrid mesh) and each loads only its half of every batch. After 2 steps the
state is saved (orbax, collectively), 2 more steps run, then the checkpoint is
restored and the same 2 steps are repeated. The test checks that the restored run
repeats the continued one exactly and that the 2-process losses equal the
1-process, 8-device losses.
"""
import functools
import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT, BATCH = 4, 2, 8


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIDIFF_", "JAX_COORDINATOR"))}
    # LLVM -O0 halves XLA:CPU compile time, nearly all of this test's time.
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "PYTHONPATH": str(REPO), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(args: list[str], devices: int, timeout: float, also: subprocess.Popen | None = None):
    """Run this file's worker as processes 0 and 1 of one jax.distributed job (and wait for ``also``).

    The coordinator port is free when picked but only bound later, so another program may take it
    first; a start that fails on the port is retried on a fresh one.
    """
    for attempt in range(3):
        port = _free_port()
        env = dict(VIDIFF_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", VIDIFF_NUM_PROCESSES="2")
        procs = [subprocess.Popen([sys.executable, __file__, *(a.replace("{i}", str(i)) for a in args)],
                                  env=_env(devices, **env, VIDIFF_PROCESS_ID=str(i)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        outs = [proc.communicate(timeout=timeout)[0] for proc in procs]
        port_taken = any(p.returncode and ("already in use" in o or "Failed to add port" in o)
                         for p, o in zip(procs, outs))
        if not port_taken or attempt == 2:
            break
    finished = list(zip(procs, outs)) + ([(also, also.communicate(timeout=timeout)[0])] if also else [])
    for proc, out in finished:
        assert proc.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_processes_train_save_restore_like_one(tmp_path):
    start = time.perf_counter()
    reference = subprocess.Popen([sys.executable, __file__, str(tmp_path / "single.json"),
                                  str(tmp_path / "ckpt_single")],
                                 env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _run_two_processes([str(tmp_path / "multi{i}.json"), str(tmp_path / "ckpt_multi")], 4, 300, also=reference)
    multi = [json.loads((tmp_path / f"multi{i}.json").read_text()) for i in range(2)]
    single = json.loads((tmp_path / "single.json").read_text())
    assert [m["processes"] for m in multi] == [2, 2] and single["processes"] == 1
    assert multi[0]["devices"] == multi[1]["devices"] == single["devices"] == 8
    assert multi[0]["local_rows"] == multi[1]["local_rows"] == BATCH // 2 and single["local_rows"] == BATCH
    for run in (*multi, single):
        assert run["restored"] == run["continued"]  # bit-identical after restore
        assert run["restored_params_equal"]
    assert multi[0]["losses"] == multi[1]["losses"]  # every process sees the same global loss
    # Same global computation; only the device order (hybrid mesh) and reduction order may differ.
    np.testing.assert_allclose(multi[0]["losses"], single["losses"], rtol=1e-6)
    assert (tmp_path / "ckpt_multi" / str(SAVE_AT)).is_dir()
    print(f"multi-host losses {multi[0]['losses']} vs one process {single['losses']}; "
          f"{time.perf_counter() - start:.1f} s")


def test_processes_stop_together_when_one_runs_out_of_data_or_fills_another_bucket(tmp_path):
    """Finite data whose shares end unevenly: the process that still has a batch stops at the same step as the
    one whose share ran out, instead of going on alone into a collective nobody else joins (a hang). Buckets
    picked by each clip's shape: batches of different shapes at one step fail in one line on every process."""
    _run_two_processes(["data-ends", str(tmp_path / "out{i}.json"), str(tmp_path)], 1, 120)
    ends = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [e["first"] for e in ends] == ["batch 0 of process 0", "batch 0 of process 1"]
    # Process 0 still had a batch for step 1 and process 1 had none: both stop there, with the same line.
    assert ends[0]["second"] == ends[1]["second"] == (
        "data ran out after step 1 of dit_train.steps=5 (0 records read; data.num_epochs=1); no checkpoint was "
        "saved; set data.num_epochs=None or dit_train.steps<=1")
    assert [e["same_bucket"] for e in ends] == ["(1, 2, 4, 4, 3)", "(1, 2, 4, 4, 3)"]
    assert ends[0]["other_bucket"] == ends[1]["other_bucket"] == (
        "at step 2 the processes' batches differ in shape (clips of frames x height x width: process 0 2x4x4, "
        "process 1 1x4x4): each clip's own shape picked its bucket among data.buckets=['2x4x4', '1x4x4']; use one "
        "bucket (data.buckets=None), one process, or fixed-size shards from `vidiff prepare`")


def test_every_process_exchanges_on_the_host_without_waiting_for_the_device(tmp_path):
    """The per-step agreement goes through jax.distributed's key-value store: every process gets every row,
    call after call, without the store growing; it returns while a long computation dispatched just before
    still runs (a device all-gather would queue behind it); a process that does not answer is named."""
    _run_two_processes(["exchange", str(tmp_path / "out{i}.json")], 1, 120)
    runs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    for run in runs:
        assert run["rows"] == [[[0, call, 0], [1, call, -call]] for call in range(50)]
        assert run["keys_left"] <= 4  # at most the last two calls' keys of each process
        assert run["busy_after_dispatch"] and run["busy_after_exchange"], run["times"]
        assert run["agreed"] == [[0], [1]]
    assert runs[0]["late"] == (
        "processes did not agree at every_process call 52: process 1 of 2 did not answer within 1 s (it stopped, "
        "hangs, or took another path); see its log")


def test_distributed_settings_from_config_or_environment():
    import ml_collections
    import pytest

    from vidiff import distributed

    assert distributed.settings(None, environ={}) is None  # one process: nothing to start
    env = {"VIDIFF_COORDINATOR_ADDRESS": "10.0.0.1:1234", "VIDIFF_NUM_PROCESSES": "4", "VIDIFF_PROCESS_ID": "3"}
    assert distributed.settings(None, environ=env) == dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                                           process_id=3)
    assert distributed.settings(None, environ={"VIDIFF_DISTRIBUTED": "auto"}) == {}  # SLURM / MPI / TPU detection
    config = ml_collections.ConfigDict(dict(distributed=dict(coordinator_address="h:1", num_processes=2,
                                                             process_id=0)))
    assert distributed.settings(config, environ=env)["num_processes"] == 2  # the config wins
    with pytest.raises(ValueError, match="VIDIFF_PROCESS_ID=4 must be in \\[0, VIDIFF_NUM_PROCESSES=4\\)"):
        distributed.settings(None, environ={**env, "VIDIFF_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match="distributed: distributed.process_id not set"):
        distributed.settings(ml_collections.ConfigDict(dict(distributed=dict(coordinator_address="h:1",
                                                                             num_processes=2))), environ={})
    with pytest.raises(ValueError, match="must be host:port"):
        distributed.settings(None, environ={**env, "VIDIFF_COORDINATOR_ADDRESS": "localhost"})
    with pytest.raises(ValueError, match=r"^distributed.initialisation_timeout is not a distributed field; use one "
                                         r"of \['coordinator_address', .*'initialization_timeout'\]$"):
        distributed.settings(ml_collections.ConfigDict(dict(distributed=dict(initialisation_timeout=60))), environ={})


def test_start_up_names_the_processes_and_coordinator_it_waits_for(monkeypatch, capsys):
    """A process that never starts makes jax abort the others after initialization_timeout, naming neither it
    nor the coordinator: each process says first whom it waits for, where, and how long."""
    import jax
    import ml_collections

    from vidiff import distributed

    timeout = distributed.initialization_timeout
    assert timeout(None, environ={}) == 300  # jax's default
    assert timeout(None, environ={"VIDIFF_INITIALIZATION_TIMEOUT": "45"}) == 45
    config = ml_collections.ConfigDict(dict(distributed=dict(initialization_timeout=600)))
    assert timeout(config, environ={"VIDIFF_INITIALIZATION_TIMEOUT": "45"}) == 600  # the config wins
    with pytest.raises(ValueError, match=r"^VIDIFF_INITIALIZATION_TIMEOUT='5m' must be a whole number of seconds "
                                         r">= 1, e.g. 600$"):
        timeout(None, environ={"VIDIFF_INITIALIZATION_TIMEOUT": "5m"})
    with pytest.raises(ValueError, match=r"^distributed.initialization_timeout=0 must be a whole number"):
        timeout(ml_collections.ConfigDict(dict(distributed=dict(initialization_timeout=0))), environ={})

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    env = {"VIDIFF_COORDINATOR_ADDRESS": "10.0.0.1:1234", "VIDIFF_NUM_PROCESSES": "2", "VIDIFF_PROCESS_ID": "1"}
    for key, value in {**env, "VIDIFF_INITIALIZATION_TIMEOUT": "45"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.initialize()
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                          initialization_timeout=45)]
    assert capsys.readouterr().err == (
        "process 1 of 2: waiting for all 2 processes at 10.0.0.1:1234 (timeout 45 s: past it jax aborts with "
        "DEADLINE_EXCEEDED if a process has not started or cannot reach that address)\n")

    def times_out(**kwargs):  # jax 0.10 aborts the process instead; a version that raises gets one line
        raise RuntimeError("DEADLINE_EXCEEDED: Deadline Exceeded\n\nRPC: /xla.coordination.CoordinationService/"
                           "RegisterTask")
    monkeypatch.setattr(jax.distributed, "initialize", times_out)
    with pytest.raises(RuntimeError, match=r"^distributed: process 1 of 2 waited 45 s at 10.0.0.1:1234 and not "
                                           r"all 2 processes joined; check that each one started and can reach "
                                           r"that address, or raise distributed.initialization_timeout$"):
        distributed.initialize()


# --------------------------------------------------------------------------- the worker (one process)


def worker(out_path: str, ckpt_dir: str) -> None:
    from vidiff import distributed

    distributed.initialize()  # from VIDIFF_* in the environment; nothing for the reference run
    import jax
    import optax

    from vidiff import parallel
    from vidiff.models.dit import VideoDiT, dit_preset, init_params
    from vidiff.train.checkpoint import Checkpointer
    from vidiff.train.state import abstract_state, create_state, jit_train_step, make_train_step
    from vidiff.train.dit_loss import dit_flow_loss

    cfg = dit_preset("tiny", depth=1, text_dim=32, pooled_dim=32, attention_impl="ring")
    dit = VideoDiT(cfg)
    flow = types.SimpleNamespace(timestep_sampler="logit_normal", weighting="none")

    def loss_fn(params, batch, rng, frozen, step):
        return dit_flow_loss(dit, params, batch["latents"], batch, rng, flow, 1.0)

    init = functools.partial(init_params, cfg)
    mesh = parallel.make_mesh(data=2, fsdp=2, context=2)
    tx = optax.adamw(1e-2)
    state, shardings = create_state(init, tx, seed=0, mesh=mesh)
    rows = distributed.local_batch_size(BATCH)
    index = jax.process_index()

    def batch(step):  # the same global batch everywhere; this process loads only its rows
        rng = np.random.default_rng(step)
        full = {"latents": rng.standard_normal((BATCH, 3, 4, 4, cfg.latent_channels), np.float32),
                "text_tokens": rng.standard_normal((BATCH, 6, cfg.text_dim), np.float32),
                "text_lengths": rng.integers(2, 7, size=BATCH).astype(np.int32),
                "pooled": rng.standard_normal((BATCH, cfg.pooled_dim), np.float32)}
        return parallel.device_batch({k: v[index * rows:(index + 1) * rows] for k, v in full.items()}, mesh)

    batch_shardings = {k: v.sharding for k, v in batch(0).items()}
    step_fn = jit_train_step(make_train_step(loss_fn, tx, ema_decay=0.9), shardings, batch_shardings, {}, mesh)

    def run(state, steps):
        losses = []
        for step in steps:
            state, metrics = step_fn(state, batch(step), {})
            losses.append(float(metrics["loss"]))
        return state, losses

    checkpointer = Checkpointer(ckpt_dir, keep=2, keep_best=0)
    with jax.set_mesh(mesh), parallel.axis_rules():
        state, losses = run(state, range(SAVE_AT))
        checkpointer.save(SAVE_AT, state)
        checkpointer.wait()
        saved_params = parallel.gather(state.params)
        state, continued = run(state, range(SAVE_AT, STEPS))
        restored = checkpointer.restore(abstract_state(init, tx, mesh)[0], SAVE_AT)
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(parallel.gather(restored.params)),
                                                          jax.tree.leaves(saved_params)))
        _, again = run(restored, range(SAVE_AT, STEPS))
    checkpointer.close()
    Path(out_path).write_text(json.dumps(dict(
        processes=jax.process_count(), devices=jax.device_count(), local_rows=rows, losses=losses + continued,
        continued=continued, restored=again, restored_params_equal=bool(same))))


def data_ends(out_path: str, ckpt_root: str) -> None:
    """Finite data: process 0 has two batches, process 1 one; ask the loop for two. Then streaming data with
    two buckets: step 1 alike, step 2 a 2-frame batch on process 0 and a 1-frame one on process 1."""
    from vidiff import distributed

    distributed.initialize()
    import jax
    import ml_collections

    from vidiff.train.checkpoint import Checkpointer
    from vidiff.train.preflight import DataExhaustedError
    from vidiff.train.stopping import Missing, draw_batch, fail

    def next_batch(batches, step, stage, model, checkpointer, ledger, config):  # as the loop takes each step's batch
        batch = draw_batch(batches, step, config)
        if isinstance(batch, Missing):
            fail(batch, stage, model, checkpointer, ledger, config)
        return batch

    index = jax.process_index()
    batches = iter([{"id": np.array([f"batch {i} of process {index}"], object)} for i in range(2 - index)])
    config = ml_collections.ConfigDict(dict(data=dict(num_epochs=1)))
    stage = ml_collections.ConfigDict(dict(steps=5))
    checkpointer = Checkpointer(Path(ckpt_root) / "finite", keep=1, keep_best=0)
    first = str(next_batch(batches, 0, stage, "dit", checkpointer, None, config)["id"][0])
    try:
        second = str(next_batch(batches, 1, stage, "dit", checkpointer, None, config)["id"][0])
    except DataExhaustedError as error:
        second = str(error)

    clips = [np.zeros((1, 2, 4, 4, 3), np.uint8), np.zeros((1, 2 - index, 4, 4, 3), np.uint8)]
    batches = iter([{"video": video, "caption": np.array(["a"], object)} for video in clips])
    config = ml_collections.ConfigDict(dict(data=dict(num_epochs=None, buckets=["2x4x4", "1x4x4"])))
    checkpointer = Checkpointer(Path(ckpt_root) / "buckets", keep=1, keep_best=0)
    same_bucket = str(next_batch(batches, 0, stage, "dit", checkpointer, None, config)["video"].shape)
    try:
        other_bucket = next_batch(batches, 1, stage, "dit", checkpointer, None, config)
    except ValueError as error:
        other_bucket = str(error)
    Path(out_path).write_text(json.dumps(dict(first=first, second=second, same_bucket=same_bucket,
                                              other_bucket=other_bucket)))


def exchange(out_path: str) -> None:
    """``every_process`` 50 times; then once while ~3 s of device work runs; then process 1 comes late."""
    from vidiff import distributed

    distributed.initialize()
    import jax
    import jax.numpy as jnp
    from jax._src import distributed as jax_distributed

    index = jax.process_index()
    rows = [distributed.every_process([index, call, -call * index]).tolist() for call in range(50)]
    keys_left = len(jax_distributed.global_state.client.key_value_dir_get("vidiff/every_process"))

    busy = jax.jit(lambda x, n: jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ x), x))
    x = jnp.full((256, 256), 0.01)
    busy(x, 1).block_until_ready()
    began = time.perf_counter()
    busy(x, 20).block_until_ready()
    loops = int(3 / ((time.perf_counter() - began) / 20))
    distributed.every_process([0])  # both processes start the computation together
    began = time.perf_counter()
    y = busy(x, loops)
    busy_after_dispatch = not y.is_ready()
    agreed = distributed.every_process([index]).tolist()
    busy_after_exchange = not y.is_ready()
    exchange_s = time.perf_counter() - began
    y.block_until_ready()
    times = dict(exchange_s=exchange_s, busy_s=time.perf_counter() - began)

    distributed.EXCHANGE_TIMEOUT_S = 1
    if index == 1:
        time.sleep(4)
    try:
        late = distributed.every_process([index]).tolist()
    except RuntimeError as error:
        late = str(error)
    Path(out_path).write_text(json.dumps(dict(rows=rows, keys_left=keys_left, busy_after_dispatch=busy_after_dispatch,
                                              busy_after_exchange=busy_after_exchange, agreed=agreed, times=times,
                                              late=late)))


if __name__ == "__main__":
    if sys.argv[1] == "data-ends":
        data_ends(*sys.argv[2:4])
    elif sys.argv[1] == "exchange":
        exchange(sys.argv[2])
    else:
        worker(*sys.argv[1:3])
