"""The library apart from its applications, the version in one place, and what a new
user sees when the source folder shadows an installed copy."""
import ast
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

import ch8fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "ch8fast")


def library_modules():
    """Every module of the library: ch8fast's modules and subpackages but the
    applications (ch8fast.apps) and the command-line entry point (ch8fast.__main__)."""
    out = []
    for folder, dirs, files in os.walk(PKG):
        dirs[:] = [d for d in dirs if d not in ("apps", "__pycache__")]
        for f in files:
            if f.endswith(".py") and not (folder == PKG and f == "__main__.py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3]
                name = rel.replace(os.sep, ".")
                out.append(name[:-len(".__init__")] if name.endswith(".__init__") else name)
    return sorted(out)


def test_the_walk_finds_the_library():
    mods = library_modules()
    assert {"ch8fast", "ch8fast.optim", "ch8fast.schedules.sampling",
            "ch8fast.init.calibration", "ch8fast.lr_finder"} <= set(mods)
    assert not any(m.startswith("ch8fast.apps") for m in mods)


def test_importing_the_library_loads_nothing_of_the_applications():
    """In a fresh interpreter: import ch8fast, then every library module (the union of what
    any of them loads), and look for ch8fast.apps in sys.modules. ch8fast.torch needs
    torch, an optional peer: without it that module is left out (the static check below
    still reads it)."""
    mods = [m for m in library_modules()
            if m != "ch8fast.torch" or importlib.util.find_spec("torch") is not None]
    code = ("import sys, importlib\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('ch8fast.apps')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _imported_modules(path, package):
    """The absolute names of the modules an ast of ``path`` imports (relative resolved)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            yield mod
            for a in node.names:
                yield f"{mod}.{a.name}"


@pytest.mark.parametrize("module", library_modules())
def test_no_import_statement_of_the_library_names_the_applications(module):
    path = os.path.join(ROOT, *module.split("."))
    is_pkg = os.path.isdir(path)
    path = os.path.join(path, "__init__.py") if is_pkg else path + ".py"
    package = module if is_pkg else module.rpartition(".")[0]
    bad = [m for m in _imported_modules(path, package)
           if m == "ch8fast.apps" or m.startswith("ch8fast.apps.")]
    assert not bad, f"{module} imports {bad}"


def test_the_static_check_sees_an_application_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from .apps import demo\nimport ch8fast.apps.bench\n")
    found = list(_imported_modules(str(src), "ch8fast"))
    assert "ch8fast.apps" in found and "ch8fast.apps.bench" in found


def test_the_applications_use_only_public_names_of_the_library():
    """An import of a private name (``_x``) of a library module from the applications."""
    for folder, _, files in os.walk(os.path.join(PKG, "apps")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            for m in _imported_modules(path, "ch8fast.apps"):
                parts = m.split(".")
                assert not (parts[0] == "ch8fast" and "apps" not in parts
                            and any(p.startswith("_") and not p.startswith("__")
                                    for p in parts[1:])), f"{path} imports {m}"


def test_version_in_one_place():
    """pyproject.toml reads the version from ch8fast.__version__; ch8fast --version."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'dynamic = ["version"]' in text and 'version = {attr = "ch8fast.__version__"}' in text
    assert "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0]
    proc = subprocess.run([sys.executable, "-m", "ch8fast", "--version"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ch8fast {ch8fast.__version__}"


def test_a_source_folder_without_kernels_says_what_to_do(tmp_path):
    """After `pip install .` in the repository root, `import ch8fast` there imports the
    unbuilt source folder; it once failed with a misleading 'circular import'."""
    shutil.copytree(PKG, tmp_path / "ch8fast",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    code = ("import sys\n"
            # an editable install would find the kernels of this checkout: hide it
            "sys.meta_path[:] = [f for f in sys.meta_path\n"
            "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
            "import ch8fast\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "compiled kernels are not in" in last and "pip install -e ." in last
    assert "circular import" not in last


PRIVATE_MODULES = {"_isa", "_validation", "_core", "_kernels", "_kernels_avx2",
                   "_kernels_avx512", "_statedict", "_points", "_build", "_groups"}


@pytest.mark.parametrize("module", library_modules())
def test_no_library_module_imports_another_modules_private_name(module):
    """``from .checkpoint import _canonical`` couples two modules through a name that
    either may change: use a public name (ruff's PLC2701 checks imports from outside the
    package only)."""
    path = os.path.join(ROOT, *module.split("."))
    path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    bad = [f"from {'.' * n.level}{n.module or ''} import {a.name}"
           for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
           for a in n.names
           if a.name.startswith("_") and not a.name.startswith("__")
           and a.name not in PRIVATE_MODULES]
    assert not bad, f"{module}: {bad}"
