"""A synthetic PBMC-like count matrix, generated in code (no download), for tests and demos."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

#: Cell types and their share of the non-rare cells (the rare type takes ``rare_fraction``).
_COMMON_TYPES: dict[str, float] = {
    "CD4 T": 0.38,
    "CD14 Mono": 0.22,
    "B": 0.14,
    "CD8 T": 0.14,
    "NK": 0.12,
}
_RARE_TYPE = "Megakaryocyte"

#: Canonical marker genes of each type (genes may be shared, e.g. CD3D by both T types).
_MARKERS: dict[str, tuple[str, ...]] = {
    "CD4 T": ("CD3D", "CD3E", "IL7R", "CCR7", "LDHB", "CD4"),
    "CD14 Mono": ("CD14", "LYZ", "S100A8", "S100A9", "FCN1", "CST3"),
    "B": ("MS4A1", "CD79A", "CD79B", "CD19", "HLA-DQA1"),
    "CD8 T": ("CD3D", "CD3E", "CD8A", "CD8B", "GZMK", "NKG7"),
    "NK": ("NKG7", "GNLY", "GZMB", "PRF1", "KLRD1", "FCGR3A"),
    _RARE_TYPE: ("PPBP", "PF4", "GP9", "ITGA2B", "TUBB1"),
}

#: Relative library size of each type (platelets / megakaryocytes are small, monocytes large).
_TYPE_LIBRARY: dict[str, float] = {
    "CD4 T": 1.0,
    "CD14 Mono": 1.35,
    "B": 1.05,
    "CD8 T": 1.0,
    "NK": 1.1,
    _RARE_TYPE: 0.7,
}

_N_LATENT = 4  # per-cell continuous variation within a type
_LIBRARY_MEDIAN = 2200.0


def _type_counts(n_cells: int, rare_fraction: float) -> dict[str, int]:
    """Exact number of cells per type (largest-remainder rounding, rare type >= 1 if asked)."""
    n_rare = round(rare_fraction * n_cells)
    if rare_fraction > 0:
        n_rare = max(n_rare, 1)
    n_common = n_cells - n_rare
    shares = np.array(list(_COMMON_TYPES.values()))
    raw = shares / shares.sum() * n_common
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n_common - counts.sum()]] += 1
    out = dict(zip(_COMMON_TYPES, counts.tolist()))
    out[_RARE_TYPE] = n_rare
    return out


def synthetic_pbmc(
    n_cells: int = 2000,
    n_genes: int = 400,
    n_donors: int = 4,
    rare_fraction: float = 0.03,
    seed: int = 0,
) -> AnnData:
    """Simulate raw UMI counts of PBMC-like cells, fully determined by ``seed``.

    Six cell types ("CD4 T", "CD14 Mono", "B", "CD8 T", "NK" and the rare "Megakaryocyte",
    which makes up ``rare_fraction`` of the cells) each have their own expression programme:
    log-normal base expression shared by all types, a modest type-level shift of every gene,
    strongly up-regulated canonical markers (e.g. CD3D/CD3E for T cells, MS4A1/CD79A for
    B cells, CD14/LYZ for monocytes, NKG7/GNLY for NK cells, PPBP/PF4 for megakaryocytes) and
    a block of further unnamed up-regulated genes. Each cell also has a continuous latent
    state (type-specific gene loadings), so every cell is individually distinct, and each
    donor a modest multiplicative gene-level effect. Counts are negative binomial
    (gamma-Poisson) with gene-specific dispersion, around a log-normal per-cell library size
    (median about 2,200 UMIs, larger for monocytes, smaller for megakaryocytes).

    Parameters
    ----------
    n_cells
        Number of cells (at least 10).
    n_genes
        Number of genes; must leave room for the named marker genes (at least 40).
    n_donors
        Number of donors, named ``"donor_0"`` ... ``"donor_{n_donors - 1}"``.
    rare_fraction
        Fraction of cells that are megakaryocytes, in ``[0, 0.5)``; with a positive value at
        least one megakaryocyte is simulated.
    seed
        Seed of the :class:`numpy.random.Generator` that draws everything.

    Returns
    -------
    AnnData with ``X`` a CSR ``int32`` matrix of raw counts (every cell and every gene has a
    positive total), ``obs`` columns ``cell_type`` and ``donor`` (categorical), obs names
    ``cell_0000``..., var names with recognisable marker gene symbols and ``gene_0123`` for
    the rest, and ``uns["synthetic"]`` holding the generation parameters.

    Examples
    --------
    >>> adata = synthetic_pbmc(n_cells=300, n_genes=100, seed=1)
    >>> adata.shape
    (300, 100)
    >>> adata.X.dtype.name, int(adata.X.min()) >= 0
    ('int32', True)
    >>> int((adata.obs["cell_type"] == "Megakaryocyte").sum())
    9
    >>> "PPBP" in adata.var_names and "gene_0099" in adata.var_names
    True
    """
    for name, value, low in (("n_cells", n_cells, 10), ("n_genes", n_genes, 40)):
        if int(value) != value or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    if int(n_donors) != n_donors or n_donors < 1:
        raise ValueError(f"`n_donors` must be a positive integer, got {n_donors!r}.")
    if not 0 <= rare_fraction < 0.5:
        raise ValueError(f"`rare_fraction` must be in [0, 0.5), got {rare_fraction!r}.")
    n_cells, n_genes, n_donors = int(n_cells), int(n_genes), int(n_donors)
    rng = np.random.default_rng(seed)

    # --- genes: named markers first, the rest "gene_XXXX" -------------------------------
    marker_names = list(dict.fromkeys(g for genes in _MARKERS.values() for g in genes))
    n_markers = len(marker_names)
    width = max(4, len(str(n_genes - 1)))
    gene_names = marker_names + [f"gene_{i:0{width}d}" for i in range(n_markers, n_genes)]
    gene_pos = {g: i for i, g in enumerate(gene_names)}

    # --- cells: exact type counts, shuffled; donors with mildly unequal sizes ------------
    type_counts = _type_counts(n_cells, rare_fraction)
    types = list(type_counts)
    labels = np.repeat(np.arange(len(types)), list(type_counts.values()))
    labels = rng.permutation(labels)
    donor_share = rng.dirichlet(np.full(n_donors, 12.0))
    donors = rng.choice(n_donors, size=n_cells, p=donor_share)

    # --- type programmes (log scale) ------------------------------------------------------
    base = rng.normal(0.0, 1.6, size=n_genes)  # log-normal base expression
    base[:n_markers] = rng.normal(-3.0, 0.5, size=n_markers)  # markers: low unless induced
    type_effect = rng.normal(0.0, 0.25, size=(len(types), n_genes))
    n_block = max(3, n_genes // 40)  # unnamed type-specific up-regulated genes
    others = np.arange(n_markers, n_genes)
    for t, cell_type in enumerate(types):
        idx = [gene_pos[g] for g in _MARKERS[cell_type]]
        type_effect[t, idx] += rng.uniform(3.5, 5.5, size=len(idx))
        block = rng.choice(others, size=min(n_block, others.size), replace=False)
        type_effect[t, block] += rng.uniform(1.0, 2.5, size=block.size)

    # --- donor effects and per-cell latent variation --------------------------------------
    donor_effect = rng.normal(0.0, 0.15, size=(n_donors, n_genes))
    donor_library = rng.normal(0.0, 0.1, size=n_donors)
    loadings = rng.normal(0.0, 0.3, size=(len(types), _N_LATENT, n_genes))
    latent = rng.normal(0.0, 1.0, size=(n_cells, _N_LATENT))
    within = np.empty((n_cells, n_genes))
    for t in range(len(types)):
        mask = labels == t
        within[mask] = latent[mask] @ loadings[t]

    log_rate = base[None, :] + type_effect[labels] + donor_effect[donors] + within
    log_rate -= log_rate.max(axis=1, keepdims=True)
    prop = np.exp(log_rate)
    prop /= prop.sum(axis=1, keepdims=True)
    type_lib = np.array([_TYPE_LIBRARY[t] for t in types])
    library = (
        _LIBRARY_MEDIAN
        * type_lib[labels]
        * np.exp(donor_library[donors] + rng.normal(0.0, 0.35, size=n_cells))
    )
    mu = prop * library[:, None]

    # --- negative binomial counts (gamma-Poisson), gene-specific inverse dispersion ----------
    theta = np.clip(np.exp(rng.normal(np.log(3.0), 0.7, size=n_genes)), 0.3, 100.0)
    rate = rng.gamma(shape=theta[None, :], scale=mu / theta[None, :])
    counts = rng.poisson(rate).astype(np.int32)

    # every cell and every gene gets at least one count (deterministic top-up)
    empty_cells = np.flatnonzero(counts.sum(axis=1) == 0)
    counts[empty_cells, mu[empty_cells].argmax(axis=1)] += 1
    empty_genes = np.flatnonzero(counts.sum(axis=0) == 0)
    counts[mu[:, empty_genes].argmax(axis=0), empty_genes] += 1

    cell_width = max(4, len(str(n_cells - 1)))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(labels, categories=types),
            "donor": pd.Categorical.from_codes(
                donors, categories=[f"donor_{d}" for d in range(n_donors)]
            ),
        },
        index=pd.Index([f"cell_{i:0{cell_width}d}" for i in range(n_cells)]),
    )
    obs["cell_type"] = obs["cell_type"].cat.remove_unused_categories()
    var = pd.DataFrame(index=pd.Index(gene_names))
    adata = AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var)
    adata.uns["synthetic"] = {
        "generator": "scvi_unlearn.data.synthetic_pbmc",
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_donors": n_donors,
        "rare_fraction": float(rare_fraction),
        "rare_type": _RARE_TYPE,
        "seed": int(seed),
        "cell_type_counts": {t: int(c) for t, c in type_counts.items()},
        "markers": {t: list(g) for t, g in _MARKERS.items()},
        "library_median": _LIBRARY_MEDIAN,
        "n_latent": _N_LATENT,
    }
    return adata
