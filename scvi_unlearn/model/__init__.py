"""User-facing models: scVI that can forget cells."""

from scvi_unlearn.model._clone import clone_model
from scvi_unlearn.model._mixin import UnlearningMixin
from scvi_unlearn.model._retrain_pool import retrain_models
from scvi_unlearn.model._scvi import SCVI

__all__ = ["SCVI", "UnlearningMixin", "clone_model", "retrain_models"]
