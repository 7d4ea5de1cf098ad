r"""Power per shadow model: LiRA's and RMIA's per-cell centre and variance, against 1-16 shadows.

The question: with few shadow models, the per-cell centre (mean) and spread of a cell's IN and
OUT losses are the weak points of LiRA and RMIA. Do a robust centre (median) and pooled or
shrunk variances give more power per shadow, enough to halve ``DEFAULT_N_SHADOWS``?

Protocol (written before running):

- Data sets and recipes as ``audit_calibration.py``: 2,000-cell random subsets of Kang 2018 and
  pbmc3k (1,000 seurat_v3 HVGs), scVI's default architecture (50 epochs) and the memorising one
  (512 hidden, 2 layers, 30 latent; 30 epochs), ``train_size=1.0``, ``batch_size=128``.
- Shadows: 16 per data set x recipe (``MembershipInference(n_shadows=16, seed=0)``, every cell
  IN for exactly 8). Targets: ``--targets`` per data set x recipe, seeds 1000 + t, each on its
  own random half of the subset (members: its training cells; non-members: the rest).
- k = 1, 2, 4, 8, 16 shadows: ``--subsets`` random k-subsets of the 16 (one at k = 16); the
  audited cells are those IN for exactly k/2 of the subset (k = 1: OUT for it), as a k-shadow
  pool would have them. For each k, the scores of every target and subset are pooled into one
  ROC (same attack, same calibration rule), so TPR at 0.1% FPR is measurable (>= 1,000
  non-members); 95% CIs by bootstrap over the pooled cells (optimistic: cells of one target
  share a model).
- Variants: LiRA online and offline with centre in {mean, median} x variance in {pooled,
  per_cell, shrunk}, RMIA with centre in {mean, median}. ``mean`` / ``pooled`` is the package's
  rule before this benchmark. The decision rule, fixed before running: a variant replaces the
  default only if it is at least as good at every k on both data sets (AUC and TPR at 1% FPR
  within their CIs, higher on average), and ``DEFAULT_N_SHADOWS`` halves only if the chosen rule
  at 4 shadows reaches the old rule's 8-shadow AUC and TPR at 1% FPR on every data set x recipe.

Run (one torch thread per process)::

    python benchmarks/audit_power.py --datasets kang
    python benchmarks/audit_power.py --datasets pbmc3k
    python benchmarks/audit_power.py --report-only

Writes ``benchmarks/results/audit_power/{results.json,results.md,power.png,units/}``.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from _common import markdown_table, write_page
from audit_calibration import (
    add_subset_arguments,
    eligible,
    load,
    quiet,
    recipe_for,
)

import scvi_unlearn as su
from scvi_unlearn.audit._metrics import percentile_ci

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = Path(__file__).parent / "results" / "audit_power"
N_SHADOWS = 16
KS = (1, 2, 4, 8, 16)
ROW_COLUMNS = ["combo", "k", "variant", "n_members", "n_nonmembers", "AUC", "TPR@1%FPR",
               "TPR@0.1%FPR"]  # fmt: skip
LOSS = su.audit.SCALAR_FEATURES.index(su.audit.LOSS_FEATURE)
#: (name, attack, options); the first of each attack is the package's rule before.
VARIANTS = [
    (f"{attack} {centre}/{variance}", attack, {"centre": centre, "variance": variance})
    for attack in ("lira_online", "lira_offline")
    for centre in ("mean", "median")
    for variance in ("pooled", "per_cell", "shrunk")
] + [(f"rmia {centre}", "rmia", {"centre": centre}) for centre in ("mean", "median")]


def scores(attack: str, options: dict, target: np.ndarray, shadow: np.ndarray, in_mask, pop):
    if attack == "rmia":
        return su.audit.rmia_scores(target, shadow, in_mask, population=pop, **options)
    return su.audit.lira_scores(target, shadow, in_mask, online=attack == "lira_online", **options)


def target_features(adata, recipe, combo: str, t: int, args) -> tuple[np.ndarray, np.ndarray]:
    """Loss of every cell under target ``t`` and its training mask (cached)."""
    folder = Path(args.cache_dir) / "targets" / combo.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"t{t}.npz"
    rng = np.random.default_rng([args.seed, 1000 + t, zlib.crc32(combo.encode())])
    train = np.sort(rng.choice(adata.n_obs, adata.n_obs // 2, replace=False))
    if not path.exists():
        start = time.perf_counter()
        model = recipe.fit_cells(
            adata, train, seed=1000 + t, accelerator="cpu", enable_progress_bar=False
        )
        loss = su.audit.attack_features(model, adata).to_numpy()[:, LOSS]
        np.savez(path, loss=loss, train=train)
        print(f"{combo} target {t}: {time.perf_counter() - start:.0f} s", flush=True)
    data = np.load(path)
    is_train = np.zeros(adata.n_obs, bool)
    is_train[data["train"]] = True
    return data["loss"], is_train


def run_combo(mi, targets, combo: str, args) -> list[dict]:
    """Pooled scores of every variant at every k; one row per (k, variant)."""
    shadow_loss = mi.shadows_.features[..., LOSS]
    in_mask = mi.shadows_.in_mask
    rng = np.random.default_rng([args.seed, zlib.crc32(combo.encode()), 7])
    subsets = {
        k: [np.sort(rng.choice(N_SHADOWS, k, replace=False)) for _ in range(n)]
        for k, n in zip(KS, args.subsets)
    }
    subsets[N_SHADOWS] = [np.arange(N_SHADOWS)]
    rows = []
    for k in KS:
        for name, attack, options in VARIANTS:
            members, nonmembers = [], []
            for keep in subsets[k]:
                ok = eligible(in_mask[keep])
                for loss, is_train in targets:
                    cells = np.flatnonzero(ok)
                    pop = ~is_train[cells]
                    s = scores(attack, options, loss[cells], shadow_loss[keep][:, cells],
                               in_mask[keep][:, cells], pop)  # fmt: skip
                    good = np.isfinite(s)
                    members.append(s[good & ~pop])
                    nonmembers.append(s[good & pop])
            m, n = np.concatenate(members), np.concatenate(nonmembers)
            row = {"combo": combo, "k": k, "variant": name, "attack": attack, **options}
            if m.size < 2 or n.size < 2:
                rows.append({**row, "runnable": False})
                continue
            boot = su.audit.bootstrap_metrics(m, n, args.n_bootstrap, 0, fprs=(0.01, 0.001))
            row.update(
                runnable=True,
                n_members=int(m.size),
                n_nonmembers=int(n.size),
                auc=float(su.audit.auc_from_scores(m, n)),
                auc_ci=percentile_ci(boot["auc"]),
                tpr_1pct=float(su.audit.tpr_at_fpr(m, n, 0.01)),
                tpr_1pct_ci=percentile_ci(boot["tpr@0.01"]),
                tpr_01pct=float(su.audit.tpr_at_fpr(m, n, 0.001)) if n.size >= 1000 else None,
                tpr_01pct_ci=percentile_ci(boot["tpr@0.001"]) if n.size >= 1000 else None,
            )
            rows.append(row)
    return rows


def report(args) -> None:
    units = [r for p in sorted((OUT / "units").glob("*.json")) for r in json.loads(p.read_text())]
    if not units:
        raise SystemExit(f"No results in {OUT / 'units'}.")
    table = pd.DataFrame(units)
    table = table[table["runnable"]].copy()

    def ci(value, pair, digits=3):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        return f"{value:.{digits}f} [{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"

    table["AUC"] = [ci(a, c) for a, c in zip(table["auc"], table["auc_ci"])]
    table["TPR@1%FPR"] = [ci(a, c) for a, c in zip(table["tpr_1pct"], table["tpr_1pct_ci"])]
    table["TPR@0.1%FPR"] = [ci(a, c) for a, c in zip(table["tpr_01pct"], table["tpr_01pct_ci"])]
    wide = table.pivot_table(index=["combo", "variant"], columns="k", values="auc").round(3)
    wide_tpr = table.pivot_table(index=["combo", "variant"], columns="k", values="tpr_1pct")
    plot(table, OUT / "power.png")
    (OUT / "results.json").write_text(
        json.dumps(
            {
                "settings": {k: v for k, v in vars(args).items() if k != "report_only"},
                "rows": table.drop(columns=["AUC", "TPR@1%FPR", "TPR@0.1%FPR"]).to_dict(
                    orient="records"
                ),
            },
            indent=1,
            default=str,
        )
    )
    md = [
        "# Power per shadow model: centre and variance of LiRA and RMIA",
        "",
        "Command: `python benchmarks/audit_power.py --datasets kang` and `... --datasets "
        "pbmc3k`, then `--report-only` (protocol in its docstring); 1 torch thread per process.",
        "",
        f"Settings: {args.n_cells} random cells per data set, {N_SHADOWS} shadows and "
        f"{args.targets} targets (random halves) per data set x recipe, random shadow subsets "
        f"per k {dict(zip(KS, args.subsets))}; scores of every target and subset pooled per k; "
        f"{args.n_bootstrap} bootstrap replicates. `mean/pooled` (LiRA) and `rmia mean` are the "
        "package's rule before this benchmark.",
        "",
        "## AUC against the number of shadows k",
        "",
        markdown_table(wide, index=True),
        "",
        "## TPR at 1% FPR against k",
        "",
        markdown_table(wide_tpr.round(3), index=True),
        "",
        "![power](power.png)",
        "",
        "## Every row (95% bootstrap CIs)",
        "",
        markdown_table(table[ROW_COLUMNS]),
        "",
    ]
    write_page(OUT, md)


def plot(table: pd.DataFrame, path: Path) -> None:
    combos = list(dict.fromkeys(table["combo"]))
    show = ["lira_online mean/pooled", "lira_online median/pooled", "lira_online mean/shrunk",
            "lira_online median/shrunk", "lira_offline mean/pooled", "lira_offline median/pooled",
            "rmia mean", "rmia median"]  # fmt: skip
    fig, axes = plt.subplots(2, len(combos), figsize=(3.8 * len(combos), 6.6), squeeze=False)
    for j, combo in enumerate(combos):
        part = table[table["combo"] == combo]
        for name in show:
            rows = part[part["variant"] == name].sort_values("k")
            style = "-" if "mean" in name.split()[-1] else "--"
            for i, col in enumerate(("auc", "tpr_1pct")):
                axes[i, j].plot(rows["k"], rows[col], style, marker="o", ms=3, label=name)
        axes[0, j].set_title(combo, fontsize=10)
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(KS, [str(k) for k in KS])
        axes[1, j].set_xlabel("shadow models k")
    axes[0, 0].set_ylabel("AUC (pooled)")
    axes[1, 0].set_ylabel("TPR at 1% FPR")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_subset_arguments(parser)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--subsets", type=int, nargs=len(KS), default=[8, 8, 6, 4, 1])
    parser.add_argument("--n-bootstrap", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="/tmp/audit_power_cache")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet()
    if not args.report_only:
        (OUT / "units").mkdir(parents=True, exist_ok=True)
        for dataset in args.datasets:
            adata = load(dataset, args)
            for name in args.recipes:
                combo = f"{dataset}/{name}"
                recipe = recipe_for(name, args)
                mi = su.MembershipInference(
                    adata, recipe, n_shadows=N_SHADOWS, seed=0,
                    cache_dir=f"{args.cache_dir}/shadows", accelerator="cpu",
                )  # fmt: skip
                mi.fit(progress_bar=False)
                print(f"{combo}: shadows ready", flush=True)
                targets = [
                    target_features(adata, recipe, combo, t, args) for t in range(args.targets)
                ]
                rows = run_combo(mi, targets, combo, args)
                path = OUT / "units" / f"{combo.replace('/', '_')}.json"
                path.write_text(json.dumps(rows, default=float))
    report(args)


if __name__ == "__main__":
    main()
