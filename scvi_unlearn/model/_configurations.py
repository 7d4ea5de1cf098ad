"""The scVI configurations the package is checked on, and the ones it refuses.

One registry serves the configuration test (each entry is audited, unlearned by every method,
saved and loaded) and the documentation's table, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scvi_unlearn.data import synthetic_pbmc


@dataclass(frozen=True)
class Configuration:
    """One way a lab sets up and builds ``scvi.model.SCVI``.

    Parameters
    ----------
    name
        Short name.
    setup_kwargs
        Arguments of ``SCVI.setup_anndata`` (obs columns of :func:`example_adata`).
    model_kwargs
        Arguments of the ``SCVI`` constructor.
    description
        What a lab would call it.
    """

    name: str
    setup_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


#: Configurations that go through the audit, every unlearning method, save and load.
SUPPORTED_CONFIGURATIONS: dict[str, Configuration] = {
    c.name: c
    for c in (
        Configuration("default", description="scvi-tools' defaults (ZINB, gene dispersion)"),
        Configuration("batch", {"batch_key": "batch"}, description="a batch key"),
        Configuration(
            "covariates",
            {"categorical_covariate_keys": ["site"], "continuous_covariate_keys": ["pct_mito"]},
            description="categorical and continuous covariates",
        ),
        Configuration(
            "nb", model_kwargs={"gene_likelihood": "nb"}, description="negative binomial"
        ),
        Configuration(
            "poisson", model_kwargs={"gene_likelihood": "poisson"}, description="Poisson"
        ),
        Configuration(
            "gene-batch",
            {"batch_key": "batch"},
            {"dispersion": "gene-batch"},
            "a dispersion per gene and batch",
        ),
        Configuration(
            "gene-label",
            {"labels_key": "cell_type"},
            {"dispersion": "gene-label"},
            "a dispersion per gene and label",
        ),
        Configuration(
            "rare-batch",
            {"batch_key": "rare_batch"},
            description="a batch of 2 cells (missing from some shadow and reference models)",
        ),
        Configuration(
            "rare-label",
            {"labels_key": "rare_label"},
            {"dispersion": "gene-label"},
            "a label of 2 cells with a dispersion per label",
        ),
        Configuration("layer", {"layer": "counts"}, description="counts in a layer, not `X`"),
        Configuration(
            "ln", model_kwargs={"latent_distribution": "ln"}, description="logistic-normal latent"
        ),
        Configuration(
            "no-observed-library",
            model_kwargs={"use_observed_lib_size": False},
            description="a learned library size (features use its posterior mean)",
        ),
    )
}

#: What is refused up front, and why (each has a test that checks the message).
REFUSED_CONFIGURATIONS: dict[str, str] = {
    "minified AnnData": "its counts are gone; unlearning retrains on counts, so load the model "
    "with the full AnnData",
    "normalised or log-transformed values": "scVI models raw counts; pass the count matrix",
    "SCANVI, TOTALVI and other models": "`SCVI.from_scvi` takes scvi-tools' SCVI only: other "
    "models train with other losses, which the audit and the methods do not reproduce",
}


def example_adata(n_cells: int = 160, seed: int = 0):
    """Synthetic counts with every obs column and layer the configurations name.

    :func:`scvi_unlearn.data.synthetic_pbmc` plus ``batch`` (its donors), ``site`` (a random
    category), ``pct_mito`` (a random number), ``rare_batch`` and ``rare_label`` (two cells
    in a level of their own) and a ``counts`` layer.
    """
    adata = synthetic_pbmc(n_cells=n_cells, n_genes=40, seed=seed)
    rng = np.random.default_rng(seed)
    adata.layers["counts"] = adata.X.copy()
    adata.obs["batch"] = adata.obs["donor"].astype(str)
    adata.obs["site"] = rng.choice(["site_a", "site_b"], adata.n_obs)
    adata.obs["pct_mito"] = rng.uniform(0, 10, adata.n_obs)
    for column, source in (("rare_batch", None), ("rare_label", "cell_type")):
        values = np.full(adata.n_obs, "common", dtype=object)
        if source is not None:
            values = adata.obs[source].astype(str).to_numpy(dtype=object)
        values[[3, 7]] = "rare"
        adata.obs[column] = values
    return adata


def configurations_table() -> str:
    """The registries as a Markdown table (the documentation includes it)."""
    lines = ["| configuration | set up with | status |", "|---|---|---|"]
    for c in SUPPORTED_CONFIGURATIONS.values():
        args = {**c.setup_kwargs, **c.model_kwargs}
        shown = ", ".join(f"`{k}={v!r}`" for k, v in args.items()) or "defaults"
        lines.append(f"| {c.description} | {shown} | supported |")
    for name, why in REFUSED_CONFIGURATIONS.items():
        lines.append(f"| {name} | | refused: {why} |")
    return "\n".join(lines) + "\n"
