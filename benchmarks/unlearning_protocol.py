"""Benchmark: does ``unlearn()`` unlearn? The unlearning protocol, with development sets apart.

Protocol (written before running; docs/methods.md: protocol, success):

- Data: Kang 2018 and pbmc3k (1,000 ``seurat_v3`` HVGs), as ``unlearning.py``.
- Forget sets come in pairs from the same target model: a **reporting** set and a distinct
  **development** set. Structured: two cell types (Kang: Dendritic cells reported,
  Megakaryocytes developed on; pbmc3k: FCGR3A+ Mono reported, NK developed on). Scattered: two
  disjoint sets of random cells. Donor (Kang): the smallest donor reported, the next one
  developed on. ``membership_split`` holds out half of each population, so each set has
  same-population non-members; the target trains on everything else except a held-out
  background (for utility), itself split into a development and a reporting half.
- Target: the memorising recipe of ``unlearning.py`` (``_common.TARGET``; ``--target
  memorising``) or scVI as labs train it (``--target default``: default architecture and
  epochs).
- Hyper-parameters are chosen on the development set only: Fisher's ``alpha`` is the
  smallest of ``FISHER_ALPHAS`` whose development audit finds no leak with held-out neg. ELBO
  within 5% of the trained model's; the other methods run at their library defaults, which were
  set before this run. No number of the reporting set feeds a choice.
- ``oracle_matching`` runs at its library default (references leave out random halves of the
  cells). ``oracle_matching_grouped`` (added before Kang's donor request was run) is the
  issue's variant for group requests: its references leave out whole groups (``GROUP_KEYS``:
  the donor for a donor request, the cell type for a structured one), a pool of its own whose
  one-time cost is reported beside the other. Scattered requests have no group and skip it.
- Pools: the audit's shadows (seed ``--seed``, cache ``<cache>/``) are disjoint from the
  methods' reference pool (seed offset ``REFERENCE_SEED_OFFSET``, cache
  ``<cache>/method_references``); the development audits use the reference pool, never the
  shadows. The reference pool's one-time cost is its own column.
- Band: ``--retrain-seeds`` (default 8) exact retrains, scored on the reporting cells; verdicts
  by ``su.audit.paired_verdict`` (the library's one rule against reference models: their
  prediction band on the same cells, the row's point AUC judged against it). Records made before
  that rule judged the row's CI against ``mean +- 2 sqrt(SD^2 + SE^2)``; each cell's
  ``settings`` say which (``verdict_rule``).
- Pools (audit shadows, the methods' reference pool, the retrains) run on
  ``su.Executor``: sequential by default; ``--workers N`` (a local process pool) or ``--ray``
  spread them, at one torch thread per task (then retrain times no longer compare with the
  methods', which run with ``--threads``).
- ``auto`` gates on a share of the request's own forget cells and non-members (its
  development cells); its row is audited on the reporting cells minus those, against the band
  recomputed from the same retrain models on the same cells.
- Power: a row audited on fewer than 60 forget or 60 non-member cells is marked underpowered
  and left out of the headline.
- Overall result per row: ``su.audit.overall_result`` (privacy verdict and held-out neg. ELBO
  against the mean retrain; exact methods are forgotten by construction). SUCCESS is the
  library's rule, ``su.audit.unlearning_success``: every seed powered, "forgotten" in at least
  2 of 3 seeds, faster than a full retrain measured in the same run, utility within 5% of the
  mean retrain, and not leaking again after relearning in most of the checked seeds.
- Relearning check: each row that is "forgotten" is fine-tuned for ``RELEARN_EPOCHS`` epochs on
  the retained cells and audited again; the forget cells must not come back.
- Resuming: the target, the retrains and every method row's model are saved with their wall
  time under ``<cache>/protocol_models`` and ``<cache>/retrains`` and loaded on a rerun (same
  seeds give the same models), so a run of hours (Kang) can be completed over several
  sittings; the times in the tables are those measured when each model was trained.

- Timing on two cores (Kang): ``--workers 2 --threads 1`` trains the pools two at a time at
  one thread each; the method rows then run as two one-thread processes side by side
  (``--methods`` subsets, separate ``--out``) and ``--merge`` combines them. Retrains and
  methods are then timed under the same condition (one thread, the other core busy).

Run::

    python benchmarks/unlearning_protocol.py --datasets pbmc3k --forget structured
    python benchmarks/unlearning_protocol.py --report-only
    # Kang on two cores: pools, then two halves of the rows, then one report
    python benchmarks/unlearning_protocol.py --datasets kang --forget structured \
        --workers 2 --threads 1 --pools-only
    python benchmarks/unlearning_protocol.py --datasets kang --forget structured --threads 1 \
        --methods retrain_fast_0.1 ssd contrastive reset_relearn fisher retrain_fast_0.25 \
        --out benchmarks/results/unlearning_protocol/shards/kang_structured_a &
    python benchmarks/unlearning_protocol.py --datasets kang --forget structured --threads 1 \
        --methods auto oracle_matching extragradient_calibrated oracle_matching_grouped \
        --out benchmarks/results/unlearning_protocol/shards/kang_structured_b
    python benchmarks/unlearning_protocol.py \
        --merge benchmarks/results/unlearning_protocol/shards/kang_structured_{a,b}
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import DATASET_SETTINGS, load, markdown_table, require_data
from _protocol import cell_sets, fit_target

import scvi_unlearn as su

METHODS = {
    # row: (method, hyper-parameters); cheapest first so a run cut short has them
    "ssd": ("ssd", {}),
    "fisher": ("fisher", {}),  # alpha chosen on the development set
    "reset_relearn": ("reset_relearn", {}),
    "oracle_matching": ("oracle_matching", {}),
    # the variant for group requests: references leave the whole group out (below)
    "oracle_matching_grouped": ("oracle_matching", {}),
    "extragradient_calibrated": ("extragradient_calibrated", {}),
    "retrain_fast_0.1": ("retrain_fast", {"budget": 0.1}),
    "retrain_fast_0.25": ("retrain_fast", {"budget": 0.25}),
    "auto": ("auto", {}),
    # the original study's contrastive-latent row, at its library defaults
    "contrastive": ("contrastive", {}),
}
USES_REFERENCES = {
    "oracle_matching", "oracle_matching_grouped", "extragradient_calibrated", "auto"
}  # fmt: skip
# The obs column whose groups a request forgets whole; `oracle_matching_grouped` trains its
# references with these groups IN or OUT together (its own pool, paid once per request type).
GROUP_KEYS = {"structured": "cell_type", "donor": "sample_id"}
EXACT = {"retrain", "retrain_fast"}
FISHER_ALPHAS = (1e-5, 1e-4, 1e-3)
MIN_HEADLINE_CELLS = 60
RELEARN_EPOCHS = 3


def cached_model(folder: Path, adata, fit):
    """``fit()`` once: its model and wall time are saved in ``folder`` and loaded afterwards.

    Same seeds give the same models (``Recipe.fit_cells``, ``unlearn``), so a cached model is
    the one a rerun would train; a long run (Kang: hours) resumes across interruptions.
    Returns the model and the wall time it took when it was trained.
    """
    if (folder / "wall_s.json").exists():
        model = su.model.SCVI.load(str(folder), adata=adata)
        return model, json.loads((folder / "wall_s.json").read_text())["wall_s"]
    t0 = time.perf_counter()
    model = fit()
    seconds = time.perf_counter() - t0
    model.save(str(folder), overwrite=True)
    (folder / "wall_s.json").write_text(json.dumps({"wall_s": seconds}))
    return model, seconds


def run_cell(adata, dataset, forget_type, args, out: Path) -> dict:
    sets = cell_sets(adata, dataset, forget_type, args.seed)
    rep, dev, train, bg_rep, bg_dev = sets.rep, sets.dev, sets.train, sets.bg_rep, sets.bg_dev
    print(f"\n=== {dataset} / {forget_type} / {args.target}")
    print(f"reporting: {rep.forget.size} forget vs {rep.nonmember.size} non-members")
    print(f"development: {dev.forget.size} forget vs {dev.nonmember.size} non-members")
    quiet = {"enable_progress_bar": False, "accelerator": "cpu"}
    cache = Path(args.cache_dir)
    models = cache / "protocol_models" / f"{dataset}_{forget_type}_{args.target}_{args.seed}"
    target, target_s = cached_model(
        models / "target", adata, lambda: fit_target(adata, train, args, **quiet)[0]
    )
    refs_dir = str(cache / "method_references")
    mi = su.MembershipInference(
        adata, recipe=target, n_shadows=args.n_shadows, seed=args.seed, cache_dir=cache,
        accelerator="cpu", attacks=("loss", "lira_online"),
    )  # fmt: skip
    mi.fit(progress_bar=False)

    def lira(model, members, nonmembers):
        report = mi.audit(model, members=members, nonmembers=nonmembers, n_bootstrap=500)
        return report.results["lira_online"], report.results["loss"]

    # -- the band: exact retrains of the reporting request --------------------------------
    saved = cache / "retrains" / f"{dataset}_{forget_type}_{args.target}_{args.seed}"
    by_seed = {}
    for s in range(args.retrain_seeds):
        # Saved with their wall time, so a crashed run resumes without paying them again.
        folder = saved / f"seed_{s}"
        if (folder / "wall_s.json").exists():
            m = su.model.SCVI.load(str(folder), adata=adata)
            by_seed[s] = (m, json.loads((folder / "wall_s.json").read_text())["wall_s"])
            print(f"retrain seed {s}: loaded ({by_seed[s][1]:.0f} s when trained)")

    def keep(seed, m, seconds):
        m.save(str(saved / f"seed_{seed}"), overwrite=True)
        (saved / f"seed_{seed}" / "wall_s.json").write_text(json.dumps({"wall_s": seconds}))
        by_seed[seed] = (m, seconds)
        print(f"retrain seed {seed}: {seconds:.0f} s")

    missing = [s for s in range(args.retrain_seeds) if s not in by_seed]
    su.model.retrain_models(target, rep.forget, missing, on_model=keep, **quiet)
    retrains = [by_seed[s] for s in range(args.retrain_seeds)]
    retrain_s = float(np.mean([t for _, t in retrains]))
    retrain_elbo = float(
        np.mean(
            [su.utility.utility_metrics(m, adata, indices=bg_rep)["neg_elbo"] for m, _ in retrains]
        )
    )

    def band_on(members, nonmembers):
        """The retrains' LiRA AUCs on these cells: the paired verdict's references."""
        return [lira(m, members, nonmembers)[0].auc for m, _ in retrains]

    references = band_on(rep.forget, rep.nonmember)
    band = su.audit.reference_band(references)
    print(f"retrain band on the reporting cells: {band[0]:.3f}-{band[1]:.3f}")

    # -- development: the reference pool's audit, and Fisher's alpha -------------------------
    target_dev_elbo = su.utility.utility_metrics(target, adata, indices=bg_dev)["neg_elbo"]
    t0 = time.perf_counter()
    pool = su.train.method_reference_pool(
        target, su.train.DEFAULT_N_REFERENCES, args.seed, refs_dir, accelerator="cpu",
        keep_models=True,
    )  # fmt: skip
    # The one-time cost is the pool's training time (recorded in its cache), not the time to
    # load it now.
    reference_pool_s = float(sum(pool.train_seconds))
    print(f"method reference pool: {reference_pool_s:.0f} s to train, "
          f"{time.perf_counter() - t0:.1f} s now")  # fmt: skip
    grouped_pool_s = None
    group_key = GROUP_KEYS.get(forget_type)
    if "oracle_matching_grouped" in args.methods and group_key is not None:
        # Trained here, on the pools' executor (--workers), not inside a timed method row.
        grouped = su.train.method_reference_pool(
            target, su.train.DEFAULT_N_REFERENCES, args.seed, refs_dir, accelerator="cpu",
            keep_models=True, group_key=group_key,
        )  # fmt: skip
        grouped_pool_s = float(sum(grouped.train_seconds))
        print(f"grouped method reference pool ({group_key}): {grouped_pool_s:.0f} s to train")
    pools_s = (reference_pool_s, grouped_pool_s)
    if args.pools_only:
        print("pools ready")
        return {}
    dev_mi = su.MembershipInference(
        adata, recipe=target, n_shadows=pool.n_shadows, cache_dir=False, accelerator="cpu",
        seed=su.train.REFERENCE_SEED_OFFSET + args.seed, attacks=("lira_online",),
    )  # fmt: skip
    dev_mi.shadows_ = pool

    def develop(model):
        r = dev_mi.audit(model, members=dev.forget, nonmembers=dev.nonmember, n_bootstrap=200)
        elbo = su.utility.utility_metrics(model, adata, indices=bg_dev)["neg_elbo"]
        return r.results["lira_online"], elbo / target_dev_elbo - 1

    fisher_trials = []
    for alpha in FISHER_ALPHAS:
        m = target.unlearn(dev.forget, method="fisher", alpha=alpha, seed=0, **quiet)
        result, loss = develop(m)
        fisher_trials.append(
            {"alpha": alpha, "auc": result.auc, "verdict": result.verdict, "utility_loss": loss}
        )
        print(f"development fisher alpha={alpha:g}: {fisher_trials[-1]}")
    passing = [
        t
        for t in fisher_trials
        if t["verdict"] == su.audit.NO_EVIDENCE and t["utility_loss"] <= 0.05
    ]
    alpha = (passing or fisher_trials)[0]["alpha"]

    # -- rows on the reporting cells -------------------------------------------------------
    rows = []

    def row(name, seed, model, seconds, members, nonmembers, row_refs, exact=False):
        lira_r, loss_r = lira(model, members, nonmembers)
        verdict, _, row_band, _, detectable = su.audit.paired_verdict(
            lira_r.auc, row_refs, members.size, nonmembers.size
        )
        elbo = su.utility.utility_metrics(model, adata, indices=bg_rep)["neg_elbo"]
        loss = elbo / retrain_elbo - 1
        record = {
            "dataset": dataset, "forget": forget_type, "target": args.target, "method": name,
            "seed": seed, "lira_auc": lira_r.auc, "lira_low": lira_r.auc_ci[0],
            "lira_high": lira_r.auc_ci[1], "band_low": row_band[0], "band_high": row_band[1],
            "reference_aucs": list(row_refs),
            "detectable_auc": detectable, "verdict": verdict, "loss_auc": loss_r.auc,
            "n_forget": int(members.size), "n_nonmembers": int(nonmembers.size),
            "heldout_neg_elbo": elbo, "utility_vs_retrain": loss,
            "overall": su.audit.overall_result(verdict, loss, exact=exact),
            "wall_s": seconds, "time_vs_retrain": seconds / retrain_s,
            "powered": bool(min(members.size, nonmembers.size) >= MIN_HEADLINE_CELLS),
        }  # fmt: skip
        print({k: record[k] for k in ("method", "seed", "lira_auc", "verdict", "overall")})
        return record

    rows.append(
        row("trained (before)", args.seed, target, target_s, rep.forget, rep.nonmember, references)
    )
    for s, (m, t) in enumerate(retrains):
        rows.append(row("retrain", s, m, t, rep.forget, rep.nonmember, references, exact=True))
    kept = {}
    for name in args.methods:
        method, hp = METHODS[name]
        hp = dict(hp)
        if name == "fisher":
            hp["alpha"] = alpha
        if name in USES_REFERENCES:
            hp["reference_cache_dir"] = refs_dir
        if name == "oracle_matching_grouped":
            if group_key is None:
                print(f"{name}: no group to leave out in a {forget_type} request, skipped")
                continue
            hp["group_key"] = group_key
        for s in range(args.method_seeds):
            try:
                request = functools.partial(
                    target.unlearn, rep.forget, method=method, nonmembers=rep.nonmember, seed=s,
                    **quiet, **hp,
                )  # fmt: skip
                m, seconds = cached_model(models / f"{name}_seed{s}", adata, request)
            except Exception as exc:  # a method that crashes is a result too
                rows.append({"dataset": dataset, "forget": forget_type, "method": name,
                             "seed": s, "error": repr(exc)})  # fmt: skip
                continue
            members, nonmembers, row_refs = rep.forget, rep.nonmember, references
            metrics = m.provenance["events"][-1]["metrics"]
            if metrics.get("forget_val_names"):  # selected on some reporting cells: not those
                names = adata.obs_names
                members = members[~names[members].isin(metrics["forget_val_names"])]
                nonmembers = nonmembers[~names[nonmembers].isin(metrics["nonmember_val_names"])]
                row_refs = band_on(members, nonmembers)
            exact = method in EXACT or metrics.get("accepted_method") in EXACT
            rows.append(row(name, s, m, seconds, members, nonmembers, row_refs, exact))
            rows[-1]["accepted_method"] = metrics.get("accepted_method")
            rows[-1]["attempts"] = [
                f"{a['method']}: {'accepted' if a.get('accepted') else 'rejected'} "
                f"({a.get('reason', '')})"
                for a in metrics.get("attempts", [])
            ]
            if metrics.get("skipped_approximate"):  # auto went straight to the exact method
                rows[-1]["attempts"].insert(0, f"skipped: {metrics['skipped_approximate']}")
            # time spent obtaining the reference pool inside the request (a cache load here)
            rows[-1]["reference_s"] = metrics.get("reference_seconds", 0.0)
            kept[(name, s)] = (m, members, nonmembers, row_refs)
        _save(out, dataset, forget_type, args, rows, band, fisher_trials, alpha,
              retrain_s, target_s, pools_s, partial=True)  # fmt: skip

    # -- relearning check --------------------------------------------------------------------
    retain = np.setdiff1d(train, rep.forget)
    for r in rows:
        key = (r["method"], r.get("seed"))
        if r.get("overall") != su.audit.FORGOTTEN or key not in kept:
            continue
        m, members, nonmembers, row_refs = kept[key]
        again = su.model.clone_model(m)
        rest = np.setdiff1d(np.arange(adata.n_obs), retain)
        again.train(
            max_epochs=RELEARN_EPOCHS, accelerator="cpu", enable_progress_bar=False,
            plan_kwargs={"n_epochs_kl_warmup": None},
            datasplitter_kwargs={"external_indexing": [retain, np.zeros(0, int), rest]},
        )  # fmt: skip
        result, _ = lira(again, members, nonmembers)
        r["relearn_auc"] = result.auc
        r["relearn_verdict"] = su.audit.paired_verdict(
            result.auc, row_refs, members.size, nonmembers.size
        )[0]
    return _save(out, dataset, forget_type, args, rows, band, fisher_trials, alpha,
                 retrain_s, target_s, pools_s, partial=False)  # fmt: skip


def _save(out, dataset, forget_type, args, rows, band, trials, alpha, retrain_s, target_s,
          pools_s, partial) -> dict:  # fmt: skip
    pool_s, grouped_pool_s = pools_s  # (per-cell, grouped) reference pools' one-time costs
    result = {
        "dataset": dataset, "forget": forget_type, "target": args.target,
        "retrain_band": list(band), "fisher_selection": {"alpha": alpha, "trials": trials},
        "times": {"retrain_mean_s": retrain_s, "target_s": target_s,
                  "reference_pool_one_time_s": pool_s,
                  "grouped_reference_pool_one_time_s": grouped_pool_s},
        "rows": rows, "settings": {**vars(args), "verdict_rule": "paired"}, "partial": partial,
    }  # fmt: skip
    suffix = ".partial.json" if partial else ".json"
    path = out / "cells" / f"{dataset}_{forget_type}_{args.target}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    if not partial:
        path.with_name(path.name.replace(".json", ".partial.json")).unlink(missing_ok=True)
    return result


def merge(sources: list[Path], out: Path) -> None:
    """Combine the cells of several ``--out`` folders (method rows run in separate processes).

    Each process loads the same cached target, shadows, retrains and reference pool, so the
    shared rows (trained model, retrains) and the band must agree; they are kept once and
    every method row is added. A partial cell stays partial.
    """
    merged: dict[str, dict] = {}
    for source in sources:
        for path in sorted((source / "cells").glob("*.json")):
            cell = json.loads(path.read_text())
            key = f"{cell['dataset']}_{cell['forget']}_{cell['target']}"
            if key not in merged:
                merged[key] = cell
                continue
            have = merged[key]
            if not np.allclose(have["retrain_band"], cell["retrain_band"]):
                raise ValueError(f"{path}: its retrain band differs from the first source's.")
            seen = {(r["method"], r.get("seed")) for r in have["rows"]}
            have["rows"] += [r for r in cell["rows"] if (r["method"], r.get("seed")) not in seen]
            have["partial"] = have["partial"] or cell["partial"]
            for name, seconds in cell["times"].items():  # a pool only one process trained
                if have["times"].get(name) is None:
                    have["times"][name] = seconds
            methods = have["settings"]["methods"] + cell["settings"]["methods"]
            have["settings"]["methods"] = list(dict.fromkeys(methods))
    for key, cell in merged.items():
        suffix = ".partial.json" if cell["partial"] else ".json"
        path = out / "cells" / f"{key}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell, indent=2, default=str))
        if not cell["partial"]:
            path.with_name(f"{key}.partial.json").unlink(missing_ok=True)
        print(f"merged {key} ({len(cell['rows'])} rows) into {path}")


def report(out: Path) -> None:
    """results.md / results.json from every cell (finished or partial)."""
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    if not cells:
        return
    lines = ["# Results of the unlearning protocol", ""]
    lines.append("Command: `python benchmarks/unlearning_protocol.py` (see its docstring).")
    summary = []
    for cell in cells:
        rows = pd.DataFrame([r for r in cell["rows"] if "error" not in r])
        title = f"{cell['dataset']} / {cell['forget']} / {cell['target']}"
        lines += ["", f"## {title}" + (" (partial)" if cell["partial"] else ""), ""]
        b, t = cell["retrain_band"], cell["times"]
        n_retrains = int((rows.method == "retrain").sum())
        pool_s, alpha = t["reference_pool_one_time_s"], cell["fisher_selection"]["alpha"]
        lines.append(
            f"Retrain band (LiRA online, {n_retrains} seeds): {b[0]:.3f}-{b[1]:.3f}. Mean full "
            f"retrain {t['retrain_mean_s']:.0f} s; method reference pool (one-time, per data "
            f"set and recipe) {pool_s:.0f} s. Fisher alpha chosen on the development set: "
            f"{alpha:g}."
            + (
                f" Grouped reference pool (`oracle_matching_grouped`, one-time) "
                f"{t['grouped_reference_pool_one_time_s']:.0f} s."
                if t.get("grouped_reference_pool_one_time_s")
                else ""
            )
        )
        for name, part in rows.groupby("method", sort=False):
            n_forgotten = int((part.overall == su.audit.FORGOTTEN).sum())
            summary.append({
                "data": title, "method": name, "seeds": len(part),
                "LiRA AUC": f"{part.lira_auc.mean():.3f}",
                "band": f"{part.band_low.mean():.2f}-{part.band_high.mean():.2f}",
                "verdicts": ", ".join(sorted(set(part.verdict))),
                "utility vs retrain": f"{100 * part.utility_vs_retrain.mean():+.1f}%",
                "overall (per seed)": "; ".join(part.overall),
                "forgotten seeds": f"{n_forgotten}/{len(part)}",
                "SUCCESS": _success(name, part),
                "x full retrain": f"{part.time_vs_retrain.mean():.3f}",
                "first request x retrain": f"{_first_request(name, part, t):.3f}",
                "cells (forget/non)": f"{int(part.n_forget.min())}/{int(part.n_nonmembers.min())}"
                + ("" if part.powered.all() else " underpowered"),
                "accepted": ", ".join(sorted({str(a) for a in part.get("accepted_method", [])
                                              if a and a == a})) or "",
                "relearn AUC": _relearn_text(part),
            })  # fmt: skip
    table = pd.DataFrame(summary)
    lines += ["", "## All rows", "", markdown_table(table)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(cells, indent=2, default=str))
    print("\n".join(lines))


#: Methods that train a reference pool on a data set's first request, and which pool.
POOL_OF = {
    "oracle_matching": "reference_pool_one_time_s",
    "extragradient_calibrated": "reference_pool_one_time_s",
    "oracle_matching_grouped": "grouped_reference_pool_one_time_s",
    "auto": "reference_pool_one_time_s",
}


def _first_request(name: str, part: pd.DataFrame, times: dict) -> float:
    """Cost of the method on a data set's first request, in full retrains: its pool included.

    The benchmark trains pools once, before the timed rows (so "x full retrain" leaves them
    out); a lab's first request pays for them. ``auto`` pays only when its gate ran (it
    obtained a pool: ``reference_s`` recorded), not when it went straight to the exact route.
    """
    pool = times.get(POOL_OF.get(name, ""), None) or 0.0
    if name == "auto" and not (part.get("reference_s", pd.Series([0.0])).fillna(0) > 0).any():
        pool = 0.0
    return float(part.time_vs_retrain.mean() + pool / times["retrain_mean_s"])


def _relearn_text(part: pd.DataFrame) -> str:
    """Mean AUC after relearning, and how many of the checked seeds leak again."""
    if "relearn_auc" not in part or part.relearn_auc.isna().all():
        return ""
    checked = part[part.relearn_auc.notna()]
    leaks = int((checked.relearn_verdict == su.audit.LEAK).sum())
    return f"{checked.relearn_auc.mean():.3f} (leak {leaks}/{len(checked)})"


def _success(name: str, part: pd.DataFrame) -> str:
    """The library's success rule (:func:`scvi_unlearn.audit.unlearning_success`) on a row.

    Each seed is forgotten when its overall result is; power, the time against a full retrain,
    the utility against the mean retrain and the relearning check come from the same seeds.
    """
    if name in ("retrain", "trained (before)"):
        return "(reference)"
    checked = part[part.relearn_verdict.notna()] if "relearn_verdict" in part else part[:0]
    return su.audit.unlearning_success(
        (part.overall == su.audit.FORGOTTEN).to_numpy(),
        time_vs_retrain=float(part.time_vs_retrain.mean()),
        powered=part.powered.to_numpy(),
        utility_change=part.utility_vs_retrain.to_numpy(),
        relearn_leaks=(checked.relearn_verdict == su.audit.LEAK).to_numpy(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["pbmc3k", "kang"])
    parser.add_argument("--forget", nargs="+", default=["structured", "scattered", "donor"])
    parser.add_argument("--target", choices=["memorising", "default"], default="memorising")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--method-seeds", type=int, default=3)
    parser.add_argument("--retrain-seeds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--workers", type=int, default=1,
        help="processes for shadows, reference pools and retrains (1: sequential, the only "
        "setting whose timings compare with the methods')",
    )  # fmt: skip
    parser.add_argument("--ray", action="store_true", help="run those pools on Ray instead")
    parser.add_argument("--cache-dir", default="benchmarks/cache")
    parser.add_argument("--out", default="benchmarks/results/unlearning_protocol")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--pools-only", action="store_true",
        help="train (or load) the target, shadows, retrains and reference pools, then stop "
        "(before the method rows, which can then run as separate processes)",
    )  # fmt: skip
    parser.add_argument(
        "--merge", nargs="+", default=None, metavar="DIR",
        help="combine the cells of these --out folders into --out and report (rows of one "
        "request run in separate processes), then stop",
    )  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge([Path(d) for d in args.merge], out)
        report(out)
        return
    torch.set_num_threads(args.threads)
    if args.ray or args.workers > 1:
        su.set_default_executor(
            su.Executor(backend="ray", num_cpus_total=args.workers, threads_per_worker=1)
            if args.ray
            else su.Executor(n_workers=args.workers, threads_per_worker=1)
        )
    if not args.report_only:
        for dataset in args.datasets:
            settings = DATASET_SETTINGS[dataset]
            cell_args = argparse.Namespace(**{**vars(args), **settings})
            adata = load(dataset, settings["n_hvg"])
            for forget_type in args.forget:
                if forget_type == "donor" and dataset != "kang":
                    continue  # pbmc3k is one donor
                name = f"{dataset}_{forget_type}_{args.target}.json"
                if (out / "cells" / name).exists():
                    print(f"skip {name}: done (delete it to rerun)")
                    continue
                run_cell(adata, dataset, forget_type, cell_args, out)
                if not args.pools_only:
                    report(out)
    if not args.pools_only:
        report(out)


if __name__ == "__main__":
    require_data()
    main()
