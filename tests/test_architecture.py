"""The package's layers: no import cycles, no hidden function-local imports, one source of
truth per concept (JSON, cell lists, KEY=VALUE, training cells, defaults, likelihood)."""

from __future__ import annotations

import ast
import inspect
import math
import re
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

import scvi_unlearn as su
from scvi_unlearn._model_data import registered_adata, training_positions
from scvi_unlearn._utils import parse_key_value, to_jsonable
from scvi_unlearn.cli import build_parser
from scvi_unlearn.module import sparse_nll
from scvi_unlearn.train import FROM_PLAN, METHODS, plan_defaults

PACKAGE = Path(su.__file__).resolve().parent
#: Third-party packages that may be imported inside a function: heavy and needed by few paths.
LAZY_ALLOWED = {"matplotlib", "scanpy", "ray", "opacus"}
#: Lower layers first: a module may import only from its own layer or a lower one.
LAYERS = [
    {"_utils", "_validation", "_verdict", "_executor", "_io", "_compat"},
    {"_model_data", "module", "data", "_recipe", "_configurations", "pl"},
    {"audit"},
    {"train", "utility"},
    {"model"},
    {"_demo"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(module-level imports, function-local imports, type-only imports) of the module."""
    tree = ast.parse(path.read_text())
    top, local, type_only = [], [], []

    def visit(node, in_function: bool, in_type_checking: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, in_function, True)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                names = (
                    [a.name for a in child.names]
                    if isinstance(child, ast.Import)
                    else [child.module or ""]
                )
                target = type_only if in_type_checking else local if in_function else top
                target.extend(names)
            is_function = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(child, in_function or is_function, in_type_checking)

    visit(tree, False, False)
    return top, local, type_only


def _graph(type_only: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (and for type hints only)."""
    graph = {}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        top, _, hints = _imports(path)
        edges = set()
        for imported in top + (hints if type_only else []):
            if imported == "scvi_unlearn" or not imported.startswith("scvi_unlearn."):
                continue
            # `from scvi_unlearn.x.y import z` imports x (its __init__) and x.y
            parts = imported.split(".")
            for i in range(2, len(parts) + 1):
                candidate = ".".join(parts[:i])
                # a package's own __init__ is already importing when a submodule runs
                if candidate in modules and not (name + ".").startswith(candidate + "."):
                    edges.add(candidate)
        graph[name] = edges
    return graph


def test_no_import_cycles_type_only_imports_included():
    graph = _graph(type_only=True)
    state: dict[str, int] = {}

    def dfs(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                dfs(nxt, [*stack, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            dfs(node, [node])


def test_layers_only_import_downwards():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}

    def layer_of(module: str) -> int:
        part = module.split(".")[1] if module.count(".") else module
        assert part in rank, f"{module} belongs to no layer; add it to LAYERS"
        return rank[part]

    for module, edges in _graph(type_only=True).items():  # type hints obey the layers too
        if module == "scvi_unlearn":
            continue
        for target in edges:
            if target.split(".")[1] == module.split(".")[1]:
                continue
            assert layer_of(target) <= layer_of(module), f"{module} imports upward: {target}"


def test_function_local_imports_are_only_heavy_optional_dependencies():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        _, local, _ = _imports(path)
        for name in local:
            if name.split(".")[0] not in LAZY_ALLOWED:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}: {name}")
    assert not offenders, offenders


# -- scvi-tools internals only through scvi_unlearn._compat ------------------------------------
#: The one module allowed to touch private scvi-tools APIs.
COMPAT = PACKAGE / "_compat.py"
#: Files (relative to the repository) whose private uses are still to be switched to
#: ``_compat``; each entry must still have one (the test says when to drop it).
PRIVATE_SCVI_PENDING: set[str] = set()
#: Private methods and attributes of scvi-tools models and modules that ``_compat`` wraps.
PRIVATE_SCVI_ATTRIBUTES = re.compile(
    r"\._(make_data_loader|validate_anndata|per_instance_manager_store|setup_adata_manager_store"
    r"|register_manager_for_instance|get_inference_input|get_generative_input)\b"
)
#: A private scvi-tools module named in a string (e.g. a logger name).
PRIVATE_SCVI_MODULE_NAME = re.compile(r"[\"']scvi(\.[A-Za-z]\w*)*\._\w+")


def _private_scvi_uses(path: Path) -> list[str]:
    """Private scvi-tools imports, attribute uses and module names in one source file."""
    text = path.read_text()
    uses = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "scvi":
            if any(part.startswith("_") for part in node.module.split(".")):
                uses.append(f"from {node.module} import ...")
            uses += [f"from {node.module} import {a.name}" for a in node.names if a.name[0] == "_"]
        elif isinstance(node, ast.Import):
            uses += [
                f"import {a.name}"
                for a in node.names
                if a.name.split(".")[0] == "scvi"
                and any(part.startswith("_") for part in a.name.split("."))
            ]
    for pattern in (PRIVATE_SCVI_ATTRIBUTES, PRIVATE_SCVI_MODULE_NAME):
        uses += [m.group(0) for m in pattern.finditer(text)]
    return uses


def test_private_scvi_tools_apis_are_used_only_through_compat():
    """Only ``_compat.py`` imports private scvi-tools modules or names or calls their methods.

    The package and the benchmarks are scanned; the tests may look inside scvi-tools to check
    the wrappers.
    """
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *(root / "benchmarks").rglob("*.py")]
    offenders, pending = {}, set()
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path == COMPAT:
            continue
        uses = _private_scvi_uses(path)
        if rel in PRIVATE_SCVI_PENDING:
            pending.update([rel] if uses else [])
        elif uses:
            offenders[rel] = uses
    assert not offenders, f"private scvi-tools uses outside scvi_unlearn/_compat.py: {offenders}"
    stale = PRIVATE_SCVI_PENDING - pending
    assert not stale, f"{sorted(stale)} no longer use private scvi-tools APIs: drop the entries"
    assert _private_scvi_uses(COMPAT)  # the scan finds what it is looking for


# -- one function per concept ---------------------------------------------------------------
def test_to_jsonable_makes_numpy_values_standard_json():
    value = {"a": np.float32(0.5), 2: (np.int64(3), float("nan")), "x": np.array([1.0, np.inf])}
    assert to_jsonable(value) == {"a": 0.5, "2": [3, None], "x": [1.0, None]}


def test_report_json_round_trip_keeps_nan(overfit_case, tmp_path):
    case = overfit_case
    report = case["mi"].audit(
        case["model"], members=case["train"][:10], nonmembers=case["held"][:10], n_bootstrap=50
    )
    result = next(iter(report.results.values()))
    result.tpr_at_01pct_fpr = float("nan")
    text = report.to_json(str(tmp_path / "r.json"))
    assert "NaN" not in text  # standard JSON
    again = su.AuditReport.from_json(str(tmp_path / "r.json"))
    assert math.isnan(again.results[result.attack].tpr_at_01pct_fpr)
    assert again.verdict == report.verdict


def test_parse_key_value():
    assert parse_key_value(" sample_id = 1016 ") == ("sample_id", "1016")
    assert parse_key_value("a=b=c") == ("a", "b=c")
    for bad in ("novalue", "=x", "k="):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_key_value(bad)


@pytest.fixture
def named_adata():
    a = anndata.AnnData(np.ones((5, 2), dtype=np.float32))
    a.obs_names = ["7", "3", "AAC", "AAG", "ACT"]
    return a


def test_cell_list_file_names_win_over_positions_and_comments_are_skipped(tmp_path, named_adata):
    f = tmp_path / "cells.txt"
    f.write_text("# obs names that look like numbers\n7\n\n3\n")
    assert su.data.read_cell_list(named_adata, f).tolist() == [0, 1]  # names, not positions
    f.write_text("0\n4\n")
    assert su.data.read_cell_list(named_adata, f).tolist() == [0, 4]  # positions
    f.write_text("AAC\nnope\n")
    with pytest.raises(KeyError, match="nope"):
        su.data.read_cell_list(named_adata, f)
    with pytest.raises(FileNotFoundError, match="not found"):
        su.data.read_cell_list(named_adata, tmp_path / "missing.txt")


def test_training_positions_prefers_names_and_drops_unknown_cells(overfit_case):
    model, adata = overfit_case["model"], overfit_case["adata"]
    np.testing.assert_array_equal(training_positions(model), np.sort(overfit_case["train"]))
    # another AnnData order: names map to the new positions; missing cells are left out
    reordered = adata[::-1][:150].copy()
    pos = training_positions(model, reordered)
    expected = np.flatnonzero(reordered.obs_names.isin(adata.obs_names[overfit_case["train"]]))
    np.testing.assert_array_equal(pos, expected)
    assert (pos >= 0).all()


def test_registered_adata_shares_counts_and_never_writes_into_the_callers_object(overfit_case):
    model, adata = overfit_case["model"], overfit_case["adata"]
    user = adata.copy()
    obs_before, uns_before = user.obs.copy(), dict(user.uns)
    view = registered_adata(model, user)
    assert view.X is user.X  # no copy of the counts
    assert view is not user
    pd.testing.assert_frame_equal(user.obs, obs_before)
    assert set(user.uns) == set(uns_before)


#: Deliberate run-level overrides of a plan default, each with its reason.
RUN_LEVEL_OVERRIDES = {
    ("*", "kl_weight"): None,  # None = the original training's final KL weight
    ("ssd", "alpha"): 0.0,  # SSD dampens; Golatkar noise only when asked
    ("retrain_fast", "peak_lr"): None,  # None = 3x the recipe's learning rate
}


def test_hyperparameter_defaults_come_from_the_plan_signatures():
    for name, spec in METHODS.items():
        if spec.plan is None:
            continue
        defaults = plan_defaults(spec.plan)
        for param_name, param in spec.params.items():
            assert param.default is not FROM_PLAN, (name, param_name)
            if param_name not in defaults:
                continue
            for key in ((name, param_name), ("*", param_name)):
                if key in RUN_LEVEL_OVERRIDES:
                    assert param.default == RUN_LEVEL_OVERRIDES[key], (name, param_name)
                    break
            else:
                assert param.default == defaults[param_name], (name, param_name)
    assert METHODS["frozen_critic"].params["critic_pretrain_steps"].default == 300
    assert METHODS["extragradient"].params["critic_pretrain_steps"].default == 200


def test_one_n_shadows_default():
    mi_default = inspect.signature(su.MembershipInference).parameters["n_shadows"].default
    assert mi_default == su.audit.DEFAULT_N_SHADOWS
    audit_parser = build_parser()._subparsers._group_actions[0].choices["audit"]
    assert audit_parser.get_default("n_shadows") == su.audit.DEFAULT_N_SHADOWS


def test_unlearn_audit_uses_the_shadow_cache(overfit_case, monkeypatch):
    import scvi_unlearn.model._unlearn as unlearn_steps

    seen = {}

    class Recorder:
        def __init__(self, adata, recipe, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("recorded")

    monkeypatch.setattr(unlearn_steps, "MembershipInference", Recorder)
    case = overfit_case
    with pytest.raises(RuntimeError, match="recorded"):
        case["model"].unlearn(
            case["train"][:3],
            method="finetune",
            max_epochs=1,
            nonmembers=case["held"][:5],
            audit=True,
            accelerator="cpu",
            enable_progress_bar=False,
        )
    assert "cache_dir" not in seen and "n_shadows" not in seen  # the library's defaults


# -- the likelihood kernel agrees with scvi-tools ---------------------------------------------
@pytest.mark.parametrize("zero_inflated", [False, True])
def test_sparse_likelihood_equals_scvi_tools_dense_log_prob(zero_inflated):
    gen = torch.Generator().manual_seed(0)
    n_cells, n_genes = 7, 40
    mu = torch.rand(n_cells, n_genes, generator=gen) * 5 + 0.01
    theta = torch.rand(n_genes, generator=gen) * 3 + 0.1
    x = torch.poisson(mu, generator=gen) * (torch.rand(n_cells, n_genes, generator=gen) > 0.6)
    if zero_inflated:
        logits = torch.randn(n_cells, n_genes, generator=gen)
        px = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=logits)
    else:
        px = NegativeBinomial(mu=mu, theta=theta)
    dense = -px.log_prob(x).sum(-1)
    torch.testing.assert_close(sparse_nll(px, x), dense, rtol=1e-5, atol=1e-4)
    assert (x == 0).float().mean() > 0.5  # the sparse path was exercised on mostly zeros
