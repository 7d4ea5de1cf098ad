"""``UnlearningMixin``: ``model.unlearn(forget_idx)`` for scvi-tools models."""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from scvi_unlearn._recipe import Recipe
from scvi_unlearn._validation import IndexLike, as_cell_indices, check_trained
from scvi_unlearn.model._clone import clone_model
from scvi_unlearn.model._deletion_ready import is_deletion_ready
from scvi_unlearn.model._donor_methods import DonorRemoval, default_donor_removal
from scvi_unlearn.model._unlearn import (
    DAMAGE_LIMIT,
    UnlearningEvent,
    audit_result,
    cells_fingerprint,
    check_damage,
    check_damage_limit,
    check_forget,
    check_int,
    check_unlearnable_data,
    drop_forgotten_cells,
    final_kl_weight,
    finish,
    positions,
    record,
    reporting_cells,
    resolve_nonmembers,
    run_event,
    training_cells,
    utility_record,
    without_cell_names,
)
from scvi_unlearn.model._verify import exact_record_inputs, reproduce_record
from scvi_unlearn.train import (
    HeldOutUtility,
    UnlearningMethod,
    UnlearningRun,
    get_method,
    method_table,
    state_copy,
)


class UnlearningMixin:
    """Adds ``unlearn()`` to an scvi-tools model class (see :class:`scvi_unlearn.model.SCVI`)."""

    def unlearn(
        self,
        forget_idx: IndexLike,
        method: str | UnlearningMethod | None = None,
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
        damage_limit: float | None = DAMAGE_LIMIT,
        record_names: bool = False,
        **method_kwargs: Any,
    ):
        """Forget cells the model was trained on; return the model that forgot them.

        Parameters
        ----------
        forget_idx
            Cells to forget: integer positions, a boolean mask or obs names of ``self.adata``;
            all must be training cells of the model.
        method
            ``None`` (default): on a deletion-ready model (see
            :func:`~scvi_unlearn.model.train_deletion_ready`) whose request holds cells of
            withdrawable donors only, ``"drop_donors"`` for whole donors and
            ``"refit_donors"`` otherwise; in every other case ``"retrain_fast"``: exact, a fresh
            model trained on the retained cells only, in rounds of ``budget`` (0.1) of the
            recipe's epochs until its held-out neg. ELBO is within ``utility_tolerance`` (2%)
            of the trained model's or the rounds reach ``max_budget`` (0.5); its record lets
            :func:`~scvi_unlearn.model.verify_unlearning` re-run it bit for bit. Or any
            registered method by name (:data:`scvi_unlearn.train.METHODS`; their
            hyper-parameters are on :ref:`the API page <api-methods>`):

            {method_table}

            An :class:`~scvi_unlearn.train.UnlearningMethod` instance runs as given (e.g.
            ``su.model.Auto(search=su.model.GatedSearch(gate=my_gate))``).
        nonmembers
            Cells of the same population the model never trained on (positions, mask or obs
            names of ``self.adata``), for the adversarial methods and ``audit=True``. If
            ``None``, the untrained cells of ``self.adata`` whose ``population_key`` value is
            the forget cells' majority value are used.
        inplace
            Modify this model instead of returning a new one.
        seed
            Seed of everything random in the run; the same seed gives the same weights.
        audit
            Run a :class:`~scvi_unlearn.MembershipInference` audit of the result (forget cells
            vs non-members) and store its summary in the provenance.
        accelerator, devices
            Lightning's accelerator and devices.
        max_epochs
            Training epochs (method default if ``None``; for ``"fisher"`` / ``"ssd"`` the
            fine-tune epochs, for ``"retrain"`` the recipe's epochs).
        population_key
            Obs column defining the forget cells' population for automatic non-members
            (default: ``"cell_type"`` if present).
        enable_progress_bar
            Show Lightning's progress bar.
        audit_kwargs
            Arguments of :class:`~scvi_unlearn.MembershipInference` (its defaults otherwise,
            including its shadow cache) and of its ``audit`` (``reference_models``,
            ``n_bootstrap``), plus ``nonmembers``: the audit's own non-members. Pass cells the
            method did not see: by default the audit reuses the method's non-members, on which
            an adversarial method selected its state, so its verdict would be optimistic.
        damage_limit
            The most the held-out neg. ELBO may rise, as a share of the trained model's
            (``1.0``: it may double), before an approximate method's result is refused with an
            error instead of returned; a non-finite ELBO is always over the limit. ``None``
            returns any model (with a warning when utility was lost). Exact results (a
            retrain) are never refused: they are what the data without those cells gives.
        record_names
            Keep the forgotten cells' names in the provenance (the lab's own withdrawal
            record). By default the provenance holds their count and a SHA-256 fingerprint of
            the sorted names only, so the model can be shared without naming them.
        **method_kwargs
            Hyper-parameters of the method (see ``METHODS[method].params``), e.g. ``lambda_``,
            ``n_critics``, ``critic_lr`` for extragradient, ``alpha`` for Fisher.

        Returns
        -------
        A model of this class whose ``train_indices`` exclude the forgotten cells and whose
        ``unlearning_provenance_`` records the run (events of chained runs accumulate);
        ``self`` is unchanged unless ``inplace=True``. Nothing of a forgotten cell stays in it:
        its AnnData is a new one without them (``X``, layers, ``obs``, ``var`` and ``obsm`` of
        the other cells; ``obsp`` and ``uns`` are not carried over), so ``save`` and every
        per-cell output leave them out; the user's AnnData is not modified. The record's
        ``utility`` holds the held-out neg. ELBO before and after, on up to 2,000 cells the
        model never trained on.

        Warns
        -----
        UserWarning
            If that held-out neg. ELBO got more than 5% worse: the method damaged the model.

        Raises
        ------
        RuntimeError
            If the model is untrained, or the method destroyed it (see ``damage_limit``). With
            ``inplace=True`` any error, an interruption included, restores the model's
            weights and records: it is left as it was, never half-changed.
        ValueError, TypeError, IndexError, KeyError
            For invalid cells, methods or hyper-parameters, with a message naming the problem.

        Examples
        --------
        >>> import scvi_unlearn as su
        >>> adata = su.data.synthetic_pbmc(n_cells=120, n_genes=50, seed=0)
        >>> recipe = su.Recipe(model_kwargs={"n_latent": 4}, train_kwargs={"max_epochs": 3})
        >>> model = recipe.fit_cells(adata, list(range(100)), accelerator="cpu",
        ...                          enable_progress_bar=False)
        >>> forgotten = model.unlearn([0, 1, 2], accelerator="cpu", enable_progress_bar=False)
        >>> forgotten.provenance["events"][-1]["method"], len(forgotten.train_indices)
        ('retrain_fast', 97)
        >>> len(model.train_indices)  # the original is untouched
        100
        """
        # validate
        check_trained(self)
        if self.adata is None:
            raise ValueError(
                "The model has no AnnData; load it with `SCVI.load(dir_path, adata)` so the "
                "cells to forget can be found."
            )
        check_unlearnable_data(self)
        damage_limit = check_damage_limit(damage_limit)
        seed = check_int("seed", seed, low=0)
        max_epochs = None if max_epochs is None else check_int("max_epochs", max_epochs, low=0)
        for name, flag in (("inplace", inplace), ("audit", audit), ("record_names", record_names)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True or False, got {flag!r}.")
        train = training_cells(self)
        forget = check_forget(self, forget_idx, train)
        settings_given = bool(method_kwargs) or max_epochs is not None
        if method is None and not settings_given:
            method = default_donor_removal(self, forget, train)
        spec = get_method(method or "retrain_fast")
        if isinstance(spec, DonorRemoval):
            if settings_given:
                raise ValueError(
                    f"method={spec.name!r} follows the deletion-ready design's own settings, so "
                    "it takes no hyper-parameters or `max_epochs` (got "
                    f"{sorted(method_kwargs) or ['max_epochs']})."
                )
            donors = spec.donors(self, forget, train)
            if audit:
                raise ValueError(_NO_DONOR_AUDIT)
            return self._remove_from_donors(
                spec, forget, train, donors, inplace, record_names, accelerator, devices,
                enable_progress_bar,
            )  # fmt: skip
        hyperparameters = spec.configure(method_kwargs)
        if spec.name == "auto" and max_epochs is not None:
            raise ValueError(
                "`max_epochs` does not apply to method='auto': each attempt runs its method's "
                "own budget and the exact fallback `budget` (a share of the recipe's epochs)."
            )
        nonmember_idx, nonmember_info = self._nonmembers(
            spec, nonmembers, forget, train, population_key, audit
        )

        source, recipe = self.adata, Recipe.from_model(self)  # the audit needs both later
        forgotten_names = source.obs_names[forget].tolist()
        started_at = datetime.now(UTC).isoformat()
        start = time.perf_counter()
        target = self if inplace else clone_model(self)
        saved = _Snapshot(target) if inplace else None
        try:
            # build the run
            run = UnlearningRun(
                model=target,
                forget=forget,
                retain=np.setdiff1d(train, forget).astype(np.int64),
                nonmembers=nonmember_idx,
                validation=positions(self.validation_indices),
                hyperparameters=hyperparameters,
                seed=seed,
                max_epochs=spec.resolve_epochs(self, max_epochs, hyperparameters),
                accelerator=accelerator,
                devices=devices,
                enable_progress_bar=enable_progress_bar,
                kl_weight=final_kl_weight(self),
                method=spec.name,
            )
            check_start = time.perf_counter()
            # Measured on the trained weights, before the method.
            run.held_out = HeldOutUtility(run)
            check_seconds = time.perf_counter() - check_start  # a check, not the method's time
            # run the method
            result = spec(run)
            wall_time = time.perf_counter() - start - check_seconds
            # record
            finish(target, run, self)
            event = run_event(run, train, nonmember_info, started_at, wall_time, result.metrics)
            # An exact result is the model without those cells, whatever its utility; only
            # an approximate method can have destroyed what it was given.
            event.utility = utility_record(spec.name, run.held_out, target.module, result.exact)
            if not result.exact:
                check_damage(spec.name, event.utility, damage_limit)
            drop_forgotten_cells(target, source, forget)
            if is_deletion_ready(target):
                # The method retrained or changed shared weights: no donor is isolated now.
                target.deletion_ready_ = None
                event.deletion_ready = "lost: this method changed the shared weights"
            if result.exact:
                name, hp, epochs, rounds = exact_record_inputs(
                    self, result.metrics, spec.name, run.hyperparameters, run.max_epochs
                )
                event.reproduce = reproduce_record(
                    target, name, hp, epochs, seed=seed, rounds=rounds, accelerator=accelerator
                )
            names = forgotten_names if record_names else None
            forgotten_set = set(forgotten_names)
            if not record_names:
                event.metrics = without_cell_names(event.metrics, forgotten_set)
            record(target, self, event, names)
            # optional audit: after the record, so the audit knows which members were
            # forgotten on purpose; the record is then written again with it.
            if audit:
                summary = self._audit_unlearned(
                    target, recipe, source, forget, nonmember_idx, result, seed, accelerator,
                    devices, enable_progress_bar, audit_kwargs,
                )  # fmt: skip
                event.audit = (
                    summary if record_names else without_cell_names(summary, forgotten_set)
                )
                record(target, self, event, names)
        except BaseException:
            if saved is not None:  # an error or an interruption: the model as it was
                saved.restore()
            raise
        return target

    def _nonmembers(self, spec, nonmembers, forget, train, population_key, audit):
        """The run's non-members and where they came from (``None`` if it needs none)."""
        if not (spec.needs_nonmembers or audit or nonmembers is not None):
            return None, {"source": None}
        try:
            return resolve_nonmembers(self, nonmembers, forget, train, population_key, spec.name)
        except ValueError as err:
            if spec.name != "auto" or nonmembers is not None or audit:
                raise
            # auto without non-members cannot audit an approximate method: it says so
            # (a warning from the run) and retrains exactly.
            return np.zeros(0, np.int64), {"source": None, "missing": str(err)}

    def _remove_from_donors(self, spec, forget, train, donors, inplace: bool, record_names: bool,
                            accelerator, devices, progress_bar):  # fmt: skip
        """``drop_donors`` / ``refit_donors``: a deletion-ready model without those cells."""
        started_at = datetime.now(UTC).isoformat()
        start = time.perf_counter()
        target, refit, dropped = spec.remove(
            self, forget, donors, accelerator, devices, progress_bar
        )
        wall_time = time.perf_counter() - start
        forgotten_names = self.adata.obs_names[forget].tolist()
        design = target.deletion_ready_
        hyperparameters = {"donors": cells_fingerprint(donors)}
        if record_names:
            hyperparameters["donor_names"] = list(donors)
        event = UnlearningEvent(
            method=spec.name,
            hyperparameters=hyperparameters,
            seed=design["seed"],
            max_epochs=design["query_epochs"] if refit else 0,
            forgotten=cells_fingerprint(forgotten_names),
            n_forgotten=int(forget.size),
            donors={
                "n_donors_removed": len(dropped),
                "n_donors_refitted": len(refit),
                "n_cells_dropped": int(self.adata.n_obs - target.adata.n_obs),
            },
            n_train_before=int(train.size),
            n_train_after=len(target.train_indices),
            nonmembers={"source": None, "n": 0},
            started_at=started_at,
            wall_time_s=wall_time,
            metrics={
                "exact": "by construction: the donors' cells reached only their own columns"
                + ("; the touched donors were fitted again without the cells" if refit else ""),
                "remaining_withdrawable": len(design["withdrawable"]),
                "preparation_seconds": design["preparation_seconds"],
            },
            utility={"note": "every other donor's cells keep the model's own outputs (unchanged)"},
        )
        event.reproduce = reproduce_record(
            target, spec.name, _design_inputs(design), design["query_epochs"],
            seed=design["seed"], rounds=None, accelerator="cpu",
        )  # fmt: skip
        record(target, self, event, forgotten_names if record_names else None)
        if inplace:
            self.__dict__.clear()
            self.__dict__.update(target.__dict__)
            return self
        return target

    @staticmethod
    def _audit_unlearned(
        target, recipe, source, forget, nonmember_idx, result, seed, accelerator, devices,
        progress_bar, audit_kwargs,
    ) -> dict[str, Any]:  # fmt: skip
        """``unlearn(audit=True)``'s audit, on the cells the method did not select on."""
        audit_kwargs = dict(audit_kwargs or {})
        # Reporting non-members kept apart from those the method selected on
        # (see :ref:`methods-protocol`).
        audit_nonmembers = audit_kwargs.pop("nonmembers", None)
        if audit_nonmembers is not None:
            audit_nonmembers = as_cell_indices(source, audit_nonmembers, "audit nonmembers")
        audit_forget, default_nonmembers = reporting_cells(forget, nonmember_idx, result)
        return audit_result(
            target, recipe, source, audit_forget,
            default_nonmembers if audit_nonmembers is None else audit_nonmembers,
            seed, accelerator, devices, progress_bar, audit_kwargs,
        )  # fmt: skip


_NO_DONOR_AUDIT = (
    "audit=True does not apply to a removal by 'drop_donors' / 'refit_donors': a removed donor "
    "has no covariate column left to score its cells with, and the removal is exact by "
    "construction (`verify_unlearning` re-runs it). Pass method='retrain_fast' to audit a "
    "retrain instead."
)


def _design_inputs(design: dict[str, Any]) -> dict[str, Any]:
    """The deletion-ready design's inputs a re-run needs (no timings, no weights layout)."""
    keep = ("donor_key", "permanent", "seed", "query_epochs", "model_kwargs", "setup_kwargs",
            "train_kwargs")  # fmt: skip
    return {k: design[k] for k in keep}


class _Snapshot:
    """A model's attributes and weights, to put back if an in-place run fails midway."""

    def __init__(self, model):
        self.model = model
        self.attributes = dict(model.__dict__)
        self.deep = {k: copy.deepcopy(v) for k, v in self.attributes.items() if k in _MUTABLE}
        self.weights = state_copy(model.module)

    def restore(self) -> None:
        self.model.__dict__.clear()
        self.model.__dict__.update(self.attributes)
        self.model.__dict__.update(self.deep)
        self.model.module.load_state_dict(self.weights)


#: Attributes a run changes in place (the rest it only replaces, which the shallow copy undoes).
_MUTABLE = ("history_", "unlearning_provenance_", "train_kwargs_")


def document_methods() -> None:
    """Put the registry's method list into ``unlearn``'s docstring (once every method is in)."""
    doc = UnlearningMixin.unlearn.__doc__ or ""
    if "{method_table}" in doc:
        table = method_table(style="rst", indent=" " * 12).lstrip()
        UnlearningMixin.unlearn.__doc__ = doc.replace("{method_table}", table)
