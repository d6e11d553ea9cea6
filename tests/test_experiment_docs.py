"""The experiment scripts' commands quoted in the docs stay runnable: every flag they pass exists.

Commands are read where a reader copies them from: the fenced code and inline code spans of README.md,
docs/*.md and experiments/PERF.md, and the module docstrings of experiments/*.py (usage lines and
````code```` spans). Each ``<script>.py`` mention there (with or without ``experiments/``) is followed by
its flags up to a shell separator or a comment; each flag must be one the script's parser has, and the
goals jobs named to ``bench_goals.py --only`` / ``--skip`` must exist. The parsers are captured as
tests/test_cli_docs.py captures vidiff's: ``parse_args`` patched to hand back the parser instead of parsing.
A wrong flag in a device call's command costs that call (experiments/PERF.md, "Commands (GPU)"). The goals
runner's jobs are tabled twice, in its docstring and in PERF.md: both tables must list ``bench_goals.JOBS``.
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib
import re
from pathlib import Path

import pytest

from bench_scripts import EXPERIMENTS, REPO

SCRIPTS = sorted(p.stem for p in EXPERIMENTS.glob("*.py"))
MENTION = re.compile(r"(?:experiments/)?\b(" + "|".join(SCRIPTS) + r")\.py\b")
END_OF_COMMAND = re.compile(r";|\s(?:#|\||&&)|\)|`")
# Thin wrappers that hand their arguments to `vidiff train` (docs/cli.md is checked against its parser), and
# modules the benchmarks import, which take no command line.
NO_PARSER_OF_THEIR_OWN = {"train_dit", "train_vae", "ablations", "measure", "goal_jobs", "bench_dit_inputs", "peer_work"}
# Scripts that hand the flags they do not know to another script's runs.
PASSES_ON_TO = {"bench_max_tokens": "bench_dit"}


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def _raise_parser(self, *args, **kwargs):
    raise _Captured(self)


@functools.lru_cache(maxsize=None)
def option_strings(script: str) -> frozenset[str]:
    """Every option string of ``experiments/<script>.py``'s parser, which is built but never parses."""
    module = importlib.import_module(script)
    entry = getattr(module, "parse_args", None) or module.main
    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = _raise_parser
    try:
        entry([]) if entry.__code__.co_argcount else entry()
    except _Captured as captured:
        return frozenset(s for action in captured.parser._actions for s in action.option_strings)
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    raise AssertionError(f"experiments/{script}.py built no parser")


def snippets(path: Path) -> list[str]:
    """The code a reader would paste from ``path``: code lines and inline spans (a span's line breaks joined)."""
    text = path.read_text()
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
        return [line for line in doc.splitlines() if MENTION.search(line)] + [
            " ".join(span.split()) for span in re.findall(r"``(.+?)``", doc, re.S)]
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [line for block in fenced for line in block.splitlines()] + [
        " ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def commands() -> list[tuple[str, str, list[str]]]:
    """``(source, script, argument tokens)`` for every mention of a script in the docs."""
    sources = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), EXPERIMENTS / "PERF.md",
               *sorted(EXPERIMENTS.glob("*.py"))]
    found = []
    for path in sources:
        for snippet in snippets(path):
            for mention in MENTION.finditer(snippet):
                tokens = END_OF_COMMAND.split(snippet[mention.end():])[0].split()
                found.append((str(path.relative_to(REPO)), mention.group(1), tokens))
    return found


COMMANDS = commands()


def test_the_docs_quote_every_benchmark_with_its_flags():
    quoted = {script for _, script, tokens in COMMANDS if any(t.startswith("--") for t in tokens)}
    assert {"bench_dit", "bench_compare", "bench_goals", "bench_vae", "bench_attention", "bench_update",
            "bench_dispatch", "trace_summary"} <= quoted
    assert len(COMMANDS) > 60


@pytest.mark.parametrize("script", sorted({s for _, s, _ in COMMANDS} - NO_PARSER_OF_THEIR_OWN))
def test_quoted_flags_exist(script):
    known = option_strings(script) | (option_strings(PASSES_ON_TO[script]) if script in PASSES_ON_TO else frozenset())
    wrong = [(source, flag) for source, name, tokens in COMMANDS if name == script
             for flag in (t.split("=")[0] for t in tokens if t.startswith("--") and len(t) > 2)
             if flag not in known]
    assert not wrong, f"experiments/{script}.py has no such flag: {wrong}"


def test_quoted_goals_jobs_exist():
    import bench_goals

    for source, script, tokens in COMMANDS:
        if script != "bench_goals":
            continue
        for flag, value in zip(tokens, tokens[1:]):
            if flag in ("--only", "--skip") and re.fullmatch(r"[a-z0-9_,]+", value):
                unknown = set(value.split(",")) - set(bench_goals.JOB_NAMES)
                assert not unknown, f"{source}: bench_goals.py {flag} names no such job: {sorted(unknown)}"


def test_the_job_tables_list_the_goals_jobs_in_order_with_their_estimates():
    """bench_goals.py's docstring and PERF.md's "Commands (GPU)" both table the jobs: neither may drift from JOBS."""
    import bench_goals

    want = [(job.name, job.est_s) for job in bench_goals.JOBS]
    row = re.compile(r"^\| `?(\w+)`? \| (\d+) \|", re.M)
    for source in (bench_goals.__doc__, (EXPERIMENTS / "PERF.md").read_text()):
        got = [(name, float(est)) for name, est in row.findall(source) if name in bench_goals.JOB_NAMES]
        assert got == want
