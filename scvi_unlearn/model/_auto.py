"""``method="auto"``: try cheap methods, keep the first that passes its audit, else retrain.

A policy over the training layer's methods, so it lives here, above them: :class:`GatedSearch`
runs the candidates from :data:`~scvi_unlearn.train.METHODS` and judges each with a *gate* and
a *utility* function, both injectable (tests pass fakes).

The default gate is a membership audit on *development* cells (a share of the forget cells and
of the non-members, drawn with the run's seed) against the method's own reference pool, never
the audit's shadows and never the cells left for reporting; the utility is the held-out neg.
ELBO. The gate must first see the trained model leak on those cells, otherwise it could not
tell forgetting from doing nothing. An attempt is accepted only when the audit finds no
evidence of a leak with enough power to have found one, and the held-out negative ELBO is
within ``max_utility_loss`` of the trained model's. When no attempt passes, or when the
development cells are too few to judge (fewer than
:data:`~scvi_unlearn.train.MIN_SELECTION_CELLS` of either), the exact ``retrain_fast`` runs:
private by construction, so a gate without power never lets an approximate method through.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scvi_unlearn._verdict import LEAK, MAX_DETECTABLE_AUC, NO_EVIDENCE
from scvi_unlearn.audit import MembershipInference
from scvi_unlearn.data import validation_split
from scvi_unlearn.train import (
    METHODS,
    MIN_SELECTION_CELLS,
    REFERENCE_PARAMS,
    REFERENCE_SEED_OFFSET,
    HeldOutUtility,
    MethodResult,
    Param,
    RecipeShare,
    UnlearningMethod,
    UnlearningRun,
    WeightsUnchangedError,
    register_method,
    run_reference_pool,
    state_copy,
)

#: Approximate methods ``auto`` tries, cheapest first. Decided on development sets only by
#: ``benchmarks/auto_candidates.py`` (pbmc3k NK cells and random cells, each method alone as the
#: candidate, 3 seeds; rule: accepted by the gate in >= 2 of 3 seeds on some set):
#: ``reset_relearn`` 2/3 (structured); ``oracle_matching`` 0/3 on both (leak), ``contrastive``
#: 0/3 (over-forgets: below the band, +18-20% neg. ELBO on NK cells), SSD and Fisher 0/3.
#: A rejected candidate only costs time, so the others are not tried by default.
AUTO_CANDIDATES: tuple[str, ...] = ("reset_relearn",)
#: Share of the recipe's epochs of the exact fallback: ``benchmarks/retrain_budget.py`` (Kang,
#: Megakaryocytes) measured ``retrain_fast`` at 0.1 of the epochs 1.3% *better* on held-out
#: neg. ELBO than the full retrain, at 0.07x its time.
AUTO_BUDGET = 0.1
#: The exact method ``auto`` falls back to.
AUTO_FALLBACK = "retrain_fast"

#: ``gate(run, pool, forget_cells, nonmember_cells, n_bootstrap)`` -> an attack result with
#: ``auc``, ``auc_ci``, ``reference_band``, ``detectable_auc`` and ``verdict``.
Gate = Callable[[UnlearningRun, Any, np.ndarray, np.ndarray, int], Any]
#: ``utility(run)`` -> an object with ``reference`` (the trained model's held-out neg. ELBO or
#: ``None``), ``of(module)`` and ``n_cells``, built before any attempt changes the weights.
Utility = Callable[[UnlearningRun], Any]


def lira_gate(run: UnlearningRun, pool, f_dev, n_dev, n_bootstrap: int):
    """The default gate: online LiRA on the development cells against the method's pool."""
    mi = MembershipInference(
        run.model.adata,
        recipe=run.model,
        n_shadows=pool.n_shadows,
        seed=REFERENCE_SEED_OFFSET + run.hyperparameters["reference_seed"],
        cache_dir=False,
        attacks=("lira_online",),
        accelerator=run.accelerator,
        devices=run.devices,
    )
    mi.shadows_ = pool  # the method's pool plays the shadows: never the audit's own
    report = mi.audit(
        run.model, members=f_dev, nonmembers=n_dev, attacks=("lira_online",),
        n_bootstrap=n_bootstrap,
    )  # fmt: skip
    return report.results["lira_online"]


