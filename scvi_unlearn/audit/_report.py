"""Audit results: metrics with confidence intervals, a reference band, and a verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scvi_unlearn._utils import dump_json, load_json, to_jsonable
from scvi_unlearn._verdict import (
    BELOW_REFERENCE,
    LEAK,
    MAX_DETECTABLE_AUC,
    MIN_REFERENCE_MODELS,
    NO_EVIDENCE,
    UNDERPOWERED,
    _check_references,
    combine_verdicts,
    detectable_auc,
    family_level,
    judge,
    paired_verdict,
    reference_band,
)
from scvi_unlearn.audit._certificate import write_certificate
from scvi_unlearn.audit._metrics import (
    auc_from_scores,
    bootstrap_metrics,
    percentile_ci,
    tpr_at_fpr,
)
from scvi_unlearn.pl import roc_curves

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.axes import Axes

#: FPRs at which every report states the TPR (where its non-members can measure it).
LOW_FPRS = (0.01, 0.001)


@dataclass
class AttackResult:
    """One attack's scores and metrics on one audited model.

    ``reference_aucs`` are the same attack's AUCs on the same contrast (audited members vs
    non-members) under models that never trained on either set; their band is what the audited
    model is compared with, not 0.5. With reference models (``paired``) the band is their
    prediction interval on these cells and the audited *point* AUC is judged against it
    (``reference_interval`` at 95%, ``reference_interval_family`` at the family level); with the
    OUT shadows' pooled interval the audited AUC's CI must clear it. ``detectable_auc`` is the
    smallest AUC this audit would have called a leak (80% power,
    :func:`~scvi_unlearn.audit.detectable_auc`); a TPR at an FPR below ``1 / n_nonmembers`` is
    NaN: that few non-members cannot measure it.
    """

    attack: str
    member_scores: list[float]
    nonmember_scores: list[float]
    auc: float
    auc_ci: tuple[float, float]
    advantage: float
    advantage_ci: tuple[float, float]
    tpr_at_1pct_fpr: float
    tpr_at_1pct_fpr_ci: tuple[float, float]
    tpr_at_01pct_fpr: float
    tpr_at_01pct_fpr_ci: tuple[float, float]
    reference_aucs: list[float] = field(default_factory=list)
    reference_source: str = ""
    verdict: str = NO_EVIDENCE
    reference_interval: tuple[float, float] | None = None
    detectable_auc: float = float("nan")
    auc_ci_family: tuple[float, float] | None = None
    family_verdict: str | None = None
    reference_interval_family: tuple[float, float] | None = None
    paired: bool = False

    @property
    def n_members(self) -> int:
        return len(self.member_scores)

    @property
    def n_nonmembers(self) -> int:
        return len(self.nonmember_scores)

    @property
    def min_measurable_fpr(self) -> float:
        """The smallest FPR these non-members can measure, ``1 / n_nonmembers``."""
        return 1.0 / max(self.n_nonmembers, 1)

    @property
    def ci_half_width(self) -> float:
        """Half the width of the AUC's 95% CI."""
        return float(self.auc_ci[1] - self.auc_ci[0]) / 2.0

    @property
    def reference_band(self) -> tuple[float, float]:
        """The range of AUCs expected from models that never trained on the audited cells.

        The interval computed by the audit when given, otherwise
        :func:`~scvi_unlearn.audit.reference_band` of ``reference_aucs``; NaN if there is no
        reference.
        """
        if self.reference_interval is not None:
            return (float(self.reference_interval[0]), float(self.reference_interval[1]))
        if len(self.reference_aucs) < MIN_REFERENCE_MODELS:
            return (float("nan"), float("nan"))
        return reference_band(self.reference_aucs)

    @property
    def excess(self) -> float:
        """How far the AUC (paired) or its lower CI bound lies above the band; negative inside."""
        high = self.reference_band[1]
        judged = self.auc if self.paired else self.auc_ci[0]
        return float(judged - (0.5 if np.isnan(high) else high))


