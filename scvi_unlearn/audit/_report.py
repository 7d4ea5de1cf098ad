"""Audit results: metrics with confidence intervals, a reference band, and a verdict."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from scvi_unlearn._utils import to_jsonable
from scvi_unlearn.audit._metrics import (
    auc_from_scores,
    bootstrap_metrics,
    percentile_ci,
    tpr_at_fpr,
)
from scvi_unlearn.pl import roc_curves

LEAK = "leak"
NO_EVIDENCE = "no evidence of leak"
BELOW_REFERENCE = "below reference"


@dataclass
class AttackResult:
    """One attack's scores and metrics on one audited model.

    ``reference_aucs`` are the same attack's AUCs on the same contrast (audited members vs
    non-members) under models that never trained on either set; their band is what the audited
    model is compared with, not 0.5.
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

    @property
    def reference_band(self) -> tuple[float, float]:
        """The range of AUCs expected from models that never trained on the audited cells.

        The interval computed by the audit when given (pooled reference AUC's 95% bootstrap
        interval, or mean ± 2 SD over three or more reference models); otherwise mean ± 2 SD of
        ``reference_aucs``; within [0, 1]; NaN if there is no reference.
        """
        if self.reference_interval is not None:
            return (float(self.reference_interval[0]), float(self.reference_interval[1]))
        ref = np.asarray(self.reference_aucs, dtype=float)
        ref = ref[np.isfinite(ref)]
        if ref.size == 0:
            return (float("nan"), float("nan"))
        sd = ref.std(ddof=1) if ref.size > 1 else 0.0
        return (float(max(ref.mean() - 2 * sd, 0.0)), float(min(ref.mean() + 2 * sd, 1.0)))

    @property
    def excess(self) -> float:
        """How far the AUC's lower CI bound lies above the reference band (negative: inside)."""
        high = self.reference_band[1]
        return float(self.auc_ci[0] - (0.5 if np.isnan(high) else high))


def score_attack(
    attack: str,
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    reference_aucs: list[float],
    reference_source: str,
    n_bootstrap: int = 1000,
    seed: int = 0,
    reference_interval: tuple[float, float] | None = None,
) -> AttackResult:
    """Compute the metrics, bootstrap CIs and verdict of one attack."""
    m = np.asarray(member_scores, dtype=float)
    n = np.asarray(nonmember_scores, dtype=float)
    boot = bootstrap_metrics(m, n, n_bootstrap=n_bootstrap, seed=seed)
    auc = float(auc_from_scores(m, n))
    result = AttackResult(
        attack=attack,
        member_scores=m.tolist(),
        nonmember_scores=n.tolist(),
        auc=auc,
        auc_ci=percentile_ci(boot["auc"]),
        advantage=2 * abs(auc - 0.5),
        advantage_ci=percentile_ci(2 * np.abs(boot["auc"] - 0.5)),
        tpr_at_1pct_fpr=float(tpr_at_fpr(m, n, 0.01)),
        tpr_at_1pct_fpr_ci=percentile_ci(boot["tpr@0.01"]),
        tpr_at_01pct_fpr=float(tpr_at_fpr(m, n, 0.001)),
        tpr_at_01pct_fpr_ci=percentile_ci(boot["tpr@0.001"]),
        reference_aucs=[float(a) for a in reference_aucs],
        reference_source=reference_source,
        reference_interval=reference_interval,
    )
    result.verdict = _attack_verdict(result)
    return result


def _attack_verdict(result: AttackResult) -> str:
    low, high = result.reference_band
    if np.isnan(low):  # no reference models: fall back to chance
        low = high = 0.5
    if result.auc_ci[0] > high:
        return LEAK
    if result.auc_ci[1] < low:
        return BELOW_REFERENCE
    return NO_EVIDENCE


@dataclass
class AuditReport:
    """The result of :meth:`scvi_unlearn.MembershipInference.audit`.

    Attributes
    ----------
    results
        One :class:`AttackResult` per attack.
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
        """``"leak"``, ``"no evidence of leak"`` or ``"below reference"`` for the strongest attack.

        If no attack exceeds its reference but one lies clearly below it, the report says
        ``"below reference"``: the members look *less* like training data than cells the model
        never saw, which is itself detectable (a "Streisand effect" of over-unlearning).
        """
        verdicts = [r.verdict for r in self.results.values()]
        if LEAK in verdicts:
            return LEAK
        if BELOW_REFERENCE in verdicts:
            return BELOW_REFERENCE
        return NO_EVIDENCE

    def explain(self) -> str:
        """The verdict in plain language."""
        r = (
            self.strongest
            if self.verdict != BELOW_REFERENCE
            else min(self.results.values(), key=lambda x: x.auc_ci[1] - x.reference_band[0])
        )
        low, high = r.reference_band
        ref = (
            f"models that never trained on these cells score {low:.3f}-{high:.3f} "
            f"({r.reference_source})"
            if not np.isnan(low)
            else "no reference models were available, so the comparison is with chance (0.5)"
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
        return (
            f"NO EVIDENCE OF LEAK: the strongest attack ({stats}, {n}) stays within what "
            f"{ref.split(' (')[0] if not np.isnan(low) else 'chance gives'}. This does not prove "
            "that no information remains: it bounds what these attacks can detect with this many "
            "cells (see the CI width)."
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
                    "verdict": r.verdict,
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
        text = json.dumps(to_jsonable(self.to_dict()), indent=2)
        if path is not None:
            with open(path, "w") as handle:
                handle.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> AuditReport:
        """Read a report written by :meth:`to_json` (a JSON string or a file path)."""
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path) as handle:
                text = handle.read()
        data = json.loads(text)
        results = {}
        for name, r in data["results"].items():
            # JSON null stands for NaN in numbers (see to_jsonable).
            r = {
                key: _nan_for_null(value) if key != "reference_interval" or value else value
                for key, value in r.items()
            }
            for key in (
                "auc_ci",
                "advantage_ci",
                "tpr_at_1pct_fpr_ci",
                "tpr_at_01pct_fpr_ci",
                "reference_interval",
            ):
                if r.get(key) is not None:
                    r[key] = tuple(r[key])
            results[name] = AttackResult(**r)
        return cls(results=results, metadata=data.get("metadata", {}))

    def plot_roc(self, ax=None, show: bool | None = None, save: str | None = None, **kwargs):
        """ROC curves of every attack (see :func:`scvi_unlearn.pl.roc_curves`)."""
        return roc_curves(self, ax=ax, show=show, save=save, **kwargs)

    def __repr__(self) -> str:
        head = (
            f"AuditReport({self.metadata.get('n_members')} members, "
            f"{self.metadata.get('n_nonmembers')} non-members): {self.verdict}"
        )
        skipped = self.metadata.get("skipped_attacks") or {}
        if skipped:
            head += "\nskipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        columns = ["auc", "auc_low", "auc_high", "advantage", "tpr@1%fpr", "reference_low",
                   "reference_high", "verdict"]  # fmt: skip
        return head + "\n" + self.to_frame()[columns].round(3).to_string()


def _nan_for_null(value):
    """Undo ``to_jsonable``'s NaN -> None in a number or a list of numbers."""
    if value is None:
        return float("nan")
    if isinstance(value, list):
        return [float("nan") if v is None else v for v in value]
    return value
