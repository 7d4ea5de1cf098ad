"""The steps of ``model.unlearn``: checks, the run, the new model's cells and provenance.

:meth:`scvi_unlearn.model.UnlearningMixin.unlearn` strings these together; the methods
themselves are training plans in :mod:`scvi_unlearn.train`.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import scvi
from scvi.train import TrainingPlan

from scvi_unlearn._compat import compute_kl_weight
from scvi_unlearn._configurations import check_supported_model
from scvi_unlearn._model_data import registered_adata, training_positions
from scvi_unlearn._recipe import Recipe
from scvi_unlearn._utils import package_version, to_jsonable
from scvi_unlearn._validation import (
    IndexLike,
    as_cell_indices,
    check_count_data,
    check_not_minified,
)
from scvi_unlearn.audit import MembershipInference

if TYPE_CHECKING:
    from scvi_unlearn.train import HeldOutUtility, MethodResult, UnlearningRun

#: Arguments of ``MembershipInference.audit`` (the rest of ``audit_kwargs`` go to its constructor).
_AUDIT_CALL_KEYS = ("reference_models", "n_bootstrap")


@dataclass
class UnlearningEvent:
    """The provenance record of one unlearning run (forgotten cells by count and fingerprint).

    :meth:`to_dict` gives the JSON-able record saved with the model; optional parts left
    ``None`` are not written.
    """

    method: str
    hyperparameters: dict[str, Any]
    seed: int
    max_epochs: int
    forgotten: dict[str, Any]
    n_forgotten: int
    n_train_before: int
    n_train_after: int
    nonmembers: dict[str, Any]
    started_at: str
    wall_time_s: float
    metrics: dict[str, Any]
    scvi_unlearn_version: str = field(default_factory=package_version)
    scvi_tools_version: str = field(default_factory=lambda: scvi.__version__)
    utility: dict[str, Any] | None = None
    donors: dict[str, int] | None = None
    deletion_ready: str | None = None
    reproduce: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as saved (``donors`` counts inlined; ``None`` parts left out)."""
        record = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "donors":
                record.update(value or {})
            elif value is not None or item.default is not None:
                record[item.name] = value
        return record


def run_event(run: UnlearningRun, train, nonmember_info, started_at, wall_time,
              metrics) -> UnlearningEvent:  # fmt: skip
    """The event of a method's run on ``run`` (before its utility and reproduce records)."""
    forgotten = run.model.adata.obs_names[run.forget]
    nonmembers = run.nonmembers
    return UnlearningEvent(
        method=run.method,
        hyperparameters=run.hyperparameters,
        seed=run.seed,
        max_epochs=run.max_epochs,
        forgotten=cells_fingerprint(forgotten),
        n_forgotten=int(run.forget.size),
        n_train_before=int(train.size),
        n_train_after=int(run.retain.size),
        nonmembers={**nonmember_info, "n": 0 if nonmembers is None else int(nonmembers.size)},
        started_at=started_at,
        wall_time_s=wall_time,
        metrics=metrics,
    )


def cells_fingerprint(names) -> dict[str, Any]:
    """``{"n", "sha256"}`` of a set of cell names: the SHA-256 of the sorted names, one a line.

    A lab that keeps its withdrawal list can show that a record is about exactly those cells
    (same count, same hash); the record itself names none of them.
    """
    names = sorted(str(n) for n in names)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return {"n": len(names), "sha256": digest}


