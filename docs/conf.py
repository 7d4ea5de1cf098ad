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
# Nothing is suppressed: the build passes with -W as is.
suppress_warnings: list[str] = []


def _copy_tutorials() -> None:
    """Render ``../tutorials/*.ipynb`` without keeping a second copy in git."""
    target = HERE / "tutorials"
    target.mkdir(exist_ok=True)
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


def _skip_foreign_member(app, what, name, obj, skip, options):
    """Document inherited members only where they are ours.

    Class pages use ``:inherited-members:`` so that, e.g., ``SCVI.unlearn`` (defined on
    :class:`~scvi_unlearn.model.UnlearningMixin`) and the shared methods of
    :class:`~scvi_unlearn.train.UnlearningTrainingPlan` show up on the subclasses' pages. Members
    that scvi-tools, Lightning or torch define are left to their own documentation.
    """
    target = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
    module = getattr(target, "__module__", None)
    if isinstance(module, str) and not module.startswith("scvi_unlearn"):
        return True
    return None


def _public_bases(app, name, obj, options, bases):
    """Show a private base class (``_AdversarialUnlearningPlan``) as its own public bases."""
    resolved: list = []
    for base in bases:
        todo = [base]
        while todo:
            cls = todo.pop(0)
            if cls.__name__.startswith("_") and cls.__module__.startswith("scvi_unlearn"):
                todo[:0] = list(cls.__bases__)
            elif cls not in resolved:
                resolved.append(cls)
    bases[:] = resolved


def setup(app):
    """Connect the member filter and the base-class cleaner."""
    app.connect("autodoc-skip-member", _skip_foreign_member)
    app.connect("autodoc-process-bases", _public_bases)


def _write_configurations() -> None:
    """The supported / refused configurations table, from the package's registry."""
    from scvi_unlearn._configurations import configurations_table

    target = HERE / "_generated"
    target.mkdir(exist_ok=True)
    (target / "configurations.md").write_text(configurations_table())


_copy_tutorials()
_write_configurations()
