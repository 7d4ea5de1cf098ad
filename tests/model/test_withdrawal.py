"""A consent withdrawal leaves nothing of the withdrawn cells in what the package writes."""

from __future__ import annotations

import os
import shutil
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pytest
import scvi
import torch

import scvi_unlearn as su
from scvi_unlearn import cli
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


# -- a proof anyone can re-run -------------------------------------------------------------
@pytest.fixture(scope="module")
def exact_result(lab, tmp_path_factory):
    """The lab model unlearned by the default (exact) method, saved with its AnnData."""
    out = lab["model"].unlearn(lab["forget"], accelerator="cpu", enable_progress_bar=False)
    folder = tmp_path_factory.mktemp("exact") / "model"
    out.save(str(folder), save_anndata=True)
    return out, folder


def test_the_default_is_exact_and_verifies_bit_for_bit(lab, exact_result):
    adata, forget = lab["adata"], lab["forget"]
    out, folder = exact_result
    event = out.provenance["events"][-1]
    assert event["method"] == "retrain_fast" and event["reproduce"]["seed"] == 0
    withdrawn = adata.obs_names[forget].tolist()
    # the lab's data with rows in another order: matched by name, re-run, same weights
    shuffled = adata[np.random.default_rng(3).permutation(adata.n_obs)].copy()
    result = su.model.verify_unlearning(str(folder), shuffled, forgotten=withdrawn)
    assert result.verified and result.weights_match and result.model_matches_record
    assert result.forgotten_in_training == 0 and not result.problems
    # the data without the forgotten cells is enough
    result = su.model.verify_unlearning(
        str(folder), adata[~adata.obs_names.isin(withdrawn)].copy()
    )
    assert result.verified


def test_verify_names_the_input_that_differs(lab, exact_result, tmp_path):
    adata = lab["adata"]
    out, folder = exact_result
    # counts changed in one retained cell
    changed = adata.copy()
    cell = changed.obs_names.get_loc(out.train_obs_names_[0])
    counts = changed.X.toarray() if hasattr(changed.X, "toarray") else changed.X.copy()
    counts[cell, 0] += 5
    changed.X = counts
    result = su.model.verify_unlearning(str(folder), changed)
    assert not result.verified and result.inputs["counts"] is False
    assert any("counts" in p for p in result.problems) and result.weights_match is None
    # retained cells missing from the data
    missing = adata[~adata.obs_names.isin(out.train_obs_names_[:4])].copy()
    result = su.model.verify_unlearning(str(folder), missing)
    assert not result.verified and any("4 of the" in p for p in result.problems)
    # a withdrawal list that is not the recorded one
    result = su.model.verify_unlearning(str(folder), adata, forgotten=out.train_obs_names_[:3])
    assert not result.verified and result.forgotten_in_training == 3
    # weights changed after unlearning (a tampered, still loadable model.pt)
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    loaded = su.model.SCVI.load(str(tampered))
    with torch.no_grad():
        next(loaded.module.parameters()).add_(1e-3)
    loaded.save(str(tampered), overwrite=True, save_anndata=True)
    result = su.model.verify_unlearning(str(tampered), adata)
    assert not result.model_matches_record and not result.verified
    # other genes: refused before anything runs
    other = adata.copy()
    other.var_names = [f"g{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="genes do not match"):
        su.model.verify_unlearning(str(folder), other)


def test_verify_refuses_what_it_cannot_re_run(lab, tmp_path):
    model, forget = lab["model"], lab["forget"]
    approximate = model.unlearn(forget, method="finetune", max_epochs=1, accelerator="cpu",
                                enable_progress_bar=False)  # fmt: skip
    with pytest.raises(ValueError, match="not exact"):
        su.model.verify_unlearning(approximate)
    with pytest.raises(ValueError, match="not unlearned"):
        su.model.verify_unlearning(model)
    with pytest.raises(ValueError, match="list of obs names"):
        exact = model.unlearn(forget[:3], accelerator="cpu", enable_progress_bar=False)
        su.model.verify_unlearning(exact, forgotten=np.arange(3))
    # the CLI: one line, exit 2, nothing written
    approximate.save(str(tmp_path / "approx"), save_anndata=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = cli.main(["verify", str(tmp_path / "approx"), str(tmp_path / "approx" / "adata.h5ad")])
    assert code == 2 and sorted(p.name for p in tmp_path.rglob("*")) == before


def test_the_unlearning_certificate_names_no_cell_and_renders(lab, exact_result, tmp_path):
    from test_certificate import CHROMIUM, render

    adata, forget = lab["adata"], lab["forget"]
    out, folder = exact_result
    result = su.model.verify_unlearning(str(folder), adata)
    path = su.model.write_unlearning_certificate(out, tmp_path / "c.html", verification=result)
    text = path.read_text()
    assert "bit-identical" in text and out.provenance["events"][-1]["forgotten"]["sha256"] in text
    assert not [n for n in adata.obs_names[forget] if n in text]
    assert "<script>alert" not in text
    if CHROMIUM is not None or os.environ.get("CI"):
        dom = render(path)
        assert "Unlearning certificate" in dom and "re-run from the record" in dom
