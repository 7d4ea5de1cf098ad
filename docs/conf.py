"""Sphinx configuration of the scvi-unlearn documentation (scverse style, offline build)."""

from __future__ import annotations

import re
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
# _generated/ holds tables that other pages include; they are not pages of their own.
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "scvi-unlearn"
html_theme_options = {"show_toc_level": 2}
# No intersphinx: CI builds without network access. References to scvi-tools, torch and
# Lightning objects stay plain text instead of links. Every reference to this package's own
# objects must resolve (nitpicky, with -W in CI); those to other packages cannot offline, so
# they alone are let through.
nitpicky = True
_EXTERNAL = (
    "torch", "numpy", "np", "pandas", "pd", "scvi", "anndata", "ad", "scanpy", "sc", "lightning",
    "matplotlib", "mpl", "plt", "scipy", "collections", "pathlib", "os", "typing", "opacus", "ray",
    "fractions",
)  # fmt: skip
nitpick_ignore_regex = [
    ("py:.*", rf"({'|'.join(_EXTERNAL)})(\..*)?"),
    # Bare names of other packages' classes, as type hints spell them.
    ("py:.*", r"AnnData|Axes|Path|Figure|Tensor|Module|Generator|DataFrame|Series|Index"),
]
# The package's own type aliases and structural types, as signatures spell them (``IndexLike``:
# positions, names or a mask of cells; ``Tensors``: a dict of named tensors; ``_ScoredReport``:
# what ``pl.roc_curves`` reads of an AuditReport); they are not classes to link to.
nitpick_ignore = [
    ("py:class", "IndexLike"),
    ("py:class", "Tensors"),
    ("py:class", "_ScoredReport"),
]
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


def _role(text: str) -> str:
    """reST roles of a docstring (``:class:`x```) in MyST's spelling (``{class}`x```)."""
    return re.sub(r":(\w+):`", r"{\1}`", text)


def _write_methods() -> None:
    """The unlearning methods and their hyper-parameters, from the method registry."""
    from scvi_unlearn.train import METHODS, method_names, method_table
    from scvi_unlearn.train._method import plan_parameter_docs

    parts = [method_table("markdown"), ""]
    for name in method_names():
        method = METHODS[name]
        cls = type(method)
        parts += [f"### `{name}`", "", f"Class `{cls.__name__}` in `{cls.__module__}`"
                  f" ({_role(method.description)}).", ""]  # fmt: skip
        if not method.params:
            parts += ["No hyper-parameters.", ""]
            continue
        from_plan = plan_parameter_docs(method.plan)
        parts += ["| hyper-parameter | type | default | range | meaning |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for key, param in method.params.items():
            text = _role(param.doc or from_plan.get(key) or "").replace("|", "\\|")
            parts.append(f"| `{key}` | {param.kind} | `{param.default!r}` | "
                         f"{param.range_text()} | {text} |")  # fmt: skip
        parts.append("")
    (HERE / "_generated").mkdir(exist_ok=True)
    (HERE / "_generated" / "methods.md").write_text("\n".join(parts))


_copy_tutorials()
_write_configurations()
_write_methods()
