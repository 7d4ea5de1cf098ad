"""Group-level (donor-level) membership: was this donor's data in the training set?

Consent is given and withdrawn per donor, so the question a data-protection officer asks is
about a donor, not a cell. Shadows are trained on random halves of the *groups* (whole donors
IN or OUT, :func:`~scvi_unlearn.audit.train_shadow_pool` with ``groups``); each group's score
is the mean per-cell loss of its cells, and the audited model's score is tested against that
group's own OUT distribution (:ref:`methods-groups`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from scvi_unlearn._utils import dump_json, load_json
from scvi_unlearn._verdict import (
    BELOW_REFERENCE,
    LEAK,
    MAX_DETECTABLE_AUC,
    NO_EVIDENCE,
    UNDERPOWERED,
    detectable_auc,
)
from scvi_unlearn.audit._attacks import lira_scores
from scvi_unlearn.audit._metrics import auc_from_scores, bootstrap_metrics, percentile_ci

#: A group-level audit needs at least this many groups: each shadow trains on half of them.
MIN_GROUPS = 4
#: Groups with fewer cells than this are refused (their mean loss is too noisy to test).
DEFAULT_MIN_GROUP_CELLS = 10
#: One-sided level of each group's test.
GROUP_ALPHA = 0.05


def group_codes(adata, key: str, pool: np.ndarray, min_cells: int) -> tuple[np.ndarray, pd.Index]:
    """Integer group code of each pool cell, and the group names; clear errors on bad groups.

    Raises if ``key`` is not an ``obs`` column, if pool cells lack a group, if there are fewer
    than ``MIN_GROUPS`` groups, or if a group has fewer than ``min_cells`` cells.
    """
    if not isinstance(key, str) or key not in adata.obs.columns:
        raise ValueError(
            f"group_key {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})."
        )
    labels = adata.obs[key].iloc[pool]
    missing = labels.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} pool cells have no {key!r} (e.g. "
            f"{adata.obs_names[pool[missing][:3]].tolist()}); leave them out with `pool=`."
        )
    codes, names = pd.factorize(labels.astype(str), sort=True)
    names = pd.Index(names, name=key)
    if names.size < MIN_GROUPS:
        raise ValueError(
            f"A group-level audit by {key!r} needs at least {MIN_GROUPS} groups, found "
            f"{names.size} ({names.tolist()}): each shadow model trains on half of the groups, "
            "so fewer leave no OUT models to compare a group with."
        )
    sizes = np.bincount(codes, minlength=names.size)
    small = sizes < min_cells
    if small.any():
        detail = ", ".join(f"{n} ({s} cells)" for n, s in zip(names[small], sizes[small]))
        raise ValueError(
            f"{int(small.sum())} {key!r} groups have fewer than {min_cells} cells: {detail}. "
            "Leave them out with `pool=`, or lower `min_group_cells`."
        )
    return codes.astype(np.int64), names


def group_means(values: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of ``values`` (``(..., n_cells)``) over each group's cells: ``(..., n_groups)``."""
    one_hot = np.zeros((codes.size, n_groups))
    one_hot[np.arange(codes.size), codes] = 1.0
    return (np.asarray(values, dtype=float) @ one_hot) / one_hot.sum(0)


