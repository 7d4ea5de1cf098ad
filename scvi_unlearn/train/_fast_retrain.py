"""Exact unlearning on a budget: a fresh scVI trained on the retained cells only.

Private by construction (the forget cells are not in the data it sees), so only its utility is
in question: a one-cycle learning-rate schedule and a KL warm-up scaled to the shorter budget let
a quarter of the original epochs reach the full retrain's held-out ELBO (measured in
``benchmarks/retrain_budget.py``).
"""

from __future__ import annotations

from typing import Any

from scvi.train import TrainingPlan
from torch.optim.lr_scheduler import OneCycleLR


class FastRetrainPlan(TrainingPlan):
    """scVI's :class:`~scvi.train.TrainingPlan` with a one-cycle learning-rate schedule.

    The learning rate rises from ``peak_lr / 25`` to ``peak_lr`` over the first
    ``pct_start`` of the steps, then anneals (cosine) to almost zero, stepped every minibatch
    (Smith & Topin 2019). The KL warm-up and everything else are scVI's.

    Parameters
    ----------
    module
        A freshly initialised scVI ``VAE``.
    peak_lr
        The schedule's highest learning rate.
    pct_start
        Share of the steps spent raising the learning rate.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``n_epochs_kl_warmup``, ...).
    """

    def __init__(self, module, *, peak_lr: float = 3e-3, pct_start: float = 0.3, **kwargs: Any):
        kwargs.setdefault("lr", peak_lr)
        super().__init__(module, **kwargs)
        self.peak_lr = float(peak_lr)
        self.pct_start = float(pct_start)

    def configure_optimizers(self):
        """ScVI's optimizer, with the one-cycle schedule stepped every minibatch."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = self.get_optimizer_creator()(params)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = OneCycleLR(
            optimizer, max_lr=self.peak_lr, total_steps=total, pct_start=self.pct_start
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }
