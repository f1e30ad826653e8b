"""Sphinx configuration of ch8fast's documentation.

Build it with ``python -m sphinx -W -b html docs docs/_build/html`` (``pip install -e
".[docs]"`` first): -W turns every warning into an error, as in CI. The build needs no
network, and neither does reading it: MathJax is copied into the site
(``sphinx-mathjax-offline``), so the equations render offline. The theme is Furo, which
gives code blocks the width of the page.
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
    "sphinx-mathjax-offline",      # MathJax inside the site, not from a CDN
]

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autosummary_generate = False
exclude_patterns = ["_build"]
templates_path = []
html_theme = "furo"
html_static_path = []
html_title = f"ch8fast {version}"

try:                                  # ch8fast.torch's reference needs torch (optional)
    import torch  # noqa: F401
except ImportError:
    autodoc_mock_imports = ["torch"]
