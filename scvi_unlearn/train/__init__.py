"""Unlearning training plans, run by scvi-tools' TrainRunner, and the method registry.

The user-facing entry point is :meth:`scvi_unlearn.model.SCVI.unlearn`; this package holds
what it runs: one :class:`~scvi.train.TrainingPlan` per method and :data:`METHODS`, which maps
a method name to its hyper-parameters and runner.
"""

from scvi_unlearn.train._adversarial import (
    CALIBRATION_KEY,
    ExtraGradientUnlearningPlan,
    FrozenCriticPlan,
)
from scvi_unlearn.train._auto import AUTO_BUDGET, AUTO_CANDIDATES, AUTO_FALLBACK
from scvi_unlearn.train._baselines import GradientAscentPlan, RetainFinetunePlan, SCRUBPlan
from scvi_unlearn.train._common import (
    UnlearningTrainingPlan,
    gather_tensors,
    loss_auc,
    seed_everything,
)
from scvi_unlearn.train._contrastive import ContrastiveLatentPlan
from scvi_unlearn.train._critics import CriticEnsemble
from scvi_unlearn.train._dp import DPTrainingPlan, train_dp
from scvi_unlearn.train._epochs import MIN_SELECTION_CELLS, resolve_epochs
from scvi_unlearn.train._fast_retrain import FastRetrainPlan
from scvi_unlearn.train._fisher import (
    FisherScrubbingPlan,
    diagonal_fisher,
    fisher_noise_std,
    ssd_dampening_factor,
)
from scvi_unlearn.train._methods import (
    METHODS,
    MethodSpec,
    UnlearningRun,
)
from scvi_unlearn.train._oracle import OracleMatchingPlan, oracle_targets
from scvi_unlearn.train._params import FROM_PLAN, Param, check_hyperparameters, plan_defaults
from scvi_unlearn.train._references import (
    DEFAULT_N_REFERENCES,
    REFERENCE_SEED_OFFSET,
    method_reference_pool,
    out_calibration,
)
from scvi_unlearn.train._reset import (
    ResetRelearnPlan,
    covariate_masks,
    reset_masks,
    saliency_scores,
)
from scvi_unlearn.train._selection import BestStateSelector
from scvi_unlearn.train._utility import HeldOutUtility, mean_neg_elbo

__all__ = [
    "AUTO_BUDGET",
    "AUTO_CANDIDATES",
    "AUTO_FALLBACK",
    "CALIBRATION_KEY",
    "DEFAULT_N_REFERENCES",
    "FROM_PLAN",
    "METHODS",
    "MIN_SELECTION_CELLS",
    "REFERENCE_SEED_OFFSET",
    "BestStateSelector",
    "ContrastiveLatentPlan",
    "CriticEnsemble",
    "DPTrainingPlan",
    "ExtraGradientUnlearningPlan",
    "FastRetrainPlan",
    "FisherScrubbingPlan",
    "FrozenCriticPlan",
    "GradientAscentPlan",
    "HeldOutUtility",
    "MethodSpec",
    "OracleMatchingPlan",
    "Param",
    "ResetRelearnPlan",
    "RetainFinetunePlan",
    "SCRUBPlan",
    "UnlearningRun",
    "UnlearningTrainingPlan",
    "check_hyperparameters",
    "covariate_masks",
    "diagonal_fisher",
    "fisher_noise_std",
    "gather_tensors",
    "loss_auc",
    "mean_neg_elbo",
    "method_reference_pool",
    "oracle_targets",
    "out_calibration",
    "plan_defaults",
    "reset_masks",
    "resolve_epochs",
    "saliency_scores",
    "seed_everything",
    "ssd_dampening_factor",
    "train_dp",
]
