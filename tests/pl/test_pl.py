"""Tests of the plotting functions (Agg backend, small hand-made data, tiny models)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import inspect

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer

import scvi_unlearn as su
from scvi_unlearn.audit._report import AuditReport, score_attack
from scvi_unlearn.pl._comparison import FAIL_COLOR, SUCCESS_COLOR


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def methods_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "method": ["baseline", "retrain", "retrain", "retrain", "extragradient", "fisher"],
            "seed": [0, 0, 1, 2, 0, 0],
            "auc": [0.77, 0.50, 0.46, 0.53, 0.49, 0.81],
            "auc_low": [0.65, 0.38, 0.35, 0.41, 0.37, 0.70],
            "auc_high": [0.88, 0.62, 0.58, 0.65, 0.60, 0.91],
        }
    )


def _band_patches(ax):
    return [p for p in ax.patches if "band" in p.get_label()]


def _hlines_at(ax, y, linestyle="--"):
    return [
        line
        for line in ax.get_lines()
        if line.get_linestyle() == linestyle and np.allclose(line.get_ydata(), y)
    ]


# --- method_comparison ---------------------------------------------------------------------


def test_method_comparison_draws_points_band_and_chance(methods_table):
    ax = su.pl.method_comparison(methods_table, show=False)
    assert isinstance(ax, Axes)
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == len(methods_table)
    assert all(c.has_yerr for c in bars)
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "baseline",
        "retrain",
        "extragradient",
        "fisher",
    ]
    # The retrain band is the library's one band rule on the retrain rows.
    (band,) = _band_patches(ax)
    rows = methods_table[methods_table["method"] == "retrain"]
    low, high = su.audit.reference_band(rows["auc"])
    ref = rows["auc"].to_numpy()
    assert low < ref.mean() - 2 * ref.std(ddof=1)  # a prediction interval of few seeds: wide
    ys = band.get_path().transformed(band.get_patch_transform()).vertices[:, 1]
    assert ys.min() == pytest.approx(low) and ys.max() == pytest.approx(high)
    assert _hlines_at(ax, 0.5), "dashed chance line at 0.5 missing"


def test_method_comparison_seeds_are_jittered(methods_table):
    ax = su.pl.method_comparison(methods_table, show=False)
    xs = [float(np.ravel(c.lines[0].get_xdata())[0]) for c in ax.containers]
    retrain_x = xs[1:4]
    assert len(set(retrain_x)) == 3  # three seeds, three positions
    assert all(0.5 < x < 1.5 for x in retrain_x)  # around the "retrain" tick (x = 1)
    assert xs[0] == 0.0  # a single row sits on its tick


def test_method_comparison_explicit_band_and_success_colours(methods_table):
    table = methods_table.assign(success=[False, True, True, True, True, False])
    ax = su.pl.method_comparison(table, band=(0.40, 0.60), chance=None, show=False)
    (band,) = _band_patches(ax)
    ys = band.get_path().transformed(band.get_patch_transform()).vertices[:, 1]
    assert (ys.min(), ys.max()) == pytest.approx((0.40, 0.60))
    assert not _hlines_at(ax, 0.5)
    colours = [to_hex(c.lines[0].get_color()) for c in ax.containers]
    expected = [to_hex(SUCCESS_COLOR if s else FAIL_COLOR) for s in table["success"]]
    assert colours == expected
    labels = ax.get_legend_handles_labels()[1]
    assert "success" in labels and "fail" in labels


def test_method_comparison_without_ci_or_reference():
    table = pd.DataFrame({"method": ["a", "b"], "advantage": [0.1, 0.3]})
    ax = su.pl.method_comparison(table, metric="advantage", chance=None, show=False)
    assert len(ax.containers) == 2
    assert not any(c.has_yerr for c in ax.containers)
    assert not _band_patches(ax)


def test_method_comparison_reads_report_frames():
    """An AuditReport's frame (index 'attack', columns auc / auc_low / auc_high) plots as is."""
    rng = np.random.default_rng(0)
    results = {
        name: score_attack(name, rng.normal(shift, 1, 30), rng.normal(0, 1, 30), [0.5, 0.52], "x")
        for name, shift in (("loss", 0.2), ("lira_online", 1.0))
    }
    frame = AuditReport(results).to_frame()
    ax = su.pl.method_comparison(frame, method_col="attack", show=False)
    assert len(ax.containers) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["loss", "lira_online"]


def test_method_comparison_on_given_axes_returns_them(methods_table, tmp_path):
    fig, given = plt.subplots()
    ax = su.pl.method_comparison(methods_table, ax=given, show=False)
    assert ax is given and ax.figure is fig
    assert len(ax.containers) == len(methods_table)
    ax.figure.savefig(tmp_path / "methods.png")  # how a figure is saved
    assert (tmp_path / "methods.png").stat().st_size > 0


