"""The unlearning protocol's requests, target and seed rule, shared by the benchmark scripts.

``unlearning_protocol.py`` states the protocol; ``auto_candidates.py``, ``dp_sgd.py`` and
``fisher_speed.py`` reuse its cell sets and target from here, so that they audit the same cells
of the same model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import TARGET

import scvi_unlearn as su

#: Per data set, the cell type a structured request reports on and the one it develops on.
POPULATIONS = {
    "kang": {"report": "Dendritic cells", "develop": "Megakaryocytes"},
    "pbmc3k": {"report": "FCGR3A+ Mono", "develop": "NK"},
}


def pair_of_splits(adata, dataset: str, forget_type: str, seed: int):
    """(reporting split, development split), populations disjoint."""
    if forget_type == "structured":
        pops = POPULATIONS[dataset]
        rep = ("cell_type", pops["report"])
        dev = ("cell_type", pops["develop"])
    elif forget_type == "scattered":
        n = 2 * int((adata.obs["cell_type"] == POPULATIONS[dataset]["report"]).sum() // 2)
        rep = su.data.scattered_forget_set(adata, n, seed=seed)
        dev = su.data.scattered_forget_set(adata, n, seed=seed + 1, exclude=rep)
    elif forget_type == "donor":
        donors = adata.obs["sample_id"].value_counts()
        rep, dev = ("sample_id", donors.index[-1]), ("sample_id", donors.index[-2])
    else:
        raise ValueError(forget_type)
    return (
        su.data.membership_split(adata, rep, holdout_fraction=0.5, seed=seed),
        su.data.membership_split(adata, dev, holdout_fraction=0.5, seed=seed + 1),
    )


def cell_sets(adata, dataset: str, forget_type: str, seed: int) -> argparse.Namespace:
    """The target's training cells, the reporting and development sets, the backgrounds."""
    rep, dev_split = pair_of_splits(adata, dataset, forget_type, seed)
    # One target for both sets: the reporting split's training cells minus the development
    # population's held-out half. Development members are its cells the target trains on,
    # its non-members all its cells the target never sees.
    train = np.setdiff1d(rep.train, dev_split.nonmember)
    dev_population = np.union1d(dev_split.forget, dev_split.nonmember)
    dev = argparse.Namespace(
        forget=np.intersect1d(dev_population, train),
        nonmember=np.setdiff1d(dev_population, train),
    )
    populations = np.concatenate([rep.forget, rep.nonmember, dev_population])
    background = np.setdiff1d(np.setdiff1d(np.arange(adata.n_obs), train), populations)
    bg_rep, bg_dev = su.data.validation_split(background, 0.5, seed=seed)
    return argparse.Namespace(rep=rep, dev=dev, train=train, bg_rep=bg_rep, bg_dev=bg_dev)


def fit_target(adata, train, args, **quiet):
    """The protocol's target on ``train`` (``--target``), and its wall time."""
    model_kwargs = TARGET if args.target == "memorising" else {}
    train_kwargs = {"train_size": 1.0}
    if args.target == "memorising":
        train_kwargs["max_epochs"] = args.epochs
    recipe = su.Recipe(model_kwargs=model_kwargs, train_kwargs=train_kwargs)
    t0 = time.perf_counter()
    target = recipe.fit_cells(adata, train, seed=args.seed, **quiet)
    return target, time.perf_counter() - t0
