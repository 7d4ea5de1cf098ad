"""A proof anyone can re-run: an exact unlearning replayed from its record, bit for bit.

An exact method's result is a function of its inputs: the recipe, the seed, the retained
training and validation cells and their counts, and the software that ran it. ``unlearn()``
records those (:func:`reproduce_record`); :func:`verify_unlearning` re-runs the method on a
lab's data from that record and compares the weights' SHA-256 with the recorded one.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from scvi_unlearn._recipe import resolve_model_class
from scvi_unlearn._validation import as_cell_indices
from scvi_unlearn.model._clone import clone_model
from scvi_unlearn.model._deletion_ready import rebuild_without
from scvi_unlearn.model._donor_methods import DonorRemoval
from scvi_unlearn.model._unlearn import cells_fingerprint, positions
from scvi_unlearn.train import UnlearningRun, get_method, weights_fingerprint

if TYPE_CHECKING:
    from anndata import AnnData

#: Packages whose versions the record keeps (bit-identical weights need the same ones).
RECORDED_PACKAGES = ("scvi-unlearn", "scvi-tools", "torch", "lightning", "numpy", "anndata")

#: What is bit-reproducible, in words (the record and ``verify`` say it).
REPRODUCIBILITY_NOTE = (
    "Bit-identical on CPU with the same package versions. GPU kernels (cuDNN, atomics) are not "
    "bit-reproducible across runs or cards: on a GPU a re-run gives close, not equal, weights."
)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def counts_fingerprint(adata: AnnData, cells: np.ndarray, layer: str | None) -> str:
    """SHA-256 of the count rows of ``cells`` (in that order), as float64, gene order as is."""
    matrix = adata.layers[layer] if layer is not None else adata.X
    digest = hashlib.sha256()
    for start in range(0, cells.size, 2048):
        block = matrix[cells[start : start + 2048]]
        block = block.toarray() if sparse.issparse(block) else np.asarray(block)
        digest.update(np.ascontiguousarray(block, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _cells_in_name_order(adata: AnnData, names) -> np.ndarray:
    order = sorted(str(n) for n in names)
    return adata.obs_names.get_indexer(pd.Index(order)).astype(np.int64)


def _layer(model) -> str | None:
    return model.adata_manager.registry.get("setup_args", {}).get("layer")


def reproduce_record(model, method: str, hyperparameters: dict, max_epochs: int, seed: int,
                     rounds: int | None, accelerator: str) -> dict[str, Any]:  # fmt: skip
    """What re-runs an exact unlearning: inputs, their fingerprints, software, weights' hash.

    ``model`` is the unlearned model, its training and validation cells named
    (``train_obs_names_``, ``validation_obs_names_``) and still in its AnnData.
    """
    train, validation = model.train_obs_names_, model.validation_obs_names_
    cells = _cells_in_name_order(model.adata, [*train, *validation])
    device = str(next(model.module.parameters()).device)
    return {
        "method": method,
        "hyperparameters": hyperparameters,
        "max_epochs": int(max_epochs),
        "rounds": rounds,
        "seed": int(seed),
        "training_cells": cells_fingerprint(train),
        "validation_cells": cells_fingerprint(validation),
        "counts_sha256": counts_fingerprint(model.adata, cells, _layer(model)),
        "weights_sha256": weights_fingerprint(model.module),
        "versions": _versions(),
        "platform": platform.platform(),
        "accelerator": accelerator,
        "device": device,
        "reproducibility": REPRODUCIBILITY_NOTE,
    }


@dataclass
class VerificationResult:
    """What :func:`verify_unlearning` found.

    Attributes
    ----------
    verified
        The re-run's weights equal the recorded ones bit for bit, the model's own weights
        equal them too, every recorded input matched, and no forgotten cell is among the
        training cells.
    weights_match
        The re-run's weights' SHA-256 equals the recorded one (``None``: not re-run).
    model_matches_record
        The model's weights' SHA-256 equals the recorded one (``False``: the weights were
        changed after unlearning).
    inputs
        Each recorded input and whether the data matched it.
    forgotten_in_training
        How many of the given forgotten cells are training cells (``None``: none given).
    versions_differ
        Packages whose version differs from the record: ``{name: (recorded, here)}``.
    problems
        One sentence per mismatch.
    """

    verified: bool
    weights_match: bool | None
    model_matches_record: bool
    inputs: dict[str, bool]
    forgotten_in_training: int | None
    versions_differ: dict[str, tuple[str, str]]
    problems: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary."""
        return {
            "verified": self.verified,
            "weights_match": self.weights_match,
            "model_matches_record": self.model_matches_record,
            "inputs": dict(self.inputs),
            "forgotten_in_training": self.forgotten_in_training,
            "versions_differ": {k: list(v) for k, v in self.versions_differ.items()},
            "problems": list(self.problems),
            "reproducibility": REPRODUCIBILITY_NOTE,
        }

    def __repr__(self) -> str:
        head = "VERIFIED" if self.verified else "NOT VERIFIED"
        lines = [f"{head}: re-run of {self.record.get('method')} (seed {self.record.get('seed')})"]
        lines += [f"  - {p}" for p in self.problems]
        if self.verified:
            lines.append("  the re-run's weights equal the recorded ones bit for bit")
        return "\n".join(lines)


