"""Matching a loaded model to the AnnData it is given: genes and cells by name, never position.

scvi-tools only warns when an AnnData's genes have other names or another order, and it stores
a plain model's training cells as row positions; either would make a model read the wrong
genes or count the wrong cells as trained without a word.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scvi_unlearn._io import read_h5ad_checked

if TYPE_CHECKING:
    import os

    from anndata import AnnData


def genes_in_model_order(adata: AnnData, var_names) -> AnnData:
    """``adata`` with its genes in the model's order (a new AnnData if they were re-ordered).

    Raises
    ------
    ValueError
        If ``adata`` lacks genes of the model or has others (the message names some).
    """
    model_genes = pd.Index(np.asarray(var_names).astype(str))
    genes = pd.Index(adata.var_names.astype(str))
    if genes.equals(model_genes):
        return adata
    missing, extra = model_genes.difference(genes), genes.difference(model_genes)
    if len(missing) or len(extra) or genes.has_duplicates:
        raise ValueError(
            f"The AnnData's genes do not match the model's {len(model_genes)} genes: "
            f"{len(missing)} model genes are missing (e.g. {missing[:5].tolist()}) and "
            f"{len(extra)} genes are not the model's (e.g. {extra[:5].tolist()}). Subset the "
            "AnnData to the model's genes (`adata[:, var_names]`)."
        )
    warnings.warn(
        "The AnnData has the model's genes in another order; a copy in the model's order is "
        "used (the AnnData passed in is not modified).",
        UserWarning,
        stacklevel=3,
    )
    return adata[:, model_genes].copy()


def match_rows_by_name(model, saved_adata: str | os.PathLike) -> None:
    """Point ``model``'s training and validation positions at its AnnData's rows, by name.

    Names come from the model (``train_obs_names_``, ``validation_obs_names_``, recorded by
    :class:`scvi_unlearn.model.SCVI`), or for a plain scvi-tools model from the saved
    ``adata.h5ad`` beside it, whose rows the stored positions index. Without either, the
    positions are kept and a warning says that they cannot be checked.
    """
    if getattr(model, "train_indices", None) is None:
        return  # an untrained model has no cells to match
    names = getattr(model, "train_obs_names_", None)
    validation = getattr(model, "validation_obs_names_", None)
    if names is None:
        try:
            saved = read_h5ad_checked(saved_adata, backed="r")
        except FileNotFoundError:
            warnings.warn(
                "This model records its training cells only as row positions and its "
                "directory holds no saved AnnData, so which rows it trained on cannot be "
                "checked: the rows of the AnnData passed in are taken to be the cells it was "
                "set up on, in the same order. Save models with `save_anndata=True` (or with "
                "scvi_unlearn's SCVI, which records cell names) to make this checkable.",
                UserWarning,
                stacklevel=3,
            )
            return
        saved_names = saved.obs_names.copy()
        saved.file.close()
        names = saved_names[np.asarray(model.train_indices, dtype=np.int64)].tolist()
        held_out = model.validation_indices
        validation = None if held_out is None else saved_names[np.asarray(held_out, int)].tolist()
        model.train_obs_names_ = names
        model.validation_obs_names_ = validation
    model.train_indices = _positions(model.adata, names)
    if validation is not None:
        model.validation_indices = _positions(model.adata, validation)


def _positions(adata: AnnData, names) -> np.ndarray:
    pos = adata.obs_names.get_indexer(pd.Index(names))
    return np.sort(pos[pos >= 0]).astype(np.int64)
