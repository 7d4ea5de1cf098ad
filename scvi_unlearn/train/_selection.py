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
    """Keep the trained state whose validation attack AUC is closest to a target.

    A state is admissible when its retain-validation negative ELBO is not worse than the warm
    start's by more than ``max_utility_loss`` (a fraction). Among admissible epochs the one
    with the smallest ``|AUC - target_auc|`` wins (ties: the lower retain ELBO). The warm
    start (epoch ``-1``) is recorded as the reference but is never a candidate: an unlearning
    method must not hand back the weights it started from. If no epoch is admissible, the
    least damaging one (lowest retain ELBO) is kept and :attr:`utility_budget_met` is False.

    With ``select=False`` (too few validation cells to judge, see
    :data:`~scvi_unlearn.train.MIN_SELECTION_CELLS`) nothing is selected: the final state of
    the fixed budget is kept, and the records are only logged.

    Parameters
    ----------
    target_auc
        The loss-threshold AUC to aim for: 0.5, or the centre of the retrain models' band.
    max_utility_loss
        Largest tolerated relative increase of the retain-validation negative ELBO.
    patience
        Stop when this many epochs pass without a new best (``None``: never stop early).
    select
        Whether to select a state at all (False: keep the last one).

    Examples
    --------
    >>> import torch
    >>> sel = BestStateSelector(target_auc=0.5, max_utility_loss=0.05)
    >>> m = torch.nn.Linear(1, 1)
    >>> sel.update(m, -1, auc=0.5, retain_elbo=100.0)  # the warm start is only a reference
    False
    >>> sel.update(m, 0, auc=0.6, retain_elbo=104.0), sel.best_epoch
    (False, 0)
    >>> sel.update(m, 1, auc=0.5, retain_elbo=120.0), sel.best_epoch  # too costly
    (False, 0)
    """

    def __init__(
        self,
        target_auc: float = 0.5,
        max_utility_loss: float = 0.05,
        patience: int | None = None,
        select: bool = True,
    ):
        self.target_auc = float(target_auc)
        self.max_utility_loss = float(max_utility_loss)
        self.patience = patience
        self.select = bool(select)
        self.records: list[EpochRecord] = []
        self.reference_elbo: float | None = None
        self.best_epoch: int | None = None
        self._best_key: tuple[float, float] | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._fallback_epoch: int | None = None
        self._fallback_elbo = math.inf
        self._fallback_state: dict[str, torch.Tensor] | None = None

    def _admissible(self, retain_elbo: float | None) -> bool:
        if retain_elbo is None or self.reference_elbo is None:
            return True
        return retain_elbo <= self.reference_elbo + self.max_utility_loss * abs(
            self.reference_elbo
        )

    @property
    def utility_budget_met(self) -> bool | None:
        """Whether the kept state is admissible (``None``: no epoch yet, or no selection)."""
        if not self.select or (self.best_epoch is None and self._fallback_epoch is None):
            return None
        return self.best_epoch is not None

    def update(
        self, module: torch.nn.Module, epoch: int, auc: float, retain_elbo: float | None
    ) -> bool:
        """Record an epoch (``-1``: the warm start); return whether training should stop."""
        if epoch < 0:
            self.reference_elbo = retain_elbo
        admissible = self._admissible(retain_elbo) and math.isfinite(auc)
        self.records.append(EpochRecord(int(epoch), float(auc), retain_elbo, admissible))
        if epoch < 0 or not self.select:
            return False
        key = (abs(auc - self.target_auc), retain_elbo if retain_elbo is not None else 0.0)
        if admissible and (self._best_key is None or key < self._best_key):
            self._best_key = key
            self.best_epoch = int(epoch)
            self._best_state = state_copy(module)
        elbo = math.inf if retain_elbo is None else retain_elbo
        if self.best_epoch is None and (
            self._fallback_epoch is None or elbo < self._fallback_elbo
        ):
            self._fallback_epoch, self._fallback_elbo = int(epoch), elbo
            self._fallback_state = state_copy(module)
        if self.patience is None or self.best_epoch is None:
            return False
        return epoch - self.best_epoch >= self.patience

    def restore(self, module: torch.nn.Module) -> None:
        """Load the kept state into ``module`` (the final state stays without selection)."""
        if not self.select:
            return
        state = self._best_state if self._best_state is not None else self._fallback_state
        if state is not None:
            module.load_state_dict(state)

    @property
    def kept_epoch(self) -> int | None:
        """The epoch whose state :meth:`restore` loads (``None``: the final state)."""
        if not self.select:
            return None
        return self.best_epoch if self.best_epoch is not None else self._fallback_epoch

    def summary(self) -> dict:
        """JSON-able record of the selection."""
        kept = self.kept_epoch
        best = next((r for r in self.records if r.epoch == kept), None)
        warm = next((r for r in self.records if r.epoch == -1), None)
        return {
            "target_auc": self.target_auc,
            "max_utility_loss": self.max_utility_loss,
            "selection": "validation" if self.select else "fixed budget (final state)",
            "selected_epoch": kept,
            "utility_budget_met": self.utility_budget_met,
            "val_auc_warm_start": None if warm is None else warm.auc,
            "val_auc_selected": None if best is None else best.auc,
            "retain_val_elbo_warm_start": None if warm is None else warm.retain_elbo,
            "retain_val_elbo_selected": None if best is None else best.retain_elbo,
            "epochs": [asdict(r) for r in self.records],
        }
