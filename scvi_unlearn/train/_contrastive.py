"""Contrastive-latent unlearning (the original study's encoder-only method).

The encoder alone is trained: the forget cells' posteriors are pushed towards the prior while
the retained cells' posteriors are anchored to those of the original encoder. The decoder is
untouched. The original study found it over-unlearns (its attack AUC fell to 0.153, a
detectable "below reference"); it is here so that row of the study can be measured with the
same audit.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributions import Normal, kl_divergence

from scvi_unlearn._compat import inference_inputs
from scvi_unlearn.train._common import Tensors, UnlearningTrainingPlan, eval_mode
from scvi_unlearn.train._epochs import FixedEpochs
from scvi_unlearn.train._method import (
    TRAINING_PARAMS,
    ForgetPlanMethod,
    register_method,
)
from scvi_unlearn.train._params import Param


def _posterior(module: torch.nn.Module, tensors: Tensors) -> Normal:
    inputs = inference_inputs(module, tensors)
    return module.inference(**inputs)["qz"]


class ContrastiveLatentPlan(UnlearningTrainingPlan):
    """Push forget posteriors to the prior, anchor retained posteriors to the original's.

    Each step minimises, with only the encoder's parameters, ``KL(q(z|x_forget) || N(0, I))``
    averaged over a forget minibatch plus ``anchor_weight`` times
    ``KL(q_original(z|x_retain) || q(z|x_retain))`` averaged over the retain minibatch (both in
    eval mode, summed over latent dimensions).

    Parameters
    ----------
    module
        The scVI ``VAE`` (a copy of the trained one).
    forget_tensors
        The forget cells.
    anchor_weight
        Weight of the retained cells' anchor.
    forget_batch_size
        Forget cells per step (all of them when fewer).
    **kwargs
        Passed to :class:`~scvi_unlearn.train.UnlearningTrainingPlan`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        forget_tensors: Tensors,
        *,
        anchor_weight: float = 1.0,
        forget_batch_size: int = 128,
        **kwargs: Any,
    ):
        super().__init__(module, held={"forget": forget_tensors}, **kwargs)
        self.anchor_weight = float(anchor_weight)
        self.forget_batch_size = int(forget_batch_size)
        # The original encoder, frozen: the anchor of the retained cells' posteriors.
        self.original_module = copy.deepcopy(module).requires_grad_(False)

    def configure_optimizers(self):
        """ScVI's optimizer over the encoder's parameters only (the decoder stays as trained)."""
        params = [p for p in self.module.z_encoder.parameters() if p.requires_grad]
        return self.get_optimizer_creator()(params)

    def training_step(self, batch: Tensors, batch_idx: int) -> torch.Tensor:
        """Forget term plus weighted anchor term."""
        forget = self.sample_held("forget", self.forget_batch_size)
        with eval_mode(self.module), eval_mode(self.original_module):
            qz_forget = _posterior(self.module, forget)
            prior = Normal(torch.zeros_like(qz_forget.loc), torch.ones_like(qz_forget.scale))
            forget_term = kl_divergence(qz_forget, prior).sum(-1).mean()
            qz_retain = _posterior(self.module, batch)
            with torch.no_grad():
                qz_original = _posterior(self.original_module, batch)
            anchor = kl_divergence(qz_original, qz_retain).sum(-1).mean()
        self.log("forget_kl_to_prior", forget_term.detach(), prog_bar=True)
        self.log("retain_anchor_kl", anchor.detach())
        return forget_term + self.anchor_weight * anchor


@register_method
class Contrastive(ForgetPlanMethod):
    """Encoder only: the forget cells' posteriors pulled to the prior, retained ones anchored."""

    name = "contrastive"
    description = (
        "encoder only: forget posteriors to the prior, retained ones anchored "
        "(the original study's contrastive-latent method; it over-unlearned there)"
    )
    plan = ContrastiveLatentPlan
    params = {
        **TRAINING_PARAMS,
        "anchor_weight": Param(kind="float", low=0, doc="weight of the retained anchor"),
        "forget_batch_size": Param(kind="int", low=1),
    }
    epochs = FixedEpochs(10)
