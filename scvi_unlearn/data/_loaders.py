"""Loaders for the real PBMC data sets: a local file, a cache, or the public original.

Resolution order of both loaders: an explicit ``path``; else a cached ``.h5ad`` in
``cache_dir`` (default: ``$SCVI_UNLEARN_DATA_DIR``, else ``~/.cache/scvi_unlearn``); else
the public original is downloaded, harmonised and written to the cache. All network access
goes through :func:`_download`, one small function that tests replace.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import anndata
import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from scvi_unlearn._validation import check_count_data

if TYPE_CHECKING:
    from collections.abc import Sequence

#: 10x Genomics "3k PBMCs from a healthy donor" (Cell Ranger 1.1.0), filtered matrices.
PBMC3K_COUNTS_URL = (
    "https://cf.10xgenomics.com/samples/cell-exp/1.1.0/pbmc3k/"
    "pbmc3k_filtered_gene_bc_matrices.tar.gz"
)
#: scanpy's processed pbmc3k (``scanpy.datasets.pbmc3k_processed``): Louvain labels, QC'd cells.
PBMC3K_LABELS_URL = (
    "https://raw.githubusercontent.com/chanzuckerberg/cellxgene/main/example-dataset/pbmc3k.h5ad"
)
#: The processed Kang et al. 2018 AnnData that ``pertpy.data.kang_2018()`` downloads.
KANG2018_URL = "https://figshare.com/ndownloader/files/34464122"

ENV_DATA_DIR = "SCVI_UNLEARN_DATA_DIR"

#: Cache file names each loader looks for, first one written after a download.
_PBMC3K_FILES = ("pbmc3k.h5ad",)
_KANG_FILES = ("kang2018.h5ad", "kang2018_pbmc12k.h5ad")

#: scanpy's pbmc3k Louvain labels -> the Seurat-tutorial names used by ``cell_type``.
PBMC3K_LABEL_MAP: dict[str, str] = {
    "CD4 T cells": "CD4 T",
    "CD14+ Monocytes": "CD14+ Mono",
    "B cells": "B",
    "CD8 T cells": "CD8 T",
    "NK cells": "NK",
    "FCGR3A+ Monocytes": "FCGR3A+ Mono",
    "Dendritic cells": "DC",
    "Megakaryocytes": "Platelet",
}


# ----------------------------------------------------------------------------- network
def _download(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` (atomically: a partial file never has the final name)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "scvi-unlearn"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConnectionError(
            f"Could not download {url} ({err}). Without internet access, pass `path=` to a "
            f"local copy or set ${ENV_DATA_DIR} to a folder that holds the cached .h5ad."
        ) from err
    os.replace(tmp, dest)
    return dest


# ----------------------------------------------------------------------------- helpers
def _default_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "scvi_unlearn"


def _find_cached(cache_dir: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        candidate = cache_dir / name
        if candidate.is_file():
            return candidate
    return None


def _write_cache(adata: AnnData, dest: Path) -> None:
    """Write ``adata`` to ``dest`` via a temporary file, so a crash leaves no broken cache."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp.h5ad")
    adata.write_h5ad(tmp, compression="gzip")
    os.replace(tmp, dest)


def _read(path: Path) -> AnnData:
    if not path.is_file():
        raise FileNotFoundError(f"No such data file: {str(path)!r}.")
    try:
        return anndata.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types for a bad file
        raise OSError(f"Could not read {str(path)!r} as an .h5ad file: {err}") from err


def _finalise(adata: AnnData, required: Sequence[str], source: str) -> AnnData:
    """Validate counts and columns; return a fresh AnnData with CSR counts and unique names."""
    missing = [c for c in required if c not in adata.obs.columns]
    if missing:
        raise KeyError(
            f"{source} lacks the required obs column(s) {missing}; it has "
            f"{list(map(str, adata.obs.columns))}."
        )
    x = adata.X
    try:
        check_count_data(adata)
    except ValueError:
        if "counts" not in adata.layers:
            raise
        check_count_data(adata, layer="counts")  # raw counts kept in a layer: use those
        x = adata.layers["counts"]
    if x is None:
        raise ValueError(f"{source} has no expression matrix.")
    x = sparse.csr_matrix(x) if not sparse.issparse(x) else x.tocsr(copy=True)
    if x.dtype.kind == "f" and x.dtype != np.float32:
        x = x.astype(np.float32)
    x.sort_indices()
    obs = adata.obs.copy()
    obs.index = obs.index.astype(str)
    var = adata.var.copy()
    var.index = var.index.astype(str)
    provenance = adata.uns.get("provenance")
    uns = {"provenance": dict(provenance)} if isinstance(provenance, dict) else {}
    out = AnnData(X=x, obs=obs, var=var, uns=uns)
    out.obs_names_make_unique()
    out.var_names_make_unique()
    return out


