"""User-facing models: scVI that can forget cells."""

from scvi_unlearn._configurations import (
    REFUSED_CONFIGURATIONS,
    SUPPORTED_CONFIGURATIONS,
    Configuration,
    UnsupportedModelError,
    check_supported_model,
    example_adata,
)
from scvi_unlearn.model._auto import (
    AUTO_BUDGET,
    AUTO_CANDIDATES,
    AUTO_FALLBACK,
    Auto,
    GatedSearch,
    lira_gate,
)
from scvi_unlearn.model._certificate import write_unlearning_certificate
from scvi_unlearn.model._clone import clone_model
from scvi_unlearn.model._deletion_ready import (
    DELETION_READY_MODEL_KWARGS,
    donor_seed,
    is_deletion_ready,
    train_deletion_ready,
)
from scvi_unlearn.model._donor_methods import DonorRemoval, DropDonors, RefitDonors
from scvi_unlearn.model._mixin import UnlearningMixin, document_methods
from scvi_unlearn.model._retrain_pool import retrain_models
from scvi_unlearn.model._scvi import SCVI
from scvi_unlearn.model._unlearn import UnlearningEvent, cells_fingerprint
from scvi_unlearn.model._verify import VerificationResult, verify_unlearning

# Every method is registered now (the training layer's and this layer's): the method table of
# ``unlearn``'s docstring is generated from the registry.
document_methods()

__all__ = [
    "AUTO_BUDGET",
    "AUTO_CANDIDATES",
    "AUTO_FALLBACK",
    "DELETION_READY_MODEL_KWARGS",
    "REFUSED_CONFIGURATIONS",
    "SCVI",
    "SUPPORTED_CONFIGURATIONS",
    "Auto",
    "Configuration",
    "DonorRemoval",
    "DropDonors",
    "GatedSearch",
    "RefitDonors",
    "UnlearningEvent",
    "UnlearningMixin",
    "UnsupportedModelError",
    "VerificationResult",
    "cells_fingerprint",
    "check_supported_model",
    "clone_model",
    "donor_seed",
    "example_adata",
    "is_deletion_ready",
    "lira_gate",
    "retrain_models",
    "train_deletion_ready",
    "verify_unlearning",
    "write_unlearning_certificate",
]
