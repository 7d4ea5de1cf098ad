"""Tests of scvi_unlearn.data: synthetic data, loaders, forget sets and membership splits."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import io as spio
from scipy import sparse

from scvi_unlearn.data import (
    MembershipSplit,
    _loaders,
    donor_forget_set,
    kang2018,
    membership_split,
    parse_forget_spec,
    pbmc3k,
    scattered_forget_set,
    structured_forget_set,
    synthetic_pbmc,
    validation_split,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        if os.environ.get("CI"):  # CI has ../shared: a missing file is a failure, not a skip
            pytest.fail(f"real data file not found: {path}")
        pytest.skip(f"real data file not found: {path}")
    return path


@pytest.fixture(scope="module")
def small() -> anndata.AnnData:
    return synthetic_pbmc(n_cells=400, n_genes=60, n_donors=3, rare_fraction=0.05, seed=3)


# ---------------------------------------------------------------------------- synthetic
def test_synthetic_same_seed_identical_different_seed_differs():
    a = synthetic_pbmc(n_cells=300, n_genes=80, seed=7)
    b = synthetic_pbmc(n_cells=300, n_genes=80, seed=7)
    c = synthetic_pbmc(n_cells=300, n_genes=80, seed=8)
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert list(a.var_names) == list(b.var_names)
    assert a.X.shape == c.X.shape
    assert (a.X != c.X).nnz > 0
    assert not np.array_equal(a.obs["cell_type"].to_numpy(), c.obs["cell_type"].to_numpy())


def test_synthetic_raw_integer_csr_counts(tmp_path):
    adata = synthetic_pbmc()
    assert adata.shape == (2000, 400)
    assert sparse.isspmatrix_csr(adata.X) or isinstance(adata.X, sparse.csr_array)
    assert adata.X.dtype == np.int32
    assert adata.X.data.min() > 0  # explicit entries are positive counts
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    detected = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    assert totals.min() > 0, "every cell must have counts"
    assert detected.min() > 0, "every gene must be detected"
    assert 1500 <= np.median(totals) <= 3000
    assert adata.obs_names[0] == "cell_0000" and adata.obs_names.is_unique
    assert adata.var_names.is_unique
    for gene in ("CD3D", "CD3E", "MS4A1", "CD79A", "CD14", "LYZ", "NKG7", "GNLY", "PPBP", "PF4"):
        assert gene in adata.var_names
    assert "gene_0399" in adata.var_names
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert isinstance(adata.obs["donor"].dtype, pd.CategoricalDtype)
    params = adata.uns["synthetic"]
    assert params["seed"] == 0 and params["n_cells"] == 2000
    # h5ad-writable (uns holds only plain types) and unchanged by the round trip
    adata.write_h5ad(tmp_path / "syn.h5ad")
    back = anndata.read_h5ad(tmp_path / "syn.h5ad")
    assert (back.X != adata.X).nnz == 0


@pytest.mark.parametrize("rare_fraction", [0.01, 0.03, 0.1])
def test_synthetic_rare_type_fraction_and_donors(rare_fraction):
    adata = synthetic_pbmc(n_cells=1000, n_genes=60, n_donors=5, rare_fraction=rare_fraction)
    n_rare = int((adata.obs["cell_type"] == "Megakaryocyte").sum())
    assert abs(n_rare - rare_fraction * 1000) <= 1
    counts = adata.obs["cell_type"].value_counts()
    assert len(counts) == 6 and counts.min() > 0
    assert sorted(adata.obs["donor"].unique()) == [f"donor_{i}" for i in range(5)]
    assert adata.obs["donor"].value_counts().min() > 50


def test_synthetic_without_rare_type():
    adata = synthetic_pbmc(n_cells=200, n_genes=60, rare_fraction=0.0)
    assert "Megakaryocyte" not in adata.obs["cell_type"].cat.categories
    assert adata.n_obs == 200


def test_synthetic_markers_enriched_in_their_types():
    adata = synthetic_pbmc(n_cells=1500, seed=2)
    x = adata.X.toarray().astype(float)
    norm = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    genes = list(adata.var_names)
    types = adata.obs["cell_type"].to_numpy()
    for cell_type, marker in [
        ("CD4 T", "IL7R"),
        ("CD14 Mono", "CD14"),
        ("CD14 Mono", "LYZ"),
        ("B", "MS4A1"),
        ("B", "CD79A"),
        ("CD8 T", "CD8A"),
        ("NK", "GNLY"),
        ("Megakaryocyte", "PPBP"),
        ("Megakaryocyte", "PF4"),
    ]:
        col = norm[:, genes.index(marker)]
        inside, outside = col[types == cell_type].mean(), col[types != cell_type].mean()
        assert inside > 3 * outside and inside - outside > 1.0, (cell_type, marker)
    # T-cell markers are shared by both T types, absent elsewhere
    cd3d = norm[:, genes.index("CD3D")]
    is_t = np.isin(types, ["CD4 T", "CD8 T"])
    assert cd3d[is_t].mean() > 3 * cd3d[~is_t].mean()


def test_synthetic_cells_are_individually_distinct():
    adata = synthetic_pbmc(n_cells=600, n_genes=100, seed=4)
    rows = {tuple(r) for r in adata.X.toarray()}
    assert len(rows) == adata.n_obs
    # within-type variation beyond Poisson noise: a gene's variance exceeds its mean
    x = adata.X.toarray()[adata.obs["cell_type"].to_numpy() == "CD4 T"]
    mean, var = x.mean(axis=0), x.var(axis=0)
    expressed = mean > 5
    assert np.median(var[expressed] / mean[expressed]) > 2


@pytest.mark.parametrize(
    "kwargs",
    [{"n_cells": 5}, {"n_genes": 10}, {"n_donors": 0}, {"rare_fraction": 0.7}, {"n_cells": 10.5}],
)
def test_synthetic_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        synthetic_pbmc(**kwargs)


# ---------------------------------------------------------------------------- loaders (real)
@pytest.mark.slow
def test_pbmc3k_reads_shared_file():
    adata = pbmc3k(path=shared_file("pbmc3k.h5ad"))
    assert adata.n_obs == 2638
    assert int((adata.obs["cell_type"] == "Platelet").sum()) == 14
    assert adata.obs["cell_type"].notna().all()
    assert sparse.issparse(adata.X) and adata.X.format == "csr"
    assert np.all(adata.X.data == np.round(adata.X.data)) and adata.X.data.min() >= 0
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    everything = pbmc3k(path=shared_file("pbmc3k.h5ad"), qc_only=False)
    assert everything.n_obs == 2700
    assert int(everything.obs["cell_type"].isna().sum()) == 62


@pytest.mark.slow
def test_kang2018_reads_shared_file():
    adata = kang2018(path=shared_file("kang2018_pbmc12k.h5ad"))
    assert adata.n_obs == 12261
    assert int((adata.obs["cell_type"] == "Megakaryocytes").sum()) == 95
    assert adata.obs["sample_id"].nunique() == 8
    assert all(isinstance(c, str) for c in adata.obs["sample_id"].cat.categories)
    assert sparse.issparse(adata.X) and adata.X.format == "csr"
    # a donor forget set works on the harmonised string ids
    assert donor_forget_set(adata, "1016", donor_key="sample_id").size == 1723


# ---------------------------------------------------------------------------- loaders (fake)
def _tiny_counts(n_cells: int, n_genes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(2.0, size=(n_cells, n_genes)).astype(np.int32)


def _fake_10x_archive(dest: Path, counts: np.ndarray, barcodes: list[str]) -> None:
    """A tar.gz laid out like 10x's pbmc3k_filtered_gene_bc_matrices (v1: genes.tsv)."""
    n_genes = counts.shape[1]
    files = {
        "genes.tsv": "".join(f"ENSG{i:05d}\tGENE{i}\n" for i in range(n_genes)),
        "barcodes.tsv": "".join(f"{b}-1\n" for b in barcodes),
    }
    mtx = io.BytesIO()
    spio.mmwrite(mtx, sparse.coo_matrix(counts.T))
    with tarfile.open(dest, "w:gz") as tar:
        for name, payload in [
            *((k, v.encode()) for k, v in files.items()),
            ("matrix.mtx", mtx.getvalue()),
        ]:
            info = tarfile.TarInfo(f"filtered_gene_bc_matrices/hg19/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _forbid_download(url, dest):
    raise AssertionError(f"unexpected download of {url}")


def test_pbmc3k_downloads_once_then_uses_cache(tmp_path, monkeypatch):
    barcodes = [f"CELL{i:02d}" for i in range(6)]
    counts = _tiny_counts(6, 5)
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        dest = Path(dest)
        if url == _loaders.PBMC3K_COUNTS_URL:
            _fake_10x_archive(dest, counts, barcodes)
        elif url == _loaders.PBMC3K_LABELS_URL:
            # scanpy's processed pbmc3k: QC-passed cells only, Louvain labels
            processed = anndata.AnnData(np.zeros((4, 1), dtype=np.float32))
            processed.obs_names = [f"{b}-1" for b in barcodes[:4]]
            processed.obs["louvain"] = pd.Categorical(
                ["CD4 T cells", "B cells", "Megakaryocytes", "CD4 T cells"]
            )
            processed.write_h5ad(dest)
        else:
            raise AssertionError(url)
        return dest

    monkeypatch.setattr(_loaders, "_download", fake_download)
    cache = tmp_path / "cache"
    adata = pbmc3k(cache_dir=cache)
    assert calls == [_loaders.PBMC3K_COUNTS_URL, _loaders.PBMC3K_LABELS_URL]
    assert (cache / "pbmc3k.h5ad").is_file()
    assert not [p for p in cache.iterdir() if p.name != "pbmc3k.h5ad"], "temp files left"
    assert list(adata.obs_names) == barcodes[:4]
    assert adata.obs["cell_type"].tolist() == ["CD4 T", "B", "Platelet", "CD4 T"]
    np.testing.assert_array_equal(adata.X.toarray(), counts[:4])
    assert list(adata.var_names[:2]) == ["GENE0", "GENE1"]

    monkeypatch.setattr(_loaders, "_download", _forbid_download)
    again = pbmc3k(cache_dir=cache, qc_only=False)
    assert again.n_obs == 6 and int(again.obs["passed_seurat_qc"].sum()) == 4
    np.testing.assert_array_equal(again.X.toarray(), counts)


def test_kang2018_downloads_once_then_uses_cache(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        assert url == _loaders.KANG2018_URL
        raw = anndata.AnnData(sparse.csr_matrix(_tiny_counts(5, 4).astype(np.float32)))
        raw.obs_names = [f"BC{i}-1" for i in range(5)]
        raw.obs["label"] = ["ctrl", "stim", "ctrl", "stim", "ctrl"]
        raw.obs["replicate"] = [f"patient_{d}" for d in (101, 101, 1015, 107, 107)]
        raw.obs["cell_type"] = ["CD4 T cells", "Megakaryocytes", "B cells", "NK cells", "B cells"]
        raw.obsm["X_umap"] = np.zeros((5, 2))
        raw.write_h5ad(dest)
        return Path(dest)

    monkeypatch.setattr(_loaders, "_download", fake_download)
    adata = kang2018(cache_dir=tmp_path)
    assert calls == [_loaders.KANG2018_URL]
    assert (tmp_path / "kang2018.h5ad").is_file()
    assert adata.obs["sample_id"].tolist() == ["101", "101", "1015", "107", "107"]
    assert adata.obs["condition"].tolist() == ["ctrl", "stim", "ctrl", "stim", "ctrl"]
    assert adata.X.dtype == np.float32 and adata.X.format == "csr"

    monkeypatch.setattr(_loaders, "_download", _forbid_download)
    again = kang2018(cache_dir=tmp_path)
    assert (again.X != adata.X).nnz == 0
    assert again.obs["sample_id"].tolist() == adata.obs["sample_id"].tolist()


def test_cache_dir_defaults_to_environment_variable(tmp_path, monkeypatch):
    tiny = anndata.AnnData(sparse.csr_matrix(_tiny_counts(3, 2)))
    tiny.obs["cell_type"] = ["B cells", "NK cells", "B cells"]
    tiny.obs["sample_id"] = [1, 2, 1]
    tiny.write_h5ad(tmp_path / "kang2018_pbmc12k.h5ad")
    monkeypatch.setenv(_loaders.ENV_DATA_DIR, str(tmp_path))
    monkeypatch.setattr(_loaders, "_download", _forbid_download)
    adata = kang2018()
    assert adata.obs["sample_id"].tolist() == ["1", "2", "1"]


def test_download_failure_is_explained(tmp_path):
    with pytest.raises(ConnectionError, match="path="):
        _loaders._download((tmp_path / "nothing.h5ad").as_uri(), tmp_path / "out.h5ad")
    assert not list(tmp_path.iterdir())


def test_loaders_reject_non_count_data(tmp_path):
    bad = anndata.AnnData(np.full((3, 2), 0.5, dtype=np.float32))
    bad.obs["cell_type"] = ["a", "b", "c"]
    bad.obs["passed_seurat_qc"] = True
    bad.obs["sample_id"] = "s1"
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match="raw UMI counts"):
        pbmc3k(path=tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match="non-integer"):
        kang2018(path=tmp_path / "bad.h5ad")
    logged = anndata.AnnData(np.array([[1.0, -0.5], [0.0, 2.0]], dtype=np.float32))
    logged.obs["cell_type"] = ["a", "b"]
    logged.write_h5ad(tmp_path / "neg.h5ad")
    with pytest.raises(ValueError, match="negative"):
        pbmc3k(path=tmp_path / "neg.h5ad", qc_only=False)


def test_loaders_name_a_missing_column(tmp_path):
    tiny = anndata.AnnData(_tiny_counts(3, 2))
    tiny.obs["cell_type"] = ["a", "b", "c"]
    tiny.write_h5ad(tmp_path / "tiny.h5ad")
    with pytest.raises(KeyError, match="passed_seurat_qc"):
        pbmc3k(path=tmp_path / "tiny.h5ad")
    assert pbmc3k(path=tmp_path / "tiny.h5ad", qc_only=False).n_obs == 3
    with pytest.raises(KeyError, match="sample_id"):
        kang2018(path=tmp_path / "tiny.h5ad")
    no_type = anndata.AnnData(_tiny_counts(3, 2))
    no_type.obs["passed_seurat_qc"] = True
    no_type.write_h5ad(tmp_path / "no_type.h5ad")
    with pytest.raises(KeyError, match="cell_type"):
        pbmc3k(path=tmp_path / "no_type.h5ad")
    with pytest.raises(FileNotFoundError, match=r"missing\.h5ad"):
        pbmc3k(path=tmp_path / "missing.h5ad")


@pytest.mark.filterwarnings("ignore:.* names are not unique")
def test_loaders_make_names_unique_and_return_fresh_objects(tmp_path):
    tiny = anndata.AnnData(_tiny_counts(3, 2))
    tiny.obs_names = ["a", "a", "b"]
    tiny.var_names = ["G", "G"]
    tiny.obs["cell_type"] = ["x", "y", "x"]
    tiny.obs["passed_seurat_qc"] = [True, True, False]
    tiny.write_h5ad(tmp_path / "dup.h5ad")
    adata = pbmc3k(path=tmp_path / "dup.h5ad")
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert adata.n_obs == 2 and not adata.is_view
    adata.X[0, 0] = 999  # modifying the result does not touch a second read
    assert pbmc3k(path=tmp_path / "dup.h5ad").X[0, 0] != 999


# ---------------------------------------------------------------------------- forget sets
def test_structured_forget_set(small):
    idx = structured_forget_set(small, "cell_type", "Megakaryocyte")
    expected = np.flatnonzero(small.obs["cell_type"] == "Megakaryocyte")
    np.testing.assert_array_equal(idx, expected)
    assert idx.dtype == np.int64
    within = np.arange(0, small.n_obs, 2)
    sub = structured_forget_set(small, "cell_type", "Megakaryocyte", within=within)
    np.testing.assert_array_equal(sub, np.intersect1d(expected, within))
    names = small.obs_names[within]
    np.testing.assert_array_equal(
        structured_forget_set(small, "cell_type", "Megakaryocyte", within=names), sub
    )


def test_structured_forget_set_errors(small):
    with pytest.raises(KeyError, match=r"celltype.*cell_type"):
        structured_forget_set(small, "celltype", "B")
    with pytest.raises(ValueError, match=r"Available values.*'Megakaryocyte'"):
        structured_forget_set(small, "cell_type", "Platelet")
    outside = np.flatnonzero(small.obs["cell_type"] != "B")
    with pytest.raises(ValueError, match="empty"):
        structured_forget_set(small, "cell_type", "B", within=outside)


def test_structured_forget_set_matches_integer_column_by_string():
    a = anndata.AnnData(np.ones((4, 1), dtype=np.float32))
    a.obs["sample_id"] = np.array([1016, 101, 1016, 7], dtype=np.int32)
    assert structured_forget_set(a, "sample_id", "1016").tolist() == [0, 2]
    assert structured_forget_set(a, "sample_id", 101).tolist() == [1]


def test_scattered_forget_set(small):
    idx = scattered_forget_set(small, 35, seed=1)
    assert idx.dtype == np.int64 and idx.size == 35
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, scattered_forget_set(small, 35, seed=1))
    assert not np.array_equal(idx, scattered_forget_set(small, 35, seed=2))
    within = np.arange(100)
    exclude = np.arange(50)
    sub = scattered_forget_set(small, 20, seed=0, within=within, exclude=exclude)
    assert np.all((sub >= 50) & (sub < 100))
    with pytest.raises(ValueError, match="only 50 are available"):
        scattered_forget_set(small, 51, within=within, exclude=exclude)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            scattered_forget_set(small, bad)


