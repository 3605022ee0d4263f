"""Project-wide checks: lint-clean code, documented public API, no print() in the library."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = [ROOT / "savevm", *sorted((ROOT / "plugins").glob("*/savevm_*"))]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_clean() -> None:
    r = subprocess.run(["ruff", "check", "savevm", "plugins", "tests", "benchmarks", "examples"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("mypy") is None, reason="mypy is not installed (pip install -e '.[test]')")
def test_mypy_clean() -> None:
    r = subprocess.run(["mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("bandit") is None, reason="bandit is not installed (pip install -e '.[test]')")
def test_bandit_clean_at_medium_severity() -> None:
    r = subprocess.run(["bandit", "-q", "-ll", "-r", "savevm", *[str(p) for p in LIBRARY[1:]]], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
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


# ---------------------------------------------------------------- layering and packaging
#: package -> (distribution name, folder holding its pyproject.toml)
DISTRIBUTIONS = {
    "savevm": ("savevm", ROOT),
    "savevm_ram": ("savevm-ram", ROOT / "plugins" / "ram"),
    "savevm_xbzrle": ("savevm-xbzrle", ROOT / "plugins" / "xbzrle"),
    "savevm_rdma_stub": ("savevm-rdma-stub", ROOT / "plugins" / "rdma_stub"),
}
PLUGIN_PACKAGES = {"savevm_ram", "savevm_xbzrle", "savevm_rdma_stub"}
#: which plugin may import which: codecs and transports build on the RAM plugin's contract
PLUGIN_IMPORTS_ALLOWED = {("savevm_xbzrle", "savevm_ram"), ("savevm_rdma_stub", "savevm_ram")}
#: core modules that adapt the CLI to the RAM plugin: they may import it, inside functions only,
#: and must say what to install when it is missing (checked by test_core_cli_without_plugins)
CORE_CLI_ADAPTERS = {"savevm/cli/qemu_guest.py", "savevm/cli/analyze.py", "savevm/cli/rewrite.py"}
#: optional extras: module -> {third-party module it may import, inside functions only: the extra that declares it}
#: (each must say what to install when it is missing: checked by test_optional_extra_says_what_to_install)
OPTIONAL_EXTRA_IMPORTS = {"savevm/cli/plot.py": {"matplotlib": "plot"},
                          # an accelerator: without it zlib-ng compresses (nothing to install, nothing fails)
                          "plugins/ram/savevm_ram/compress.py": {"isal": "isal"}}


def _package_files(pkg: str) -> list[Path]:
    base = DISTRIBUTIONS[pkg][1] / pkg
    return sorted(base.rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, inside a function) of every absolute import in a file."""
    tree = ast.parse(path.read_text())
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name.split(".")[0], child.lineno, in_func) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module.split(".")[0], child.lineno, in_func))
            visit(child, in_func or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return out


def test_layering_rules() -> None:
    """The core never imports a plugin; the library never imports the CLI; plugins stay apart."""
    bad = []
    for pkg in DISTRIBUTIONS:
        for p in _package_files(pkg):
            rel = str(p.relative_to(ROOT))
            is_cli = "cli" in p.parts or p.name in ("cli.py", "__main__.py")
            for mod, line, in_func in _imports(p):
                full = f"{rel}:{line} imports {mod}"
                if pkg == "savevm" and mod in PLUGIN_PACKAGES:
                    if not (rel in CORE_CLI_ADAPTERS and in_func):
                        bad.append(f"{full} (the core never imports a plugin)")
                if pkg in PLUGIN_PACKAGES and mod in PLUGIN_PACKAGES and mod != pkg \
                        and (pkg, mod) not in PLUGIN_IMPORTS_ALLOWED:
                    bad.append(f"{full} (plugins do not import each other)")
            if not is_cli:
                text = p.read_text()
                if re.search(r"^\s*(from|import) savevm\.cli\b", text, flags=re.M):
                    bad.append(f"{rel} imports savevm.cli (the library never imports the CLI)")
    assert not bad, "\n".join(bad)


def _names_of(deps: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip().lower().replace("_", "-") for d in deps}


def _declared(pyproject: Path) -> set[str]:
    data = tomllib.loads(pyproject.read_text())
    return _names_of(data["project"].get("dependencies", []))


def _extra(pyproject: Path, extra: str) -> set[str]:
    data = tomllib.loads(pyproject.read_text())
    return _names_of(data["project"].get("optional-dependencies", {}).get(extra, []))


def _distribution_of(module: str) -> str | None:
    if module in DISTRIBUTIONS:
        return DISTRIBUTIONS[module][0]
    dists = importlib.metadata.packages_distributions().get(module)
    return dists[0].lower().replace("_", "-") if dists else None


@pytest.mark.parametrize("pkg", sorted(DISTRIBUTIONS))
def test_each_distribution_declares_what_it_imports(pkg: str) -> None:
    dist, folder = DISTRIBUTIONS[pkg]
    declared = _declared(folder / "pyproject.toml")
    imported: dict[str, str] = {}
    for p in _package_files(pkg):
        for mod, line, in_func in _imports(p):
            if mod in sys.stdlib_module_names or mod == pkg or mod == "__future__":
                continue
            rel = str(p.relative_to(ROOT))
            if pkg == "savevm" and rel in CORE_CLI_ADAPTERS and in_func and mod in PLUGIN_PACKAGES:
                continue  # optional, with a clear message when missing (see test_layering_rules)
            extra = OPTIONAL_EXTRA_IMPORTS.get(rel, {}).get(mod)
            if extra is not None:
                d = _distribution_of(mod) or mod
                assert in_func, f"{rel}:{line}: {mod} belongs to the {extra!r} extra: import it inside a function"
                assert d in _extra(folder / "pyproject.toml", extra), \
                    f"{rel}:{line}: {mod} ({d}) is not declared in the {extra!r} extra of {dist}"
                continue
            imported.setdefault(mod, f"{rel}:{line}")
    missing = {}
    for mod, where in imported.items():
        d = _distribution_of(mod)
        assert d is not None, f"{where}: cannot tell which distribution provides {mod!r}"
        if d not in declared:
            missing[d] = where
    assert not missing, f"{dist} imports undeclared distributions: {missing}"
    unused = declared - {_distribution_of(m) for m in imported}
    assert not unused, f"{dist} declares dependencies it never imports: {sorted(unused)}"


def test_optional_extra_says_what_to_install(tmp_path: Path) -> None:
    """Without matplotlib, ``--plot`` names the extra before any migration starts; nothing else needs it."""
    block = ("import sys\n"
             "sys.modules['matplotlib'] = None\n"
             "from savevm.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    argv = ["migrate", "tcp:127.0.0.1:1", "--guest", "savevm_ram.demo:DemoProgram", "--guest-arg", "size=64K",
            "--plot", str(tmp_path / "p.png")]
    r = subprocess.run([sys.executable, "-c", block, *argv], capture_output=True, text=True, timeout=60, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out and "pip install 'savevm[plot]'" in out, out
    assert not (tmp_path / "p.png").exists()
    r = subprocess.run([sys.executable, "-c", block, "demo", "--size", "64K", "--plot", str(tmp_path / "p.png")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "pip install 'savevm[plot]'" in r.stdout + r.stderr, r.stdout + r.stderr
    for rel in OPTIONAL_EXTRA_IMPORTS:
        for mod, _line, in_func in _imports(ROOT / rel):
            if mod in OPTIONAL_EXTRA_IMPORTS[rel]:
                assert in_func, f"{rel} imports {mod} at module level"


def test_core_cli_without_plugins(tmp_path: Path) -> None:
    """``pip install savevm`` alone: the CLI works, or says what to install; never a traceback."""
    block = ("import sys\n"
             "for m in ('savevm_ram', 'savevm_xbzrle', 'savevm_rdma_stub'):\n"
             "    sys.modules[m] = None\n"
             "from savevm.plugins import PluginHost\n"
             "import savevm.plugins\n"
             "savevm.plugins.ENTRY_POINT_GROUP = 'savevm-none'\n"
             "from savevm.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    stream = tmp_path / "s.qevm"
    import savevm
    import savevm_ram

    reg = savevm.SectionRegistry()
    savevm_ram.register_ram(reg, savevm_ram.RAMList([savevm_ram.RAMBlock("pc.ram", bytearray(8192))]))
    savevm.snapshot(stream, reg)
    cases = {
        ("--help",): (0, "migrate"),
        ("demo",): (2, "install savevm-ram"),
        ("bench", "--size", "4K", "--runs", "1"): (2, "savevm-ram"),
        ("analyze", str(stream)): (None, "savevm-ram"),
        ("incoming", "tcp:127.0.0.1:0", "--guest", "savevm.cli.qemu_guest:QemuGuest"): (2, "savevm-ram"),
    }
    for argv, (code, text) in cases.items():
        r = subprocess.run([sys.executable, "-c", block, *argv], capture_output=True, text=True, timeout=60,
                           cwd=ROOT)
        out = r.stdout + r.stderr
        assert "Traceback" not in out, (argv, out)
        assert text in out, (argv, out)
        if code is not None:
            assert r.returncode == code, (argv, r.returncode, out)
        else:
            assert r.returncode != 0, (argv, out)


# ---------------------------------------------------------------- hooks
def _all_hooks() -> dict[str, Any]:
    """Every hook with a spec in a host with every installed plugin (core and plugin hookspecs)."""
    from savevm.plugins import PluginHost

    host = PluginHost()
    out = {}
    for name in dir(host.pm.hook):
        caller = getattr(host.pm.hook, name)
        spec = getattr(caller, "spec", None)
        if spec is not None:
            out[name] = spec.function
    return out


def test_every_hook_is_documented_and_tested() -> None:
    hooks = _all_hooks()
    assert {"savevm_configure", "ram_control_save_page", "ram_page_codecs"} <= set(hooks)
    sources = "\n".join(p.read_text(errors="replace") for p in (ROOT / "tests").rglob("*.py"))
    problems = []
    for name, fn in sorted(hooks.items()):
        doc = inspect.getdoc(fn) or ""
        if len(doc) < 80 or ":return:" not in doc:
            problems.append(f"{name}: docstring must say when it is called and document its params and return")
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        for p in params:
            if f":param {p}:" not in doc:
                problems.append(f"{name}: parameter {p!r} is not documented")
        if f"def test_hook_{name}(" not in sources:
            problems.append(f"{name}: needs a test named test_hook_{name}")
    assert not problems, "\n".join(problems)