def held_out_utility(run: UnlearningRun) -> HeldOutUtility:
    """The default utility: the run's held-out cells (measured by ``unlearn()`` already)."""
    return run.held_out if run.held_out is not None else HeldOutUtility(run)


@dataclass
class GatedSearch:
    """Candidates in order, each gated; the exact fallback when none passes.

    Parameters
    ----------
    methods
        The registry the candidates and the fallback come from.
    gate
        ``gate(run, pool, forget_cells, nonmember_cells, n_bootstrap)`` judges the run's model
        on development cells and returns an attack result with ``auc``, ``auc_ci``,
        ``reference_band``, ``detectable_auc`` and ``verdict`` (default :func:`lira_gate`).
    utility
        ``utility(run)`` returns the held-out utility, built before any attempt changes the
        weights: ``reference`` (the trained model's neg. ELBO, or ``None``), ``of(module)``
        and ``n_cells``.
    reference_pool
        ``reference_pool(run, keep_models)`` -> (pool, record): the gate's reference models.
    """

    methods: Mapping[str, UnlearningMethod] = field(default_factory=lambda: METHODS)
    gate: Gate = lira_gate
    utility: Utility = held_out_utility
    reference_pool: Callable[..., tuple[Any, dict]] = run_reference_pool

    def search(self, run: UnlearningRun) -> MethodResult:
        """Try the candidates; keep the first that passes the gate, else run the fallback."""
        hp = run.hyperparameters
        candidates = parse_candidates(hp["candidates"], self.methods)
        f_dev, _, n_dev, n_rep = development_cells(run, hp["val_fraction"])
        held_out = self.utility(run)  # measured before any attempt changes the weights
        reference_utility = held_out.reference
        original = state_copy(run.model.module)
        names = run.model.adata.obs_names
        summary: dict[str, Any] = {
            "candidates": candidates,
            "fallback": AUTO_FALLBACK,
            "budget": hp["budget"],
            "max_utility_loss": hp["max_utility_loss"],
            "n_forget_development": int(f_dev.size),
            "n_nonmember_development": int(n_dev.size),
            "forget_val_names": names[f_dev].tolist(),
            "nonmember_val_names": names[n_dev].tolist(),
            "n_utility_cells": held_out.n_cells,
            "reference_neg_elbo": reference_utility,
            "attempts": [],
        }
        selection = np.asarray(f_dev, np.int64), np.asarray(n_dev, np.int64)
        pool, gated = self._open_gate(run, candidates, f_dev, n_dev, reference_utility, summary)
        accepted = None
        if pool is not None:
            accepted = self._try_candidates(
                run, candidates, pool, gated, n_rep, original, held_out, summary
            )
        if accepted is None:
            self._fall_back(run, n_rep, original, held_out, summary)
            accepted = AUTO_FALLBACK
        summary["accepted_method"] = accepted
        summary["epochs_run"] = summary["attempts"][-1].get("metrics", {}).get("epochs_run")
        return MethodResult(
            metrics=summary,
            produced_by=accepted,
            exact=self.methods[accepted].exact,
            selection_forget=selection[0],
            selection_nonmembers=selection[1],
        )

    # -- the steps ------------------------------------------------------------------------------
    def _open_gate(self, run, candidates, f_dev, n_dev, reference_utility, summary):
        """The reference pool and the gated cells, or (None, None) with the reason recorded."""
        hp = run.hyperparameters
        skip_reason = None
        if min(f_dev.size, n_dev.size) < MIN_SELECTION_CELLS:
            skip_reason = (
                f"only {f_dev.size} forget and {n_dev.size} non-member development cells (at "
                f"least {MIN_SELECTION_CELLS} of each are needed to judge an approximate method)"
            )
        elif reference_utility is None:
            skip_reason = "no held-out cells to measure utility on"
        pool = None
        if skip_reason is None and candidates:
            pool, record = self.reference_pool(run, keep_models="oracle_matching" in candidates)
            summary["reference_seconds"] = record["reference_seconds"]
            summary["reference_train_seconds"] = record["reference_train_seconds"]
            # A recipe with a validation split leaves some cells out of every reference that
            # drew them IN: LiRA cannot score those, so the gate judges the others only.
            f_dev, n_dev = scorable(pool, f_dev), scorable(pool, n_dev)
            summary["n_forget_gated"] = int(f_dev.size)
            summary["n_nonmember_gated"] = int(n_dev.size)
            skip_reason = self._judge_trained_model(run, pool, f_dev, n_dev, hp, summary)
        if skip_reason is not None:
            warnings.warn(
                f"method='auto': {skip_reason}; no approximate method is tried and the exact "
                f"'{AUTO_FALLBACK}' runs. More same-population non-members (`nonmembers=`) "
                "give the gate more power.",
                UserWarning,
                stacklevel=5,
            )
            summary["skipped_approximate"] = skip_reason
            return None, None
        if pool is None:
            return None, None
        return pool, (f_dev, n_dev)

    def _judge_trained_model(self, run, pool, f_dev, n_dev, hp, summary) -> str | None:
        """Why the gate cannot judge on these cells, or ``None`` when it can."""
        try:
            if min(f_dev.size, n_dev.size) < MIN_SELECTION_CELLS:
                raise ValueError(
                    f"only {f_dev.size} forget and {n_dev.size} non-member development cells "
                    "have reference models that trained on them and that left them out"
                )
            before = self.gate(run, pool, f_dev, n_dev, hp["n_bootstrap"])
        except ValueError as err:  # a gate that cannot run says why, and the exact route runs
            return f"the gate's audit could not run: {err}"
        summary["before"] = audit_record(before)
        if summary["before"]["detectable_auc"] > MAX_DETECTABLE_AUC:
            # The smallest AUC the gate could call a leak depends only on the cell counts and
            # the band, the same for every attempt: each would read "underpowered" and be
            # rejected, so trying them only costs time.
            return (
                f"the gate on {f_dev.size} + {n_dev.size} development cells could only detect "
                f"an AUC above {summary['before']['detectable_auc']:.2f} (at most "
                f"{MAX_DETECTABLE_AUC} is needed), so it could accept no approximate method"
            )
        if summary["before"]["verdict"] != LEAK:
            # A gate that cannot see the trained model's leak cannot tell forgetting from
            # doing nothing: it would accept any candidate. Only an exact method is safe.
            return (
                "the trained model itself shows no leak on the development cells "
                f"({summary['before']['verdict']}, LiRA AUC {summary['before']['auc']:.2f}), "
                "so the gate cannot tell an approximate method that forgot from one that did not"
            )
        return None

    def _try_candidates(self, run, candidates, pool, gated, n_rep, original, held_out,
                        summary) -> str | None:  # fmt: skip
        """The first candidate the gate and the utility accept (its weights kept), or None."""
        hp = run.hyperparameters
        module = run.model.module
        shared = {k: hp[k] for k in REFERENCE_PARAMS}
        for name in candidates:
            attempt = self._attempt(run, name, shared, n_rep, original)
            if "error" not in attempt and not attempt.get("unchanged"):
                gate = self.gate(run, pool, *gated, hp["n_bootstrap"])
                utility = held_out.of(module)
                attempt["audit"] = audit_record(gate)
                attempt["neg_elbo"] = utility
                attempt["utility_loss"] = utility / held_out.reference - 1.0
                private = gate.verdict == NO_EVIDENCE
                useful = attempt["utility_loss"] <= hp["max_utility_loss"]
                attempt["accepted"] = bool(private and useful)
                attempt["reason"] = _reason(
                    gate.verdict, private, useful, attempt["utility_loss"], hp
                )
                if attempt["accepted"] and hp["relearn_epochs"]:
                    self._relearning_check(run, attempt, pool, gated, hp)
            summary["attempts"].append(attempt)
            if attempt.get("accepted"):
                return name
            module.load_state_dict(original)
        return None

    def _fall_back(self, run, n_rep, original, held_out, summary) -> None:
        """Run the exact fallback from the original weights and record it as accepted."""
        hp = run.hyperparameters
        attempt = self._attempt(run, AUTO_FALLBACK, {"budget": hp["budget"]}, n_rep, original)
        if "error" in attempt:
            raise RuntimeError(f"method='auto': the exact fallback failed: {attempt['error']}")
        if held_out.reference is not None:
            attempt["neg_elbo"] = held_out.of(run.model.module)
            attempt["utility_loss"] = attempt["neg_elbo"] / held_out.reference - 1.0
        attempt["accepted"] = True
        attempt["reason"] = "exact: the forget cells are not in the data it trained on"
        summary["attempts"].append(attempt)

    def _relearning_check(self, run, attempt, pool, gated, hp) -> None:
        """Fine-tune a copy on retained cells for ``relearn_epochs``, gate again; reject on a leak.

        A method that only suppressed the forget cells' signal lets it come back after a little
        training on the rest of the data (the benchmark's relearning check); one that removed it
        does not. The candidate's own weights, trainer and history are restored afterwards.
        """
        model = run.model
        kept = state_copy(model.module), getattr(model, "trainer", None), model.history_
        finetune = self.methods["finetune"]
        sub = dataclasses.replace(
            run,
            hyperparameters=finetune.configure({}),
            max_epochs=int(hp["relearn_epochs"]),
            method="finetune",
            nonmembers=None,
        )
        start = time.perf_counter()
        finetune(sub)
        gate = self.gate(run, pool, *gated, hp["n_bootstrap"])
        model.module.load_state_dict(kept[0])
        model.trainer, model.history_ = kept[1], kept[2]
        attempt["relearn"] = {
            **audit_record(gate),
            "epochs": int(hp["relearn_epochs"]),
            "wall_time_s": float(time.perf_counter() - start),
        }
        if gate.verdict == LEAK:
            attempt["accepted"] = False
            attempt["reason"] = (
                f"the forget cells came back after {hp['relearn_epochs']} epochs of training on "
                f"retained cells (development audit: leak, LiRA AUC {gate.auc:.2f}): "
                "suppressed, not removed"
            )

    def _attempt(self, run, name, given, nonmembers, original) -> dict[str, Any]:
        """Run one method on the run's model (from the original weights); a record of it."""
        method = self.methods[name]
        hyperparameters = method.configure({k: v for k, v in given.items() if k in method.params})
        sub = dataclasses.replace(
            run,
            hyperparameters=hyperparameters,
            max_epochs=method.resolve_epochs(run.model, None, hyperparameters),
            method=name,
            nonmembers=nonmembers if method.needs_nonmembers else None,
        )
        run.model.module.load_state_dict(original)
        start = time.perf_counter()
        record: dict[str, Any] = {"method": name, "hyperparameters": hyperparameters}
        try:
            # Each attempt from the run's seed: the same weights as the method called alone.
            record["metrics"] = method(sub).metrics
        except WeightsUnchangedError:
            record.update(unchanged=True, accepted=False, reason="returned the original weights")
        except Exception as err:  # a method that fails is rejected, and says why
            record.update(error=f"{type(err).__name__}: {err}", accepted=False, reason="failed")
            run.model.module.load_state_dict(original)
        finally:
            record["wall_time_s"] = float(time.perf_counter() - start)
        return record


