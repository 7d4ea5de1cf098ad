"""User-facing models: scVI that can forget cells."""

from scvi_unlearn.model._clone import clone_model
from scvi_unlearn.model._configurations import (
    REFUSED_CONFIGURATIONS,
    SUPPORTED_CONFIGURATIONS,
    Configuration,
    example_adata,
)
from scvi_unlearn.model._mixin import UnlearningMixin
from scvi_unlearn.model._retrain_pool import retrain_models
from scvi_unlearn.model._scvi import SCVI

__all__ = [
    "REFUSED_CONFIGURATIONS",
    "SCVI",
    "SUPPORTED_CONFIGURATIONS",
    "Configuration",
    "UnlearningMixin",
    "clone_model",
    "example_adata",
    "retrain_models",
]
