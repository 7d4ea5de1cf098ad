"""Utility metrics: held-out likelihood, latent-space quality and marker-gene agreement."""

from scvi_unlearn.utility._metrics import (
    DEFAULT_MARKERS,
    compare_utility,
    knn_accuracy,
    utility_metrics,
)

__all__ = ["DEFAULT_MARKERS", "compare_utility", "knn_accuracy", "utility_metrics"]
