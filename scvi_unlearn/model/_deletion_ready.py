"""Deletion-ready training: every withdrawable donor removable exactly, at no training cost.

The design is scArches' query mapping used for isolation. Shared weights train on the
*permanent* donors only (a base the lab never withdraws: a public reference, consented
controls). Each *withdrawable* donor is then fitted on its own as a query of that base
(:meth:`scvi.model.SCVI.load_query_data`): only the donor's own covariate columns train, on its
own cells, with a seed of its own. The donors' columns are then put side by side in one scVI
model. A donor's cells therefore reach no parameter but its own columns, and removing the
donor is dropping those columns and its cells: the result is bit for bit the model the same
procedure trains without that donor (same seeds), at no training cost.

Isolation holds by construction of the assembled model (shared weights are the base's, each
column comes from its donor's fit alone) and is checked after every donor's fit: a fit that
moved any shared weight (weight decay, batch-norm statistics, a library encoder) raises.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scvi
import torch
from anndata import AnnData

from scvi_unlearn._compat import named_layers
from scvi_unlearn._recipe import Recipe, resolve_model_class
from scvi_unlearn._utils import to_jsonable
from scvi_unlearn._validation import check_count_data

if TYPE_CHECKING:
    from collections.abc import Sequence

    from scvi.model import SCVI  # the base class: this module sits below model._scvi

#: scArches' architecture for models that take queries (Lotfollahi et al. 2022): layer norm
#: instead of batch norm (no running statistics to share), covariates into the encoder too.
DELETION_READY_MODEL_KWARGS: dict[str, Any] = {
    "n_layers": 2,
    "encode_covariates": True,
    "use_layer_norm": "both",
    "use_batch_norm": "none",
    "dropout_rate": 0.2,
}
#: Model options that would give a donor's cells a path into shared weights, or columns the
#: query fit cannot train.
_REFUSED_MODEL_KWARGS = {
    "use_observed_lib_size": (
        False,
        "the library encoder is shared and trains on every donor's cells",
    ),
    "dispersion": (
        "gene-batch",
        "per-donor dispersions are not trained by a query fit; use 'gene'",
    ),
}
_ALLOWED_SETUP_KWARGS = ("layer", "continuous_covariate_keys")


def donor_seed(seed: int, donor: str) -> int:
    """The seed of one donor's fit: from the run's seed and the donor's name only.

    Another donor's presence or absence never changes it, so every donor's columns are the
    same whichever other donors the model holds.
    """
    digest = hashlib.sha256(f"{int(seed)}:{donor}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


def train_deletion_ready(
    adata: AnnData,
    donor_key: str,
    permanent: Sequence[str],
    *,
    model_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
    query_epochs: int | None = None,
    setup_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    enable_progress_bar: bool = True,
) -> SCVI:
    """Train an scVI model from which every non-permanent donor can be removed exactly, at once.

    The donors become the model's batch covariate. Shared weights train on the ``permanent``
    donors' cells; every other donor is fitted alone as a query of that base (only its own
    covariate columns train, no weight decay, its own seed), and the columns are assembled
    into one model. ``model.unlearn(cells of whole donors)`` then removes those donors by
    dropping their columns (method ``"drop_donors"``, exact, no training): the result is
    bit-identical to this function run without them.

    Parameters
    ----------
    adata
        Raw counts of every donor's cells. Not modified: the model holds a copy whose
        ``donor_key`` column is categorical (permanent donors first, then the others sorted).
    donor_key
        Obs column of donors (at least 2 donors).
    permanent
        Donors that are never withdrawn; their cells train the shared weights. At least one,
        and at least one donor must remain withdrawable.
    model_kwargs
        :class:`scvi.model.SCVI` options; default
        :data:`~scvi_unlearn.model.DELETION_READY_MODEL_KWARGS` (scArches' layer-norm
        architecture), updated with what is passed.
        ``use_observed_lib_size=False`` and ``dispersion="gene-batch"`` are refused.
    train_kwargs
        Arguments of the base's :meth:`~scvi_unlearn.model.SCVI.train` (``max_epochs``,
        ``train_size``, ``plan_kwargs``, ...); also the recipe a normal unlearning method of
        this model replays.
    query_epochs
        Epochs of each donor's fit (default: the base's ``max_epochs``).
    setup_kwargs
        ``layer`` and ``continuous_covariate_keys`` of ``setup_anndata`` (the donors are the
        batch; other categorical covariates are refused: their columns would be shared).
    seed
        Seed of the base; each donor's fit uses :func:`donor_seed` of it and its name.
    accelerator, devices, enable_progress_bar
        Lightning's options for every fit.

    Returns
    -------
    A trained :class:`~scvi_unlearn.model.SCVI` whose ``deletion_ready_`` records the design
    (donor key, permanent and withdrawable donors, seeds, the one-time cost of each fit).

    Raises
    ------
    KeyError
        If ``donor_key`` is not an obs column.
    ValueError
        Fewer than 2 donors, an unknown or empty ``permanent``, no withdrawable donor, non-count
        data, or a refused option (the message says why and what to use).
    RuntimeError
        If a donor's fit changed a shared weight (isolation broken; nothing is returned).
    """
    model_cls = resolve_model_class("SCVI")  # scvi_unlearn.model.SCVI, registered by name
    donors, permanent, withdrawable = _check_design(adata, donor_key, permanent)
    model_kwargs = _check_model_kwargs(model_kwargs)
    setup_kwargs = _check_setup_kwargs(setup_kwargs)
    check_count_data(adata, setup_kwargs.get("layer"))
    train_kwargs = dict(train_kwargs or {})
    work = _donor_ordered(adata, donor_key, permanent + withdrawable)
    recipe = Recipe(
        setup_kwargs={"batch_key": donor_key, **setup_kwargs},
        model_kwargs=model_kwargs,
        train_kwargs=train_kwargs,
        model_class="SCVI",
    )
    fit = {"accelerator": accelerator, "devices": devices}
    start = time.perf_counter()
    base_cells = _in_name_order(work, work.obs[donor_key].isin(permanent).to_numpy())
    base = recipe.fit(
        _donor_ordered(work[base_cells], donor_key, permanent),
        seed=seed,
        model_cls=model_cls,
        enable_progress_bar=enable_progress_bar,
        **fit,
    )
    base_seconds = time.perf_counter() - start
    base_state = _state(base.module)
    epochs = int(query_epochs or base.train_kwargs_["max_epochs"])
    donor_fits = _fit_donors(base, base_state, work, donor_key, withdrawable, seed, epochs,
                             train_kwargs, fit, enable_progress_bar)  # fmt: skip
    model = _assemble(
        model_cls, work, recipe, base_state, donor_fits.columns, permanent, withdrawable,
        donor_key,
    )  # fmt: skip
    _set_cells(
        model,
        base.train_obs_names_ + donor_fits.trained,
        base.validation_obs_names_ + donor_fits.validation,
    )
    model.train_kwargs_ = dict(base.train_kwargs_)
    model.final_kl_weight_ = base.final_kl_weight_
    model.history_ = base.history_
    model.deletion_ready_ = {
        "donor_key": donor_key,
        "permanent": permanent,
        "withdrawable": withdrawable,
        "n_donors": len(donors),
        "seed": int(seed),
        "query_epochs": epochs,
        "model_kwargs": to_jsonable(model_kwargs),
        "setup_kwargs": to_jsonable(setup_kwargs),
        "train_kwargs": to_jsonable(train_kwargs),
        "extended": _extended_shapes(base_state, model.module, len(withdrawable)),
        "base": {"n_cells": int(base_cells.size), "seconds": base_seconds},
        "donor_fits": donor_fits.fits,
        "preparation_seconds": time.perf_counter() - start,
    }
    return model


def is_deletion_ready(model) -> bool:
    """Whether ``model`` was trained by :func:`train_deletion_ready` (and still is so)."""
    return bool(getattr(model, "deletion_ready_", None))


def whole_donors(model, forget: np.ndarray, train: np.ndarray) -> list[str] | None:
    """The donors whose training cells ``forget`` is, if it is exactly whole donors; else None.

    ``None`` also when any of them is permanent (its cells trained the shared weights).
    """
    record = model.deletion_ready_
    values = model.adata.obs[record["donor_key"]].astype(str).to_numpy()
    donors = sorted(set(values[forget]))
    if not set(donors) <= set(record["withdrawable"]):
        return None
    wanted = np.intersect1d(train, np.flatnonzero(np.isin(values, donors)))
    return donors if np.array_equal(np.sort(forget), wanted) else None


def check_donor_request(model, forget: np.ndarray, train: np.ndarray) -> list[str]:
    """The donors of a ``method="drop_donors"`` request, or an error saying what to do instead."""
    if not is_deletion_ready(model):
        raise ValueError(_NOT_READY.format(method="drop_donors"))
    record = model.deletion_ready_
    values = model.adata.obs[record["donor_key"]].astype(str).to_numpy()
    named = sorted(set(values[forget]))
    permanent = [d for d in named if d in record["permanent"]]
    if permanent:
        raise ValueError(_PERMANENT.format(donors=permanent))
    donors = whole_donors(model, forget, train)
    if donors is None:
        partial = [
            f"{d} ({int(np.isin(forget, np.flatnonzero(values == d)).sum())} of "
            f"{int(np.intersect1d(train, np.flatnonzero(values == d)).size)} training cells)"
            for d in named
        ]
        raise ValueError(
            "method='drop_donors' removes whole donors, but the request holds part of "
            f"{', '.join(partial)}. Pass every training cell of those donors (`--forget "
            "donor:ID`), or use method='refit_donors' (exact: the donor fitted again without "
            "them) or leave `method` unset."
        )
    return donors


_NOT_READY = (
    "method='{method}' needs a deletion-ready model: train it with "
    "`scvi_unlearn.model.train_deletion_ready(adata, donor_key, permanent=[...])` "
    "(or `scvi-unlearn train-deletion-ready`), or use method='retrain_fast'."
)
_PERMANENT = (
    "Donor(s) {donors} are permanent in this deletion-ready model: their cells trained the "
    "shared weights, so no donor's columns can remove them. Use method='retrain_fast' (exact, "
    "retrains everything)."
)


def drop_donors(model, donors: Sequence[str]):
    """A new model without ``donors``: their columns and all their cells are gone.

    Every other weight, and so every remaining cell's output, is the model's own. The cells of
    the dropped donors, validation cells included, leave the AnnData.
    """
    values = model.adata.obs[model.deletion_ready_["donor_key"]].astype(str)
    keep = np.flatnonzero(~values.isin(list(donors)).to_numpy())
    return _without(model, keep, dropped=list(donors), refit=[])


def check_refit_request(model, forget: np.ndarray) -> list[str]:
    """The donors of a ``method="refit_donors"`` request, or an error saying what to do."""
    if not is_deletion_ready(model):
        raise ValueError(_NOT_READY.format(method="refit_donors"))
    donors = partial_donors(model, forget)
    if donors is None:
        record = model.deletion_ready_
        values = model.adata.obs[record["donor_key"]].astype(str).to_numpy()
        permanent = sorted(set(values[forget]) & set(record["permanent"]))
        raise ValueError(_PERMANENT.format(donors=permanent))
    return donors


def partial_donors(model, forget: np.ndarray) -> list[str] | None:
    """The withdrawable donors ``forget`` touches, if it holds cells of no permanent donor."""
    record = model.deletion_ready_
    values = model.adata.obs[record["donor_key"]].astype(str).to_numpy()
    donors = sorted(set(values[forget]))
    return donors if set(donors) <= set(record["withdrawable"]) else None


def refit_donors(model, forget: np.ndarray, accelerator: str = "cpu", devices="auto",
                 enable_progress_bar: bool = False):  # fmt: skip
    """A new model without the cells ``forget``: their donors re-fitted on their other cells.

    Each withdrawable donor ``forget`` touches is fitted again, alone, from the base, on its
    remaining cells with its own seed (what :func:`train_deletion_ready` does on data without
    those cells); a donor left with no training cell is dropped. The base and every other
    donor's columns are the model's own, so the result is bit-identical to the design trained
    from the start without those cells. It costs one donor's fit per donor touched.
    """
    record = model.deletion_ready_
    source = model.adata
    values = source.obs[record["donor_key"]].astype(str).to_numpy()
    touched = sorted(set(values[forget]))
    keep = np.setdiff1d(np.arange(source.n_obs), forget)
    # A donor whose every training cell goes is dropped whole (with its other cells).
    trained = np.asarray(model.train_indices)
    emptied = [d for d in touched if np.setdiff1d(trained[values[trained] == d], forget).size == 0]
    keep = keep[~np.isin(values[keep], emptied)]
    refit = [d for d in touched if d not in emptied]
    new = _without(model, keep, emptied, refit, accelerator, devices, enable_progress_bar)
    return new, refit, emptied


def _without(model, keep, dropped, refit, accelerator="cpu", devices="auto", progress=False):
    """The deletion-ready model on cells ``keep``: ``dropped`` donors gone, ``refit`` re-fitted.

    The base and every other donor's columns are the model's own; each donor in ``refit`` is
    fitted again, alone, on its kept cells, as :func:`train_deletion_ready` fits it.
    """
    record = model.deletion_ready_
    key = record["donor_key"]
    source = model.adata
    withdrawable = [d for d in record["withdrawable"] if d not in set(dropped)]
    work = _donor_ordered(_copy_rows(source, keep), key, record["permanent"] + withdrawable)
    base_state, columns = _split_state(_state(model.module), record)
    recipe = Recipe.from_model(model)
    removed = set(source.obs_names) - set(work.obs_names)
    # Recorded cells of the re-fitted donors are replaced by those of their new fits.
    stale = set(source.obs_names[source.obs[key].astype(str).isin(refit).to_numpy()]) | removed
    trained = [n for n in model.train_obs_names_ if n not in stale]
    validation = [n for n in model.validation_obs_names_ if n not in stale]
    fits = {d: v for d, v in record["donor_fits"].items() if d in withdrawable}
    if refit:
        base = _base_model(type(model), work, recipe, base_state, record)
        new_fits = _fit_donors(
            base, base_state, work, key, refit, record["seed"], record["query_epochs"],
            record["train_kwargs"], {"accelerator": accelerator, "devices": devices}, progress,
        )  # fmt: skip
        columns.update(new_fits.columns)
        trained += new_fits.trained
        validation += new_fits.validation
        fits.update(new_fits.fits)
    new = _assemble(
        type(model), work, recipe, base_state, {d: columns[d] for d in withdrawable},
        record["permanent"], withdrawable, key,
    )  # fmt: skip
    _set_cells(new, trained, validation)
    for attr in ("train_kwargs_", "final_kl_weight_", "history_", "unlearning_provenance_"):
        setattr(new, attr, getattr(model, attr, None))
    new.deletion_ready_ = {
        **record,
        "withdrawable": withdrawable,
        "n_donors": len(record["permanent"]) + len(withdrawable),
        "donor_fits": fits,
    }
    return new


@dataclass
class _DonorFits:
    columns: dict[str, dict[str, torch.Tensor]]
    trained: list[str]
    validation: list[str]
    fits: dict[str, dict[str, Any]]


def _fit_donors(base, base_state, work, key, donors, seed, epochs, train_kwargs, fit,
                progress) -> _DonorFits:  # fmt: skip
    """Each donor fitted alone from ``base``: its columns, its cells, what the fit cost."""
    out = _DonorFits({}, [], [], {})
    for donor in donors:
        t0 = time.perf_counter()
        query = _fit_donor(base, work, key, donor, seed, epochs, train_kwargs, fit, progress)
        out.columns[donor] = _donor_columns(base_state, query.module, donor)
        out.trained += query.train_obs_names_
        out.validation += query.validation_obs_names_
        out.fits[donor] = {
            "seed": donor_seed(seed, donor),
            "n_cells": int((work.obs[key] == donor).sum()),
            "seconds": time.perf_counter() - t0,
        }
    return out


def _base_model(cls, work, recipe, base_state, record):
    """The base (permanent donors only) rebuilt from an assembled model's weights."""
    key = record["donor_key"]
    cells = _in_name_order(work, work.obs[key].isin(record["permanent"]).to_numpy())
    data = _donor_ordered(work[cells], key, record["permanent"])
    cls.setup_anndata(data, **recipe.setup_kwargs)
    base = cls(data, **recipe.model_kwargs)
    base.module.load_state_dict(base_state)
    base.module.eval()
    base.is_trained_ = True
    return base


