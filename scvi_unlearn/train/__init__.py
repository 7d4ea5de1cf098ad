"""Unlearning: TrainingPlans run by scvi-tools' TrainRunner, and the ``unlearn`` entry point."""

from scvi_unlearn.train._adversarial import ExtraGradientUnlearningPlan, FrozenCriticPlan
from scvi_unlearn.train._baselines import GradientAscentPlan, RetainFinetunePlan, SCRUBPlan
from scvi_unlearn.train._common import UnlearningTrainingPlan, gather_tensors, loss_auc
from scvi_unlearn.train._critics import CriticEnsemble
from scvi_unlearn.train._fisher import (
    FisherScrubbingPlan,
    diagonal_fisher,
    fisher_noise_std,
    ssd_dampening_factor,
)
from scvi_unlearn.train._methods import METHODS
from scvi_unlearn.train._selection import BestStateSelector
from scvi_unlearn.train._unlearn import clone_model, unlearn

__all__ = [
    "METHODS",
    "BestStateSelector",
    "CriticEnsemble",
    "ExtraGradientUnlearningPlan",
    "FisherScrubbingPlan",
    "FrozenCriticPlan",
    "GradientAscentPlan",
    "RetainFinetunePlan",
    "SCRUBPlan",
    "UnlearningTrainingPlan",
    "clone_model",
    "diagonal_fisher",
    "fisher_noise_std",
    "gather_tensors",
    "loss_auc",
    "ssd_dampening_factor",
    "unlearn",
]
