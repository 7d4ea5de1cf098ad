"""Per-cell membership-attack features from a fitted scVI model (:ref:`methods-features`).

Everything here is batched and deterministic: the latent code is the posterior mean, so two
calls on the same model and cells return identical numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from scvi_unlearn._compat import make_data_loader
from scvi_unlearn._configurations import check_supported_model
from scvi_unlearn._model_data import registered_adata
from scvi_unlearn._validation import as_cell_indices, check_not_minified, check_trained
from scvi_unlearn.module import SCALAR_FEATURES, feature_matrix, per_cell_loss_terms

if TYPE_CHECKING:
    from anndata import AnnData
    from scvi.model import SCVI


@torch.no_grad()
def attack_features(
    model: SCVI,
    adata: AnnData | None = None,
    indices=None,
    batch_size: int = 1024,
    include_latent: bool = False,
) -> pd.DataFrame:
    """Compute per-cell attack features from a fitted scVI model.

    Parameters
    ----------
    model
        A trained :class:`scvi.model.SCVI` (or subclass).
    adata
        AnnData with the model's genes; defaults to the model's own. It is never modified.
    indices
        Cells to featurise (integer positions, boolean mask or obs names); all cells if None.
        Rows come back in the order given.
    batch_size
        Minibatch size; larger is faster on CPU, the result does not depend on it.
    include_latent
        Also return the posterior mean (``z_mean_*``) and variance (``z_var_*``) columns.

    Returns
    -------
    DataFrame indexed by obs name with the columns of
    :data:`~scvi_unlearn.module.SCALAR_FEATURES` (plus latent columns if requested). Two calls
    give identical values.

    Raises
    ------
    UnsupportedModelError
        If ``model`` is not an scVI the package supports (SCANVI, TOTALVI, ...; see
        :data:`~scvi_unlearn.model.REFUSED_CONFIGURATIONS`).

    Examples
    --------
    >>> import scvi_unlearn as su
    >>> adata = su.data.synthetic_pbmc(n_cells=100, n_genes=50, seed=0)
    >>> recipe = su.Recipe(model_kwargs={"n_latent": 4}, train_kwargs={"max_epochs": 2})
    >>> model = recipe.fit(adata.copy(), accelerator="cpu", enable_progress_bar=False)
    >>> features = su.attack_features(model, indices=[3, 1])
    >>> features.shape, features.index.tolist()
    ((2, 10), ['cell_0003', 'cell_0001'])
    >>> features.equals(su.attack_features(model, indices=[3, 1]))
    True
    """
    check_supported_model(model)
    check_trained(model)
    check_not_minified(model)
    adata = registered_adata(model, adata)
    idx = (
        np.arange(adata.n_obs)
        if indices is None
        else as_cell_indices(adata, indices, "indices", allow_empty=True, keep_order=True)
    )
    module = model.module
    was_training = module.training
    module.eval()
    loader = make_data_loader(model, adata, indices=idx, batch_size=batch_size)
    chunks: list[torch.Tensor] = []
    latents: list[torch.Tensor] = []
    try:
        for tensors in loader:
            tensors = {
                k: v.to(model.device) if torch.is_tensor(v) else v for k, v in tensors.items()
            }
            terms = per_cell_loss_terms(module, tensors, sparse_likelihood=True)
            chunks.append(feature_matrix(terms).double().cpu())
            if include_latent:
                latents.append(torch.cat([terms["qz_mean"], terms["qz_var"]], -1).double().cpu())
    finally:
        module.train(was_training)
    values = (
        torch.cat(chunks).numpy() if chunks else np.zeros((0, len(SCALAR_FEATURES)), np.float64)
    )
    frame = pd.DataFrame(values, index=adata.obs_names[idx], columns=list(SCALAR_FEATURES))
    if include_latent and latents:
        lat = torch.cat(latents).numpy()
        n_latent = lat.shape[1] // 2
        names = [f"z_mean_{i}" for i in range(n_latent)] + [f"z_var_{i}" for i in range(n_latent)]
        frame = pd.concat([frame, pd.DataFrame(lat, index=frame.index, columns=names)], axis=1)
    return frame
