"""Benchmark: one shadow pool trained sequentially, on a 2-process local pool, and on Ray.

The same ``train_shadow_pool`` call (K shadow scVI models with one recipe on random halves of
the cells, features of every cell under each) runs on each backend of
:class:`scvi_unlearn.Executor`, each time into an empty cache:

- ``sequential``: one fit after another in this process, with all ``--threads`` torch threads
  (today's default and the fair baseline);
- ``pool``: a local process pool of ``--workers`` processes, one torch thread each;
- ``ray``: a local Ray instance with ``--workers`` CPUs, one per task, one torch thread each.

Reported per backend: wall time, the sum of the tasks' own fit times, the overhead per task
(``(wall - sum(task) / workers) * workers / K``: start-up, pickling the AnnData, scheduling,
featurising idle time), the speed-up over sequential, and whether the features and weights
equal those of the other one-thread backends bit for bit.

Run (Kang 2018 from ``../shared/data``, scVI's default architecture)::

    python benchmarks/parallel_pools.py --dataset kang --n-shadows 8
    python benchmarks/parallel_pools.py --dataset kang --n-shadows 8 --max-epochs 20  # shorter
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import DATASET_SETTINGS, load, markdown_table, require_data

import scvi_unlearn as su
from scvi_unlearn.audit import train_shadow_pool


def run_backend(name, executor, adata, recipe, n_shadows, seed):
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        pool = train_shadow_pool(
            adata, recipe, n_shadows, np.arange(adata.n_obs), seed=seed, cache_dir=cache,
            accelerator="cpu", progress_bar=False, keep_models=True, executor=executor,
        )  # fmt: skip
        wall = time.perf_counter() - start
    workers = executor.num_cpus_total if executor.backend == "ray" else executor.n_workers
    task_sum = float(np.sum(pool.train_seconds))
    overhead = (wall - task_sum / workers) * workers / n_shadows
    print(f"{name}: {wall:.0f} s wall, {task_sum:.0f} s of fits, overhead {overhead:.1f} s/task")
    return pool, {
        "backend": name, "workers": workers,
        "threads per task": executor.threads_per_worker or torch.get_num_threads(),
        "wall_s": wall, "sum of task fits_s": task_sum, "mean fit_s": task_sum / n_shadows,
        "overhead per task_s": overhead,
    }  # fmt: skip


def identical(a, b) -> bool:
    if not np.array_equal(a.features, b.features):
        return False
    return all(
        all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a.state_dicts, b.state_dicts)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="kang", choices=list(DATASET_SETTINGS))
    parser.add_argument("--n-shadows", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: scVI heuristic")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["sequential", "pool", "ray"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/parallel_pools")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adata = load(args.dataset, DATASET_SETTINGS[args.dataset]["n_hvg"])
    train_kwargs = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    recipe = su.Recipe(train_kwargs=train_kwargs)  # scVI as labs train it
    executors = {
        "sequential": su.Executor(progress_bar=False),
        "pool": su.Executor(n_workers=args.workers, threads_per_worker=1, progress_bar=False),
        "ray": su.Executor(backend="ray", num_cpus_total=args.workers, threads_per_worker=1,
                           progress_bar=False) if "ray" in args.backends else None,
    }  # fmt: skip
    rows, pools = [], {}
    for name in args.backends:
        pools[name], row = run_backend(
            name, executors[name], adata, recipe, args.n_shadows, args.seed
        )
        rows.append(row)
    if executors["ray"] is not None:
        executors["ray"].shutdown()
    base = next((r["wall_s"] for r in rows if r["backend"] == "sequential"), None)
    one_thread = [n for n in pools if n != "sequential"]
    for row in rows:
        row["speed-up vs sequential"] = None if base is None else base / row["wall_s"]
        others = [n for n in one_thread if n != row["backend"]]
        row["bit-identical to"] = (
            ", ".join(n for n in others if identical(pools[row["backend"]], pools[n])) or "-"
            if row["backend"] in one_thread else "(other thread count)"
        )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = (
        f"{args.dataset} ({adata.n_obs} cells x {adata.n_vars} genes), {args.n_shadows} shadows, "
        f"recipe {recipe.train_kwargs or 'scVI defaults'}, {args.workers} workers on "
        f"{torch.get_num_threads()}-thread machine setting"
    )
    table = markdown_table(pd.DataFrame(rows).round(2))
    text = "\n".join([
        "# Shadow pool on three executor backends", "",
        f"Command: `python benchmarks/parallel_pools.py {' '.join(sys.argv[1:])}`", "",
        setting, "", table, "",
    ])  # fmt: skip
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    require_data()
    main()
