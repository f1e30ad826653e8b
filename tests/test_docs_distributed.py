"""docs/distributed.rst: valid reStructuredText, and its Python examples run under
``mpirun -n 2`` and print what the page says they print."""
import os
import re

import pytest

import _mpi
from _mpi import ROOT, check, needs_mpi

PAGE = os.path.join(ROOT, "docs", "distributed.rst")


def text():
    with open(PAGE, encoding="utf-8") as fh:
        return fh.read()


def python_blocks():
    """The bodies of the ``.. code-block:: python`` directives, dedented."""
    lines, blocks = text().splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() == ".. code-block:: python":
            body, j = [], i + 1
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith("    ")):
                body.append(lines[j][4:])
                j += 1
            blocks.append("\n".join(body).strip("\n") + "\n")
    return blocks


def test_page_is_valid_restructuredtext():
    docutils_core = pytest.importorskip("docutils.core")
    from docutils import nodes
    from docutils.parsers.rst import roles
    for name in ("doc", "class", "meth", "func", "mod", "attr"):     # Sphinx's roles
        roles.register_generic_role(name, nodes.literal)
    # warnings are errors: an unknown role, a bad table or a broken directive fails
    docutils_core.publish_doctree(text(), source_path=PAGE, settings_overrides={
        "halt_level": 2, "report_level": 2, "warning_stream": False})


def test_page_has_its_examples():
    blocks = python_blocks()
    assert len(blocks) == 4
    assert all("from ch8fast.distributed import" in b for b in blocks)


@needs_mpi
@pytest.mark.parametrize("i", range(4))
def test_example_runs_on_two_ranks(tmp_path, i):
    script = tmp_path / f"example{i}.py"
    script.write_text(python_blocks()[i])
    proc, _, _ = _mpi.mpirun(2, str(script), timeout=120)
    check(proc)
    out = " ".join(proc.stdout.split())
    said = {0: "2 ranks, 160 steps, loss 0.0097",
            1: " ".join(re.search(r"prints, on two ranks::\n\n(.*?)\n\n", text(),
                                  re.S).group(1).split()),
            2: "rank 1: 3 steps, replicas identical: True",
            3: "resumed at epoch 1 after 5 steps"}[i]
    assert said in out, (said, proc.stdout, proc.stderr[-2000:])
