"""pyproject.toml and what a build of it holds: checked on the files, without building (the tests' venv need not
have the build backend's version)."""
import re
import tomllib
from pathlib import Path

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
