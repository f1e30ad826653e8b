"""The documentation: it builds with warnings as errors, and every Python example in it
and in the README runs as written (data included)."""
import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
HAS = {m: importlib.util.find_spec(m) is not None for m in ("sphinx", "torch", "mpi4py",
                                                            "matplotlib")}


def rst_blocks(path):
    """(line, code) of every ``.. code-block:: python`` of an .rst file."""
    lines = open(path, encoding="utf-8").read().split("\n")
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)\.\. code-block:: python\s*$", line)
        if not m:
            continue
        indent = len(m.group(1))
        j, body = i + 1, []
        while j < len(lines) and (not lines[j].strip() or
                                  len(lines[j]) - len(lines[j].lstrip()) > indent):
            body.append(lines[j])
            j += 1
        code = [b for b in body if b.strip()]
        strip = min(len(b) - len(b.lstrip()) for b in code)
        out.append((i + 1, "\n".join(b[strip:] for b in body).strip() + "\n"))
    return out


def md_blocks(path):
    """(line, code) of every ```python block of a Markdown file."""
    text = open(path, encoding="utf-8").read()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        out.append((text[:m.start()].count("\n") + 1, m.group(1)))
    return out


def all_blocks():
    blocks = [(f"README.md:{n}", code) for n, code in md_blocks(os.path.join(ROOT, "README.md"))]
    for f in sorted(os.listdir(DOCS)):
        if f.endswith(".rst"):
            blocks += [(f"docs/{f}:{n}", code) for n, code in rst_blocks(os.path.join(DOCS, f))]
    return blocks


BLOCKS = all_blocks()


def test_the_examples_are_found():
    """The parser finds the examples (a broken parser would make the next test vacuous)."""
    where = {b[0].split(":")[0] for b in BLOCKS}
    assert {"README.md", "docs/quickstart.rst", "docs/optimizers.rst", "docs/contract.rst",
            "docs/schedules.rst", "docs/checkpoints.rst", "docs/migrating.rst",
            "docs/distributed.rst", "docs/torch.rst", "docs/storage.rst",
            "docs/sparse.rst"} <= where
    assert len(BLOCKS) >= 24
    for f in os.listdir(DOCS):             # no Python example in another directive
        if f.endswith(".rst"):
            text = open(os.path.join(DOCS, f), encoding="utf-8").read()
            assert not re.search(r"^\s*\.\. (code|sourcecode|code-block):: (py|python3|pycon)\s*$",
                                 text, re.M), f
            assert ">>>" not in text, f"{f}: write examples as complete code-blocks"


@pytest.mark.parametrize("where, code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_example_runs(where, code, tmp_path):
    for module in ("torch", "mpi4py", "matplotlib"):
        if re.search(rf"^\s*(import|from) {module}\b", code, re.M) or (
                module == "mpi4py" and "ch8fast.distributed" in code):
            if not HAS[module]:
                pytest.skip(f"{where} needs {module}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path,
                          env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == 0, f"{where}\n{code}\n{proc.stdout}\n{proc.stderr}"


LIBRARY_DOCTESTS = ["ch8fast.rules", "ch8fast.flat", "ch8fast.functional",
                    "ch8fast.schedules.sampling", "ch8fast.torch"]


@pytest.mark.parametrize("module", LIBRARY_DOCTESTS)
def test_docstring_examples_run(module):
    if module == "ch8fast.torch" and not HAS["torch"]:
        pytest.skip("ch8fast.torch needs torch")
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_every_docstring_example_is_run():
    """A module of the library whose docstrings hold examples is in LIBRARY_DOCTESTS."""
    found = []
    for folder, dirs, files in os.walk(os.path.join(ROOT, "ch8fast")):
        for f in files:
            if f.endswith(".py") and ">>>" in open(os.path.join(folder, f)).read():
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3]
                found.append(rel.replace(os.sep, ".").replace(".__init__", ""))
    assert sorted(found) == sorted(LIBRARY_DOCTESTS)


@pytest.mark.skipif(not HAS["sphinx"], reason="Sphinx is not installed "
                                              "(pip install -e '.[docs]')")
def test_the_docs_build_with_warnings_as_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
                           "-b", "html", "-d", str(tmp_path / "doctrees"), DOCS,
                           str(tmp_path / "html")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    for page in ("index", "quickstart", "optimizers", "contract", "migrating", "api"):
        assert (tmp_path / "html" / f"{page}.html").is_file()
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    for name in ("ch8fast.SGD", "linear_decay", "choose_lr", "calibrate", "save_checkpoint",
                 "MinibatchSampler", "DataParallel"):
        assert name in api, name
    # the equations render offline: the pages load MathJax from the site itself
    page = (tmp_path / "html" / "optimizers.html").read_text(encoding="utf-8")
    scripts = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page, re.I)
    assert scripts and all(not s.startswith(("http:", "https:", "//")) for s in scripts)
    for s in scripts:
        assert (tmp_path / "html" / s.split("?")[0]).is_file(), s