def _resolve(
    path: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    names: Sequence[str],
    fetch,
) -> tuple[AnnData, str]:
    """Read ``path``, else the cache, else download with ``fetch(tmpdir)`` and cache it."""
    if path is not None:
        path = Path(path).expanduser()
        return _read(path), f"The file {str(path)!r}"
    cache = _default_cache_dir(cache_dir)
    cached = _find_cached(cache, names)
    if cached is not None:
        return _read(cached), f"The cached file {str(cached)!r}"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download_") as tmp:
        adata = fetch(Path(tmp))
    dest = cache / names[0]
    _write_cache(adata, dest)
    return adata, f"The downloaded data (cached at {str(dest)!r})"


# ----------------------------------------------------------------------------- pbmc3k
def _fetch_pbmc3k(workdir: Path) -> AnnData:
    """Download the 10x pbmc3k matrices and scanpy's labels; return all 2,700 cells."""
    import scanpy as sc

    archive = _download(PBMC3K_COUNTS_URL, workdir / "pbmc3k_filtered_gene_bc_matrices.tar.gz")
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: safe extraction
            tar.extractall(workdir / "mtx", filter="data")
        else:  # pragma: no cover
            tar.extractall(workdir / "mtx")
    matrix_dirs = sorted(p.parent for p in (workdir / "mtx").rglob("matrix.mtx*"))
    if not matrix_dirs:
        raise OSError(f"No matrix.mtx in the archive downloaded from {PBMC3K_COUNTS_URL}.")
    adata = sc.read_10x_mtx(matrix_dirs[0], var_names="gene_symbols", make_unique=True)
    adata.obs_names = adata.obs_names.str.replace(r"-1$", "", regex=True)

    labels_file = _download(PBMC3K_LABELS_URL, workdir / "pbmc3k_processed.h5ad")
    processed = anndata.read_h5ad(labels_file)
    louvain = processed.obs["louvain"].astype(str)
    louvain.index = louvain.index.str.replace(r"-1$", "", regex=True)
    mapped = louvain.map(lambda v: PBMC3K_LABEL_MAP.get(v, v)).reindex(adata.obs_names)
    categories = [c for c in PBMC3K_LABEL_MAP.values() if c in set(mapped.dropna())]
    categories += sorted(set(mapped.dropna()) - set(categories))
    adata.obs["cell_type"] = pd.Categorical(mapped.to_numpy(), categories=categories)
    adata.obs["passed_seurat_qc"] = mapped.notna().to_numpy()
    adata.uns["provenance"] = {
        "counts": PBMC3K_COUNTS_URL,
        "labels": f"{PBMC3K_LABELS_URL} (obs 'louvain', mapped to Seurat-tutorial names)",
        "source": "10x Genomics pbmc3k (3k PBMCs from a healthy donor, CR 1.1.0)",
    }
    return adata


def pbmc3k(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    qc_only: bool = True,
) -> AnnData:
    """10x Genomics "3k PBMCs from a healthy donor": raw counts with cell-type labels.

    Parameters
    ----------
    path
        An ``.h5ad`` file to read (e.g. ``../shared/data/pbmc3k.h5ad``). Overrides the cache.
    cache_dir
        Folder of cached data (default: ``$SCVI_UNLEARN_DATA_DIR``, else
        ``~/.cache/scvi_unlearn``), searched for ``pbmc3k.h5ad``. When absent, the 10x matrices
        (``PBMC3K_COUNTS_URL``) and scanpy's processed pbmc3k labels
        (``PBMC3K_LABELS_URL``, joined on barcodes) are downloaded and cached there.
    qc_only
        Keep only the cells that passed the Seurat-tutorial QC (obs ``passed_seurat_qc``,
        2,638 cells); with ``False`` all 2,700 cells are returned (``cell_type`` is NaN for
        the 62 dropped cells).

    Returns
    -------
    AnnData of raw UMI counts (CSR) with obs ``cell_type`` (categorical: Naive / Memory
    CD4 T or CD4 T, CD14+ Mono, B, CD8 T, FCGR3A+ Mono, NK, DC and the rare Platelet) and
    ``passed_seurat_qc``.

    Raises
    ------
    KeyError
        If the file lacks ``cell_type`` (or ``passed_seurat_qc`` with ``qc_only``).
    ValueError
        If ``X`` does not hold raw counts.

    Examples
    --------
    >>> import tempfile, anndata, numpy as np, pandas as pd
    >>> tiny = anndata.AnnData(np.arange(8, dtype=np.int32).reshape(4, 2))
    >>> tiny.obs["cell_type"] = ["B", "NK", "Platelet", None]
    >>> tiny.obs["passed_seurat_qc"] = [True, True, True, False]
    >>> with tempfile.TemporaryDirectory() as d:
    ...     tiny.write_h5ad(f"{d}/pbmc3k.h5ad")
    ...     adata = pbmc3k(path=f"{d}/pbmc3k.h5ad")  # or pbmc3k() to download and cache
    >>> adata.n_obs, adata.obs["cell_type"].cat.categories.tolist()
    (3, ['B', 'NK', 'Platelet'])
    """
    adata, source = _resolve(path, cache_dir, _PBMC3K_FILES, _fetch_pbmc3k)
    required = ["cell_type", "passed_seurat_qc"] if qc_only else ["cell_type"]
    out = _finalise(adata, required, source)
    if qc_only:
        keep = out.obs["passed_seurat_qc"].fillna(False).astype(bool).to_numpy()
        out = out[keep].copy()
    if isinstance(out.obs["cell_type"].dtype, pd.CategoricalDtype):
        out.obs["cell_type"] = out.obs["cell_type"].cat.remove_unused_categories()
    else:
        out.obs["cell_type"] = out.obs["cell_type"].astype("category")
    return out