def test_donor_forget_set(small):
    idx = donor_forget_set(small, "donor_1")
    np.testing.assert_array_equal(idx, np.flatnonzero(small.obs["donor"] == "donor_1"))
    with pytest.raises(ValueError, match="donor_0"):
        donor_forget_set(small, "donor_9")
    renamed = small.copy()
    renamed.obs = renamed.obs.rename(columns={"donor": "sample_id"})
    with pytest.raises(KeyError, match="donor_key='sample_id'"):
        donor_forget_set(renamed, "donor_1")
    np.testing.assert_array_equal(donor_forget_set(renamed, "donor_1", donor_key="sample_id"), idx)


def test_parse_forget_spec_forms(small, tmp_path):
    np.testing.assert_array_equal(
        parse_forget_spec(small, "cell_type=Megakaryocyte"),
        structured_forget_set(small, "cell_type", "Megakaryocyte"),
    )
    np.testing.assert_array_equal(
        parse_forget_spec(small, " cell_type = CD4 T "),
        structured_forget_set(small, "cell_type", "CD4 T"),
    )
    np.testing.assert_array_equal(
        parse_forget_spec(small, "random:35"), scattered_forget_set(small, 35, seed=0)
    )
    np.testing.assert_array_equal(
        parse_forget_spec(small, "random:35:seed=1"), scattered_forget_set(small, 35, seed=1)
    )
    np.testing.assert_array_equal(
        parse_forget_spec(small, "donor:donor_2"), donor_forget_set(small, "donor_2")
    )
    renamed = small.copy()
    renamed.obs["sample_id"] = renamed.obs["donor"]
    np.testing.assert_array_equal(
        parse_forget_spec(renamed, "sample_id=donor_2"), donor_forget_set(small, "donor_2")
    )
    np.testing.assert_array_equal(
        parse_forget_spec(renamed, "donor:donor_2", donor_key="sample_id"),
        donor_forget_set(small, "donor_2"),
    )
    train = np.arange(200)
    within = parse_forget_spec(small, "random:10:seed=3", within=train)
    assert within.size == 10 and within.max() < 200

    names_file = tmp_path / "cells.txt"
    names_file.write_text("# forget these\ncell_0007\n\ncell_0003\n")
    assert parse_forget_spec(small, str(names_file)).tolist() == [3, 7]
    pos_file = tmp_path / "positions.txt"
    pos_file.write_text("12\n5\n")
    assert parse_forget_spec(small, str(pos_file)).tolist() == [5, 12]
    with pytest.raises(ValueError, match="not in `within`"):
        parse_forget_spec(small, str(pos_file), within=np.arange(10))