def test_the_readme_is_a_landing_page():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 200
    setup = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[demo]" && ch8fast demo'
    tests = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest'
    assert setup in text and tests in text
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert tests in ci                     # CI runs the README's test command word for word
    for target in re.findall(r"\]\(((?:docs|benchmarks|examples)/[^)#]+)\)", text):
        assert os.path.exists(os.path.join(ROOT, target)), target
    for target in re.findall(r"\]\(([A-Z]+[^)]*)\)", text):
        assert os.path.exists(os.path.join(ROOT, target)), target


# Options whose values are strings or flags: every value a page or a docstring names must be
# one the API accepts (a page once named nesterov="shifted", which is refused).
_OPTION_VALUE = re.compile(r"\b(nesterov|sparse|state_format|param_mode|convention)"
                           r"""\s*=\s*(["'][\w\-]+["']|True|False)""")


def _named_option_values():
    import ch8fast
    texts = []
    for name in sorted(os.listdir(DOCS)):
        if name.endswith(".rst"):
            with open(os.path.join(DOCS, name), encoding="utf-8") as f:
                texts.append((name, f.read()))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        texts.append(("README.md", f.read()))
    for cls in (ch8fast.SGD, ch8fast.AdaGrad, ch8fast.RMSProp, ch8fast.Adam, ch8fast.AdamW,
                ch8fast.AdaDelta):
        texts.append((cls.__name__, cls.__doc__))
    found = {}
    for where, text in texts:
        for m in _OPTION_VALUE.finditer(text):
            if "Embedding(" in text[max(0, m.start() - 30):m.start()]:
                continue                           # torch's own sparse=True
            found.setdefault((m.group(1), m.group(2)), where)
    return found


def test_every_option_value_the_docs_name_is_accepted():
    import ast
    import numpy as np
    import ch8fast
    ml_dtypes = pytest.importorskip("ml_dtypes")
    found = _named_option_values()
    assert found                                    # the pages do name option values
    bad = []
    for (name, literal), where in sorted(found.items()):
        value = ast.literal_eval(literal)
        ok = False
        for cls in (ch8fast.SGD, ch8fast.AdaGrad, ch8fast.RMSProp, ch8fast.Adam,
                    ch8fast.AdamW, ch8fast.AdaDelta):
            dtype = ml_dtypes.bfloat16 if name == "param_mode" else np.float32
            kw = {name: value}
            if name == "nesterov" and value:
                kw["momentum"] = 0.9
            if cls is ch8fast.AdaGrad and name == "sparse":
                kw["lr"] = 0.1
            try:
                cls([np.zeros((3, 2), dtype)], **kw)
                ok = True
                break
            except (TypeError, ValueError):
                continue
        if not ok:
            bad.append(f"{where}: {name}={literal}")
    assert not bad, bad
