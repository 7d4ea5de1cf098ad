"""Measured unit costs, and what they imply for an audit of a OneK1K-sized scVI (docs: Scale).

Measures on Kang 2018 (12,261 cells x 1,287 genes, ``../shared/data``), with ``--threads``
torch threads on this machine's CPU:

- seconds per training epoch per 10,000 cells, for scVI as labs train it (default
  architecture) and for the benchmark's memorising recipe (``TARGET``);
- seconds to featurise 10,000 cells (the attack features of one model), in memory and from a
  backed (on-disk) AnnData;
- bytes of attack features per cell per shadow (``ShadowPool.features``: float64).

Then extrapolates, linearly in cells (stated as such in the table), to OneK1K (1.26 M cells,
981 donors): scVI's default epochs for that size (``get_max_epochs_heuristic``), hours per
shadow, CPU hours of an audit with 8 and 64 shadows (cell level) and with 16 donor-level
shadows, features memory, and the Ray workers that finish each audit in 4 hours. Gene counts
differ between data sets; cost grows with genes too, so this is a lower bound for >1,287 genes.

Run::

    python benchmarks/atlas_costs.py          # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import anndata as ad
import pandas as pd
import torch
from _common import TARGET, load, markdown_table, require_data
from scipy import sparse

import scvi_unlearn as su
from scvi_unlearn._compat import max_epochs_heuristic

ONEK1K_CELLS = 1_263_676
ONEK1K_DONORS = 981
AFTERNOON_H = 4.0


def epoch_seconds(adata, model_kwargs: dict, epochs: int) -> float:
    recipe = su.Recipe(model_kwargs=model_kwargs, train_kwargs={"max_epochs": epochs})
    start = time.perf_counter()
    model = recipe.fit(adata.copy(), accelerator="cpu", enable_progress_bar=False)
    return (time.perf_counter() - start) / epochs, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/atlas_costs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adata = load("kang", None)
    per10k = 10_000 / adata.n_obs
    rows, measured = [], {}
    for name, kwargs in (("scVI default", {}), ("memorising (n_hidden 512, 2 layers)", TARGET)):
        seconds, model = epoch_seconds(adata, kwargs, args.epochs)
        measured[name] = seconds * per10k
        start = time.perf_counter()
        su.attack_features(model, adata)
        featurise = (time.perf_counter() - start) * per10k
        with tempfile.TemporaryDirectory() as folder:
            disk = adata.copy()
            disk.X = sparse.csr_matrix(disk.X)
            disk.write_h5ad(Path(folder) / "cells.h5ad")
            backed = ad.read_h5ad(Path(folder) / "cells.h5ad", backed="r")
            start = time.perf_counter()
            su.attack_features(model, backed)
            featurise_backed = (time.perf_counter() - start) * per10k
            backed.file.close()
        rows.append({
            "recipe": name, "s per epoch per 10k cells": seconds * per10k,
            "s to featurise 10k cells": featurise,
            "s to featurise 10k cells (backed h5ad)": featurise_backed,
        })  # fmt: skip
        print(rows[-1])
    bytes_per_cell = 8 * len(su.module.SCALAR_FEATURES)
    epochs = max_epochs_heuristic(ONEK1K_CELLS)
    plan = []
    hours = AFTERNOON_H
    for name, per_epoch in measured.items():
        # a shadow trains on half the cells (cell level) for the recipe's epochs, then
        # featurises every cell; featurising scales with all cells
        feat = next(r for r in rows if r["recipe"] == name)["s to featurise 10k cells"]
        shadow_h = (per_epoch * epochs * ONEK1K_CELLS / 2 / 1e4 + feat * ONEK1K_CELLS / 1e4) / 3600
        for label, n_shadows in (("cell level, 8 shadows", 8), ("cell level, 64 shadows", 64),
                                 ("donor level, 16 shadows", 16)):  # fmt: skip
            cpu_h = shadow_h * n_shadows
            plan.append({
                "recipe": name, "audit": label, "epochs (scVI heuristic)": epochs,
                "h per shadow (this CPU, extrapolated)": shadow_h,
                "CPU-h for the shadows": cpu_h,
                f"workers for <= {AFTERNOON_H:g} h": min(n_shadows, math.ceil(cpu_h / hours)),
                # one worker fits one shadow: a shadow longer than the afternoon needs a faster
                # worker (GPU, DDP) whatever the number of workers
                "one shadow fits the afternoon": shadow_h <= hours,
                "features memory (GB)": n_shadows * ONEK1K_CELLS * bytes_per_cell / 1e9,
            })  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join([
        "# Unit costs (measured) and an atlas-scale audit (extrapolated)", "",
        f"Command: `python benchmarks/atlas_costs.py`. Kang ({adata.n_obs} cells x "
        f"{adata.n_vars} genes), {args.threads} torch threads, {args.epochs} epochs timed.", "",
        "## Measured", "", markdown_table(pd.DataFrame(rows), digits=2), "",
        f"Attack features: {bytes_per_cell} bytes per cell per shadow (float64).", "",
        f"## OneK1K ({ONEK1K_CELLS:,} cells, {ONEK1K_DONORS} donors), extrapolated linearly "
        "in cells from the rates above", "",
        markdown_table(pd.DataFrame(plan), digits=2), "",
    ])  # fmt: skip
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"measured": rows, "plan": plan}, indent=2))
    print(text)


if __name__ == "__main__":
    require_data()
    main()
