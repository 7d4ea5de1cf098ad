"""Benchmark: membership audit of scVI on real PBMCs (Kang 2018), and the original's artefact.

What it measures (docs/methods.md: protocol, features, attacks):

1. Megakaryocytes split into trained and held-out halves (``membership_split``); a default
   scVI and a larger scVI are trained on the training cells with a fixed recipe.
2. Each is audited with every attack (loss threshold, LiRA online/offline, shadow classifier,
   cross-validated classifier) against the same-population held-out Megakaryocytes, with the
   OUT shadow models as the reference.
3. The original study's artefact, side by side: the same forget cells scored against the
   nearest unseen cells of *other* cell types (its "matched negatives"), under the audited
   model and under a model that never saw the forget cells (retrain on the retained cells).
4. Runtimes: target training, shadow training, audit, feature throughput (cells/s).

Run (defaults are what the closing note reports)::

    python benchmarks/audit_kang.py --data ../shared/data/kang2018_pbmc12k.h5ad

Writes ``benchmarks/results/audit_kang/{results.json,results.md,roc_*.png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from _common import KANG_FILE, MEMORISING, data_file, markdown_table
from sklearn.neighbors import NearestNeighbors

import scvi_unlearn as su

matplotlib.use("Agg")

RECIPES = {
    "default": {},
    "large": MEMORISING,
}


def artefact_nonmembers(model, adata, forget, unseen, k: int = 10) -> np.ndarray:
    """The original study's "matched negatives" (flaw 1 of the original protocol).

    The k nearest unseen cells of each forget cell in the model's latent space, whatever
    their cell type.
    """
    latent = model.get_latent_representation(indices=np.r_[forget, unseen])
    nn = NearestNeighbors(n_neighbors=k).fit(latent[forget.size :])
    _, idx = nn.kneighbors(latent[: forget.size])
    return np.unique(unseen[idx.ravel()])


def latent_cv_attack(model, members, nonmembers, seed):
    """The original study's kind of attacker, cross-validated.

    A classifier on the features *and* the latent posterior. On a cell-type contrast it
    learns the cell type.
    """
    from scvi_unlearn.audit import cv_classifier_scores
    from scvi_unlearn.audit._report import score_attack

    cells = np.r_[members, nonmembers]
    feats = su.attack_features(model, indices=cells, include_latent=True).to_numpy()
    m, n = cv_classifier_scores(feats[: members.size], feats[members.size :], seed=seed)
    return score_attack("cv_classifier_latent", m, n, [], "", n_bootstrap=500, seed=seed)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata = su.data.kang2018(path=args.data)
    split = su.data.membership_split(
        adata, ("cell_type", args.population), holdout_fraction=0.5, seed=args.seed
    )
    print(adata, split, sep="\n")
    rows, timings, artefact_rows = [], {}, []
    for name in args.recipes:
        recipe = su.Recipe(
            model_kwargs=RECIPES[name],
            train_kwargs={"max_epochs": args.epochs, "train_size": 1.0},
        )
        t0 = time.perf_counter()
        target = recipe.fit_cells(adata, split.train, seed=args.seed, accelerator="cpu")
        t_train = time.perf_counter() - t0

        t0 = time.perf_counter()
        features = su.attack_features(target)
        t_feat = time.perf_counter() - t0

        mi = su.MembershipInference(
            adata,
            recipe=target,
            n_shadows=args.n_shadows,
            seed=args.seed,
            cache_dir=args.cache_dir,
            accelerator="cpu",
        )
        t0 = time.perf_counter()
        mi.fit()
        t_shadows = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = mi.audit(target, members=split.forget, nonmembers=split.nonmember)
        t_audit = time.perf_counter() - t0
        report.to_json(str(out / f"report_{name}.json"))
        ax = report.plot_roc(show=False, title=f"{name} scVI, {args.population}")
        ax.figure.savefig(out / f"roc_{name}.png", dpi=150, bbox_inches="tight")
        plt.close(ax.figure)
        frame = report.to_frame().reset_index()
        frame.insert(0, "recipe", name)
        frame.insert(1, "contrast", "same population (held-out Megakaryocytes)")
        rows.append(frame)
        timings[name] = {
            "target_train_s": t_train,
            "shadow_train_s": t_shadows,
            "shadow_train_s_each": float(np.mean(mi.shadows_.train_seconds)),
            "audit_s": t_audit,
            "feature_cells_per_s": adata.n_obs / t_feat,
            "audit_overhead_vs_shadows": t_audit / max(t_shadows, 1e-9),
            "n_features_rows": int(features.shape[0]),
        }
        print(repr(report))
        print(report.explain())
        print(json.dumps(timings[name], indent=2))

        if name == args.recipes[0]:
            # A model that never saw the forget cells: the original study's artefact test.
            t0 = time.perf_counter()
            retrain = recipe.fit_cells(adata, split.retain, seed=args.seed + 1, accelerator="cpu")
            timings[name]["retrain_s"] = time.perf_counter() - t0
            unseen = np.setdiff1d(np.arange(adata.n_obs), split.train)
            for label, model in (
                ("target (trained on them)", target),
                ("retrain (never saw them)", retrain),
            ):
                other = artefact_nonmembers(model, adata, split.forget, unseen)
                same = split.nonmember
                rng = np.random.default_rng(args.seed)
                cell_type = adata.obs["cell_type"].to_numpy()
                other_types = unseen[cell_type[unseen] != args.population]
                random_other = np.sort(rng.choice(other_types, size=other.size, replace=False))
                for contrast, nonmembers in (
                    ("nearest unseen cells, any type (original)", other),
                    ("random unseen cells of other types", random_other),
                    ("same population (ours)", same),
                ):
                    rep = mi.audit(
                        model,
                        members=split.forget,
                        nonmembers=nonmembers,
                        attacks=("loss", "cv_classifier"),
                    )
                    results = dict(rep.results)
                    results["cv_classifier_latent"] = latent_cv_attack(
                        model, split.forget, nonmembers, args.seed
                    )
                    for attack, r in results.items():
                        types = adata.obs["cell_type"].iloc[nonmembers].value_counts()
                        artefact_rows.append(
                            {
                                "model": label,
                                "contrast": contrast,
                                "attack": attack,
                                "auc": r.auc,
                                "auc_low": r.auc_ci[0],
                                "auc_high": r.auc_ci[1],
                                "n_nonmembers": int(nonmembers.size),
                                "nonmember_share_same_type": float(
                                    types.get(args.population, 0) / nonmembers.size
                                ),
                            }
                        )
    table = pd.concat(rows, ignore_index=True)
    artefact = pd.DataFrame(artefact_rows)
    result = {
        "settings": vars(args),
        "split": split.to_dict() if hasattr(split, "to_dict") else None,
        "audit": table.to_dict(orient="records"),
        "artefact": artefact.to_dict(orient="records"),
        "timings": timings,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    cols = [
        "recipe",
        "attack",
        "auc",
        "auc_low",
        "auc_high",
        "advantage",
        "tpr@1%fpr",
        "reference_low",
        "reference_high",
        "verdict",
    ]
    md = [
        f"# Audit benchmark: Kang 2018, {args.population}",
        "",
        f"Settings: {args.epochs} epochs, train_size=1.0, {args.n_shadows} shadows, "
        f"seed {args.seed}; {split!r}",
        "",
        markdown_table(table[cols]),
        "",
        "## The original study's artefact (forget cells vs other cell types)",
        "",
        markdown_table(artefact),
        "",
        "## Runtimes (2 CPU cores)",
        "",
        markdown_table(pd.DataFrame(timings).T, digits=2, index=True),
    ]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(data_file(KANG_FILE)))
    parser.add_argument("--population", default="Megakaryocytes")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--n-shadows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default="benchmarks/cache")
    parser.add_argument("--out", default="benchmarks/results/audit_kang")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
