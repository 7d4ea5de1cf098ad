"""A consent withdrawal leaves nothing of the withdrawn cells in what the package writes."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pytest
import scvi

import scvi_unlearn as su
from scvi_unlearn.model._unlearn import cells_fingerprint

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture(scope="module")
def lab():
    """A plain scVI on 400 synthetic cells (default 90/10 split), as a lab would have it."""
    adata = su.data.synthetic_pbmc(n_cells=400, n_genes=50, seed=0)
    adata.obsp["connectivities"] = np.eye(adata.n_obs, dtype=np.float32)
    adata.uns["note"] = {"computed_on": adata.obs_names[:30].tolist()}
    scvi.model.SCVI.setup_anndata(adata)
    scvi.settings.seed = 0
    plain = scvi.model.SCVI(adata, n_hidden=16, n_latent=3)
    plain.train(max_epochs=4, accelerator="cpu", enable_progress_bar=False)
    model = su.model.SCVI.from_scvi(plain)
    forget = np.sort(np.asarray(model.train_indices))[:20]
    return {"adata": adata, "model": model, "forget": forget}


def _files_naming(folder: Path, names) -> dict[str, list[str]]:
    """Every file under ``folder`` whose bytes contain one of ``names``."""
    hits: dict[str, list[str]] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found = [n for n in names if n.encode() in data]
            if found:
                hits[str(path.relative_to(folder))] = found
    return hits


def _count_rows(adata) -> np.ndarray:
    x = adata.X
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def test_the_unlearned_model_carries_no_forgotten_cell(lab, tmp_path):
    adata, model, forget = lab["adata"], lab["model"], lab["forget"]
    names = adata.obs_names[forget].tolist()
    forgotten_counts = _count_rows(adata[forget])
    n_before = adata.n_obs
    out = model.unlearn(forget, method="retrain_fast", accelerator="cpu",
                        enable_progress_bar=False)  # fmt: skip
    # the user's AnnData and model are untouched
    assert adata.n_obs == n_before and model.adata is adata
    assert len(model.train_indices) == len(out.train_indices) + forget.size
    # the model's AnnData is a new object without them, in every slot
    new = out.adata
    assert new is not adata and new.n_obs == n_before - forget.size
    assert not set(names) & set(new.obs_names)
    assert "connectivities" not in new.obsp and "note" not in new.uns
    assert out.get_latent_representation().shape[0] == new.n_obs
    assert set(new.obs_names[out.train_indices]) == set(out.train_obs_names_)
    assert not set(names) & set(out.train_obs_names_)
    # the provenance: count and fingerprint, no names
    provenance = out.provenance
    assert provenance["events"][-1]["forgotten"] == cells_fingerprint(names)
    assert "forgotten_obs_names" not in provenance and provenance["n_forgotten"] == 20
    # nothing written names them or holds their counts
    out.save(str(tmp_path / "model"), save_anndata=True)
    assert _files_naming(tmp_path / "model", names) == {}
    kept = out.train_obs_names_[:3]  # the scan finds names where they are
    assert set(_files_naming(tmp_path / "model", kept)) >= {"adata.h5ad", "model.pt"}
    saved = su.model.SCVI.load(str(tmp_path / "model"))
    rows = _count_rows(saved.adata)
    for row in forgotten_counts:
        assert not (rows == row).all(1).any()
    # a minified copy of it names none either
    qzm, qzv = saved.get_latent_representation(return_dist=True)
    saved.adata.obsm["X_latent_qzm"], saved.adata.obsm["X_latent_qzv"] = qzm, qzv
    saved.minify_adata()
    saved.save(str(tmp_path / "minified"), save_anndata=True)
    assert _files_naming(tmp_path / "minified", names) == {}


def test_methods_that_record_development_cells_name_no_forgotten_cell(lab, tmp_path):
    adata, model, _forget = lab["adata"], lab["model"], lab["forget"]
    held = np.setdiff1d(np.arange(adata.n_obs), model.train_indices)
    big_forget = np.sort(np.asarray(model.train_indices))[:60]
    names = adata.obs_names[big_forget].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.unlearn(
            big_forget, method="extragradient", nonmembers=held, max_epochs=2, val_fraction=0.5,
            accelerator="cpu", enable_progress_bar=False, damage_limit=None, audit=True,
            audit_kwargs={"n_shadows": 2, "cache_dir": False, "n_bootstrap": 10},
        )  # fmt: skip
    out.save(str(tmp_path / "m"), save_anndata=True)
    assert _files_naming(tmp_path / "m", names) == {}
    metrics = out.provenance["events"][-1]["metrics"]
    assert set(metrics["forget_val_names"]) == {"n", "sha256"}
    assert out.provenance["events"][-1]["audit"]["n_members"] > 0


def test_record_names_keeps_the_withdrawal_list(lab):
    adata, model, forget = lab["adata"], lab["model"], lab["forget"]
    out = model.unlearn(forget[:5], method="retrain_fast", record_names=True, accelerator="cpu",
                        enable_progress_bar=False)  # fmt: skip
    assert out.provenance["forgotten_obs_names"] == adata.obs_names[forget[:5]].tolist()
    again = out.unlearn(adata.obs_names[forget[5:8]], method="retrain_fast", record_names=True,
                        accelerator="cpu", enable_progress_bar=False)  # fmt: skip
    assert again.provenance["forgotten_obs_names"] == adata.obs_names[forget[:8]].tolist()
    assert again.provenance["n_forgotten"] == 8
    with pytest.raises(TypeError, match="record_names"):
        model.unlearn(forget, method="retrain_fast", record_names="yes")
