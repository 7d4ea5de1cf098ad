"""``drop_donors`` and ``refit_donors``: exact removals that act on a deletion-ready design.

They change which donors' columns a deletion-ready model holds rather than training its
weights on an :class:`~scvi_unlearn.train.UnlearningRun`, so ``unlearn()`` hands them the model
and the request (:meth:`DonorRemoval.remove`). They are registered like every other method, so
the method listings name them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scvi_unlearn.model._deletion_ready import (
    check_donor_request,
    check_refit_request,
    drop_donors,
    is_deletion_ready,
    partial_donors,
    refit_donors,
    whole_donors,
)
from scvi_unlearn.train import FixedEpochs, UnlearningMethod, register_method

if TYPE_CHECKING:
    import numpy as np


class DonorRemoval(UnlearningMethod):
    """An exact removal on a deletion-ready model's donor columns."""

    exact = True
    needs_deletion_ready = True
    epochs = FixedEpochs(0)

    def donors(self, model, forget: np.ndarray, train: np.ndarray) -> list[str]:
        """The donors of the request, or an error saying what to do instead."""
        raise NotImplementedError

    def remove(self, model, forget: np.ndarray, donors: list[str], accelerator, devices,
               progress_bar: bool) -> tuple[Any, list[str], list[str]]:  # fmt: skip
        """(new model, donors refitted, donors dropped)."""
        raise NotImplementedError

    def run(self, run) -> dict[str, Any]:
        """Not a weights update: ``unlearn()`` calls :meth:`remove`."""
        raise TypeError(f"'{self.name}' acts on a deletion-ready design, not on a training run.")


@register_method
class DropDonors(DonorRemoval):
    """Drop whole withdrawable donors: their own columns and every cell of theirs."""

    name = "drop_donors"
    description = (
        "no training: whole withdrawable donors of a deletion-ready model dropped "
        "with their own covariate columns"
    )

    def donors(self, model, forget, train) -> list[str]:
        """The whole withdrawable donors ``forget`` is."""
        return check_donor_request(model, forget, train)

    def remove(self, model, forget, donors, accelerator, devices, progress_bar):
        """The model without the donors' columns and cells."""
        return drop_donors(model, donors), [], list(donors)


@register_method
class RefitDonors(DonorRemoval):
    """Fit each withdrawable donor the request touches again, alone, on its other cells."""

    name = "refit_donors"
    description = (
        "each withdrawable donor the request touches fitted again alone on its other cells"
    )

    def donors(self, model, forget, train) -> list[str]:
        """The withdrawable donors ``forget`` touches."""
        return check_refit_request(model, forget)

    def remove(self, model, forget, donors, accelerator, devices, progress_bar):
        """The model with the touched donors refitted (whole ones dropped)."""
        return refit_donors(model, forget, accelerator, devices, progress_bar)


def default_donor_removal(model, forget: np.ndarray, train: np.ndarray) -> str | None:
    """The removal ``unlearn(method=None)`` picks on a deletion-ready model, or ``None``.

    Whole withdrawable donors: ``drop_donors``; cells of withdrawable donors only:
    ``refit_donors``; any cell of a permanent donor (or a model that is not deletion-ready):
    ``None`` (an ordinary method runs).
    """
    if not is_deletion_ready(model):
        return None
    if whole_donors(model, forget, train) is not None:
        return "drop_donors"
    if partial_donors(model, forget) is not None:
        return "refit_donors"
    return None
