"""The architecture's import directions, read from the source (no import runs).

- The batch core (`lakehouse` outside `ml`, `cli` and `report`) imports neither the ML
  side, the command line, the report, nor the Feast repository. (`report` reads both
  sides, as the command line does.) (It does reach two entry packages: `pipeline`
  builds the Luigi `tasks`, and `status` reads the CDC slots through `stream.setup`.)
- The ML side (`lakehouse.ml`) imports the core, never the entry points or `feature_repo`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _offences(folder: Path, forbidden: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(s) for s in skip):
            continue
        for name in sorted(_imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{rel} imports {name}")
    return found


def test_the_core_never_imports_the_ml_side_or_the_entry_points() -> None:
    forbidden = ("lakehouse.ml", "lakehouse.cli", "lakehouse.report", "feature_repo")
    skip = ("lakehouse/ml/", "lakehouse/cli/", "lakehouse/report/", "lakehouse/entry.py")
    offences = _offences(ROOT / "lakehouse", forbidden, skip=skip)
    assert offences == []


def test_the_ml_side_imports_the_core_only() -> None:
    forbidden = ("lakehouse.cli", "lakehouse.report", "tasks", "stream", "feature_repo")
    assert _offences(ROOT / "lakehouse" / "ml", forbidden) == []


def test_the_layers_are_where_the_checks_look() -> None:
    """Guard the guard: a renamed folder would make the checks above vacuous."""
    assert (ROOT / "lakehouse" / "ml" / "features.py").is_file()
    assert "lakehouse.ml.definitions.build" in _imports(ROOT / "feature_repo" / "features.py")
    assert _imports(ROOT / "lakehouse" / "ml" / "tasks.py") & {"lakehouse.settings"}
