"""docs/cli.md stays true to the ``vidiff`` parsers.

The parsers are the ones ``vidiff.cli.main`` builds: it is called with
``argparse.ArgumentParser.parse_known_args`` patched to hand back the
top-level parser instead of parsing, once per subcommand (main fills in only
the chosen subcommand's flags). For every subcommand, nested ones such as
``eval adherence`` included, the page's section (the text under the heading
``vidiff <subcommand>``, up to the next heading) must have a table row for
each option string and positional, no row for a flag the parser lacks, the
parser's default where it has a plain one, and examples that parse.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vidiff import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def _subparsers(parser: argparse.ArgumentParser):
    """The parser's subparsers action, or None."""
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


@functools.lru_cache(maxsize=None)
def top_parser(command: str | None) -> argparse.ArgumentParser:
    """The top-level parser ``vidiff.cli.main([command])`` builds, captured before it parses anything."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        try:
            cli.main([command] if command else [])
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"vidiff.cli.main([{command!r}]) never parsed its arguments")


@functools.lru_cache(maxsize=None)
def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """``{"world": parser, ..., "eval": parser, "eval adherence": parser, ...}`` as ``vidiff`` builds them."""
    found = {}

    def walk(name, parser):
        found[name] = parser
        if (action := _subparsers(parser)) is not None:
            for child, sub in action.choices.items():
                walk(f"{name} {child}", sub)

    for command in _subparsers(top_parser(None)).choices:
        walk(command, _subparsers(top_parser(command)).choices[command])
    return found


def sections(text: str) -> dict[str, str]:
    """Heading text (``#``s and backticks stripped) -> the lines under it, up to the next heading."""
    out, name, fenced = {}, None, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            name = m.group(1).replace("`", "").strip()
            assert name not in out, f"docs/cli.md has two headings {name!r}"
            out[name] = []
            continue
        if name is not None:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def table_rows(section: str) -> list[tuple[list[str], str]]:
    """``(tokens of the flag cell, default cell)`` for each row of the section's ``| flag | default | meaning |`` table."""
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] == "flag" or set(cells[0]) <= set("-: "):
            continue
        rows.append((cells[0].replace("`", "").replace(",", " ").split(), cells[1]))
    return rows


def documented_actions(parser: argparse.ArgumentParser):
    """``(names, action)`` for every option and positional but ``--help``: option strings, or the metavar/dest."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            yield list(action.option_strings), action
        else:
            metavar = action.metavar if isinstance(action.metavar, str) else None
            yield [metavar or action.dest], action


def default_shown(action: argparse.Action, cell: str) -> bool:
    """Whether the default cell states the parser's default (required, off, the number, the `string`)."""
    if action.required:
        return "required" in cell
    default = action.default
    if isinstance(default, bool):
        return ("on" if default else "off") in cell
    if isinstance(default, (int, float)):
        return any(float(n) == default for n in re.findall(r"-?\d+(?:\.\d+)?", cell))
    if isinstance(default, str) and default != argparse.SUPPRESS:
        return f"`{default}`" in cell
    return True  # None: worked out at run time; the cell says how, in words


def examples(section: str) -> list[list[str]]:
    """The argv after ``vidiff`` of each command line in the section's bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["vidiff"]:
                out.append(argv[1:])
    return out


@pytest.fixture(scope="module")
def doc_sections():
    return sections(DOC.read_text())


NAMES = sorted(subcommand_parsers())


def test_every_subcommand_is_found():
    assert {"world", "prepare", "train", "plan", "generate", "eval", "eval adherence", "eval modes"} <= set(NAMES)


def test_python_m_vidiff_is_the_command():
    """``python -m vidiff`` failed: "No module named vidiff.__main__"."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DOC.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "vidiff", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: vidiff [-h] COMMAND ..."), done.stdout

@pytest.mark.parametrize("name", NAMES)
def test_every_flag_is_in_its_section(doc_sections, name):
    assert f"vidiff {name}" in doc_sections, f"docs/cli.md has no heading `vidiff {name}`"
    documented = {token for tokens, _ in table_rows(doc_sections[f"vidiff {name}"]) for token in tokens}
    missing = [n for names, _ in documented_actions(subcommand_parsers()[name]) for n in names if n not in documented]
    assert not missing, f"`vidiff {name}` has {missing} but its table in docs/cli.md does not"


@pytest.mark.parametrize("name", NAMES)
def test_no_flag_in_the_docs_that_the_parser_lacks(doc_sections, name):
    known = {n for names, _ in documented_actions(subcommand_parsers()[name]) for n in names}
    stale = [t for tokens, _ in table_rows(doc_sections[f"vidiff {name}"]) for t in tokens
             if t.startswith("-") and t not in known]
    assert not stale, f"docs/cli.md lists {stale} under `vidiff {name}`, which has no such flag"


@pytest.mark.parametrize("name", NAMES)
def test_defaults_match_the_parser(doc_sections, name):
    rows = table_rows(doc_sections[f"vidiff {name}"])
    wrong = []
    for names, action in documented_actions(subcommand_parsers()[name]):
        cells = [cell for tokens, cell in rows if names[0] in tokens]
        if cells and not default_shown(action, cells[0]):
            wrong.append(f"{names[0]}: docs say {cells[0]!r}, parser has "
                         f"{'required' if action.required else repr(action.default)}")
    assert not wrong, f"`vidiff {name}` defaults in docs/cli.md: {wrong}"


@pytest.mark.parametrize("name", NAMES)
def test_examples_parse(doc_sections, name):
    commands = examples(doc_sections[f"vidiff {name}"])
    if _subparsers(subcommand_parsers()[name]) is None:
        assert commands, f"docs/cli.md shows no example of `vidiff {name}`"
    for argv in commands:
        assert " ".join(argv[: len(name.split())]) == name, f"`vidiff {shlex.join(argv)}` is under `vidiff {name}`"
        try:
            _, extra = top_parser(argv[0]).parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"docs/cli.md example `vidiff {shlex.join(argv)}` does not parse")
        module = importlib.import_module(cli.SUBCOMMANDS[argv[0]][0])
        overrides_ok = getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False)
        unknown = [e for e in extra if not (overrides_ok and e.startswith("--config."))]
        assert not unknown, f"docs/cli.md example `vidiff {shlex.join(argv)}`: unrecognized {unknown}"
