"""Early stopping on a validation split of forget / non-member cells, keeping the best state."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from scvi_unlearn.train._common import state_copy

if TYPE_CHECKING:
    import torch


@dataclass
class EpochRecord:
    """Validation numbers of one epoch (epoch ``-1`` is the warm start)."""

    epoch: int
    auc: float
    retain_elbo: float | None
    admissible: bool


class BestStateSelector:
    """Keep the module state whose validation attack AUC is closest to a target.

    A state is admissible when its retain-validation negative ELBO is not worse than the warm
    start's by more than ``max_utility_loss`` (a fraction). Among admissible states the one
    with the smallest ``|AUC - target_auc|`` wins (ties: the lower retain ELBO). The warm
    start is a candidate too, so the selected model is never worse than doing nothing on
    the validation cells; :attr:`best_epoch` ``== -1`` then says that no epoch helped.

    Parameters
    ----------
    target_auc
        The loss-threshold AUC to aim for: 0.5, or the centre of the retrain models' band.
    max_utility_loss
        Largest tolerated relative increase of the retain-validation negative ELBO.
    patience
        Stop when this many epochs pass without a new best (``None``: never stop early).

    Examples
    --------
    >>> import torch
    >>> sel = BestStateSelector(target_auc=0.5, max_utility_loss=0.05)
    >>> m = torch.nn.Linear(1, 1)
    >>> sel.update(m, -1, auc=0.9, retain_elbo=100.0)
    False
    >>> sel.update(m, 0, auc=0.6, retain_elbo=104.0), sel.best_epoch
    (False, 0)
    >>> sel.update(m, 1, auc=0.5, retain_elbo=120.0), sel.best_epoch  # too costly
    (False, 0)
    """

    def __init__(
        self, target_auc: float = 0.5, max_utility_loss: float = 0.05, patience: int | None = None
    ):
        self.target_auc = float(target_auc)
        self.max_utility_loss = float(max_utility_loss)
        self.patience = patience
        self.records: list[EpochRecord] = []
        self.reference_elbo: float | None = None
        self.best_epoch: int | None = None
        self._best_key: tuple[float, float] | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def _admissible(self, retain_elbo: float | None) -> bool:
        if retain_elbo is None or self.reference_elbo is None:
            return True
        return retain_elbo <= self.reference_elbo + self.max_utility_loss * abs(
            self.reference_elbo
        )

    def update(
        self, module: torch.nn.Module, epoch: int, auc: float, retain_elbo: float | None
    ) -> bool:
        """Record an epoch (``-1``: the warm start); return whether training should stop."""
        if epoch < 0:
            self.reference_elbo = retain_elbo
        admissible = self._admissible(retain_elbo) and math.isfinite(auc)
        self.records.append(EpochRecord(int(epoch), float(auc), retain_elbo, admissible))
        key = (abs(auc - self.target_auc), retain_elbo if retain_elbo is not None else 0.0)
        if admissible and (self._best_key is None or key < self._best_key):
            self._best_key = key
            self.best_epoch = int(epoch)
            self._best_state = state_copy(module)
        if self.patience is None or self.best_epoch is None:
            return False
        return epoch - self.best_epoch >= self.patience

    def restore(self, module: torch.nn.Module) -> None:
        """Load the best state into ``module`` (no-op if nothing was recorded)."""
        if self._best_state is not None:
            module.load_state_dict(self._best_state)

    def summary(self) -> dict:
        """JSON-able record of the selection."""
        best = next((r for r in self.records if r.epoch == self.best_epoch), None)
        warm = next((r for r in self.records if r.epoch == -1), None)
        return {
            "target_auc": self.target_auc,
            "max_utility_loss": self.max_utility_loss,
            "selected_epoch": self.best_epoch,
            "val_auc_warm_start": None if warm is None else warm.auc,
            "val_auc_selected": None if best is None else best.auc,
            "retain_val_elbo_warm_start": None if warm is None else warm.retain_elbo,
            "retain_val_elbo_selected": None if best is None else best.retain_elbo,
            "epochs": [asdict(r) for r in self.records],
        }
