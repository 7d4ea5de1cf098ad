"""Membership-inference attacks on per-cell features (:ref:`methods-attacks`).

All attacks return a score per audited cell, higher = more member-like, and never fit on the
labels they are scored against:

- ``loss``: loss threshold (Yeom et al. 2018), no fitting at all;
- ``lira_online`` / ``lira_offline``: likelihood-ratio attack (Carlini et al. 2022), fitted on
  shadow models only;
- ``rmia``: the relative membership-inference attack (Zarifzadeh et al. 2024), offline: each
  cell's likelihood ratio against the OUT reference models, compared pairwise with population
  cells;
- ``shadow_classifier``: a classifier of shadow IN vs OUT features (Shokri et al. 2017),
  fitted on shadow models only;
- ``cv_classifier``: a classifier fitted against the audited model itself, scored out of fold
  (stratified cross-validation), so no cell is scored by a classifier that saw its label.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ATTACKS: tuple[str, ...] = (
    "loss",
    "lira_online",
    "lira_offline",
    "rmia",
    "shadow_classifier",
    "cv_classifier",
)
SHADOW_ATTACKS = frozenset({"lira_online", "lira_offline", "rmia", "shadow_classifier"})
_LOG_2PI = np.log(2.0 * np.pi)


def loss_scores(loss: np.ndarray) -> np.ndarray:
    """Loss-threshold score: members have lower loss."""
    return -np.asarray(loss, dtype=float)


def _gaussian_logpdf(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    z = (x - mean) / std
    return -0.5 * (z * z + _LOG_2PI) - np.log(std)


#: Per-cell centres of the shadows' losses (:func:`lira_scores`, :func:`rmia_scores`).
CENTRES: tuple[str, ...] = ("mean", "median")
#: Per-cell spreads of the shadows' losses (:func:`lira_scores`).
VARIANCES: tuple[str, ...] = ("pooled", "per_cell", "shrunk")
#: Prior degrees of freedom of ``variance="shrunk"``: the pooled variance weighs as much as
#: this many extra shadows in each cell's (empirical-Bayes, limma-style) variance.
SHRINK_PRIOR_DF = 4.0


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def _masked_centre(values: np.ndarray, mask: np.ndarray, centre: str) -> np.ndarray:
    """Per-cell mean or median over the shadows where ``mask`` (NaN where none)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if centre == "median":
            with warnings.catch_warnings():  # all-NaN columns: cells without such shadows
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmedian(np.where(mask, values, np.nan), axis=0)
        return np.where(mask, values, 0.0).sum(0) / mask.sum(0)


def _masked_moments(values: np.ndarray, mask: np.ndarray, variance: str, centre: str = "mean"):
    """Per-cell centre over shadows where ``mask``, and the spread around it.

    ``variance``: ``"pooled"`` over all cells (TF-Privacy's fixed variance), ``"per_cell"``, or
    ``"shrunk"``: each cell's variance pulled towards the pooled one,
    ``(d_i s_i^2 + d0 s_pooled^2) / (d_i + d0)`` with ``d_i`` its degrees of freedom and
    ``d0 = SHRINK_PRIOR_DF`` (Smyth 2004's moderated variance, with a fixed prior).
    """
    _check_choice("variance", variance, VARIANCES)
    _check_choice("centre", centre, CENTRES)
    count = mask.sum(0)
    centre_values = _masked_centre(values, mask, centre)
    with np.errstate(invalid="ignore", divide="ignore"):
        resid = np.where(mask, values - centre_values, 0.0)
        df = np.maximum(count - 1, 0)
        # Over every (shadow, cell) value, as TF-Privacy and the package always have.
        pooled = (resid**2).sum() / max(int(count.sum()) - 1, 1)
        cell = (resid**2).sum(0) / np.maximum(df, 1)
        if variance == "pooled":
            var = np.full(values.shape[1], pooled)
        elif variance == "per_cell":
            var = cell
        else:
            var = (df * cell + SHRINK_PRIOR_DF * pooled) / (df + SHRINK_PRIOR_DF)
    return centre_values, np.maximum(np.sqrt(var), 1e-8), count


