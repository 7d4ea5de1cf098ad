"""Compare unlearning methods: privacy against the retrain band, and utility."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scvi_unlearn._verdict import MIN_REFERENCE_MODELS, reference_band
from scvi_unlearn.pl._utils import finish, new_axes, resolve_show

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.axes import Axes

#: Colours of succeeded / failed runs (``success`` column) and of the reference band.
SUCCESS_COLOR = "#2a9d8f"
FAIL_COLOR = "#d1495b"
UNKNOWN_COLOR = "#8d99ae"
BAND_COLOR = "#9bc1e6"

_METRIC_LABELS = {
    "auc": "attack AUC (members vs non-members)",
    "advantage": "attack advantage 2|AUC - 0.5|",
    "tpr@1%fpr": "TPR at 1% FPR",
    "tpr@0.1%fpr": "TPR at 0.1% FPR",
}


def method_comparison(
    table: pd.DataFrame,
    *,
    metric: str = "auc",
    method_col: str = "method",
    low_col: str | None = None,
    high_col: str | None = None,
    band: tuple[float, float] | None = None,
    reference: str = "retrain",
    seed_col: str = "seed",
    success_col: str = "success",
    chance: float | None = 0.5,
    order: Sequence[str] | None = None,
    jitter: float = 0.3,
    ax: Axes | None = None,
    show: bool | None = None,
    title: str | None = None,
) -> Axes:
    """Plot one privacy metric per unlearning method against the retrain band.

    Each row of ``table`` (one method, or one method and seed) is a point with its confidence
    interval as an error bar. Rows of the same method (e.g. several seeds) are spread
    horizontally. The band that exact unlearning reaches is shaded: ``band`` if given, else
    the prediction band of the ``metric`` over the rows whose method is ``reference`` (three or
    more; :func:`~scvi_unlearn.audit.reference_band`, the rule of the audit's verdict, which
    assumes the rows were scored on the same cells). Success is
    judged against that band, not against chance (drawn dashed for orientation).

    Parameters
    ----------
    table
        One row per run, with columns ``method_col`` (or an index of that name) and ``metric``;
        optionally ``low_col`` / ``high_col`` (CI bounds), ``seed_col`` and ``success_col``
        (bool: the run reached the band, coloured green / red).
    metric
        Column to plot, e.g. ``"auc"`` of the strongest attack.
    method_col
        Column with the method names.
    low_col, high_col
        Columns of the lower / upper CI bound; default ``f"{metric}_low"`` and
        ``f"{metric}_high"`` when present (the names of
        :meth:`~scvi_unlearn.AuditReport.to_frame`).
    band
        ``(low, high)`` of the reference band; computed from the ``reference`` rows if None.
    reference
        Method whose rows define the band (exact unlearning).
    seed_col
        Column of the seed; when present, the legend-free horizontal spread orders by seed.
    success_col
        Column of booleans; if present, points are coloured by success instead of by method.
    chance
        Where to draw the dashed chance line (None: no line).
    order
        Methods from left to right; default: order of first appearance.
    jitter
        Total horizontal spread of the rows of one method, in category widths.
    ax
        Matplotlib axes to draw on; a new figure if None.
    show
        Show the figure (default: only when no ``ax`` was given).
    title
        Axes title.

    Returns
    -------
    The matplotlib axes. Each row is one error-bar container in ``ax.containers``. Save the
    figure with ``ax.figure.savefig(path)``.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from scvi_unlearn.pl import method_comparison
    >>> table = pd.DataFrame({
    ...     "method": ["baseline", "retrain", "retrain", "retrain", "fisher"],
    ...     "seed": [0, 0, 1, 2, 0],
    ...     "auc": [0.77, 0.50, 0.46, 0.53, 0.81],
    ...     "auc_low": [0.65, 0.38, 0.35, 0.41, 0.70],
    ...     "auc_high": [0.88, 0.62, 0.58, 0.65, 0.91],
    ... })
    >>> ax = method_comparison(table, show=False)
    >>> len(ax.containers)  # one error bar per row
    5
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['baseline', 'retrain', 'fisher']
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"`table` must be a pandas DataFrame, got {type(table).__name__}.")
    data = table
    if method_col not in data.columns and method_col in (data.index.names or []):
        data = data.reset_index()
    _require_columns(data, [method_col, metric], "table")
    if len(data) == 0:
        raise ValueError("`table` has no rows.")
    low_col, high_col = _ci_columns(data, metric, low_col, high_col)
    methods = [str(m) for m in pd.unique(data[method_col].astype(str))]
    if order is not None:
        missing = [m for m in order if m not in methods]
        if missing:
            raise ValueError(f"`order` names methods not in the table: {missing}.")
        methods = [str(m) for m in order]
        data = data[data[method_col].astype(str).isin(methods)]
    ax, owns = new_axes(ax, figsize=(max(3.5, 1.1 * len(methods) + 1.5), 3.8))

    values = pd.to_numeric(data[metric], errors="coerce")
    if band is None and reference in methods:
        is_ref = (data[method_col].astype(str) == reference).to_numpy() & values.notna().to_numpy()
        if is_ref.sum() >= MIN_REFERENCE_MODELS:
            # The library's one band rule, so the plot and report.verdict agree.
            band = reference_band(values[is_ref].to_numpy(float))
            band_label = f"{reference} band (n={int(is_ref.sum())})"
    else:
        band_label = f"{reference} band" if reference in methods else "reference band"
    if band is not None:
        low, high = (float(b) for b in band)
        if not low <= high:
            raise ValueError(f"`band` must be (low, high) with low <= high, got {band}.")
        ax.axhspan(low, high, color=BAND_COLOR, alpha=0.45, lw=0, zorder=0, label=band_label)
    if chance is not None:
        ax.axhline(chance, ls="--", c="grey", lw=1, zorder=1, label=f"chance ({chance:g})")

    has_success = success_col in data.columns
    palette = _method_colors(methods)
    for pos, method in enumerate(methods):
        rows = data[data[method_col].astype(str) == method]
        if seed_col in rows.columns:
            rows = rows.sort_values(seed_col, kind="stable")
        offsets = _offsets(len(rows), jitter)
        for offset, (_, row) in zip(offsets, rows.iterrows()):
            y = pd.to_numeric(pd.Series([row[metric]]), errors="coerce").iloc[0]
            yerr = _yerr(row, y, low_col, high_col)
            color = _success_color(row[success_col]) if has_success else palette[method]
            ax.errorbar(
                pos + offset,
                y,
                yerr=yerr,
                fmt="o",
                ms=6,
                color=color,
                ecolor=color,
                mec="black",
                mew=0.5,
                elinewidth=1.2,
                capsize=3,
                zorder=3,
            )
    if has_success:
        from matplotlib.lines import Line2D

        for label, color in (("success", SUCCESS_COLOR), ("fail", FAIL_COLOR)):
            ax.add_line(
                Line2D([], [], ls="", marker="o", color=color, mec="black", mew=0.5, label=label)
            )
    ax.set_xticks(range(len(methods)))
    _tick_labels(ax, methods)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    if title is not None:
        ax.set_title(title)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return finish(ax, show=resolve_show(show, owns))


