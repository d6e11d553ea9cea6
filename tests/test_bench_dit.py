"""experiments/bench_dit.py: its records, remat and scan, the out-of-memory result, the longest-sequence search,
the peer's optimizer step, the ablations (tiny CPU runs; the FLOP count against a hand computation)."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench_scripts import EXPERIMENTS, REPO, assert_positive, run_script, script_env


TRAIN_KEYS = {"impl", "mode", "status", "batch", "tokens", "latent_shape", "text", "dim", "heads", "layers",
              "params_M", "init_s", "compile_s", "process_s", "step_s", "tokens_per_s", "model_tflops", "mfu",
              "peak_tflops", "step_s_pipelined", "step_s_steady", "tokens_per_pipelined_s", "dispatch_s", "hlo",
              "peak_mem_GiB", "compiled_mem_GiB", "cudnn_attention", "cudnn_attention_kernels", "remat", "scan",
              "dtype", "mesh"}


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
    assert record["param_dtype"] == "float32" and record["fused_qk_rope"] is False


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bench_dit_param_dtype_is_every_weights_dtype(param_dtype):
    import bench_dit
    import bench_dit_inputs
    import jax
    import numpy as np

    cfg = bench_dit_inputs.build_config(bench_dit.parse_args(["--tiny", "--param-dtype", param_dtype]))
    assert {np.dtype(x.dtype) for x in jax.tree.leaves(bench_dit_inputs.param_shapes(cfg))} == {np.dtype(param_dtype)}
    assert not cfg.fused_qk_rope
    assert bench_dit_inputs.build_config(bench_dit.parse_args(["--tiny", "--fused-qk-rope"])).fused_qk_rope


def test_bench_dit_says_when_its_program_came_from_the_compilation_cache(tmp_path):
    """A second process with the same JAX_COMPILATION_CACHE_DIR loads the step an earlier one compiled;
    without a cache (the tests' own is switched off here) the record says null."""
    args = ("--tiny", "--mode", "train", "--steps", "1", "--warmup", "0")
    (uncached,) = run_script("bench_dit.py", *args, JAX_COMPILATION_CACHE_DIR="")
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    (first,), (second,) = (run_script("bench_dit.py", *args, **cache) for _ in range(2))
    assert (uncached["compile_cached"], first["compile_cached"], second["compile_cached"]) == (None, False, True)
    assert second["compile_s"] < first["compile_s"]


@pytest.mark.parametrize("flags, message", [
    (["--pad-head-dim", "8"], "bench_dit.py: attention_head_pad: must be 0 (off) or an int >= head_dim 16 with "
                              "attention_impl None, 'xla' or 'cudnn'; got 8 with None"),
    (["--latent-shape", "3,8,9"], "bench_dit.py: --latent-shape: w=9 is not divisible by the patch (1, 2, 2)"),
    (["--batch", "3", "--mesh", "2,1,1,1"], "bench_dit.py: mesh: axis sizes {'data': 2, 'fsdp': 1, 'tensor': 1, "
                                           "'context': 1} multiply to 2 but there are 1 devices; set one of "
                                           "mesh.data/fsdp/tensor/context to -1 or make the product 1"),
    (["--tokens", "0"], "bench_dit.py: error: --tokens must be >= 1, got 0"),
    (["--batch", "0"], "bench_dit.py: error: --batch must be >= 1, got 0"),
    (["--mesh", "abc"], "bench_dit.py: error: --mesh: need 4 comma-separated integers, got 'abc'"),
    (["--mesh", "1,1,1"], "bench_dit.py: error: --mesh: need 4 comma-separated integers, got '1,1,1'"),
    (["--fused-qk-rope", "--ablate", "rope"], "bench_dit.py: error: --ablate rope takes out the unfused RoPE, which "
                                              "--fused-qk-rope does not run; drop one of the two"),
])
def test_bench_dit_refuses_a_flag_in_one_line(flags, message):
    done = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_dit.py"), "--tiny", *flags],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=script_env(XLA_FLAGS=""))
    assert done.returncode in (1, 2) and done.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in done.stderr


def test_out_of_memory_is_reported_as_a_result(monkeypatch, capsys):
    import bench_dit

    def exhausted(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.00GiB.\nmore detail")

    monkeypatch.setattr(bench_dit, "bench_forward", exhausted)
    # 8 virtual CPU devices in this process (conftest): batch 8 fills the data axis.
    (record,) = bench_dit.run_modes(bench_dit.parse_args(["--tiny", "--mode", "forward", "--batch", "8"]))
    assert record["status"] == "oom" and record["error"].startswith("RESOURCE_EXHAUSTED")
    assert record["init_on"] == "device"  # --init-on auto resolved, as an ok record has it (a CPU: no host build)
    assert json.loads(capsys.readouterr().out)["status"] == "oom"
    monkeypatch.setattr(bench_dit, "bench_forward", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else is a bug, not a measurement
        bench_dit.run_modes(bench_dit.parse_args(["--tiny", "--mode", "forward", "--batch", "8"]))


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
    assert profile["queued"] is False  # each traced step waited for, as the timed ones


def test_max_tokens_search_doubles_until_a_length_does_not_fit(monkeypatch, capsys):
    """bench_max_tokens.py's search, with each length's child run faked (a real child is a plain bench_dit.py train
    run, tested above): 16 and 32 tokens train, 64 runs out of memory, so 32 is the answer."""
    import bench_dit
    import bench_max_tokens
    import measure

    children = []

    def fake_run(cmd, capture_output, text, timeout):
        children.append(cmd)
        tokens = int(cmd[cmd.index("--tokens") + 1])
        if tokens <= 32:
            line = json.dumps(dict(mode="train", status="ok", preset="tiny", scan=True, dtype="float32",
                                   step_s=0.01 * tokens, tokens_per_s=100.0, mfu=0.5, peak_mem_GiB=tokens / 16))
            return subprocess.CompletedProcess(cmd, 0, stdout=line + "\n", stderr="")
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory")

    monkeypatch.setattr(measure.subprocess, "run", fake_run)
    record = bench_max_tokens.main(["--tiny", "--search-start", "16", "--scan", "--steps", "3"])
    assert record["max_tokens"] == 32 and record["mode"] == "max_tokens_search"
    assert (record["preset"], record["scan"], record["remat"]) == ("tiny", True, "block")
    assert [(t["tokens"], t["status"], t["peak_mem_GiB"]) for t in record["tried"]] == [
        (16, "ok", 1.0), (32, "ok", 2.0), (64, "oom", None)]
    assert "RESOURCE_EXHAUSTED" in record["tried"][2]["error"]
    # Each length's line on stdout as it ends (a search cut at a call's limit keeps them in a tee'd file).
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["mode"], r.get("tokens"), r.get("status")) for r in lines] == [
        ("max_tokens_length", 16, "ok"), ("max_tokens_length", 32, "ok"), ("max_tokens_length", 64, "oom"),
        ("max_tokens_search", None, None)]
    # Each child is a valid bench_dit.py command: one length, batch 1, the search's remat, other flags kept.
    assert children[0][1].endswith("bench_dit.py")
    child = bench_dit.parse_args(children[0][2:])
    assert (child.tokens, child.batch, child.mode, child.remat, child.steps, child.warmup) == (
        16, 1, "train", "block", 3, 1)
    assert child.scan and child.tiny


@pytest.mark.parametrize("flags, message", [
    (["--tokens", "999"], "--tokens: the search runs each length as --mode train --batch 1 --tokens N; leave it out"),
    (["--batch=2"], "--batch: the search runs each length as --mode train --batch 1 --tokens N; leave it out"),
    (["--search-start", "64", "--search-max", "32"],
     "--search-start 64 and --search-max 32: need 1 <= start <= max"),
])
def test_max_tokens_search_refuses_what_it_sets_itself(flags, message, capsys):
    import bench_max_tokens

    with pytest.raises(SystemExit):
        bench_max_tokens.parse_args(["--tiny", *flags])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {message}")


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
