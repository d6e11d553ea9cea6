"""Training metrics: PSNR / SSIM for reconstructions, what a log line averages, and the writer that logs it.

``LogWindow`` sums each step's metrics on the device (no host sync per step) and
counts tokens and the steps' own wall time (evaluation, checkpoint saves, its own
sum's first compile and, by ``CompileTimer``, the step's compilations and the wait
for a batch of new shapes left out), so a log row reports means
over every step since the previous row, and steady-state rates. It also counts
how long the main thread waited for the data pipeline's batches
(``data_wait_s``, ``data_wait_fraction`` of that wall time): rates alone do not
say whether a slow run waits for its data or for its steps.
``DataWaitWarning`` says so in one line per run when the wait is a large share.

``MetricsWriter`` appends one JSON object per logged step to
``<workdir>/metrics.jsonl`` and writes the same scalars as TensorBoard event
files (tensorboardX, no TensorFlow) under ``<workdir>/tb``. Only process 0
writes, so multi-host runs produce one log. A non-finite value is written as
JSON ``null`` (``vidiff.data.schema.json_safe``): ``NaN`` is not JSON, and readers choke on it.
"""
from __future__ import annotations

import json
import math
import re
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vidiff.data.schema import json_safe


def psnr(x, y, max_value: float = 2.0):
    """Peak signal-to-noise ratio per sample, for videos in [-1, 1] (range 2); shape (B,)."""
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10(max_value**2 / jnp.maximum(mse, 1e-10))


def ssim(x, y, max_value: float = 2.0, window: int = 7):
    """Mean structural similarity per sample over frames and channels (uniform window), shape (B,).

    ``x``, ``y``: ``(B, T, H, W, C)`` (or ``(B, H, W, C)``) in [-1, 1]. SSIM's luminance term is not
    shift-invariant and assumes intensities in [0, max_value], so the clips are shifted to [0, 2] first:
    in [-1, 1], mid-grey means near 0 turned tiny brightness errors into large losses of similarity.
    """
    offset = max_value / 2.0
    x, y = x.astype(jnp.float32) + offset, y.astype(jnp.float32) + offset
    if x.ndim == 4:
        x, y = x[:, None], y[:, None]
    b, t, h, w, c = x.shape
    window = min(window, h, w)
    flat = lambda a: a.reshape(b * t, h, w, c)

    def local_mean(a):
        return jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, window, window, 1), (1, 1, 1, 1), "VALID") / window**2

    x, y = flat(x), flat(y)
    mx, my = local_mean(x), local_mean(y)
    # E[x^2] - E[x]^2 cancels in float32 where the image is flat and bright (constant 200 against 205 read
    # 1.00003): each image's own mean comes off first, which leaves the variances and covariance unchanged.
    x, y = x - x.mean(axis=(1, 2), keepdims=True), y - y.mean(axis=(1, 2), keepdims=True)
    mcx, mcy = local_mean(x), local_mean(y)
    vx, vy = local_mean(x * x) - mcx**2, local_mean(y * y) - mcy**2
    cov = local_mean(x * y) - mcx * mcy
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.reshape(b, -1).mean(axis=1)


_add = jax.jit(lambda total, new: jax.tree.map(jnp.add, total, new))
# The argument signatures _add has met in this process: its compile cache is the process's, not a window's.
_ADDED = set()


def _signature(*trees) -> tuple:
    """What jit compiles a call for: tree structure, shapes, dtypes and shardings."""
    leaves, structure = jax.tree.flatten(trees)
    return structure, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