def without_cell_names(obj: Any, forgotten: set[str]) -> Any:
    """``obj`` with every list of names that holds a forgotten cell replaced by its fingerprint.

    Methods and audits record cell names (development cells, audited members); the forgotten
    cells among them must not travel with the model, so such lists become count + SHA-256.
    """
    if isinstance(obj, dict):
        return {k: without_cell_names(v, forgotten) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        if obj and all(isinstance(v, str) for v in obj) and not forgotten.isdisjoint(obj):
            return cells_fingerprint(obj)
        return [without_cell_names(v, forgotten) for v in obj]
    return obj


def retained_adata(model, source, forget: np.ndarray):
    """A new AnnData of ``source``'s cells but ``forget``, registered with ``model``.

    It carries ``X``, layers, ``obs``, ``var`` and ``obsm`` of the other cells (new objects; the
    matrices are copies of the retained rows). ``obsp`` and ``uns`` are left out: neighbour
    graphs and summaries were computed with the forgotten cells.
    """
    keep = np.setdiff1d(np.arange(source.n_obs), forget)
    return registered_adata(model, source[keep])


def drop_forgotten_cells(model, source, forget: np.ndarray) -> None:
    """Point ``model`` at :func:`retained_adata`; its cell positions follow by name."""
    names = source.obs_names
    recorded = {
        attr: positions(getattr(model, attr, None))
        for attr in ("train_indices", "validation_indices", "test_indices")
    }
    new = retained_adata(model, source, forget)
    model.adata = new  # scvi-tools' setter: registry and summary statistics of the new data
    for attr, pos in recorded.items():
        found = new.obs_names.get_indexer(names[pos])
        setattr(model, attr, np.sort(found[found >= 0]).astype(np.int64))


# -- checks ------------------------------------------------------------------------------------
def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an ``int`` >= ``low``, or a clear error (booleans are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value}.")
    return int(value)


def positions(indices) -> np.ndarray:
    """Sorted unique ``np.int64`` positions (empty for ``None``)."""
    if indices is None:
        return np.zeros(0, np.int64)
    return np.unique(np.asarray(indices, dtype=np.int64))


def check_unlearnable_data(model) -> None:
    """Raise unless the model's AnnData holds the raw counts every method trains on.

    A minified AnnData (scvi-tools keeps only latent posterior parameters, its counts are
    gone) and normalised or log-transformed values would let methods run on the wrong numbers.
    A configuration of :data:`~scvi_unlearn.model.REFUSED_CONFIGURATIONS` is refused first.
    """
    check_supported_model(model)
    check_not_minified(model)
    layer = model.adata_manager.registry.get("setup_args", {}).get("layer")
    check_count_data(model.adata, layer)


def training_cells(model) -> np.ndarray:
    """Positions in ``model.adata`` of the cells the model trained on (never empty)."""
    train = training_positions(model)
    if train is None or train.size == 0:
        raise ValueError(
            "The model records no training cells (`model.train_indices` is empty), so it is "
            "unknown which cells it learned from."
        )
    return train


def check_forget(model, forget_idx: IndexLike, train: np.ndarray) -> np.ndarray:
    forget = as_cell_indices(model.adata, forget_idx, "forget_idx")
    outside = np.setdiff1d(forget, train)
    if outside.size:
        names = model.adata.obs_names[outside[:5]].tolist()
        val = np.intersect1d(outside, positions(model.validation_indices))
        hint = (
            f" ({val.size} of them are validation cells, which scVI never trained on)"
            if val.size
            else ""
        )
        raise ValueError(
            f"{outside.size} of the {forget.size} cells in `forget_idx` were not in the model's "
            f"training set{hint}, e.g. {names}; only trained-on cells can be unlearned."
        )
    if forget.size == train.size:
        raise ValueError(
            f"`forget_idx` holds all {train.size} training cells: nothing would remain. Train a "
            "new model instead of unlearning everything."
        )
    return forget


def resolve_nonmembers(model, nonmembers, forget, train, population_key, method):
    """Non-members given by the user (checked), or found in the forget cells' population."""
    adata = model.adata
    if nonmembers is not None:
        idx = as_cell_indices(adata, nonmembers, "nonmembers")
        seen = np.intersect1d(idx, train)
        if seen.size:
            raise ValueError(
                f"{seen.size} of the `nonmembers` are training cells of the model (e.g. "
                f"{adata.obs_names[seen[:5]].tolist()}); non-members must be cells it never "
                "trained on."
            )
        return idx, {"source": "given"}
    key = population_key or ("cell_type" if "cell_type" in adata.obs else None)
    if key is None:
        raise ValueError(
            f"Method '{method}' needs same-population non-members: pass `nonmembers=` or "
            "`population_key=` (an obs column such as 'cell_type')."
        )
    if key not in adata.obs:
        raise KeyError(f"`population_key` {key!r} is not an obs column of the model's AnnData.")
    values = adata.obs[key].astype(str).to_numpy()
    population = Counter(values[forget].tolist()).most_common(1)[0][0]
    candidates = np.setdiff1d(np.flatnonzero(values == population), train)
    if candidates.size == 0:
        raise ValueError(
            f"No non-members found for method '{method}': every cell of the model's AnnData "
            f"with {key} == {population!r} was trained on. Pass `nonmembers=` (cells of the same "
            "population the model never saw), e.g. after loading the model with an AnnData that "
            "also holds held-out cells."
        )
    return candidates.astype(np.int64), {
        "source": "auto",
        "population_key": key,
        "population": population,
    }


def final_kl_weight(model) -> float:
    """The KL weight of the model's last training step, by scvi-tools' own schedule.

    Recorded when :class:`~scvi_unlearn.model.SCVI` trains (``final_kl_weight_``, from the
    training plan's last epoch and step) and pinned on every unlearned model, so chained runs
    continue at the original weight. For a plain scvi-tools model the same schedule
    (``scvi.train``'s ``_compute_kl_weight``, epoch warm-up overriding step warm-up) is
    evaluated at the last epoch of its history and the last step that implies. The logged
    ``kl_weight`` history is not used: scvi-tools logs it every ``log_every_n_steps`` steps,
    so its last value may predate the last step.
    """
    pinned = getattr(model, "final_kl_weight_", None)
    if pinned is not None:
        return float(pinned)
    recipe = Recipe.from_model(model)
    epochs = recipe.train_kwargs.get("max_epochs")
    if not epochs:
        return float((recipe.train_kwargs.get("plan_kwargs") or {}).get("max_kl_weight", 1.0))
    train = getattr(model, "train_indices", None)
    n_train = 0 if train is None else len(train)
    batch_size = int(recipe.train_kwargs.get("batch_size") or scvi.settings.batch_size)
    steps = int(epochs) * max(1, math.ceil(n_train / batch_size))
    return kl_weight_at(recipe.train_kwargs.get("plan_kwargs"), int(epochs) - 1, steps - 1)


def kl_weight_at(plan_kwargs: dict | None, epoch: int, step: int) -> float:
    """scvi-tools' KL weight at ``epoch`` / ``step`` for a plan built with ``plan_kwargs``."""
    defaults = inspect.signature(TrainingPlan.__init__).parameters
    plan = {
        name: (plan_kwargs or {}).get(name, defaults[name].default)
        for name in ("n_epochs_kl_warmup", "n_steps_kl_warmup", "max_kl_weight", "min_kl_weight")
    }
    return float(compute_kl_weight(epoch, step, **plan))


# -- utility -----------------------------------------------------------------------------------
#: Held-out neg. ELBO worse than the trained model's by more than this share: a warning (the same
#: share ``method="auto"`` accepts by default, its ``max_utility_loss``).
UTILITY_WARNING = 0.05
#: ``unlearn(damage_limit=...)``'s default: a model whose held-out neg. ELBO more than doubled
#: (or is no longer finite) is refused, not returned.
DAMAGE_LIMIT = 1.0


def utility_record(
    method: str, held_out: HeldOutUtility, module, exact: bool = False
) -> dict[str, Any]:
    """The run's ``utility`` record: held-out neg. ELBO before and after; warns on a loss.

    Every run records it, so a method that damaged the model (a Fisher ``alpha`` too large, a
    runaway ascent) says so in its provenance and in a warning instead of reading as done. An
    exact result is never "damaged": it is the model the data without those cells gives (it
    may be worse than the trained model, which had seen them), so it is recorded without a
    warning.
    """
    if held_out.reference is None:
        return {"n_held_out_cells": 0, "note": "no cells outside the training set"}
    before, after = held_out.reference, held_out.of(module)
    change = after / before - 1.0
    # A diverged model (NaN or infinite ELBO) is the worst damage, not "no change".
    damaged = not math.isfinite(change) or (change > UTILITY_WARNING and not exact)
    if damaged:
        remedy = (
            "Check the method's hyper-parameters (e.g. a smaller `alpha` for 'fisher') "
            "or use an exact method (method='retrain_fast')"
        )
        warnings.warn(
            f"Method '{method}' returned a model whose held-out neg. ELBO is {after:.1f} "
            f"against the trained model's {before:.1f} ({change:+.1%}, on {held_out.n_cells} "
            f"cells it never trained on): utility was lost. {remedy}.",
            UserWarning,
            stacklevel=3,
        )
    return {
        "n_held_out_cells": held_out.n_cells,
        "neg_elbo_before": before,
        "neg_elbo_after": after,
        "change": change,
        "warned": damaged,
    }


def check_damage(method: str, utility: dict[str, Any], damage_limit: float | None) -> None:
    """Raise if the held-out neg. ELBO rose by more than ``damage_limit`` (``None``: never)."""
    if damage_limit is None or not utility.get("n_held_out_cells"):
        return
    change = utility["change"]
    if math.isfinite(change) and change <= damage_limit:
        return
    raise RuntimeError(
        f"Method '{method}' destroyed the model: its held-out neg. ELBO went from "
        f"{utility['neg_elbo_before']:.1f} to {utility['neg_elbo_after']:.4g} ({change:+.0%}; "
        f"the limit is {damage_limit:+.0%}), so no unlearned model is returned. Use gentler "
        "hyper-parameters or an exact method (method='retrain_fast'), or pass "
        "`damage_limit=None` to get the damaged model anyway."
    )


def check_damage_limit(value: Any) -> float | None:
    """``damage_limit`` as a positive float, or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"`damage_limit` must be a positive share (1.0 = the held-out neg. ELBO may double) "
            f"or None, got {value!r}."
        )
    return float(value)


# -- the new model ---------------------------------------------------------------------------
def finish(target, run: UnlearningRun, original) -> None:
    """Training cells after forgetting; the original's validation / test sets stay."""
    target.train_indices = run.retain.copy()
    names = getattr(original, "train_obs_names_", None)
    if names is None:
        target.train_obs_names_ = target.adata.obs_names[run.retain].tolist()
    else:  # keep recorded training cells that this AnnData lacks
        forgotten = set(target.adata.obs_names[run.forget])
        target.train_obs_names_ = [n for n in names if n not in forgotten]
    target.validation_indices = positions(original.validation_indices)
    target.validation_obs_names_ = target.adata.obs_names[target.validation_indices].tolist()
    target.test_indices = positions(getattr(original, "test_indices", None))
    target.is_trained_ = True
    target.final_kl_weight_ = run.kl_weight
    target.module.eval()


def record(target, original, event: UnlearningEvent, names: list[str] | None = None) -> None:
    """Append ``event`` to the provenance the original carried (chained runs accumulate).

    ``names``: the forgotten cells' names, kept only when the user asked (``record_names``);
    the top-level list exists only while every event recorded its names.
    """
    previous = copy.deepcopy(getattr(original, "unlearning_provenance_", None) or {})
    events = list(previous.get("events", []))
    event = to_jsonable(event.to_dict())
    events.append(event)
    provenance = {
        "events": events,
        "n_forgotten": int(previous.get("n_forgotten", 0)) + int(event["n_forgotten"]),
        "original_n_train": previous.get("original_n_train", event["n_train_before"]),
        "scvi_unlearn_version": event["scvi_unlearn_version"],
    }
    earlier = previous.get("forgotten_obs_names")
    if names is not None and (earlier is not None or len(events) == 1):
        provenance["forgotten_obs_names"] = list(earlier or []) + list(names)
    target.unlearning_provenance_ = provenance


def reporting_cells(forget, nonmembers, result: MethodResult) -> tuple[np.ndarray, np.ndarray]:
    """The forget cells and non-members the method did not select on (the audit's cells).

    Methods that judge their own result on development cells (``auto``, the adversarial
    methods) return them in their :class:`~scvi_unlearn.train.MethodResult`; the audit of
    ``unlearn(audit=True)`` leaves them out, so its verdict is not the selection rule's own.
    """
    forget = np.setdiff1d(forget, result.selection_forget)
    if nonmembers is not None:
        nonmembers = np.setdiff1d(nonmembers, result.selection_nonmembers)
    return forget, nonmembers


def audit_result(
    target, recipe, adata, forget, nonmembers, seed, accelerator, devices, progress_bar,
    audit_kwargs,
) -> dict[str, Any]:  # fmt: skip
    """Membership-inference audit of the unlearned model: forget cells vs non-members.

    ``recipe`` is the original model's, ``adata`` the data it was trained on (forget cells
    included: the audit scores them).
    """
    split = dict(recipe.train_kwargs.get("datasplitter_kwargs") or {})
    split.pop("external_indexing", None)  # positions of the original data, not a recipe
    recipe.train_kwargs["datasplitter_kwargs"] = split
    if not split:
        recipe.train_kwargs.pop("datasplitter_kwargs")
    kwargs = dict(audit_kwargs)
    call = {k: kwargs.pop(k) for k in _AUDIT_CALL_KEYS if k in kwargs}
    mi = MembershipInference(
        adata,
        recipe=recipe,
        seed=seed,
        accelerator=accelerator,
        devices=devices,
        **kwargs,
    )
    mi.fit(progress_bar=progress_bar)
    report = mi.audit(target, members=forget, nonmembers=nonmembers, **call)
    return to_jsonable(report.summary())
