"""Membership-inference audits of fitted scVI models."""

from scvi_unlearn.audit._attacks import (
    ATTACKS,
    cv_classifier_scores,
    fit_shadow_classifier,
    lira_scores,
    loss_scores,
)
from scvi_unlearn.audit._features import attack_features
from scvi_unlearn.audit._membership import DEFAULT_N_SHADOWS, MembershipInference
from scvi_unlearn.audit._metrics import auc_from_scores, bootstrap_metrics, tpr_at_fpr
from scvi_unlearn.audit._report import AttackResult, AuditReport
from scvi_unlearn.audit._shadows import ShadowPool, balanced_membership, default_cache_dir

# The loss kernel lives in scvi_unlearn.module; re-exported here, where audits look for it.
from scvi_unlearn.module import LOSS_FEATURE, SCALAR_FEATURES, feature_matrix, per_cell_loss_terms

__all__ = [
    "ATTACKS",
    "DEFAULT_N_SHADOWS",
    "LOSS_FEATURE",
    "SCALAR_FEATURES",
    "AttackResult",
    "AuditReport",
    "MembershipInference",
    "ShadowPool",
    "attack_features",
    "auc_from_scores",
    "balanced_membership",
    "bootstrap_metrics",
    "cv_classifier_scores",
    "default_cache_dir",
    "feature_matrix",
    "fit_shadow_classifier",
    "lira_scores",
    "loss_scores",
    "per_cell_loss_terms",
    "tpr_at_fpr",
]
