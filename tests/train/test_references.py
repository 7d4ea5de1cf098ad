"""A method's reference pool, trained or read from the cache: same seed, same model."""

from __future__ import annotations

import numpy as np
import scvi

import scvi_unlearn as su
from scvi_unlearn.train import weights_fingerprint

QUIET = {"accelerator": "cpu", "enable_progress_bar": False}


def _small_model():
    adata = su.data.synthetic_pbmc(n_cells=240, n_genes=50, seed=3)
    train, val = np.arange(0, 240, 2), np.arange(1, 240, 4)
    test = np.setdiff1d(np.arange(240), np.union1d(train, val))
    su.model.SCVI.setup_anndata(adata)
    scvi.settings.seed = 0
    model = su.model.SCVI(adata, n_hidden=16, n_latent=4)
    model.train(
        max_epochs=4, datasplitter_kwargs={"external_indexing": [train, val, test]}, **QUIET
    )
    return model, train[:40], np.arange(3, 240, 4)


def test_a_cached_reference_pool_gives_the_weights_of_a_freshly_trained_one(tmp_path):
    model, forget, nonmembers = _small_model()

    def unlearn():
        out = model.unlearn(
            forget, method="extragradient_calibrated", nonmembers=nonmembers, max_epochs=1,
            reference_cache_dir=str(tmp_path), seed=1, damage_limit=None, **QUIET,
        )  # fmt: skip
        return weights_fingerprint(out.module)

    fresh = unlearn()  # trains the pool (each reference seeds scvi-tools) and caches it
    assert list(tmp_path.glob("shadows-*/pool.npz"))
    assert unlearn() == fresh  # reads it from the cache: no seeding, same draws after it
