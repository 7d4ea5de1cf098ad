"""Whether an unlearning method succeeded on a request, over its seeds: one rule for every table.

Each seed's own outcome comes from the audit (:func:`~scvi_unlearn.audit.overall_result`: the
forget cells' LiRA AUC against the retrain band) or, for a table without one, from the caller;
this module only combines them with the cost and the utility, the same way everywhere.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

#: The method row of a request passes when this share of its seeds pass (2 of 3).
SEED_SHARE = Fraction(2, 3)
#: Largest held-out neg. ELBO increase against the mean retrain that still counts as success.
SUCCESS_UTILITY_MARGIN = 0.05

SUCCESS = "SUCCESS"
FAIL = "fail"
RELEARNED = "fail: comes back after relearning"
NOT_POWERED = "underpowered"
#: The labels :func:`unlearning_success` returns.
SUCCESS_LABELS = (SUCCESS, FAIL, RELEARNED, NOT_POWERED)


def most_seeds(k: int, n: int) -> bool:
    """Whether ``k`` of ``n`` seeds reach :data:`SEED_SHARE` (3 seeds: 2 or 3)."""
    # integer arithmetic: works on counts and on arrays (or Series) of counts alike
    return k * SEED_SHARE.denominator >= SEED_SHARE.numerator * n


def unlearning_success(
    forgotten: Sequence[bool],
    *,
    time_vs_retrain: float,
    powered: Sequence[bool] | None = None,
    utility_change: Sequence[float] | None = None,
    relearn_leaks: Sequence[bool] | None = None,
    utility_margin: float = SUCCESS_UTILITY_MARGIN,
) -> str:
    """The success label of one method on one request, from its seeds.

    Parameters
    ----------
    forgotten
        Per seed: were the forget cells forgotten (inside the retrain band)?
    time_vs_retrain
        The method's mean time as a share of a full retrain's.
    powered
        Per seed: could the audit have detected a leak? ``None``: not measured.
    utility_change
        Per seed: held-out neg. ELBO against the mean retrain's, minus 1 (``+0.06``: 6% worse).
        ``None``: not measured.
    relearn_leaks
        Per checked seed: did the audit find a leak again after a few epochs of fine-tuning on
        the retained cells? ``None`` (or empty): not checked.
    utility_margin
        Largest mean utility loss that still passes.

    Returns
    -------
    str
        ``"underpowered"`` if any seed's audit lacked power; ``"fail"`` unless most seeds
        (:func:`most_seeds`) forgot the cells, the method is faster than a retrain and (where
        measured) its mean utility loss is within ``utility_margin``; ``"fail: comes back after
        relearning"`` if most checked seeds leak again; else ``"SUCCESS"``.
    """
    forgotten = np.asarray(forgotten, dtype=bool)
    if forgotten.size == 0:
        raise ValueError("unlearning_success needs at least one seed.")
    if powered is not None and not np.all(powered):
        return NOT_POWERED
    utility_ok = utility_change is None or float(np.mean(utility_change)) <= utility_margin
    if not (
        most_seeds(int(forgotten.sum()), forgotten.size) and time_vs_retrain < 1 and utility_ok
    ):
        return FAIL
    leaks = np.asarray([] if relearn_leaks is None else relearn_leaks, dtype=bool)
    if leaks.size and most_seeds(int(leaks.sum()), leaks.size):
        return RELEARNED
    return SUCCESS
