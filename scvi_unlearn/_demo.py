"""The end-to-end demo on the embedded synthetic data (``scvi-unlearn demo``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from scvi_unlearn._recipe import Recipe
from scvi_unlearn.audit import MembershipInference, overall_result
from scvi_unlearn.data import membership_split, synthetic_pbmc
from scvi_unlearn.model import verify_unlearning, write_unlearning_certificate
from scvi_unlearn.pl._utils import save_figure
from scvi_unlearn.train import exact_methods
from scvi_unlearn.utility import utility_metrics

#: Demo sizes. ``quick``: 65 + 65 rare cells to audit, 4 shadows; ``benchmarks/demo_time.py``
#: times it (the README states the measured minutes).
DEMO_SETTINGS = {
    "quick": {
        "n_cells": 1200, "n_genes": 200, "max_epochs": 120, "n_shadows": 4, "rare": 0.11,
    },
    "full": {
        "n_cells": 3000, "n_genes": 400, "max_epochs": 300, "n_shadows": 8, "rare": 0.06,
    },
}  # fmt: skip
RARE_TYPE = "Megakaryocyte"
#: Methods whose model never saw the forget cells.
#: The rows besides the model before unlearning: the default, the gold standard, and one
#: approximate method for contrast.
DEMO_METHODS = ("retrain_fast", "retrain", "fisher")


def demo_recipe(max_epochs: int):
    """The over-parameterised recipe the demo audits: it memorises a small training set."""
    return Recipe(
        model_kwargs={"n_hidden": 256, "n_latent": 10, "dropout_rate": 0.0},
        train_kwargs={"max_epochs": max_epochs, "train_size": 1.0, "batch_size": 256},
    )


def train_target(adata, split, recipe, seed: int = 0, accelerator: str = "cpu"):
    """Train ``recipe`` on ``split.train``, keeping every cell in the model's AnnData."""
    return recipe.fit_cells(adata, split.train, seed=seed, accelerator=accelerator)


