"""Membership-inference audits of fitted scVI models."""

from scvi_unlearn._verdict import (
    BELOW_REFERENCE,
    FORGOTTEN,
    LEAK,
    MAX_DETECTABLE_AUC,
    MAX_UTILITY_LOSS,
    MIN_REFERENCE_MODELS,
    NO_EVIDENCE,
    OVERALL_RESULTS,
    UNDERPOWERED,
    VERDICTS,
    auc_null_se,
    auc_se,
    combine_verdicts,
    detectable_auc,
    family_level,
    judge,
    overall_result,
    paired_verdict,
    reference_band,
)
from scvi_unlearn.audit._attacks import (
    ATTACKS,
    cv_classifier_scores,
    fit_shadow_classifier,
    lira_scores,
    loss_scores,
    rmia_scores,
)
from scvi_unlearn.audit._certificate import write_certificate
from scvi_unlearn.audit._features import attack_features
from scvi_unlearn.audit._fingerprint import cells_sha256, counts_sha256, weights_sha256
from scvi_unlearn.audit._groups import GroupAuditReport, group_codes, group_test
from scvi_unlearn.audit._membership import (
    DEFAULT_N_SHADOWS,
    LIRA_VARIANCE,
    MembershipInference,
)
from scvi_unlearn.audit._metrics import (
    auc_from_scores,
    bootstrap_metrics,
    pooled_reference_interval,
    tpr_at_fpr,
)
from scvi_unlearn.audit._one_run import (
    OneRunAudit,
    make_canaries,
    one_run_epsilon,
    one_run_p_value,
)
from scvi_unlearn.audit._report import AttackResult, AuditReport, judge_against
from scvi_unlearn.audit._shadows import (
    ShadowPool,
    balanced_membership,
    default_cache_dir,
    train_shadow_pool,
)
from scvi_unlearn.audit._success import (
    SEED_SHARE,
    SUCCESS,
    SUCCESS_LABELS,
    SUCCESS_UTILITY_MARGIN,
    most_seeds,
    unlearning_success,
)

# The loss kernel lives in scvi_unlearn.module; re-exported here, where audits look for it.
from scvi_unlearn.module import LOSS_FEATURE, SCALAR_FEATURES, feature_matrix, per_cell_loss_terms

__all__ = [
    "ATTACKS",
    "BELOW_REFERENCE",
    "DEFAULT_N_SHADOWS",
    "FORGOTTEN",
    "LEAK",
    "LIRA_VARIANCE",
    "LOSS_FEATURE",
    "MAX_DETECTABLE_AUC",
    "MAX_UTILITY_LOSS",
    "MIN_REFERENCE_MODELS",
    "NO_EVIDENCE",
    "OVERALL_RESULTS",
    "SCALAR_FEATURES",
    "SEED_SHARE",
    "SUCCESS",
    "SUCCESS_LABELS",
    "SUCCESS_UTILITY_MARGIN",
    "UNDERPOWERED",
    "VERDICTS",
    "AttackResult",
    "AuditReport",
    "GroupAuditReport",
    "MembershipInference",
    "OneRunAudit",
    "ShadowPool",
    "attack_features",
    "auc_from_scores",
    "auc_null_se",
    "auc_se",
    "balanced_membership",
    "bootstrap_metrics",
    "cells_sha256",
    "combine_verdicts",
    "counts_sha256",
    "cv_classifier_scores",
    "default_cache_dir",
    "detectable_auc",
    "family_level",
    "feature_matrix",
    "fit_shadow_classifier",
    "group_codes",
    "group_test",
    "judge",
    "judge_against",
    "lira_scores",
    "loss_scores",
    "make_canaries",
    "most_seeds",
    "one_run_epsilon",
    "one_run_p_value",
    "overall_result",
    "paired_verdict",
    "per_cell_loss_terms",
    "pooled_reference_interval",
    "reference_band",
    "rmia_scores",
    "tpr_at_fpr",
    "train_shadow_pool",
    "unlearning_success",
    "weights_sha256",
    "write_certificate",
]