def verify_unlearning(model, adata: AnnData | None = None, forgotten=None,
                      accelerator: str = "cpu") -> VerificationResult:  # fmt: skip
    """Re-run a recorded exact unlearning and compare the weights bit for bit.

    Parameters
    ----------
    model
        An unlearned :class:`~scvi_unlearn.model.SCVI`, or the directory it was saved to.
    adata
        The lab's data: it must hold the retained training and validation cells with the
        counts they had (the forgotten cells may be missing). Default: the model's own.
    forgotten
        Optional: the lab's withdrawal list (obs names). It must match the recorded count and
        fingerprint, and none of it may be a training cell.
    accelerator
        Where to re-run (``"cpu"``: the bit-reproducible setting).

    Returns
    -------
    A :class:`VerificationResult`; nothing is written.

    Raises
    ------
    ValueError
        If the model carries no reproducible record (an approximate method, a plain scVI, a
        warm start from a file), or ``forgotten`` is not a list of names.
    """
    if isinstance(model, str | bytes) or hasattr(model, "__fspath__"):
        model = resolve_model_class("SCVI").load(str(model), adata)
    elif adata is not None and adata is not model.adata:
        raise ValueError(
            "Pass a saved model directory together with `adata`, or an in-memory model alone "
            "(it verifies against its own AnnData)."
        )
    provenance = getattr(model, "unlearning_provenance_", None) or {}
    events = provenance.get("events") or []
    record = (events[-1] if events else {}).get("reproduce")
    if record is None:
        method = events[-1]["method"] if events else None
        raise ValueError(
            "This model carries no reproducible record: "
            + (
                "it was not unlearned by scvi_unlearn."
                if method is None
                else f"its last unlearning ({method}) was not exact, so there is nothing that "
                "re-running could match. Only exact methods (retrain, retrain_fast) are "
                "verifiable; audit approximate ones with MembershipInference."
            )
        )
    if record["hyperparameters"].get("init_from"):
        raise ValueError(
            "This unlearning warm-started from a saved model file, which the record does not "
            "carry; it cannot be re-run from the record alone."
        )
    problems: list[str] = []
    inputs: dict[str, bool] = {}
    model_ok = weights_fingerprint(model.module) == record["weights_sha256"]
    if not model_ok:
        problems.append(
            "the model's weights differ from the recorded ones: they were changed after the "
            "unlearning (e.g. a replaced model.pt)"
        )
    data = model.adata
    train = list(model.train_obs_names_)
    validation = list(getattr(model, "validation_obs_names_", None) or [])
    for key, names in (("training_cells", train), ("validation_cells", validation)):
        inputs[key] = cells_fingerprint(names) == record[key]
        missing = int((~pd.Index(names).isin(data.obs_names)).sum())
        if missing:
            inputs[key] = False
            problems.append(f"{missing} of the {len(names)} recorded {key.replace('_', ' ')} "
                            "are not in the data")  # fmt: skip
        elif not inputs[key]:
            problems.append(f"the model's {key.replace('_', ' ')} are not the recorded ones")
    cells = _cells_in_name_order(data, [*train, *validation])
    if (cells >= 0).all():
        inputs["counts"] = (
            counts_fingerprint(data, cells, _layer(model)) == record["counts_sha256"]
        )
        if not inputs["counts"]:
            problems.append("the counts of the recorded cells differ from the recorded ones")
    else:
        inputs["counts"] = False
    forgotten_in_training = None
    if forgotten is not None:
        names = np.asarray(forgotten)
        if names.ndim != 1 or names.dtype.kind not in "USO":
            raise ValueError("`forgotten` must be a list of obs names (the withdrawal list).")
        names = [str(n) for n in names]
        forgotten_in_training = len(set(names) & set(train))
        given = cells_fingerprint(names)
        recorded = events[-1].get("forgotten") or {}
        inputs["forgotten_list"] = given == recorded
        if not inputs["forgotten_list"]:
            problems.append(
                f"the withdrawal list ({given['n']} cells) is not the one recorded "
                f"({recorded.get('n')} cells, another fingerprint)"
            )
        if forgotten_in_training:
            problems.append(f"{forgotten_in_training} forgotten cells are training cells")
    here = _versions()
    differ = {
        k: (v, here.get(k, "not installed"))
        for k, v in record["versions"].items()
        if here.get(k) != v
    }
    weights_match = None
    if all(inputs.get(k, True) for k in ("training_cells", "validation_cells", "counts")):
        weights_match = _rerun(clone_model(model), record, train, validation, accelerator)
        if not weights_match:
            where = (
                f"; versions differ: {differ}"
                if differ
                else "; same versions, so the run itself was not deterministic here"
            )
            problems.append("the re-run's weights differ from the recorded ones" + where)
    verified = bool(weights_match) and model_ok and not problems
    return VerificationResult(
        verified, weights_match, model_ok, inputs, forgotten_in_training, differ, problems, record
    )


