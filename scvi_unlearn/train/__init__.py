"""Unlearning methods, their training plans (run by scvi-tools' TrainRunner) and registry.

The user-facing entry point is :meth:`scvi_unlearn.model.SCVI.unlearn`; this package holds
what it runs: each method is one :class:`UnlearningMethod` subclass in one file beside its
:class:`~scvi.train.TrainingPlan`, registered in :data:`METHODS` by :func:`register_method`.
Every module of this package is imported here, so a new method file registers itself.
"""

import importlib
import pkgutil

from scvi_unlearn.train._adversarial import (
    CALIBRATION_KEY,
    ExtraGradientUnlearningPlan,
    FrozenCriticPlan,
)
from scvi_unlearn.train._baselines import GradientAscentPlan, RetainFinetunePlan, SCRUBPlan
from scvi_unlearn.train._certified import (
    CertifiedFinetunePlan,
    NoiseDominatedError,
    certified_epsilon,
    certified_noise,
)
from scvi_unlearn.train._common import (
    UnlearningTrainingPlan,
    gather_tensors,
    loss_auc,
    seed_everything,
    state_copy,
    weights_fingerprint,
)
from scvi_unlearn.train._contrastive import ContrastiveLatentPlan
from scvi_unlearn.train._critics import CriticEnsemble
from scvi_unlearn.train._dp import (
    DEFAULT_DELTA_SHARE,
    PRIVACY_UNITS,
    DonorDPTrainingPlan,
    DPTrainingPlan,
    train_dp,
)
from scvi_unlearn.train._epochs import (
    MIN_SELECTION_CELLS,
    EpochRule,
    FineTuneEpochs,
    FixedEpochs,
    RecipeShare,
)
from scvi_unlearn.train._fast_retrain import FastRetrainPlan
from scvi_unlearn.train._fisher import (
    FisherScrubbingPlan,
    diagonal_fisher,
    fisher_noise_std,
    ssd_dampening_factor,
)
from scvi_unlearn.train._method import (
    METHODS,
    MethodResult,
    PlanMethod,
    UnlearningMethod,
    UnlearningRun,
    WeightsUnchangedError,
    any_model_methods,
    exact_methods,
    get_method,
    method_names,
    method_table,
    register_method,
)
from scvi_unlearn.train._oracle import OracleMatchingPlan, oracle_targets
from scvi_unlearn.train._params import FROM_PLAN, Param, check_hyperparameters, plan_defaults
from scvi_unlearn.train._references import (
    DEFAULT_N_REFERENCES,
    REFERENCE_PARAMS,
    REFERENCE_SEED_OFFSET,
    method_reference_pool,
    out_calibration,
    run_reference_pool,
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
    "CALIBRATION_KEY",
    "DEFAULT_DELTA_SHARE",
    "DEFAULT_N_REFERENCES",
    "FROM_PLAN",
    "METHODS",
    "MIN_SELECTION_CELLS",
    "PRIVACY_UNITS",
    "REFERENCE_PARAMS",
    "REFERENCE_SEED_OFFSET",
    "BestStateSelector",
    "CertifiedFinetunePlan",
    "ContrastiveLatentPlan",
    "CriticEnsemble",
    "DPTrainingPlan",
    "DonorDPTrainingPlan",
    "EpochRule",
    "ExtraGradientUnlearningPlan",
    "FastRetrainPlan",
    "FineTuneEpochs",
    "FisherScrubbingPlan",
    "FixedEpochs",
    "FrozenCriticPlan",
    "GradientAscentPlan",
    "HeldOutUtility",
    "MethodResult",
    "NoiseDominatedError",
    "OracleMatchingPlan",
    "Param",
    "PlanMethod",
    "RecipeShare",
    "ResetRelearnPlan",
    "RetainFinetunePlan",
    "SCRUBPlan",
    "UnlearningMethod",
    "UnlearningRun",
    "UnlearningTrainingPlan",
    "WeightsUnchangedError",
    "any_model_methods",
    "certified_epsilon",
    "certified_noise",
    "check_hyperparameters",
    "covariate_masks",
    "diagonal_fisher",
    "exact_methods",
    "fisher_noise_std",
    "gather_tensors",
    "get_method",
    "loss_auc",
    "mean_neg_elbo",
    "method_names",
    "method_reference_pool",
    "method_table",
    "oracle_targets",
    "out_calibration",
    "plan_defaults",
    "register_method",
    "reset_masks",
    "run_reference_pool",
    "saliency_scores",
    "seed_everything",
    "ssd_dampening_factor",
    "state_copy",
    "train_dp",
    "weights_fingerprint",
]

# A method registers itself when its module is imported: import every module of the package,
# so a new method is one new file (its registration needs no list edited by hand).
for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
