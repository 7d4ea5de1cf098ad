"""Deletion-ready training on Kang: what a donor removal costs, and what the design costs.

Protocol (written before running):

- Data: Kang 2018 (``../shared/data/kang2018_pbmc12k.h5ad``, 8 donors in ``sample_id``).
  10% of every donor's cells are held out from every model (seed 0): utility and the trace
  test use only them as cells no model trained on.
- Design: the two largest donors are permanent (their cells train the shared weights); the
  other six are withdrawable, each fitted alone as a query of that base
  (:func:`scvi_unlearn.model.train_deletion_ready`). Requests: the smallest, the middle and the
  largest withdrawable donor, each removed with ``model.unlearn(its training cells)``.
- Recipe: :data:`~scvi_unlearn.model.DELETION_READY_MODEL_KWARGS` (scArches' layer-norm scVI,
  donors as the batch), ``--epochs`` for the base and every donor's fit; the normal models
  (the full model, and the full retrain without each donor) use the same architecture and
  epochs, trained jointly, so only the training procedure differs.
- Rows per (donor, seed): the normal full model, the deletion-ready model before removal, the
  full retrain without the donor, the deletion-ready model after removal. Utility on the
  held-out cells of the remaining donors: neg. ELBO, k-NN cell-type accuracy, donor mixing
  (mean normalised entropy of donors among 15 latent neighbours). Times: the removal against
  the full retrain, measured in the same run; the preparation (base + every donor's fit)
  against the normal full model, in its own column.
- Trace of the donor in shared weights: each model scores the donor's training cells and its
  held-out cells as if they came from the first permanent donor (its column), so only shared
  weights act; AUC of the loss (members lower). A per-cell LiRA audit against a retrain band
  does not apply after removal: a model without the donor's column cannot score the donor's
  cells as the donor's (scvi-tools refuses an unknown batch), for the retrain as for the
  removal. The trace test is what measures the same question through the shared weights.
- Seeds 0..``--seeds``-1 (every model's seed); one torch thread.

Outputs: ``benchmarks/results/deletion_ready/results.{md,json}``, ``rows.json``; with
``--partial N`` (N random training cells of the middle requested donor, removed by
``refit_donors``, against the full retrain without them; utility on every held-out cell)
``results_partial.{md,json}`` and ``rows_partial.json``.

    python benchmarks/deletion_ready.py [--seeds 3] [--epochs 100]
    # some cells of one donor (refit_donors) instead of whole donors
    python benchmarks/deletion_ready.py --partial 100 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import KANG_FILE, QUIET, data_file, git_commit, utc_date, write_results
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

import scvi_unlearn as su

DONOR_KEY = "sample_id"
HELD_OUT = 0.1
N_PERMANENT = 2


def load() -> tuple[object, np.ndarray, np.ndarray]:
    """Kang, its training cells and its held-out cells (10% of every donor)."""
    adata = su.data.kang2018(path=data_file(KANG_FILE))
    rng = np.random.default_rng(0)
    held = []
    for donor in sorted(adata.obs[DONOR_KEY].astype(str).unique()):
        cells = np.flatnonzero((adata.obs[DONOR_KEY].astype(str) == donor).to_numpy())
        held.append(rng.choice(cells, size=round(HELD_OUT * cells.size), replace=False))
    held_out = np.sort(np.concatenate(held))
    return adata, np.setdiff1d(np.arange(adata.n_obs), held_out), held_out


def design(adata, train) -> tuple[list[str], list[str]]:
    """(permanent donors, requested donors) by the protocol's size rule."""
    sizes = adata.obs[DONOR_KEY].astype(str).iloc[train].value_counts()
    permanent = sorted(sizes.index[:N_PERMANENT])
    withdrawable = sizes.drop(permanent).sort_values()
    picks = [withdrawable.index[0], withdrawable.index[len(withdrawable) // 2],
             withdrawable.index[-1]]  # fmt: skip
    return permanent, picks


def normal_fit(adata, cells, epochs: int, seed: int):
    recipe = su.Recipe(
        setup_kwargs={"batch_key": DONOR_KEY},
        model_kwargs=dict(su.model.DELETION_READY_MODEL_KWARGS),
        train_kwargs={"max_epochs": epochs},
    )
    start = time.perf_counter()
    model = recipe.fit(adata[cells].copy(), seed=seed, **QUIET)
    return model, time.perf_counter() - start


def utility(model, adata, cells) -> dict[str, float]:
    data = adata[cells].copy()
    u = su.utility.utility_metrics(model, data, markers=[])
    latent = model.get_latent_representation(data)
    donors = data.obs[DONOR_KEY].astype(str).to_numpy()
    return {"neg_elbo": u["neg_elbo"], "knn_accuracy": u["knn_accuracy"],
            "donor_mixing": donor_mixing(latent, donors)}  # fmt: skip


def donor_mixing(latent: np.ndarray, donors: np.ndarray, k: int = 15) -> float:
    """Mean over cells of the entropy of donors among k latent neighbours / log(#donors)."""
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(latent)
    codes = pd.Categorical(donors).codes
    n = int(codes.max()) + 1
    counts = np.stack([np.bincount(row, minlength=n) for row in codes[idx[:, 1:]]])
    p = counts / k
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(entropy.mean() / np.log(n))


def trace_auc(model, adata, members, nonmembers, as_donor: str) -> float:
    """Loss AUC of a donor's training vs held-out cells, scored as ``as_donor``."""
    cells = np.concatenate([members, nonmembers])
    data = adata[cells].copy()
    data.obs[DONOR_KEY] = as_donor
    loss = su.attack_features(model, data)["neg_elbo"].to_numpy()
    labels = np.r_[np.ones(members.size), np.zeros(nonmembers.size)]
    return float(roc_auc_score(labels, -loss))


def run_seed(adata, train, held_out, permanent, picks, epochs, seed) -> list[dict]:
    rows = []
    donors = adata.obs[DONOR_KEY].astype(str).to_numpy()
    full, full_s = normal_fit(adata, train, epochs, seed)
    start = time.perf_counter()
    ready = su.train_deletion_ready(
        adata[train].copy(), DONOR_KEY, permanent, train_kwargs={"max_epochs": epochs},
        seed=seed, **QUIET,
    )  # fmt: skip
    prep_s = time.perf_counter() - start
    print(f"seed {seed}: full model {full_s:.0f} s, deletion-ready {prep_s:.0f} s", flush=True)
    for donor in picks:
        members = np.intersect1d(train, np.flatnonzero(donors == donor))
        nonmembers = np.intersect1d(held_out, np.flatnonzero(donors == donor))
        rest = np.setdiff1d(held_out, nonmembers)
        forget = np.flatnonzero(ready.adata.obs[DONOR_KEY].astype(str).to_numpy() == donor)
        forget = np.intersect1d(forget, ready.train_indices)
        start = time.perf_counter()
        removed = ready.unlearn(forget, **QUIET)
        removal_s = time.perf_counter() - start
        retrain, retrain_s = normal_fit(adata, np.setdiff1d(train, members), epochs, seed)
        assert removed.provenance["events"][-1]["method"] == "drop_donors"
        for row, model, seconds in (
            ("normal full model", full, full_s),
            ("deletion-ready, before removal", ready, prep_s),
            ("full retrain without the donor", retrain, retrain_s),
            ("deletion-ready, donor removed", removed, removal_s),
        ):
            rows.append({
                "donor": donor, "n_donor_cells": int(members.size), "seed": seed, "row": row,
                "seconds": seconds, "retrain_s": retrain_s, "full_s": full_s, "prep_s": prep_s,
                **utility(model, adata, rest),
                "trace_auc": trace_auc(model, adata, members, nonmembers, permanent[0]),
            })  # fmt: skip
        print(pd.DataFrame(rows[-4:]).to_string(), flush=True)
    return rows


def run_partial(adata, train, held_out, permanent, donor, n_cells, epochs, seed) -> list[dict]:
    """Some cells of one withdrawable donor: ``refit_donors`` against the full retrain."""
    ready = su.train_deletion_ready(
        adata[train].copy(), DONOR_KEY, permanent, train_kwargs={"max_epochs": epochs},
        seed=seed, **QUIET,
    )  # fmt: skip
    own = np.flatnonzero(ready.adata.obs[DONOR_KEY].astype(str).to_numpy() == donor)
    own = np.intersect1d(own, ready.train_indices)
    forget = np.sort(np.random.default_rng(seed).choice(own, n_cells, replace=False))
    start = time.perf_counter()
    removed = ready.unlearn(forget, **QUIET)
    removal_s = time.perf_counter() - start
    assert removed.provenance["events"][-1]["method"] == "refit_donors"
    names = ready.adata.obs_names[forget]
    cells = np.setdiff1d(train, adata.obs_names.get_indexer(names))
    retrain, retrain_s = normal_fit(adata, cells, epochs, seed)
    rows = []
    for row, model, seconds in (
        ("full retrain without the cells", retrain, retrain_s),
        ("deletion-ready, cells removed (refit_donors)", removed, removal_s),
    ):
        rows.append({"donor": donor, "n_forgotten": n_cells, "seed": seed, "row": row,
                     "seconds": seconds, "retrain_s": retrain_s,
                     **utility(model, adata, held_out)})  # fmt: skip
    print(pd.DataFrame(rows).to_string(), flush=True)
    return rows


def summarise_partial(rows: pd.DataFrame) -> pd.DataFrame:
    ref = rows[rows["row"] == "full retrain without the cells"].set_index("seed")
    out = []
    for row, g in rows.groupby("row", sort=False):
        g = g.set_index("seed")
        out.append({
            "request": f"{int(g['n_forgotten'].iloc[0])} cells of donor {g['donor'].iloc[0]}",
            "row": row, "seeds": len(g),
            "neg. ELBO vs full retrain": (g["neg_elbo"] / ref["neg_elbo"] - 1).mean(),
            "k-NN accuracy": g["knn_accuracy"].mean(),
            "donor mixing": g["donor_mixing"].mean(),
            "x full retrain (time)": (g["seconds"] / g["retrain_s"]).median(),
        })  # fmt: skip
    return pd.DataFrame(out)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (donor, row), g in rows.groupby(["donor", "row"], sort=False):
        ref = rows[(rows["donor"] == donor) & (rows["row"] == "full retrain without the donor")]
        full = rows[(rows["donor"] == donor) & (rows["row"] == "normal full model")]
        merged = g.merge(ref, on="seed", suffixes=("", "_ref")).merge(
            full, on="seed", suffixes=("", "_full")
        )
        is_removal = row == "deletion-ready, donor removed"
        out.append({
            "donor (cells)": f"{donor} ({int(g['n_donor_cells'].iloc[0])})",
            "row": row, "seeds": len(g),
            "neg. ELBO vs retrain without donor": (merged["neg_elbo"] / merged["neg_elbo_ref"]
                                                   - 1).mean(),
            "neg. ELBO vs normal full model": (merged["neg_elbo"] / merged["neg_elbo_full"]
                                               - 1).mean(),
            "k-NN accuracy": g["knn_accuracy"].mean(),
            "donor mixing": g["donor_mixing"].mean(),
            "trace AUC (shared weights)": g["trace_auc"].mean(),
            "x full retrain (time)": (g["seconds"] / g["retrain_s"]).median()
            if is_removal or row == "full retrain without the donor" else np.nan,
            "one-time preparation x full model": (g["prep_s"] / g["full_s"]).median()
            if row.startswith("deletion-ready") else np.nan,
        })  # fmt: skip
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--partial",
        type=int,
        default=None,
        metavar="N",
        help="Instead: N random training cells of the middle requested donor (refit_donors).",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "deletion_ready"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.exists() else []
    adata, train, held_out = load()
    permanent, picks = design(adata, train)
    print(f"permanent {permanent}; requests {picks}", flush=True)
    if args.partial is not None:
        return partial(args, out, adata, train, held_out, permanent, picks[1])
    if not args.report_only:
        head = git_commit()
        done = {r["seed"] for r in rows}
        for seed in range(args.seeds):
            if seed in done:
                continue
            new = run_seed(adata, train, held_out, permanent, picks, args.epochs, seed)
            rows += [{**r, "commit": head} for r in new]
            rows_file.write_text(json.dumps(rows, indent=2))
    table = summarise(pd.DataFrame(rows))
    # The commit of the run that computed the rows (a report-only rerun keeps it).
    commit = ", ".join(sorted({r.get("commit", "unknown") for r in rows}))
    seeds = sorted({r["seed"] for r in rows})
    removal = table[table["row"] == "deletion-ready, donor removed"]
    worst_time = removal["x full retrain (time)"].max()
    worst_gap = removal["neg. ELBO vs retrain without donor"].max()
    targets = [
        f"- Removal <= 0.02x of a full retrain: worst request {worst_time:.4f}x "
        f"({'met' if worst_time <= 0.02 else 'NOT met'}).",
        f"- Utility within 2% of a full retrain without the donor: worst request "
        f"{worst_gap:+.1%} ({'met' if worst_gap <= 0.02 else 'NOT met'}).",
        "- Per-cell LiRA and the donor-level audit against the retrain band: not applicable. A "
        "model without the donor's column (the removal, and every retrain without the donor) "
        "cannot score the donor's cells as the donor's; the trace column scores them through "
        "the shared weights (as a permanent donor) instead, and the removal is bit-identical "
        "to the design trained without the donor (tests; `verify_unlearning`).",
    ]
    write_results(
        out, "results", "Deletion-ready training: removing a donor exactly",
        f"Command: `python benchmarks/deletion_ready.py --seeds {args.seeds} --epochs "
        f"{args.epochs}`; commit {commit}, {utc_date()}; seeds "
        f"{seeds}; 1 torch thread; times from the same run. Permanent donors {permanent}; "
        f"utility on the held-out cells of the remaining donors.",
        table, ["", "Targets:", "", *targets], commit=commit,
    )  # fmt: skip


def partial(args, out: Path, adata, train, held_out, permanent, donor) -> None:
    """``--partial N``: rows, summary and page of the partial-donor request."""
    head = git_commit()
    rows_file = out / "rows_partial.json"
    rows = json.loads(rows_file.read_text()) if rows_file.exists() else []
    if not args.report_only:
        done = {r["seed"] for r in rows}
        for seed in range(args.seeds):
            if seed not in done:
                new = run_partial(adata, train, held_out, permanent, donor, args.partial,
                                  args.epochs, seed)  # fmt: skip
                rows += [{**r, "commit": head} for r in new]
                rows_file.write_text(json.dumps(rows, indent=2))
    table = summarise_partial(pd.DataFrame(rows))
    commit = ", ".join(sorted({r.get("commit", "unknown") for r in rows}))
    write_results(
        out, "results_partial", "Deletion-ready training: removing some cells of a donor",
        f"Command: `python benchmarks/deletion_ready.py --partial {args.partial} --seeds "
        f"{args.seeds} --epochs {args.epochs}`; commit {commit}, "
        f"{utc_date()}; seeds {sorted({r['seed'] for r in rows})}; 1 "
        "torch thread; times from the same run; utility on every held-out cell.",
        table, commit=commit,
    )  # fmt: skip


if __name__ == "__main__":
    main()