def group_test(
    target: np.ndarray,
    shadows: np.ndarray,
    group_in: np.ndarray,
    alpha: float = GROUP_ALPHA,
    power: float = 0.8,
) -> pd.DataFrame:
    """Test each group's score under the audited model against its OUT shadows.

    Parameters
    ----------
    target
        ``(n_groups,)`` mean loss of each group's cells under the audited model.
    shadows
        ``(n_shadows, n_groups)`` the same under each shadow model.
    group_in
        ``(n_shadows, n_groups)`` whether each shadow trained on each group.

    Returns
    -------
    One row per group: the OUT mean and SD, ``t`` (how far below its OUT distribution the
    group's loss lies, in prediction SDs, ``(mean_out - target) / (sd_out * sqrt(1 + 1/n_out))``),
    the one-sided ``p_value`` (Student t, ``n_out - 1`` df), the shadows' own ``member_effect``
    (mean IN minus OUT loss gap, what training on the group does to it), the smallest gap the
    test detects with ``power`` (``detectable_effect``), the online likelihood ratio
    ``lira_online`` (pooled variance) and a verdict: ``leak`` when p < alpha *and* the loss lies
    closer to the IN shadows than to the OUT ones (``lira_online > 0``), ``below reference``
    (p > 1 - alpha), ``underpowered`` (fewer than 2 OUT shadows, or the shadows' member effect
    is smaller than the detectable one), else ``no evidence of leak``.

    Why both: the shadows train on half of the groups, while an audited model often trains on
    all but a few (a withdrawn donor). More training data lowers the loss of an unseen group a
    little, which alone can push its ``t`` past the threshold; a group the model trained on is
    pulled all the way to the IN shadows' loss, a far larger step.
    """
    target = np.asarray(target, dtype=float)
    shadows = np.asarray(shadows, dtype=float)
    group_in = np.asarray(group_in, dtype=bool)
    out = ~group_in
    n_out, n_in = out.sum(0), group_in.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_out = np.where(out, shadows, 0.0).sum(0) / n_out
        mean_in = np.where(group_in, shadows, 0.0).sum(0) / n_in
        resid = np.where(out, shadows - mean_out, 0.0)
        sd_out = np.sqrt((resid**2).sum(0) / (n_out - 1))
        scale = sd_out * np.sqrt(1 + 1 / n_out)
        t = (mean_out - target) / scale
        df = np.maximum(n_out - 1, 1)
        p = stats.t.sf(t, df)
        detectable = (stats.t.ppf(1 - alpha, df) + stats.norm.ppf(power)) * scale
    effect = mean_out - mean_in  # positive: training on a group lowers its loss
    online = lira_scores(target, shadows, group_in, online=True)
    verdicts = []
    for j in range(target.size):
        if n_out[j] < 2 or not np.isfinite(p[j]):
            verdicts.append(UNDERPOWERED)
        elif p[j] < alpha and online[j] > 0:
            verdicts.append(LEAK)
        elif p[j] > 1 - alpha:
            verdicts.append(BELOW_REFERENCE)
        elif not (np.isfinite(effect[j]) and effect[j] >= detectable[j]):
            verdicts.append(UNDERPOWERED)
        else:
            verdicts.append(NO_EVIDENCE)
    return pd.DataFrame(
        {
            "target_loss": target,
            "out_mean": mean_out,
            "out_sd": sd_out,
            "n_out": n_out,
            "n_in": n_in,
            "t": t,
            "p_value": p,
            "member_effect": effect,
            "detectable_effect": detectable,
            "lira_online": online,
            "verdict": verdicts,
        }
    )


