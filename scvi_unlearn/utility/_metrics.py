"""Utility of a (possibly unlearned) scVI model on held-out cells (:ref:`methods-utility`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors

from scvi_unlearn._model_data import registered_adata
from scvi_unlearn._validation import IndexLike, as_cell_indices, check_trained
from scvi_unlearn.audit import attack_features

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

#: Default marker genes (T, B, monocyte, NK cells, platelets / megakaryocytes).
DEFAULT_MARKERS: tuple[str, ...] = (
    "CD3D", "CD3E", "MS4A1", "CD79A", "CD14", "LYZ", "NKG7", "GNLY", "PPBP",
)  # fmt: skip


def utility_metrics(
    model,
    adata: AnnData | None = None,
    indices: IndexLike | None = None,
    labels_key: str | None = "cell_type",
    markers: Sequence[str] | None = None,
    n_neighbors: int = 15,
    seed: int = 0,
    n_samples: int = 10,
) -> dict[str, Any]:
    """Likelihood, latent-space and marker-gene utility of a model on some cells.

    Parameters
    ----------
    model
        A trained scVI model.
    adata
        AnnData with the model's genes (default: the model's own). Never modified.
    indices
        Cells to evaluate (positions, mask or obs names); all cells if ``None``. Pass
        held-out cells for held-out utility.
    labels_key
        Obs column with cell types for the latent-space metrics (skipped if ``None`` or
        absent).
    markers
        Marker genes for the expression agreement (default :data:`DEFAULT_MARKERS`); genes
        not in the data are skipped.
    n_neighbors
        Neighbours of the k-NN classifier.
    seed
        Seed of the posterior samples behind the normalised expression.
    n_samples
        Posterior samples averaged by ``get_normalized_expression``.

    Returns
    -------
    Dict with ``n_cells``; ``neg_elbo``, ``reconstruction_nll``, ``kl`` (per-cell means, nats)
    and ``neg_elbo_per_count``; ``knn_accuracy`` (leave-one-out k-NN cell-type accuracy in
    the latent space) and ``silhouette`` (of cell types); ``marker_correlation`` (mean over
    present markers of the Pearson r between the model's normalised expression and the
    observed counts / library size), ``marker_correlations`` (per marker) and
    ``n_markers``. Undefined values are NaN.
    """
    check_trained(model)
    data = registered_adata(model, adata)
    idx = np.arange(data.n_obs) if indices is None else as_cell_indices(data, indices, "indices")
    feats = attack_features(model, data, indices=idx)
    out: dict[str, Any] = {
        "n_cells": int(idx.size),
        "neg_elbo": float(feats["neg_elbo"].mean()),
        "reconstruction_nll": float(feats["reconstruction_nll"].mean()),
        "kl": float(feats["kl_z"].mean()),
        "neg_elbo_per_count": float(feats["neg_elbo_per_count"].mean()),
    }
    out.update(_latent_metrics(model, data, idx, labels_key, n_neighbors))
    out.update(_marker_metrics(model, data, idx, markers, seed, n_samples))
    return out


def compare_utility(
    models: dict[str, Any],
    adata: AnnData | None = None,
    indices: IndexLike | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`utility_metrics` of several models on the same cells, one row per model.

    Examples
    --------
    >>> import scvi_unlearn as su
    >>> adata = su.data.synthetic_pbmc(n_cells=120, n_genes=50, seed=0)
    >>> recipe = su.Recipe(model_kwargs={"n_latent": 4}, train_kwargs={"max_epochs": 2})
    >>> base = recipe.fit_cells(adata, list(range(100)), accelerator="cpu",
    ...                         enable_progress_bar=False)
    >>> retrained = base.unlearn([0, 1], method="retrain", accelerator="cpu",
    ...                          enable_progress_bar=False)
    >>> table = compare_utility(
    ...     {"baseline": base, "retrain": retrained}, adata, indices=range(100, 120)
    ... )
    >>> table.index.tolist(), "knn_accuracy" in table.columns
    (['baseline', 'retrain'], True)
    """
    if not models:
        raise ValueError("`models` is empty; pass a dict name -> model.")
    rows = {}
    for name, model in models.items():
        metrics = utility_metrics(model, adata, indices, **kwargs)
        metrics.pop("marker_correlations", None)
        rows[name] = metrics
    return pd.DataFrame.from_dict(rows, orient="index")


