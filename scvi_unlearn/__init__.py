"""scvi-unlearn: machine unlearning and membership-inference audits for scvi-tools models."""

from scvi_unlearn import audit, data, model, module, pl, train, utility
from scvi_unlearn._executor import (
    Executor,
    TaskFailedError,
    get_default_executor,
    set_default_executor,
)
from scvi_unlearn._recipe import Recipe
from scvi_unlearn._utils import package_version
from scvi_unlearn.audit import AuditReport, GroupAuditReport, MembershipInference, attack_features
from scvi_unlearn.model import train_deletion_ready

__version__ = package_version()

__all__ = [
    "AuditReport",
    "Executor",
    "GroupAuditReport",
    "MembershipInference",
    "Recipe",
    "TaskFailedError",
    "attack_features",
    "audit",
    "data",
    "get_default_executor",
    "model",
    "module",
    "pl",
    "set_default_executor",
    "train",
    "train_deletion_ready",
    "utility",
]