def test_method_comparison_errors(methods_table):
    with pytest.raises(KeyError, match="auc_x"):
        su.pl.method_comparison(methods_table, metric="auc_x", show=False)
    with pytest.raises(ValueError, match="both"):
        su.pl.method_comparison(methods_table, low_col="auc_low", show=False)
    with pytest.raises(ValueError, match="order"):
        su.pl.method_comparison(methods_table, order=["nope"], show=False)
    with pytest.raises(ValueError, match="low <= high"):
        su.pl.method_comparison(methods_table, band=(0.6, 0.4), show=False)


# --- utility_comparison --------------------------------------------------------------------


@pytest.fixture
def utility_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "elbo": [1200.0, 1210.0, 1400.0],
            "knn_accuracy": [0.91, 0.90, 0.84],
            "silhouette": [0.21, 0.20, 0.12],
            "note": ["a", "b", "c"],
        },
        index=["baseline", "retrain", "fisher"],
    )


def test_utility_comparison_grouped_bars(utility_table):
    ax = su.pl.utility_comparison(utility_table, show=False)
    assert isinstance(ax, Axes)
    assert len(ax.containers) == 3  # one bar container per model
    assert len(ax.patches) == 3 * 3  # numeric columns only ("note" skipped)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["elbo", "knn_accuracy", "silhouette"]


def test_utility_comparison_relative(utility_table):
    ax = su.pl.utility_comparison(
        utility_table, metrics=["knn_accuracy", "silhouette"], relative_to="retrain", show=False
    )
    retrain = ax.containers[1]
    assert [p.get_height() for p in retrain] == pytest.approx([1.0, 1.0])
    assert _hlines_at(ax, 1.0)
    with pytest.raises(KeyError, match="relative_to"):
        su.pl.utility_comparison(utility_table, relative_to="nope", show=False)
    with pytest.raises(KeyError, match="missing_metric"):
        su.pl.utility_comparison(utility_table, metrics=["missing_metric"], show=False)


def test_utility_comparison_model_column(utility_table):
    table = utility_table.rename_axis("model").reset_index()
    ax = su.pl.utility_comparison(table, model_col="model", metrics=["silhouette"], show=False)
    assert ax.get_legend_handles_labels()[1] == ["baseline", "retrain", "fisher"]


# --- latent_embedding ----------------------------------------------------------------------


def _snapshot(adata):
    return (
        list(adata.obs.columns),
        sorted(adata.uns.keys()),
        adata.obs.copy(),
        adata.X.copy(),
        sorted(adata.obsm.keys()),
        sorted(adata.obsp.keys()),
    )


def _assert_same(before, after):
    assert before[0] == after[0]
    assert before[1] == after[1]
    pd.testing.assert_frame_equal(before[2], after[2])
    x_before, x_after = before[3], after[3]
    if hasattr(x_before, "toarray"):
        x_before, x_after = x_before.toarray(), x_after.toarray()
    np.testing.assert_array_equal(x_before, x_after)
    assert before[4:] == after[4:]


def test_latent_embedding_umap_side_by_side(small_model):
    adata = small_model.adata.copy()  # a fresh object the models were not set up with
    del adata.uns["_scvi_uuid"], adata.uns["_scvi_manager_uuid"]
    before = _snapshot(adata)
    forget = np.flatnonzero(adata.obs["cell_type"] == "Megakaryocyte")
    axes = su.pl.latent_embedding(
        {"before": small_model, "after": small_model},
        adata,
        highlight=forget,
        highlight_label="forget set",
        n_neighbors=10,
        show=False,
    )
    assert len(axes) == 2 and all(isinstance(ax, Axes) for ax in axes)
    assert len(axes[0].figure.axes) == 2
    assert [ax.get_title() for ax in axes] == ["before", "after"]
    for ax in axes:
        background, highlighted = ax.collections
        assert len(background.get_offsets()) == adata.n_obs - forget.size
        assert len(highlighted.get_offsets()) == forget.size
    assert "forget set" in [t.get_text() for t in axes[-1].get_legend().get_texts()]
    _assert_same(before, _snapshot(adata))


def test_latent_embedding_does_not_touch_model_adata(small_model):
    adata = small_model.adata
    before = _snapshot(adata)
    axes = su.pl.latent_embedding(
        {"model": small_model}, highlight=adata.obs_names[:3], basis="latent", show=False
    )
    assert len(axes) == 1 and len(axes[0].collections) == 2
    _assert_same(before, _snapshot(adata))


def test_latent_embedding_given_axes_numeric_colour(small_model):
    adata = small_model.adata.copy()
    adata.obs["library"] = np.asarray(adata.X.sum(1)).ravel().astype(float)
    fig, given = plt.subplots(1, 3)
    axes = su.pl.latent_embedding(
        {"a": small_model, "b": small_model, "c": small_model},
        adata,
        color="library",
        basis="latent",
        axes=given,
        show=False,
    )
    assert list(axes) == list(given)
    assert len(fig.axes) == 4  # three panels and one colour bar