@register_method
class Auto(UnlearningMethod):
    """Audit-gated search: approximate candidates, each gated, with an exact fallback.

    Parameters
    ----------
    search
        The :class:`GatedSearch` to run; ``None``: the default gate and utility. Pass an
        instance to ``unlearn(method=...)`` to use another gate or utility.
    """

    name = "auto"
    description = (
        "audit-gated: the first approximate method that passes an audit on development cells "
        "and keeps utility, else the exact retrain_fast"
    )
    needs_nonmembers = True
    epochs = RecipeShare("budget")
    params = {  # noqa: RUF012 - a declaration, read once at registration
        "budget": Param(
            AUTO_BUDGET, "float", low=0, high=1, low_open=True,
            doc="share of the recipe's epochs for the exact fallback",
        ),
        "candidates": Param(
            ",".join(AUTO_CANDIDATES), "str", doc="approximate methods to try, in order"
        ),
        "max_utility_loss": Param(
            0.05, "float", low=0, doc="largest held-out neg. ELBO increase accepted"
        ),
        "val_fraction": Param(
            0.3, "float", low=0, high=1, low_open=True, high_open=True,
            doc="share of forget cells and non-members used as development cells",
        ),
        "n_bootstrap": Param(200, "int", low=10, doc="bootstrap draws of the gate's audit"),
        "relearn_epochs": Param(
            3, "int", low=0,
            doc="epochs of retain fine-tuning before the gate's second audit (0: none)",
        ),
        **REFERENCE_PARAMS,
    }  # fmt: skip

    def __init__(self, search: GatedSearch | None = None) -> None:
        super().__init__()
        #: The search it runs (the default gate and utility unless one is given).
        self.search = GatedSearch() if search is None else search

    def run(self, run: UnlearningRun) -> MethodResult:
        """The gated search."""
        return self.search.search(run)


