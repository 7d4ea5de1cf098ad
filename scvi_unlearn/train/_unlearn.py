"""``unlearn``: remove cells from a trained scVI model, with checks and a provenance record."""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any
from uuid import uuid4

import numpy as np
import pandas as pd
import scvi

from scvi_unlearn._recipe import Recipe, _jsonable
from scvi_unlearn._validation import IndexLike, as_cell_indices, check_trained
from scvi_unlearn.train._common import seed_everything
from scvi_unlearn.train._methods import METHODS, UnlearningRun
from scvi_unlearn.train._params import check_hyperparameters

#: Arguments of ``MembershipInference.audit`` (the rest of ``audit_kwargs`` go to its constructor).
_AUDIT_CALL_KEYS = ("reference_models", "n_bootstrap")
_AUDIT_DEFAULTS = {"n_shadows": 4, "cache_dir": False}


def unlearn(
    model,
    forget_idx: IndexLike,
    method: str = "extragradient",
    nonmembers: IndexLike | None = None,
    inplace: bool = False,
    seed: int = 0,
    audit: bool = False,
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    max_epochs: int | None = None,
    population_key: str | None = None,
    enable_progress_bar: bool = True,
    audit_kwargs: dict[str, Any] | None = None,
    **method_kwargs: Any,
):
    """Remove cells from a trained scVI model; return the model that forgot them.

    Parameters
    ----------
    model
        A trained :class:`scvi_unlearn.model.SCVI` or plain :class:`scvi.model.SCVI` (wrapped
        with :meth:`scvi_unlearn.model.SCVI.from_scvi`), set up with the AnnData holding the
        cells to forget.
    forget_idx
        The cells to forget: integer positions, a boolean mask or obs names of
        ``model.adata``. They must be training cells of the model.
    method
        One of :data:`METHODS`: ``"extragradient"``, ``"frozen_critic"``, ``"fisher"``,
        ``"ssd"``, ``"finetune"``, ``"gradient_ascent"``, ``"scrub"``, ``"retrain"``.
    nonmembers
        Cells of the same population the model never trained on (positions, mask or obs names
        of ``model.adata``). Needed by the adversarial methods and by ``audit=True``. If
        ``None``, the untrained cells of ``model.adata`` whose ``population_key`` value is the
        forget cells' majority value are used.
    inplace
        Modify ``model`` itself instead of returning a new model.
    seed
        Seed of everything random in the run; the same seed gives the same weights.
    audit
        Run a :class:`~scvi_unlearn.MembershipInference` audit of the result (forget cells vs
        non-members) and store its summary in the provenance.
    accelerator, devices
        Lightning's accelerator and devices.
    max_epochs
        Training epochs (method default if ``None``; for ``"fisher"`` / ``"ssd"`` the fine-tune
        epochs, for ``"retrain"`` the recipe's epochs).
    population_key
        Obs column defining the forget cells' population for automatic non-members
        (default: ``"cell_type"`` if present).
    enable_progress_bar
        Show Lightning's progress bar.
    audit_kwargs
        Arguments of :class:`~scvi_unlearn.MembershipInference` (default ``n_shadows=4``,
        no cache) and of its ``audit`` (``reference_models``, ``n_bootstrap``), plus
        ``nonmembers``: the audit's own non-members. Pass cells the method did not see: by
        default the audit reuses the method's non-members, on which an adversarial method
        selected its state, so its verdict would be optimistic.
    **method_kwargs
        Hyper-parameters of the method (see ``METHODS[method].params``), e.g. ``lambda_``,
        ``n_critics``, ``critic_lr`` for extragradient, ``alpha`` for Fisher.

    Returns
    -------
    A :class:`scvi_unlearn.model.SCVI` whose ``train_indices`` exclude the forgotten cells and
    whose ``unlearning_provenance_`` records the run (events of chained runs accumulate).

    Raises
    ------
    RuntimeError
        If the model is untrained.
    ValueError, TypeError, IndexError, KeyError
        For invalid cells, methods or hyper-parameters, with a message naming the problem.
    """
    from scvi_unlearn.model import SCVI

    if not isinstance(model, scvi.model.SCVI):
        raise TypeError(f"`model` must be a scvi.model.SCVI, got {type(model).__name__}.")
    check_trained(model)
    if model.adata is None:
        raise ValueError(
            "The model has no AnnData; load it with `SCVI.load(dir_path, adata)` so the cells "
            "to forget can be found."
        )
    spec = _method_spec(method)
    hyperparameters = check_hyperparameters(method, spec.params, method_kwargs)
    seed = _check_int("seed", seed, low=0)
    max_epochs = None if max_epochs is None else _check_int("max_epochs", max_epochs, low=0)
    for name, flag in (("inplace", inplace), ("audit", audit)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be True or False, got {flag!r}.")

    train = _training_cells(model)
    forget = _check_forget(model, forget_idx, train)
    nonmember_idx, nonmember_info = None, {"source": None}
    if spec.needs_nonmembers or audit or nonmembers is not None:
        nonmember_idx, nonmember_info = _resolve_nonmembers(
            model, nonmembers, forget, train, population_key, method
        )
    if inplace and not isinstance(model, SCVI):
        raise TypeError("inplace=True needs a scvi_unlearn.model.SCVI; wrap it with from_scvi.")

    started_at = datetime.now(timezone.utc).isoformat()
    start = time.perf_counter()
    target = model if inplace else clone_model(model)
    run = UnlearningRun(
        model=target,
        forget=forget,
        retain=np.setdiff1d(train, forget).astype(np.int64),
        nonmembers=nonmember_idx,
        validation=_positions(model.validation_indices),
        hyperparameters=hyperparameters,
        seed=seed,
        max_epochs=_resolve_epochs(model, spec, method, max_epochs, hyperparameters),
        accelerator=accelerator,
        devices=devices,
        enable_progress_bar=enable_progress_bar,
        kl_weight=final_kl_weight(model),
    )
    seed_everything(seed)
    metrics = spec.run(run)
    wall_time = time.perf_counter() - start
    _finish(target, run, model)
    event = _event(run, method, train, nonmember_info, started_at, wall_time, metrics)
    _record(target, model, event)
    if audit:
        # After _record, so the audit knows which members were forgotten on purpose.
        audit_kwargs = dict(audit_kwargs or {})
        # Reporting non-members kept apart from those the method selected on (METHODS flaw 8).
        audit_nonmembers = audit_kwargs.pop("nonmembers", None)
        if audit_nonmembers is not None:
            audit_nonmembers = as_cell_indices(model.adata, audit_nonmembers, "audit nonmembers")
        summary = _audit(
            target,
            model,
            forget,
            nonmember_idx if audit_nonmembers is None else audit_nonmembers,
            seed,
            accelerator,
            devices,
            enable_progress_bar,
            audit_kwargs,
        )
        target.unlearning_provenance_["events"][-1]["audit"] = _clean(summary)
    return target


def _event(run: UnlearningRun, method, train, nonmember_info, started_at, wall_time, metrics):
    """The provenance record of one unlearning run."""
    obs_names = run.model.adata.obs_names
    nonmembers = run.nonmembers
    return {
        "method": method,
        "hyperparameters": run.hyperparameters,
        "seed": run.seed,
        "max_epochs": run.max_epochs,
        "forgotten_obs_names": obs_names[run.forget].tolist(),
        "forgotten_positions": run.forget.tolist(),
        "n_forgotten": int(run.forget.size),
        "n_train_before": int(train.size),
        "n_train_after": int(run.retain.size),
        "nonmembers": {**nonmember_info, "n": 0 if nonmembers is None else int(nonmembers.size)},
        "started_at": started_at,
        "wall_time_s": wall_time,
        "scvi_unlearn_version": _version(),
        "scvi_tools_version": scvi.__version__,
        "metrics": metrics,
    }


# -- checks ------------------------------------------------------------------------------------
def _method_spec(method: Any):
    if not isinstance(method, str) or method not in METHODS:
        valid = ", ".join(f"'{m}'" for m in METHODS)
        raise ValueError(f"Unknown unlearning method {method!r}; choose one of {valid}.")
    return METHODS[method]


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value}.")
    return int(value)


