r"""Audit calibration: power against the number of shadow models, and false leaks on null audits.

Two questions about :class:`scvi_unlearn.MembershipInference`:
how many shadow (reference) models does each attack need, and how often does an audit call
"leak" when the audited cells are *not* training cells?

Protocol (written before running):

- Data sets: Kang 2018 (``--kang``; a random subset of ``--n-cells`` cells x 1,287 genes, raw
  counts) and pbmc3k (``--pbmc3k``; the 2,638 cells passing the Seurat QC, 1,000 highly
  variable genes by scanpy's ``seurat_v3`` on the counts, then a random subset of ``--n-cells``
  cells). The subsets keep training fast; every model sees half of a subset.
- Recipes: ``default`` (scVI's default architecture: n_hidden=128, n_latent=10, n_layers=1)
  and ``memorising`` (n_hidden=512, n_layers=2, n_latent=30); ``train_size=1.0`` (so a shadow's
  ``in_mask`` is exactly its random half), ``batch_size=128``, and a fixed number of epochs
  per recipe (``--epochs-default``, ``--epochs-memorising``), fixed by the time budget: one fit
  of 1,000 cells takes ~0.45 s/epoch (default) and ~0.9 s/epoch (memorising) on one thread,
  and the run trains 4 x (16 + T) models within ~75 min: 50 (default) and 30 (memorising,
  which has more capacity per epoch) epochs by default. scVI's own default would be 400
  epochs at this size (``min(round(20000 / n_cells * 400), 400)``), so these models memorise
  less than a fully trained scVI would: the power measured here is a lower bound for such
  models.
- Shadows: 16 per data set x recipe (``MembershipInference(n_shadows=16, seed=0)``, balanced
  random halves, every cell IN for exactly 8), cached under ``--cache-dir`` (outside the repo).
- Targets: T per data set x recipe (``--targets``), seeds 1000 + t (the shadows use 0-15),
  each trained on its own random half of the subset (``Recipe.fit_cells``).
- Power against the number of models k = 1, 2, 4, 8, 16: for each target and each of several
  random subsets of k shadows (``--subsets``: more for small k), the fitted
  ``MembershipInference`` is copied with ``shadows_`` restricted to the subset (nothing
  retrained). A k-shadow ``MembershipInference`` trains every cell IN for exactly k/2 of its
  shadows; a random k-subset of 16 shadows does not (a cell may be IN for all of them, and
  LiRA then has no OUT model for it). So, to measure what a k-shadow pool gives, the audited
  cells are drawn among the cells IN for exactly k/2 of the subset (for k = 1: OUT for the one
  shadow, so only the offline attacks can run): members = m random training cells of the
  target, non-members = m random cells it never trained on (``--m``). Attacks: loss (no
  shadows; the baseline), lira_online, lira_offline, rmia; AUC, TPR at 1% FPR, verdict. An
  attack the subset cannot run is recorded as "not runnable". At k = 16 all six attacks run,
  so the overall verdict's power is comparable with its null audits.
- Null audits: for each target, ``--null-contrasts`` disjoint contrasts of "members" = m cells
  it never trained on vs non-members = m other cells it never trained on; all 16 shadows, all
  six attacks. Contrasts of one target share a model (so they are not independent). Any "leak"
  is a false leak. Recorded: each attack's verdict (95% CI vs the reference band) and family
  verdict (Bonferroni CI, as the overall verdict uses), and the overall ``report.verdict``.
- Report: false-leak rates with Wilson 95% CIs beside power (real-member audits at k = 16
  called leak, mean AUC, mean TPR at 1% FPR) per attack and overall; power against k (table
  and ``power_vs_k.png``). Nothing is asserted: whatever comes out is reported.

Each target (all its audits) is saved to ``units/`` as soon as it is done, and targets are
trained round-robin over the data set x recipe combinations, so an interrupted run resumes
and a stopped one has balanced partial results; ``--report-only`` rebuilds the tables from
``units/``. Run (one torch thread; the defaults are what ``results.md`` reports)::

    python benchmarks/audit_calibration.py --kang ../shared/data/kang2018_pbmc12k.h5ad \
        --pbmc3k ../shared/data/pbmc3k.h5ad
    python benchmarks/audit_calibration.py --report-only

Writes ``benchmarks/results/audit_calibration/{results.json,results.md,*.png,units/}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
import warnings
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from _common import KANG_FILE, MEMORISING, PBMC3K_FILE, SCVI_DEFAULT, data_file, markdown_table
from scipy.stats import norm

import scvi_unlearn as su
from scvi_unlearn._compat import SCVI_BASE_MODEL_LOGGER
from scvi_unlearn.audit._shadows import ShadowPool

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RECIPES = {
    "default": SCVI_DEFAULT,
    "memorising": MEMORISING,
}
DATASETS = ("kang", "pbmc3k")
N_SHADOWS = 16
KS = (1, 2, 4, 8, 16)
POWER_ATTACKS = ("loss", "lira_online", "lira_offline", "rmia")
ALL_ATTACKS = ("loss", "lira_online", "lira_offline", "rmia", "shadow_classifier", "cv_classifier")
LEAK = "leak"
NOT_RUNNABLE = "not runnable"


def quiet() -> None:
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
        "lightning.fabric.utilities.seed",
        SCVI_BASE_MODEL_LOGGER,
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def load(dataset: str, args) -> object:
    """The cell subset of one data set (raw counts), fixed by ``args.seed``."""
    rng = np.random.default_rng(args.seed)
    if dataset == "kang":
        adata = su.data.kang2018(path=args.kang)
    else:
        import scanpy as sc

        adata = su.data.pbmc3k(path=args.pbmc3k, qc_only=True)
        hvg = sc.pp.highly_variable_genes(
            adata.copy(), flavor="seurat_v3", n_top_genes=args.pbmc3k_genes, inplace=False
        )
        adata = adata[:, hvg["highly_variable"].to_numpy()].copy()
    n = min(args.n_cells, adata.n_obs)
    cells = np.sort(rng.choice(adata.n_obs, n, replace=False))
    return adata[cells].copy()


def recipe_for(name: str, args) -> su.Recipe:
    epochs = args.epochs_default if name == "default" else args.epochs_memorising
    return su.Recipe(
        model_kwargs=RECIPES[name],
        train_kwargs={"max_epochs": epochs, "train_size": 1.0, "batch_size": 128},
    )


def with_shadows(mi, keep: np.ndarray):
    """A copy of a fitted ``MembershipInference`` that uses only the shadows ``keep``."""
    s = mi.shadows_
    sub = copy.copy(mi)
    sub.shadows_ = ShadowPool(
        s.features[keep],
        s.in_mask[keep],
        s.pool,
        s.feature_names,
        [s.train_seconds[i] for i in keep],
    )
    sub.n_shadows = int(keep.size)
    sub._classifier = None
    return sub


def eligible(in_mask: np.ndarray) -> np.ndarray:
    """Cells a k-shadow pool of these shadows would hold: IN for exactly k/2 (k=1: OUT)."""
    k = in_mask.shape[0]
    n_in = in_mask.sum(0)
    return n_in == 0 if k == 1 else n_in == k // 2


def audit_rows(report, attacks, base: dict) -> list[dict]:
    rows = []
    skipped = report.metadata.get("skipped_attacks", {})
    for attack in attacks:
        row = {**base, "attack": attack, "overall_verdict": report.verdict}
        r = report.results.get(attack)
        if r is None:
            row.update(verdict=NOT_RUNNABLE, family_verdict=NOT_RUNNABLE)
            row["reason"] = skipped.get(attack, "not run")
        else:
            band = r.reference_band
            row.update(
                auc=r.auc,
                auc_low=r.auc_ci[0],
                auc_high=r.auc_ci[1],
                tpr_at_1pct_fpr=r.tpr_at_1pct_fpr,
                reference_low=band[0],
                reference_high=band[1],
                reference_source=r.reference_source,
                detectable_auc=r.detectable_auc,
                verdict=r.verdict,
                family_verdict=r.family_verdict,
            )
        rows.append(row)
    return rows


def run_unit(mi, adata, recipe, combo: str, t: int, args) -> dict:
    """Train one target and run all its power and null audits."""
    rng = np.random.default_rng([args.seed, 1000 + t, zlib.crc32(combo.encode())])
    n = adata.n_obs
    train = np.sort(rng.choice(n, n // 2, replace=False))
    is_train = np.zeros(n, bool)
    is_train[train] = True
    start = time.perf_counter()
    target = recipe.fit_cells(
        adata, train, seed=1000 + t, accelerator="cpu", enable_progress_bar=False
    )
    train_s = time.perf_counter() - start
    dataset, recipe_name = combo.split("/")
    base = {"dataset": dataset, "recipe": recipe_name, "target": t}
    power, null = [], []
    start = time.perf_counter()
    for k, n_subsets in zip(KS, args.subsets):
        for s in range(n_subsets if k < N_SHADOWS else 1):
            keep = np.sort(rng.choice(N_SHADOWS, k, replace=False))
            ok = eligible(mi.shadows_.in_mask[keep])
            m_pool, n_pool = np.flatnonzero(ok & is_train), np.flatnonzero(ok & ~is_train)
            m = min(args.m, m_pool.size, n_pool.size)
            members = np.sort(rng.choice(m_pool, m, replace=False))
            nonmembers = np.sort(rng.choice(n_pool, m, replace=False))
            sub = mi if k == N_SHADOWS else with_shadows(mi, keep)
            attacks = ALL_ATTACKS if k == N_SHADOWS else POWER_ATTACKS
            row = {**base, "k": k, "subset": s, "shadows": keep.tolist(), "m": m}
            try:
                report = sub.audit(target, members, nonmembers, attacks=attacks)
            except Exception as exc:  # every attack failed: record, do not crash
                power += [
                    {**row, "attack": a, "verdict": NOT_RUNNABLE, "reason": repr(exc)}
                    for a in attacks
                ]
                continue
            power += audit_rows(report, attacks, row)
    power_s = time.perf_counter() - start
    start = time.perf_counter()
    unseen = rng.permutation(np.flatnonzero(~is_train))
    for c in range(args.null_contrasts):
        part = unseen[2 * c * args.m : 2 * (c + 1) * args.m]
        if part.size < 2 * args.m:
            break
        fake, nonmembers = np.sort(part[: args.m]), np.sort(part[args.m :])
        with warnings.catch_warnings():  # "members not in the training set" is the point
            warnings.simplefilter("ignore", UserWarning)
            report = mi.audit(target, fake, nonmembers, attacks=ALL_ATTACKS)
        null += audit_rows(report, ALL_ATTACKS, {**base, "contrast": c, "m": args.m})
    return {
        "combo": combo,
        "target": t,
        "seed": 1000 + t,
        "n_train": int(train.size),
        "target_train_s": train_s,
        "power_audit_s": power_s,
        "null_audit_s": time.perf_counter() - start,
        "power": power,
        "null": null,
    }


# -- report ------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = norm.ppf(0.975)) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion k / n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(centre - half, 0.0), min(centre + half, 1.0))


def rate(series: pd.Series, value: str = LEAK) -> str:
    k, n = int((series == value).sum()), int(series.size)
    if n == 0:
        return "-"
    low, high = wilson(k, n)
    return f"{k}/{n} = {k / n:.3f} [{low:.3f}, {high:.3f}]"


def calibration_table(null: pd.DataFrame, power: pd.DataFrame) -> pd.DataFrame:
    full = power[power["k"] == N_SHADOWS]
    rows = []
    for attack in ALL_ATTACKS:
        nu = null[(null["attack"] == attack) & (null["verdict"] != NOT_RUNNABLE)]
        po = full[(full["attack"] == attack) & (full["verdict"] != NOT_RUNNABLE)]
        rows.append(
            {
                "attack": attack,
                "false leaks (95% verdict)": rate(nu["verdict"]),
                "false leaks (family verdict)": rate(nu["family_verdict"]),
                "null 'below reference'": rate(nu["verdict"], "below reference"),
                "null mean AUC": nu["auc"].mean(),
                "power (95% verdict)": rate(po["verdict"]),
                "power (family verdict)": rate(po["family_verdict"]),
                "mean AUC": po["auc"].mean(),
                "mean TPR@1%FPR": po["tpr_at_1pct_fpr"].mean(),
            }
        )
    nu = null.drop_duplicates(["dataset", "recipe", "target", "contrast"])
    po = full.drop_duplicates(["dataset", "recipe", "target", "subset"])
    rows.append(
        {
            "attack": "overall verdict (6 attacks, Bonferroni)",
            "false leaks (95% verdict)": "-",
            "false leaks (family verdict)": rate(nu["overall_verdict"]),
            "null 'below reference'": rate(nu["overall_verdict"], "below reference"),
            "null mean AUC": float("nan"),
            "power (95% verdict)": "-",
            "power (family verdict)": rate(po["overall_verdict"]),
            "mean AUC": float("nan"),
            "mean TPR@1%FPR": float("nan"),
        }
    )
    return pd.DataFrame(rows)


def per_combo_table(null: pd.DataFrame, power: pd.DataFrame) -> pd.DataFrame:
    rows = []
    full = power[power["k"] == N_SHADOWS]
    for (dataset, recipe), g in null.groupby(["dataset", "recipe"], sort=False):
        audits = g.drop_duplicates(["target", "contrast"])
        p = full[(full["dataset"] == dataset) & (full["recipe"] == recipe)]
        row = {
            "dataset": dataset,
            "recipe": recipe,
            "targets": int(g["target"].nunique()),
            "null audits": len(audits),
            "overall false leaks": int((audits["overall_verdict"] == LEAK).sum()),
        }
        for attack in ("loss", "lira_online", "lira_offline", "rmia"):
            a = g[g["attack"] == attack]
            b = p[p["attack"] == attack]
            row[f"{attack} false leaks"] = int((a["verdict"] == LEAK).sum())
            row[f"{attack} power"] = float((b["verdict"] == LEAK).mean()) if len(b) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def power_vs_k(power: pd.DataFrame) -> pd.DataFrame:
    rows = []
    part = power[power["attack"].isin(POWER_ATTACKS)]
    for (dataset, recipe, attack, k), g in part.groupby(
        ["dataset", "recipe", "attack", "k"], sort=False
    ):
        ran = g[g["verdict"] != NOT_RUNNABLE]
        rows.append(
            {
                "dataset": dataset,
                "recipe": recipe,
                "attack": attack,
                "k": int(k),
                "audits": len(g),
                "not runnable": int((g["verdict"] == NOT_RUNNABLE).sum()),
                "mean AUC": ran["auc"].mean() if len(ran) else np.nan,
                "SD AUC": ran["auc"].std() if len(ran) > 1 else np.nan,
                "mean TPR@1%FPR": ran["tpr_at_1pct_fpr"].mean() if len(ran) else np.nan,
                "leak rate": float((ran["verdict"] == LEAK).mean()) if len(ran) else np.nan,
                "mean m": g["m"].mean(),
            }
        )
    table = pd.DataFrame(rows)
    order = {a: i for i, a in enumerate(POWER_ATTACKS)}
    return table.sort_values(
        ["dataset", "recipe", "attack", "k"],
        key=lambda c: c.map(order) if c.name == "attack" else c,
    ).reset_index(drop=True)


def plot_power(table: pd.DataFrame, path: Path) -> None:
    combos = table[["dataset", "recipe"]].drop_duplicates().to_numpy().tolist()
    fig, axes = plt.subplots(
        2, len(combos), figsize=(3.6 * len(combos), 6.4), squeeze=False, sharex=True
    )
    for j, (dataset, recipe) in enumerate(combos):
        part = table[(table["dataset"] == dataset) & (table["recipe"] == recipe)]
        for attack in POWER_ATTACKS:
            a = part[part["attack"] == attack].sort_values("k")
            for i, col in enumerate(("mean AUC", "mean TPR@1%FPR")):
                axes[i, j].plot(a["k"], a[col], marker="o", label=attack)
        axes[0, j].set_title(f"{dataset}, {recipe}")
        axes[0, j].axhline(0.5, color="grey", lw=0.8, ls=":")
        axes[1, j].axhline(0.01, color="grey", lw=0.8, ls=":")
        axes[1, j].set_xlabel("shadow models k")
        axes[1, j].set_xscale("log", base=2)
        axes[1, j].set_xticks(KS, [str(k) for k in KS])
    axes[0, 0].set_ylabel("mean AUC (real members)")
    axes[1, 0].set_ylabel("mean TPR at 1% FPR")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_calibration(null: pd.DataFrame, power: pd.DataFrame, path: Path) -> None:
    full = power[power["k"] == N_SHADOWS]
    labels, fl, fl_err, pw = [], [], [], []
    for attack in ALL_ATTACKS:
        nu = null[(null["attack"] == attack) & (null["verdict"] != NOT_RUNNABLE)]
        po = full[(full["attack"] == attack) & (full["verdict"] != NOT_RUNNABLE)]
        k, n = int((nu["verdict"] == LEAK).sum()), len(nu)
        labels.append(attack)
        fl.append(k / max(n, 1))
        low, high = wilson(k, n)
        fl_err.append((max(k / max(n, 1) - low, 0.0), max(high - k / max(n, 1), 0.0)))
        pw.append(float((po["verdict"] == LEAK).mean()) if len(po) else np.nan)
    nu = null.drop_duplicates(["dataset", "recipe", "target", "contrast"])
    po = full.drop_duplicates(["dataset", "recipe", "target", "subset"])
    k, n = int((nu["overall_verdict"] == LEAK).sum()), len(nu)
    labels.append("overall")
    fl.append(k / max(n, 1))
    low, high = wilson(k, n)
    fl_err.append((max(k / max(n, 1) - low, 0.0), max(high - k / max(n, 1), 0.0)))
    pw.append(float((po["overall_verdict"] == LEAK).mean()) if len(po) else np.nan)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(x - 0.2, fl, 0.4, yerr=np.array(fl_err).T, capsize=3, label="false leaks (null)")
    ax.bar(x + 0.2, pw, 0.4, label="leaks called on real members (k=16)")
    ax.axhline(0.05, color="red", lw=0.8, ls="--", label="5% goal")
    ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("fraction of audits called 'leak'")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(units: list[dict], args, out: Path) -> None:
    power = pd.DataFrame([r for u in units for r in u["power"]])
    null = pd.DataFrame([r for u in units for r in u["null"]])
    calib = calibration_table(null, power)
    combo = per_combo_table(null, power)
    curve = power_vs_k(power)
    timing = pd.DataFrame(
        [
            {
                "dataset": u["combo"].split("/")[0],
                "recipe": u["combo"].split("/")[1],
                "target_train_s": u["target_train_s"],
                "power_audit_s": u["power_audit_s"],
                "null_audit_s": u["null_audit_s"],
            }
            for u in units
        ]
    )
    timing = timing.groupby(["dataset", "recipe"], sort=False).mean().reset_index()
    shadow_s = args.shadow_seconds if hasattr(args, "shadow_seconds") else {}
    if shadow_s:
        timing["shadow_train_s"] = [
            shadow_s.get(f"{d}/{r}", np.nan) for d, r in timing[["dataset", "recipe"]].to_numpy()
        ]
    plot_power(curve, out / "power_vs_k.png")
    plot_calibration(null, power, out / "false_leaks.png")
    settings = {k: v for k, v in vars(args).items() if k != "report_only"}
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "calibration": calib.to_dict(orient="records"),
                "per_combination": combo.to_dict(orient="records"),
                "power_vs_k": curve.to_dict(orient="records"),
                "timings": timing.to_dict(orient="records"),
                "null_audits": null.to_dict(orient="records"),
                "power_audits": power.to_dict(orient="records"),
            },
            indent=1,
            default=str,
        )
    )
    n_null = len(null.drop_duplicates(["dataset", "recipe", "target", "contrast"]))
    n_targets = len(units)
    md = [
        "# Audit calibration: false leaks on null audits, and power against shadow models",
        "",
        "Command: `python benchmarks/audit_calibration.py --kang "
        "../shared/data/kang2018_pbmc12k.h5ad --pbmc3k ../shared/data/pbmc3k.h5ad` "
        "(protocol in its docstring); 1 torch thread, 2 shared CPU cores.",
        "",
        f"Settings: {args.n_cells} random cells per data set (pbmc3k: {args.pbmc3k_genes} "
        f"seurat_v3 HVGs of the QC'd cells), each model trained on a random half; "
        f"`train_size=1.0`, `batch_size=128`; default scVI {args.epochs_default} epochs, "
        f"memorising scVI (512 hidden, 2 layers, 30 latent) {args.epochs_memorising} epochs "
        "(scVI's own default at this size would be 400: these are under-trained, so power is a "
        f"lower bound); {N_SHADOWS} shadows per data set x recipe; {n_targets} target models "
        f"in all; m = {args.m} members vs {args.m} non-members per audit; 1,000 bootstrap "
        "replicates.",
        "",
        f"## False leaks (null audits) beside power (real members, k = {N_SHADOWS})",
        "",
        f"{n_null} null audits: {args.null_contrasts} disjoint contrasts per target model, "
        "both sides cells the target never trained on (contrasts of one target share the "
        "model, so they are not fully independent). Power: one audit per target with real "
        "training cells as members. Rates are `leaks/audits = rate [Wilson 95% CI]`. The "
        "95% verdict judges each attack alone (its 95% AUC CI above the reference band); the "
        "family verdict judges it on its Bonferroni CI (level 1 - 0.05/6), which is what the "
        "overall `report.verdict` combines.",
        "",
        markdown_table(calib),
        "",
        "Per data set and recipe (leak counts; power = share of real-member audits at k = 16 "
        "called leak by the attack's 95% verdict):",
        "",
        markdown_table(combo),
        "",
        "![false leaks and power](false_leaks.png)",
        "",
        "## Power against the number of shadow models",
        "",
        "Each target audited with random subsets of k of the 16 shadows (members and "
        "non-members drawn among the cells IN for exactly k/2 of the subset, as a k-shadow "
        "pool would have them; k = 1: cells OUT for the one shadow). `loss` uses no shadows "
        "(its rows differ only by the cells drawn). `not runnable`: audits in which the "
        "attack could not run (LiRA online needs IN and OUT models per cell). Leak rate: "
        "the attack's 95% verdict.",
        "",
        markdown_table(curve),
        "",
        "![power vs k](power_vs_k.png)",
        "",
        "## Runtimes (seconds per target model; 1 thread, shared CPUs)",
        "",
        markdown_table(timing, digits=1),
        "",
        "## What this says",
        "",
        args.conclusion if getattr(args, "conclusion", None) else "(see the tables above)",
    ]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def add_subset_arguments(parser: argparse.ArgumentParser) -> None:
    """The data sets, subsets and recipes this benchmark and its siblings share."""
    parser.add_argument("--kang", default=str(data_file(KANG_FILE)))
    parser.add_argument("--pbmc3k", default=str(data_file(PBMC3K_FILE)))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--pbmc3k-genes", type=int, default=1000)
    parser.add_argument("--epochs-default", type=int, default=50)
    parser.add_argument("--epochs-memorising", type=int, default=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_subset_arguments(parser)
    parser.add_argument("--targets", type=int, default=7)
    parser.add_argument("--m", type=int, default=200)
    parser.add_argument("--null-contrasts", type=int, default=2)
    parser.add_argument(
        "--subsets",
        type=int,
        nargs=len(KS),
        default=[4, 4, 3, 2, 1],
        help=f"random shadow subsets per k in {KS}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="/tmp/audit_calibration_cache")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "audit_calibration")
    )
    parser.add_argument(
        "--conclusion-file",
        default=None,
        help="markdown text for the closing 'what this says' paragraph (written after reading)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the tables from the saved units/"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet()
    out = Path(args.out)
    units_dir = out / "units"
    units_dir.mkdir(parents=True, exist_ok=True)
    conclusion = out / "conclusion.md" if args.conclusion_file is None else args.conclusion_file
    if Path(conclusion).exists():
        args.conclusion = Path(conclusion).read_text().strip()
    timing_file = out / "shadow_seconds.json"
    if not args.report_only:
        combos = {}
        shadow_seconds = json.loads(timing_file.read_text()) if timing_file.exists() else {}
        for dataset in args.datasets:
            adata = load(dataset, args)
            print(f"{dataset}: {adata.n_obs} cells x {adata.n_vars} genes", flush=True)
            for name in args.recipes:
                combo = f"{dataset}/{name}"
                recipe = recipe_for(name, args)
                mi = su.MembershipInference(
                    adata,
                    recipe,
                    n_shadows=N_SHADOWS,
                    seed=args.seed,
                    cache_dir=args.cache_dir,
                    accelerator="cpu",
                )
                start = time.perf_counter()
                mi.fit(progress_bar=False)
                seconds = mi.shadows_.train_seconds
                shadow_seconds[combo] = float(np.mean(seconds))
                timing_file.write_text(json.dumps(shadow_seconds, indent=1))
                print(
                    f"{combo}: {N_SHADOWS} shadows in {time.perf_counter() - start:.0f} s "
                    f"(cached or trained; {np.mean(seconds):.1f} s per fit) -> about "
                    f"{args.targets * np.mean(seconds) / 60:.1f} min of target training",
                    flush=True,
                )
                combos[combo] = (mi, adata, recipe)
        fit_s = sum(shadow_seconds.get(c, 0.0) for c in combos) * args.targets
        print(f"Estimate for the targets (training only): {fit_s / 60:.1f} min", flush=True)
        for t in range(args.targets):  # round-robin: a stopped run has balanced results
            for combo, (mi, adata, recipe) in combos.items():
                path = units_dir / f"{combo.replace('/', '_')}_t{t}.json"
                if path.exists():
                    continue
                start = time.perf_counter()
                unit = run_unit(mi, adata, recipe, combo, t, args)
                path.write_text(json.dumps(unit, default=str))
                print(
                    f"{combo} target {t}: {time.perf_counter() - start:.0f} s "
                    f"(train {unit['target_train_s']:.0f} s, power audits "
                    f"{unit['power_audit_s']:.0f} s, null audits {unit['null_audit_s']:.0f} s)",
                    flush=True,
                )
    args.shadow_seconds = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    units = [json.loads(p.read_text()) for p in sorted(units_dir.glob("*.json"))]
    if not units:
        raise SystemExit(f"No finished targets in {units_dir}.")
    report(units, args, out)


if __name__ == "__main__":
    main()
