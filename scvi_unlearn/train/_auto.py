"""``method="auto"``: try cheap methods, keep the first that passes its audit, else retrain.

The gate of each attempt is a membership audit on *development* cells (a share of the forget
cells and of the non-members, drawn with the run's seed) against the method's own reference
pool, never the audit's shadows and never the cells left for reporting; and a utility check on
held-out cells. The gate must first see the trained model leak on those cells, otherwise it
could not tell forgetting from doing nothing. An attempt is accepted only when the audit finds
no evidence of a leak with enough power to have found one, and the held-out negative ELBO is
within ``max_utility_loss`` of the trained model's. When no attempt passes, or when the
development cells are too few to judge (fewer than :data:`MIN_SELECTION_CELLS` of either), the
exact ``retrain_fast`` runs: private by construction, so a gate without power never lets an
approximate method through.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import TYPE_CHECKING, Any

import torch

from scvi_unlearn._verdict import LEAK, MAX_DETECTABLE_AUC, NO_EVIDENCE
from scvi_unlearn.audit import MembershipInference
from scvi_unlearn.data import validation_split
from scvi_unlearn.train._common import (
    seed_everything,
    state_copy,
)
from scvi_unlearn.train._epochs import MIN_SELECTION_CELLS, resolve_epochs
from scvi_unlearn.train._params import check_hyperparameters
from scvi_unlearn.train._references import REFERENCE_SEED_OFFSET, run_reference_pool
from scvi_unlearn.train._utility import HeldOutUtility

if TYPE_CHECKING:
    import numpy as np

    from scvi_unlearn.train._methods import UnlearningRun

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


def parse_candidates(text: str, registry: dict) -> list[str]:
    """``"ssd,reset_relearn"`` -> ``["ssd", "reset_relearn"]``, checked against ``registry``."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    bad = [n for n in names if n not in registry or registry[n].exact or n == "auto"]
    if bad:
        valid = [n for n, s in registry.items() if not s.exact and n != "auto"]
        raise ValueError(
            f"`candidates` {bad} are not approximate unlearning methods; choose among {valid} "
            "(comma-separated). The exact fallback, retrain_fast, always comes last."
        )
    return names


def _development_cells(run: UnlearningRun, fraction: float):
    """(development, reporting) parts of the forget cells and of the non-members."""

    def split(cells):
        if cells.size < 2:
            return cells[:0], cells
        report, develop = validation_split(cells, fraction=fraction, seed=run.seed)
        return develop, report

    f_dev, f_rep = split(run.forget)
    n_dev, n_rep = split(run.nonmembers)
    return f_dev, f_rep, n_dev, n_rep


def _gate_audit(run: UnlearningRun, pool, f_dev, n_dev, n_bootstrap: int):
    """An audit of the run's model on the development cells against the reference pool."""
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


def _scorable(pool, cells: np.ndarray) -> np.ndarray:
    """The ``cells`` that at least one reference trained on and at least one left out."""
    trained = pool.in_mask[:, cells]
    return cells[trained.any(0) & (~trained).any(0)]


def _audit_record(result) -> dict[str, Any]:
    return {
        "auc": float(result.auc),
        "auc_ci": [float(v) for v in result.auc_ci],
        "band": None
        if result.reference_band is None
        else [float(v) for v in result.reference_band],
        "detectable_auc": float(result.detectable_auc),
        "verdict": result.verdict,
    }


