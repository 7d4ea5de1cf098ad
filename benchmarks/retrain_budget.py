"""Exact unlearning on a budget: how much of the full retrain does ``retrain_fast`` need?

The unlearning protocol measured that a Kang retrain at 10-25% of the epochs matched the full
one on held-out ELBO. This script checks that claim on each forget set before anything builds
on it.

Protocol (written before running):

- Data: Kang 2018 (12,261 cells x 1,287 genes, raw counts, ``../shared/data``).
- Forget sets: structured = Dendritic cells (the protocol's headline rare type, 203 cells),
  scattered = as many random cells, donor = the smallest donor; for each, half of the
  population is held out as never-seen cells (``membership_split``) and the held-out cells of
  *other* populations ("background") measure utility.
- Target: the memorising scVI (``n_hidden=512, n_layers=2, n_latent=30``), 100 epochs,
  ``train_size=1.0``; seed 0.
- Rows: ``retrain`` (the full recipe on the retained cells) and ``retrain_fast`` at budgets
  0.1, 0.25 and 0.5 (one-cycle schedule, peak lr 3x the recipe's, KL warm-up scaled to the
  budget), each with ``--seeds`` seeds. Both are exact: the forget cells are never in the data
  they see, so privacy needs no audit; the question is utility and time.
- Utility: held-out background negative ELBO per cell (lower is better), KL, k-NN cell-type
  accuracy; gap to the mean of the full retrains; wall time and its ratio to the full retrain
  (same run, same machine, one torch thread).

Outputs: ``benchmarks/results/retrain_budget/results.{md,json}``.

    python benchmarks/retrain_budget.py [--seeds 2] [--forget structured scattered donor]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import KANG_FILE, TARGET, data_file, write_results

import scvi_unlearn as su

BUDGETS = (0.1, 0.25, 0.5)


def make_split(adata, forget: str, seed: int):
    """Membership split of one forget set; half of its population held out."""
    if forget == "structured":
        population = ("cell_type", "Dendritic cells")
    elif forget == "scattered":
        n = int((adata.obs["cell_type"] == "Dendritic cells").sum())
        population = su.data.scattered_forget_set(adata, n, seed=seed)
    elif forget == "donor":
        population = ("sample_id", adata.obs["sample_id"].value_counts().index[-1])
    else:
        raise ValueError(forget)
    return su.data.membership_split(adata, population, holdout_fraction=0.5, seed=seed)


def utility(model, cells, adata) -> dict:
    """Utility on ``cells`` of ``adata`` (an unlearned model's AnnData lacks the forget cells)."""
    u = su.utility.utility_metrics(model, adata, indices=cells, labels_key="cell_type")
    return {k: u[k] for k in ("neg_elbo", "kl", "knn_accuracy")}


def run(forget: str, adata, args) -> list[dict]:
    split = make_split(adata, forget, args.seed)
    background = np.setdiff1d(split.heldout, split.nonmember)
    print(f"\n=== {forget}: {split!r}; {background.size} background cells", flush=True)
    recipe = su.Recipe(
        model_kwargs=TARGET, train_kwargs={"max_epochs": args.epochs, "train_size": 1.0}
    )
    t0 = time.perf_counter()
    target = recipe.fit_cells(
        adata, split.train, seed=args.seed, accelerator="cpu", enable_progress_bar=False
    )
    rows = [
        {
            "forget": forget,
            "method": "trained (baseline)",
            "budget": 1.0,
            "seed": args.seed,
            "seconds": time.perf_counter() - t0,
            **utility(target, background, adata),
        }
    ]
    print(rows[-1], flush=True)
    settings = [("retrain", None)] + [("retrain_fast", b) for b in BUDGETS]
    for method, budget in settings:
        for seed in range(args.seeds):
            kwargs = {} if budget is None else {"budget": budget}
            t0 = time.perf_counter()
            model = target.unlearn(
                split.forget,
                method=method,
                seed=seed,
                accelerator="cpu",
                enable_progress_bar=False,
                **kwargs,
            )
            seconds = time.perf_counter() - t0
            event = model.provenance["events"][-1]
            rows.append(
                {
                    "forget": forget,
                    "method": method,
                    "budget": budget or 1.0,
                    "seed": seed,
                    "epochs": event["max_epochs"],
                    "seconds": seconds,
                    **utility(model, background, adata),
                }
            )
            print(rows[-1], flush=True)
    return rows


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    out = []
    for forget, part in rows.groupby("forget", sort=False):
        full = part[part["method"] == "retrain"]
        ref_elbo, ref_s = full["neg_elbo"].mean(), full["seconds"].mean()
        for (method, budget), g in part.groupby(["method", "budget"], sort=False):
            out.append(
                {
                    "forget set": forget,
                    "method": method,
                    "budget": budget,
                    "seeds": len(g),
                    "held-out neg. ELBO": g["neg_elbo"].mean(),
                    "gap to full retrain": g["neg_elbo"].mean() / ref_elbo - 1,
                    "KL": g["kl"].mean(),
                    "k-NN accuracy": g["knn_accuracy"].mean(),
                    "seconds": g["seconds"].mean(),
                    "x full retrain": g["seconds"].mean() / ref_s,
                }
            )
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forget", nargs="+", default=["structured", "scattered", "donor"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "retrain_budget"))
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the tables from the saved rows.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        rows = json.loads((out / "rows.json").read_text())
    else:
        adata = su.data.kang2018(path=data_file(KANG_FILE))
        rows = []
        for forget in args.forget:
            rows += run(forget, adata, args)
            (out / "rows.json").write_text(json.dumps(rows, indent=2))  # resumable record
    table = summarise(pd.DataFrame(rows))
    write_results(
        out, "results", "Exact unlearning on a budget (Kang 2018, memorising scVI)",
        f"Command: `python benchmarks/retrain_budget.py --seeds {args.seeds}`; "
        "1 torch thread; times measured in the same run.",
        table,
    )  # fmt: skip


if __name__ == "__main__":
    main()
