"""The one verdict rule of every audit: reference band, detectable AUC, and the verdict.

:class:`~scvi_unlearn.AuditReport`, the plots, ``unlearn(audit=True)`` and the benchmarks all
call these functions, so a published verdict and ``report.verdict`` can never disagree
(:ref:`methods-verdict`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import norm
from scipy.stats import t as t_dist

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
#: The paired verdict needs this many reference models to estimate their spread; fewer are
#: refused by the audit (with none, the OUT shadow models supply a pooled interval instead).
MIN_REFERENCE_MODELS = 3


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
    n_references: int = 0,
    reference_sd: float | None = None,
) -> float:
    """The smallest AUC an audit of this size would call a leak with probability ``power``.

    Against a fixed value (``n_references=0``: chance, or the top of the OUT shadows' pooled
    interval), it solves ``a - z(1 - alpha/2) * SE0 - z(power) * SE(a) = reference`` for ``a``,
    with ``SE0`` the AUC's standard error under no membership signal (:func:`auc_null_se`) and
    ``SE(a)`` Hanley & McNeil's at ``a`` (:func:`auc_se`): the usual sample-size formula for
    comparing an AUC with a fixed value (Obuchowski 1998).

    Against ``n_references`` (at least :data:`MIN_REFERENCE_MODELS`) reference models scored on
    the same cells (the paired rule of :func:`reference_band`), ``reference`` is their mean AUC
    and the answer is ``reference + SD sqrt(1 + 1/K) (t(K - 1; 1 - alpha/2) + z(power))``: the
    audited model's AUC varies around its expectation by the models' spread ``SD``, which the
    band must clear. ``reference_sd`` is that spread; without it the worst case is used, models
    whose scores on the cells are uncorrelated (``SD = SE0``). Returns ``inf`` when no AUC up to
    1 is detectable.

    Examples
    --------
    >>> round(detectable_auc(60, 60), 3)
    0.646
    >>> round(detectable_auc(60, 60, n_references=8), 3)  # 8 retrains, worst-case spread
    0.68
    >>> detectable_auc(5, 5) > 0.75  # pbmc3k's Platelets cannot show a leak
    True
    """
    n1, n2 = _check_sizes(n_members, n_nonmembers)
    z_alpha, z_power = norm.ppf(1 - alpha / 2), norm.ppf(power)
    se0 = auc_null_se(n1, n2)
    if n_references:
        k = _check_references(n_references)
        sd = se0 if reference_sd is None else max(float(reference_sd), 1.0 / (n1 * n2))
        found = reference + sd * np.sqrt(1 + 1 / k) * (t_dist.ppf(1 - alpha / 2, k - 1) + z_power)
        return float(found) if found <= 1.0 else float("inf")

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
    level: float = 1 - ALPHA,
    pooled_interval: tuple[float, float] | None = None,
    min_sd: float = 0.0,
) -> tuple[float, float]:
    """The AUCs one more model that never trained on the audited cells may have.

    The paired rule, for :data:`MIN_REFERENCE_MODELS` or more reference models (e.g. retrain
    seeds) scored on the *same* cells as the audited model: ``mean +- t(K - 1; (1 + level)/2)
    * SD * sqrt(1 + 1/K)`` of their ``K`` AUCs, the prediction interval of one more model
    exchangeable with them (Student's t, as the mean and SD are estimated from ``K`` models).
    The cells' sampling error is shared by every model scored on them, so it is in neither the
    spread nor the band: what the band measures is how much models differ on these cells. The
    audited model's point AUC is compared with it (:func:`judge`); ``min_sd`` floors the SD
    (the audit uses the AUC's resolution, ``1 / (n1 n2)``) so that tied references do not give
    a band of width zero.

    With fewer models, ``pooled_interval`` (the pooled AUC's bootstrap interval of the OUT
    shadow models, :func:`~scvi_unlearn.audit.pooled_reference_interval`) is the band. Clipped to
    [0, 1]; ``(nan, nan)`` if there is nothing.

    Raises
    ------
    ValueError
        One or two reference AUCs and no pooled interval: two models cannot estimate a spread.

    Examples
    --------
    >>> [round(v, 3) for v in reference_band([0.5, 0.52, 0.48])]  # t(2) = 4.30: few models
    [0.401, 0.599]
    >>> reference_band([], pooled_interval=(0.45, 0.56))
    (0.45, 0.56)
    """
    a = np.asarray(list(aucs), dtype=float)
    a = a[np.isfinite(a)]
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    if a.size < MIN_REFERENCE_MODELS:
        if pooled_interval is not None:
            low, high = (float(v) for v in pooled_interval)
            return (round(max(low, 0.0), 12), round(min(high, 1.0), 12))
        if a.size == 0:
            return (float("nan"), float("nan"))
        _check_references(a.size)
    k = a.size
    sd = max(float(np.std(a, ddof=1)), float(min_sd))
    half = float(t_dist.ppf(0.5 + level / 2, k - 1) * sd * np.sqrt(1 + 1 / k))
    low, high = float(a.mean()) - half, float(a.mean()) + half
    return (round(max(low, 0.0), 12), round(min(high, 1.0), 12))


def paired_verdict(
    auc: float,
    reference_aucs: Sequence[float],
    n_members: int,
    n_nonmembers: int,
    n_attacks: int = 1,
) -> tuple[str, str, tuple[float, float], tuple[float, float], float]:
    """Judge an AUC against reference models scored on the same cells (the paired rule).

    Returns ``(verdict, family_verdict, band, family_band, detectable)``: the verdict of the
    attack alone (band at 95%), the one combined into the overall verdict (band at
    :func:`family_level` of ``n_attacks``), both bands, and the detectable AUC
    (:func:`detectable_auc` with the references' own spread).

    Examples
    --------
    >>> paired_verdict(0.66, [0.5, 0.52, 0.48, 0.51, 0.49, 0.5, 0.53, 0.47], 60, 60)[0]
    'leak'
    """
    n1, n2 = _check_sizes(n_members, n_nonmembers)
    refs = np.asarray(list(reference_aucs), dtype=float)
    refs = refs[np.isfinite(refs)]
    k = _check_references(refs.size)
    resolution = 1.0 / (n1 * n2)
    band = reference_band(refs, min_sd=resolution)
    family_band = reference_band(refs, level=family_level(n_attacks), min_sd=resolution)
    sd = max(float(np.std(refs, ddof=1)), resolution)
    detectable = detectable_auc(
        n1, n2, reference=float(refs.mean()), n_references=k, reference_sd=sd
    )
    point = (float(auc), float(auc))
    return (
        judge(point, band, detectable),
        judge(point, family_band, detectable),
        band,
        family_band,
        detectable,
    )


def sampling_band(
    aucs: Sequence[float], auc_cis: Sequence[tuple[float, float]]
) -> tuple[float, float]:
    """The earlier band rule, kept to compare the rules on the same audits.

    ``mean +- 2 sqrt(SD^2 + mean SE^2)`` of the reference AUCs, SE from each 95% CI, against
    which the audited AUC's *CI* was judged. On reference models scored on the same cells the
    cells' sampling error enters the SD, the SE and the audited CI alike; the calibration
    benchmark measures what that costs (:ref:`methods-verdict`).
    """
    a = np.asarray(list(aucs), dtype=float)
    cis = np.asarray(list(auc_cis), dtype=float).reshape(-1, 2)
    se = (cis[:, 1] - cis[:, 0]) / (2 * norm.ppf(0.975))
    spread = float(np.var(a, ddof=1)) if a.size > 1 else 0.0
    half = 2.0 * float(np.sqrt(spread + float(np.mean(se**2))))
    return (max(float(a.mean()) - half, 0.0), min(float(a.mean()) + half, 1.0))


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

    Without a band (NaN) the comparison is with chance, 0.5. Against reference models'
    prediction band (the paired rule) pass the point AUC as ``(auc, auc)``: its sampling error
    is already in the band (:func:`paired_verdict`).

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


def _check_references(n_references) -> int:
    k = int(n_references)
    if k < MIN_REFERENCE_MODELS:
        raise ValueError(
            f"The verdict against reference models needs at least {MIN_REFERENCE_MODELS} of them "
            f"(e.g. retrain seeds) to measure how much models differ; got {k}. Train more "
            "retrain seeds, or pass none to judge against the OUT shadow models."
        )
    return k


def _check_sizes(n_members, n_nonmembers) -> tuple[int, int]:
    n1, n2 = int(n_members), int(n_nonmembers)
    if n1 < 1 or n2 < 1:
        raise ValueError(f"An AUC needs members and non-members, got {n1} and {n2}.")
    return n1, n2