def score_attack(
    attack: str,
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    reference_aucs: list[float],
    reference_source: str,
    n_bootstrap: int = 1000,
    seed: int = 0,
    reference_interval: tuple[float, float] | None = None,
    n_attacks: int = 1,
) -> AttackResult:
    """Compute the metrics, bootstrap CIs, power and verdicts of one attack.

    ``n_attacks`` is how many attacks the overall verdict combines: this attack's
    ``family_verdict`` is judged on its CI at :func:`~scvi_unlearn.audit.family_level`.
    """
    m = np.asarray(member_scores, dtype=float)
    n = np.asarray(nonmember_scores, dtype=float)
    boot = bootstrap_metrics(m, n, n_bootstrap=n_bootstrap, seed=seed, fprs=LOW_FPRS)
    auc = float(auc_from_scores(m, n))
    tprs = {}
    for fpr in LOW_FPRS:
        if fpr * n.size < 1:  # fewer than 1 / fpr non-members: not measurable
            tprs[fpr] = (float("nan"), (float("nan"), float("nan")))
        else:
            tprs[fpr] = (float(tpr_at_fpr(m, n, fpr)), percentile_ci(boot[f"tpr@{fpr:g}"]))
    result = AttackResult(
        attack=attack,
        member_scores=m.tolist(),
        nonmember_scores=n.tolist(),
        auc=auc,
        auc_ci=percentile_ci(boot["auc"]),
        advantage=2 * abs(auc - 0.5),
        advantage_ci=percentile_ci(2 * np.abs(boot["auc"] - 0.5)),
        tpr_at_1pct_fpr=tprs[0.01][0],
        tpr_at_1pct_fpr_ci=tprs[0.01][1],
        tpr_at_01pct_fpr=tprs[0.001][0],
        tpr_at_01pct_fpr_ci=tprs[0.001][1],
        reference_aucs=[float(a) for a in reference_aucs],
        reference_source=reference_source,
        reference_interval=reference_interval,
        auc_ci_family=percentile_ci(boot["auc"], level=family_level(n_attacks)),
    )
    if reference_interval is None and len(reference_aucs) >= MIN_REFERENCE_MODELS:
        # The references were scored on these very cells: the paired rule.
        verdict, family, band, family_band, detectable = paired_verdict(
            auc, reference_aucs, m.size, n.size, n_attacks=n_attacks
        )
        result.paired = True
        result.reference_interval, result.reference_interval_family = band, family_band
        result.detectable_auc, result.verdict, result.family_verdict = detectable, verdict, family
        return result
    band = result.reference_band
    top = band[1] if np.isfinite(band[1]) else 0.5
    result.detectable_auc = detectable_auc(m.size, n.size, reference=max(top, 0.5))
    result.verdict = judge(result.auc_ci, band, result.detectable_auc)
    result.family_verdict = judge(result.auc_ci_family, band, result.detectable_auc)
    return result