class LogWindow:
    """The steps since the last log line: summed metrics, tokens and their wall time.

    ``rate``: the name of the tokens' rate in a row (``tokens_per_s``; a VAE's "tokens" are frames, so its
    rows say ``frames_per_s``)."""

    def __init__(self, step: int, rate: str = "tokens_per_s"):
        self.rate = rate
        self.reset(step)

    def reset(self, step: int) -> None:
        self.first_step, self.sums, self.tokens = step, None, 0
        self.started, self.paused, self.waited = time.perf_counter(), 0.0, 0.0
        self.untimed_steps, self.untimed_tokens = 0, 0  # steps (and their tokens) whose time is left out

    def add(self, metrics: dict, tokens: int) -> None:
        """Sum ``metrics`` on the device. The first sum of a signature compiles (~0.15 s on a CPU, on the main
        thread): that call is left out of the rates, as a step's compile is."""
        if self.sums is None:
            self.sums = metrics
        elif (signature := _signature(self.sums, metrics)) in _ADDED:
            self.sums = _add(self.sums, metrics)
        else:
            _ADDED.add(signature)
            began = time.perf_counter()
            self.sums = _add(self.sums, metrics)
            self.pause(time.perf_counter() - began)
        self.tokens += tokens

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` of non-step work (an evaluation, a checkpoint save) out of the rates."""
        self.paused += seconds

    def leave_out(self, seconds: float, tokens: int) -> None:
        """Leave one step, its ``tokens`` and its ``seconds`` out of the rates (a compiling step's first run)."""
        self.paused += seconds
        self.untimed_steps += 1
        self.untimed_tokens += tokens

    def wait(self, seconds: float) -> None:
        """Count ``seconds`` the main thread spent drawing a batch from the data pipeline (part of the wall time)."""
        self.waited += seconds

    def means(self, step: int) -> dict:
        """Per-step means of the metrics (a non-finite step makes its metric's mean null), steps/s, tokens/s,
        ``steps``, how many steps the means cover (fewer than ``log_every`` in a resumed run's first row), and the
        seconds the steps waited for their batches, also as a fraction of their wall time."""
        steps = step - self.first_step
        seconds = max(time.perf_counter() - self.started - self.paused, 1e-9)
        sums = jax.device_get(self.sums)
        timed = steps - self.untimed_steps  # none: the row's steps all compiled, and no rate is known (null)
        return {**{k: float(np.mean(v)) / steps for k, v in sums.items()}, "steps": steps,
                "steps_per_s": timed / seconds if timed else math.nan,
                self.rate: (self.tokens - self.untimed_tokens) / seconds if timed else math.nan,
                "data_wait_s": self.waited, "data_wait_fraction": min(self.waited / seconds, 1.0)}


# A share of the window's wall time. When each step waits for the one before (a DiT batch read back, several
# processes agreeing), it is the accelerator's idle share; when steps are dispatched ahead, the accelerator idles
# only as the share nears 1, but a pipeline taking a fifth of the step's time is the first thing to outgrow it.
DATA_WAIT_WARNING = 0.2


class DataWaitWarning:
    """One line per run when a log row's steps waited for their batches more than ``DATA_WAIT_WARNING`` of the time.

    A run's first row is not judged: it holds the pipeline's start (worker processes spawning, first reads).
    Once is enough: the rows keep the share (``data_wait_fraction``), and a line per row would bury the log.
    """

    def __init__(self, data, log):
        self.data, self.log, self.rows, self.told = data, log, 0, False

    def check(self, step: int, row: dict) -> None:
        self.rows += 1
        if self.told or self.rows == 1 or row["data_wait_fraction"] <= DATA_WAIT_WARNING:
            return
        self.told = True
        self.log(f"step {step}: the steps since the last log row waited {row['data_wait_fraction']:.0%} of their "
                 f"time for batches from the data pipeline (data_wait_fraction in the log rows): the input pipeline "
                 f"slows the run, or nearly does; raise data.num_workers (now {self.data.num_workers}) and/or "
                 f"data.read_threads (now {self.data.read_threads}), or train on JPEG shards made by `vidiff "
                 f"prepare` rather than a video folder or PNG shards; docs/data.md, 'Feeding a GPU', sizes them")


