"""The layering of docs/architecture.md: library modules below, entry points above; no entry point imports
another entry point (each stays a script a reader can change without breaking the others), and no library
module imports an entry point."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Scripts users run: train.py, sample_ddp.py, and every module of analysis/ and benchmarks/ with a __main__ block.
# What they share lives in library modules (e.g. benchmarks/harness.py, which is not a script).
ENTRY_POINTS = ["train.py", "sample_ddp.py"] + sorted(
    str(p.relative_to(ROOT))
    for folder in ("analysis", "benchmarks")
    for p in ROOT.glob(f"{folder}/*.py")
    if 'if __name__ == "__main__"' in p.read_text()
)


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_entry_point_imports_another():
    entry = {module_name(p) for p in ENTRY_POINTS}
    offenders = {}
    for path in ENTRY_POINTS:
        bad = sorted(imported_modules(ROOT / path) & (entry - {module_name(path)}))
        if bad:
            offenders[path] = bad
    assert not offenders, f"entry points import entry points (move the shared code into a library module): {offenders}"


def test_library_modules_import_no_entry_point():
    entry = {module_name(p) for p in ENTRY_POINTS}
    library = [
        p
        for p in ROOT.glob("**/*.py")
        if str(p.relative_to(ROOT)) not in ENTRY_POINTS and p.relative_to(ROOT).parts[0] not in (".venv", "tests")
    ]
    offenders = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & entry) for p in library}
    assert not {k: v for k, v in offenders.items() if v}, offenders