def lira_scores(
    target_loss: np.ndarray,
    shadow_loss: np.ndarray,
    in_mask: np.ndarray,
    online: bool = True,
    variance: str = "pooled",
    centre: str = "mean",
) -> np.ndarray:
    """Likelihood-ratio attack scores (Carlini et al. 2022).

    Parameters
    ----------
    target_loss
        ``(n_cells,)`` loss of each audited cell under the audited model.
    shadow_loss
        ``(n_shadows, n_cells)`` the same loss under each shadow model.
    in_mask
        ``(n_shadows, n_cells)`` whether each shadow trained on each cell.
    online
        Online: log N(loss; IN) - log N(loss; OUT) per cell. Offline: how far below the cell's
        OUT distribution the loss lies, in OUT standard deviations (only OUT shadows needed).
    variance
        ``"pooled"``: one variance over all cells (the fixed-variance variant of TF-Privacy's
        LiRA, which Carlini et al. recommend with few shadows); ``"per_cell"``; ``"shrunk"``:
        per-cell variances pulled towards the pooled one (a prior worth 4 shadows).
    centre
        ``"mean"`` or ``"median"`` of each cell's IN and OUT losses (the median is robust to
        one odd shadow among few).

    Returns
    -------
    ``(n_cells,)`` scores, higher = more member-like; NaN where a cell lacks the shadows the
    variant needs (no OUT shadow; for online also no IN shadow).

    Examples
    --------
    >>> shadow = np.array([[1.0, 2.0], [3.0, 4.0], [1.2, 2.2], [2.8, 3.8]])
    >>> inside = np.array([[True, True], [False, False], [True, True], [False, False]])
    >>> s = lira_scores(np.array([1.1, 3.9]), shadow, inside)
    >>> bool(s[0] > 0 > s[1])
    True
    """
    x = np.asarray(target_loss, dtype=float)
    values = np.asarray(shadow_loss, dtype=float)
    in_mask = np.asarray(in_mask, dtype=bool)
    mu_out, sd_out, n_out = _masked_moments(values, ~in_mask, variance, centre)
    if not online:
        score = (mu_out - x) / sd_out
        return np.where(n_out > 0, score, np.nan)
    mu_in, sd_in, n_in = _masked_moments(values, in_mask, variance, centre)
    score = _gaussian_logpdf(x, mu_in, sd_in) - _gaussian_logpdf(x, mu_out, sd_out)
    return np.where((n_in > 0) & (n_out > 0), score, np.nan)


