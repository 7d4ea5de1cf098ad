"""Input validation shared by every layer: clear errors that name the problem."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

if TYPE_CHECKING:
    from anndata import AnnData

IndexLike = np.ndarray | Sequence[int] | Sequence[str] | Sequence[bool] | pd.Index


def as_cell_indices(
    adata: AnnData,
    cells: IndexLike,
    name: str = "cells",
    allow_empty: bool = False,
    keep_order: bool = False,
) -> np.ndarray:
    """Turn integer positions, a boolean mask or obs names into sorted integer positions.

    Parameters
    ----------
    adata
        The AnnData the cells refer to.
    cells
        Integer positions, a boolean mask of length ``adata.n_obs`` or obs names.
    name
        What the cells are called in error messages (e.g. ``"forget_idx"``).
    allow_empty
        Whether an empty selection is acceptable.
    keep_order
        Return the positions in the order given instead of sorted.

    Returns
    -------
    Unique integer positions (``np.int64``), sorted unless ``keep_order``.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> a = anndata.AnnData(np.ones((4, 2), dtype=np.float32))
    >>> a.obs_names = ["a", "b", "c", "d"]
    >>> as_cell_indices(a, ["c", "a"]).tolist()
    [0, 2]
    >>> as_cell_indices(a, np.array([True, False, False, True])).tolist()
    [0, 3]
    """
    if cells is None:
        raise ValueError(f"`{name}` is None; pass integer positions, a boolean mask or obs names.")
    arr = np.asarray(cells)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be one-dimensional, got shape {arr.shape}.")
    n_obs = adata.n_obs
    if arr.dtype == bool:
        if arr.shape[0] != n_obs:
            raise ValueError(
                f"`{name}` is a boolean mask of length {arr.shape[0]}, but the AnnData has "
                f"{n_obs} cells."
            )
        idx = np.flatnonzero(arr)
    elif arr.size and (arr.dtype.kind in "USO"):
        names = pd.Index(arr.astype(str))
        if names.has_duplicates:
            dup = names[names.duplicated()].unique()[:5].tolist()
            raise ValueError(f"`{name}` contains duplicated obs names, e.g. {dup}.")
        pos = adata.obs_names.get_indexer(names)
        if (pos < 0).any():
            missing = names[pos < 0][:5].tolist()
            raise KeyError(
                f"`{name}`: {int((pos < 0).sum())} obs names are not in the AnnData, e.g. "
                f"{missing}."
            )
        idx = pos.astype(np.int64)
    elif arr.size == 0:
        idx = np.zeros(0, dtype=np.int64)
    else:
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise TypeError(f"`{name}` must hold integer positions, got non-integer floats.")
            arr = arr.astype(np.int64)
        elif arr.dtype.kind not in "iu":
            raise TypeError(
                f"`{name}` must be integer positions, a boolean mask or obs names, got dtype "
                f"{arr.dtype}."
            )
        idx = arr.astype(np.int64)
        bad = (idx < 0) | (idx >= n_obs)
        if bad.any():
            raise IndexError(
                f"`{name}`: {int(bad.sum())} indices are out of range for an AnnData with "
                f"{n_obs} cells (e.g. {idx[bad][:5].tolist()}). Negative positions are not "
                "accepted."
            )
        uniq, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"`{name}` contains duplicated indices, e.g. {uniq[counts > 1][:5].tolist()}."
            )
    if not keep_order:
        idx = np.unique(idx)
    if idx.size == 0 and not allow_empty:
        raise ValueError(f"`{name}` is empty: select at least one cell.")
    return idx


def check_disjoint(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise if two index sets overlap."""
    both = np.intersect1d(a, b)
    if both.size:
        raise ValueError(
            f"`{name_a}` and `{name_b}` overlap in {both.size} cells (e.g. {both[:5].tolist()}); "
            "a cell cannot be both."
        )


def check_count_data(adata: AnnData, layer: str | None = None, n_check: int = 2000) -> None:
    """Raise if the matrix does not look like raw counts (non-negative integers).

    Only the first ``n_check`` cells are inspected, so the check is cheap on large data.
    """
    x = adata.layers[layer] if layer is not None else adata.X
    if x is None:
        raise ValueError("The AnnData has no expression matrix (`X` is None).")
    sub = x[: min(n_check, adata.n_obs)]
    values = sub.data if sparse.issparse(sub) else np.asarray(sub).ravel()
    values = np.asarray(values)
    where = f"layer '{layer}'" if layer is not None else "`adata.X`"
    if values.size == 0:
        return
    if np.any(values < 0):
        raise ValueError(
            f"{where} contains negative values; scVI models raw UMI counts. Pass the raw "
            "count matrix (e.g. `adata.layers['counts']`), not log-normalised or scaled data."
        )
    if not np.allclose(values, np.round(values)):
        raise ValueError(
            f"{where} contains non-integer values; scVI models raw UMI counts with a negative "
            "binomial. Pass the raw count matrix, not normalised or log-transformed data."
        )


def check_trained(model) -> None:
    """Raise if an scvi-tools model has not been trained."""
    if not getattr(model, "is_trained", False):
        raise RuntimeError(
            f"The {type(model).__name__} model is not trained; call `model.train()` first (an "
            "untrained model has nothing to audit or unlearn)."
        )


def check_not_minified(model) -> None:
    """Raise if the model's AnnData is minified (its counts replaced by latent parameters)."""
    minified = getattr(model, "minified_data_type", None)
    if minified is not None:
        raise ValueError(
            f"The model's AnnData is minified ({minified}): it holds latent posterior "
            "parameters, not the counts that audits score and unlearning retrains on. Load the "
            "model with the full AnnData (`SCVI.load(dir_path, adata=full_adata)`)."
        )


def check_genes_match(model, adata: AnnData) -> None:
    """Raise if ``adata``'s genes differ from those the model was set up with."""
    model_genes = pd.Index(model.adata.var_names)
    genes = pd.Index(adata.var_names)
    if len(model_genes) != len(genes) or not np.all(model_genes == genes):
        missing = model_genes.difference(genes)
        extra = genes.difference(model_genes)
        detail = (
            f"{len(missing)} model genes missing (e.g. {missing[:5].tolist()}), "
            f"{len(extra)} extra genes (e.g. {extra[:5].tolist()})"
            if len(missing) or len(extra)
            else "same genes in a different order"
        )
        raise ValueError(
            f"The AnnData's genes do not match the model's ({model.adata.n_vars} genes): "
            f"{detail}. Subset and order `adata` to `model.adata.var_names`."
        )
