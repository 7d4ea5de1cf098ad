"""Latent space of models side by side (before / after unlearning)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import anndata
import numpy as np
import pandas as pd

from scvi_unlearn._model_data import registered_adata
from scvi_unlearn._validation import as_cell_indices
from scvi_unlearn.pl._utils import finish, resolve_show

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from matplotlib.axes import Axes

_BASES = ("umap", "latent")


def latent_embedding(
    models: Mapping[str, object],
    adata: AnnData | None = None,
    *,
    color: str | None = "cell_type",
    highlight=None,
    basis: str = "umap",
    n_neighbors: int = 15,
    seed: int = 0,
    highlight_label: str = "highlighted cells",
    size: float | None = None,
    axes: Sequence[Axes] | None = None,
    show: bool | None = None,
) -> list[Axes]:
    """Embed each model's latent space in 2-D, side by side, with some cells highlighted.

    For each model, the latent representation (posterior mean) of the cells of ``adata`` is
    put into a *new* AnnData, on which :func:`scanpy.pp.neighbors` and :func:`scanpy.tl.umap`
    run; the user's AnnData is never written to. The ``highlight`` cells (e.g. the forget set)
    are drawn on top with a distinct marker, so one sees where they sit before and after
    unlearning.

    Parameters
    ----------
    models
        ``{title: trained scVI model}``, e.g. ``{"before": model, "after": unlearned}``.
    adata
        Cells to embed (the models' genes); each model's own AnnData if None (they must then
        hold the same cells). Never modified.
    color
        Obs column to colour by (categorical or numeric); None for grey.
    highlight
        Cells to draw on top (positions, boolean mask or obs names).
    basis
        ``"umap"`` (neighbours graph on the latent space, then UMAP) or ``"latent"`` (the first
        two latent dimensions, no scanpy; for quick looks and tests).
    n_neighbors
        Neighbours of the k-NN graph behind the UMAP.
    seed
        Random state of the neighbours graph and UMAP.
    highlight_label
        Legend entry of the highlighted cells.
    size
        Marker size of ordinary cells (default: scaled with the number of cells, as scanpy
        does); highlighted cells are drawn larger.
    axes
        A sequence of matplotlib axes, one per model; a new figure with one row if None.
    show
        Show the figure (default: only when no ``axes`` were given).

    Returns
    -------
    A list of matplotlib axes, one per model, in the order of ``models`` (all of one figure:
    save it with ``axes[0].figure.savefig(path)``).

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import scvi_unlearn as su
    >>> adata = su.data.synthetic_pbmc(n_cells=120, n_genes=40, seed=0)
    >>> su.model.SCVI.setup_anndata(adata)
    >>> model = su.model.SCVI(adata, n_latent=4)
    >>> model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    >>> axes = su.pl.latent_embedding(
    ...     {"before": model, "after": model}, color="cell_type", highlight=[0, 1, 2],
    ...     basis="latent", show=False,
    ... )
    >>> len(axes)
    2
    """
    import matplotlib.pyplot as plt

    if not isinstance(models, Mapping) or not models:
        raise TypeError("`models` must be a non-empty dict {title: trained scVI model}.")
    if basis not in _BASES:
        raise ValueError(f"`basis` must be one of {list(_BASES)}, got {basis!r}.")
    obs, obs_names = _reference_obs(models, adata)
    if color is not None and color not in obs.columns:
        raise KeyError(
            f"`color`={color!r} is not an obs column; available: {list(map(str, obs.columns))}."
        )
    highlight_idx = _highlight_positions(obs_names, highlight)

    if axes is None:
        _, created = plt.subplots(
            1, len(models), figsize=(4.0 * len(models) + 1.6, 4.0), squeeze=False
        )
        axes = list(created[0])
        owns = True
    else:
        axes = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(axes) != len(models):
            raise ValueError(f"Got {len(axes)} axes for {len(models)} models; pass one per model.")
        owns = False

    colors, legend = _cell_colors(obs, color, adata)
    n = len(obs_names)
    size = float(size) if size is not None else float(np.clip(120_000 / max(n, 1), 2, 30))
    rest = np.setdiff1d(np.arange(n), highlight_idx)
    for ax, (name, model) in zip(axes, models.items()):
        latent = _latent(model, adata)
        if latent.shape[0] != n:
            raise ValueError(
                f"Model {name!r} returned {latent.shape[0]} cells, expected {n}; pass `adata`."
            )
        coords = _embed(latent, basis, n_neighbors, seed)
        ax.scatter(
            coords[rest, 0],
            coords[rest, 1],
            c=colors[rest],
            s=size,
            lw=0,
            rasterized=True,
            **_numeric_kw(colors, legend),
        )
        if highlight_idx.size:
            ax.scatter(
                coords[highlight_idx, 0],
                coords[highlight_idx, 1],
                c=colors[highlight_idx],
                s=max(4 * size, 36),
                marker="D",
                edgecolors="black",
                linewidths=0.8,
                zorder=3,
                **_numeric_kw(colors, legend),
            )
        ax.set_title(str(name))
        label = "UMAP" if basis == "umap" else "latent"
        ax.set_xlabel(f"{label} 1")
        ax.set_ylabel(f"{label} 2")
        ax.set_xticks([])
        ax.set_yticks([])
    _legend(axes[-1], legend, highlight_idx.size > 0, highlight_label, color)
    return finish(axes, show=resolve_show(show, owns))


# ------------------------------------------------------------------------------- helpers
def _reference_obs(models, adata) -> tuple[pd.DataFrame, pd.Index]:
    if adata is not None:
        return adata.obs, adata.obs_names
    first = None
    for name, model in models.items():
        own = getattr(model, "adata", None)
        if own is None:
            raise ValueError(f"Model {name!r} holds no AnnData; pass `adata`.")
        if first is None:
            first = own
        elif not np.array_equal(own.obs_names, first.obs_names):
            raise ValueError(
                "The models hold different cells; pass `adata` to embed the same cells."
            )
    return first.obs, first.obs_names


def _highlight_positions(obs_names: pd.Index, highlight) -> np.ndarray:
    if highlight is None:
        return np.array([], dtype=np.int64)
    stub = anndata.AnnData(obs=pd.DataFrame(index=obs_names))
    return as_cell_indices(stub, highlight, "highlight", allow_empty=True)


def _latent(model, adata) -> np.ndarray:
    """Posterior-mean latent of ``adata``'s cells, without writing into ``adata``."""
    own = getattr(model, "adata", None)
    if adata is None or adata is own:
        return np.asarray(model.get_latent_representation())
    return np.asarray(model.get_latent_representation(registered_adata(model, adata)))


def _embed(latent: np.ndarray, basis: str, n_neighbors: int, seed: int) -> np.ndarray:
    latent = np.asarray(latent, dtype=np.float32)
    if basis == "latent":
        if latent.shape[1] < 2:
            return np.c_[latent[:, 0], np.zeros(len(latent))]
        return latent[:, :2]
    import scanpy as sc  # heavy: only for UMAP

    emb = anndata.AnnData(X=latent)
    k = int(min(max(n_neighbors, 2), max(len(latent) - 1, 2)))
    sc.pp.neighbors(emb, use_rep="X", n_neighbors=k, random_state=seed)
    sc.tl.umap(emb, random_state=seed)
    return np.asarray(emb.obsm["X_umap"])


def _cell_colors(obs: pd.DataFrame, color: str | None, adata):
    """Per-cell colours and a legend spec: ('categorical', {cat: rgba}) or ('numeric', ...)."""
    from matplotlib.colors import to_rgba

    n = len(obs)
    if color is None:
        return np.tile(to_rgba("#9aa5b1"), (n, 1)), None
    values = obs[color]
    if pd.api.types.is_numeric_dtype(values) and not isinstance(values.dtype, pd.CategoricalDtype):
        return values.to_numpy(dtype=float), ("numeric", color)
    cats = values.astype("category")
    categories = list(cats.cat.categories)
    palette = _palette(len(categories), adata, color)
    lookup = {c: to_rgba(palette[i]) for i, c in enumerate(categories)}
    rgba = np.array([lookup.get(v, to_rgba("lightgrey")) for v in cats.astype(object)])
    if rgba.size == 0:
        rgba = np.zeros((0, 4))
    return rgba, ("categorical", lookup)


def _palette(n: int, adata, color: str) -> list:
    uns = getattr(adata, "uns", {}) if adata is not None else {}
    stored = uns.get(f"{color}_colors") if hasattr(uns, "get") else None
    if stored is not None and len(stored) >= n:
        return list(stored)
    from scanpy.plotting import palettes

    if n <= 20:
        return list(palettes.default_20)
    if n <= 28:
        return list(palettes.default_28)
    return [palettes.default_102[i % len(palettes.default_102)] for i in range(n)]


def _numeric_kw(colors: np.ndarray, legend) -> dict:
    if legend is not None and legend[0] == "numeric":
        finite = colors[np.isfinite(colors)]
        vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        return {"cmap": "viridis", "vmin": vmin, "vmax": vmax}
    return {}


def _legend(ax, legend, has_highlight: bool, highlight_label: str, color) -> None:
    from matplotlib.lines import Line2D

    handles = []
    if legend is not None and legend[0] == "categorical":
        handles += [
            Line2D([], [], ls="", marker="o", ms=5, color=rgba, label=str(cat))
            for cat, rgba in legend[1].items()
        ]
    elif legend is not None and legend[0] == "numeric":
        coll = ax.collections[0]
        ax.figure.colorbar(coll, ax=ax, label=str(color), shrink=0.7)
    if has_highlight:
        handles.append(
            Line2D(
                [], [], ls="", marker="D", ms=6, mfc="white", mec="black", label=highlight_label
            )
        )
    if handles:
        ax.legend(
            handles=handles,
            fontsize=7,
            frameon=False,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            title=str(color) if legend is not None and legend[0] == "categorical" else None,
            title_fontsize=7,
        )
