"""Benchmark: attack-feature throughput (cells/s) on Kang 2018, and where the time goes.

The target: ``attack_features`` at >= 20,000 cells/s on 2 CPU cores. The model is
trained for one epoch only: throughput depends on the architecture and the data, not on the
weights. Each setting is timed ``--repeats`` times over all 12,261 cells after one warm-up
pass; the table reports the best and the median.

The profile splits one pass into: the scvi-tools data loader alone (sparse rows to dense
tensors), the encoder (``inference``), the decoder (``generative``) and the likelihood, so
the bottleneck is named by measurement.

Run::

    python benchmarks/throughput.py            # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import KANG_FILE, MEMORISING, data_file, markdown_table, repeat_timed

import scvi_unlearn as su
from scvi_unlearn import _compat as compat
from scvi_unlearn.module import sparse_nll

ARCHITECTURES = {
    "default": {},
    "large": MEMORISING,
}


@torch.no_grad()
def _profile(model, batch_size: int) -> dict[str, float]:
    """Seconds per full pass spent in each stage (stages timed separately, same batches)."""
    module = model.module.eval()
    loader = compat.make_data_loader(model, model.adata, batch_size=batch_size)
    batches = []
    t0 = time.perf_counter()
    for tensors in loader:
        batches.append(tensors)
    t_load = time.perf_counter() - t0
    t_inf = t_gen = t_lik = 0.0
    for tensors in batches:
        t0 = time.perf_counter()
        inf = dict(module.inference(**compat.inference_inputs(module, tensors)))
        inf["z"] = module.z_encoder.z_transformation(inf["qz"].loc)
        t1 = time.perf_counter()
        gen = module.generative(**compat.generative_inputs(module, tensors, inf))
        t2 = time.perf_counter()
        sparse_nll(gen["px"], tensors["X"])
        t3 = time.perf_counter()
        t_inf, t_gen, t_lik = t_inf + t1 - t0, t_gen + t2 - t1, t_lik + t3 - t2
    return {"loader_s": t_load, "encoder_s": t_inf, "decoder_s": t_gen, "likelihood_s": t_lik}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/throughput")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata = su.data.kang2018(path=data_file(KANG_FILE))
    rows, profiles = [], []
    for arch, kwargs in ARCHITECTURES.items():
        torch.set_num_threads(2)
        recipe = su.Recipe(model_kwargs=kwargs, train_kwargs={"max_epochs": 1})
        model = recipe.fit(adata.copy(), seed=0, accelerator="cpu", enable_progress_bar=False)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for bs in args.batch_sizes:
                times = repeat_timed(
                    lambda m=model, b=bs: su.attack_features(m, batch_size=b), args.repeats
                )
                rows.append(
                    {
                        "architecture": arch,
                        "threads": threads,
                        "batch_size": bs,
                        "best_cells_per_s": adata.n_obs / min(times),
                        "median_cells_per_s": adata.n_obs / float(np.median(times)),
                    }
                )
                print(rows[-1], flush=True)
            prof = _profile(model, args.batch_sizes[0])
            total = sum(prof.values())
            profiles.append(
                {
                    "architecture": arch,
                    "threads": threads,
                    **{k: v for k, v in prof.items()},
                    **{k.replace("_s", "_share"): v / total for k, v in prof.items()},
                }
            )
            print(profiles[-1], flush=True)
    table, prof_table = pd.DataFrame(rows), pd.DataFrame(profiles)
    meta = {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cpu_count_visible": torch.get_num_threads(),
    }
    (out / "results.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "throughput": table.to_dict("records"),
                "profile": prof_table.to_dict("records"),
            },
            indent=2,
        )
    )
    md = [
        "# Attack-feature throughput (Kang 2018, all cells)",
        "",
        f"{adata.n_obs} cells x {adata.n_vars} genes; target >= 20,000 cells/s on 2 cores.",
        "",
        markdown_table(table),
        "",
        f"## Where one pass spends its time (seconds; batch size {args.batch_sizes[0]})",
        "",
        markdown_table(prof_table),
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