def parse_candidates(text: str, registry: Mapping[str, UnlearningMethod]) -> list[str]:
    """``"ssd,reset_relearn"`` -> ``["ssd", "reset_relearn"]``, checked against ``registry``."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    bad = [n for n in names if n not in registry or registry[n].exact or n == "auto"]
    if bad:
        valid = [n for n, m in registry.items() if not m.exact and n != "auto"]
        raise ValueError(
            f"`candidates` {bad} are not approximate unlearning methods; choose among {valid} "
            "(comma-separated). The exact fallback, retrain_fast, always comes last."
        )
    return names


def development_cells(run: UnlearningRun, fraction: float):
    """(development, reporting) parts of the forget cells and of the non-members."""

    def split(cells):
        if cells.size < 2:
            return cells[:0], cells
        report, develop = validation_split(cells, fraction=fraction, seed=run.seed)
        return develop, report

    f_dev, f_rep = split(run.forget)
    n_dev, n_rep = split(run.nonmembers)
    return f_dev, f_rep, n_dev, n_rep


def scorable(pool, cells: np.ndarray) -> np.ndarray:
    """The ``cells`` that at least one reference trained on and at least one left out."""
    trained = pool.in_mask[:, cells]
    return cells[trained.any(0) & (~trained).any(0)]


def audit_record(result) -> dict[str, Any]:
    """The gate's result as a JSON-able record."""
    return {
        "auc": float(result.auc),
        "auc_ci": [float(v) for v in result.auc_ci],
        "band": None
        if result.reference_band is None
        else [float(v) for v in result.reference_band],
        "detectable_auc": float(result.detectable_auc),
        "verdict": result.verdict,
    }


def _reason(verdict: str, private: bool, useful: bool, loss: float, hp: dict) -> str:
    parts = []
    if not private:
        parts.append(f"audit on development cells: {verdict}")
    if not useful:
        parts.append(
            f"held-out neg. ELBO {100 * loss:+.1f}% vs the trained model "
            f"(limit {100 * hp['max_utility_loss']:+.0f}%)"
        )
    return "; ".join(parts) or "no evidence of leak and utility kept"
