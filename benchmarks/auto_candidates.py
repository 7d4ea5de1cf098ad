"""Benchmark: which approximate methods should ``unlearn(method="auto")`` try? (development only)

``auto`` tries its candidates (``su.model.AUTO_CANDIDATES``) in order, gates each with an audit
on development cells, and falls back to the exact ``retrain_fast``. A candidate the gate
rejects costs its run time for nothing; one it accepts saves the fallback. This decides the
list on the **development** sets of ``unlearning_protocol.py`` only, never on its reporting
cells.

Protocol (written before running):

- Data and target: ``unlearning_protocol.py`` (pbmc3k, 1,000 HVGs, ``--target memorising``:
  the same target, same seed, so bit-identical to the protocol's); forget sets: its
  *development* sets (structured: NK cells; scattered: the development random cells), with
  their same-population non-members. Reporting cells are not touched.
- For each approximate method (``--methods``, default every approximate method of the
  registry that runs without extra inputs) and each of ``--seeds`` seeds: ``target.unlearn(dev
  forget cells, method="auto", candidates=<that method alone>, nonmembers=<dev non-members>,
  val_fraction=0.9)``: the library's own gate (the method reference pool as the audit's
  shadows, held-out neg. ELBO within 5%, the relearning check). ``val_fraction`` 0.9 because
  every cell here is a development cell (at auto's default 0.3 the structured set gives the
  gate fewer than 20 forget cells and it would try nothing).
- Recorded: accepted or not and why, the gate's LiRA AUC and band, the utility change, the
  method's own wall time (the attempt's, without the fallback).
- Decision rule: a method is a candidate if the gate accepted it in at least 2 of 3 seeds on at
  least one development set; candidates are ordered by mean attempt time, cheapest first.
  The script prints the resulting list; changing ``AUTO_CANDIDATES`` is a separate commit
  that cites this table.

Run::

    python benchmarks/auto_candidates.py        # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import DATASET_SETTINGS, QUIET, load, markdown_table, require_data
from _protocol import cell_sets, fit_target

import scvi_unlearn as su

APPROXIMATE = ("contrastive", "reset_relearn", "oracle_matching", "ssd", "fisher")


def attempt_rows(target, dev, method: str, seed: int, refs_dir: str, forget_type: str) -> dict:
    """One gated attempt of ``method`` alone on the development request."""
    t0 = time.perf_counter()
    out = target.unlearn(
        dev.forget, method="auto", candidates=method, nonmembers=dev.nonmember, seed=seed,
        val_fraction=0.9, reference_cache_dir=refs_dir, **QUIET,
    )  # fmt: skip
    total = time.perf_counter() - t0
    metrics = out.provenance["events"][-1]["metrics"]
    attempt = next((a for a in metrics["attempts"] if a["method"] == method), {})
    audit = attempt.get("audit") or {}
    record = {
        "forget": forget_type, "method": method, "seed": seed,
        "accepted": bool(attempt.get("accepted")), "reason": attempt.get("reason", ""),
        "skipped": metrics.get("skipped_approximate"),
        "gate_auc": audit.get("auc"), "gate_band": audit.get("band"),
        "gate_verdict": audit.get("verdict"), "utility_loss": attempt.get("utility_loss"),
        "relearn_auc": (attempt.get("relearn") or {}).get("auc"),
        "attempt_s": attempt.get("wall_time_s"), "request_s": total,
        "n_forget_dev": metrics["n_forget_development"],
        "n_nonmember_dev": metrics["n_nonmember_development"],
        "error": attempt.get("error"),
    }  # fmt: skip
    print({k: record[k] for k in ("forget", "method", "seed", "accepted", "gate_auc", "reason")})
    return record


def decide(frame: pd.DataFrame) -> list[str]:
    """The decision rule of the module docstring."""
    chosen = []
    for method, part in frame.groupby("method"):
        by_set = part.groupby("forget").accepted.agg(["sum", "count"])
        if su.audit.most_seeds(by_set["sum"], by_set["count"]).any():
            chosen.append((float(part.attempt_s.mean()), method))
    return [m for _, m in sorted(chosen)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forget", nargs="+", default=["structured", "scattered"])
    parser.add_argument("--methods", nargs="+", default=list(APPROXIMATE))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", choices=["memorising", "default"], default="memorising")
    parser.add_argument("--cache-dir", default="benchmarks/cache")
    parser.add_argument("--out", default="benchmarks/results/auto_candidates")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = DATASET_SETTINGS["pbmc3k"]
    args.epochs = settings["epochs"]
    adata = load("pbmc3k", settings["n_hvg"])
    refs_dir = str(Path(args.cache_dir) / "method_references")
    rows = []
    for forget_type in args.forget:
        sets = cell_sets(adata, "pbmc3k", forget_type, args.seed)
        dev = sets.dev
        print(f"\n=== {forget_type}: {dev.forget.size} forget vs {dev.nonmember.size} non-members")
        target, _ = fit_target(adata, sets.train, args, **QUIET)
        for method in args.methods:
            for seed in range(args.seeds):
                rows.append(attempt_rows(target, dev, method, seed, refs_dir, forget_type))
    frame = pd.DataFrame(rows)
    chosen = decide(frame)
    (out / "results.json").write_text(
        json.dumps(
            {"rows": rows, "candidates": chosen, "settings": vars(args)}, indent=2, default=str
        )
    )
    summary = (
        frame.groupby(["forget", "method"], sort=False)
        .agg(
            accepted=("accepted", lambda a: f"{int(a.sum())}/{len(a)}"),
            gate_auc=("gate_auc", lambda a: f"{np.nanmean(a.astype(float)):.3f}"),
            utility=("utility_loss", lambda a: f"{100 * np.nanmean(a.astype(float)):+.1f}%"),
            attempt_s=("attempt_s", lambda a: f"{np.nanmean(a.astype(float)):.1f}"),
            reasons=("reason", lambda r: "; ".join(sorted(set(r)))),
        )
        .reset_index()
    )
    text = [
        "# Which approximate methods should `auto` try? (development sets only)",
        "",
        f"pbmc3k, `{args.target}` target, development sets of `unlearning_protocol.py`; each "
        f"method alone as `auto`'s candidate, {args.seeds} seeds, `val_fraction=0.9`.",
        "",
        markdown_table(summary),
        "",
        f"Decision rule (docstring): **candidates = {chosen or 'none'}** (cheapest first).",
        "",
        "Produced by `python benchmarks/auto_candidates.py`.",
    ]
    (out / "results.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    require_data()
    main()
