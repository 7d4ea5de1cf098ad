"""Held-out utility of an unlearning run: neg. ELBO on cells the model never trained on."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from scvi_unlearn.module import per_cell_loss_terms
from scvi_unlearn.train._common import eval_mode, gather_tensors, iter_chunks, to_device

if TYPE_CHECKING:
    from scvi_unlearn.train._method import UnlearningRun

#: Held-out cells on which utility is measured (a seeded sample when there are more).
N_UTILITY_CELLS = 2000


@torch.no_grad()
def mean_neg_elbo(module: torch.nn.Module, tensors, chunk_size: int = 1024) -> float:
    """Mean per-cell negative ELBO (posterior mean, eval mode) of ``module`` on ``tensors``."""
    total, count = 0.0, 0
    device = next(module.parameters()).device  # a model trained on a GPU stays there
    # scVI's inference draws samples it does not need here; a forked generator keeps the
    # check from shifting the random stream of the training that follows it (a re-run from
    # the record, which makes no such check, must see the same stream).
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), eval_mode(module):
        for chunk in iter_chunks(tensors, chunk_size):
            values = per_cell_loss_terms(module, to_device(chunk, device))["neg_elbo"]
            total += float(values.double().sum())
            count += int(values.numel())
    return total / max(count, 1)


def utility_cells(run: UnlearningRun) -> np.ndarray:
    """Cells the model never trained on (validation and any other untrained cells).

    At most :data:`N_UTILITY_CELLS`, a sample drawn with the run's seed.
    """
    n_obs = run.model.adata.n_obs
    untrained = np.setdiff1d(np.arange(n_obs), np.union1d(run.retain, run.forget))
    if untrained.size > N_UTILITY_CELLS:
        untrained = np.sort(run.rng.choice(untrained, N_UTILITY_CELLS, replace=False))
    return untrained.astype(np.int64)


class HeldOutUtility:
    """The run's held-out cells and the neg. ELBO of its model on them before unlearning.

    Built once per run, before the method touches the weights: ``unlearn()`` records the change
    in every provenance and ``method="auto"`` gates its attempts on it.

    Parameters
    ----------
    run
        The unlearning run; its model still holds the trained weights.
    """

    def __init__(self, run: UnlearningRun):
        cells = utility_cells(run)
        self.n_cells = int(cells.size)
        self.tensors = gather_tensors(run.model, cells) if self.n_cells else None
        #: Mean neg. ELBO of the trained model (``None`` without held-out cells).
        self.reference = None if self.tensors is None else self.of(run.model.module)

    def of(self, module: torch.nn.Module) -> float:
        """Mean neg. ELBO of ``module`` on the held-out cells."""
        if self.tensors is None:
            raise ValueError("There are no held-out cells: every cell is a training cell.")
        return mean_neg_elbo(module, self.tensors)
