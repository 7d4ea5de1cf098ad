"""Attack metrics with stratified bootstrap confidence intervals (vectorised)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc_from_scores(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> np.ndarray:
    """ROC AUC (Mann-Whitney) of member vs non-member scores, batched over leading axes.

    Higher scores mean "more member-like". Ties count one half.

    Examples
    --------
    >>> float(auc_from_scores(np.array([3.0, 4.0]), np.array([1.0, 2.0])))
    1.0
    >>> float(auc_from_scores(np.array([1.0]), np.array([1.0])))
    0.5
    """
    m = np.asarray(member_scores, dtype=float)
    n = np.asarray(nonmember_scores, dtype=float)
    n_m, n_n = m.shape[-1], n.shape[-1]
    ranks = rankdata(np.concatenate([m, n], axis=-1), axis=-1)
    rank_sum = ranks[..., :n_m].sum(-1)
    return (rank_sum - n_m * (n_m + 1) / 2.0) / (n_m * n_n)


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> np.ndarray:
    """True-positive rate at a false-positive rate, batched over leading axes.

    The threshold is the smallest score that flags at most ``fpr`` of the non-members; with
    fewer than ``1 / fpr`` non-members this means flagging none of them (a strict threshold).

    Examples
    --------
    >>> float(tpr_at_fpr(np.array([5.0, 6.0, 0.0]), np.arange(5.0), 0.01))
    0.6666666666666666
    """
    m = np.asarray(member_scores, dtype=float)
    n = np.sort(np.asarray(nonmember_scores, dtype=float), axis=-1)
    n_n = n.shape[-1]
    allowed = int(np.floor(fpr * n_n))  # non-members we may flag
    threshold = n[..., n_n - 1 - allowed] if allowed < n_n else n[..., 0] - np.inf
    return (m > threshold[..., None]).mean(-1)


def bootstrap_metrics(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    n_bootstrap: int = 1000,
    seed: int = 0,
    fprs: tuple[float, ...] = (0.01, 0.001),
) -> dict[str, np.ndarray]:
    """Bootstrap replicates of AUC and TPR at given FPRs.

    Members and non-members are resampled separately, so every replicate keeps both classes.

    Returns
    -------
    Dict with ``"auc"`` and ``"tpr@{fpr}"`` arrays of length ``n_bootstrap``.
    """
    rng = np.random.default_rng(seed)
    m = np.asarray(member_scores, dtype=float)
    n = np.asarray(nonmember_scores, dtype=float)
    mb = m[rng.integers(0, m.size, size=(n_bootstrap, m.size))]
    nb = n[rng.integers(0, n.size, size=(n_bootstrap, n.size))]
    out = {"auc": auc_from_scores(mb, nb)}
    for fpr in fprs:
        out[f"tpr@{fpr:g}"] = tpr_at_fpr(mb, nb, fpr)
    return out


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Two-sided percentile interval."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def pooled_reference_interval(
    member_scores: list[np.ndarray],
    nonmember_scores: list[np.ndarray],
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Pooled AUC over several reference models, with a bootstrap interval.

    Each reference model contributes the AUC of its own members vs non-members (scores from
    different models are never compared with each other), weighted by its number of pairs;
    cells are resampled within each model. Pooling many small reference contrasts gives a far
    steadier null than the spread of their individual AUCs.

    Returns
    -------
    ``(pooled_auc, low, high)``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ms = [rng.normal(size=20) for _ in range(8)]
    >>> ns = [rng.normal(size=20) for _ in range(8)]
    >>> auc, low, high = pooled_reference_interval(ms, ns, n_bootstrap=200)
    >>> bool(low < 0.5 < high) and bool(high - low < 0.2)
    True
    """
    rng = np.random.default_rng(seed)
    weights = np.array([m.size * n.size for m, n in zip(member_scores, nonmember_scores)], float)
    point = np.array([auc_from_scores(m, n) for m, n in zip(member_scores, nonmember_scores)])
    boots = np.empty((len(weights), n_bootstrap))
    for j, (m, n) in enumerate(zip(member_scores, nonmember_scores)):
        mb = m[rng.integers(0, m.size, size=(n_bootstrap, m.size))]
        nb = n[rng.integers(0, n.size, size=(n_bootstrap, n.size))]
        boots[j] = auc_from_scores(mb, nb)
    pooled = weights @ boots / weights.sum()
    low, high = percentile_ci(pooled, level)
    return float(weights @ point / weights.sum()), low, high
