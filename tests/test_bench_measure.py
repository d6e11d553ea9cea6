"""experiments/measure.py and the small benchmarks: timing, dispatch, isolated runs, out-of-memory, host memory,
traces and their kernel summary, compiled HLO; bench_dispatch.py, bench_update.py, bench_attention.py; that
no benchmark imports a package the GPU image lacks; and that the scripts refuse a bad flag or file in one line."""
import json
import os
import subprocess
import sys

import pytest

from bench_scripts import EXPERIMENTS, REPO, assert_positive, run_script, script_env


def test_benchmarks_import_without_data_or_torch_packages():
    """The GPU image has no grain, ml_collections or av: the scripts must not import them (nor torch)."""
    blocked = ["grain", "ml_collections", "av", "torch", "tensorflow", "tensorflow_datasets", "array_record",
               "orbax", "transformers", "tokenizers", "safetensors", "tqdm", "tensorboardX", "mediapy"]
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(EXPERIMENTS)!r})
import bench_goals
assert 'jax' not in sys.modules and 'torch' not in sys.modules  # the goals runner stays off the device
import bench_dit, bench_vae, bench_compare, bench_update, bench_attention, bench_dispatch, bench_max_tokens
"""
    env = script_env()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_strip_flags_removes_flags_with_their_values():
    import measure

    argv = ["--preset", "XL", "--sizes", "256", "--in-process", "--frames=17", "--scan"]
    kept = measure.strip_flags(argv, {"--sizes": 1, "--in-process": 0, "--frames": 1})
    assert kept == ["--preset", "XL", "--scan"]


def test_waited_steps_record_the_hosts_share(monkeypatch):
    """Each timed call: host seconds until the call returned, then the wait; on a fake clock."""
    import types

    import measure

    clock = {"now": 0.0}
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    class Output:
        def block_until_ready(self):
            clock["now"] += 0.25  # the device's work

    def dispatch():
        clock["now"] += 0.015  # argument checks and launch
        return Output()

    host_s = []
    times = measure.timed_runs(measure.waited_run(dispatch, host_s), warmup=2, steps=3)
    assert times == pytest.approx([0.265] * 3) and host_s == pytest.approx([0.015] * 5)  # warm-up calls too


def test_bench_dispatch_reports_each_argument_count(capsys):
    import bench_dispatch

    records = bench_dispatch.main(["--arrays", "3,40", "--steps", "2"])
    assert [(r["arrays"], r["steps"], r["backend"]) for r in records] == [(3, 2, "cpu"), (40, 2, "cpu")]
    assert all(0 < r["dispatch_ms"] <= r["waited_ms"] for r in records)
    assert records[1]["per_array_us"] == pytest.approx(records[1]["dispatch_ms"] * 1e3 / 40, abs=0.05)  # ms rounded to 1 us
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records
    assert "phases_ms" not in records[0]
    import trace_summary

    (traced,) = bench_dispatch.main(["--arrays", "300", "--steps", "2", "--phases"])  # 5 more calls, traced
    assert traced["traced_calls"] == 5 and traced["traced_call_ms"] > 0
    assert list(traced["phases_ms"]) == list(trace_summary.HOST_PHASES) and traced["phases_ms"]["graph_launch"] == 0
    with pytest.raises(SystemExit, match=r"^bench_dispatch.py: --arrays needs counts >= 1 \(got '0'\), --steps >= 1$"):
        bench_dispatch.main(["--arrays", "0"])


def test_run_isolated_returns_the_childs_last_record_or_why_there_is_none():
    import measure

    child = lambda code: [sys.executable, "-c", code]
    assert measure.run_isolated(child('print("log"); print(\'{"n": 1}\'); print(\'{"n": 2}\')'), 30) == {"n": 2}
    oom = measure.run_isolated(child('import sys; sys.exit("XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory")'), 30)
    assert oom == {"status": "oom", "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory"}
    # A record printed before a crash is not a result: the case failed.
    failed = measure.run_isolated(child('print(\'{"n": 1}\'); raise ValueError("bad shape")'), 30)
    assert failed == {"status": "error", "error": "ValueError: bad shape"}
    assert measure.run_isolated(child("import time; time.sleep(30)"), 0.5) == {"status": "timeout"}


def test_is_oom_reads_the_failure_not_allocator_warnings():
    import measure

    warning = ("W external/xla/tsl/framework/bfc_allocator.cc:310] Allocator (GPU_0_bfc) ran out of memory trying "
               "to allocate 2.1GiB. The caller indicates that this is not a failure, but this may mean that there "
               "could be performance gains if more memory were available. (out of memory)")
    other = f"{warning}\nTraceback (most recent call last):\n  File \"x.py\"\nRuntimeError: cuDNN error: bad param\n"
    assert not measure.is_oom(other) and measure.last_exception_line(other) == "RuntimeError: cuDNN error: bad param"
    xla = f"{warning}\njaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to " \
          "allocate 81.00GiB.\n"
    assert measure.is_oom(xla)
    assert measure.is_oom("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert measure.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8 bytes"))
    assert not measure.is_oom(RuntimeError("loss ran out of memory budget? no: NaN"))
    failed = measure.run_isolated([sys.executable, "-c", f"import sys; print({warning!r}, file=sys.stderr); "
                                   "raise ValueError('not finite')"], 30)
    assert failed == {"status": "error", "error": "ValueError: not finite"}


def test_host_peak_resets_and_sees_a_later_allocation():
    import numpy as np

    import measure

    held = np.ones(2**27, np.uint8)  # 128 MiB touched, then freed: a peak from before the reset
    del held
    base = measure.reset_host_peak()
    if base is None:
        pytest.skip("no /proc/self/clear_refs on this system")
    assert measure.proc_status_gib("VmHWM") < base + 0.05  # the old peak is gone
    held = np.ones(2**26, np.uint8)  # 64 MiB
    assert measure.proc_status_gib("VmHWM") - base == pytest.approx(64 / 1024, abs=0.02)
    assert held.sum() == 2**26  # still held when the mark was read


def test_cudnn_attention_kernels_are_counted_forward_and_backward():
    import measure

    # The shape of XLA:GPU's compiled HLO: a forward and a backward fused-attention custom call, and the
    # forward again (what remat "block" does), among other custom calls.
    hlo = "\n".join([
        '%fmha.1 = (bf16[1,8,4,16]{3,2,1,0}, f32[1,4,8]{2,1,0}) custom-call(%q, %k, %v), '
        'custom_call_target="__cudnn$fmhaSoftmax", backend_config={}',
        '%gemm.2 = bf16[8,64]{1,0} custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"',
        '%fmha.3 = (bf16[1,8,4,16]{3,2,1,0}, f32[1,4,8]{2,1,0}) custom-call(%q, %k, %v), '
        'custom_call_target="__cudnn$fmhaSoftmax"',
        '%fmha.4 = (bf16[1,8,4,16]{3,2,1,0}, bf16[1,8,4,16]{3,2,1,0}) custom-call(%q, %k, %v, %o, %s, %g), '
        'custom_call_target="__cudnn$fmhaSoftmaxBackward"',
    ])
    assert measure.cudnn_attention_kernels(hlo) == {"forward": 2, "backward": 1}
    assert measure.cudnn_attention_kernels('custom_call_target="__cublas$gemm"') == {"forward": 0, "backward": 0}


def test_profiled_runs_leave_oversized_traces_behind(tmp_path):
    import measure

    copied, left, kernels = measure.profiled_runs(lambda: None, 1, str(tmp_path), "tiny", max_bytes=0)
    assert copied == [] and list(tmp_path.iterdir()) == []
    assert sorted(n.split(" ")[0] for n in left) == ["tiny.trace.json.gz", "tiny.xplane.pb"]
    assert all(n.endswith("MiB > 0 MiB)") for n in left)
    # Read from the trace left behind: a CPU run has no GPU kernels, and nothing jitted was called.
    assert kernels == {"kernels": 0, "host": {"calls": 0}}


def test_the_steady_queued_rate_cancels_a_runs_fixed_costs(monkeypatch):
    """A fake device: each call starts its 10 ms of work 30 ms after it is made (the launch) or when the
    work before it ends; waiting returns when the last work ends. A run of n calls then takes 30 + 10 n ms,
    which ``step_s_pipelined`` spreads over n and ``step_s_steady`` cancels."""
    import measure

    clock = {"now": 0.0, "free": 0.0}
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock["now"])

    class Pending:
        def block_until_ready(self):
            clock["now"] = max(clock["now"], clock["free"])

    def dispatch():
        clock["free"] = max(clock["free"], clock["now"] + 0.030) + 0.010
        return Pending()

    queued = measure.queued_step_s(dispatch, 5)
    assert queued["step_s_pipelined"] == pytest.approx((0.030 + 5 * 0.010) / 5)
    assert queued["step_s_steady"] == pytest.approx(0.010)
    calls = []
    queued = measure.queued_step_s(lambda: calls.append(1) or dispatch(), 5, steady=False)  # long steps: one run
    assert (len(calls), queued["step_s_steady"]) == (5, None)
    assert queued["step_s_pipelined"] == pytest.approx((0.030 + 5 * 0.010) / 5)
    # Steps shorter than the timer's noise: the run twice as long came out no slower, so no rate (not a negative one).
    for spans in ((0.25, 0.125), (0.25, 0.25)):  # (exact in binary)
        ends = iter([0.0, spans[0], 1.0, 1.0 + spans[1]])
        monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ends))
        queued = measure.queued_step_s(lambda: Pending(), 2)
        assert queued == {"step_s_pipelined": pytest.approx(spans[0] / 2), "step_s_steady": None}


def test_queued_steps_are_dispatched_back_to_back_and_traced_as_one_run(tmp_path):
    import gzip

    import jax
    import jax.numpy as jnp
    import measure

    log = []

    class Pending:
        def block_until_ready(self):
            log.append("wait")

    def dispatch():
        log.append("call")
        return Pending()

    measure.queued_run(dispatch, 3)()
    assert log == ["call", "call", "call", "wait"]
    add_one, x = jax.jit(lambda v: v + 1), jnp.ones(4)
    add_one(x).block_until_ready()  # compiled before the trace: a compiling call parses its arguments twice
    _, _, kernels = measure.profiled_runs(measure.queued_run(lambda: add_one(x), 3), 1, str(tmp_path), "q",
                                          steps_per_run=3)
    events = json.loads(gzip.decompress((tmp_path / "q.trace.json.gz").read_bytes()))["traceEvents"]
    assert [e["args"]["step_num"] for e in events if e.get("name") == "q"] == ["0"]  # one traced run ...
    assert sum(e.get("name") == "ParseArguments" for e in events) == 3  # ... of three calls
    assert kernels["kernels"] == 0 and kernels["host"]["calls"] == 3  # a CPU trace: the calls' host side alone


def test_trace_summary_sums_a_steps_gpu_kernels_by_kind(tmp_path):
    """A Chrome trace as jax.profiler writes it on a GPU: kernels on stream threads, the same time again in the
    'XLA Ops' row of the GPU process, and host events, over two steps."""
    import gzip

    import trace_summary

    meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0 (NVIDIA H200)")),
            dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU")),
            dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #13(Compute)")),
            dict(ph="M", name="thread_name", pid=1, tid=8, args=dict(name="XLA Ops"))]
    step = [("sm90_xmma_gemm_bf16bf16_bf16f32", 300.0), ("nvjet_tst_128x256", 100.0),
            ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 250.0), ("loop_add_fusion_3", 30.0),
            ("loop_add_fusion_4", 10.0), ("input_reduce_fusion", 10.0)]
    kernels = [dict(ph="X", pid=1, tid=7, name=name, ts=0, dur=dur) for name, dur in step * 2]
    doubles = [dict(ph="X", pid=1, tid=8, name="fusion.12", ts=0, dur=700.0)] * 2  # same time, XLA's op names
    host = [dict(ph="X", pid=2, tid=1, name="PjitFunction(step)", ts=0, dur=5000.0)]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + kernels + doubles + host}, f)
    summary = trace_summary.summarize_file(path, steps=2, top=2)
    assert summary["kernels"] == 6 and summary["total_ms"] == pytest.approx(0.7)
    assert summary["kinds"] == {"matmul": {"ms": 0.4, "share": pytest.approx(4 / 7, abs=1e-4)},
                                "attention": {"ms": 0.25, "share": pytest.approx(2.5 / 7, abs=1e-4)},
                                "other": {"ms": 0.05, "share": pytest.approx(0.5 / 7, abs=1e-4)}}
    assert summary["top"] == [dict(name="sm90_xmma_gemm_bf16bf16_bf16f32", kind="matmul", ms=0.3, calls=1),
                              dict(name="cudnn_generated_fort_native_sdpa_sm90_flash_fprop", kind="attention",
                                   ms=0.25, calls=1)]
    cpu = trace_summary.summarize({"traceEvents": meta[1:2] + host})  # a CPU trace: the host's side alone
    assert cpu == {"kernels": 0, "host": {"calls": 1, "call_ms": 5.0, "to_first_kernel_ms": None, "gpu_span_ms": None,
                                          "gpu_idle_between_ms": None,
                                          "phases_ms": dict.fromkeys(trace_summary.HOST_PHASES, 0.0)}}
    # With the program's HLO, the "other" kernels by JAX source path, the two blocks' adds as one row.
    hlo = "\n".join(["HloModule jit_step", "ENTRY %main {",
                     '  %loop_add_fusion.3 = f32[4]{0} fusion(%p), metadata={op_name="jit(step)/blocks_0/add"}',
                     '  ROOT %loop_add_fusion.4 = f32[4]{0} fusion(%q), metadata={op_name="jit(step)/blocks_11/add"}',
                     "}"])
    (tmp_path / "step.hlo.txt").write_text(hlo)
    summary = trace_summary.main([str(path), "--steps", "2", "--hlo", str(tmp_path / "step.hlo.txt")])
    assert summary["other_by_op"] == [dict(op="jit(step)/blocks_N/add", ms=0.04, calls=2),
                                      dict(op="(not an HLO instruction)", ms=0.01, calls=1)]


def test_trace_summary_times_the_host_side_of_each_call():
    """Two calls queued back to back, each traced at two levels (nested events), with the PJRT phases inside
    them: the first call's last kernel runs after the second call has started, and is still counted as the
    first call's, by the correlation id that links each kernel to the launch that made it."""
    import trace_summary

    meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
            dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #14(Compute)"))]
    host, kernels = [], []
    for cid, begin, launch_ms in (("1", 0, 10.0), ("2", 45_000, 14.0)):
        host += [dict(ph="X", pid=2, tid=3, name="PjitFunction(jit(step))", ts=begin, dur=40_000.0),
                 dict(ph="X", pid=2, tid=3, name="PjitFunction(jit(step))", ts=begin + 1, dur=39_000.0),
                 dict(ph="X", pid=2, tid=3, name="ParseArguments", ts=begin + 10, dur=2_000.0),
                 dict(ph="X", pid=2, tid=3, name="PjRtCApiLoadedExecutable::Execute", ts=begin + 3_010, dur=30_000.0),
                 dict(ph="X", pid=2, tid=3, name="cuGraphLaunch (CudaGraph:7)", ts=begin + 5_000, dur=launch_ms * 1e3,
                      args=dict(correlation_id=cid)),
                 dict(ph="X", pid=2, tid=4, name="cuGraphLaunch (CudaGraph:7)", ts=begin, dur=99e3)]  # another thread
    for cid, ts, dur in (("1", 12_000, 30_000.0), ("1", 60_000, 5_000.0), ("2", 65_000, 30_000.0),
                         ("2", 95_000, 5_000.0)):
        kernels.append(dict(ph="X", pid=1, tid=7, name="nvjet_a", ts=ts, dur=dur, args=dict(correlation_id=cid)))
    summary = trace_summary.summarize({"traceEvents": meta + host + kernels}, steps=2)
    assert summary["kernels"] == 2
    # Call 1: first kernel at 12 ms, GPU 12-65; call 2 (starts at 45): first kernel at 65 (20 ms), GPU 65-100.
    assert summary["host"] == {"calls": 2, "call_ms": 40.0, "to_first_kernel_ms": 16.0, "gpu_span_ms": 44.0,
                               "gpu_idle_between_ms": 0.0,
                               "phases_ms": {"parse_arguments": 2.0, "args_to_execute": 1.0, "handle_inputs": 0.0,
                                             "build_allocations": 0.0, "execute_thunks": 0.0,
                                             "graph_initialize": 0.0, "graph_update": 0.0, "graph_launch": 12.0}}
    # Without the ids a kernel belongs to the call it follows: call 1's 60 ms kernel goes to call 2.
    for event in host + kernels:
        event.pop("args", None)
    host_side = trace_summary.summarize({"traceEvents": meta + host + kernels}, steps=2)["host"]
    assert (host_side["to_first_kernel_ms"], host_side["gpu_span_ms"], host_side["gpu_idle_between_ms"]) == (
        13.5, 35.0, 18.0)
    assert trace_summary.host_timeline([], []) == {"calls": 0}
    cpu = trace_summary.host_timeline(host, [])  # no GPU: the host's side only
    assert (cpu["calls"], cpu["call_ms"], cpu["to_first_kernel_ms"], cpu["gpu_idle_between_ms"]) == (
        2, 40.0, None, None)


