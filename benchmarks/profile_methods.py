"""Profile: where Fisher scrubbing and extra-gradient spend their wall time.

For a missed speed target, profile and name the bottleneck. This runs
each method once under ``cProfile`` on pbmc3k (the larger scVI of the benchmark, trained
briefly: the cost of one unlearning run does not depend on how long the target trained) and
writes the top functions by cumulative and by own time.

Run::

    python benchmarks/profile_methods.py     # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import scanpy as sc
import torch
from _common import PBMC3K_FILE, TARGET, data_file

import scvi_unlearn as su


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata = su.data.pbmc3k(path=data_file(PBMC3K_FILE))
    hvg = sc.pp.highly_variable_genes(adata, n_top_genes=1000, flavor="seurat_v3", inplace=False)
    adata = adata[:, hvg["highly_variable"].to_numpy()].copy()
    split = su.data.membership_split(adata, ("cell_type", "Platelet"), seed=0)
    recipe = su.Recipe(model_kwargs=TARGET, train_kwargs={"max_epochs": 2, "train_size": 1.0})
    model = recipe.fit_cells(adata, split.train, seed=0, accelerator="cpu")
    kwargs = {"seed": 0, "accelerator": "cpu", "enable_progress_bar": False}
    runs = {
        "fisher": {"method": "fisher"},
        "extragradient": {"method": "extragradient", "nonmembers": split.nonmember},
        "retrain_1_epoch": {"method": "retrain", "max_epochs": 1},
    }
    lines = []
    for name, extra in runs.items():
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        model.unlearn(split.forget, **kwargs, **extra)
        profiler.disable()
        seconds = time.perf_counter() - t0
        for sort in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats(sort).print_stats(25)
            lines += [f"## {name}: {seconds:.1f} s wall, sorted by {sort}", "", "```"]
            lines += [ln for ln in buf.getvalue().splitlines() if ln.strip()][:40]
            lines += ["```", ""]
        print(f"{name}: {seconds:.1f} s", flush=True)
    (out / "profile.md").write_text("\n".join(lines))
    print(f"wrote {out / 'profile.md'}")


if __name__ == "__main__":
    main()