def run_demo(out_dir: str | Path = "demo_output", quick: bool = False, seed: int = 0) -> dict:
    """A consent withdrawal end to end, on embedded synthetic data (no downloads).

    A model that memorises a rare population; an audit that detects it; the default
    unlearning (``retrain_fast``), the full retrain and Fisher scrubbing for contrast, each
    audited on the same cells; the default's unlearning certificate and its re-run from the
    record (``verify``). One table is printed; ``demo_summary.json`` / ``.csv``, the audit
    reports and the certificate are written to ``out_dir``.

    Returns a dict with the ``summary`` rows, the baseline :class:`~scvi_unlearn.AuditReport`,
    the :class:`~scvi_unlearn.model.VerificationResult` of the default, the split and the
    trained model.
    """
    matplotlib.use("Agg")
    settings = DEMO_SETTINGS["quick" if quick else "full"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adata = synthetic_pbmc(
        n_cells=settings["n_cells"], n_genes=settings["n_genes"],
        rare_fraction=settings["rare"], seed=seed,
    )  # fmt: skip
    split = membership_split(adata, ("cell_type", RARE_TYPE), seed=seed)
    print(f"Data: {adata.n_obs} cells x {adata.n_vars} genes; {split!r}")
    recipe = demo_recipe(settings["max_epochs"])
    start = time.perf_counter()
    model = train_target(adata, split, recipe, seed=seed)
    train_seconds = time.perf_counter() - start

    mi = MembershipInference(
        adata, recipe=model, n_shadows=settings["n_shadows"], seed=seed, cache_dir=out / "cache"
    ).fit()
    report = mi.audit(model, members=split.forget, nonmembers=split.nonmember)
    report.to_json(str(out / "audit_baseline.json"))
    save_figure(report.plot_roc(show=False).figure, out / "audit_baseline_roc.png")
    background = np.setdiff1d(split.heldout, split.nonmember)
    rows: list[dict[str, Any]] = [
        _row(
            "before unlearning",
            report,
            train_seconds,
            utility_metrics(model, adata, indices=background),
        )
    ]
    models = {}
    for method in DEMO_METHODS:
        print(f"Unlearning the {split.forget.size} {RARE_TYPE} cells with {method} ...")
        start = time.perf_counter()
        forgotten = model.unlearn(
            split.forget, method=method, seed=seed, accelerator="cpu",
            enable_progress_bar=False,
            damage_limit=None,  # a method that destroys the model is shown, not skipped
        )  # fmt: skip
        seconds = time.perf_counter() - start
        forgotten.save(str(out / f"model_{method}"), overwrite=True)
        name = f"{method} (default)" if method == DEMO_METHODS[0] else method
        try:
            rep = mi.audit(forgotten, members=split.forget, nonmembers=split.nonmember)
        except ValueError as err:  # diverged weights cannot be audited: a result too
            rows.append({
                "model": name, "verdict": "not audited", "overall": "model destroyed",
                "seconds": round(seconds, 1), "ran": method, "error": str(err),
            })  # fmt: skip
            continue
        rep.to_json(str(out / f"audit_{method}.json"))
        rows.append(
            _row(name, rep, seconds, utility_metrics(forgotten, adata, indices=background))
        )
        rows[-1]["ran"] = method
        models[method] = forgotten
    _add_overall(rows)
    default = models[DEMO_METHODS[0]]
    verification = verify_unlearning(default)
    certificate = write_unlearning_certificate(
        default, out / "unlearning_certificate.html", verification=verification
    )
    summary = pd.DataFrame(rows)
    summary.to_csv(out / "demo_summary.csv", index=False)
    (out / "demo_summary.json").write_text(
        json.dumps(
            {"rows": rows, "verify": verification.summary(), "settings": settings},
            indent=2, default=str,
        )
    )  # fmt: skip
    columns = ["model", "lira_auc", "verdict", "utility_vs_retrain", "overall", "seconds"]
    print()
    print(summary.reindex(columns=columns).fillna("").to_string(index=False))
    print(f"\nBefore unlearning the audit detected the rare cells: {report.verdict}.")
    print(f"verify (re-run of the default from its record): {repr(verification).splitlines()[0]}")
    print(f"Wrote {out / 'demo_summary.json'}, {certificate} and the audit reports.")
    return {
        "summary": rows, "report": report, "verification": verification, "split": split,
        "model": model,
    }  # fmt: skip


def _add_overall(rows: list[dict[str, Any]]) -> None:
    """One result per unlearned model: privacy verdict *and* utility against retrain.

    A method whose audit finds no leak but whose held-out neg. ELBO is far worse than the
    retrained model's is "forgotten, utility lost", never a success.
    """
    reference = next(r["heldout_neg_elbo"] for r in rows if r["model"] == "retrain")
    # (the full retrain: the exact gold standard every row's utility is compared with)
    for r in rows:
        if "heldout_neg_elbo" not in r:  # not audited (destroyed): its row says so already
            continue
        loss = r["heldout_neg_elbo"] / reference - 1.0
        r["utility_vs_retrain"] = f"{100 * loss:+.1f}%"
        r["overall"] = (
            "(the model before unlearning)"
            if r["model"] == "before unlearning"
            else overall_result(r["verdict"], loss, exact=r.get("ran") in exact_methods())
        )


def _row(name: str, report, seconds: float, utility: dict) -> dict[str, Any]:
    lira = report.results.get("lira_online", report.strongest)
    loss = report.results.get("loss")
    return {
        "model": name,
        "verdict": report.verdict,
        "lira_auc": round(lira.auc, 3),
        "lira_auc_ci": [round(v, 3) for v in lira.auc_ci],
        "reference_band": [round(v, 3) for v in lira.reference_band],
        "detectable_auc": round(lira.detectable_auc, 3),
        "loss_auc": None if loss is None else round(loss.auc, 3),
        "heldout_neg_elbo": round(utility["neg_elbo"], 2),
        "knn_accuracy": round(utility["knn_accuracy"], 3),
        "seconds": round(seconds, 1),
    }
