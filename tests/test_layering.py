"""The import rule of docs/architecture.md, checked on the source: lower layers never import higher ones.

Every ``import vidiff...`` counts, also one inside a function (a lazy import is still a dependency). A new
top-level module or package of ``vidiff`` must be given its place in ``MAY_IMPORT``.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vidiff"
_BOTTOM = {"io", "checks", "parallel", "distributed", "provenance"}
_SAMPLING = _BOTTOM | {"models", "diffusion"}
_PIPELINE = _SAMPLING | {"pipeline", "pipeline_inputs", "pipeline_load", "clip_rules"}
# What each part of vidiff may import of the others (its own modules always).
MAY_IMPORT = {
    **{part: set() for part in _BOTTOM},
    "models": _BOTTOM,
    "diffusion": _BOTTOM | {"models"},
    "pipeline_inputs": {"checks", "io"},  # io: a mode's input frames
    "clip_rules": _BOTTOM | {"models"},  # the clips a model makes, as plain numbers
    "pipeline_load": _SAMPLING | {"clip_rules"},
    "pipeline": _PIPELINE,
    "cli_flags": {"io", "checks"},
    "generate": _PIPELINE | {"cli_flags", "generate_record"},
    "generate_record": _PIPELINE | {"cli_flags"},  # what vidiff generate's files record of how they were made
    "eval": _PIPELINE | {"cli_flags", "data"},
    "data": {"io", "checks"},  # not jax's side: models, sampling and generation run without the data packages
    "train": _SAMPLING | {"data"},
    "plan": _SAMPLING | {"data", "train"},
    "configs": _SAMPLING | {"data", "train"},  # experiment configs: get_config() files loaded by name
    "cli": None,  # the command line dispatches to every command
    "__main__": {"cli"},  # python -m vidiff
}


def _part(module: str) -> str:
    """``vidiff.models.dit`` -> ``models``; ``vidiff.generate`` -> ``generate``."""
    return module.split(".")[1]


def _imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from vidiff import io`` imports vidiff.io; ``from vidiff.io import x`` imports vidiff.io
            found.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
                         if node.module == "vidiff" else [node.module])
    return {name for name in found if name.startswith("vidiff.")}


def test_lower_layers_never_import_higher_ones():
    violations, unplaced = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if len(relative.parts) == 2 and relative.parts[1] == "__init__":
            continue  # the package's own __init__ documents, it does not import its parts
        part = relative.parts[1]
        if part not in MAY_IMPORT:
            unplaced.add(part)
            continue
        allowed = MAY_IMPORT[part]
        for name in _imports_of(path):
            target = _part(name)
            if allowed is not None and target != part and target not in allowed:
                violations.append(f"{'/'.join(relative.parts)}.py imports {name}")
    assert not unplaced, f"give these parts of vidiff a place in MAY_IMPORT: {sorted(unplaced)}"
    assert not violations, violations


def test_the_rule_catches_an_upward_import(tmp_path):
    """The scan itself: a models module importing the pipeline would be reported."""
    module = tmp_path / "dit.py"
    module.write_text("def f():\n    from vidiff.pipeline import TextToVideo\n    from vidiff import io\n")
    assert _imports_of(module) == {"vidiff.pipeline", "vidiff.io"}
    assert "pipeline" not in MAY_IMPORT["models"] and "io" in MAY_IMPORT["models"]
