"""experiments/bench_goals.py with fake benchmark commands: the budget, the goals, timeouts, the two-call plan of
one device session, the long-sequence goal's memory."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench_scripts import EXPERIMENTS, FAKE, REPO, SLEEPER


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
    lines, table = run_goals(tmp_path, "--skip", "vae_decode_512,compare_4x4096,max_tokens,vae_decode",
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
    last = table.rstrip().splitlines()[-1]  # --device-left: 860 less this call's few seconds and 40
    assert re.fullmatch(r".* --budget 560 --device-left (8[01][0-9]) --only compare_64x256 --out-dir \$OUT "
                        r"--estimate-scale=0.21 --tiny '--peer-cmd=.*' '--peer-forward-cmd=.*' '--vidiff-cmd=.*'", last)
    # The follow-up shares this call's settings: its estimates and its measurements are this call's.
    import shlex

    import bench_goals

    carried = bench_goals.parse_args(shlex.split(last)[4:])
    assert (carried.estimate_scale, carried.tiny, carried.budget, carried.only) == (0.21, True, 560, ["compare_64x256"])


def test_bench_goals_refuses_a_named_job_longer_than_the_budget(tmp_path):
    """--only names a job whose estimate exceeds the whole budget: one line, before the device is touched."""
    cmd = [sys.executable, str(EXPERIMENTS / "bench_goals.py"), "--out-dir", str(tmp_path / "out"),
           "--only", "max_tokens,compare_64x256", "--budget", "450"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and not (tmp_path / "out").exists()
    (line,) = done.stderr.strip().splitlines()
    assert line == ("--only compare_64x256: its estimate, 500 s, exceeds --budget 450 less 5 s of start-up, so it "
                    "would be skipped; raise --budget (a call runs at most 560 s) or leave the job for another call")
    import bench_goals  # without --only the runner skips what does not fit and names it, as above

    assert bench_goals.parse_args(["--out-dir", "x", "--budget", "450"]).only == bench_goals.JOB_NAMES
    # --profile traces the first compare job that runs (+30 s): with it, that job no longer fits 310 s.
    only = ["--out-dir", "x", "--budget", "310", "--only", "vae_decode_512,compare_1x16384_block"]
    assert bench_goals.parse_args(only).only == ["vae_decode_512", "compare_1x16384_block"]
    with pytest.raises(SystemExit, match=r"^--only compare_1x16384_block: its estimate with --profile, 330 s, "
                                         r"exceeds --budget 310 less 5 s of start-up, so it would be skipped"):
        bench_goals.parse_args([*only, "--profile"])
    # A later compare job is traced only when the first is skipped: its own estimate is what it needs at least.
    later = ["--out-dir", "x", "--budget", "535", "--profile", "--only", "compare_64x256,compare_1x16384_block"]
    assert bench_goals.parse_args(later).only == ["compare_64x256", "compare_1x16384_block"]
    with pytest.raises(SystemExit, match=r"^--only compare_64x256: its estimate with --profile, 530 s"):
        bench_goals.parse_args([*later[:3], "530", *later[4:]])  # an estimate equal to the budget: its start-up
    # would leave the job less than its estimate when it comes to start, and it would be skipped


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
    import goal_jobs

    pid_file = tmp_path / "grandchild.pid"
    spawn = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    monkeypatch.setattr(goal_jobs, "job_command", lambda *a: [sys.executable, "-c", spawn])
    args = bench_goals.parse_args(["--out-dir", str(tmp_path), "--tiny"])
    with open(tmp_path / "log", "w") as log:
        record = goal_jobs.run_job(job_named(bench_goals, "max_tokens"), args, 3.0, tmp_path, log)
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
    import goal_jobs

    assert bench_goals.gpu_memory_mib(["NVIDIA H200, 143771 MiB, 580.159.03"]) == 143771
    assert bench_goals.gpu_memory_mib([]) is None and bench_goals.gpu_memory_mib(["cpu"]) is None
    assert goal_jobs.memory_fraction(143771, 81559) == "0.5389"  # 0.95 x 81559 / 143771
    assert goal_jobs.memory_fraction(81559, 81559) is None  # an H100 itself: JAX's own default applies
    assert goal_jobs.memory_fraction(None, 81559) is None


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


@pytest.mark.parametrize("call1_s, budget2, call2", [
    (500, 320, [("compare_1x16384_block", "ok"), ("vae_decode_512", "skipped"), ("max_tokens", "skipped"),
                ("vae_decode", "skipped")]),
    # Call 1 ran past its estimate, to its budget's end: compare_1x16384_block no longer fits call 2.
    (560, 260, [("vae_decode_512", "ok"), ("max_tokens", "ok"), ("vae_decode", "skipped")]),
])
def test_bench_goals_plan_fits_two_calls_of_one_device_session(monkeypatch, tmp_path, call1_s, budget2, call2):
    """Call 1 and call 2 of the session's plan, call 2 running the command call 1 printed, word for word."""
    import shlex

    import bench_goals

    clock = {"now": 0.0}
    monkeypatch.setattr(bench_goals.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(bench_goals, "environment", lambda: dict(python="3", gpus=["NVIDIA H200, 143771 MiB, 580"]))

    def fake_job(job, args, timeout, out_dir, log, profile=False):
        took = call1_s if job.name == "compare_64x256" else job.est_s
        clock["now"] += took
        return dict(job=job.name, status="ok", elapsed_s=took, goals=[])

    monkeypatch.setattr(bench_goals, "run_job", fake_job)
    common = ["--peer-cmd", "x", "--peer-forward-cmd", "x"]
    call1 = bench_goals.main(["--out-dir", str(tmp_path / "1"), *common])
    assert [(r["job"], r["status"]) for r in call1] == [
        ("compare_64x256", "ok"), ("compare_1x16384_block", "skipped"), ("vae_decode_512", "skipped"),
        ("compare_4x4096", "skipped"), ("compare_1x16384", "skipped"), ("max_tokens", "skipped"),
        ("vae_decode", "skipped")]
    table = (tmp_path / "1" / "goals.md").read_text()
    # 860 s of device time as the call starts (900 less a machine start), less call 1 and 40 s of overhead; the
    # command names only the jobs that fit that budget (one that does not would stop it), the others come after.
    command = next(line for line in table.splitlines() if line.startswith("PYTHONUNBUFFERED=1"))
    argv = shlex.split(command)[4:]  # after PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/bench_goals.py
    assert argv[:4] == ["--budget", str(budget2), "--device-left", str(budget2)]
    later = [job for job in bench_goals.JOBS if job.est_s > budget2 and job.name != "compare_64x256"]
    assert table.rstrip().endswith(f"for another session: --only {','.join(j.name for j in later)}")
    clock["now"] = 0.0
    out = argv.index("--out-dir")
    argv[out + 1] = str(tmp_path / "2")
    done = bench_goals.main([*argv, *common])
    assert [(r["job"], r["status"]) for r in done] == call2
    # Its own next call is sized from what call 2 was given, less what it ran: no third call in this session.
    assert "run them in another session" in (tmp_path / "2" / "goals.md").read_text()


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
    import goal_jobs

    args = bench_goals.parse_args(["--out-dir", "x"])
    job = job_named(bench_goals, "max_tokens")
    args.gpu_mib, args.gpus = 143771, ["NVIDIA H200, 143771 MiB, 580"]
    assert goal_jobs.memory_cap_note(args, "0.5389") == "81559 MiB of the GPU's 143771 (JAX fraction 0.5389)"
    args.gpu_mib, args.gpus = None, ["NVIDIA H200, [N/A], 580"]
    note = goal_jobs.memory_cap_note(args, None)
    assert note.startswith("unknown: nvidia-smi's total did not parse")
    search = [dict(mode="max_tokens_search", max_tokens=131072, tried=[dict(tokens=131072, status="ok")])]
    (row,) = goal_jobs.goal_rows(job, search, args, note)
    assert row["measured"] == 131072 and row["met"] is None and "memory: unknown" in row["goal"]
    (row,) = goal_jobs.goal_rows(job, search, args, goal_jobs.memory_cap_note(args, "0.5389"))
    assert row["met"] is True
