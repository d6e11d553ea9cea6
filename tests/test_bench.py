"""Smoke tests of the benchmark scripts (experiments/bench_dit.py, bench_vae.py, bench_compare.py, bench_goals.py,
bench_update.py).

Each script runs in a subprocess at tiny CPU settings, as it would be run on the
GPU machine, and its JSON lines are checked for the keys the performance notes
rely on and for positive numbers. The FLOP count is checked against a hand
computation of the peer's formula; the compare wrapper runs against fake peer
and vidiff commands (torch is not installed here).
"""
import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

TRAIN_KEYS = {"impl", "mode", "status", "batch", "tokens", "latent_shape", "text", "dim", "heads", "layers",
              "params_M", "init_s", "compile_s", "process_s", "step_s", "tokens_per_s", "model_tflops", "mfu",
              "peak_tflops", "step_s_pipelined", "tokens_per_pipelined_s", "dispatch_s", "hlo",
              "peak_mem_GiB", "compiled_mem_GiB", "cudnn_attention", "cudnn_attention_kernels", "remat", "scan",
              "dtype", "mesh"}


def run_script(name: str, *args: str, timeout: float = 240) -> list[dict]:
    """Run ``experiments/<name>`` on one CPU device; its stdout JSON lines."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           # One device: the conftest's 8 virtual devices would only slow these single-device runs.
           "XLA_FLAGS": "", "JAX_DEFAULT_PRNG_IMPL": "rbg"}  # rbg compiles faster on CPU than threefry
    done = subprocess.run([sys.executable, str(EXPERIMENTS / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def assert_positive(record: dict, *keys: str):
    for key in keys:
        assert isinstance(record[key], (int, float)) and record[key] > 0 and math.isfinite(record[key]), (key, record)


# --------------------------------------------------------------------------- FLOPs and shapes


def test_dit_flops_match_the_peer_formula_by_hand():
    from vidiff.models.dit import dit_flops, dit_preset

    # XL at 4 x 4096 tokens, 128 text tokens: d = 1152, r = 4, 28 layers.
    d, T, L = 1152, 4096, 128
    per_layer = (T * (4 * d**2 + 8 * d**2 + 2 * d**2)  # qkv+o, MLP (2 r d^2), cross q+o
                 + L * 2 * d**2  # cross k, v of the text
                 + 2 * T**2 * d + 2 * T * L * d)  # scores and values, self and cross
    # 76_101_451_776 + 339_738_624 + 38_654_705_664 + 1_207_959_552 multiply-adds per layer and sample
    assert per_layer == 116_303_855_616
    train = 2 * per_layer * 28 * 4 * 3
    assert train == 78_156_190_973_952  # ~78.2 PFLOP per training step
    cfg = dit_preset("XL")
    assert dit_flops(cfg, T, L, batch=4, training=True) == train
    assert dit_flops(cfg, T, L, batch=4, training=False) * 3 == train


def test_token_count_maps_to_a_latent_shape():
    import bench_dit

    assert bench_dit.latent_shape_for(4096, (1, 2, 2)) == (16, 32, 32)
    assert bench_dit.latent_shape_for(256, (1, 2, 2)) == (4, 16, 16)
    assert bench_dit.latent_shape_for(16384, (1, 2, 2)) == (16, 64, 64)
    for tokens in (1, 7, 32, 1000, 8192, 65536):
        assert bench_dit.tokens_of(bench_dit.latent_shape_for(tokens, (1, 2, 2)), (1, 2, 2)) == tokens
    with pytest.raises(ValueError, match="latent-shape"):
        bench_dit.tokens_of((3, 32, 32), (2, 2, 2))


def test_strip_flags_removes_flags_with_their_values():
    import measure

    argv = ["--preset", "XL", "--tokens", "4096", "--max-tokens-search", "--batch=2", "--scan"]
    kept = measure.strip_flags(argv, {"--tokens": 1, "--max-tokens-search": 0, "--batch": 1})
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
import bench_dit, bench_vae, bench_compare, bench_update, bench_attention, bench_dispatch
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------- bench_dit


def test_bench_dit_forward_tiny():
    (record,) = run_script("bench_dit.py", "--tiny", "--mode", "forward", "--steps", "2", "--warmup", "1")
    assert TRAIN_KEYS <= set(record)
    assert record["impl"] == "vidiff" and record["mode"] == "forward" and record["status"] == "ok"
    assert record["latent_shape"] == [2, 8, 8] and record["tokens"] == 32
    assert_positive(record, "params_M", "step_s", "tokens_per_s", "model_tflops", "mfu", "init_s", "compile_s")
    assert record["process_s"] > record["init_s"] + record["compile_s"] + 3 * record["step_s_min"]
    assert record["cudnn_attention"] is False  # CPU: XLA attention
    assert record["init_on"] == "device"  # auto: the host builds the parameters for accelerators only
    assert record["peak_mem_GiB"] is None  # the CPU backend keeps no memory stats


def test_bench_dit_refuses_a_model_flag_in_one_line():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_dit.py"), "--tiny", "--pad-head-dim", "8"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "bench_dit.py: attention_head_pad: must be 0 (off) or an int >= head_dim 16 with attention_impl None, "
        "'xla' or 'cudnn'; got 8 with None"]


def test_out_of_memory_is_reported_as_a_result(monkeypatch, capsys):
    import bench_dit

    def exhausted(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.00GiB.\nmore detail")

    monkeypatch.setattr(bench_dit, "bench_forward", exhausted)
    # 8 virtual CPU devices in this process (conftest): batch 8 fills the data axis.
    (record,) = bench_dit.run_modes(bench_dit.parse_args(["--tiny", "--mode", "forward", "--batch", "8"]))
    assert record["status"] == "oom" and record["error"].startswith("RESOURCE_EXHAUSTED")
    assert json.loads(capsys.readouterr().out)["status"] == "oom"
    monkeypatch.setattr(bench_dit, "bench_forward", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else is a bug, not a measurement
        bench_dit.run_modes(bench_dit.parse_args(["--tiny", "--mode", "forward", "--batch", "8"]))


def test_cudnn_attention_kernels_are_counted_forward_and_backward():
    import bench_dit

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
    assert bench_dit.cudnn_attention_kernels(hlo) == {"forward": 2, "backward": 1}
    assert bench_dit.cudnn_attention_kernels('custom_call_target="__cublas$gemm"') == {"forward": 0, "backward": 0}


@pytest.mark.slow
def test_bench_dit_train_tiny_with_remat_and_scan(tmp_path):
    record, profile = run_script("bench_dit.py", "--tiny", "--mode", "train", "--remat", "block", "--scan",
                                 "--latent-shape", "1,8,8", "--steps", "1", "--warmup", "1", "--profile",
                                 str(tmp_path), "--profile-steps", "2", "--dump-hlo", str(tmp_path / "hlo"))
    assert TRAIN_KEYS <= set(record) and record["update"] == "full"
    assert record["hlo"] == str(tmp_path / "hlo" / "train_2x16.hlo.txt.gz")  # names a trace's fusions
    assert gzip.decompress(Path(record["hlo"]).read_bytes()).decode().startswith("HloModule jit_step")
    assert record["tokens_per_pipelined_s"] == pytest.approx(2 * 16 / record["step_s_pipelined"])
    assert 0 < record["dispatch_s"] < record["step_s"]  # the host's part of a waited step
    # Two more steps traced after the timing record, on a line of their own, the files copied flat (a device call
    # returns no deeper).
    assert (profile["mode"], profile["of_mode"], profile["status"], profile["left_behind"]) == (
        "profile", "train", "ok", [])
    assert sorted(Path(p).name for p in profile["files"]) == ["train_2x16.trace.json.gz", "train_2x16.xplane.pb"]
    events = json.loads(gzip.decompress((tmp_path / "train_2x16.trace.json.gz").read_bytes()))["traceEvents"]
    assert sorted({int(e["args"]["step_num"]) for e in events if e.get("name") == "train_2x16"}) == [0, 1]
    assert record["mode"] == "train" and record["status"] == "ok"
    assert record["remat"] == "block" and record["scan"] is True and record["tokens"] == 16
    assert record["cudnn_attention"] is False and record["cudnn_attention_kernels"] == {"forward": 0, "backward": 0}
    assert_positive(record, "params_M", "step_s", "tokens_per_s", "model_tflops", "mfu", "compile_s")
    from vidiff.models.dit import dit_flops, dit_preset

    flops = dit_flops(dit_preset("tiny"), 16, record["text"], batch=record["batch"], training=True)
    assert record["model_tflops"] == pytest.approx(flops / record["step_s"] / 1e12)


def test_max_tokens_search_doubles_until_a_length_does_not_fit(monkeypatch):
    """The search's logic, with each length's child run faked (a real child is a plain bench_dit.py train run,
    tested above): 16 and 32 tokens train, 64 runs out of memory, so 32 is the answer."""
    import bench_dit
    import measure

    children = []

    def fake_run(cmd, capture_output, text, timeout):
        children.append(cmd)
        tokens = int(cmd[cmd.index("--tokens") + 1])
        if tokens <= 32:
            line = json.dumps(dict(mode="train", status="ok", step_s=0.01 * tokens, tokens_per_s=100.0, mfu=0.5,
                                   peak_mem_GiB=tokens / 16))
            return subprocess.CompletedProcess(cmd, 0, stdout=line + "\n", stderr="")
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory")

    monkeypatch.setattr(measure.subprocess, "run", fake_run)
    argv = ["--tiny", "--max-tokens-search", "--search-start", "16", "--scan", "--tokens", "999", "--steps", "3"]
    record = bench_dit.max_tokens_search(bench_dit.parse_args(argv), argv)
    assert record["max_tokens"] == 32 and record["mode"] == "max_tokens_search"
    assert [(t["tokens"], t["status"], t["peak_mem_GiB"]) for t in record["tried"]] == [
        (16, "ok", 1.0), (32, "ok", 2.0), (64, "oom", None)]
    assert "RESOURCE_EXHAUSTED" in record["tried"][2]["error"]
    # Each child is a valid bench_dit.py command: one length, batch 1, the search's remat, other flags kept.
    child = bench_dit.parse_args(children[0][2:])
    assert (child.tokens, child.batch, child.mode, child.remat, child.steps) == (16, 1, "train", "block", 3)
    assert child.scan and child.tiny and not child.max_tokens_search


# --------------------------------------------------------------------------- bench_vae


def test_vae_summary_ratio_and_goal():
    import bench_vae

    rows = [dict(op="decode", way="chunked", size=256, frames=f, status="ok", peak_mem_GiB=p)
            for f, p in ((17, 2.0), (65, 2.1), (257, 2.2))]
    rows.append(dict(op="decode", way="oneshot", size=256, frames=17, status="ok", peak_mem_GiB=3.0))
    rows.append(dict(op="decode", way="oneshot", size=256, frames=257, status="oom", peak_mem_GiB=70.0))
    by_way = {s["way"]: s for s in bench_vae.summaries(rows)}
    assert by_way["chunked"]["peak_ratio"] == pytest.approx(1.1) and by_way["chunked"]["met"] is True
    assert by_way["chunked"]["memory"] == "device" and by_way["chunked"]["peak_GiB"] == [2.0, 2.2]
    assert by_way["oneshot"]["peak_ratio"] is None  # the long one-shot clip did not fit


def test_vae_summary_uses_host_memory_without_device_stats():
    import bench_vae

    rows = [dict(op="decode", way=way, size=32, frames=f, status="ok", peak_mem_GiB=None, host_run_GiB=run)
            for way, f, run in (("chunked", 5, 0.5), ("chunked", 9, 0.65), ("oneshot", 5, 0.5), ("oneshot", 9, 1.5))]
    by_way = {s["way"]: s for s in bench_vae.summaries(rows)}
    assert by_way["chunked"]["memory"] == "host_run" and by_way["chunked"]["peak_ratio"] == pytest.approx(1.3)
    assert by_way["chunked"]["met"] is False and by_way["oneshot"]["peak_ratio"] == pytest.approx(3.0)


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


@pytest.mark.slow
def test_bench_vae_tiny_decode_oneshot_and_chunked():
    lines = run_script("bench_vae.py", "--tiny", "--in-process", "--ops", "decode")
    cases = [r for r in lines if r.get("kind") != "summary"]
    summaries = [r for r in lines if r.get("kind") == "summary"]
    assert {(r["way"], r["frames"]) for r in cases} == {(w, f) for w in ("oneshot", "chunked") for f in (5, 9)}
    for record in cases:
        assert record["status"] == "ok" and record["isolated"] is False
        assert_positive(record, "time_s", "frames_per_s", "host_peak_GiB")
        assert record["host_run_GiB"] >= 0 and record["peak_mem_GiB"] is None
    chunked = next(s for s in summaries if s["way"] == "chunked")
    assert chunked["frames"] == [5, 9] and chunked["memory"] == "host_run"
    assert chunked["peak_ratio"] > 0 and chunked["met"] == (chunked["peak_ratio"] <= 1.2)


@pytest.mark.slow
def test_bench_vae_isolated_case_runs_in_a_subprocess():
    (record,) = run_script("bench_vae.py", "--tiny", "--ops", "encode", "--ways", "chunked", "--frames", "5")
    assert record["status"] == "ok" and record["isolated"] is True and record["op"] == "encode"
    assert record["chunk"] == 4 and record["latent_shape"] == [2, 8, 8]
    assert_positive(record, "time_s", "frames_per_s")


# --------------------------------------------------------------------------- bench_compare

FAKE = """
import argparse, json, sys
p = argparse.ArgumentParser()
p.add_argument("--batch", type=int); p.add_argument("--tokens", type=int); p.add_argument("--mode")
a, _ = p.parse_known_args()
impl, speed = sys.argv[1], float(sys.argv[2])
modes = {"both": ["forward", "train"], None: [None]}.get(a.mode, [a.mode])
for mode in modes:
    rec = dict(impl=impl, batch=a.batch, tokens=a.tokens, step_s=1.0, tokens_per_s=speed * a.batch * a.tokens,
               model_tflops=1.0, peak_mem_GiB=2.0)
    if mode:
        rec.update(mode=mode, status="ok", mfu=0.5, cudnn_attention=False)
    print(json.dumps(rec))