def test_trace_summary_reads_the_h200_trace_of_call_5():
    """The trace kept from a real H200 run (experiments/PERF.md, calls 5-7): one unscanned XL training step."""
    import trace_summary

    path = EXPERIMENTS / "results" / "h200_2026-12-04" / "call5_train_4x4096.trace.json.gz"
    summary = trace_summary.summarize_file(path)
    assert summary["kernels"] == 5381 and summary["total_ms"] == pytest.approx(241.2, abs=0.05)
    host = summary["host"]
    assert host["calls"] == 1 and host["call_ms"] == pytest.approx(44.2, abs=0.05)
    assert host["to_first_kernel_ms"] == pytest.approx(15.6, abs=0.05)
    assert host["gpu_span_ms"] == pytest.approx(242.8, abs=0.05)
    assert host["phases_ms"]["graph_launch"] == pytest.approx(17.2, abs=0.05)
    assert host["phases_ms"]["parse_arguments"] == pytest.approx(2.6, abs=0.05)
    assert (host["phases_ms"]["graph_initialize"], host["phases_ms"]["graph_update"]) == pytest.approx(
        (0.35, 0.20), abs=0.01)  # the graph kept its buffers' addresses: nothing re-recorded


def test_bench_update_times_every_guard_variant():
    lines = run_script("bench_update.py", "--params", "2e5", "--leaves", "4", "--steps", "1")
    assert [r["variant"] for r in lines] == ["where", "cond", "no_guard", "no_ema", "adamw"]
    for record in lines:
        assert record["params"] == 4 * 48 * 1024  # 2e5 // 4 // 1024 = 48 rows of 1024 per leaf
        assert_positive(record, "step_ms", "grad_ms", "copy_GBps", "fusions")
        assert record["update_ms"] == pytest.approx(record["step_ms"] - record["grad_ms"])