def _positions(indices) -> np.ndarray:
    if indices is None:
        return np.zeros(0, np.int64)
    return np.unique(np.asarray(indices, dtype=np.int64))


def _training_cells(model) -> np.ndarray:
    """Positions in ``model.adata`` of the cells the model trained on.

    Recorded obs names (``train_obs_names_``) win over ``train_indices``: names survive
    re-ordering or subsetting of the AnnData, positions do not.
    """
    names = getattr(model, "train_obs_names_", None)
    if names is not None:
        pos = model.adata.obs_names.get_indexer(pd.Index(names))
        train = np.unique(pos[pos >= 0]).astype(np.int64)
    else:
        train = _positions(getattr(model, "train_indices", None))
    if train.size == 0:
        raise ValueError(
            "The model records no training cells (`model.train_indices` is empty), so it is "
            "unknown which cells it learned from."
        )
    return train


def _check_forget(model, forget_idx: IndexLike, train: np.ndarray) -> np.ndarray:
    forget = as_cell_indices(model.adata, forget_idx, "forget_idx")
    outside = np.setdiff1d(forget, train)
    if outside.size:
        names = model.adata.obs_names[outside[:5]].tolist()
        val = np.intersect1d(outside, _positions(model.validation_indices))
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


def _resolve_nonmembers(model, nonmembers, forget, train, population_key, method):
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


