"""The one verdict rule of every audit: reference band, detectable AUC, and the verdict.

:class:`~scvi_unlearn.AuditReport`, the plots, ``unlearn(audit=True)`` and the benchmarks all
call these functions, so a published verdict and ``report.verdict`` can never disagree
(:ref:`methods-verdict`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import norm

if TYPE_CHECKING:
    from collections.abc import Sequence

LEAK = "leak"
NO_EVIDENCE = "no evidence of leak"
BELOW_REFERENCE = "below reference"
UNDERPOWERED = "underpowered"
VERDICTS: tuple[str, ...] = (LEAK, NO_EVIDENCE, BELOW_REFERENCE, UNDERPOWERED)

#: An audit that could not have detected an AUC below this (at its sample sizes, 5% two-sided
#: level, 80% power) answers ``"underpowered"`` instead of ``"no evidence of leak"``.
MAX_DETECTABLE_AUC = 0.75
#: Overall results of an unlearning run: privacy against the band *and* utility against a
#: reference (:func:`overall_result`).
FORGOTTEN = "forgotten"
UTILITY_LOST = "forgotten, utility lost"
NOT_FORGOTTEN = "not forgotten"
OVER_FORGOTTEN = "over-forgotten"
NOT_JUDGED = "not judged (underpowered)"
OVERALL_RESULTS: tuple[str, ...] = (
    FORGOTTEN,
    UTILITY_LOST,
    NOT_FORGOTTEN,
    OVER_FORGOTTEN,
    NOT_JUDGED,
)
#: Largest relative increase of held-out neg. ELBO over the reference that still counts as
#: keeping utility (docs: "Success").
MAX_UTILITY_LOSS = 0.05
#: Level and power of the detectable-AUC calculation.
ALPHA = 0.05
POWER = 0.8
#: Fewer reference models than this give a pooled bootstrap interval, not a mean +- 2 SD band.
MIN_MODELS_FOR_SPREAD = 3


def auc_null_se(n_members: int, n_nonmembers: int) -> float:
    """Standard error of the AUC (Mann-Whitney U / n1 n2) when members are not special.

    ``sqrt((n1 + n2 + 1) / (12 n1 n2))``, exact under the null for untied scores.

    Examples
    --------
    >>> round(auc_null_se(60, 60), 4)
    0.0529
    """
    n1, n2 = _check_sizes(n_members, n_nonmembers)
    return float(np.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2)))


def auc_se(auc: float, n_members: int, n_nonmembers: int) -> float:
    """Hanley & McNeil's (1982) standard error of an AUC of ``auc`` on these sample sizes."""
    n1, n2 = _check_sizes(n_members, n_nonmembers)
    a = float(np.clip(auc, 0.0, 1.0))
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
    return float(np.sqrt(max(var, 0.0)))


def detectable_auc(
    n_members: int,
    n_nonmembers: int,
    reference: float = 0.5,
    alpha: float = ALPHA,
    power: float = POWER,
) -> float:
    """The smallest AUC an audit of this size would call a leak with probability ``power``.

    Solves ``a - z(1 - alpha/2) * SE0 - z(power) * SE(a) = reference`` for ``a``, with ``SE0``
    the AUC's standard error under no membership signal (:func:`auc_null_se`) and ``SE(a)``
    Hanley & McNeil's at ``a`` (:func:`auc_se`): the usual sample-size formula for comparing an
    AUC with a fixed value (Obuchowski 1998). ``reference`` is the top of the reference band
    (0.5 without one). Returns ``inf`` when no AUC up to 1 is detectable.

    Examples
    --------
    >>> round(detectable_auc(60, 60), 3)
    0.646
    >>> detectable_auc(5, 5) > 0.75  # pbmc3k's Platelets cannot show a leak
    True
    """
    n1, n2 = _check_sizes(n_members, n_nonmembers)
    z_alpha, z_power = norm.ppf(1 - alpha / 2), norm.ppf(power)
    se0 = auc_null_se(n1, n2)

    def gap(a: float) -> float:
        return a - z_alpha * se0 - z_power * auc_se(a, n1, n2) - reference

    if gap(1.0) < 0:
        return float("inf")
    low, high = min(max(reference, 0.0), 1.0), 1.0
    for _ in range(60):  # bisection: gap() increases with a on [reference, 1]
        mid = 0.5 * (low + high)
        low, high = (mid, high) if gap(mid) < 0 else (low, mid)
    return float(high)