def run_auto(run: UnlearningRun, registry: dict) -> dict[str, Any]:
    """Try the candidates in order; keep the first that passes the gate, else retrain.

    ``registry`` is :data:`~scvi_unlearn.train.METHODS` (passed in: it lists ``auto`` too).
    """
    hp = run.hyperparameters
    candidates = parse_candidates(hp["candidates"], registry)
    f_dev, _, n_dev, n_rep = _development_cells(run, hp["val_fraction"])
    # Measured before any attempt changes the weights (unlearn() has already done it).
    held_out = run.held_out if run.held_out is not None else HeldOutUtility(run)
    reference_utility = held_out.reference
    module = run.model.module
    original = state_copy(module)
    summary: dict[str, Any] = {
        "candidates": candidates,
        "fallback": AUTO_FALLBACK,
        "budget": hp["budget"],
        "max_utility_loss": hp["max_utility_loss"],
        "n_forget_development": int(f_dev.size),
        "n_nonmember_development": int(n_dev.size),
        "forget_val_names": run.model.adata.obs_names[f_dev].tolist(),
        "nonmember_val_names": run.model.adata.obs_names[n_dev].tolist(),
        "n_utility_cells": held_out.n_cells,
        "reference_neg_elbo": reference_utility,
        "attempts": [],
    }
    skip_reason = None
    if min(f_dev.size, n_dev.size) < MIN_SELECTION_CELLS:
        skip_reason = (
            f"only {f_dev.size} forget and {n_dev.size} non-member development cells (at least "
            f"{MIN_SELECTION_CELLS} of each are needed to judge an approximate method)"
        )
    elif reference_utility is None:
        skip_reason = "no held-out cells to measure utility on"
    pool = None
    if skip_reason is None and candidates:
        pool, record = run_reference_pool(run, keep_models="oracle_matching" in candidates)
        summary["reference_seconds"] = record["reference_seconds"]
        summary["reference_train_seconds"] = record["reference_train_seconds"]
        # A recipe with a validation split leaves some cells out of every reference that drew
        # them IN: LiRA cannot score those, so the gate judges the others only.
        f_dev, n_dev = _scorable(pool, f_dev), _scorable(pool, n_dev)
        summary["n_forget_gated"], summary["n_nonmember_gated"] = int(f_dev.size), int(n_dev.size)
        try:
            if min(f_dev.size, n_dev.size) < MIN_SELECTION_CELLS:
                raise ValueError(
                    f"only {f_dev.size} forget and {n_dev.size} non-member development cells "
                    "have reference models that trained on them and that left them out"
                )
            before = _gate_audit(run, pool, f_dev, n_dev, hp["n_bootstrap"])
        except ValueError as err:  # a gate that cannot run says why, and the exact route runs
            skip_reason = f"the gate's audit could not run: {err}"
            pool = None
    if pool is not None:
        summary["before"] = _audit_record(before)
        if summary["before"]["detectable_auc"] > MAX_DETECTABLE_AUC:
            # The smallest AUC the gate could call a leak depends only on the cell counts and
            # the band, the same for every attempt: each would read "underpowered" and be
            # rejected, so trying them only costs time.
            skip_reason = (
                f"the gate on {f_dev.size} + {n_dev.size} development cells could only detect "
                f"an AUC above {summary['before']['detectable_auc']:.2f} (at most "
                f"{MAX_DETECTABLE_AUC} is needed), so it could accept no approximate method"
            )
            pool = None
        elif summary["before"]["verdict"] != LEAK:
            # A gate that cannot see the trained model's leak cannot tell forgetting from
            # doing nothing: it would accept any candidate. Only an exact method is safe.
            skip_reason = (
                "the trained model itself shows no leak on the development cells "
                f"({summary['before']['verdict']}, LiRA AUC {summary['before']['auc']:.2f}), so "
                "the gate cannot tell an approximate method that forgot from one that did not"
            )
            pool = None
    if skip_reason is not None:
        warnings.warn(
            f"method='auto': {skip_reason}; no approximate method is tried and the exact "
            f"'{AUTO_FALLBACK}' runs. More same-population non-members (`nonmembers=`) give the "
            "gate more power.",
            UserWarning,
            stacklevel=3,
        )
        summary["skipped_approximate"] = skip_reason
    shared = {k: hp[k] for k in ("n_references", "reference_cache_dir", "reference_seed")}
    accepted = None
    for name in candidates if pool is not None else []:
        attempt = _attempt(run, name, registry[name], shared, n_rep, original)
        if "error" not in attempt and not attempt.get("unchanged"):
            gate = _gate_audit(run, pool, f_dev, n_dev, hp["n_bootstrap"])
            utility = held_out.of(module)
            attempt["audit"] = _audit_record(gate)
            attempt["neg_elbo"] = utility
            attempt["utility_loss"] = utility / reference_utility - 1.0
            private = gate.verdict == NO_EVIDENCE
            useful = attempt["utility_loss"] <= hp["max_utility_loss"]
            attempt["accepted"] = bool(private and useful)
            attempt["reason"] = _reason(gate.verdict, private, useful, attempt["utility_loss"], hp)
            if attempt["accepted"] and hp["relearn_epochs"]:
                _relearning_check(run, registry, attempt, pool, f_dev, n_dev, hp)
        summary["attempts"].append(attempt)
        if attempt.get("accepted"):
            accepted = name
            break
        module.load_state_dict(original)
    if accepted is None:
        attempt = _attempt(
            run, AUTO_FALLBACK, registry[AUTO_FALLBACK], {"budget": hp["budget"]}, n_rep, original
        )
        if "error" in attempt:
            raise RuntimeError(f"method='auto': the exact fallback failed: {attempt['error']}")
        if reference_utility is not None:
            attempt["neg_elbo"] = held_out.of(module)
            attempt["utility_loss"] = attempt["neg_elbo"] / reference_utility - 1.0
        attempt["accepted"] = True
        attempt["reason"] = "exact: the forget cells are not in the data it trained on"
        summary["attempts"].append(attempt)
        accepted = AUTO_FALLBACK
    summary["accepted_method"] = accepted
    summary["epochs_run"] = summary["attempts"][-1].get("metrics", {}).get("epochs_run")
    return summary


