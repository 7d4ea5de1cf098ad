"""Benchmark: is the accountant's epsilon consistent with a one-run audit? Canaries on pbmc3k.

Protocol (fixed before running):

- Data: pbmc3k, 1,000 ``seurat_v3`` HVGs (``_common.load``); scVI at its default sizes with
  layer norm and no batch norm (DP-SGD's requirement), ``--epochs`` epochs (default 60,
  ``DATASET_SETTINGS``), 90% of the cells for training (the library's default split).
- Rows: ``su.train.train_dp`` at each of ``--epsilons`` (default 1, 10, 50; delta the library's
  default, 0.1 / n) with ``canaries=--canaries`` (default 500, each included with probability
  1/2) and ``canary_guesses=--guesses`` (default 100), for ``--seeds`` seeds; and one
  non-private row (no noise, no clipping: epsilon infinite) with the same canaries, which shows
  what the audit detects when nothing hides the canaries.
- Per row: the accountant's epsilon, epsilon-hat (95% confidence), correct of guesses, whether
  ``epsilon_hat <= epsilon`` (it must be, every time, or the code is wrong), held-out neg.
  ELBO on the validation cells, wall time.

Writes ``results.json`` and ``results.md`` to ``--out`` (default
``benchmarks/results/dp_canaries``).

Run::

    python benchmarks/dp_canaries.py --seeds 3  # ~25 min on 2 CPU cores
    python benchmarks/dp_canaries.py --smoke    # tiny synthetic data, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch
from _common import DATASET_SETTINGS, QUIET, load, markdown_table, require_data

import scvi_unlearn as su
from scvi_unlearn._utils import dump_json

LAYER_NORM = {"use_batch_norm": "none", "use_layer_norm": "both"}
EPSILONS = (1.0, 10.0, 50.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    parser.add_argument("--canaries", type=int, default=500)
    parser.add_argument("--guesses", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="default: DATASET_SETTINGS")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/dp_canaries")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data, 2 epochs")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite results.md from --out/results.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.report_only:
        out = Path(args.out or "benchmarks/results/dp_canaries")
        record = json.loads((out / "results.json").read_text())
        report(out, record["rows"], record["epochs"], argparse.Namespace(**record["settings"]))
        return
    if args.smoke:
        adata = su.data.synthetic_pbmc(n_cells=300, n_genes=100, seed=0)
        epochs, args.canaries, args.guesses = 2, 60, 20
    else:
        require_data()
        adata = load("pbmc3k", DATASET_SETTINGS["pbmc3k"]["n_hvg"])
        epochs = args.epochs or DATASET_SETTINGS["pbmc3k"]["epochs"]
    out = Path(
        args.out or (tempfile.mkdtemp() if args.smoke else "benchmarks/results/dp_canaries")
    )
    out.mkdir(parents=True, exist_ok=True)
    su.model.SCVI.setup_anndata(adata)
    rows = []
    settings = [(eps, seed) for eps in args.epsilons for seed in range(args.seeds)]
    for eps, seed in [*settings, (math.inf, 0)]:
        rows.append(run(adata, eps, seed, epochs, args))
        print({k: rows[-1][k] for k in ("epsilon", "epsilon_hat", "n_correct", "consistent")})
        report(out, rows, epochs, args)


def run(adata, eps: float, seed: int, epochs: int, args) -> dict:
    """One DP-SGD model with canaries; its audit and utility."""
    scvi.settings.seed = seed  # the initial weights: fixed by the seed, not by earlier rows
    model = su.model.SCVI(adata, **LAYER_NORM)
    private = math.isfinite(eps)
    budget = {"target_epsilon": eps} if private else {"noise_multiplier": 0.0,
                                                      "max_grad_norm": 1e6}  # fmt: skip
    t0 = time.perf_counter()
    summary = su.train.train_dp(
        model, max_epochs=epochs, seed=seed, canaries=args.canaries,
        canary_guesses=args.guesses, **budget, **QUIET,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    audit = summary["one_run_audit"]
    heldout = np.asarray(model.validation_indices)
    elbo = su.utility.utility_metrics(model, adata, indices=heldout)["neg_elbo"]
    return {
        "epsilon": summary["epsilon"], "target_epsilon": eps if private else None,
        "delta": summary["delta"], "seed": seed, "epsilon_hat": audit["epsilon_hat"],
        "n_correct": audit["n_correct"], "n_guesses": audit["n_guesses"],
        "n_canaries": audit["n_canaries"], "n_included": audit["n_included"],
        "consistent": audit["consistent"], "noise_multiplier": summary["noise_multiplier"],
        "steps": summary["steps"], "heldout_neg_elbo": elbo, "wall_s": seconds,
    }  # fmt: skip


def report(out: Path, rows: list[dict], epochs: int, args) -> None:
    """results.json and results.md."""
    dump_json({"settings": vars(args), "epochs": epochs, "rows": rows}, str(out / "results.json"))
    frame = pd.DataFrame(rows)
    frame["delta"] = [f"{d:.2g}" for d in frame["delta"]]
    private = frame[frame.target_epsilon.notna()]
    verdict = (
        "every private row has epsilon-hat <= epsilon"
        if bool(private.consistent.all())
        else "a private row has epsilon-hat ABOVE its epsilon: the training, accounting or "
        "audit code is wrong"
    )
    text = [
        "# One-run DP audit of DP-SGD scVI (canaries)",
        "",
        f"{args.canaries} canaries (each in with probability 1/2), {args.guesses} guesses, "
        f"{epochs} epochs, 95% confidence. Result: **{verdict}**.",
        "",
        markdown_table(frame.astype(object).where(frame.notna(), "-")),
        "",
        "Produced by `python benchmarks/dp_canaries.py` (see its docstring for the protocol).",
    ]
    (out / "results.md").write_text("\n".join(text) + "\n")
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
