"""pyproject.toml and what a build of it holds: checked on the files, without building (the tests' venv need not
have the build backend's version)."""
import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floor(requirement: str) -> tuple[int, ...]:
    """``"setuptools>=77.0"`` -> ``(77, 0)``; no ``>=``: ``()``."""
    found = re.search(r">=\s*([\d.]+)", requirement)
    return tuple(int(part) for part in found.group(1).split(".")) if found else ()


def test_the_build_backend_floor_reads_the_license_field():
    """``license = "Apache-2.0"`` (an SPDX string, PEP 639) is a configuration error before setuptools 77
    ("project.license must be valid exactly by one definition"): a build without isolation on a fresh venv's
    setuptools 65 failed though the floor said 64."""
    setuptools = next(r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    assert isinstance(PYPROJECT["project"]["license"], str)
    assert _floor(setuptools) >= (77,), setuptools


def _source_files(folder: Path) -> set[str]:
    return {path.relative_to(ROOT).as_posix() for path in folder.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


def test_the_sdist_holds_everything_the_tests_read(monkeypatch):
    """Without MANIFEST.in the sdist held tests/test_*.py alone (no conftest.py, tiny_model.py, goldens, experiments):
    13 test modules failed to collect. The file list is setuptools' own reading of MANIFEST.in."""
    egg_info = pytest.importorskip("setuptools.command.egg_info", reason="reads MANIFEST.in as an sdist build does")
    monkeypatch.chdir(ROOT)  # its commands glob from the working directory
    file_list = egg_info.FileList()
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            file_list.process_template_line(line)
    held = {Path(name).as_posix() for name in file_list.files}
    needed = {"README.md", "LICENSE", "Makefile", "pyproject.toml"}.union(
        *(_source_files(ROOT / folder) for folder in ("tests", "experiments", "docs", "colab", ".ci")))
    assert sorted(needed - held) == []
    assert [name for name in held if name.endswith(".pyc")] == []


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports() -> set[str]:
    """Top-level names vidiff's own source imports (lazy imports included) that are neither stdlib nor vidiff."""
    found = set()
    for path in (ROOT / "vidiff").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "vidiff"}


def test_every_package_vidiff_imports_is_declared():
    """huggingface_hub and ml_dtypes were imported by vidiff but came only through transformers and jax."""
    declared = {_normalized(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in PYPROJECT["project"]["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    undeclared = {name: providers.get(name) for name in _third_party_imports()
                  if not declared & {_normalized(d) for d in providers.get(name, [name])}}
    assert undeclared == {}, "declare these in pyproject.toml's dependencies (import: distributions)"