def _relearning_check(run, registry, attempt, pool, f_dev, n_dev, hp) -> None:
    """Fine-tune a copy on retained cells for ``relearn_epochs``, gate again; reject on a leak.

    A method that only suppressed the forget cells' signal lets it come back after a little
    training on the rest of the data (the benchmark's relearning check); one that removed it
    does not. The candidate's own weights, trainer and history are restored afterwards.
    """
    model = run.model
    kept = state_copy(model.module), getattr(model, "trainer", None), model.history_
    spec = registry["finetune"]
    sub = dataclasses.replace(
        run,
        hyperparameters=check_hyperparameters("finetune", spec.params, {}),
        max_epochs=int(hp["relearn_epochs"]),
        method="finetune",
        nonmembers=None,
    )
    start = time.perf_counter()
    seed_everything(run.seed)
    spec.run(sub)
    gate = _gate_audit(run, pool, f_dev, n_dev, hp["n_bootstrap"])
    model.module.load_state_dict(kept[0])
    model.trainer, model.history_ = kept[1], kept[2]
    attempt["relearn"] = {
        **_audit_record(gate),
        "epochs": int(hp["relearn_epochs"]),
        "wall_time_s": float(time.perf_counter() - start),
    }
    if gate.verdict == LEAK:
        attempt["accepted"] = False
        attempt["reason"] = (
            f"the forget cells came back after {hp['relearn_epochs']} epochs of training on "
            f"retained cells (development audit: leak, LiRA AUC {gate.auc:.2f}): suppressed, "
            "not removed"
        )


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


def _attempt(run, name, spec, given, nonmembers, original) -> dict[str, Any]:
    """Run one method on the run's model (from the original weights); a record of it."""
    given = {k: v for k, v in given.items() if k in spec.params}
    hyperparameters = check_hyperparameters(name, spec.params, given)
    epochs = resolve_epochs(run.model, spec, name, None, hyperparameters)
    sub = dataclasses.replace(
        run,
        hyperparameters=hyperparameters,
        max_epochs=epochs,
        method=name,
        nonmembers=nonmembers if spec.needs_nonmembers else None,
    )
    run.model.module.load_state_dict(original)
    # Each attempt from the run's seed: the same weights as the method called on its own.
    seed_everything(run.seed)
    start = time.perf_counter()
    record: dict[str, Any] = {"method": name, "hyperparameters": hyperparameters}
    try:
        record["metrics"] = spec.run(sub)
    except Exception as err:  # a method that fails is rejected, and says why
        record.update(error=f"{type(err).__name__}: {err}", accepted=False, reason="failed")
        run.model.module.load_state_dict(original)
        return record
    finally:
        record["wall_time_s"] = float(time.perf_counter() - start)
    unchanged = all(
        torch.equal(value.cpu(), original[key])
        for key, value in run.model.module.state_dict().items()
    )
    if unchanged and not spec.exact:
        record.update(unchanged=True, accepted=False, reason="returned the original weights")
    return record
