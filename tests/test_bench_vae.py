"""experiments/bench_vae.py: one-shot and chunked cases, in process and isolated, and the memory-ratio goal."""
import pytest

from bench_scripts import assert_positive, run_script


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


def test_vae_goal_ratio_is_of_the_memory_a_case_adds():
    import bench_vae

    # 6 GiB of parameters and autotuning both clips share; the decode itself adds 1.0 against 1.5 GiB.
    rows = [dict(op="decode", way="chunked", size=256, frames=f, status="ok", peak_mem_GiB=6.0 + added,
                 device_base_GiB=6.0, device_added_GiB=added) for f, added in ((17, 1.0), (257, 1.5))]
    (summary,) = bench_vae.summaries(rows)
    assert summary["memory"] == "device_added" and summary["peak_ratio"] == pytest.approx(1.5)
    assert summary["met"] is False and summary["whole_peak_ratio"] == pytest.approx(7.5 / 7.0)


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


@pytest.mark.parametrize("flags, message", [
    (["--ops", "decod"], "--ops: ['decod'] not in ('encode', 'decode')"),
    (["--sizes", "2x"], "--sizes: '2x' is not a comma-separated list of ints"),
    (["--ways", ","], "--ways: give at least one value of ('oneshot', 'chunked')"),
    (["--repeats", "0"], "--repeats and --warmup must be >= 1 (the warmup call compiles)"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
])
def test_bench_vae_refuses_a_bad_flag_in_one_line(flags, message, capsys):
    import bench_vae

    with pytest.raises(SystemExit):
        bench_vae.parse_args(["--tiny", *flags])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {message}")  # prog: sys.argv[0]
