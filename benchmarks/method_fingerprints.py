"""Same seeds, same weights: a SHA-256 of every method's unlearned weights on a fixed tiny model.

Protocol: a 240-cell synthetic PBMC set (the package's embedded generator, no download), a
16-hidden / 4-latent scVI trained 6 epochs on the even cells, 40 of them forgotten, every
fourth odd cell as the non-members; each method of the registry that acts on any trained
model runs with ``seed=1``: 2 epochs for the fixed-epoch methods, one fine-tune epoch for
those that take ``finetune_epochs`` (Fisher, SSD), 8 references for those with a reference
pool. The table holds the first 16 hex digits of the SHA-256 of each unlearned model's
weights, or the error a method refused with (the same refusal is the same result).

A refactoring that keeps behaviour keeps this table: ``--check`` runs it again and exits 1
if any fingerprint differs from the record in ``results/method_fingerprints/``. The numbers are
those of one machine and one library stack (torch, scvi-tools, Lightning versions); a
different stack may change them without anything being wrong.

    python benchmarks/method_fingerprints.py            # write the record
    python benchmarks/method_fingerprints.py --check    # compare with it
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings

import numpy as np
import pandas as pd
import scvi
import torch
from _common import QUIET, ROOT, write_results

import scvi_unlearn as su
from scvi_unlearn.train import any_model_methods, weights_fingerprint

OUT = ROOT / "benchmarks" / "results" / "method_fingerprints"
FIXED_EPOCHS = 2


def trained_model():
    """The fixed tiny model, its forget cells and its non-members."""
    adata = su.data.synthetic_pbmc(n_cells=240, n_genes=50, seed=3)
    train, val = np.arange(0, 240, 2), np.arange(1, 240, 4)
    test = np.setdiff1d(np.arange(240), np.union1d(train, val))
    su.model.SCVI.setup_anndata(adata, batch_key="batch" if "batch" in adata.obs else None)
    scvi.settings.seed = 0
    model = su.model.SCVI(adata, n_hidden=16, n_latent=4)
    split = {"external_indexing": [train, val, test]}
    model.train(max_epochs=6, **QUIET, datasplitter_kwargs=split)
    return model, train[:40], np.arange(3, 240, 4)


def settings(name: str, cache: str) -> dict:
    """Run settings of one method: short fixed budgets, a private reference cache."""
    method = su.train.METHODS[name]
    extra: dict = {}
    if isinstance(method.epochs, su.train.FixedEpochs) and method.epochs.default:
        extra["max_epochs"] = FIXED_EPOCHS
    if "finetune_epochs" in method.params:
        extra["finetune_epochs"] = 1
    if "epsilon" in method.params:  # a certificate loose enough that the weights stay usable
        extra["epsilon"] = 1e12
    if "reference_cache_dir" in method.params:
        # 8 references: with 4, oracle_matching finds cells that no reference left out
        extra.update(reference_cache_dir=cache, n_references=8)
    return extra


def fingerprints() -> dict[str, str]:
    """Method name -> 16 hex digits of its weights' SHA-256 (or the refusal)."""
    model, forget, nonmembers = trained_model()
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in any_model_methods():
            try:
                result = model.unlearn(
                    forget, method=name, nonmembers=nonmembers, seed=1, damage_limit=None,
                    **QUIET, **settings(name, cache),
                )  # fmt: skip
                out[name] = weights_fingerprint(result.module)[:16]
            except Exception as error:  # a refusal is a result here
                out[name] = f"{type(error).__name__}: {str(error)[:90]}"
            print(f"{name:26s} {out[name]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the record")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for logger in ("lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    found = fingerprints()
    if args.check:
        record = json.loads((OUT / "fingerprints.json").read_text())
        recorded = {row["method"]: row["weights_sha256"] for row in record["table"]}
        changed = {m: (recorded.get(m), v) for m, v in found.items() if recorded.get(m) != v}
        for name, (old, new) in changed.items():
            print(f"changed: {name}: {old} -> {new}")
        print("same weights as the record" if not changed else f"{len(changed)} changed")
        return 1 if changed else 0
    OUT.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"method": list(found), "weights_sha256": list(found.values())})
    write_results(
        OUT, "fingerprints", "Weights of every method on a fixed tiny model",
        "`python benchmarks/method_fingerprints.py`", table,
        notes=["", f"torch {torch.__version__}, scvi-tools {scvi.__version__}, "
                   f"scvi-unlearn {su.__version__}."],
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
