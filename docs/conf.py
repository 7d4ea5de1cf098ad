"""Sphinx configuration of the scvi-unlearn documentation (scverse style, offline build)."""

from __future__ import annotations

import shutil
from importlib.metadata import version as _package_version
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent

project = "scvi-unlearn"
author = "scvi-unlearn developers"
copyright = "2026, scvi-unlearn developers"
release = _package_version("scvi-unlearn")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]
# Numpydoc docstrings, as in scvi-tools and scanpy.
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = True
napoleon_use_param = True
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Notebooks are stored with their outputs and executed by the tests; the build only renders.
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "scvi-unlearn"
html_theme_options = {"show_toc_level": 2}
# No intersphinx: CI builds without network access. References to scvi-tools, torch and
# Lightning objects stay plain text instead of links.
nitpicky = False
suppress_warnings = [
    # Type hints name third-party classes (AnnData, torch.nn.Module) that have no page here
    # without intersphinx; they render as text.
    "ref.python",
]


def _copy_tutorials() -> None:
    """Render ``../tutorials/*.ipynb`` without keeping a second copy in git."""
    target = HERE / "tutorials"
    target.mkdir(exist_ok=True)
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


_copy_tutorials()