def rmia_scores(
    target_loss: np.ndarray,
    shadow_loss: np.ndarray,
    in_mask: np.ndarray,
    population: np.ndarray,
    gamma: float = 1.0,
    online: bool = False,
    centre: str = "mean",
) -> np.ndarray:
    """Relative membership-inference scores (RMIA; Zarifzadeh et al., ICML 2024).

    With ``log Pr(x | model) = -loss(x)`` (the per-cell negative ELBO), each cell's likelihood
    ratio is ``LR(x) = Pr(x | target) / Pr(x)``, where ``Pr(x)`` is the mean of
    ``Pr(x | reference)`` over the reference (shadow) models that did not train on ``x``
    (offline) or over all of them (online). The score of ``x`` is the fraction of population
    cells ``z`` with ``LR(x) / LR(z) > gamma``: how much more ``x`` gains from the target than
    typical non-members do. A population cell is never compared with itself (leave-one-out:
    its score is over the other population cells). Compared with itself it could never pass
    (``LR(x) / LR(x) = 1``, not above ``gamma = 1``), so every non-member would lose a pair that
    no member loses, inflating the AUC by about ``0.5 / n_population``.

    The paper's offline form ``Pr(x) = ((1 + a) Pr_OUT(x) + 1 - a) / 2`` is taken with
    ``a = 1``, i.e. ``Pr(x) = Pr_OUT(x)``. Here ``Pr(x | model) = exp(-loss)`` is a likelihood
    of a whole count vector, many orders of magnitude below 1, so the constant ``(1 - a) / 2``
    would swamp it for any ``a < 1``; measured on the package's audits, the AUC rises from about
    0.57 at ``a = 0`` to 0.905 at ``a = 1``. Means of likelihoods are computed in log space
    (``logsumexp``), since per-cell likelihoods are far below floating-point range.

    Parameters
    ----------
    target_loss
        ``(n_cells,)`` loss of each cell under the audited model.
    shadow_loss
        ``(n_shadows, n_cells)`` the same loss under each reference model.
    in_mask
        ``(n_shadows, n_cells)`` whether each reference model trained on each cell.
    population
        Boolean mask (``n_cells``) or positions of the population cells ``z``: cells known not
        to be the target's training cells (the audit uses its non-members).
    gamma
        Threshold on the pairwise ratio; 1 in the paper's offline setting.
    online
        Average over all reference models instead of the OUT ones only.
    centre
        ``"mean"``: ``Pr(x)`` is the mean likelihood over the reference models (the paper's);
        ``"median"``: their median log-likelihood (robust to one odd model among few).

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` scores in [0, 1], higher = more member-like; NaN where a cell has no OUT
        reference model, or where no other population cell has one.

    Examples
    --------
    >>> shadow = np.array([[3.0, 3.0, 3.0, 3.0], [3.1, 2.9, 3.0, 3.0]])
    >>> inside = np.zeros((2, 4), bool)
    >>> s = rmia_scores(np.array([1.0, 3.0, 3.1, 2.9]), shadow, inside, np.array([2, 3]))
    >>> s.tolist()
    [1.0, 0.5, 0.0, 1.0]
    """
    x = -np.asarray(target_loss, dtype=float)
    values = -np.asarray(shadow_loss, dtype=float)
    use = np.ones_like(in_mask, dtype=bool) if online else ~np.asarray(in_mask, dtype=bool)
    count = use.sum(0)
    _check_choice("centre", centre, CENTRES)
    if centre == "median":
        log_px = _masked_centre(values, use, "median")
    else:
        with np.errstate(divide="ignore"):
            log_px = logsumexp(values, axis=0, b=use.astype(float)) - np.log(np.maximum(count, 1))
    log_lr = np.where(count > 0, x - log_px, np.nan)
    in_population = np.zeros(x.shape, bool)
    in_population[np.asarray(population)] = True
    in_population &= np.isfinite(log_lr)
    pop_lr = np.sort(log_lr[in_population])
    if pop_lr.size == 0:
        return np.full(x.shape, np.nan)
    # Fraction of z with log LR(x) - log LR(z) > log gamma, via a sorted search (no n x m).
    above = np.searchsorted(pop_lr, log_lr - np.log(gamma), side="left").astype(float)
    n = np.full(x.shape, float(pop_lr.size))
    # Leave-one-out for the population cells: drop the self-pair from both counts.
    above[in_population] -= float(np.log(gamma) < 0)  # the self-pair passes only if gamma < 1
    n[in_population] -= 1
    with np.errstate(invalid="ignore", divide="ignore"):
        score = above / n
    return np.where(np.isfinite(log_lr) & (n > 0), score, np.nan)


def fit_shadow_classifier(
    shadow_features: np.ndarray,
    in_mask: np.ndarray,
    max_rows: int = 100_000,
    seed: int = 0,
):
    """Fit a logistic-regression attacker on shadow features (IN = 1, OUT = 0).

    Parameters
    ----------
    shadow_features
        ``(n_shadows, n_cells, n_features)``.
    in_mask
        ``(n_shadows, n_cells)``.
    max_rows
        Subsample at most this many (shadow, cell) rows, balanced by construction of the shadows.
    """
    x = shadow_features.reshape(-1, shadow_features.shape[-1])
    y = np.asarray(in_mask, dtype=int).reshape(-1)
    if x.shape[0] > max_rows:
        keep = np.random.default_rng(seed).choice(x.shape[0], size=max_rows, replace=False)
        x, y = x[keep], y[keep]
    if np.unique(y).size < 2:
        raise ValueError("Shadow models give only one class (all IN or all OUT); add shadows.")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    return clf.fit(x, y)


def cv_classifier_scores(
    member_features: np.ndarray,
    nonmember_features: np.ndarray,
    n_splits: int = 5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold scores of a classifier fitted on the audited model's own features.

    Returns member and non-member scores; each cell is scored by a classifier fitted on the
    other folds only. Raises if a class has fewer than 2 cells.
    """
    n_m, n_n = len(member_features), len(nonmember_features)
    n_splits = min(n_splits, n_m, n_n)
    if n_splits < 2:
        raise ValueError("cv_classifier needs at least 2 members and 2 non-members.")
    x = np.vstack([member_features, nonmember_features])
    y = np.r_[np.ones(n_m, int), np.zeros(n_n, int)]
    scores = np.empty(len(y))
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fit_idx, test_idx in folds.split(x, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        clf.fit(x[fit_idx], y[fit_idx])
        scores[test_idx] = clf.decision_function(x[test_idx])
    return scores[:n_m], scores[n_m:]