def test_bench_attention_times_each_impl_and_mode():
    lines = run_script("bench_attention.py", "--impls", "xla,chunked", "--tokens", "32", "--heads", "2",
                       "--head-dim", "8", "--batch", "2", "--steps", "1", "--warmup", "0", "--pad-head-dim", "16")
    assert [(r["impl"], r["mode"], r["pad_head_dim"]) for r in lines] == [
        (i, m, pad) for i, pads in (("xla", (None, 16)), ("chunked", (None,))) for pad in pads
        for m in ("forward", "train")]  # heads padded for xla and cudnn only
    for record in lines:
        assert record["status"] == "ok" and record["dtype"] == "float32" and record["tokens"] == 32
        flops = 4 * 2 * 32**2 * 2 * 8 * (3 if record["mode"] == "train" else 1)
        assert record["tflops"] == pytest.approx(flops / (record["ms"] / 1e3) / 1e12, rel=0.01)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    bench = [sys.executable, str(EXPERIMENTS / "bench_attention.py")]
    done = subprocess.run([*bench, "--impls", "flash"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "--impls: attention_impl: unknown 'flash'; valid: None (auto), ['xla', 'cudnn', 'chunked', 'context_local', "
        "'ulysses', 'ring']"]
    done = subprocess.run([*bench, "--pad-head-dim", "64"], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=env)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "--pad-head-dim: every size must be >= --head-dim 72, got [64]"]
    done = subprocess.run([*bench, "--impls", "torch"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    (line,) = done.stderr.strip().splitlines()  # the peer's kernel: PyTorch with CUDA, absent here
    assert done.returncode == 1 and line.startswith("--impls torch: PyTorch ") and ("CUDA" in line or "GPU" in line)
    done = subprocess.run([*bench, "--context", "3"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == 1 and done.stderr.strip().endswith(
        "on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=3")
    done = subprocess.run([*bench, "--impls", "ring", "--context", "2", "--modes", "train", "--tokens", "64", "--heads",
                           "2", "--head-dim", "8", "--steps", "1", "--warmup", "0"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    (ring,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert (ring["impl"], ring["context"], ring["status"]) == ("ring", 2, "ok") and ring["ms"] > 0


@pytest.mark.parametrize("script, flags, message", [
    ("bench_attention", ["--tokens", "abc"], "--tokens: 'abc' is not a comma-separated list of ints"),
    ("bench_attention", ["--pad-head-dim", "x"], "--pad-head-dim: 'x' is not a comma-separated list of ints"),
    ("bench_attention", ["--tokens", "0"], "--tokens: lengths must be >= 1, got [0]"),
    ("bench_attention", ["--dtype", "foo"], "argument --dtype: invalid choice: 'foo' (choose from 'bfloat16', "
                                            "'float32', 'float16')"),
    ("bench_dispatch", ["--arrays", "abc"], "--arrays: 'abc' is not a comma-separated list of ints"),
    ("bench_data", ["--clips", "0"], "--clips must be >= 1, got 0"),
    ("bench_data", ["--size", "0", "--clips", "2"], "--size must be >= 1, got 0"),
    ("trace_summary", ["t.json", "--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_scripts_refuse_a_malformed_flag_in_one_line(script, flags, message, capsys):
    """Through the parser (usage, then "<prog>: error: ..."), before anything compiles or reads a file."""
    import importlib

    with pytest.raises(SystemExit) as exit:
        importlib.import_module(script).main(flags)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.strip().splitlines()[-1].endswith(f": error: {message}"), err
    assert "Traceback" not in err


def test_scripts_refuse_a_missing_or_wrong_file_in_one_line(tmp_path, capsys):
    """What the run itself finds wrong (a file, a workdir) is one line and status 2, as vidiff's command says it."""
    import bundle_world_tiny
    import trace_summary

    cases = [
        (trace_summary, [str(tmp_path / "none.trace.json.gz")],
         f"trace_summary.py: error: [Errno 2] No such file or directory: '{tmp_path / 'none.trace.json.gz'}'"),
        (trace_summary, [str(EXPERIMENTS / "PERF.md")],
         f"trace_summary.py: error: {EXPERIMENTS / 'PERF.md'} is not a jax.profiler trace (*.trace.json.gz or "
         ".json): Expecting value: line 1 column 1 (char 0)"),
        (bundle_world_tiny, ["--skip-train", "--workdir", str(tmp_path / "run")],
         f"bundle_world_tiny.py: error: --skip-train: {tmp_path / 'run'} has no vae/metrics.jsonl, "
         "dit/metrics.jsonl, export/vae.safetensors, export/dit.safetensors, export/vidiff.json; give --workdir a "
         "finished world_tiny run, or leave out --skip-train to train one"),
    ]
    for module, argv, message in cases:
        with pytest.raises(SystemExit) as exit:
            module.main(argv)
        assert (exit.value.code, capsys.readouterr().err.splitlines()) == (2, [message])
    # The script as a command: that one line is all of stderr.
    done = subprocess.run([sys.executable, str(EXPERIMENTS / "trace_summary.py"), str(EXPERIMENTS / "PERF.md")],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=script_env())
    assert (done.returncode, done.stderr.splitlines()) == (2, [cases[1][2]])