def test_latent_embedding_errors(small_model):
    with pytest.raises(TypeError, match="dict"):
        su.pl.latent_embedding([small_model], show=False)
    with pytest.raises(ValueError, match="basis"):
        su.pl.latent_embedding({"m": small_model}, basis="tsne", show=False)
    with pytest.raises(KeyError, match="no_such_column"):
        su.pl.latent_embedding({"m": small_model}, color="no_such_column", show=False)
    _, given = plt.subplots(1, 2)
    with pytest.raises(ValueError, match="one per model"):
        su.pl.latent_embedding({"m": small_model}, axes=given, basis="latent", show=False)


# --- roc_curves ----------------------------------------------------------------------------


@pytest.fixture
def roc_report() -> AuditReport:
    rng = np.random.default_rng(1)
    results = {
        name: score_attack(name, rng.normal(shift, 1, 40), rng.normal(0, 1, 40), [0.5], "x")
        for name, shift in (("loss", 1.0), ("rmia", 0.3))
    }
    return AuditReport(results, {"n_members": 40, "n_nonmembers": 40})


def test_roc_curves_draw_one_line_per_attack_and_chance(roc_report):
    ax = su.pl.roc_curves(roc_report, show=False)
    assert isinstance(ax, Axes)
    labels = [line.get_label() for line in ax.get_lines()]
    auc = {name: f"{r.auc:.2f}" for name, r in roc_report.results.items()}
    assert labels == [f"loss (AUC {auc['loss']})", f"rmia (AUC {auc['rmia']})", "chance"]
    assert ax.get_lines()[-1].get_linestyle() == "--"
    assert ax.get_xscale() == ax.get_yscale() == "log"
    # no curve below FPR 1 / n_nonmembers, which 40 non-members cannot measure
    assert min(np.min(line.get_xdata()) for line in ax.get_lines()[:-1]) >= 1 / 40 - 1e-12
    only = su.pl.roc_curves(roc_report, attacks=["rmia"], log_scale=False, show=False)
    assert [line.get_label() for line in only.get_lines()] == [labels[1], "chance"]
    assert only.get_xscale() == "linear"
    assert roc_report.plot_roc(show=False).get_lines()[0].get_label() == labels[0]


# --- the API: options keyword-only, typed axes, no save= ---------------------------------
def _pl_calls(small_model, methods_table, utility_table, roc_report):
    """(function, its data arguments, one option) of every plot function."""
    return [
        (su.pl.roc_curves, (roc_report,), {"title": "t"}),
        (su.pl.method_comparison, (methods_table,), {"metric": "auc"}),
        (su.pl.utility_comparison, (utility_table,), {"annotate": True}),
        (su.pl.latent_embedding, ({"m": small_model},), {"basis": "latent"}),
    ]


PL_FUNCTIONS = [
    su.pl.roc_curves,
    su.pl.method_comparison,
    su.pl.utility_comparison,
    su.pl.latent_embedding,
]
#: The data arguments each function takes positionally; everything else is keyword-only.
DATA_ARGUMENTS = {
    "roc_curves": ["report"],
    "method_comparison": ["table"],
    "utility_comparison": ["table"],
    "latent_embedding": ["models", "adata"],
}


@pytest.mark.parametrize("function", PL_FUNCTIONS, ids=lambda f: f.__name__)
def test_plot_options_are_keyword_only_with_typed_axes_and_no_save(function):
    signature = inspect.signature(function)
    positional = [
        name
        for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert positional == DATA_ARGUMENTS[function.__name__]
    assert "save" not in signature.parameters
    axes_name = "axes" if "axes" in signature.parameters else "ax"
    axes = signature.parameters[axes_name]
    assert axes.kind is axes.KEYWORD_ONLY and axes.default is None
    # annotations are strings (``from __future__ import annotations``), types only for checkers
    assert axes.annotation in ("Axes | None", "Sequence[Axes] | None")
    assert signature.return_annotation in ("Axes", "list[Axes]")
    assert signature.parameters["show"].kind is inspect.Parameter.KEYWORD_ONLY


def test_save_and_positional_options_raise_type_error(
    small_model, methods_table, utility_table, roc_report, tmp_path
):
    for function, data, option in _pl_calls(small_model, methods_table, utility_table, roc_report):
        with pytest.raises(TypeError, match="save"):
            function(*data, save=tmp_path / "x.png", show=False, **option)
        (value,) = option.values()
        extra = (None,) if function is su.pl.latent_embedding else ()  # its adata slot
        with pytest.raises(TypeError, match="positional"):
            function(*data, *extra, value, show=False)
        assert not (tmp_path / "x.png").exists()
    with pytest.raises(TypeError, match="save"):
        roc_report.plot_roc(save=tmp_path / "x.png", show=False)
    with pytest.raises(TypeError, match="positional"):
        roc_report.plot_roc(plt.subplots()[1])


def test_show_defaults_to_a_figure_the_function_created(roc_report, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    _, given = plt.subplots()
    su.pl.roc_curves(roc_report, ax=given)  # the caller's axes: the caller shows them
    assert shown == []
    ax = su.pl.roc_curves(roc_report)  # its own figure: shown, scanpy-style
    assert shown == [1] and ax.figure is not given.figure
    su.pl.roc_curves(roc_report, show=False)
    su.pl.roc_curves(roc_report, ax=given, show=True)
    assert shown == [1, 1]