@dataclass
class GroupAuditReport:
    """The result of :meth:`scvi_unlearn.MembershipInference.audit_groups`.

    Attributes
    ----------
    group_key
        The ``obs`` column the groups come from (e.g. ``"sample_id"``).
    table
        One row per group (see :func:`~scvi_unlearn.audit.group_test`), with its number of
        cells and, where the audited model's training set is known, whether it was a member.
    auc, auc_ci
        Group-level ROC AUC of the offline statistic ``t`` (members vs non-member groups) and
        its bootstrap 95% CI; NaN without at least 2 groups of each kind.
    metadata
        Sizes, seeds, shadows, and the AUC's exact Mann-Whitney p-value, the smallest p-value
        these group counts allow, detectable AUC and verdict (``group_auc``).
    """

    group_key: str
    table: pd.DataFrame
    auc: float = float("nan")
    auc_ci: tuple[float, float] = (float("nan"), float("nan"))
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def verdicts(self) -> pd.Series:
        """Each group's verdict."""
        return self.table["verdict"]

    def verdict(self, group: str) -> str:
        """The verdict on one group (e.g. one donor)."""
        if group not in self.table.index:
            raise KeyError(
                f"{group!r} is not one of the audited groups {self.table.index.tolist()}."
            )
        return str(self.table.loc[group, "verdict"])

    def explain(self, group: str) -> str:
        """One group's verdict in plain language."""
        self.verdict(group)  # a clear error for an unknown group
        row = self.table.loc[group]
        what = {
            LEAK: "the model still fits this group's cells better than models that never saw it",
            BELOW_REFERENCE: "the model fits this group's cells worse than never-seen models do",
            UNDERPOWERED: "this test could not have seen a typical membership effect",
            NO_EVIDENCE: "the model fits this group's cells like models that never saw it",
        }[row["verdict"]]
        return (
            f"{self.group_key} {group}: {str(row['verdict']).upper()}: {what} (mean loss "
            f"{row['target_loss']:.4g} vs {row['out_mean']:.4g} ± {row['out_sd']:.2g} under "
            f"{int(row['n_out'])} OUT shadows; one-sided p = {row['p_value']:.3g}; shadows that "
            f"trained on it lower it by {row['member_effect']:.3g}, this test detects "
            f"{row['detectable_effect']:.3g} or more)."
        )

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def to_json(self, path: str | None = None) -> str:
        """Serialise to JSON (and write it to ``path`` if given)."""
        data = {
            "group_key": self.group_key,
            "table": self.table.reset_index().to_dict(orient="list"),
            "auc": self.auc,
            "auc_ci": list(self.auc_ci),
            "metadata": self.metadata,
        }
        return dump_json(data, path)

    @classmethod
    def from_json(cls, text_or_path: str) -> GroupAuditReport:
        """Read a report written by :meth:`to_json` (a JSON string or a file path)."""
        data = load_json(text_or_path)
        table = pd.DataFrame(data["table"]).set_index(data["group_key"])
        nan = float("nan")  # numeric columns read JSON null as NaN already
        ci = tuple(nan if v is None else v for v in data["auc_ci"])
        auc = nan if data["auc"] is None else data["auc"]
        return cls(data["group_key"], table, auc, ci, data.get("metadata", {}))

    def __repr__(self) -> str:
        cols = ["n_cells", "member", "target_loss", "out_mean", "t", "p_value", "verdict"]
        cols = [c for c in cols if c in self.table.columns]
        head = f"GroupAuditReport({self.table.shape[0]} groups by {self.group_key!r})"
        if np.isfinite(self.auc):
            head += (
                f": group-level AUC {self.auc:.3f} [{self.auc_ci[0]:.3f}-{self.auc_ci[1]:.3f}], "
                f"{self.metadata.get('auc_verdict')}"
            )
        return head + "\n" + self.table[cols].round(3).to_string()


def group_auc(table: pd.DataFrame, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Group-level ROC AUC of ``t`` (members vs non-members), its CI, power and verdict.

    With a handful of groups a bootstrap CI is meaningless (4 vs 4 perfectly separated groups
    resample to AUC 1 every time), so the verdict rests on the exact one-sided Mann-Whitney
    p-value instead: ``leak`` when it is below 0.05, ``underpowered`` when even a perfect
    separation could not reach that (``min_p_value``) or the detectable AUC exceeds 0.75,
    otherwise ``no evidence of leak``.
    """
    member = table["member"].to_numpy()
    known = np.array([m is not None and m == m for m in member])  # None / NaN: unknown
    m = table["t"].to_numpy(float)[known & (member == True)]  # noqa: E712 (object column)
    n = table["t"].to_numpy(float)[known & (member == False)]  # noqa: E712
    if m.size < 2 or n.size < 2:
        return {"auc": float("nan"), "auc_ci": (float("nan"), float("nan")), "auc_verdict": None}
    auc = float(auc_from_scores(m, n))
    ci = percentile_ci(bootstrap_metrics(m, n, n_bootstrap, seed, fprs=())["auc"])
    detectable = detectable_auc(m.size, n.size)
    p_value = float(stats.mannwhitneyu(m, n, alternative="greater", method="exact").pvalue)
    min_p = 1.0 / float(comb(m.size + n.size, m.size))
    if p_value < GROUP_ALPHA:
        verdict = LEAK
    elif min_p >= GROUP_ALPHA or not detectable <= MAX_DETECTABLE_AUC:
        verdict = UNDERPOWERED
    else:
        verdict = NO_EVIDENCE
    return {
        "auc": auc,
        "auc_ci": ci,
        "auc_p_value": p_value,
        "auc_min_p_value": min_p,
        "auc_detectable": detectable,
        "auc_verdict": verdict,
    }
