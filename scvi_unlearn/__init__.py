"""scvi-unlearn: machine unlearning and membership-inference audits for scvi-tools models."""

from importlib.metadata import PackageNotFoundError, version

from scvi_unlearn import audit, data, model, pl, train, utility
from scvi_unlearn._recipe import Recipe
from scvi_unlearn.audit import AuditReport, MembershipInference, attack_features

try:
    __version__ = version("scvi-unlearn")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AuditReport",
    "MembershipInference",
    "Recipe",
    "attack_features",
    "audit",
    "data",
    "model",
    "pl",
    "train",
    "utility",
]
