"""Cheap unlearning baselines: retain fine-tune, gradient ascent, SCRUB."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributions import kl_divergence

from scvi_unlearn._compat import inference_inputs
from scvi_unlearn.train._common import (
    Tensors,
    UnlearningTrainingPlan,
    eval_mode,
    iter_chunks,
)
from scvi_unlearn.train._epochs import FixedEpochs
from scvi_unlearn.train._method import (
    TRAINING_PARAMS,
    ForgetPlanMethod,
    PlanMethod,
    register_method,
)
from scvi_unlearn.train._params import Param


class RetainFinetunePlan(UnlearningTrainingPlan):
    """Keep training the warm-started VAE on the retained cells only (scVI's loss).

    The simplest approximate unlearning: the forget cells' influence fades as the model keeps
    fitting the rest ("catastrophic forgetting" used on purpose). No forget cells are needed.
    """


class GradientAscentPlan(UnlearningTrainingPlan):
    """Gradient ascent on the forget cells' loss, then retain fine-tuning.

    The first ``ascent_steps`` optimizer steps *maximise* the forget cells' mean negative ELBO
    (posterior mean, eval mode, minibatches of ``ascent_batch_size``); every later step is a
    retain fine-tune step on the data splitter's retain minibatches. Ascent is unbounded, so
    ``ascent_steps`` must stay small; the fine-tune repairs collateral damage.

    Parameters
    ----------
    module
        The scVI ``VAE`` (a copy of the trained one).
    forget_tensors
        The forget cells.
    ascent_steps
        Number of ascent steps before fine-tuning.
    ascent_batch_size
        Forget cells per ascent step (all of them when fewer).
    **kwargs
        Passed to :class:`~scvi_unlearn.train.UnlearningTrainingPlan`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        forget_tensors: Tensors,
        *,
        ascent_steps: int = 3,
        ascent_batch_size: int = 256,
        **kwargs: Any,
    ):
        super().__init__(module, held={"forget": forget_tensors}, **kwargs)
        self.ascent_steps = int(ascent_steps)
        self.ascent_batch_size = int(ascent_batch_size)

    def training_step(self, batch: Tensors, batch_idx: int) -> torch.Tensor:
        """An ascent step on forget cells while ``global_step < ascent_steps``, else retain."""
        if self.global_step < self.ascent_steps:
            forget_loss = self.forget_neg_elbo(self.sample_held("forget", self.ascent_batch_size))
            self.log("forget_neg_elbo", forget_loss.detach(), prog_bar=True)
            return -forget_loss
        return super().training_step(batch, batch_idx)


class SCRUBPlan(UnlearningTrainingPlan):
    """SCRUB (Kurmanji et al. 2023): a student that diverges from its teacher on forget cells.

    The teacher is a frozen copy of the warm-start VAE; the student (the module) starts equal
    to it. Divergence is measured on the latent posterior, ``KL(q_teacher(z|x) ||
    q_student(z|x))`` summed over latent dimensions. In each of the first ``n_max_epochs``
    epochs, one *max* pass over the forget cells (minibatches of ``forget_batch_size``, eval
    mode) maximises the mean forget divergence; every training step is then a *min* step on a
    retain minibatch minimising ``gamma * retain negative ELBO + alpha * retain divergence``.

    Parameters
    ----------
    module
        The scVI ``VAE`` (a copy of the trained one).
    forget_tensors
        The forget cells.
    n_max_epochs
        Epochs that start with a max pass.
    alpha, gamma
        Weights of the teacher divergence and of the ELBO in the min steps.
    forget_batch_size
        Forget cells per max step.
    **kwargs
        Passed to :class:`~scvi_unlearn.train.UnlearningTrainingPlan`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        forget_tensors: Tensors,
        *,
        n_max_epochs: int = 5,
        alpha: float = 1.0,
        gamma: float = 1.0,
        forget_batch_size: int = 256,
        **kwargs: Any,
    ):
        super().__init__(module, held={"forget": forget_tensors}, **kwargs)
        self.teacher = copy.deepcopy(module).requires_grad_(False)
        self.n_max_epochs = int(n_max_epochs)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.forget_batch_size = int(forget_batch_size)
        self.automatic_optimization = False

    def _divergence(self, tensors: Tensors, student_qz=None) -> torch.Tensor:
        """Mean over cells of ``KL(q_teacher || q_student)``."""
        with torch.no_grad(), eval_mode(self.teacher):
            qz_t = self.teacher.inference(**inference_inputs(self.teacher, tensors))["qz"]
        if student_qz is None:
            with eval_mode(self.module):
                student_qz = self.module.inference(**inference_inputs(self.module, tensors))["qz"]
        return kl_divergence(qz_t, student_qz).sum(-1).mean()

    def _max_pass(self, optimizer) -> None:
        for chunk in iter_chunks(self.held["forget"], self.forget_batch_size):
            optimizer.zero_grad()
            divergence = self._divergence(chunk)
            self.manual_backward(-divergence)
            optimizer.step()
            self.log("forget_divergence", divergence.detach(), prog_bar=True)

    def training_step(self, batch: Tensors, batch_idx: int) -> torch.Tensor:
        """A max pass at the start of the first epochs, then a min step on ``batch``."""
        optimizer = self.optimizers()
        if batch_idx == 0 and self.current_epoch < self.n_max_epochs:
            self._max_pass(optimizer)
        optimizer.zero_grad()
        inference_outputs, _, retain = self.forward(batch, loss_kwargs=self.loss_kwargs)
        divergence = self._divergence(batch, student_qz=inference_outputs["qz"])
        loss = self.gamma * retain.loss + self.alpha * divergence
        self.manual_backward(loss)
        optimizer.step()
        self.compute_and_log_metrics(retain, self.train_metrics, "train")
        self.log("train_loss", retain.loss.detach(), prog_bar=True)
        self.log("retain_divergence", divergence.detach())
        return loss.detach()


# -- the methods -------------------------------------------------------------------------------
@register_method
class Finetune(PlanMethod):
    """Fine-tune on the retained cells only."""

    name = "finetune"
    description = "retain-only fine-tune"
    plan = RetainFinetunePlan
    params = dict(TRAINING_PARAMS)
    epochs = FixedEpochs(20)


@register_method
class GradientAscent(ForgetPlanMethod):
    """Gradient ascent on the forget cells' loss, then fine-tuning on the retained cells."""

    name = "gradient_ascent"
    description = "gradient ascent on the forget cells, then retain fine-tune"
    plan = GradientAscentPlan
    params = {
        **TRAINING_PARAMS,
        "ascent_steps": Param(kind="int", low=0),
        "ascent_batch_size": Param(kind="int", low=1),
    }
    epochs = FixedEpochs(20)


@register_method
class Scrub(ForgetPlanMethod):
    """SCRUB: a student that moves away from the teacher on forget cells, towards it elsewhere."""

    name = "scrub"
    description = "SCRUB teacher-student (Kurmanji et al. 2023)"
    plan = SCRUBPlan
    params = {
        **TRAINING_PARAMS,
        "n_max_epochs": Param(kind="int", low=0),
        "alpha": Param(kind="float", low=0),
        "gamma": Param(kind="float", low=0),
        "forget_batch_size": Param(kind="int", low=1),
    }
    epochs = FixedEpochs(20)