def cells_of_held_donors(adata: AnnData, attributes: dict[str, Any]) -> AnnData:
    """``adata`` without the cells of donors a saved deletion-ready model does not hold.

    The lab's data still holds a removed donor's cells; they are not in the model (it has no
    column for them), so loading leaves them out instead of failing on an unknown batch.
    ``adata`` itself is returned when nothing is left out; never modified.
    """
    record = attributes.get("deletion_ready_")
    if not record or record["donor_key"] not in adata.obs:
        return adata
    held = record["permanent"] + record["withdrawable"]
    keep = adata.obs[record["donor_key"]].astype(str).isin(held).to_numpy()
    return adata if keep.all() else adata[keep].copy()


def rebuild_without(model, accelerator: str = "cpu"):
    """:func:`train_deletion_ready` re-run from ``model``'s record on its own cells.

    What :func:`~scvi_unlearn.model.verify_unlearning` compares a donor removal with: the
    design trained from the start on the remaining donors' training and validation cells.
    """
    record = model.deletion_ready_
    cells = np.union1d(model.train_indices, model.validation_indices)
    return train_deletion_ready(
        model.adata[cells].copy(),
        record["donor_key"],
        record["permanent"],
        model_kwargs=record["model_kwargs"],
        train_kwargs=record["train_kwargs"],
        setup_kwargs=record["setup_kwargs"],
        query_epochs=record["query_epochs"],
        seed=record["seed"],
        accelerator=accelerator,
        enable_progress_bar=False,
    )


