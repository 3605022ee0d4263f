"""Project-wide checks: lint-clean code, documented public API, no print() in the library."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = [ROOT / "savevm", *sorted((ROOT / "plugins").glob("*/savevm_*"))]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_clean() -> None:
    r = subprocess.run(["ruff", "check", "savevm", "plugins", "tests", "benchmarks"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _library_files() -> list[Path]:
    return [p for d in LIBRARY for p in d.rglob("*.py")]


def test_no_print_in_library_code() -> None:
    offenders = []
    for p in _library_files():
        if "cli" in p.parts or p.name == "cli.py":
            continue  # the CLI layer is where output belongs
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_public_modules_and_classes_have_docstrings() -> None:
    missing = []
    for p in _library_files():
        tree = ast.parse(p.read_text())
        if not ast.get_docstring(tree):
            missing.append(str(p.relative_to(ROOT)))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and not ast.get_docstring(node):
                missing.append(f"{p.relative_to(ROOT)}:{node.name}")
    assert not missing, missing


def test_library_is_quiet_unless_configured() -> None:
    code = ("import savevm, savevm_ram, tempfile\n"
            "reg = savevm.SectionRegistry()\n"
            "savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock('a', bytearray(8192))]))\n"
            "savevm.snapshot(tempfile.mktemp(), reg)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
