"""Shared test settings and fixtures: tiny data, few epochs, CPU, one thread."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import scvi
import torch

# Small models on 2 cores: several torch threads per process only fight each other.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
for _name in ("lightning.pytorch", "lightning.fabric", "scvi"):
    logging.getLogger(_name).setLevel(logging.WARNING)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tests marked slow: real data from ../shared/data and notebook runs. `python -m pytest` skips
# them; `python -m pytest --runslow` (what CI runs, `.ci/run`) runs everything.


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run slow real-data tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow real-data test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def overfit_case():
    """An over-fitted scVI on half of a tiny synthetic data set, plus its audit shadows.

    200 cells x 300 genes, members = a random half (100 cells), 300 epochs, 256 hidden units,
    no dropout: the regime where scVI memorises individual cells.
    """
    import scvi_unlearn as su
    from scvi_unlearn._demo import demo_recipe, train_target

    adata = su.data.synthetic_pbmc(n_cells=200, n_genes=300, seed=0)
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(adata.n_obs, adata.n_obs // 2, replace=False))
    held = np.setdiff1d(np.arange(adata.n_obs), train)
    split = su.data.MembershipSplit(train=train, forget=train, nonmember=held, heldout=held)
    recipe = demo_recipe(max_epochs=300)
    model = train_target(adata, split, recipe, seed=0)
    mi = su.MembershipInference(adata, recipe=model, n_shadows=6, seed=0, cache_dir=False)
    mi.fit(progress_bar=False)
    return {"adata": adata, "model": model, "mi": mi, "train": train, "held": held}


@pytest.fixture(scope="session")
def overfit_reference_dir(tmp_path_factory):
    """One method reference pool cache for ``overfit_case`` (oracle matching, auto's gate)."""
    return tmp_path_factory.mktemp("overfit_method_references")


@pytest.fixture(scope="session")
def small_model():
    """A small scVI model (cheap; not over-fitted) on synthetic PBMC data, shared read-only."""
    import scvi_unlearn as su

    adata = su.data.synthetic_pbmc(n_cells=200, n_genes=60, seed=3)
    su.model.SCVI.setup_anndata(adata)
    scvi.settings.seed = 0
    model = su.model.SCVI(adata, n_hidden=32, n_latent=4)
    model.train(max_epochs=20, accelerator="cpu", train_size=1.0, enable_progress_bar=False)
    return model


@pytest.fixture(scope="session")
def saved_lab_model(tmp_path_factory):
    """A plain scvi-tools model trained on 80% of the cells and saved as a lab would.

    Returns the folder (``model/`` and ``data.h5ad`` inside), the AnnData and the model.
    Tests write their own outputs elsewhere (their ``tmp_path``).
    """
    import scvi_unlearn as su

    folder = tmp_path_factory.mktemp("lab")
    adata = su.data.synthetic_pbmc(n_cells=150, n_genes=60, rare_fraction=0.1, seed=2)
    lab = adata.copy()
    scvi.model.SCVI.setup_anndata(lab)
    scvi.settings.seed = 0
    model = scvi.model.SCVI(lab, n_latent=4, n_hidden=32)
    model.train(max_epochs=3, train_size=0.8, accelerator="cpu", enable_progress_bar=False)
    model.save(str(folder / "model"), overwrite=True)
    adata.write_h5ad(folder / "data.h5ad")
    return folder, adata, model