# -- checks ------------------------------------------------------------------------------------
def _check_design(adata, donor_key, permanent) -> tuple[list[str], list[str], list[str]]:
    if not isinstance(donor_key, str) or donor_key not in adata.obs:
        raise KeyError(
            f"`donor_key` {donor_key!r} is not an obs column; name the column of donors "
            "(e.g. 'sample_id')."
        )
    donors = sorted(set(adata.obs[donor_key].astype(str)))
    if len(donors) < 2:
        raise ValueError(
            f"obs[{donor_key!r}] holds {len(donors)} donor(s); deletion-ready training needs at "
            "least 2 (permanent ones for the shared weights, withdrawable ones)."
        )
    if isinstance(permanent, str):
        permanent = [permanent]
    permanent = sorted({str(d) for d in (permanent or [])})
    unknown = [d for d in permanent if d not in donors]
    if unknown:
        raise ValueError(f"Permanent donor(s) {unknown} are not in obs[{donor_key!r}]: {donors}.")
    if not permanent:
        raise ValueError(
            "`permanent` is empty: name the donors whose cells train the shared weights "
            "(never withdrawn, e.g. a public reference or consented controls)."
        )
    withdrawable = [d for d in donors if d not in permanent]
    if not withdrawable:
        raise ValueError(
            "Every donor is permanent, so none could be withdrawn; train a normal model "
            "(`scvi_unlearn.model.SCVI`) instead."
        )
    return donors, permanent, withdrawable