def utility_comparison(
    table: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    relative_to: str | None = None,
    model_col: str | None = None,
    annotate: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
    title: str | None = None,
) -> Axes:
    """Grouped bar chart of utility metrics, one bar per model within each metric.

    Parameters
    ----------
    table
        Rows are models (index, or ``model_col``), columns are metrics, e.g. the frame of
        :func:`scvi_unlearn.utility.compare_utility`.
    metrics
        Columns to plot; all numeric columns by default.
    relative_to
        A model (row) to divide every metric by, so metrics on different scales share one
        axis (1 = same as that model; a dashed line marks it).
    model_col
        Column with the model names, if they are not the index.
    annotate
        Write each bar's value on top of it.
    ax
        Matplotlib axes to draw on; a new figure if None.
    show
        Show the figure (default: only when no ``ax`` was given).
    title
        Axes title.

    Returns
    -------
    The matplotlib axes: one bar container per model, one bar per model and metric. Save the
    figure with ``ax.figure.savefig(path)``.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from scvi_unlearn.pl import utility_comparison
    >>> table = pd.DataFrame(
    ...     {"knn_accuracy": [0.91, 0.90, 0.84], "silhouette": [0.21, 0.20, 0.12]},
    ...     index=["baseline", "retrain", "fisher"],
    ... )
    >>> ax = utility_comparison(table, show=False)
    >>> len(ax.containers), len(ax.patches)  # 3 models x 2 metrics
    (3, 6)
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"`table` must be a pandas DataFrame, got {type(table).__name__}.")
    data = table
    if model_col is not None:
        _require_columns(data, [model_col], "table")
        data = data.set_index(model_col)
    if metrics is None:
        metrics = [
            c
            for c in data.columns
            if pd.api.types.is_numeric_dtype(data[c]) and not pd.api.types.is_bool_dtype(data[c])
        ]
        if not metrics:
            raise ValueError("`table` has no numeric columns to plot; pass `metrics`.")
    else:
        metrics = list(metrics)
        _require_columns(data, metrics, "table")
    if len(data) == 0:
        raise ValueError("`table` has no rows.")
    values = data[metrics].apply(pd.to_numeric, errors="coerce").astype(float)
    models = [str(m) for m in data.index]
    if relative_to is not None:
        if relative_to not in models:
            raise KeyError(f"`relative_to`={relative_to!r} is not a row of the table: {models}.")
        base = values.iloc[models.index(relative_to)]
        values = values / base.where(base != 0)
    ax, owns = new_axes(ax, figsize=(max(3.5, 0.35 * len(metrics) * len(models) + 1.5), 3.5))
    width = 0.8 / len(models)
    x = np.arange(len(metrics))
    palette = _method_colors(models)
    for i, model in enumerate(models):
        bars = ax.bar(
            x - 0.4 + width * (i + 0.5),
            values.iloc[i].to_numpy(),
            width=width * 0.95,
            color=palette[model],
            edgecolor="black",
            linewidth=0.4,
            label=model,
        )
        if annotate:
            ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=1)
    if relative_to is not None:
        ax.axhline(1.0, ls="--", c="grey", lw=1)
        ax.set_ylabel(f"relative to {relative_to}")
    else:
        ax.set_ylabel("value")
    ax.set_xticks(x)
    _tick_labels(ax, metrics)
    if title is not None:
        ax.set_title(title)
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return finish(ax, show=resolve_show(show, owns))


# ------------------------------------------------------------------------------- helpers
def _require_columns(data: pd.DataFrame, columns, name: str) -> None:
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise KeyError(
            f"`{name}` lacks the column(s) {missing}; it has {list(map(str, data.columns))}."
        )


def _ci_columns(data, metric, low_col, high_col) -> tuple[str | None, str | None]:
    if (low_col is None) != (high_col is None):
        raise ValueError("Pass both `low_col` and `high_col`, or neither.")
    if low_col is None:
        low, high = f"{metric}_low", f"{metric}_high"
        return (low, high) if low in data.columns and high in data.columns else (None, None)
    _require_columns(data, [low_col, high_col], "table")
    return low_col, high_col


def _tick_labels(ax, labels: Sequence[str]) -> None:
    crowded = len(labels) > 4 or sum(len(str(t)) for t in labels) > 10 * len(labels)
    ax.set_xticklabels(labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")


def _yerr(row, y, low_col, high_col):
    if low_col is None or not np.isfinite(y):
        return None
    low, high = float(row[low_col]), float(row[high_col])
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    return np.array([[max(y - low, 0.0)], [max(high - y, 0.0)]])


def _offsets(n: int, jitter: float) -> np.ndarray:
    if n <= 1:
        return np.zeros(max(n, 0))
    return np.linspace(-jitter / 2, jitter / 2, n)


def _success_color(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return UNKNOWN_COLOR
    return SUCCESS_COLOR if bool(value) else FAIL_COLOR


def _method_colors(names: Sequence[str]) -> dict[str, object]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}