def test_parse_forget_spec_errors(small, tmp_path):
    with pytest.raises(KeyError, match="celltype"):
        parse_forget_spec(small, "celltype=B")
    with pytest.raises(ValueError, match="Available values"):
        parse_forget_spec(small, "cell_type=Platelet")
    with pytest.raises(ValueError, match="random:N"):
        parse_forget_spec(small, "random:many")
    with pytest.raises(ValueError, match="donor id"):
        parse_forget_spec(small, "donor:")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_forget_spec(small, str(tmp_path / "nope" / "cells.txt"))
    with pytest.raises(ValueError, match="Cannot parse"):
        parse_forget_spec(small, "megakaryocytes")
    with pytest.raises(ValueError, match="Empty"):
        parse_forget_spec(small, "  ")
    bad = tmp_path / "bad.txt"
    bad.write_text("cell_0001\nnot_a_cell\n")
    with pytest.raises(KeyError, match="not_a_cell"):
        parse_forget_spec(small, str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no cells"):
        parse_forget_spec(small, str(empty))
    out_of_range = tmp_path / "range.txt"
    out_of_range.write_text("100000\n")
    with pytest.raises(IndexError, match="out of range"):
        parse_forget_spec(small, str(out_of_range))


# ---------------------------------------------------------------------------- splits
def _check_split(split: MembershipSplit, population: np.ndarray, n_obs: int) -> None:
    for arr in (split.train, split.forget, split.nonmember, split.heldout, split.retain):
        assert arr.dtype == np.int64
        assert np.all(np.diff(arr) > 0)
    assert np.intersect1d(split.train, split.heldout).size == 0
    np.testing.assert_array_equal(np.union1d(split.train, split.heldout), np.arange(n_obs))
    np.testing.assert_array_equal(np.union1d(split.forget, split.nonmember), population)
    assert np.intersect1d(split.forget, split.nonmember).size == 0
    assert np.isin(split.forget, split.train).all()
    assert np.isin(split.nonmember, split.heldout).all()
    np.testing.assert_array_equal(np.union1d(split.retain, split.forget), split.train)
    assert np.intersect1d(split.retain, split.forget).size == 0
    assert split.n_obs == n_obs


def test_membership_split_structure_and_fractions(small):
    pop = np.flatnonzero(small.obs["cell_type"] == "Megakaryocyte")
    split = membership_split(small, ("cell_type", "Megakaryocyte"), seed=0)
    _check_split(split, pop, small.n_obs)
    assert split.nonmember.size == int(np.floor(0.5 * pop.size + 0.5))
    others = small.n_obs - pop.size
    assert split.heldout.size - split.nonmember.size == int(np.floor(0.15 * others + 0.5))

    split30 = membership_split(
        small, "cell_type=Megakaryocyte", holdout_fraction=0.3, background_holdout=0.2, seed=5
    )
    _check_split(split30, pop, small.n_obs)
    assert split30.nonmember.size == round(0.3 * pop.size)


def test_membership_split_population_forms_agree(small):
    mask = (small.obs["cell_type"] == "B").to_numpy()
    reference = membership_split(small, ("cell_type", "B"), seed=2)
    assert membership_split(small, "cell_type=B", seed=2) == reference
    assert membership_split(small, mask, seed=2) == reference
    assert membership_split(small, np.flatnonzero(mask), seed=2) == reference
    assert membership_split(small, small.obs_names[mask].tolist(), seed=2) == reference
    two = tuple(small.obs_names[:2])  # a pair of obs names is not a (key, value) pair
    with pytest.raises(ValueError, match="2 cells"):
        membership_split(small, two)


def test_membership_split_reproducible(small):
    a = membership_split(small, ("cell_type", "NK"), seed=11)
    b = membership_split(small, ("cell_type", "NK"), seed=11)
    c = membership_split(small, ("cell_type", "NK"), seed=12)
    assert a == b
    assert a != c
    assert not np.array_equal(a.nonmember, c.nonmember)


def test_membership_split_errors(small):
    with pytest.raises(ValueError, match="empty"):
        membership_split(small, np.zeros(small.n_obs, dtype=bool))
    with pytest.raises(ValueError, match="Available values"):
        membership_split(small, ("cell_type", "Platelet"))
    with pytest.raises(ValueError, match="key=value"):
        membership_split(small, "Megakaryocyte")
    with pytest.raises(ValueError, match=r"has 3 cells.*at least 4"):
        membership_split(small, [0, 1, 2])
    with pytest.raises(ValueError, match=r"has 10 cells.*between 0\.15 and 0\.85"):
        membership_split(small, np.arange(10), holdout_fraction=0.1)
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="holdout_fraction"):
            membership_split(small, ("cell_type", "B"), holdout_fraction=bad)
        with pytest.raises(ValueError, match="background_holdout"):
            membership_split(small, ("cell_type", "B"), background_holdout=bad)