# ----------------------------------------------------------------------------- Kang 2018
def _fetch_kang2018(workdir: Path) -> AnnData:
    """Download the processed Kang et al. 2018 AnnData (the file pertpy's loader uses)."""
    raw = anndata.read_h5ad(_download(KANG2018_URL, workdir / "kang_2018.h5ad"))
    raw = _harmonise_kang(raw, f"The file downloaded from {KANG2018_URL}")
    adata = AnnData(X=raw.X, obs=raw.obs.copy(), var=raw.var.copy())
    if "counts" in raw.layers:
        adata.layers["counts"] = raw.layers["counts"]
    adata.uns["provenance"] = {
        "counts": f"{KANG2018_URL} (the AnnData of pertpy.data.kang_2018())",
        "source": "Kang et al. 2018 (GSE96583) 10x PBMC, lupus patients, ctrl and IFN-beta",
    }
    return adata


def _harmonise_kang(adata: AnnData, source: str) -> AnnData:
    """Map pertpy's column names to ``cell_type`` / ``sample_id`` (string categories)."""
    obs = adata.obs
    if "sample_id" not in obs.columns:
        for alt in ("replicate", "ind", "donor", "patient"):
            if alt in obs.columns:
                obs["sample_id"] = obs[alt].astype(str).str.replace(r"^patient_", "", regex=True)
                break
    if "cell_type" not in obs.columns:
        for alt in ("cell", "cell_types", "celltype"):
            if alt in obs.columns:
                obs["cell_type"] = obs[alt]
                break
    if "condition" not in obs.columns and "label" in obs.columns:
        obs["condition"] = obs["label"]
    missing = [c for c in ("cell_type", "sample_id") if c not in obs.columns]
    if missing:
        raise KeyError(
            f"{source} lacks the required obs column(s) {missing} (and no known alias such as "
            f"'replicate' for 'sample_id'); it has {list(map(str, obs.columns))}."
        )
    for col in ("cell_type", "sample_id"):
        values = obs[col]
        if not isinstance(values.dtype, pd.CategoricalDtype) or not all(
            isinstance(c, str) for c in values.cat.categories
        ):
            obs[col] = pd.Categorical(
                values.astype(str).where(values.notna(), None), ordered=False
            )
    return adata


def kang2018(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> AnnData:
    """Kang et al. 2018 (GEO GSE96583): 10x PBMCs of lupus patients, raw counts.

    Parameters
    ----------
    path
        An ``.h5ad`` file to read (e.g. ``../shared/data/kang2018_pbmc12k.h5ad``, a 12,261-cell
        subset). Overrides the cache.
    cache_dir
        Folder of cached data (default: ``$SCVI_UNLEARN_DATA_DIR``, else
        ``~/.cache/scvi_unlearn``), searched for ``kang2018.h5ad`` then
        ``kang2018_pbmc12k.h5ad``. When absent, the processed AnnData that
        ``pertpy.data.kang_2018()`` uses (``KANG2018_URL``; control and IFN-beta
        stimulated cells) is downloaded and cached as ``kang2018.h5ad``.

    Returns
    -------
    AnnData of raw UMI counts (CSR) with categorical obs ``cell_type`` (e.g. "CD4 T cells",
    "Megakaryocytes") and ``sample_id`` (donor, as strings; pertpy's ``replicate`` with the
    ``patient_`` prefix removed), plus ``condition`` where the source has pertpy's ``label``.

    Raises
    ------
    KeyError
        If ``cell_type`` or ``sample_id`` (or an alias) is missing.
    ValueError
        If ``X`` does not hold raw counts.

    Examples
    --------
    >>> import tempfile, anndata, numpy as np
    >>> tiny = anndata.AnnData(np.ones((3, 2), dtype=np.float32))
    >>> tiny.obs["cell_type"] = ["B cells", "NK cells", "Megakaryocytes"]
    >>> tiny.obs["replicate"] = ["patient_1015", "patient_1016", "patient_1015"]
    >>> with tempfile.TemporaryDirectory() as d:
    ...     tiny.write_h5ad(f"{d}/kang.h5ad")
    ...     adata = kang2018(path=f"{d}/kang.h5ad")  # or kang2018() to download and cache
    >>> adata.obs["sample_id"].tolist()
    ['1015', '1016', '1015']
    """
    adata, source = _resolve(path, cache_dir, _KANG_FILES, _fetch_kang2018)
    adata = _harmonise_kang(adata, source)
    return _finalise(adata, ["cell_type", "sample_id"], source)
