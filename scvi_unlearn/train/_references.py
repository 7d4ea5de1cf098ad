"""A method's own reference pool: models trained on random halves of the cells.

Methods that need to know what a cell looks like to a model that never saw it (per-cell
calibrated critics, oracle targets) train a pool of reference models with the target's recipe.
It is a *separate* pool from the audit's shadows: its seeds live in their own namespace and its
cache in its own folder, so a method is never judged by the models it was tuned against (the
protocol's rule; :ref:`methods-protocol`). It is paid once per data set and recipe.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from scvi_unlearn._recipe import Recipe
from scvi_unlearn.audit import ShadowPool, default_cache_dir, group_codes, train_shadow_pool
from scvi_unlearn.train._common import isolated_randomness
from scvi_unlearn.train._params import Param

#: Added to the run's seed for reference pools: an audit's shadows (seed ``s``) and a method's
#: references never share a membership draw or a cache entry.
REFERENCE_SEED_OFFSET = 100_003
#: Reference models a method trains when none is given (each cell OUT for half of them).
DEFAULT_N_REFERENCES = 4
#: Hyper-parameters of every method that trains a reference pool.
REFERENCE_PARAMS = {
    "n_references": Param(
        DEFAULT_N_REFERENCES, "int", low=4, doc="method reference models (even, >= 4)"
    ),
    "reference_cache_dir": Param(
        None, "str", allow_none=True, doc="default: <shadow cache>/method_references"
    ),
    # The pool belongs to the data set and recipe, not to one request: every request (and
    # every unlearning seed) reuses it, so it is paid once.
    "reference_seed": Param(0, "int", low=0, doc="seed of the reference pool (not the run's)"),
}


def reference_cache_dir(cache_dir: str | Path | bool | None = None) -> Path | None:
    """Where reference pools are cached.

    ``cache_dir`` itself when given, ``False`` for no cache, otherwise
    ``<shadow cache>/method_references`` (beside, never inside, the audit's shadow entries).
    """
    if cache_dir is False:
        return None
    return Path(cache_dir) if cache_dir else default_cache_dir() / "method_references"


def method_reference_pool(
    model,
    n_references: int = DEFAULT_N_REFERENCES,
    seed: int = 0,
    cache_dir: str | Path | bool | None = None,
    accelerator: str = "auto",
    devices="auto",
    progress_bar: bool = False,
    keep_models: bool = False,
    group_key: str | None = None,
) -> ShadowPool:
    """Train (or load) the reference pool of ``model``'s data and recipe.

    Every cell of the model's AnnData is IN for exactly half of the references. With
    ``group_key`` (an obs column, e.g. the donor), whole groups are IN or OUT together, so a
    reference that "left a cell out" also left out the rest of its donor (for requests that
    forget a whole group). ``keep_models`` keeps the references' weights as well as their
    features (see :func:`~scvi_unlearn.audit.train_shadow_pool`).
    """
    adata = model.adata
    groups = None
    if group_key is not None:
        groups, _ = group_codes(adata, group_key, np.arange(adata.n_obs), min_cells=1)
    return train_shadow_pool(
        adata,
        Recipe.from_model(model),
        int(n_references),
        np.arange(adata.n_obs),
        REFERENCE_SEED_OFFSET + int(seed),
        reference_cache_dir(cache_dir),
        accelerator=accelerator,
        devices=devices,
        progress_bar=progress_bar,
        keep_models=keep_models,
        groups=groups,
    )


def run_reference_pool(
    run, keep_models: bool = False, group_key: str | None = None
) -> tuple[ShadowPool, dict[str, Any]]:
    """The reference pool of an unlearning run, and its record for the provenance.

    The run's ``n_references``, ``reference_seed`` and ``reference_cache_dir``
    hyper-parameters say which pool. Raises if ``n_references`` is odd (every cell must be
    left out by exactly half).
    """
    hp = run.hyperparameters
    if hp["n_references"] % 2:
        raise ValueError(
            f"{run.method}: `n_references` must be even (every cell is left out by exactly half "
            f"of the reference models), got {hp['n_references']}."
        )
    start = time.perf_counter()
    # Trained or read from the cache, the pool leaves the run's random state as it found it.
    with isolated_randomness():
        pool = method_reference_pool(
            run.model,
            hp["n_references"],
            hp["reference_seed"],
            hp["reference_cache_dir"],
            accelerator=run.accelerator,
            devices=run.devices,
            progress_bar=run.enable_progress_bar,
            keep_models=keep_models,
            group_key=group_key,
        )
    record = {
        "n_references": pool.n_shadows,
        "reference_seed": REFERENCE_SEED_OFFSET + hp["reference_seed"],
        "reference_seconds": float(time.perf_counter() - start),
        "reference_train_seconds": float(sum(pool.train_seconds)),
    }
    return pool, record


def out_calibration(pool: ShadowPool, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's mean features under the references that left it out, and a pooled SD.

    The SD is per feature, of those OUT values around their cell's mean, pooled over cells
    (offline LiRA's fixed variance: two OUT models per cell cannot give a per-cell SD).

    Returns ``(mean, std)`` of shapes ``(len(cells), n_features)`` and ``(n_features,)``.
    Raises if a cell has no OUT reference.
    """
    feats = pool.features[:, cells]  # (n_refs, n_cells, n_features)
    out = ~pool.in_mask[:, cells]
    count = out.sum(0)
    if (count == 0).any():
        raise ValueError(
            f"{int((count == 0).sum())} cells have no reference model that left them out; "
            "use at least 2 references."
        )
    weights = out[..., None].astype(float)
    mean = (feats * weights).sum(0) / count[:, None]
    resid = (feats - mean) * weights
    dof = max(int(count.sum()) - cells.size, 1)
    std = np.sqrt((resid**2).sum((0, 1)) / dof)
    return mean, np.maximum(std, 1e-8)
