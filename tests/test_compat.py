"""scvi_unlearn._compat: every wrapper of a private scvi-tools API on a tiny trained scVI.

These run on every scvi-tools release the package is tested with, so that a release that moves
or changes one of the private names fails here, by name, rather than deep inside a feature.
"""

from __future__ import annotations

import logging

import anndata
import numpy as np
import pytest
import scvi
import torch

import scvi_unlearn as su
from scvi_unlearn import _compat as compat
from scvi_unlearn.model import clone_model


@pytest.fixture(scope="module")
def trained():
    """A plain scvi-tools SCVI (scvi-tools' own class), trained one epoch on 60 cells."""
    adata = su.data.synthetic_pbmc(n_cells=60, n_genes=40, seed=0)
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "a", "b")
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    scvi.settings.seed = 0
    model = scvi.model.SCVI(adata, n_hidden=8, n_latent=2)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    return model


def test_the_installed_scvi_tools_is_a_tested_release():
    """A new release must be checked (this suite) before it joins TESTED_SCVI_TOOLS."""
    assert ".".join(scvi.__version__.split(".")[:2]) in compat.TESTED_SCVI_TOOLS


def test_max_epochs_heuristic_is_scvi_tools_default():
    assert compat.max_epochs_heuristic(1_000) == 400  # the cap, below 20,000 cells
    assert compat.max_epochs_heuristic(40_000) == 200  # decays as 20,000 / n_obs
    assert isinstance(compat.max_epochs_heuristic(1_000), int)


def test_compute_kl_weight_follows_epoch_then_step_warmup():
    assert float(compat.compute_kl_weight(5, 0, 10, None)) == pytest.approx(0.5)
    assert float(compat.compute_kl_weight(0, 25, None, 100)) == pytest.approx(0.25)
    assert float(compat.compute_kl_weight(5, 25, 10, 100)) == pytest.approx(0.5)  # epochs win
    assert float(compat.compute_kl_weight(3, 3, None, None)) == 1.0
    assert (
        float(compat.compute_kl_weight(0, 0, 10, None, max_kl_weight=2.0, min_kl_weight=1.0))
        == 1.0
    )
    assert float(compat.compute_kl_weight(20, 0, 10, None)) == 1.0  # after the warm-up


def test_validate_data_split_gives_the_splitters_sizes():
    assert tuple(compat.validate_data_split(100, 0.9)) == (90, 10)
    assert tuple(compat.validate_data_split(100, 0.8, 0.1)) == (80, 10)
    with pytest.raises(ValueError):
        compat.validate_data_split(100, 1.5)


def test_make_data_loader_yields_the_chosen_cells_in_order(trained):
    indices = [5, 0, 3]
    loader = compat.make_data_loader(trained, trained.adata, indices=indices, batch_size=2)
    batches = list(loader)
    assert [b["X"].shape[0] for b in batches] == [2, 1]
    x = torch.cat([b["X"] for b in batches]).numpy()
    dense = trained.adata.X.toarray() if hasattr(trained.adata.X, "toarray") else trained.adata.X
    np.testing.assert_array_equal(x, np.asarray(dense[indices]))


def test_validate_anndata_registers_a_copy_with_the_models_setup(trained):
    copy = trained.adata.copy()
    validated = compat.validate_anndata(trained, copy)
    manager = trained.get_anndata_manager(validated)
    assert manager is not None
    assert manager.registry["setup_args"] == trained.adata_manager.registry["setup_args"]
    batches = list(compat.make_data_loader(trained, validated, indices=[0, 1], batch_size=2))
    assert batches[0]["batch"].flatten().tolist() == [1.0, 0.0]  # "b", "a": the model's codes


def test_named_layers_leave_out_x_and_rebuild_a_backed_anndata(tmp_path):
    """anndata 0.13 lists X among the layers (key None); rebuilding from them must still work."""
    adata = su.data.synthetic_pbmc(n_cells=30, n_genes=40, seed=0)
    adata.layers["counts"] = adata.X.copy()
    assert list(compat.named_layers(adata)) == ["counts"]
    assert list(compat.named_layers(adata[:5])) == ["counts"]  # a view too
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")
    rebuilt = anndata.AnnData(X=backed.X, obs=backed.obs, layers=compat.named_layers(backed))
    assert compat.named_layers(rebuilt).keys() == {"counts"}
    backed.file.close()


def test_instance_managers_and_register_manager_let_a_copy_find_its_data(trained):
    managers = compat.instance_managers(trained)
    assert trained.adata_manager in managers
    copy = clone_model(trained, su.model.SCVI)  # another class: its own per-class stores
    assert compat.instance_managers(copy) == managers
    latent = copy.get_latent_representation()  # finds the AnnData through the stores
    assert latent.shape == (trained.adata.n_obs, 2)

    other = clone_model(trained)
    type(other)._per_instance_manager_store.pop(other.id, None)  # forget the registration
    assert compat.instance_managers(other) == []
    compat.register_manager(other, trained.adata_manager)
    assert compat.instance_managers(other) == [trained.adata_manager]


def test_inference_and_generative_inputs_drive_the_module(trained):
    module = trained.module.eval()
    batch = next(iter(compat.make_data_loader(trained, trained.adata, batch_size=8)))
    inputs = compat.inference_inputs(module, batch)
    assert "x" in inputs and "batch_index" in inputs
    with torch.no_grad():
        inference = module.inference(**inputs)
        generative = module.generative(**compat.generative_inputs(module, batch, inference))
    assert generative["px"].mean.shape == batch["X"].shape


def test_base_model_logger_is_scvi_tools_own():
    from scvi.model.base import _base_model

    assert _base_model.logger.name == compat.SCVI_BASE_MODEL_LOGGER
    assert compat.SCVI_BASE_MODEL_LOGGER in logging.root.manager.loggerDict


def test_a_missing_private_name_is_an_import_error_naming_the_tested_releases():
    with pytest.raises(ImportError, match=r"no scvi\.model\._utils\.gone.*tested with"):
        compat._private("scvi.model._utils", "gone")