def _resolve_epochs(model, spec, method, max_epochs, hyperparameters) -> int:
    if method == "retrain":
        if max_epochs is not None:
            return max_epochs
        recorded = Recipe.from_model(model).train_kwargs.get("max_epochs")
        return int(recorded or scvi.model.get_max_epochs_heuristic(len(model.train_indices)))
    if "finetune_epochs" in hyperparameters:
        ft = hyperparameters["finetune_epochs"]
        if max_epochs is not None and ft not in (0, max_epochs):
            raise ValueError(
                f"`max_epochs`={max_epochs} and `finetune_epochs`={ft} disagree; for "
                f"'{method}' they are the same thing, pass one."
            )
        return max_epochs if max_epochs is not None else ft
    return spec.default_max_epochs if max_epochs is None else max_epochs


def final_kl_weight(model) -> float:
    """The KL weight at the end of the model's training (scVI warms it up linearly).

    Read from the recorded training arguments (``max_epochs`` and the plan's
    ``n_epochs_kl_warmup`` / ``max_kl_weight``, scVI's defaults otherwise).
    """
    recipe = Recipe.from_model(model)
    plan = dict(recipe.train_kwargs.get("plan_kwargs") or {})
    max_kl = float(plan.get("max_kl_weight", 1.0))
    min_kl = float(plan.get("min_kl_weight", 0.0))
    warmup = plan.get("n_epochs_kl_warmup", 400)
    epochs = recipe.train_kwargs.get("max_epochs")
    if not warmup or epochs is None or plan.get("n_steps_kl_warmup"):
        return max_kl
    return float(min(max_kl, min_kl + (max_kl - min_kl) * (epochs - 1) / warmup))


# -- the new model ---------------------------------------------------------------------------
def clone_model(model):
    """An independent :class:`scvi_unlearn.model.SCVI` copy sharing only the AnnData.

    The module, history, recipe and provenance are deep copies, so training the clone never
    changes ``model``.
    """
    from anndata import AnnData
    from scvi.data import AnnDataManager

    from scvi_unlearn.model import SCVI

    new = SCVI.__new__(SCVI)
    for key, value in model.__dict__.items():
        if key in ("module", "trainer"):
            continue
        shared = isinstance(value, AnnData | AnnDataManager)
        new.__dict__[key] = value if shared else copy.deepcopy(value)
    new.module = copy.deepcopy(model.module)
    new.id = str(uuid4())
    for manager in type(model)._per_instance_manager_store.get(model.id, {}).values():
        SCVI._setup_adata_manager_store.setdefault(manager.adata_uuid, manager)
        new._register_manager_for_instance(manager)
    return new


def _finish(target, run: UnlearningRun, original) -> None:
    """Training cells after forgetting; the original's validation / test sets stay."""
    target.train_indices = run.retain.copy()
    names = getattr(original, "train_obs_names_", None)
    if names is None:
        target.train_obs_names_ = target.adata.obs_names[run.retain].tolist()
    else:  # keep recorded training cells that this AnnData lacks
        forgotten = set(target.adata.obs_names[run.forget])
        target.train_obs_names_ = [n for n in names if n not in forgotten]
    target.validation_indices = _positions(original.validation_indices)
    target.test_indices = _positions(getattr(original, "test_indices", None))
    target.is_trained_ = True
    target.module.eval()


def _record(target, original, event: dict[str, Any]) -> None:
    previous = copy.deepcopy(getattr(original, "unlearning_provenance_", None) or {})
    events = list(previous.get("events", []))
    events.append(_clean(event))
    forgotten = list(previous.get("forgotten_obs_names", [])) + event["forgotten_obs_names"]
    target.unlearning_provenance_ = {
        "events": events,
        "forgotten_obs_names": forgotten,
        "n_forgotten": len(forgotten),
        "original_n_train": previous.get("original_n_train", event["n_train_before"]),
        "scvi_unlearn_version": event["scvi_unlearn_version"],
    }


def _clean(obj):
    """JSON-safe: numpy to Python, NaN / inf to None (JSON has no NaN that compares equal)."""
    obj = _jsonable(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scvi-unlearn")
    except PackageNotFoundError:
        return "0.0.0"


def _audit(
    target, original, forget, nonmembers, seed, accelerator, devices, progress_bar, audit_kwargs
) -> dict[str, Any]:
    """Membership-inference audit of the unlearned model: forget cells vs non-members."""
    from scvi_unlearn.audit import MembershipInference

    recipe = Recipe.from_model(original)
    split = dict(recipe.train_kwargs.get("datasplitter_kwargs") or {})
    split.pop("external_indexing", None)  # positions of the original data, not a recipe
    recipe.train_kwargs["datasplitter_kwargs"] = split
    if not split:
        recipe.train_kwargs.pop("datasplitter_kwargs")
    kwargs = {**_AUDIT_DEFAULTS, **audit_kwargs}
    call = {k: kwargs.pop(k) for k in _AUDIT_CALL_KEYS if k in kwargs}
    mi = MembershipInference(
        original.adata,
        recipe=recipe,
        seed=seed,
        accelerator=accelerator,
        devices=devices,
        **kwargs,
    )
    mi.fit(progress_bar=progress_bar)
    report = mi.audit(target, members=forget, nonmembers=nonmembers, **call)
    return report.summary()