def test_membership_split_json_round_trip(small, tmp_path):
    split = membership_split(small, ("cell_type", "Megakaryocyte"), seed=4)
    d = split.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert MembershipSplit.from_dict(d) == split
    path = split.save(tmp_path / "splits" / "split.json")
    loaded = MembershipSplit.load(path)
    assert loaded == split
    assert loaded.meta["population"] == "cell_type=Megakaryocyte"
    assert loaded.meta["seed"] == 4
    text = repr(loaded)
    assert f"forget={split.forget.size}" in text and f"nonmember={split.nonmember.size}" in text
    loaded.check(small)
    with pytest.raises(ValueError, match="different data"):
        loaded.check(small[:10])
    with pytest.raises(KeyError, match="nonmember"):
        MembershipSplit.from_dict({"train": [0], "forget": [], "heldout": [1]})


def test_membership_split_is_immutable_and_validated():
    split = MembershipSplit(train=[0, 1], forget=[1], nonmember=[2], heldout=[2, 3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        split.train = np.arange(3)
    with pytest.raises(ValueError):
        split.train[0] = 5
    with pytest.raises(ValueError, match="overlap"):
        MembershipSplit(train=[0, 1], forget=[1], nonmember=[2], heldout=[1, 2])
    with pytest.raises(ValueError, match="forget"):
        MembershipSplit(train=[0, 1], forget=[3], nonmember=[2], heldout=[2, 3])
    with pytest.raises(ValueError, match="nonmember"):
        MembershipSplit(train=[0, 1], forget=[1], nonmember=[4], heldout=[2, 3])


def test_validation_split():
    idx = np.arange(100, 140)
    fit, val = validation_split(idx, fraction=0.25, seed=0)
    assert fit.dtype == np.int64 and val.dtype == np.int64
    assert val.size == 10 and fit.size == 30
    assert np.intersect1d(fit, val).size == 0
    np.testing.assert_array_equal(np.union1d(fit, val), idx)
    again = validation_split(idx, fraction=0.25, seed=0)
    np.testing.assert_array_equal(fit, again[0])
    assert not np.array_equal(val, validation_split(idx, fraction=0.25, seed=1)[1])
    fit2, val2 = validation_split([3, 9], fraction=0.01)
    assert fit2.size == 1 and val2.size == 1
    with pytest.raises(ValueError, match="need >= 2"):
        validation_split([4], fraction=0.3)
    with pytest.raises(ValueError, match="fraction"):
        validation_split(idx, fraction=1.0)
    with pytest.raises(ValueError, match="duplicated"):
        validation_split([1, 1, 2], fraction=0.5)