def _check_model_kwargs(model_kwargs) -> dict[str, Any]:
    kwargs = {**DELETION_READY_MODEL_KWARGS, **(model_kwargs or {})}
    for name, (refused, why) in _REFUSED_MODEL_KWARGS.items():
        if name in kwargs and kwargs[name] == refused:
            raise ValueError(
                f"`{name}={refused!r}` is refused for deletion-ready training: {why}."
            )
    if kwargs.get("dispersion") == "gene-label":
        raise ValueError(
            "`dispersion='gene-label'` is refused for deletion-ready training: per-label "
            "dispersions are shared by every donor; use 'gene'."
        )
    return kwargs


def _check_setup_kwargs(setup_kwargs) -> dict[str, Any]:
    setup_kwargs = dict(setup_kwargs or {})
    other = sorted(set(setup_kwargs) - set(_ALLOWED_SETUP_KWARGS))
    if other:
        raise ValueError(
            f"setup option(s) {other} are not supported by deletion-ready training: the donors "
            "are the batch, and other categorical covariates would have columns every donor "
            f"shares. Supported: {list(_ALLOWED_SETUP_KWARGS)}."
        )
    return setup_kwargs


# -- pieces ------------------------------------------------------------------------------------
def _donor_ordered(adata: AnnData, key: str, order: list[str]) -> AnnData:
    """A copy whose ``key`` column is categorical in ``order`` (scvi-tools' batch codes)."""
    out = adata.copy()
    out.obs[key] = pd.Categorical(out.obs[key].astype(str), categories=order)
    return out