def _latent_metrics(model, data, idx, labels_key, n_neighbors) -> dict[str, float]:
    nan = {"knn_accuracy": float("nan"), "silhouette": float("nan")}
    if labels_key is None or labels_key not in data.obs or idx.size < 3:
        return nan
    labels = pd.Categorical(data.obs[labels_key].to_numpy()[idx])
    codes = np.asarray(labels.codes)
    if (codes < 0).any() or np.unique(codes).size < 2:
        return nan
    latent = model.get_latent_representation(data, indices=idx)
    return {
        "knn_accuracy": knn_accuracy(latent, codes, n_neighbors),
        "silhouette": _silhouette(latent, codes),
    }


def knn_accuracy(latent: np.ndarray, labels: np.ndarray, n_neighbors: int = 15) -> float:
    """Leave-one-out k-NN accuracy: each cell is classified by its neighbours' majority label.

    Examples
    --------
    >>> z = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    >>> knn_accuracy(z, np.array([0, 0, 0, 1, 1, 1]), n_neighbors=2)
    1.0
    """
    labels = np.asarray(labels)
    k = int(min(n_neighbors, labels.size - 1))
    if k < 1:
        return float("nan")
    _, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(latent)
    neighbour_labels = labels[neighbours[:, 1:]]  # column 0 is the cell itself
    n_classes = int(labels.max()) + 1
    votes = (neighbour_labels[..., None] == np.arange(n_classes)).sum(1)
    return float((votes.argmax(1) == labels).mean())


def _silhouette(latent: np.ndarray, labels: np.ndarray) -> float:
    n_labels = np.unique(labels).size
    if n_labels < 2 or n_labels > labels.size - 1:
        return float("nan")
    return float(silhouette_score(latent, labels))


def _marker_metrics(model, data, idx, markers, seed, n_samples) -> dict[str, Any]:
    markers = DEFAULT_MARKERS if markers is None else tuple(markers)
    present = [g for g in markers if g in data.var_names]
    if not present or idx.size < 3:
        return {"marker_correlation": float("nan"), "marker_correlations": {}, "n_markers": 0}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        predicted = model.get_normalized_expression(
            data, indices=idx, gene_list=present, library_size=1, n_samples=n_samples,
            return_mean=True, return_numpy=False,
        )  # fmt: skip
    # scvi-tools returns the genes in var_names order, not gene_list order: select by name.
    predicted = np.asarray(predicted[present], dtype=float)
    observed = _observed_fractions(model, data, idx, present)
    per_marker = {g: _pearson(predicted[:, j], observed[:, j]) for j, g in enumerate(present)}
    finite = [r for r in per_marker.values() if np.isfinite(r)]
    return {
        "marker_correlation": float(np.mean(finite)) if finite else float("nan"),
        "marker_correlations": per_marker,
        "n_markers": len(finite),
    }


def _observed_fractions(model, data, idx, genes) -> np.ndarray:
    """Observed counts of ``genes`` divided by each cell's total counts."""
    layer = model.adata_manager.registry.get("setup_args", {}).get("layer")
    matrix = data.layers[layer] if layer else data.X
    rows = matrix[idx]
    library = np.asarray(rows.sum(1)).ravel().astype(float)
    cols = data.var_names.get_indexer(genes)
    counts = rows[:, cols]
    counts = counts.toarray() if sparse.issparse(counts) else np.asarray(counts)
    return counts.astype(float) / np.maximum(library, 1.0)[:, None]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")
