"""Tests of the utility metrics (scvi_unlearn.utility)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi
from scipy import sparse

import scvi_unlearn as su
from scvi_unlearn.utility import DEFAULT_MARKERS, compare_utility, knn_accuracy, utility_metrics


@pytest.fixture(scope="module")
def fitted():
    adata = su.data.synthetic_pbmc(n_cells=300, n_genes=100, seed=7)
    su.model.SCVI.setup_anndata(adata)
    scvi.settings.seed = 0
    good = su.model.SCVI(adata, n_hidden=64, n_latent=6)
    good.train(max_epochs=60, accelerator="cpu", train_size=0.8, enable_progress_bar=False)
    scvi.settings.seed = 0
    poor = su.model.SCVI(adata, n_hidden=64, n_latent=6)
    poor.train(max_epochs=1, accelerator="cpu", train_size=0.8, enable_progress_bar=False)
    heldout = np.sort(good.validation_indices)
    return {"adata": adata, "good": good, "poor": poor, "heldout": heldout}


def test_utility_metrics_values(fitted):
    m = utility_metrics(fitted["good"], indices=fitted["heldout"])
    assert m["n_cells"] == fitted["heldout"].size
    assert m["neg_elbo"] == pytest.approx(m["reconstruction_nll"] + m["kl"])
    assert m["kl"] > 0 and m["reconstruction_nll"] > 0
    assert 0 <= m["knn_accuracy"] <= 1 and -1 <= m["silhouette"] <= 1
    assert m["n_markers"] == len(DEFAULT_MARKERS)
    assert set(m["marker_correlations"]) == set(DEFAULT_MARKERS)
    # a trained model separates cell types and tracks markers far better than chance
    assert m["knn_accuracy"] > 0.65  # majority class ~0.4; rare types fail at k=15
    assert m["marker_correlation"] > 0.5
    assert utility_metrics(fitted["good"], indices=fitted["heldout"]) == m  # deterministic


def test_training_improves_every_metric(fitted):
    table = compare_utility(
        {"good": fitted["good"], "poor": fitted["poor"]}, indices=fitted["heldout"]
    )
    assert list(table.index) == ["good", "poor"]
    good, poor = table.loc["good"], table.loc["poor"]
    assert good["neg_elbo"] < poor["neg_elbo"]
    assert good["knn_accuracy"] > poor["knn_accuracy"]
    assert good["marker_correlation"] > poor["marker_correlation"]


def test_marker_correlation_is_per_gene(fitted):
    """Correlations must pair each marker's prediction with the same marker's counts."""
    adata = fitted["adata"]
    # listing markers in reverse var order must not change any marker's correlation
    markers = ["PPBP", "CD14", "CD3D"]
    forward = utility_metrics(fitted["good"], markers=markers)["marker_correlations"]
    backward = utility_metrics(fitted["good"], markers=markers[::-1])["marker_correlations"]
    assert forward == backward
    assert min(forward.values()) > 0.3
    missing = utility_metrics(fitted["good"], markers=["NOT_A_GENE"], labels_key="nope")
    assert np.isnan(missing["marker_correlation"]) and missing["n_markers"] == 0
    assert np.isnan(missing["knn_accuracy"]) and np.isnan(missing["silhouette"])
    assert adata.n_vars == 100


def test_other_anndata_is_not_modified_and_genes_must_match(fitted):
    other = su.data.synthetic_pbmc(n_cells=80, n_genes=100, seed=8)
    obs, uns, x = other.obs.copy(), sorted(other.uns), other.X.copy()
    m = utility_metrics(fitted["good"], other)
    assert m["n_cells"] == 80
    pd.testing.assert_frame_equal(other.obs, obs)
    assert sorted(other.uns) == uns and (other.X != x).nnz == 0
    wrong = su.data.synthetic_pbmc(n_cells=80, n_genes=90, seed=8)
    with pytest.raises(ValueError, match="genes do not match"):
        utility_metrics(fitted["good"], wrong)
    with pytest.raises(ValueError, match="empty"):
        compare_utility({})


def test_own_anndata_is_not_modified(fitted):
    adata = fitted["adata"]
    obs, uns, x = adata.obs.copy(), sorted(adata.uns), adata.X.copy()
    utility_metrics(fitted["good"], indices=fitted["heldout"])
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert sorted(adata.uns) == uns
    assert (adata.X != x).nnz == 0 if sparse.issparse(x) else np.array_equal(adata.X, x)


def test_knn_accuracy_leave_one_out():
    z = np.r_[np.zeros((5, 2)), np.ones((5, 2)) * 10]
    labels = np.r_[np.zeros(5, int), np.ones(5, int)]
    assert knn_accuracy(z, labels, n_neighbors=3) == 1.0
    # labels unrelated to the latent space: around chance, never the trivial 1.0
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 3))
    assert knn_accuracy(z, rng.integers(0, 2, 200), n_neighbors=15) < 0.65