def _rerun(model, record, train, validation, accelerator: str) -> bool:
    """Run the recorded exact method on ``model``'s data; whether the weights' hash matches."""
    if isinstance(get_method(record["method"]), DonorRemoval):
        # A donor removal is the deletion-ready design trained without those donors.
        rebuilt = rebuild_without(model, accelerator=accelerator)
        return weights_fingerprint(rebuilt.module) == record["weights_sha256"]
    data = model.adata
    run = UnlearningRun(
        model=model,
        forget=np.zeros(0, np.int64),
        retain=positions(as_cell_indices(data, train, "training cells")),
        nonmembers=None,
        validation=positions(as_cell_indices(data, validation, "validation", allow_empty=True)),
        hyperparameters=dict(record["hyperparameters"]),
        seed=int(record["seed"]),
        max_epochs=int(record["max_epochs"]),
        accelerator=accelerator,
        enable_progress_bar=False,
        method=record["method"],
        replay_rounds=record.get("rounds"),
    )
    get_method(record["method"])(run)
    return weights_fingerprint(model.module) == record["weights_sha256"]


def exact_record_inputs(original, metrics: dict, method: str, hyperparameters: dict,
                        max_epochs: int) -> tuple[str, dict, int, int | None]:  # fmt: skip
    """(method, hyper-parameters, epochs, rounds) of the exact method that made the weights.

    For ``auto`` that is its exact fallback, with the attempt's own settings.
    """
    if method == "auto":
        attempt = metrics["attempts"][-1]
        method, hyperparameters = attempt["method"], attempt["hyperparameters"]
        max_epochs = get_method(method).resolve_epochs(original, None, hyperparameters)
        metrics = attempt.get("metrics") or {}
    rounds = len(metrics["rounds"]) if "rounds" in metrics else None
    return method, hyperparameters, int(max_epochs), rounds