def _copy_rows(adata: AnnData, rows: np.ndarray) -> AnnData:
    """New AnnData of ``rows``: counts, layers, obs, var, obsm (no obsp / uns: other cells')."""
    view = adata[rows]
    return AnnData(
        X=view.X.copy(),
        obs=view.obs.copy(),
        var=view.var.copy(),
        layers={k: v.copy() for k, v in named_layers(view).items()},
        obsm={k: v.copy() for k, v in view.obsm.items()},
    )


def _fit_donor(base, work, key, donor, seed, epochs, train_kwargs, fit, progress):
    """One donor's query fit on its own cells, from the base, with its own seed."""
    cells = _in_name_order(work, (work.obs[key] == donor).to_numpy())
    query_adata = work[cells].copy()
    query_adata.obs[key] = pd.Categorical([donor] * cells.size)
    scvi.settings.seed = donor_seed(seed, donor)
    query = type(base).load_query_data(query_adata, base, freeze_batchnorm_decoder=True, **{
        "accelerator": fit["accelerator"], "device": fit["devices"]
    })  # fmt: skip
    plan = dict(train_kwargs.get("plan_kwargs") or {})
    plan["weight_decay"] = 0.0  # decay would move the shared (frozen) weights
    kwargs = {k: v for k, v in train_kwargs.items() if k not in ("max_epochs", "plan_kwargs")}
    query.train(max_epochs=epochs, plan_kwargs=plan, enable_progress_bar=progress,
                **fit, **kwargs)  # fmt: skip
    return query