def reference_band(
    aucs: Sequence[float],
    auc_cis: Sequence[tuple[float, float]] | None = None,
    pooled_interval: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """The AUCs expected from models that never trained on the audited cells.

    With ``MIN_MODELS_FOR_SPREAD`` or more reference models (e.g. retrain seeds):
    ``mean +- 2 * sqrt(SD^2 + mean(SE^2))`` of their AUCs, the SD over models and the SE each
    AUC's sampling error on these cells (from its 95% CI, ``(high - low) / 3.92``; zero when no
    CIs are given). Folding in the SE keeps a band from collapsing to a point when a few models
    tie on a few cells. With fewer models, ``pooled_interval`` (the pooled AUC's bootstrap
    interval, :func:`~scvi_unlearn.audit.pooled_reference_interval`) is the band; without it,
    a single model gives ``AUC +- 2 SE``. Clipped to [0, 1]; ``(nan, nan)`` if there is nothing.

    Examples
    --------
    >>> reference_band([0.5, 0.52, 0.48])
    (0.46, 0.54)
    >>> reference_band([], pooled_interval=(0.45, 0.56))
    (0.45, 0.56)
    """
    a = np.asarray(list(aucs), dtype=float)
    keep = np.isfinite(a)
    se = np.zeros(a.size)
    if auc_cis is not None:
        cis = np.asarray(list(auc_cis), dtype=float).reshape(-1, 2)
        if cis.shape[0] != a.size:
            raise ValueError(f"Got {a.size} AUCs but {cis.shape[0]} confidence intervals.")
        se = (cis[:, 1] - cis[:, 0]) / (2 * norm.ppf(0.975))
        keep &= np.isfinite(se)
    a, se = a[keep], se[keep]
    if a.size < MIN_MODELS_FOR_SPREAD and pooled_interval is not None:
        low, high = (float(v) for v in pooled_interval)
    elif a.size == 0:
        return (float("nan"), float("nan"))
    else:
        spread = float(np.var(a, ddof=1)) if a.size > 1 else 0.0
        half = 2.0 * float(np.sqrt(spread + float(np.mean(se**2))))
        low, high = float(a.mean()) - half, float(a.mean()) + half
    return (round(max(low, 0.0), 12), round(min(high, 1.0), 12))


def judge(
    auc_ci: tuple[float, float],
    band: tuple[float, float],
    detectable: float,
    max_detectable: float = MAX_DETECTABLE_AUC,
) -> str:
    """The verdict of one attack.

    - ``"leak"``: the AUC's CI lies entirely above the band (a leak seen is a leak, however
      small the audit);
    - ``"below reference"``: the CI lies entirely below the band (over-unlearning, itself
      detectable);
    - ``"underpowered"``: otherwise, when the audit could not have detected an AUC below
      ``max_detectable`` (``detectable``, from :func:`detectable_auc`);
    - ``"no evidence of leak"``: otherwise.

    Without a band (NaN) the comparison is with chance, 0.5.

    Examples
    --------
    >>> judge((0.7, 0.9), (0.4, 0.6), detectable=0.65)
    'leak'
    >>> judge((0.45, 0.75), (0.4, 0.6), detectable=0.8)
    'underpowered'
    """
    low, high = band
    if not (np.isfinite(low) and np.isfinite(high)):
        low = high = 0.5
    if auc_ci[0] > high:
        return LEAK
    if auc_ci[1] < low:
        return BELOW_REFERENCE
    if not detectable <= max_detectable:  # NaN / inf count as underpowered
        return UNDERPOWERED
    return NO_EVIDENCE


def family_level(n_attacks: int, alpha: float = ALPHA) -> float:
    """Confidence level of each attack's CI in the overall verdict (Bonferroni).

    The overall verdict says "leak" when *any* attack does; judging each of ``n_attacks`` at
    ``1 - alpha / n_attacks`` keeps the chance of a false leak over all of them at ``alpha``.

    Examples
    --------
    >>> family_level(5)
    0.99
    """
    if n_attacks < 1:
        raise ValueError(f"n_attacks must be >= 1, got {n_attacks}.")
    return 1.0 - alpha / n_attacks


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """One verdict from several attacks' (each judged at the family level).

    Any leak wins; then below reference; then, if every attack is underpowered, underpowered;
    otherwise no evidence of leak.

    Examples
    --------
    >>> combine_verdicts(["no evidence of leak", "leak"])
    'leak'
    >>> combine_verdicts(["underpowered", "no evidence of leak"])
    'no evidence of leak'
    """
    verdicts = list(verdicts)
    unknown = set(verdicts) - set(VERDICTS)
    if unknown:
        raise ValueError(f"Unknown verdicts {sorted(unknown)}; expected some of {VERDICTS}.")
    if not verdicts:
        raise ValueError("No verdicts to combine.")
    for v in (LEAK, BELOW_REFERENCE):
        if v in verdicts:
            return v
    if all(v == UNDERPOWERED for v in verdicts):
        return UNDERPOWERED
    return NO_EVIDENCE


def overall_result(
    privacy_verdict: str,
    utility_loss: float | None,
    max_utility_loss: float = MAX_UTILITY_LOSS,
    exact: bool = False,
) -> str:
    """One result per unlearned model: privacy against the band and utility against retrain.

    Parameters
    ----------
    privacy_verdict
        The audit's verdict (one of :data:`VERDICTS`).
    utility_loss
        Relative change of held-out neg. ELBO against the reference (a retrained model):
        ``neg_elbo / reference - 1``; ``None`` when unknown.
    max_utility_loss
        The largest increase that still keeps utility.
    exact
        The model never saw the forgotten cells (``retrain``, ``retrain_fast``): forgotten by
        construction, whatever its audit's sampling noise says; only utility is in question.

    Returns
    -------
    ``"forgotten"`` (no evidence of a leak, utility kept), ``"forgotten, utility lost"``,
    ``"not forgotten"`` (a leak), ``"over-forgotten"`` (below the reference: detectable as
    unlearned) or ``"not judged (underpowered)"``. A model is a success only when ``"forgotten"``.

    Examples
    --------
    >>> overall_result("no evidence of leak", 0.29)
    'forgotten, utility lost'
    >>> overall_result("no evidence of leak", 0.01)
    'forgotten'
    """
    if privacy_verdict not in VERDICTS:
        raise ValueError(f"Unknown verdict {privacy_verdict!r}; expected one of {VERDICTS}.")
    utility_kept = (
        utility_loss is not None and np.isfinite(utility_loss) and utility_loss <= max_utility_loss
    )
    if exact:
        return FORGOTTEN if utility_kept else UTILITY_LOST
    if privacy_verdict == LEAK:
        return NOT_FORGOTTEN
    if privacy_verdict == BELOW_REFERENCE:
        return OVER_FORGOTTEN
    if privacy_verdict == UNDERPOWERED:
        return NOT_JUDGED
    return FORGOTTEN if utility_kept else UTILITY_LOST


def _check_sizes(n_members, n_nonmembers) -> tuple[int, int]:
    n1, n2 = int(n_members), int(n_nonmembers)
    if n1 < 1 or n2 < 1:
        raise ValueError(f"An AUC needs members and non-members, got {n1} and {n2}.")
    return n1, n2
