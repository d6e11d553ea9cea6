"""experiments/bench_compare.py against fake vidiff and peer commands (torch is not installed here): ratios,
a failing peer, only the modes compared, each run written as it ends, one deadline for all."""
import json
import os
import subprocess
import sys
import time

import pytest

from bench_scripts import EXPERIMENTS, FAKE, REPO, SLEEPER


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


def test_records_printed_before_a_timeout_or_a_failure_are_kept():
    """A forward measured before the training step was cut, or timings printed before a profiler hung or
    crashed, stay in the report; the mode that did not finish gets the failure record."""
    import bench_compare

    forward = json.dumps(dict(impl="vidiff", mode="forward", status="ok", tokens_per_s=5.0))
    then = {"hangs": "import time; time.sleep(30)", "fails": "raise SystemExit(3)"}
    for case, tail in then.items():
        code = f"print({forward!r}, flush=True); {tail}"
        records = bench_compare.run_json([sys.executable, "-c", code], timeout=3.0 if case == "hangs" else 30.0)
        assert isinstance(records, list) and len(records) == 2, (case, records)
        assert bench_compare.pick(records, "forward")["tokens_per_s"] == 5.0
        failed = bench_compare.pick(records, "train")
        assert failed["status"] == ("timeout" if case == "hangs" else "error") and failed["elapsed_s"] > 0
    assert bench_compare.run_json([sys.executable, "-c", "raise SystemExit(4)"], timeout=30.0)["returncode"] == 4