def _in_name_order(adata: AnnData, mask: np.ndarray) -> np.ndarray:
    """Positions of ``mask``'s cells sorted by obs name: the fits never depend on row order."""
    cells = np.flatnonzero(mask)
    return cells[np.argsort(adata.obs_names[cells].to_numpy().astype(str), kind="stable")]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _donor_columns(base_state, query_module, donor: str) -> dict[str, torch.Tensor]:
    """The donor's own columns of its query fit; raise if any shared weight moved.

    With a single permanent donor the base has no batch columns (scvi-tools injects a
    covariate only when it has 2 or more categories): the query then adds the permanent
    donor's column too, untrained and left out here (the assembled model gives it zeros).
    """
    columns = {}
    for name, value in _state(query_module).items():
        old = base_state[name]
        if name.endswith("num_batches_tracked"):
            continue  # a counter, not a weight
        if value.shape == old.shape:
            if not torch.equal(value, old):
                raise RuntimeError(_MOVED.format(donor=donor, name=name))
            continue
        dim = _extended_dim(old.shape, value.shape)
        if not torch.equal(value.narrow(dim, 0, old.shape[dim]), old):
            raise RuntimeError(_MOVED.format(donor=donor, name=name))
        columns[name] = value.narrow(dim, value.shape[dim] - 1, 1).clone()
    return columns


