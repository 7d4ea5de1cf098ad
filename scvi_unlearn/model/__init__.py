"""User-facing models: scVI that can forget cells."""

from scvi_unlearn._configurations import (
    REFUSED_CONFIGURATIONS,
    SUPPORTED_CONFIGURATIONS,
    Configuration,
    UnsupportedModelError,
    check_supported_model,
    example_adata,
)
from scvi_unlearn.model._certificate import write_unlearning_certificate
from scvi_unlearn.model._clone import clone_model
from scvi_unlearn.model._deletion_ready import (
    DELETION_READY_MODEL_KWARGS,
    donor_seed,
    is_deletion_ready,
    train_deletion_ready,
)
from scvi_unlearn.model._mixin import UnlearningMixin
from scvi_unlearn.model._retrain_pool import retrain_models
from scvi_unlearn.model._scvi import SCVI
from scvi_unlearn.model._unlearn import cells_fingerprint
from scvi_unlearn.model._verify import VerificationResult, verify_unlearning

__all__ = [
    "DELETION_READY_MODEL_KWARGS",
    "REFUSED_CONFIGURATIONS",
    "SCVI",
    "SUPPORTED_CONFIGURATIONS",
    "Configuration",
    "UnlearningMixin",
    "UnsupportedModelError",
    "VerificationResult",
    "cells_fingerprint",
    "check_supported_model",
    "clone_model",
    "donor_seed",
    "example_adata",
    "is_deletion_ready",
    "retrain_models",
    "train_deletion_ready",
    "verify_unlearning",
    "write_unlearning_certificate",
]
