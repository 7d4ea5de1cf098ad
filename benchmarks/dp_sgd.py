"""Benchmark: is a DP-SGD-trained scVI already "unlearned"?

A model trained with DP-SGD bounds what any one cell changes; if the bound is tight enough, a
membership audit of the forget cells should find them no more member-like than a model retrained
without them. This measures it on real PBMCs with the protocol of ``unlearning_protocol.py``:

- Data: pbmc3k, 1,000 ``seurat_v3`` HVGs (``unlearning.load``). Forget sets (``--forget``):
  the reporting sets of ``unlearning_protocol.py`` (``pair_of_splits``): ``structured``, its
  reporting population (FCGR3A+ Mono), and ``scattered``, as many random cells;
  ``membership_split`` holds out half of each as same-population non-members and 15% of the
  other cells as held-out background.
- Architecture for every model: the protocol's target (``--target memorising``: ``TARGET`` at
  ``DATASET_SETTINGS`` epochs; ``default``: scVI's default sizes) with layer norm and no batch
  norm (``use_batch_norm="none", use_layer_norm="both"``), which DP-SGD requires; the
  non-private rows use the same architecture so that only the optimiser differs.
- Rows: the non-private model trained on all training cells (its leak is the "before");
  ``--retrain-seeds`` (default 8) exact retrains on the retained cells (the band,
  ``su.audit.reference_band``); DP-SGD models (``su.train.train_dp``, RDP accountant,
  ``delta = --delta-share / n_train`` (default 1, as the record ran; the library's own default
  is 0.1), clipping norm 1, expected batch 128, same epochs, ghost clipping)
  at each of ``--epsilons`` (default 1, 10, 50), ``--dp-seeds`` (default 3) seeds each (the
  seed sets the initial weights, the Poisson batches and the noise).
- Which epsilon reaches the band: per forget set, the largest epsilon (least noise) whose
  seeds are "forgotten" (inside the band, or below it undetectably, with held-out neg. ELBO
  within 5% of the mean retrain's) in at least 2 of 3; "none" if no epsilon is. No choice is
  made on these cells: this is a report, not a selection.
- ``--train-on train`` (default): the DP models train on all training cells, forget cells
  included, as the target does: the question is whether DP alone keeps the forget cells inside
  the retrain band (no unlearning needed). ``retained``: they train on the retained cells only
  (then they are a private retrain and the audit is a sanity check); ``both``: both rows.
- Audit: ``MembershipInference`` (``--n-shadows`` shadows of the non-private recipe, cached),
  LiRA (online) AUC of forget cells vs non-members with its bootstrap CI, loss-threshold AUC,
  verdict by ``su.audit.paired_verdict`` against the retrains' AUCs on the same cells (records
  made before that rule judged the CI against ``mean +- 2 sqrt(SD^2 + SE^2)``),
  ``su.audit.overall_result`` with held-out
  neg. ELBO against the mean retrain's. The shadows are trained without DP (the library's
  recipe has no DP option), so LiRA's reference distributions are those of non-private models:
  the audit stays valid as a test (AUC of forget vs non-members), less so as a calibrated
  likelihood ratio.
- Wall time of each model, and its ratio to the mean retrain time measured in the same run.

Writes ``cells/pbmc3k_<forget>_<target>.json`` per forget set and ``results.json`` /
``results.md`` over all of them to ``--out`` (default ``benchmarks/results/dp_sgd``).
``--smoke`` runs the whole pipeline on tiny synthetic data (1 epoch, 3 retrain seeds, 2 DP
seeds, 2 shadows; a temporary output folder unless ``--out`` is given).

Run::

    python benchmarks/dp_sgd.py --epochs 20   # pbmc3k, both sets: ~1 h on 2 CPU cores
    python benchmarks/dp_sgd.py --smoke    # the pipeline on tiny synthetic data, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import DATASET_SETTINGS, QUIET, TARGET, load, markdown_table, require_data
from _protocol import pair_of_splits

import scvi_unlearn as su
from scvi_unlearn._utils import dump_json

LAYER_NORM = {"use_batch_norm": "none", "use_layer_norm": "both"}
EPSILONS = (1.0, 10.0, 50.0)
#: Row kinds: cell-level DP-SGD, donor-level DP-SGD, certified unlearning of the target.
ROW_KINDS = ("dp", "donor_dp", "certified")
#: The column naming each cell's donor (the unit of donor-level DP and of a donor request).
DONOR_KEYS = {"kang": "sample_id"}


def setup(args) -> tuple:
    """Data and non-private recipe (real data, or tiny synthetic data for ``--smoke``)."""
    if args.smoke:
        adata = su.data.synthetic_pbmc(n_cells=300, n_genes=100, seed=args.seed)
        arch, epochs = {"n_hidden": 32, "n_latent": 4}, 1
    else:
        settings = DATASET_SETTINGS[args.dataset]
        adata = load(args.dataset, settings["n_hvg"])
        arch = TARGET if args.target == "memorising" else {}
        epochs = args.epochs or settings["epochs"]
    recipe = su.Recipe(
        model_kwargs={**arch, **LAYER_NORM},
        train_kwargs={"max_epochs": int(epochs), "train_size": 1.0},
    )
    return adata, recipe, int(epochs)


def forget_split(adata, forget_type: str, args):
    """The reporting split of ``unlearning_protocol.py`` (``--smoke``: NK cells or random)."""
    if not args.smoke:
        return pair_of_splits(adata, args.dataset, forget_type, args.seed)[0]
    cells = ("cell_type", "NK")
    if forget_type == "donor":
        cells = ("donor", adata.obs["donor"].value_counts().index[-1])
    if forget_type == "scattered":
        cells = su.data.scattered_forget_set(adata, 40, seed=args.seed)
    return su.data.membership_split(adata, cells, holdout_fraction=0.5, seed=args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    parser.add_argument("--dataset", choices=["pbmc3k", "kang"], default="pbmc3k")
    parser.add_argument(
        "--forget", nargs="+", choices=["structured", "scattered", "donor"],
        default=["structured", "scattered"],
    )  # fmt: skip
    parser.add_argument(
        "--rows", nargs="+", choices=ROW_KINDS, default=["dp"],
        help="dp: cell-level DP-SGD; donor_dp: donor-level DP-SGD (Kang); certified: "
        "method='certified' on the target",
    )  # fmt: skip
    parser.add_argument("--dp-seeds", type=int, default=3, help="DP models per epsilon")
    parser.add_argument("--grad-sample-mode", choices=["ghost"], default="ghost")
    parser.add_argument("--target", choices=["memorising", "default"], default="memorising")
    parser.add_argument("--train-on", choices=["train", "retained", "both"], default="train")
    parser.add_argument("--epochs", type=int, default=None, help="default: DATASET_SETTINGS")
    parser.add_argument("--retrain-seeds", type=int, default=8)
    parser.add_argument("--n-shadows", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128, help="expected DP batch size")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument(
        "--delta-share", type=float, default=1.0,
        help="delta = this / n_train (the record: 1; the library's default: 0.1)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default="benchmarks/cache")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/dp_sgd")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data, 1 epoch")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite results.md from --out/cells/*.json"
    )
    args = parser.parse_args()
    if args.smoke:
        args.retrain_seeds, args.n_shadows = min(args.retrain_seeds, 3), 2
        args.dp_seeds = min(args.dp_seeds, 2)
    else:
        require_data()
    out = Path(args.out or (tempfile.mkdtemp() if args.smoke else "benchmarks/results/dp_sgd"))
    (out / "cells").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.report_only:
        paths = sorted((out / "cells").glob("*.json"))
        cells = [without_cell_names(json.loads(p.read_text())) for p in paths]
        for path, cell in zip(paths, cells):
            dump_json(cell, str(path))
        report(out, cells)
        return

    adata, recipe, epochs = setup(args)
    cells = []
    for forget_type in args.forget:
        cells.append(run_forget_set(adata, recipe, epochs, forget_type, args, out))
        report(out, cells)


def run_forget_set(adata, recipe, epochs: int, forget_type: str, args, out: Path) -> dict:
    """Target, retrain band and DP rows for one forget set; writes its cell JSON."""
    split = forget_split(adata, forget_type, args)
    forget, nonmember = split.forget, split.nonmember
    retain = np.setdiff1d(split.train, forget)
    background = np.setdiff1d(split.heldout, nonmember)
    print(f"\n=== {forget_type}: {forget.size} forget vs {nonmember.size} non-members; "
          f"{retain.size} retained, {background.size} background; {epochs} epochs")  # fmt: skip

    t0 = time.perf_counter()
    target = recipe.fit_cells(adata, split.train, seed=args.seed, **QUIET)
    target_s = time.perf_counter() - t0
    cache = False if args.smoke else Path(args.cache_dir) / "dp_sgd"
    mi = su.MembershipInference(
        adata, recipe=target, n_shadows=args.n_shadows, seed=args.seed, cache_dir=cache,
        accelerator="cpu", attacks=("loss", "lira_online"),
    )  # fmt: skip
    mi.fit(progress_bar=False)

    def audit(model):
        report = mi.audit(model, members=forget, nonmembers=nonmember, n_bootstrap=500)
        return report.results["lira_online"], report.results["loss"]

    # -- the band: exact retrains on the retained cells ------------------------------------
    retrains = []
    for s in range(args.retrain_seeds):
        t0 = time.perf_counter()
        retrains.append(
            (recipe.fit_cells(adata, retain, seed=s, **QUIET), time.perf_counter() - t0)
        )
        print(f"retrain seed {s}: {retrains[-1][1]:.0f} s")
    retrain_s = float(np.mean([t for _, t in retrains]))
    elbos = [
        su.utility.utility_metrics(m, adata, indices=background)["neg_elbo"] for m, _ in retrains
    ]
    retrain_elbo = float(np.mean(elbos))
    references = [audit(m)[0].auc for m, _ in retrains]  # the paired verdict's references
    band = su.audit.reference_band(references)
    print(f"retrain band: {band[0]:.3f}-{band[1]:.3f}")

    def row(name, model, seconds, exact=False, privacy=None, seed=None):
        lira, loss = audit(model)
        verdict = su.audit.paired_verdict(lira.auc, references, forget.size, nonmember.size)[0]
        elbo = su.utility.utility_metrics(model, adata, indices=background)["neg_elbo"]
        record = {
            "forget": forget_type, "model": name, "seed": seed, "lira_auc": lira.auc,
            "lira_low": lira.auc_ci[0], "lira_high": lira.auc_ci[1], "band_low": band[0],
            "band_high": band[1], "verdict": verdict, "loss_auc": loss.auc,
            "heldout_neg_elbo": elbo, "utility_vs_retrain": elbo / retrain_elbo - 1,
            "overall": su.audit.overall_result(verdict, elbo / retrain_elbo - 1, exact=exact),
            "wall_s": seconds, "time_vs_retrain": seconds / retrain_s,
        }  # fmt: skip
        if privacy is not None:
            keys = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "n_train",
                    "grad_sample_mode", "privacy_unit", "n_units")  # fmt: skip
            record.update({f"dp_{k}": privacy.get(k) for k in keys})
        print({k: record[k] for k in ("model", "lira_auc", "verdict", "overall", "wall_s")})
        return record

    rows = [row("non-private (train)", target, target_s, seed=args.seed)]
    rows += [row("retrain", m, t, exact=True, seed=s) for s, (m, t) in enumerate(retrains)]
    sets = {"train": split.train, "retained": retain}
    kinds = (("dp", "cell", "DP"), ("donor_dp", "donor", "donor-DP"))
    units = [(unit, label) for kind, unit, label in kinds if kind in args.rows]
    for unit, label in units:
        for on in ["train", "retained"] if args.train_on == "both" else [args.train_on]:
            for eps in args.epsilons:
                for seed in range(args.seed, args.seed + args.dp_seeds):
                    t0 = time.perf_counter()
                    model = recipe.build(adata.copy(), seed=seed)
                    summary = su.train.train_dp(
                        model, target_epsilon=eps, max_epochs=epochs, seed=seed,
                        batch_size=args.batch_size, max_grad_norm=args.max_grad_norm,
                        indices=sets[on], grad_sample_mode=args.grad_sample_mode,
                        **dp_unit(unit, len(sets[on]), args), **QUIET,
                    )  # fmt: skip
                    seconds = time.perf_counter() - t0
                    name = f"{label} eps={eps:g} ({on})"
                    rows.append(row(name, model, seconds, exact=on == "retained",
                                    privacy=summary, seed=seed))  # fmt: skip
    if "certified" in args.rows:
        rows += certified_rows(target, adata, split, row, args)
    cell = {
        "dataset": "synthetic (smoke)" if args.smoke else args.dataset, "forget": forget_type,
        "target": args.target, "epochs": epochs, "train_on": args.train_on,
        "retrain_seeds": args.retrain_seeds, "dp_seeds": args.dp_seeds,
        "n_shadows": args.n_shadows, "n_forget": int(forget.size),
        "n_nonmembers": int(nonmember.size), "retrain_band": list(band),
        "retrain_mean_s": retrain_s, "target_s": target_s,
        "retrain_mean_heldout_neg_elbo": retrain_elbo, "settings": vars(args), "rows": rows,
    }  # fmt: skip
    dump_json(cell, str(out / "cells" / f"{cell['dataset'].split()[0]}_{forget_type}_"
                                       f"{args.target}.json"))  # fmt: skip
    return cell


def dp_unit(unit: str, n_cells: int, args) -> dict:
    """``train_dp`` keywords of a privacy unit (delta: the record's share for cells)."""
    if unit == "cell":
        return {"target_delta": args.delta_share / n_cells}
    key = "donor" if args.smoke else DONOR_KEYS.get(args.dataset)
    if key is None:
        raise SystemExit(f"--rows donor_dp needs donors; {args.dataset} has none (use kang).")
    # delta: the library's default for donors, 0.1 / n_donors
    return {"privacy_unit": "donor", "donor_key": key}


def certified_rows(target, adata, split, row, args) -> list[dict]:
    """``method='certified'`` on the target at each epsilon, run even where it refuses.

    A model the noise has made non-finite cannot be audited: its row says so, with no cell
    named (the audit's error message names cells).
    """
    rows = []
    for eps in args.epsilons:
        try:
            target.unlearn(split.forget, method="certified", epsilon=eps, **QUIET)
            refusal = None
        except su.train.NoiseDominatedError as err:
            refusal = str(err)
        t0 = time.perf_counter()
        model = target.unlearn(
            split.forget, method="certified", epsilon=eps, allow_noise_dominated=True,
            damage_limit=None, **QUIET,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        cert = model.provenance["events"][-1]["metrics"]["certificate"]
        name = f"certified eps={eps:g}"
        try:
            record = row(name, model, seconds)
        except ValueError:  # weights the noise made non-finite cannot be audited
            record = {"model": name, "verdict": NOT_AUDITABLE, "overall": DESTROYED,
                      "wall_s": seconds}  # fmt: skip
        record.update(
            certified_noise_std=cert["noise_std"], certified_steps=cert["steps"],
            certified_noise_to_weights=cert["noise_to_weights"],
            certified_delta=cert["delta"], refused_by_default=refusal is not None,
            refusal=refusal,
        )  # fmt: skip
        print({k: record.get(k) for k in ("model", "certified_noise_to_weights", "verdict")})
        rows.append(record)
    return rows


#: Row-name prefixes of the DP-SGD rows and what they are.
UNIT_LABELS = (("DP", "cell-level DP-SGD"), ("donor-DP", "donor-level DP-SGD"))
#: A certified row whose weights the noise made non-finite.
NOT_AUDITABLE = "not auditable: non-finite attack features (the noise destroyed the weights)"
DESTROYED = "failed (model destroyed)"


def certified_line(frame: pd.DataFrame) -> list[str]:
    """One line on the certified rows: how much the noise outweighs the weights."""
    rows = frame[frame.model.str.startswith("certified")]
    if rows.empty:
        return []
    ratios = ", ".join(f"{r.model.split('=')[1]}: {r.certified_noise_to_weights:.3g}"
                       for r in rows.itertuples())  # fmt: skip
    refused = int(rows.refused_by_default.sum())
    return [f"- certified unlearning: accumulated noise / weights' RMS by epsilon ({ratios}); "
            f"refused by default at {refused} of {len(rows)} epsilons; "
            f"{int((rows.overall == DESTROYED).sum())} of {len(rows)} models destroyed."
            ]  # fmt: skip


def without_cell_names(cell: dict) -> dict:
    """A record made before rows said why they were not auditable without naming cells."""
    for record in cell["rows"]:
        if str(record.get("verdict", "")).startswith("not auditable"):
            record["verdict"] = NOT_AUDITABLE
    return cell


def largest_epsilon(frame: pd.DataFrame, passes, prefix: str = "DP") -> str:
    """Largest target epsilon whose seeds pass in >= 2 of 3 (a majority), or "none"."""
    passing = []
    for name, part in frame[frame.model.str.startswith(prefix)].groupby("model"):
        if su.audit.most_seeds(passes(part).sum(), len(part)):
            passing.append(float(name.split("=")[1].split()[0]))  # "DP eps=10 (train)"
    return f"{max(passing):g}" if passing else "none"


def inside_band(part: pd.DataFrame) -> pd.Series:
    return part.verdict == su.audit.NO_EVIDENCE


def forgotten(part: pd.DataFrame) -> pd.Series:
    return part.overall == su.audit.FORGOTTEN


def report(out: Path, cells: list[dict]) -> None:
    """results.json / results.md: every seed's row and a summary per forget set and model."""
    dump_json(cells, str(out / "results.json"))
    text = ["# DP-SGD scVI vs exact retraining", ""]
    summary = []
    for cell in cells:
        frame = pd.DataFrame(cell["rows"])
        for column in ("lira_auc", "utility_vs_retrain", "time_vs_retrain"):
            if column not in frame:
                frame[column] = np.nan
        frame["time_vs_retrain"] = frame["time_vs_retrain"].fillna(
            frame["wall_s"] / cell["retrain_mean_s"]
        )
        band = cell["retrain_band"]
        text += [
            f"## {cell['dataset']} / {cell['forget']} / {cell['target']}",
            "",
            f"{cell['n_forget']} forget vs {cell['n_nonmembers']} non-member cells; "
            f"{cell['epochs']} epochs; layer norm, no batch norm; DP models trained on "
            f"`{cell['train_on']}` cells, {cell['dp_seeds']} seeds per epsilon. Retrain band "
            f"({cell['retrain_seeds']} seeds): {band[0]:.3f}-{band[1]:.3f}. Mean retrain "
            f"{cell['retrain_mean_s']:.0f} s, held-out neg. ELBO "
            f"{cell['retrain_mean_heldout_neg_elbo']:.1f}.",
            "",
            *[f"- {label}: largest epsilon inside the band in at least 2 of 3 seeds: "
              f"**{largest_epsilon(frame, inside_band, prefix)}**; also keeping held-out neg. "
              f"ELBO within 5% of retrain (forgotten): "
              f"**{largest_epsilon(frame, forgotten, prefix)}**."
              for prefix, label in UNIT_LABELS
              if frame.model.str.startswith(prefix).any()],
            *certified_line(frame),
            "",
        ]  # fmt: skip
        columns = [c for c in ("model", "seed", "dp_privacy_unit", "dp_n_units", "dp_epsilon",
                               "dp_noise_multiplier", "dp_steps", "certified_noise_to_weights",
                               "lira_auc", "lira_low", "lira_high", "verdict", "loss_auc",
                               "utility_vs_retrain", "overall", "wall_s", "time_vs_retrain")
                   if c in frame]  # fmt: skip
        text += [markdown_table(frame[columns].astype(object).where(frame[columns].notna(), "-"))]
        text.append("")
        for name, part in frame.groupby("model", sort=False):
            n_forgotten, n_inside = int(forgotten(part).sum()), int(inside_band(part).sum())
            auc = part.lira_auc.astype(float)
            summary.append({
                "forget set": cell["forget"], "model": name, "seeds": len(part),
                "LiRA AUC": f"{auc.mean():.3f}" if auc.notna().any() else "not auditable",
                "band": f"{band[0]:.2f}-{band[1]:.2f}",
                "inside band": f"{n_inside}/{len(part)}",
                "forgotten seeds (band and utility)": f"{n_forgotten}/{len(part)}",
                "utility vs retrain": f"{100 * part.utility_vs_retrain.mean():+.1f}%",
                "x retrain time": f"{part.time_vs_retrain.mean():.2f}",
            })  # fmt: skip
    text = [*text[:2], "## Summary", "", markdown_table(pd.DataFrame(summary)), "", *text[2:]]
    text.append("Produced by `python benchmarks/dp_sgd.py` (see its docstring for the protocol).")
    (out / "results.md").write_text("\n".join(text) + "\n")
    print(f"wrote {out / 'results.md'} and results.json")


if __name__ == "__main__":
    main()
