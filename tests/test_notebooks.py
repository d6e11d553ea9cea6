"""The Colab notebooks: committed without outputs, and each runs top to bottom (FAST settings) without an error.

Each notebook runs in a fresh kernel of this interpreter (nbclient), in a
temporary working directory, with one CPU device as on a Colab CPU runtime
(notebooks that want more devices ask for them themselves) and no network.

Strip outputs before committing::

    python tests/test_notebooks.py          # rewrites colab/*.ipynb without outputs
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
# A hang guard per cell, not a speed test (speed is measured by scripts, never asserted): the FAST
# notebooks take about a minute each on a quiet 2-core CPU, many times that on a loaded one.
CELL_TIMEOUT_S = 900
# What the training notebooks must leave in their working directory (FAST settings): the exported model, and a
# DiT log whose last training row is the configured last step, with a finite loss.
WRITES = {
    "02_train_on_the_captioned_world": ("world_tiny/run", 20),
    "03_bring_your_own_videos": ("byov/run", 10),
}
# Notebooks that sample the model bundled with vidiff; they run once it is installed there.
BUNDLED_MODEL = REPO / "vidiff" / "assets" / "world_tiny" / "vidiff.json"
NEEDS_BUNDLED_MODEL = {"01_quickstart"}


def strip_outputs(nb) -> bool:
    """Remove outputs and execution counts (and per-cell execution metadata) in place; True if anything changed."""
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
        for key in ("execution", "collapsed", "scrolled"):
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    for key in ("widgets",):
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    return changed


def _read(path):
    import nbformat

    return nbformat.read(str(path), as_version=4)


def _kernel_env() -> dict:
    env = dict(os.environ)
    # One CPU device, like a Colab CPU runtime, and compiles 2x faster than with 8 virtual ones.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    for name in ("01_quickstart", "02_train_on_the_captioned_world", "03_bring_your_own_videos",
                 "04_modules_in_your_research"):
        assert f"{name}.ipynb" in names, names


def test_quickstart_samples_the_bundled_model():
    """Committed, notebook 01 loads the bundled model (no stand-in, no fallback); CHECKPOINT is for users' own."""
    nb = _read(REPO / "colab" / "01_quickstart.ipynb")
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert re.search(r"^CHECKPOINT = None\b", params.source, re.M)
    assert any("TextToVideo.from_checkpoint(CHECKPOINT)" in c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs(path):
    import nbformat

    nb = _read(path)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None or "execution" in c.metadata)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run `python tests/test_notebooks.py` to strip them"
    assert "widgets" not in nb.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_badge_install_cell_and_fast_parameter(path):
    nb = _read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    badge = f"https://colab.research.google.com/github/vidiff/vidiff/blob/main/colab/{path.name}"
    assert "colab-badge.svg" in first.source and badge in first.source, "the first cell needs an Open in Colab badge"
    code = [c for c in nb.cells if c.cell_type == "code"]
    # The install cell comes first and installs only where vidiff is missing (Colab), from the repository.
    assert 'find_spec("vidiff") is None' in code[0].source and "git+{REPO_URL}" in code[0].source
    # A tagged parameters cell defines FAST = True: the committed notebook runs at CPU-sized settings.
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and re.search(r"^FAST = True\b", params[0].source, re.M), \
        "one cell tagged 'parameters' must set FAST = True"


def test_strip_outputs_removes_everything_an_execution_adds():
    import nbformat
    from nbformat import v4

    nb = v4.new_notebook(cells=[v4.new_markdown_cell("# t"), v4.new_code_cell("1 + 1")])
    nb.cells[1].outputs = [v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    nb.cells[1].execution_count = 1
    nb.cells[1].metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    assert strip_outputs(nb) is True
    assert nb.cells[1].outputs == [] and nb.cells[1].execution_count is None and "execution" not in nb.cells[1].metadata
    assert strip_outputs(nb) is False
    nbformat.validate(nb)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    """Execute every cell in a fresh kernel; any exception fails the test with the cell's traceback."""
    if path.stem in NEEDS_BUNDLED_MODEL and not BUNDLED_MODEL.is_file():
        pytest.skip(f"{path.name} samples the bundled model, which is not installed yet ({BUNDLED_MODEL} is missing)")
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = _read(path)
    # A kernel spec pinned to this interpreter, whatever kernels the user has installed.
    spec_dir = tmp_path / "jupyter" / "kernels" / "vidiff-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vidiff test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    workdir = tmp_path / "run"
    workdir.mkdir()
    client = NotebookClient(nb, kernel_name="vidiff-test", timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(workdir)}})
    started = time.perf_counter()
    try:
        client.execute(env=_kernel_env())
    except CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    seconds = time.perf_counter() - started
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "not every code cell ran"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    if path.stem in WRITES:
        run, dit_steps = WRITES[path.stem]
        export = workdir / run / "export"
        assert {"vae.safetensors", "dit.safetensors", "vidiff.json"} <= {p.name for p in export.iterdir()}
        rows = [json.loads(line) for line in (workdir / run / "dit" / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "loss" in r][-1]
        assert last["step"] == dit_steps and last["loss"] is not None and last["loss"] > 0
    print(f"{path.name}: {seconds:.1f} s")


if __name__ == "__main__":
    import nbformat

    for notebook in NOTEBOOKS:
        nb = _read(notebook)
        if strip_outputs(nb):
            nbformat.write(nb, str(notebook))
            print(f"stripped {notebook.relative_to(REPO)}")
