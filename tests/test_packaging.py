"""The source distribution holds what the tests need, and the package configuration lists
every package (the applications' data included)."""
import importlib.util
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configured_packages():
    try:
        import tomllib
    except ImportError:                       # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return set(tomllib.load(f)["tool"]["setuptools"]["packages"])


def test_every_folder_of_the_package_is_configured():
    found = set()
    for folder, dirs, files in os.walk(os.path.join(ROOT, "ch8fast")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if any(not f.endswith((".so", ".pyd", ".pyc")) for f in files):
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert found == _configured_packages()


@pytest.mark.skipif(importlib.util.find_spec("build") is None
                    or importlib.util.find_spec("Cython") is None,
                    reason="needs the build and Cython packages (pip install -e '.[test]')")
def test_the_sdist_has_the_tests_helpers_and_data_without_warnings(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
                           "--outdir", str(tmp_path), ROOT],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "would be ignored" not in log and "SetuptoolsDeprecationWarning" not in log
    (sdist,) = list(tmp_path.glob("ch8fast-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {"LICENSE", "README.md", "pyproject.toml", "setup.py", "src/loops.pxi",
                "src/_core.pyx", "src/types.pxi", "src/shared.pxi",
                "tests/conftest.py", "tests/reference.py", "tests/_checkpoint_worker.py",
                "tests/mpi/dp_worker.py", "ch8fast/apps/data/digits.npz",
                "ch8fast/apps/data/DIGITS_LICENSE.txt", "ch8fast/apps/reference.py",
                "docs/conf.py", "docs/index.rst", ".ci/run"}
    assert expected <= names, expected - names
    for f in os.listdir(os.path.join(ROOT, "tests")):
        if f.endswith(".py"):
            assert f"tests/{f}" in names
    assert not any(n.endswith((".so", ".pyd")) for n in names)