"""


def run_compare(tmp_path, *args: str, peer_train: str | None = None, peer_forward: str | None = None
                ) -> tuple[dict, str]:
    """``bench_compare.py --tiny`` against fake vidiff / peer commands (speeds 3, 2, 4); its report and stdout."""
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    out = tmp_path / "compare.json"
    prefix = f"{sys.executable} {fake}"
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "bench_compare.py"), "--tiny", *args,
         "--vidiff-cmd", f"{prefix} vidiff 3", "--peer-cmd", peer_train or f"{prefix} torch 2",
         "--peer-forward-cmd", peer_forward or f"{prefix} torch 4", "--out", str(out)],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_bench_compare_with_fake_runs(tmp_path):
    report, stdout = run_compare(tmp_path, "--steps", "1", "--warmup", "1")
    assert "vidiff/peer" in stdout and "vidiff queued tok/s" in stdout  # queued: bench_dit's step_s_pipelined
    got = {(r["config"], r["mode"]): r for r in report["results"]}
    assert set(got) == {(c, m) for c in ("2x32", "1x64") for m in ("train", "forward")}
    assert got["2x32", "train"]["ratio_tokens_per_s"] == pytest.approx(1.5)
    assert got["2x32", "forward"]["ratio_tokens_per_s"] == pytest.approx(0.75)
    assert got["2x32", "train"]["peer"]["mfu"] == pytest.approx(1.0 / report["peak_tflops"])
    remat = got["1x64", "train"]["commands"]
    assert "--remat attention" in remat["vidiff"] and remat["peer_train"].endswith("--remat")
    assert "--remat" not in got["2x32", "train"]["commands"]["peer_train"]


def test_bench_compare_records_a_failing_peer(tmp_path):
    report, _ = run_compare(tmp_path, "--configs", "2x32", "--modes", "train",
                            peer_train=f"{sys.executable} -c 'raise SystemExit(3)'")
    (result,) = report["results"]
    assert result["peer"]["status"] == "error" and result["peer"]["returncode"] == 3
    assert result["ratio_tokens_per_s"] is None and result["vidiff"]["status"] == "ok"


# --------------------------------------------------------------------------- bench_goals


def run_goals(tmp_path, *args: str) -> tuple[list[dict], str]:
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    prefix = f"{sys.executable} {fake}"
    out = tmp_path / "goals"
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "bench_goals.py"), "--tiny", "--out-dir", str(out),
         "--vidiff-cmd", f"{prefix} vidiff 3", "--peer-cmd", f"{prefix} torch 2",
         *([] if "--peer-forward-cmd" in args else ["--peer-forward-cmd", f"{prefix} torch 4"]), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["goals.jsonl", "goals.log", "goals.md"]
    lines = [json.loads(line) for line in (out / "goals.jsonl").read_text().splitlines()]
    assert (out / "goals.md").read_text().strip() == done.stdout.strip()
    return lines, done.stdout


def job_named(bench_goals, name: str):
    return next(job for job in bench_goals.JOBS if job.name == name)


def test_bench_goals_runs_what_fits_the_budget_and_names_the_rest(tmp_path):
    # Estimates x 0.21: compare_64x256 (105 s) does not fit in 100 s; the next two (63 s, 88 s) do, one after the other.
    lines, table = run_goals(tmp_path, "--skip", "compare_4x4096,max_tokens,vae_decode",
                             "--budget", "100", "--estimate-scale", "0.21")
    environment, *jobs = lines
    assert environment["job"] == "environment" and environment["budget_s"] == 100 and environment["tiny"] is True
    assert (environment["vidiff_remat"], environment["vidiff_update"]) == ("attention", "adamw")
    by_job = {j["job"]: j for j in jobs}
    assert [j["job"] for j in jobs] == ["compare_64x256", "compare_1x16384_block", "compare_1x16384"]
    assert by_job["compare_64x256"]["status"] == "skipped" and "105 s" in by_job["compare_64x256"]["reason"]
    train, forward = by_job["compare_1x16384"]["goals"]  # the forward runs in the same job, as vidiff --mode both
    assert train["measured"] == pytest.approx(1.5) and train["met"] is True and train["target"] == ">= 1.0"
    assert forward["measured"] == pytest.approx(0.75) and forward["met"] is False
    (block,) = by_job["compare_1x16384_block"]["goals"]
    assert block["measured"] == pytest.approx(1.5) and block["met"] is True and block["target"] == ">= 1.0"
    vidiff_cmd = by_job["compare_1x16384_block"]["records"][0]["commands"]["vidiff"]
    assert "--remat block" in vidiff_cmd and "--update adamw" in vidiff_cmd
    assert "--remat attention" in by_job["compare_1x16384"]["records"][0]["commands"]["vidiff"]
    assert ("| compare_1x16384_block | train 1x64 vidiff/peer tokens/s (remat: vidiff block, peer block; "
            "vidiff update: AdamW only, as the peer) | >= 1.0 | 1.500 | yes |") in table
    assert "| compare_1x16384 | forward 1x64 vidiff/peer tokens/s | >= 1.2 | 0.750 | NO |" in table
    assert "not measured: run again with --only compare_64x256\n" in table
    # The next call's budget from the device time left: 860 s by default, less this call and 40 s, at most 560.
    assert table.rstrip().endswith("--budget 560 --only compare_64x256 --out-dir $OUT")


def test_bench_goals_refuses_a_named_job_longer_than_the_budget(tmp_path):
    """--only names a job whose estimate exceeds the whole budget: one line, before the device is touched."""
    cmd = [sys.executable, str(EXPERIMENTS / "bench_goals.py"), "--out-dir", str(tmp_path / "out"),
           "--only", "max_tokens,compare_64x256", "--budget", "450"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and not (tmp_path / "out").exists()
    (line,) = done.stderr.strip().splitlines()
    assert line == ("--only compare_64x256: its estimate, 500 s, exceeds --budget 450, so it would be skipped; "
                    "raise --budget (a call runs at most 560 s) or leave the job for another call")
    import bench_goals  # without --only the runner skips what does not fit and names it, as above

    assert bench_goals.parse_args(["--out-dir", "x", "--budget", "450"]).only == bench_goals.JOB_NAMES


def test_bench_goals_checks_forward_goal_and_rejects_unknown_jobs(tmp_path):
    lines, table = run_goals(tmp_path, "--only", "max_tokens,compare_4x4096", "--estimate-scale", "0", "--profile",
                             "--vidiff-update", "full", "--skip", "max_tokens")
    # --profile traces the first compare job run (the fake vidiff writes no trace).
    assert f"--vidiff-extra '--profile {tmp_path / 'goals'} --profile-steps 1'" in lines[1]["cmd"]
    assert "--vidiff-update full" in lines[1]["cmd"]
    goals = {g["goal"]: g for g in lines[1]["goals"]}
    assert goals["forward 2x32 vidiff/peer tokens/s"]["met"] is False  # the fake peer forward is faster: 0.75
    train = goals["train 2x32 vidiff/peer tokens/s (vidiff update: clip + AdamW + EMA + guard, the peer AdamW only)"]
    assert train["measured"] == pytest.approx(1.5)
    assert "not measured" not in table
    done = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_goals.py"), "--out-dir", str(tmp_path),
                           "--only", "compare_4x4096,fastest"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("--only: unknown jobs ['fastest']; choose from [")


def test_bench_goals_timeout_stops_the_benchmark_and_its_children(tmp_path, monkeypatch):
    import bench_goals

    pid_file = tmp_path / "grandchild.pid"
    spawn = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    monkeypatch.setattr(bench_goals, "job_command", lambda *a: [sys.executable, "-c", spawn])
    args = bench_goals.parse_args(["--out-dir", str(tmp_path), "--tiny"])
    with open(tmp_path / "log", "w") as log:
        record = bench_goals.run_job(job_named(bench_goals, "max_tokens"), args, 3.0, tmp_path, log)
    assert record["memory_cap"] == "unknown: no nvidia-smi output; no cap was set"
    assert record["status"] == "timeout" and 3.0 <= record["elapsed_s"] < 30
    assert record["goals"][0]["met"] is None  # no figure, neither met nor missed
    grandchild = Path(f"/proc/{pid_file.read_text()}/status")
    dead = lambda: not grandchild.exists() or "State:\tZ" in grandchild.read_text()  # noqa: E731
    # Killed: gone, or a zombie waiting for its new parent to reap it. Its pipes closed before run_job returned,
    # but on a loaded machine the kernel may still be finishing its exit (state R) for a moment: wait for that.
    deadline = time.monotonic() + 10
    while not dead() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dead()


def test_bench_goals_caps_memory_at_an_h100s_on_a_larger_gpu():
    import bench_goals

    assert bench_goals.gpu_memory_mib(["NVIDIA H200, 143771 MiB, 580.159.03"]) == 143771
    assert bench_goals.gpu_memory_mib([]) is None and bench_goals.gpu_memory_mib(["cpu"]) is None
    assert bench_goals.memory_fraction(143771, 81559) == "0.5389"  # 0.95 x 81559 / 143771
    assert bench_goals.memory_fraction(81559, 81559) is None  # an H100 itself: JAX's own default applies
    assert bench_goals.memory_fraction(None, 81559) is None


# --------------------------------------------------------------------------- bench_update


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
        "--impls: attention_impl: unknown 'flash'; valid: None (auto), ['xla', 'cudnn', 'chunked', 'ulysses', 'ring']"]
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


def test_bench_compare_runs_only_the_peer_modes_it_compares(tmp_path):
    # A peer training run would leave a marker file: a forward-only comparison must not start one (device time
    # is scarce).
    marker = tmp_path / "peer_trained"
    peer_train = tmp_path / "peer_train.py"
    peer_train.write_text(f"open({str(marker)!r}, 'w').close()\n")
    report, _ = run_compare(tmp_path, "--configs", "2x32", "--modes", "forward",
                            peer_train=f"{sys.executable} {peer_train}")
    assert not marker.exists()
    (result,) = report["results"]
    assert result["mode"] == "forward" and result["ratio_tokens_per_s"] == pytest.approx(0.75)
    assert "peer_train" not in result["commands"]


# --------------------------------------------------------------------------- review fixes: results kept, time plan


SLEEPER = "import time; time.sleep(60)"


def test_bench_compare_writes_each_run_as_it_ends(tmp_path):
    """A caller that kills bench_compare while the peer forward hangs still finds the finished runs in --out."""
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    out = tmp_path / "compare.json"
    prefix = f"{sys.executable} {fake}"
    child = subprocess.Popen(
        [sys.executable, str(EXPERIMENTS / "bench_compare.py"), "--tiny", "--configs", "2x32", "--timeout", "60",
         "--vidiff-cmd", f"{prefix} vidiff 3", "--peer-cmd", f"{prefix} torch 2",
         "--peer-forward-cmd", f"{sys.executable} -c '{SLEEPER}'", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, start_new_session=True)
    try:
        train_line = child.stdout.readline()  # printed once the peer's training run ended
        results = json.loads(out.read_text())["results"]
    finally:
        os.killpg(child.pid, 9)
        child.wait()
    row = json.loads(train_line)
    assert (row["config"], row["mode"], row["ratio_tokens_per_s"]) == ("2x32", "train", pytest.approx(1.5))
    by_mode = {r["mode"]: r for r in results}
    assert by_mode["train"]["ratio_tokens_per_s"] == pytest.approx(1.5)
    assert by_mode["forward"]["vidiff"]["status"] == "ok" and by_mode["forward"]["peer"] == {"status": "not_run"}


def test_bench_compare_gives_each_run_what_is_left_of_one_deadline(tmp_path):
    talker = "import sys, time; print('compiling the forward', file=sys.stderr, flush=True); time.sleep(60)"
    span = 12  # seconds: room for three Python starts on a loaded 2-core machine before the forward's
    report, stdout = run_compare(tmp_path, "--configs", "2x32", "--timeout", "60", "--deadline",
                                 str(time.time() + span), peer_forward=f'{sys.executable} -c "{talker}"')
    by_mode = {r["mode"]: r for r in report["results"]}
    assert by_mode["train"]["ratio_tokens_per_s"] == pytest.approx(1.5)  # finished before the deadline: kept
    assert 0 < by_mode["train"]["vidiff"]["elapsed_s"] < span and 0 < by_mode["train"]["peer"]["elapsed_s"] < span
    hung = by_mode["forward"]["peer"]  # what it had and what it said before the kill
    assert 0 < hung["timeout_s"] <= span and hung["stderr_tail"] == ["compiling the forward"]
    assert by_mode["forward"]["peer"]["status"] == "timeout" and by_mode["forward"]["ratio_tokens_per_s"] is None
    assert [json.loads(line)["mode"] for line in stdout.splitlines() if line.startswith("{")] == ["train", "forward"]
    # Past the deadline, nothing more is started.
    report, _ = run_compare(tmp_path, "--configs", "2x32", "--modes", "train", "--deadline", str(time.time() - 1))
    (row,) = report["results"]
    assert row["vidiff"]["status"] == row["peer"]["status"] == "timeout"
    assert row["vidiff"]["reason"] == "no time left before the deadline"


def test_bench_goals_keeps_what_a_hanging_job_finished(tmp_path):
    """The review's case: vidiff and the peer's training finish, the peer forward hangs past the budget."""
    lines, table = run_goals(tmp_path, "--only", "compare_4x4096", "--estimate-scale", "0", "--budget", "16",
                             "--peer-forward-cmd", f"{sys.executable} -c '{SLEEPER}'")
    job = lines[1]
    # bench_compare ended its hanging child at the shared deadline (budget - 10 s) itself, before bench_goals' kill.
    assert job["status"] == "ok" and job["elapsed_s"] < 11
    goals = {g["goal"].split(" vidiff/peer")[0]: g for g in job["goals"]}
    assert goals["train 2x32"]["measured"] == pytest.approx(1.5) and goals["train 2x32"]["met"] is True
    assert goals["forward 2x32"]["measured"] is None and goals["forward 2x32"]["met"] is None
    assert job["records"][1]["peer"]["status"] == "timeout"


def test_bench_goals_plan_fits_two_calls_of_one_device_session(monkeypatch, tmp_path):
    """By the estimates (each job taking exactly its estimate), call 1 and call 2 of the session's plan."""
    import bench_goals

    clock = {"now": 0.0}
    monkeypatch.setattr(bench_goals.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(bench_goals, "environment", lambda: dict(python="3", gpus=["NVIDIA H200, 143771 MiB, 580"]))

    def fake_job(job, args, timeout, out_dir, log, profile=False):
        clock["now"] += job.est_s
        return dict(job=job.name, status="ok", elapsed_s=job.est_s, goals=[])

    monkeypatch.setattr(bench_goals, "run_job", fake_job)
    common = ["--peer-cmd", "x", "--peer-forward-cmd", "x"]
    call1 = bench_goals.main(["--out-dir", str(tmp_path / "1"), *common])
    assert [(r["job"], r["status"]) for r in call1] == [
        ("compare_64x256", "ok"), ("compare_1x16384_block", "skipped"), ("compare_4x4096", "skipped"),
        ("compare_1x16384", "skipped"), ("max_tokens", "skipped"), ("vae_decode", "skipped")]
    assert sum(r.get("elapsed_s", 0) for r in call1) == 500
    table = (tmp_path / "1" / "goals.md").read_text()
    # 860 s of device time as the call starts (900 less a machine start), less 500 s and 40 s of overhead.
    left = "compare_1x16384_block,compare_4x4096,compare_1x16384,max_tokens,vae_decode"
    assert f"--budget 320 --only {left} --out-dir $OUT" in table
    clock["now"] = 0.0
    call2 = bench_goals.main(["--out-dir", str(tmp_path / "2"), "--budget", "320", "--device-left", "320",
                              "--only", left.replace("compare_4x4096,compare_1x16384,", ""), *common])
    assert [r["status"] for r in call2] == ["ok", "skipped", "skipped"]
    assert "less than the smallest job left (70 s): run them in another session" in (
        tmp_path / "2" / "goals.md").read_text()


def test_bench_goals_stops_in_one_line_without_the_peer(tmp_path):
    cmd = [sys.executable, str(EXPERIMENTS / "bench_goals.py"), "--tiny", "--out-dir", str(tmp_path / "out"),
           "--peer", str(tmp_path / "missing.py")]
    done = subprocess.run([*cmd, "--only", "compare_64x256"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and not (tmp_path / "out").exists()  # before anything ran or was written
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"bench_goals: the peer {tmp_path / 'missing.py'} is missing")
    import bench_goals  # a job without the peer, or a peer given as a command, needs no file

    bench_goals.check_peer(bench_goals.parse_args([*cmd[2:], "--only", "vae_decode"]),
                           [job_named(bench_goals, "vae_decode")])
    args = bench_goals.parse_args([*cmd[2:], "--peer-cmd", "x", "--peer-forward-cmd", "y"])
    bench_goals.check_peer(args, list(bench_goals.JOBS))


def test_max_tokens_goal_says_which_memory_it_ran_in():
    import bench_goals

    args = bench_goals.parse_args(["--out-dir", "x"])
    job = job_named(bench_goals, "max_tokens")
    args.gpu_mib, args.gpus = 143771, ["NVIDIA H200, 143771 MiB, 580"]
    assert bench_goals.memory_cap_note(args, "0.5389") == "81559 MiB of the GPU's 143771 (JAX fraction 0.5389)"
    args.gpu_mib, args.gpus = None, ["NVIDIA H200, [N/A], 580"]
    note = bench_goals.memory_cap_note(args, None)
    assert note.startswith("unknown: nvidia-smi's total did not parse")
    search = [dict(mode="max_tokens_search", max_tokens=131072, tried=[dict(tokens=131072, status="ok")])]
    (row,) = bench_goals.goal_rows(job, search, args, note)
    assert row["measured"] == 131072 and row["met"] is None and "memory: unknown" in row["goal"]
    (row,) = bench_goals.goal_rows(job, search, args, bench_goals.memory_cap_note(args, "0.5389"))
    assert row["met"] is True


# --------------------------------------------------------------------------- review fixes: measurement details


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


def test_bench_dit_prints_the_record_before_a_failing_profile(monkeypatch, capsys):
    import bench_dit

    def forward(args, cfg, mesh, latent_shape, tokens):
        def trace():
            raise FileNotFoundError(2, "No such file or directory", "/proc/nope")
        return dict(mode="forward", status="ok", tokens_per_s=10.0), trace

    monkeypatch.setattr(bench_dit, "bench_forward", forward)
    args = bench_dit.parse_args(["--tiny", "--mode", "forward", "--batch", "8", "--profile", "/proc/nope"])
    record, profile = bench_dit.run_modes(args)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [record, profile] and record["tokens_per_s"] == 10.0
    assert (profile["mode"], profile["of_mode"], profile["status"], profile["files"]) == ("profile", "forward",
                                                                                          "error", [])
    assert profile["error"].startswith("FileNotFoundError: [Errno 2] No such file or directory")
    assert args.profile_steps == 1 and args.update == "full"  # the defaults: one traced step, vidiff train's update


def test_profiled_runs_leave_oversized_traces_behind(tmp_path):
    import measure

    copied, left, kernels = measure.profiled_runs(lambda: None, 1, str(tmp_path), "tiny", max_bytes=0)
    assert copied == [] and list(tmp_path.iterdir()) == []
    assert sorted(n.split(" ")[0] for n in left) == ["tiny.trace.json.gz", "tiny.xplane.pb"]
    assert all(n.endswith("MiB > 0 MiB)") for n in left)
    assert kernels == {"kernels": 0}  # read from the trace left behind: a CPU run has no GPU kernels


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
    assert trace_summary.summarize({"traceEvents": meta[1:2] + host}) == {"kernels": 0}  # a CPU trace
    # With the program's HLO, the "other" kernels by JAX source path, the two blocks' adds as one row.
    hlo = "\n".join(["HloModule jit_step", "ENTRY %main {",
                     '  %loop_add_fusion.3 = f32[4]{0} fusion(%p), metadata={op_name="jit(step)/blocks_0/add"}',
                     '  ROOT %loop_add_fusion.4 = f32[4]{0} fusion(%q), metadata={op_name="jit(step)/blocks_11/add"}',
                     "}"])
    (tmp_path / "step.hlo.txt").write_text(hlo)
    summary = trace_summary.main([str(path), "--steps", "2", "--hlo", str(tmp_path / "step.hlo.txt")])
    assert summary["other_by_op"] == [dict(op="jit(step)/blocks_N/add", ms=0.04, calls=2),
                                      dict(op="(not an HLO instruction)", ms=0.01, calls=1)]


def test_adamw_only_step_does_the_peers_optimizer_work():
    import jax
    import jax.numpy as jnp
    import optax

    import bench_dit
    from vidiff.train.state import TrainState

    tx = optax.adamw(0.1, weight_decay=0.01)
    params = {"w": jnp.array([1.0, -2.0])}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       ema_params={"w": jnp.array([5.0, 5.0])}, rng=jax.random.key_data(jax.random.key(0)),
                       skipped=jnp.zeros((), jnp.int32), first_bad_step=jnp.full((), -1, jnp.int32))
    loss = lambda p, batch, rng, frozen, step: (jnp.sum(p["w"] ** 2) * 1e3, {})  # a gradient clipping would cut
    new, metrics = bench_dit.adamw_only_step(loss, tx)(state, {}, {})
    updates, _ = tx.update({"w": 2e3 * params["w"]}, tx.init(params), params)
    assert new.params["w"] == pytest.approx(optax.apply_updates(params, updates)["w"])
    assert new.ema_params["w"].tolist() == [5.0, 5.0] and int(new.step) == 1  # no EMA update
    assert metrics["loss"] == pytest.approx(5e3) and "grad_norm" not in metrics


def test_vae_goal_ratio_is_of_the_memory_a_case_adds():
    import bench_vae

    # 6 GiB of parameters and autotuning both clips share; the decode itself adds 1.0 against 1.5 GiB.
    rows = [dict(op="decode", way="chunked", size=256, frames=f, status="ok", peak_mem_GiB=6.0 + added,
                 device_base_GiB=6.0, device_added_GiB=added) for f, added in ((17, 1.0), (257, 1.5))]
    (summary,) = bench_vae.summaries(rows)
    assert summary["memory"] == "device_added" and summary["peak_ratio"] == pytest.approx(1.5)
    assert summary["met"] is False and summary["whole_peak_ratio"] == pytest.approx(7.5 / 7.0)


def test_ablations_take_out_the_work_the_peer_does_not_do_and_only_inside_the_block():
    import jax.numpy as jnp
    from ablations import ablated

    from vidiff.models import attention, dit

    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    cos, sin = jnp.zeros((1, 1, 1, 4)), jnp.ones((1, 1, 1, 4))
    rotated = attention.apply_rope(x, cos, sin)
    assert not jnp.array_equal(rotated, x)
    with ablated(["rope", "text-mask"]):
        assert attention.apply_rope(x, cos, sin) is x
        assert dit.text_mask_and_lengths(jnp.array([3, 5])) == (None, None)
    assert jnp.array_equal(attention.apply_rope(x, cos, sin), rotated)  # restored
    assert dit.text_mask_and_lengths(jnp.array([3, 5]))[1].tolist() == [3, 5]
    with pytest.raises(ValueError, match=r"--ablate: unknown \['qkv'\]; choose from \['rope', 'text-mask'\]"):
        with ablated(["qkv"]):
            pass
    (record,) = run_script("bench_dit.py", "--tiny", "--mode", "forward", "--ablate", "rope,text-mask",
                           "--steps", "1", "--warmup", "0")
    assert record["ablate"] == ["rope", "text-mask"] and record["status"] == "ok"
