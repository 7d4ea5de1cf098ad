"""A fitted model's relation to an AnnData: which cells it trained on, and a registered view."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from scvi_unlearn._compat import named_layers, validate_anndata
from scvi_unlearn._validation import check_genes_match

if TYPE_CHECKING:
    from scvi.model import SCVI


def training_positions(model: SCVI, adata: AnnData | None = None) -> np.ndarray | None:
    """Sorted positions in ``adata`` (default: the model's own) of the cells the model trained on.

    Recorded obs names (``model.train_obs_names_``, written by
    :class:`scvi_unlearn.model.SCVI`) win over ``model.train_indices``: names survive
    re-ordering or subsetting of the AnnData, positions do not. Recorded cells that ``adata``
    lacks are left out. Positions alone (a plain scvi-tools model) are only trusted when the
    model's AnnData has as many cells as the one it was set up with.

    Returns
    -------
    ``np.int64`` positions, or ``None`` if the model records no training cells.

    Raises
    ------
    ValueError
        If only positions are recorded and the model's AnnData is not the one it was set up
        with (another number of cells), so the positions cannot be matched.
    """
    target = model.adata if adata is None else adata
    names = getattr(model, "train_obs_names_", None)
    if names is None:
        train = getattr(model, "train_indices", None)
        if train is None or model.adata is None:
            return None
        n_setup = (getattr(model, "summary_stats", None) or {}).get("n_cells")
        if n_setup is not None and int(n_setup) != model.adata.n_obs:
            raise ValueError(
                f"The model was set up on an AnnData of {int(n_setup)} cells but its data has "
                f"{model.adata.n_obs}; its stored training positions cannot be matched to these "
                "cells. Pass the AnnData it was trained on, or name the cells explicitly."
            )
        names = model.adata.obs_names[np.asarray(train, dtype=np.int64)]
    pos = target.obs_names.get_indexer(pd.Index(names))
    return np.unique(pos[pos >= 0]).astype(np.int64)


def registered_adata(model: SCVI, adata: AnnData | None) -> AnnData:
    """``adata`` registered with ``model``, without writing into the caller's object.

    scvi-tools' validation writes registry columns into ``obs`` and keys into ``uns``; it gets a
    new AnnData that shares the count matrices (no copy of ``X`` or layers) but owns its
    ``obs``, ``var`` and ``uns``.
    """
    if adata is None or adata is model.adata:
        return model.adata
    check_genes_match(model, adata)
    if adata.is_view:  # a view's matrices are materialised on access anyway
        adata = adata.copy()
    light = AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        layers=named_layers(adata),
        obsm={key: adata.obsm[key] for key in adata.obsm},
    )
    scvi_logger = logging.getLogger("scvi")
    level = scvi_logger.level
    scvi_logger.setLevel(logging.WARNING)  # "attempting to transfer AnnData setup" is expected
    try:
        return validate_anndata(model, light)
    finally:
        scvi_logger.setLevel(level)