class CompileTimer:
    """Leaves the train step's compilations, and those of its batch's preparation, out of a log window's rates.

    jax compiles synchronously inside the call that first meets a batch's shapes (the first step, a new bucket, a
    last partial batch), so that call is waited for and left out of ``window``'s rates, its step and tokens too.
    Later calls only enqueue the step: they are not timed. A batch of new shapes was also prepared by programs
    compiled for them (the DiT's latent cache encodes a new clip shape with the VAE, the text encoder its first
    captions): the main thread's wait for that batch (:meth:`prepared`) is paused too. It is no data wait either:
    the rows' ``data_wait_s`` counts the draws from the data pipeline alone.
    """

    def __init__(self, window: LogWindow):
        self.window, self.seen = window, set()

    def prepared(self, batch: dict, seconds: float) -> None:
        """Told that the main thread waited ``seconds`` for ``batch``'s preparation, before its step's call."""
        if _shapes(batch) not in self.seen:
            self.window.pause(seconds)

    def call(self, step_fn, state, batch: dict, *args, tokens: int = 0):
        """``step_fn(state, batch, *args)``; when ``batch``'s shapes are new to this run, waited for and left out
        of the rates whole, with its ``tokens``: its first run is slow too (on a CPU 0.99 s against 0.04 s, with
        the state's initialisation still queued before it), and a row's rates are those of its other steps."""
        shapes = _shapes(batch)
        if shapes in self.seen:
            return step_fn(state, batch, *args)
        self.seen.add(shapes)
        began = time.perf_counter()
        out = jax.block_until_ready(step_fn(state, batch, *args))
        self.window.leave_out(time.perf_counter() - began, tokens)
        return out


def _shapes(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


class MetricsWriter:
    """JSONL + TensorBoard scalars in ``workdir``, written by process 0 only."""

    def __init__(self, workdir, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _end_a_cut_row(self.path)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, scalars: dict) -> None:
        """Log ``scalars`` (numbers or 0-d arrays) at ``step``."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe({"step": int(step), "time": time.time(), **values}), allow_nan=False) + "\n")
        for name, value in values.items() if self._tb is not None else ():
            if math.isfinite(value):  # tensorboardX warns on every NaN; the JSONL row keeps the null
                self._tb.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None  # closing twice (an error path, then the normal one) is harmless


def read_metrics(workdir) -> list[dict]:
    """The logged rows of a run in step order, each step's as the last run that reached it logged it.

    A run killed after its last checkpoint logged steps that the resumed run
    trains and logs again; the file keeps both (it is only ever appended to),
    and the resumed run's rows replace the earlier ones from its first step
    on. A run stopped by a signal logs its last steps at the step it saved,
    which the resumed run starts after: that row is kept. A row cut short
    (the run killed while writing it) is left out with a warning; any other
    line that is not a row is a one-line error naming the file and the line.
    """
    path = Path(workdir) / "metrics.jsonl"
    text = path.read_text(errors="replace") if path.exists() else ""
    rows = [row for number, line in enumerate(text.split("\n"), 1) if line.strip()
            for row in _parse_line(path, number, line)]
    kept = []
    for row in rows:
        if kept and _starts_a_run(kept[-1], row):
            kept = [r for r in kept if r["step"] < row["step"]]
        kept.append(row)
    return kept


_ROW_START = '{"step": '  # how MetricsWriter begins every row


def _end_a_cut_row(path: Path) -> None:
    """End a row cut short by a killed run with a newline, so the rows appended now stay whole lines of their own."""
    try:
        with path.open("rb") as f:
            f.seek(-1, 2)
            cut = f.read(1) != b"\n"
    except OSError:  # no file yet, or an empty one: nothing to end
        return
    if cut:
        with path.open("a") as f:
            f.write("\n")


def _parse_line(path: Path, number: int, line: str) -> list[dict]:
    """The rows of one line: one, or none for a cut row. A log appended to without ending its cut row first
    (older writers did not) has the resumed run's first row glued to it; that row is kept."""
    rows = []
    for piece in re.split(f"(?={re.escape(_ROW_START)})", line.strip()):
        if not piece:
            continue
        try:
            row = json.loads(piece)
        except json.JSONDecodeError as e:
            if not (piece.startswith(_ROW_START) or _ROW_START.startswith(piece)):
                raise ValueError(f"{path} line {number} is not a metrics row ({e.msg}); the file is not a log "
                                 "`vidiff train` wrote, or was damaged: remove that line or the file") from None
            warnings.warn(f"{path} line {number}: a row cut short (its run was killed while writing it) is left out")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path} line {number} is not a metrics row (no integer 'step'); the file is not a log "
                             "`vidiff train` wrote, or was damaged: remove that line or the file")
        rows.append(row)
    return rows


def _starts_a_run(previous: dict, row: dict) -> bool:
    """Within one run steps only grow, and at one step the log row (with a loss) comes before the evaluation's."""
    if row["step"] != previous["step"]:
        return row["step"] < previous["step"]
    return "loss" in row or "loss" not in previous
