"""Sphinx configuration of ch8fast's documentation.

Build it with ``python -m sphinx -W -b html docs docs/_build/html`` (``pip install -e
".[docs]"`` first): -W turns every warning into an error, as in CI. The build needs no
network; MathJax is loaded by the browser when a page is read.
"""
import ch8fast

project = "ch8fast"
author = "The ch8fast developers"
copyright = "2026, The ch8fast developers"
version = release = ch8fast.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autosummary_generate = False
exclude_patterns = ["_build"]
templates_path = []
html_theme = "alabaster"
html_static_path = []
html_title = f"ch8fast {version}"

try:                                  # ch8fast.torch's reference needs torch (optional)
    import torch  # noqa: F401
except ImportError:
    autodoc_mock_imports = ["torch"]
