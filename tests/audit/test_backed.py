"""Atlas scale: attack features stream from a backed (on-disk) AnnData in chunks."""

from __future__ import annotations

import anndata as ad
import numpy as np
from scipy import sparse

import scvi_unlearn as su
from scvi_unlearn._model_data import registered_adata


def test_features_of_a_backed_anndata_equal_in_memory_and_stay_on_disk(tmp_path):
    adata = su.data.synthetic_pbmc(n_cells=300, n_genes=50, seed=0)
    adata.X = sparse.csr_matrix(adata.X)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    recipe = su.Recipe(model_kwargs={"n_latent": 4}, train_kwargs={"max_epochs": 2})
    model = recipe.fit(adata.copy(), accelerator="cpu", enable_progress_bar=False)
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    # small chunks: the loader reads 64 cells at a time from disk
    on_disk = su.attack_features(model, backed, batch_size=64)
    in_memory = su.attack_features(model, adata, batch_size=300)
    np.testing.assert_allclose(on_disk.to_numpy(), in_memory.to_numpy(), rtol=1e-6, atol=1e-8)
    assert on_disk.index.equals(in_memory.index)
    assert backed.isbacked
    # the registered copy shares the on-disk matrix: no copy of X is read into memory
    assert not isinstance(registered_adata(model, backed).X, np.ndarray | sparse.spmatrix)
