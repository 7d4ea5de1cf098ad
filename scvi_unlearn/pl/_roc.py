"""ROC curves of an audit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
from sklearn.metrics import roc_curve

from scvi_unlearn.pl._utils import finish, new_axes, resolve_show

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from matplotlib.axes import Axes


# What the plot reads of an audit report, so that ``pl`` (below ``audit`` in the layers) needs
# no import of it: :class:`~scvi_unlearn.AuditReport` and its attack results have these.
class _AttackScores(Protocol):
    member_scores: np.ndarray
    nonmember_scores: np.ndarray
    auc: float


class _ScoredReport(Protocol):
    results: Mapping[str, _AttackScores]
    verdict: str


def roc_curves(
    report: _ScoredReport,
    *,
    attacks: Sequence[str] | None = None,
    log_scale: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    title: str | None = None,
) -> Axes:
    """Plot the ROC curve of each attack in an :class:`~scvi_unlearn.AuditReport`.

    Parameters
    ----------
    report
        The audit report.
    attacks
        Attacks to draw; all by default.
    log_scale
        Log-log axes, which show the low-FPR regime where confident leaks live (Carlini et al.).
        No curve is drawn below FPR ``1 / n_nonmembers``, which its non-members cannot measure,
        and the axis starts at the smallest such FPR.
    ax
        Matplotlib axes to draw on; a new figure if None.
    show
        Show the figure (default: only when no ``ax`` was given).
    title
        Axes title; defaults to the report's verdict.

    Returns
    -------
    The matplotlib axes: one line per attack, then the dashed chance diagonal. Save the figure
    with ``ax.figure.savefig(path)``.
    """
    ax, owns = new_axes(ax, figsize=(4.5, 4.2))
    floors = []
    for name, r in report.results.items():
        if attacks is not None and name not in attacks:
            continue
        y = np.r_[np.ones(len(r.member_scores)), np.zeros(len(r.nonmember_scores))]
        fpr, tpr, _ = roc_curve(y, np.r_[r.member_scores, r.nonmember_scores])
        # n non-members cannot measure an FPR below 1 / n: the curve is not drawn there.
        floor = 1.0 / max(len(r.nonmember_scores), 1)
        floors.append(floor)
        keep = fpr >= floor - 1e-12
        ax.plot(fpr[keep], tpr[keep], lw=1.5, label=f"{name} (AUC {r.auc:.2f})")
    low = min(floors, default=1e-3) if log_scale else 0.0
    ax.plot((low, 1), (low, 1), ls="--", c="grey", lw=1, label="chance")
    # A little room above TPR = 1 so that a perfect attack's curve is not hidden by the frame.
    if log_scale:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(low, 1.15)
        ax.set_ylim(1e-3, 1.15)
    else:
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title if title is not None else f"Membership audit: {report.verdict}")
    ax.legend(fontsize=7, loc="lower right")
    return finish(ax, show=resolve_show(show, owns))