_MOVED = (
    "Donor {donor!r}'s fit changed the shared weight {name!r}: its cells would not be "
    "isolated, so no deletion-ready model is returned. Use layer norm (no batch norm), no "
    "weight decay and the observed library size (the defaults of train_deletion_ready)."
)


def _extended_dim(old: torch.Size, new: torch.Size) -> int:
    """The one dimension a query fit grew (by 1, or 2 with a single permanent donor)."""
    dim = _changed_dim(old, new)
    changed = sum(a != b for a, b in zip(old, new, strict=True))
    if changed != 1 or new[dim] - old[dim] not in (1, 2):
        raise RuntimeError(f"Unexpected shape change {tuple(old)} -> {tuple(new)} in a query fit.")
    return dim


def _extended_shapes(base_state, module, n_withdrawable: int) -> dict[str, list[int]]:
    """``{tensor: [dim, size in the base, permanent columns to add]}`` of donor-column tensors.

    The permanent columns to add are 1 when the base has a single permanent donor (and so no
    batch columns of its own: the assembled model gives that donor a zero column, which
    leaves its cells' outputs as the base computes them), else 0.
    """
    out = {}
    for name, value in module.state_dict().items():
        old = base_state[name]
        if value.shape != old.shape:
            dim = _changed_dim(old.shape, value.shape)
            pad = int(value.shape[dim] - old.shape[dim] - n_withdrawable)
            out[name] = [dim, int(old.shape[dim]), pad]
    return out


def _changed_dim(old: torch.Size, new: torch.Size) -> int:
    return next(i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b)


def _split_state(state, record) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(base weights, each withdrawable donor's columns) of an assembled model's state."""
    base = dict(state)
    columns: dict[str, dict[str, torch.Tensor]] = {d: {} for d in record["withdrawable"]}
    for name, (dim, size, pad) in record["extended"].items():
        base[name] = state[name].narrow(dim, 0, size).clone()
        for j, donor in enumerate(record["withdrawable"]):
            columns[donor][name] = state[name].narrow(dim, size + pad + j, 1).clone()
    return base, columns


def _assemble(cls, work, recipe, base_state, columns, permanent, withdrawable, key):
    """One model on ``work``: the base's weights, then each donor's columns in order."""
    cls.setup_anndata(work, **recipe.setup_kwargs)
    mapping = list(work.obs[key].cat.categories)
    if mapping != permanent + withdrawable:
        raise RuntimeError(f"Donor order {mapping} is not {permanent + withdrawable}.")
    model = cls(work, **recipe.model_kwargs)
    state = {}
    for name, value in model.module.state_dict().items():
        old = base_state[name]
        if value.shape == old.shape:
            state[name] = old.clone()
            continue
        dim = _changed_dim(old.shape, value.shape)
        # A single permanent donor has no column in the base: zeros keep its outputs.
        pad_size = value.shape[dim] - old.shape[dim] - len(withdrawable)
        pad_shape = list(old.shape)
        pad_shape[dim] = pad_size
        pad = torch.zeros(pad_shape, dtype=old.dtype)
        state[name] = torch.cat([old, pad, *(columns[d][name] for d in withdrawable)], dim=dim)
    model.module.load_state_dict(state)
    model.module.eval()
    model.is_trained_ = True
    return model


def _set_cells(model, trained: list[str], validation: list[str]) -> None:
    names = model.adata.obs_names
    model.train_obs_names_ = list(trained)
    model.validation_obs_names_ = list(validation)
    train = names.get_indexer(pd.Index(trained))
    val = names.get_indexer(pd.Index(validation))
    model.train_indices = np.sort(train[train >= 0]).astype(np.int64)
    model.validation_indices = np.sort(val[val >= 0]).astype(np.int64)
    rest = np.setdiff1d(np.arange(model.adata.n_obs), np.union1d(train, val))
    model.test_indices = rest.astype(np.int64)