@dataclass
class AuditReport:
    """The result of :meth:`scvi_unlearn.MembershipInference.audit`.

    Attributes
    ----------
    results
        One :class:`~scvi_unlearn.audit.AttackResult` per attack.
    metadata
        Numbers of cells and shadows, recipe, seed, timings, warnings.
    """

    results: dict[str, AttackResult]
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- summaries -----------------------------------------------------------------------
    @property
    def strongest(self) -> AttackResult:
        """The attack whose AUC lies furthest above its reference band."""
        return max(self.results.values(), key=lambda r: r.excess)

    @property
    def verdict(self) -> str:
        """``"leak"``, ``"below reference"``, ``"underpowered"`` or ``"no evidence of leak"``.

        :func:`~scvi_unlearn.audit.combine_verdicts` of the attacks' family verdicts: each
        attack judged on its CI at ``1 - 0.05 / n_attacks`` (Bonferroni), so that running more
        attacks does not raise the chance of a false leak. "Below reference" means the members
        look *less* like training data than cells the model never saw, which is itself
        detectable (a "Streisand effect" of over-unlearning); "underpowered" means that even a
        large leak could not have been seen with this many cells.
        """
        return combine_verdicts([_family_verdict(r) for r in self.results.values()])

    @property
    def detectable_auc(self) -> float:
        """The smallest AUC the best-placed attack could have detected (see ``judge``)."""
        return float(min(r.detectable_auc for r in self.results.values()))

    def explain(self) -> str:
        """The verdict in plain language."""
        r = (
            self.strongest
            if self.verdict != BELOW_REFERENCE
            else min(self.results.values(), key=lambda x: x.auc - x.reference_band[0])
        )
        low, high = r.reference_band
        if np.isnan(low):
            ref = "no reference models were available, so the comparison is with chance (0.5)"
        elif r.paired:
            ref = (
                f"one more model that never trained on these cells would score {low:.3f}-"
                f"{high:.3f} (the prediction band of {r.reference_source} on the same cells)"
            )
        else:
            ref = (
                f"models that never trained on these cells score {low:.3f}-{high:.3f} "
                f"({r.reference_source})"
            )
        stats = f"{r.attack} AUC {r.auc:.3f} [95% CI {r.auc_ci[0]:.3f}-{r.auc_ci[1]:.3f}]"
        n = (
            f"{self.metadata.get('n_members', '?')} members vs "
            f"{self.metadata.get('n_nonmembers', '?')} non-members"
        )
        if self.verdict == LEAK:
            return (
                f"LEAK: the model still reveals membership. With the {stats} on {n}, the members "
                f"are told apart from same-population non-members better than expected: {ref}."
            )
        if self.verdict == BELOW_REFERENCE:
            return (
                f"BELOW REFERENCE: the members look less like training data than never-seen cells "
                f"({stats}; {ref}). This over-correction is itself detectable."
            )
        power = (
            f"At these sizes the audit would have caught an AUC of {r.detectable_auc:.2f} or more "
            f"(80% power; 95% CI half-width {r.ci_half_width:.3f})"
            if np.isfinite(r.detectable_auc)
            else "At these sizes no AUC up to 1 would have been detected reliably"
        )
        if self.verdict == UNDERPOWERED:
            return (
                f"UNDERPOWERED: the strongest attack ({stats}, {n}) stays within what "
                f"{ref.split(' (')[0] if not np.isnan(low) else 'chance gives'}, but that says "
                f"little. {power}, above the {MAX_DETECTABLE_AUC:g} an audit must be able to see. "
                "Audit more cells (more forgotten cells or more never-seen non-members, e.g. "
                "`nonmembers=` / `--nonmembers`)."
            )
        return (
            f"NO EVIDENCE OF LEAK: the strongest attack ({stats}, {n}) stays within what "
            f"{ref.split(' (')[0] if not np.isnan(low) else 'chance gives'}. {power}. This "
            "does not prove that no information remains: it bounds what these attacks detect."
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per attack with AUC, advantage, TPR at low FPR (with 95% CIs), reference."""
        rows = []
        for r in self.results.values():
            low, high = r.reference_band
            rows.append(
                {
                    "attack": r.attack,
                    "auc": r.auc,
                    "auc_low": r.auc_ci[0],
                    "auc_high": r.auc_ci[1],
                    "advantage": r.advantage,
                    "advantage_low": r.advantage_ci[0],
                    "advantage_high": r.advantage_ci[1],
                    "tpr@1%fpr": r.tpr_at_1pct_fpr,
                    "tpr@1%fpr_low": r.tpr_at_1pct_fpr_ci[0],
                    "tpr@1%fpr_high": r.tpr_at_1pct_fpr_ci[1],
                    "tpr@0.1%fpr": r.tpr_at_01pct_fpr,
                    "tpr@0.1%fpr_low": r.tpr_at_01pct_fpr_ci[0],
                    "tpr@0.1%fpr_high": r.tpr_at_01pct_fpr_ci[1],
                    "reference_mean": float(np.nanmean(r.reference_aucs))
                    if r.reference_aucs
                    else np.nan,
                    "reference_low": low,
                    "reference_high": high,
                    "n_reference": len(r.reference_aucs),
                    "detectable_auc": r.detectable_auc,
                    "ci_half_width": r.ci_half_width,
                    "verdict": r.verdict,
                    "family_verdict": _family_verdict(r),
                }
            )
        return pd.DataFrame(rows).set_index("attack")

    def summary(self) -> dict[str, Any]:
        """A compact JSON-able summary (verdict and headline numbers per attack)."""
        frame = self.to_frame()
        return {
            "verdict": self.verdict,
            "explanation": self.explain(),
            "strongest_attack": self.strongest.attack,
            "attacks": {name: to_jsonable(row.to_dict()) for name, row in frame.iterrows()},
            "n_members": self.metadata.get("n_members"),
            "n_nonmembers": self.metadata.get("n_nonmembers"),
            "detectable_auc": self.detectable_auc,
        }

    # -- I/O -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "explanation": self.explain(),
            "results": {k: asdict(v) for k, v in self.results.items()},
            "metadata": self.metadata,
        }

    def to_json(self, path: str | None = None) -> str:
        """Serialise to JSON (and write it to ``path`` if given)."""
        return dump_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, text_or_path: str) -> AuditReport:
        """Read a report written by :meth:`to_json` (a JSON string or a file path)."""
        data = load_json(text_or_path)
        results = {}
        for name, r in data["results"].items():
            # JSON null stands for NaN in numbers (see to_jsonable).
            r = {
                key: value if key in _OPTIONAL and value is None else _nan_for_null(value)
                for key, value in r.items()
            }
            for key in (
                "auc_ci",
                "advantage_ci",
                "tpr_at_1pct_fpr_ci",
                "tpr_at_01pct_fpr_ci",
                "reference_interval",
                "auc_ci_family",
                "reference_interval_family",
            ):
                if r.get(key) is not None:
                    r[key] = tuple(r[key])
            results[name] = AttackResult(**r)
        return cls(results=results, metadata=data.get("metadata", {}))

    def save_html(self, path, title: str | None = None):
        """Write a self-contained HTML audit certificate; returns its path.

        See :func:`~scvi_unlearn.audit.write_certificate`.
        """
        return write_certificate(self, path, title=title)

    def plot_roc(self, *, ax: Axes | None = None, show: bool | None = None, **kwargs) -> Axes:
        """ROC curves of every attack (see :func:`scvi_unlearn.pl.roc_curves`).

        Returns the matplotlib axes; save the figure with ``ax.figure.savefig(path)``.
        """
        return roc_curves(self, ax=ax, show=show, **kwargs)

    def __repr__(self) -> str:
        head = (
            f"AuditReport({self.metadata.get('n_members')} members, "
            f"{self.metadata.get('n_nonmembers')} non-members): {self.verdict}"
        )
        skipped = self.metadata.get("skipped_attacks") or {}
        if skipped:
            head += "\nskipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        columns = ["auc", "auc_low", "auc_high", "tpr@1%fpr", "reference_low",
                   "reference_high", "detectable_auc", "verdict"]  # fmt: skip
        return head + "\n" + self.to_frame()[columns].round(3).to_string()


#: AttackResult fields whose JSON null means "absent", not NaN.
_OPTIONAL = ("reference_interval", "auc_ci_family", "family_verdict", "reference_interval_family")


def _family_verdict(result: AttackResult) -> str:
    """The attack's verdict at the family level (reports saved before 0.4 lack it)."""
    if result.family_verdict is not None:
        return result.family_verdict
    judged = (result.auc, result.auc) if result.paired else result.auc_ci
    return judge(judged, result.reference_band, result.detectable_auc)


def _nan_for_null(value):
    """Undo ``to_jsonable``'s NaN -> None in a number or a list of numbers."""
    if value is None:
        return float("nan")
    if isinstance(value, list):
        return [float("nan") if v is None else v for v in value]
    return value


def judge_against(
    report: AuditReport, references: Sequence[AuditReport], n_bootstrap: int = 1000
) -> AuditReport:
    """Judge an audit against reference models that were audited separately (the paired rule).

    The same verdict as ``MembershipInference.audit(model, ..., reference_models=...)``, for
    when the reference models (e.g. retrain seeds) were audited on their own: each attack's AUC
    is judged against the references' AUCs of the same attack (:func:`paired_verdict`).

    Parameters
    ----------
    report
        The audit of the model under test.
    references
        At least :data:`~scvi_unlearn.audit.MIN_REFERENCE_MODELS` audits of reference models,
        made by the same ``MembershipInference`` (same shadows, seed and recipe) on the *same*
        members and non-members, in the same order.
    n_bootstrap
        Bootstrap replicates for the audited model's CIs.

    Returns
    -------
    A new :class:`~scvi_unlearn.AuditReport`; ``report`` is not modified.

    Raises
    ------
    ValueError
        Too few references, a reference audited on other cells or by another audit set-up, or
        no attack common to all of them.
    """
    _check_references(len(references))
    cells = _audited_cells(report)
    for i, ref in enumerate(references):
        if _audited_cells(ref) != cells:
            raise ValueError(
                f"Reference audit {i} was made on other cells than the audited model's: a paired "
                "comparison needs the same members and non-members, in the same order. Audit "
                "every model with the same `members` and `nonmembers`."
            )
        for key in ("seed", "n_shadows", "recipe"):
            if ref.metadata.get(key) != report.metadata.get(key):
                raise ValueError(
                    f"Reference audit {i} was made by another audit set-up (its {key!r} "
                    "differs): the attacks must be calibrated by the same shadow models. Audit "
                    "every model with the same `MembershipInference`."
                )
    attacks = [a for a in report.results if all(a in ref.results for ref in references)]
    if not attacks:
        raise ValueError("The audited model and the references share no attack.")
    results = {}
    for attack in attacks:
        r = report.results[attack]
        results[attack] = score_attack(
            attack,
            np.asarray(r.member_scores),
            np.asarray(r.nonmember_scores),
            [ref.results[attack].auc for ref in references],
            f"{len(references)} reference models (audited separately)",
            n_bootstrap=n_bootstrap,
            seed=int(report.metadata.get("seed", 0)),
            n_attacks=len(attacks),
        )
    metadata = {**report.metadata, "n_reference_models": len(references)}
    metadata["fingerprints"] = {
        **report.metadata.get("fingerprints", {}),
        "reference_models": [
            ref.metadata.get("fingerprints", {}).get("model_weights") for ref in references
        ],
    }
    return AuditReport(results=results, metadata=metadata)


def _audited_cells(report: AuditReport) -> tuple:
    """What identifies a report's audited cells: their fingerprints, else their names."""
    prints = report.metadata.get("fingerprints") or {}
    if prints.get("members") and prints.get("nonmembers"):
        return (prints["members"], prints["nonmembers"])
    return (
        tuple(report.metadata.get("member_names") or ()),
        tuple(report.metadata.get("nonmember_names") or ()),
    )
