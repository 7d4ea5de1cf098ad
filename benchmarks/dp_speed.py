"""Benchmark: the cost of DP-SGD per-cell clipping, ghost (hooks) vs torch.func vs no privacy.

Same data (pbmc3k, 1,000 HVGs), same architecture (the memorising scVI with layer norm, as in
``dp_sgd.py``), same seed, ``--epochs`` epochs on every cell (``train_size=1.0``), expected
batch 128, epsilon 10:

- ``ghost``: ``train_dp`` as the package runs it, per-cell norms from hooks, two backward
  passes per step;
- ``vmap``: ``train_dp`` with the tests' reference plan (``tests/train/_vmap_reference.py``), one
  gradient per cell with ``torch.func``;
- ``non-private``: ``model.train`` with the same epochs and batch size.

Wall time of each (median of ``--repeats``), per step and relative to the non-private fit.
Writes ``results.json`` / ``results.md`` to ``--out`` (default
``benchmarks/results/dp_speed``).

Run::

    python benchmarks/dp_speed.py          # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch
from _common import QUIET, ROOT, TARGET, load, markdown_table, require_data, timed

import scvi_unlearn as su
from scvi_unlearn._utils import dump_json

# The torch.func reference patches torch at run time, so it lives with the tests, not the package.
sys.path.insert(0, str(ROOT / "tests"))
from _vmap_reference import vmap_training

LAYER_NORM = {"use_batch_norm": "none", "use_layer_norm": "both"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/dp_speed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata = load("pbmc3k", 1000)
    su.model.SCVI.setup_anndata(adata)

    def model():
        scvi.settings.seed = 0
        return su.model.SCVI(adata, **TARGET, **LAYER_NORM)

    steps = {}

    def private(mode):
        m = model()
        with vmap_training() if mode == "vmap" else contextlib.nullcontext():
            summary = su.train.train_dp(
                m, target_epsilon=10.0, max_epochs=args.epochs, batch_size=128, train_size=1.0,
                seed=0, **QUIET,
            )  # fmt: skip
        steps[mode] = summary["steps"]

    def plain():
        model().train(max_epochs=args.epochs, batch_size=128, train_size=1.0, **QUIET)

    runs = {"ghost": lambda: private("ghost"), "vmap": lambda: private("vmap"),
            "non-private": plain}  # fmt: skip
    rows = []
    for name, fit in runs.items():
        seconds = float(np.median([timed(fit)[1] for _ in range(args.repeats)]))
        rows.append({"mode": name, "wall_s": seconds, "steps": steps.get(name)})
        print(rows[-1], flush=True)
    base = next(r["wall_s"] for r in rows if r["mode"] == "non-private")
    for r in rows:
        r["x_non_private"] = r["wall_s"] / base
    frame = pd.DataFrame(rows)
    dump_json(
        {"rows": rows, "settings": vars(args), "n_cells": adata.n_obs}, str(out / "results.json")
    )
    text = [
        "# DP-SGD clipping cost (pbmc3k, memorising scVI with layer norm)",
        "",
        f"{adata.n_obs} cells, {args.epochs} epochs, expected batch 128, epsilon 10, "
        f"{args.threads} torch thread(s), median of {args.repeats}.",
        "",
        markdown_table(frame.round(3)),
        "",
        "Produced by `python benchmarks/dp_speed.py`.",
    ]
    (out / "results.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    require_data()
    main()
