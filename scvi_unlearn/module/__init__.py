"""Torch-level building blocks: scVI's per-cell loss kernel shared by audits and plans."""

from scvi_unlearn.module._loss import (
    LOSS_FEATURE,
    SCALAR_FEATURES,
    feature_matrix,
    per_cell_loss_terms,
    sparse_nll,
)

__all__ = [
    "LOSS_FEATURE",
    "SCALAR_FEATURES",
    "feature_matrix",
    "per_cell_loss_terms",
    "sparse_nll",
]
