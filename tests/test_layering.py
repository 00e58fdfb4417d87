"""lorakit's packages import downwards only: read from the source (every import, function-level ones
included), so a circle is caught before it bites at import time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"


def imported_names(path: Path) -> set[str]:
    """Every lorakit module (or name in one) the file imports, at any depth (TYPE_CHECKING ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.startswith("lorakit.")}
    return found


def imported_packages(package: str) -> set[str]:
    """The other lorakit packages (or top-level modules) any module of `package` imports."""
    found = {name.split(".")[1] for path in (SRC / package).rglob("*.py") for name in imported_names(path)}
    return found - {package}


def test_weights_is_the_ground_floor() -> None:
    assert imported_packages("weights") <= {"errors"}


@pytest.mark.parametrize("lower, upper", [("lora", "quant"), ("infer", "train"), ("data", "train")])
def test_lower_packages_never_import_upper_ones(lower, upper) -> None:
    assert upper not in imported_packages(lower)


def test_arithmetic_is_pure_math() -> None:
    """lora/arithmetic.py works on factors alone; reaching into a LoraModel is lora/weighted.py's job."""
    assert {name.split(".")[1] for name in imported_names(SRC / "lora" / "arithmetic.py")} <= {"config", "errors"}


def test_packages_import_in_no_circle() -> None:
    """Following imports from any package never leads back to it (circles of any length)."""
    packages = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file())
    imports = {package: imported_packages(package) & set(packages) for package in packages}
    for start in packages:
        seen, todo = set(), list(imports[start])
        while todo:
            package = todo.pop()
            assert package != start, f"{start} imports itself back through {sorted(seen)}"
            if package not in seen:
                seen.add(package)
                todo += imports[package]
