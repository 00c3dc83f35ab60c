"""The layering of docs/architecture.md, enforced: core/ is the library (it imports none of
checks/, plugin, report/, api, cli, nor pytest); checks/ import neither pytest nor plugin,
report/, api or cli. Read from the source (imports inside functions included), nothing run."""
import ast
import pathlib

import pytest

import pytest_modelcheck

ROOT = pathlib.Path(pytest_modelcheck.__file__).parent

#: layer -> the modules (package-relative prefixes) and top-level packages it must not import
FORBIDDEN = {
    "core": ("checks", "plugin", "report", "api", "cli", "pytest"),
    "checks": ("plugin", "report", "api", "cli", "pytest"),
}


def imported_modules(path: pathlib.Path) -> list:
    """``(line, absolute module name)`` of every import in the file, relative ones resolved."""
    package = ["pytest_modelcheck", *path.relative_to(ROOT).parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, name))
    return found


def violations(layer: str) -> list:
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, name in imported_modules(path):
            for forbidden in FORBIDDEN[layer]:
                target = forbidden if forbidden == "pytest" else f"pytest_modelcheck.{forbidden}"
                if name == target or name.startswith(target + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer):
    assert violations(layer) == []


def test_the_scan_sees_a_violation(tmp_path, monkeypatch):
    # a core module importing report, relatively and inside a function: found
    fake = tmp_path / "pkg"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from ..report.json_report import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    assert violations("core") == ["core/bad.py:2 imports pytest_modelcheck.report.json_report"]
