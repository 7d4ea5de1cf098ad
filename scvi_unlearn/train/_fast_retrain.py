"""Exact unlearning on a budget: a fresh scVI trained on the retained cells only.

Private by construction (the forget cells are not in the data it sees), so only its utility is
in question: a one-cycle learning-rate schedule and a KL warm-up scaled to the shorter budget let
a quarter of the original epochs reach the full retrain's held-out ELBO (measured in
``benchmarks/retrain_budget.py``).
"""

from __future__ import annotations

from typing import Any

from scvi.train import TrainingPlan
from torch.optim.lr_scheduler import OneCycleLR

from scvi_unlearn._recipe import Recipe
from scvi_unlearn.train._common import last_kl_weight, make_data_splitter, run_plan
from scvi_unlearn.train._epochs import RecipeShare
from scvi_unlearn.train._method import (
    UnlearningMethod,
    UnlearningRun,
    exact_methods,
    register_method,
)
from scvi_unlearn.train._params import Param, plan_defaults
from scvi_unlearn.train._retrain import load_fresh, retained_data


class FastRetrainPlan(TrainingPlan):
    """scVI's :class:`~scvi.train.TrainingPlan` with a one-cycle learning-rate schedule.

    The learning rate rises from ``peak_lr / 25`` to ``peak_lr`` over the first
    ``pct_start`` of the steps, then anneals (cosine) to almost zero, stepped every minibatch
    (Smith & Topin 2019). The KL warm-up and everything else are scVI's.

    Parameters
    ----------
    module
        A freshly initialised scVI ``VAE``.
    peak_lr
        The schedule's highest learning rate.
    pct_start
        Share of the steps spent raising the learning rate.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``n_epochs_kl_warmup``, ...).
    """

    def __init__(self, module, *, peak_lr: float = 3e-3, pct_start: float = 0.3, **kwargs: Any):
        kwargs.setdefault("lr", peak_lr)
        super().__init__(module, **kwargs)
        self.peak_lr = float(peak_lr)
        self.pct_start = float(pct_start)

    def configure_optimizers(self):
        """ScVI's optimizer, with the one-cycle schedule stepped every minibatch."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = self.get_optimizer_creator()(params)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = OneCycleLR(
            optimizer, max_lr=self.peak_lr, total_steps=total, pct_start=self.pct_start
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }


# -- the method --------------------------------------------------------------------------------
@register_method
class RetrainFast(UnlearningMethod):
    """Exact unlearning on an adaptive budget: fresh weights, retained cells, one-cycle rounds."""

    name = "retrain_fast"
    description = "fresh weights on the retained cells, in rounds of a reduced one-cycle budget"
    plan = FastRetrainPlan
    params = {
        "budget": Param(
            0.1, "float", low=0, high=1, low_open=True,
            doc="share of the recipe's epochs in each round",
        ),
        "peak_lr": Param(
            None, "float", low=0, low_open=True, allow_none=True, doc="default: 3x recipe lr"
        ),
        "pct_start": Param(kind="float", low=0, high=1, low_open=True, high_open=True),
        "early_stopping": Param(True, "bool", doc="on the retained validation ELBO"),
        "max_budget": Param(
            0.5, "float", low=0, high=1, low_open=True,
            doc="most epochs of all rounds together, a share of the recipe's",
        ),
        "utility_tolerance": Param(
            0.02, "float", low=0,
            doc="another round while the held-out neg. ELBO is this much worse than the "
            "trained model's",
        ),
        "batch_size": Param(128, "int", low=1, doc="used when the recipe names none"),
        "init_from": Param(
            None, "str", allow_none=True,
            doc="saved model that never saw the forget cells: warm start (checked)",
        ),
    }  # fmt: skip
    epochs = RecipeShare("budget")
    exact = True

    def run(self, run: UnlearningRun) -> dict[str, Any]:
        """Rounds of training from fresh weights on the retained cells.

        A first round of ``budget`` of the recipe's epochs; while the held-out neg. ELBO is more
        than ``utility_tolerance`` worse than the trained model's and the rounds so far stay below
        ``max_budget``, another round of the same length continues from the weights reached (still
        only retained cells, so still exact).
        """
        hp = run.hyperparameters
        recipe = Recipe.from_model(run.model)
        full_epochs = int(recipe.train_kwargs.get("max_epochs") or run.max_epochs)
        epochs = run.max_epochs
        plan_kwargs = dict(recipe.train_kwargs.get("plan_kwargs") or {})
        # The KL warm-up keeps its place relative to training: the first round ends at the same
        # KL weight as the full recipe (scVI's default warm-up, 400 epochs, scales too).
        warmup = plan_kwargs.get(
            "n_epochs_kl_warmup", plan_defaults(TrainingPlan)["n_epochs_kl_warmup"]
        )
        if warmup:
            plan_kwargs["n_epochs_kl_warmup"] = max(1, round(warmup * epochs / full_epochs))
        peak_lr = hp["peak_lr"] or 3.0 * float(plan_kwargs.get("lr", 1e-3))
        plan_kwargs.pop("lr", None)
        data, train_pos, val_pos = retained_data(run)
        fresh = recipe.build(data, seed=run.seed, model_cls=type(run.model))
        warm = warm_start(run, hp["init_from"], data, fresh) if hp["init_from"] else {}
        batch_size = int(recipe.train_kwargs.get("batch_size") or hp["batch_size"])
        splitter = make_data_splitter(fresh, train_pos, val_pos, batch_size=batch_size)
        stopping = {}
        if hp["early_stopping"] and val_pos.size:
            stopping = {
                "early_stopping": True,
                "early_stopping_monitor": "elbo_validation",
                "early_stopping_patience": max(3, epochs // 5),
            }
        held_out = run.held_out
        target = None if held_out is None else held_out.reference
        first_warmup = plan_kwargs.get("n_epochs_kl_warmup")
        max_rounds = max(1, int(hp["max_budget"] * full_epochs // max(epochs, 1)))
        rounds: list[dict[str, Any]] = []
        epochs_run = 0
        while True:
            plan = FastRetrainPlan(
                fresh.module, peak_lr=peak_lr, pct_start=hp["pct_start"], **plan_kwargs
            )
            runner = run_plan(
                fresh, plan, splitter, epochs, accelerator=run.accelerator, devices=run.devices,
                enable_progress_bar=run.enable_progress_bar, **stopping,
            )  # fmt: skip
            epochs_run += int(runner.trainer.current_epoch)
            if run.replay_rounds is not None:
                rounds.append(
                    {"epochs": int(runner.trainer.current_epoch), "utility_change": None}
                )
                if len(rounds) >= run.replay_rounds:
                    break
            else:
                change = None if target is None else held_out.of(fresh.module) / target - 1.0
                rounds.append(
                    {"epochs": int(runner.trainer.current_epoch), "utility_change": change}
                )
                if (
                    change is None
                    or change <= hp["utility_tolerance"]
                    or len(rounds) >= max_rounds
                ):
                    break
            # The next round continues at the KL weight this one ended at.
            end_weight = last_kl_weight(plan)
            plan_kwargs.update(
                n_epochs_kl_warmup=None, n_steps_kl_warmup=None,
                max_kl_weight=end_weight, min_kl_weight=end_weight,
            )  # fmt: skip
        load_fresh(run, fresh)
        return {
            "budget": epochs / full_epochs,
            "budget_used": epochs_run / full_epochs,
            "full_epochs": full_epochs,
            "epochs_run": epochs_run,
            "rounds": rounds,
            "peak_lr": peak_lr,
            "n_epochs_kl_warmup": first_warmup,
            "early_stopping": bool(stopping),
            "n_train": int(run.retain.size),
            "n_validation": int(val_pos.size),
            **warm,
        }


def cells_ever_seen(model) -> set[str] | None:
    """Names of every cell whose data reached ``model``'s weights, or None if unknown.

    Its training cells, plus the cells an approximate unlearning removed from it (their
    influence may remain; an exact method's forgotten cells never reached its new weights).
    """
    exact = exact_methods()
    names = getattr(model, "train_obs_names_", None)
    if names is None:
        return None
    seen = set(names)
    provenance = getattr(model, "unlearning_provenance_", None) or {}
    approximate = [
        event
        for event in provenance.get("events", [])
        if event.get("method") not in exact
        and (event.get("metrics") or {}).get("accepted_method") not in exact
    ]
    if approximate and provenance.get("forgotten_obs_names") is None:
        return None  # an approximate removal of cells it does not name: unknown
    if approximate:
        seen.update(provenance["forgotten_obs_names"])
    return seen


def warm_start(run: UnlearningRun, path: str, data, fresh) -> dict[str, Any]:
    """Load a saved model that never saw a forgotten cell into ``fresh``; what was checked.

    Exactness needs the starting weights to be independent of every forgotten cell: the model
    at ``path`` must name its training cells (``train_obs_names_``, written by this package's
    ``train``) and none of them (nor any cell an approximate unlearning removed from it) may be
    in this request's forget set or among the cells forgotten earlier from this model.
    """
    start = type(run.model).load(path, adata=data.copy())  # gene / registry mismatch raises
    seen = cells_ever_seen(start)
    if seen is None:
        raise ValueError(
            f"The warm-start model at {path!r} does not record every cell it saw (its "
            "`train_obs_names_`, and the names of cells an approximate method removed from it), "
            "so nothing shows that it never saw the forget cells. Train it with "
            "scvi_unlearn.model.SCVI (which records them) or drop `init_from`."
        )
    names = run.model.adata.obs_names
    provenance = getattr(run.model, "unlearning_provenance_", None) or {}
    earlier = provenance.get("forgotten_obs_names")
    if earlier is None and provenance.get("events"):
        # Cells forgotten before are recorded by fingerprint only and are no longer in this
        # model's data: a start model that saw cells outside it might have seen them.
        outside = sorted(seen - set(names))
        if outside:
            raise ValueError(
                f"The warm-start model at {path!r} trained on {len(outside)} cells outside this "
                "model's data, and the cells this model forgot earlier are recorded without "
                "names, so nothing shows they are not among them. Unlearn with "
                "`record_names=True`, or drop `init_from`."
            )
    forbidden = set(names[run.forget]) | set(earlier or [])
    overlap = sorted(seen & forbidden)
    if overlap:
        raise ValueError(
            f"The warm-start model at {path!r} saw {len(overlap)} cells that must be forgotten "
            f"(e.g. {overlap[:5]}); starting from it would not be exact unlearning. Use a "
            "model trained without them, or drop `init_from` (fresh weights)."
        )
    target, source = fresh.module.state_dict(), start.module.state_dict()
    mismatched = [k for k in target if k not in source or source[k].shape != target[k].shape]
    if mismatched or set(source) - set(target):
        raise ValueError(
            f"The warm-start model at {path!r} has another architecture than this model's "
            f"recipe (differing weights: {(mismatched or sorted(set(source) - set(target)))[:5]})."
        )
    fresh.module.load_state_dict(source)
    return {"init_from": str(path), "init_n_cells_seen": len(seen), "init_checked_disjoint": True}
