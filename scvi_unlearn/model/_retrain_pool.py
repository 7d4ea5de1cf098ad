"""Exact retrains for a retrain band: one per seed, on any executor."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from scvi_unlearn._compat import register_manager
from scvi_unlearn._executor import get_default_executor
from scvi_unlearn.model._donor_methods import DonorRemoval
from scvi_unlearn.train import exact_methods, get_method

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from scvi.model import SCVI  # the base class: this module sits below model._scvi

    from scvi_unlearn._executor import Executor


def retraining_methods() -> tuple[str, ...]:
    """The registered exact methods that train from scratch (a band's models differ by seed)."""
    return tuple(n for n in exact_methods() if not isinstance(get_method(n), DonorRemoval))


def retrain_models(
    model: SCVI,
    forget,
    seeds: Iterable[int],
    method: str = "retrain",
    executor: Executor | None = None,
    on_model: Callable[[int, SCVI, float], None] | None = None,
    **unlearn_kwargs: Any,
) -> list[SCVI]:
    """Exact retrains of ``model`` without ``forget``, one per seed: a retrain band's models.

    Each is ``model.unlearn(forget, method=method, seed=seed, **unlearn_kwargs)``; on a local
    process pool or Ray the model travels to the workers once and each retrain comes back
    whole (weights, its own AnnData of the retained cells, provenance), usable in this process
    and the same as a retrain here for the same seed and torch threads per task.

    Parameters
    ----------
    model
        The trained model (never modified).
    forget
        The cells to leave out (positions, mask or obs names), as for ``unlearn``.
    seeds
        One retrain per seed; several form the band of :func:`scvi_unlearn.audit.reference_band`.
    method
        ``"retrain"`` (the recipe's full epochs) or ``"retrain_fast"``.
    executor
        Where they run; :func:`~scvi_unlearn.get_default_executor` by default.
    on_model
        ``on_model(seed, retrained, wall_seconds)`` in this process as each one is done (save
        it there to resume a long run).
    **unlearn_kwargs
        Passed to ``unlearn`` (``accelerator``, ``enable_progress_bar``, ...).

    Returns
    -------
    The retrained models, in the order of ``seeds``.
    """
    if method not in retraining_methods():
        raise ValueError(
            f"A retrain band needs an exact retraining method {retraining_methods()}, "
            f"got {method!r}."
        )
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"Seeds repeat ({seeds}): the same seed gives the same model.")
    # The manager travels with the model (one pickle, so it keeps pointing at the model's
    # AnnData): scvi-tools keeps managers in per-process stores that a worker starts without.
    shared = {
        "model": model,
        "manager": model.adata_manager,
        "forget": forget,
        "method": method,
        "kwargs": unlearn_kwargs,
    }

    def deliver(i: int, result: dict) -> None:
        # runs in this process for every task, before map() returns
        register_in_this_process(result["model"], result["manager"])
        if on_model is not None:
            on_model(seeds[i], result["model"], result["seconds"])

    results = (executor or get_default_executor()).map(
        retrain_one, [{"seed": s} for s in seeds], shared=shared, on_result=deliver,
        description="Retraining",
    )  # fmt: skip
    return [r["model"] for r in results]


def register_in_this_process(model: SCVI, manager) -> SCVI:
    """Register ``model``'s AnnData manager in this process if it is not there yet.

    A model unpickled in a worker process has its AnnData but not scvi-tools' per-process
    manager stores, so its data loaders fail ("AnnDataManager not found"); ``manager`` came in
    the same pickle and points at that AnnData.
    """
    if model.get_anndata_manager(model.adata) is None:
        register_manager(model, manager)
    return model


def retrain_one(shared: dict, seed: int) -> dict:
    """One exact retrain (an :class:`~scvi_unlearn.Executor` task), with its wall time."""
    start = time.perf_counter()
    model = register_in_this_process(shared["model"], shared["manager"])
    retrained = model.unlearn(
        shared["forget"], method=shared["method"], seed=seed, **shared["kwargs"]
    )
    # Its own AnnData (the retained cells only) travels with its manager, as the input did.
    return {
        "model": retrained,
        "manager": retrained.adata_manager,
        "seconds": time.perf_counter() - start,
    }
