"""The unlearning methods: their hyper-parameters and how each one runs.

Every method receives an :class:`UnlearningRun` (the model copy to modify, the cells, the
validated hyper-parameters) and returns a JSON-able summary of what happened.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.train import TrainingPlan

from scvi_unlearn._recipe import Recipe
from scvi_unlearn.data import validation_split
from scvi_unlearn.train._adversarial import (
    CALIBRATION_KEY,
    ExtraGradientUnlearningPlan,
    FrozenCriticPlan,
)
from scvi_unlearn.train._auto import AUTO_BUDGET, AUTO_CANDIDATES, run_auto
from scvi_unlearn.train._baselines import GradientAscentPlan, RetainFinetunePlan, SCRUBPlan
from scvi_unlearn.train._common import (
    gather_tensors,
    last_kl_weight,
    logged_history,
    make_data_splitter,
    run_plan,
)
from scvi_unlearn.train._contrastive import ContrastiveLatentPlan
from scvi_unlearn.train._epochs import MIN_SELECTION_CELLS
from scvi_unlearn.train._fast_retrain import FastRetrainPlan
from scvi_unlearn.train._fisher import FisherScrubbingPlan
from scvi_unlearn.train._oracle import (
    TARGET_LOG_MU,
    TARGET_SCORE,
    OracleMatchingPlan,
    oracle_targets,
)
from scvi_unlearn.train._params import Param, plan_defaults, resolve_plan_defaults
from scvi_unlearn.train._references import (
    DEFAULT_N_REFERENCES,
    out_calibration,
    run_reference_pool,
)
from scvi_unlearn.train._reset import ResetRelearnPlan, request_seed

if TYPE_CHECKING:
    from collections.abc import Callable

    from scvi_unlearn.train._utility import HeldOutUtility


@dataclass
class UnlearningRun:
    """Everything a method needs to run.

    Attributes
    ----------
    model
        The model to modify (a copy of the user's unless ``inplace=True``).
    forget, retain, nonmembers
        Cell positions in ``model.adata``; ``retain`` = training cells minus ``forget``;
        ``nonmembers`` is ``None`` for methods that do not use them.
    validation
        The original model's validation cells (never trained on).
    hyperparameters
        Validated hyper-parameters, defaults filled in.
    seed, max_epochs, accelerator, devices, enable_progress_bar
        Run settings (``max_epochs`` already resolved to the method's default if not given).
    kl_weight
        KL weight to continue training at (that of the end of the original training).
    held_out
        Held-out cells and the trained model's neg. ELBO on them, measured before the method
        runs (``unlearn()`` sets it; ``method="auto"`` gates on it).
    replay_rounds
        For ``retrain_fast``: run exactly this many rounds instead of deciding on held-out
        cells (how :func:`~scvi_unlearn.model.verify_unlearning` re-runs a recorded result).
    """

    model: Any
    forget: np.ndarray
    retain: np.ndarray
    nonmembers: np.ndarray | None
    validation: np.ndarray
    hyperparameters: dict[str, Any]
    seed: int
    max_epochs: int
    accelerator: str = "auto"
    devices: int | list[int] | str = "auto"
    enable_progress_bar: bool = True
    kl_weight: float = 1.0
    method: str = ""
    held_out: HeldOutUtility | None = None
    replay_rounds: int | None = None

    @property
    def rng(self) -> np.random.Generator:
        """A numpy generator seeded by the run's seed (fresh on every access)."""
        return np.random.default_rng(self.seed)

    def plan_kwargs(self) -> dict[str, Any]:
        """Arguments shared by every plan."""
        hp = self.hyperparameters
        kl = hp.get("kl_weight")
        return {
            "lr": hp["lr"],
            "seed": self.seed,
            "kl_weight": self.kl_weight if kl is None else kl,
        }

    def fit(
        self,
        plan,
        train_idx: np.ndarray,
        val_idx: np.ndarray | None = None,
        max_epochs: int | None = None,
    ):
        """Run ``plan`` under scvi-tools' TrainRunner on the model's retained cells."""
        batch_size = self.hyperparameters["batch_size"]
        splitter = make_data_splitter(self.model, train_idx, val_idx, batch_size=batch_size)
        extra = {}
        fraction = self.hyperparameters.get("retain_fraction", 1.0)
        if fraction < 1.0:
            # Lightning draws a fresh random subset of the (shuffled) retain minibatches each
            # epoch; an integer count, at least one, because a float that rounds to zero
            # batches is an error in Lightning.
            n_batches = int(np.ceil(np.asarray(train_idx).size / batch_size))
            extra["limit_train_batches"] = max(1, int(np.ceil(fraction * n_batches)))
        return run_plan(
            self.model,
            plan,
            splitter,
            self.max_epochs if max_epochs is None else max_epochs,
            accelerator=self.accelerator,
            devices=self.devices,
            enable_progress_bar=self.enable_progress_bar,
            **extra,
        )


@dataclass(frozen=True)
class MethodSpec:
    """An unlearning method: its hyper-parameters, needs and runner.

    ``params`` declared with the default :data:`~scvi_unlearn.train._params.FROM_PLAN` take
    their default from ``plan``'s signature when the spec is built, so each default is
    written once: in the plan for plan arguments, here for run-level ones.
    """

    name: str
    params: dict[str, Param]
    needs_nonmembers: bool
    default_max_epochs: int
    run: Callable[[UnlearningRun], dict[str, Any]]
    description: str
    plan: type | None = None
    exact: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", resolve_plan_defaults(self.params, self.plan))


# -- hyper-parameter declarations ------------------------------------------------------------
# Plan arguments leave their default to the plan's signature; run-level ones state it here.
_TRAINING = {
    "lr": Param(kind="float", low=0, low_open=True, doc="learning rate of the VAE"),
    "batch_size": Param(128, "int", low=1, doc="retain minibatch size"),
    # Run-level meaning: None = the original training's final KL weight.
    "kl_weight": Param(
        None, "float", low=0, allow_none=True, doc="KL weight (default: the original's final)"
    ),
}
_SELECTION = {
    "val_fraction": Param(0.3, "float", low=0, high=1, low_open=True, high_open=True),
    "retain_val_fraction": Param(0.1, "float", low=0, high=1, high_open=True),
    "target_auc": Param(kind="float", low=0, high=1),
    "max_utility_loss": Param(kind="float", low=0),
    "patience": Param(kind="int", low=1, allow_none=True),
}
_GAME = {
    "lambda_": Param(kind="float", low=0, doc="weight of the privacy term"),
    "n_critics": Param(kind="int", low=1),
    "critic_hidden": Param(kind="int", low=1),
    "critic_pretrain_steps": Param(kind="int", low=0),
    "critic_pretrain_lr": Param(kind="float", low=0, low_open=True),
    "adv_batch_size": Param(kind="int", low=1),
}
_BUDGET = {
    # The game's cost per retain cell is ~2.7x a plain training step (look-ahead + update,
    # each with forget / non-member passes); a quarter of the retain minibatches per epoch
    # over 20 epochs keeps it near 0.15x of a 100-epoch retrain (benchmarks/unlearning.py).
    "retain_fraction": Param(
        0.25,
        "float",
        low=0,
        high=1,
        low_open=True,
        doc="share of the retain minibatches drawn (afresh) in each epoch",
    ),
}
_REFERENCES = {
    "n_references": Param(
        DEFAULT_N_REFERENCES, "int", low=4, doc="method reference models (even, >= 4)"
    ),
    "reference_cache_dir": Param(
        None, "str", allow_none=True, doc="default: <shadow cache>/method_references"
    ),
    # The pool belongs to the data set and recipe, not to one request: every request (and
    # every unlearning seed) reuses it, so it is paid once.
    "reference_seed": Param(0, "int", low=0, doc="seed of the reference pool (not the run's)"),
}
_FISHER = {
    "alpha": Param(kind="float", low=0, doc="scale of the Golatkar noise"),
    "eps": Param(kind="float", low=0, low_open=True),
    "max_std": Param(kind="float", low=0, low_open=True),
    "n_fisher_cells": Param(1024, "int", low=1),
    "fisher_method": Param(kind="str", doc="'hooks' (default) or 'functional' (reference)"),
    "fisher_batch_size": Param(kind="int", low=1, allow_none=True),
    "finetune_epochs": Param(0, "int", low=0),
    "ssd": Param(kind="bool"),
    "selection_weight": Param(kind="float", low=0, low_open=True),
    "dampening": Param(kind="float", low=0, low_open=True),
}


# -- runners ----------------------------------------------------------------------------------
def _split_validation(idx: np.ndarray, fraction: float, seed: int, what: str):
    if idx.size < 2:
        raise ValueError(
            f"Early stopping needs at least 2 {what} (one to unlearn with, one to validate on); "
            f"got {idx.size}."
        )
    return validation_split(idx, fraction=fraction, seed=seed)


def _retain_validation(run: UnlearningRun, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = round(fraction * run.retain.size)
    n_val = min(n_val, run.retain.size - 1)
    if n_val <= 0:
        return run.retain, np.zeros(0, np.int64)
    val = np.sort(run.rng.permutation(run.retain)[:n_val])
    return np.setdiff1d(run.retain, val), val


def _run_adversarial(run: UnlearningRun, plan_cls, calibrated: bool = False) -> dict[str, Any]:
    hp = run.hyperparameters
    f_fit, f_val = _split_validation(run.forget, hp["val_fraction"], run.seed, "forget cells")
    n_fit, n_val = _split_validation(run.nonmembers, hp["val_fraction"], run.seed, "non-members")
    r_train, r_val = _retain_validation(run, hp["retain_val_fraction"])
    underpowered = min(f_val.size, n_val.size) < MIN_SELECTION_CELLS
    if underpowered:
        warnings.warn(
            f"Only {f_val.size} forget and {n_val.size} non-member cells are left to judge "
            f"the unlearning epochs (at least {MIN_SELECTION_CELLS} of each are needed for an "
            f"AUC to mean anything), so '{run.method}' runs its fixed budget of "
            f"{run.max_epochs} epochs and keeps the final state, without selection. Pass more "
            "same-population cells the model never saw with `nonmembers=`, or use an exact "
            "method (method='retrain').",
            UserWarning,
            stacklevel=2,
        )
    game = {k: hp[k] for k in _GAME}
    extra = {"critic_lr": hp["critic_lr"]} if "critic_lr" in hp else {}
    # Every forget cell takes part in the game (all must be forgotten); the held-out
    # non-members are never shown to the critics. Selection uses (f_val, n_val), so the
    # cells to report on, (f_fit, n_fit), play no part in choosing the epoch.
    sets = {"forget": run.forget, "nonmember": n_fit, "forget_val": f_val, "nonmember_val": n_val}
    tensors = {name: gather_tensors(run.model, cells) for name, cells in sets.items()}
    calibration = {}
    if calibrated:
        calibration = _calibrate(run, sets, tensors)
    plan = plan_cls(
        run.model.module,
        tensors["forget"],
        tensors["nonmember"],
        forget_val_tensors=tensors["forget_val"],
        nonmember_val_tensors=tensors["nonmember_val"],
        calibration_std=calibration.get("std"),
        target_auc=hp["target_auc"],
        max_utility_loss=hp["max_utility_loss"],
        patience=hp["patience"],
        select_state=not underpowered,
        **game,
        **extra,
        **run.plan_kwargs(),
    )
    runner = run.fit(plan, r_train, r_val)
    summary = plan.selector.summary()
    summary.update(
        selection_underpowered=bool(underpowered),
        min_selection_cells=MIN_SELECTION_CELLS,
        n_forget_fit=int(f_fit.size),
        n_forget_val=int(f_val.size),
        n_nonmember_fit=int(n_fit.size),
        n_nonmember_val=int(n_val.size),
        n_retain_val=int(r_val.size),
        forget_val_names=run.model.adata.obs_names[f_val].tolist(),
        nonmember_val_names=run.model.adata.obs_names[n_val].tolist(),
    )
    summary.update({k: v for k, v in calibration.items() if k != "std"})
    return _with_history(summary, runner)


def _calibrate(run: UnlearningRun, sets: dict, tensors: dict) -> dict[str, Any]:
    """Add each cell's OUT-reference mean features to its tensors; return the pooled SD.

    The reference pool is the method's own (:func:`method_reference_pool`), never the audit's
    shadows.
    """
    pool, record = run_reference_pool(run)
    everything = np.concatenate(list(sets.values())).astype(np.int64)
    _, std = out_calibration(pool, everything)
    for name, cells in sets.items():
        mean, _ = out_calibration(pool, np.asarray(cells, dtype=np.int64))
        tensors[name][CALIBRATION_KEY] = torch.as_tensor(mean, dtype=torch.float32)
    return {"std": torch.as_tensor(std, dtype=torch.float32), **record}


def _with_history(summary: dict[str, Any], runner) -> dict[str, Any]:
    history = logged_history(runner)
    keep = (
        "privacy_loss",
        "privacy_js",
        "critic_accuracy",
        "unlearn_auc_validation",
        "retain_elbo_validation",
        "forget_neg_elbo",
        "forget_divergence",
        "elbo_train",
    )
    summary["epochs_run"] = int(runner.trainer.current_epoch)
    summary["retain_batches_per_epoch"] = int(runner.trainer.num_training_batches)
    summary["history"] = {k: v for k, v in history.items() if k in keep}
    return summary


def _run_extragradient(run: UnlearningRun) -> dict[str, Any]:
    return _run_adversarial(run, ExtraGradientUnlearningPlan)


def _run_extragradient_calibrated(run: UnlearningRun) -> dict[str, Any]:
    return _run_adversarial(run, ExtraGradientUnlearningPlan, calibrated=True)


def _run_frozen(run: UnlearningRun) -> dict[str, Any]:
    return _run_adversarial(run, FrozenCriticPlan)


def _run_fisher(run: UnlearningRun) -> dict[str, Any]:
    hp = run.hyperparameters
    n_fisher = min(hp["n_fisher_cells"], run.retain.size)
    fisher_cells = np.sort(run.rng.permutation(run.retain)[:n_fisher])
    plan = FisherScrubbingPlan(
        run.model.module,
        gather_tensors(run.model, fisher_cells),
        gather_tensors(run.model, run.forget) if hp["ssd"] else None,
        alpha=hp["alpha"],
        eps=hp["eps"],
        max_std=hp["max_std"],
        ssd=hp["ssd"],
        selection_weight=hp["selection_weight"],
        dampening=hp["dampening"],
        fisher_method=hp["fisher_method"],
        fisher_batch_size=hp["fisher_batch_size"],
        **run.plan_kwargs(),
    )
    runner = run.fit(plan, run.retain, max_epochs=run.max_epochs)
    return _with_history(dict(plan.edit_summary_ or {}), runner)


def _run_oracle_matching(run: UnlearningRun) -> dict[str, Any]:
    hp = run.hyperparameters
    pool, record = run_reference_pool(run, keep_models=True, group_key=hp["group_key"])
    forget = gather_tensors(run.model, run.forget)
    targets = oracle_targets(
        run.model.module, pool.state_dicts, pool.in_mask[:, run.forget], forget
    )
    forget[TARGET_LOG_MU] = targets["log_mu"]
    forget[TARGET_SCORE] = targets["score"]
    plan = OracleMatchingPlan(
        run.model.module,
        forget,
        score_sd=targets["score_sd"],
        retain_weight=hp["retain_weight"],
        score_weight=hp["score_weight"],
        forget_batch_size=hp["forget_batch_size"],
        **run.plan_kwargs(),
    )
    summary = {
        **record,
        "reference_group_key": hp["group_key"],
        "oracle_score_shift_mean": float(np.mean(targets["score_shift"])),
        "oracle_score_sd": targets["score_sd"],
    }
    return _with_history(summary, run.fit(plan, run.retain))


def _run_finetune(run: UnlearningRun) -> dict[str, Any]:
    plan = RetainFinetunePlan(run.model.module, **run.plan_kwargs())
    return _with_history({}, run.fit(plan, run.retain))


def _run_gradient_ascent(run: UnlearningRun) -> dict[str, Any]:
    hp = run.hyperparameters
    plan = GradientAscentPlan(
        run.model.module,
        gather_tensors(run.model, run.forget),
        ascent_steps=hp["ascent_steps"],
        ascent_batch_size=hp["ascent_batch_size"],
        **run.plan_kwargs(),
    )
    return _with_history({}, run.fit(plan, run.retain))


def _run_contrastive(run: UnlearningRun) -> dict[str, Any]:
    hp = run.hyperparameters
    plan = ContrastiveLatentPlan(
        run.model.module,
        gather_tensors(run.model, run.forget),
        anchor_weight=hp["anchor_weight"],
        forget_batch_size=hp["forget_batch_size"],
        **run.plan_kwargs(),
    )
    return _with_history({}, run.fit(plan, run.retain))


def _run_scrub(run: UnlearningRun) -> dict[str, Any]:
    hp = run.hyperparameters
    plan = SCRUBPlan(
        run.model.module,
        gather_tensors(run.model, run.forget),
        n_max_epochs=hp["n_max_epochs"],
        alpha=hp["alpha"],
        gamma=hp["gamma"],
        forget_batch_size=hp["forget_batch_size"],
        **run.plan_kwargs(),
    )
    return _with_history({}, run.fit(plan, run.retain))


def _run_reset_relearn(run: UnlearningRun) -> dict[str, Any]:
    hp = run.hyperparameters
    n_sample = min(hp["n_saliency_cells"], run.retain.size)
    retain_sample = np.sort(run.rng.permutation(run.retain)[:n_sample])
    forget_names = run.model.adata.obs_names[run.forget].tolist()
    plan = ResetRelearnPlan(
        run.model.module,
        gather_tensors(run.model, run.forget),
        gather_tensors(run.model, retain_sample),
        reset_fraction=hp["reset_fraction"],
        random_fraction=hp["random_fraction"],
        eps=hp["eps"],
        reset_seed=request_seed(run.seed, forget_names),
        reset_batches=_forgotten_batches(run),
        **run.plan_kwargs(),
    )
    runner = run.fit(plan, run.retain)
    summary = dict(plan.edit_summary_ or {})
    if summary.get("reset_batches"):
        mapping = run.model.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY)
        names = list(mapping.categorical_mapping)
        summary["reset_batch_names"] = [str(names[b]) for b in summary["reset_batches"]]
    return _with_history(summary, runner)


def _forgotten_batches(run: UnlearningRun) -> list[int]:
    """Batch codes none of whose cells the model keeps (a whole donor or batch forgotten)."""
    if REGISTRY_KEYS.BATCH_KEY not in run.model.adata_manager.data_registry:
        return []
    codes = np.asarray(run.model.adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY))
    codes = codes.reshape(-1)
    kept = np.union1d(run.retain, run.validation).astype(np.int64)
    return sorted(set(codes[run.forget].tolist()) - set(codes[kept].tolist()))


def _keep_categories(data, model) -> None:
    """Give ``data``'s registered categorical columns the model's full category lists.

    A subset may lack a batch or label (e.g. a forgotten donor); with the original categories
    the retrained module keeps the original's shape and codes.
    """
    manager = model.adata_manager
    for key in (REGISTRY_KEYS.BATCH_KEY, REGISTRY_KEYS.LABELS_KEY):
        if key not in manager.data_registry:
            continue
        state = manager.get_state_registry(key)
        column = state.get("original_key")
        if column in data.obs and "categorical_mapping" in state:
            categories = pd.Index(state.categorical_mapping)
            data.obs[column] = pd.Categorical(data.obs[column], categories=categories)


def _retained_data(run: UnlearningRun):
    """A copy of the retained and validation cells only (the forget cells are not in it).

    Returns the AnnData and the positions in it of the retained (train) and validation cells.
    """
    model = run.model
    names = model.adata.obs_names
    pool = np.union1d(run.retain, run.validation).astype(np.int64)
    # Cells in obs-name order: the same cells give the same minibatches (and the same weights)
    # in whatever order an AnnData holds them, which a re-run from the record relies on.
    pool = pool[np.argsort(names[pool].to_numpy(dtype=str), kind="stable")]
    data = model.adata[pool].copy()  # scvi-tools registers into it: never the user's object
    _keep_categories(data, model)
    order = pd.Index(names[pool])
    train_pos = np.sort(order.get_indexer(names[run.retain]))
    val_pos = np.sort(order.get_indexer(names[run.validation]))
    return data, train_pos, val_pos


def _load_fresh(run: UnlearningRun, fitted) -> None:
    """Put a freshly trained model's weights and history into the run's model."""
    run.model.module.load_state_dict(fitted.module.state_dict())
    run.model.module.eval()
    run.model.history_ = fitted.history_
    run.model.trainer = getattr(fitted, "trainer", None)


def _run_retrain(run: UnlearningRun) -> dict[str, Any]:
    """Exact unlearning: the original recipe on the retained cells, loaded into the copy."""
    data, train_pos, val_pos = _retained_data(run)
    recipe = Recipe.from_model(run.model)
    split_kwargs = dict(recipe.train_kwargs.get("datasplitter_kwargs") or {})
    # Same cells as the original's training and validation sets, minus the forget cells.
    split_kwargs["external_indexing"] = [train_pos, val_pos, np.zeros(0, np.int64)]
    recipe.train_kwargs["datasplitter_kwargs"] = split_kwargs
    recipe.train_kwargs["max_epochs"] = run.max_epochs
    fitted = recipe.fit(
        data,
        model_cls=type(run.model),
        seed=run.seed,
        accelerator=run.accelerator,
        devices=run.devices,
        enable_progress_bar=run.enable_progress_bar,
    )
    _load_fresh(run, fitted)
    return {"epochs_run": int(run.max_epochs), "n_train": int(run.retain.size)}


def _run_retrain_fast(run: UnlearningRun) -> dict[str, Any]:
    """Exact unlearning on an adaptive budget: fresh weights, retained cells, one-cycle rounds.

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
    data, train_pos, val_pos = _retained_data(run)
    fresh = recipe.build(data, seed=run.seed, model_cls=type(run.model))
    warm = _warm_start(run, hp["init_from"], data, fresh) if hp["init_from"] else {}
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
            rounds.append({"epochs": int(runner.trainer.current_epoch), "utility_change": None})
            if len(rounds) >= run.replay_rounds:
                break
        else:
            change = None if target is None else held_out.of(fresh.module) / target - 1.0
            rounds.append({"epochs": int(runner.trainer.current_epoch), "utility_change": change})
            if change is None or change <= hp["utility_tolerance"] or len(rounds) >= max_rounds:
                break
        # The next round continues at the KL weight this one ended at.
        end_weight = last_kl_weight(plan)
        plan_kwargs.update(
            n_epochs_kl_warmup=None, n_steps_kl_warmup=None,
            max_kl_weight=end_weight, min_kl_weight=end_weight,
        )  # fmt: skip
    _load_fresh(run, fresh)
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


_EXACT_METHODS = ("retrain", "retrain_fast")


def cells_ever_seen(model) -> set[str] | None:
    """Names of every cell whose data reached ``model``'s weights, or None if unknown.

    Its training cells, plus the cells an approximate unlearning removed from it (their
    influence may remain; an exact method's forgotten cells never reached its new weights).
    """
    names = getattr(model, "train_obs_names_", None)
    if names is None:
        return None
    seen = set(names)
    provenance = getattr(model, "unlearning_provenance_", None) or {}
    approximate = [
        event
        for event in provenance.get("events", [])
        if event.get("method") not in _EXACT_METHODS
        and (event.get("metrics") or {}).get("accepted_method") not in _EXACT_METHODS
    ]
    if approximate and provenance.get("forgotten_obs_names") is None:
        return None  # an approximate removal of cells it does not name: unknown
    if approximate:
        seen.update(provenance["forgotten_obs_names"])
    return seen


def _warm_start(run: UnlearningRun, path: str, data, fresh) -> dict[str, Any]:
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


METHODS: dict[str, MethodSpec] = {
    "extragradient": MethodSpec(
        "extragradient",
        {
            **_TRAINING,
            **_SELECTION,
            **_GAME,
            **_BUDGET,
            "critic_lr": Param(kind="float", low=0, low_open=True, allow_none=True),
        },
        needs_nonmembers=True,
        default_max_epochs=20,
        run=_run_extragradient,
        description="extragradient co-training against forget-vs-non-member critics",
        plan=ExtraGradientUnlearningPlan,
    ),
    "extragradient_calibrated": MethodSpec(
        "extragradient_calibrated",
        {
            **_TRAINING,
            **_SELECTION,
            **_GAME,
            **_BUDGET,
            "critic_lr": Param(kind="float", low=0, low_open=True, allow_none=True),
            **_REFERENCES,
        },
        needs_nonmembers=True,
        default_max_epochs=20,
        run=_run_extragradient_calibrated,
        description="extragradient against critics that see each cell calibrated by its own "
        "OUT reference models (the LiRA statistic)",
        plan=ExtraGradientUnlearningPlan,
    ),
    "oracle_matching": MethodSpec(
        "oracle_matching",
        {
            **_TRAINING,
            **_BUDGET,
            **_REFERENCES,
            "retain_weight": Param(kind="float", low=0, doc="weight of the retain ELBO term"),
            "score_weight": Param(kind="float", low=0, doc="weight of the attacker-score term"),
            "forget_batch_size": Param(kind="int", low=1),
            "group_key": Param(
                None,
                "str",
                allow_none=True,
                doc="obs column whose groups the references leave out whole (donor requests)",
            ),
        },
        needs_nonmembers=False,
        default_max_epochs=10,
        run=_run_oracle_matching,
        description="match the forget cells' outputs to oracle targets from reference models "
        "that left them out (Georgiev et al. 2025)",
        plan=OracleMatchingPlan,
    ),
    "frozen_critic": MethodSpec(
        "frozen_critic",
        {**_TRAINING, **_SELECTION, **_GAME, **_BUDGET},
        needs_nonmembers=True,
        default_max_epochs=20,
        run=_run_frozen,
        description="VAE trained to fool pre-trained, frozen critics (failing baseline)",
        plan=FrozenCriticPlan,
    ),
    "fisher": MethodSpec(
        "fisher",
        {**_TRAINING, **_FISHER},
        needs_nonmembers=False,
        default_max_epochs=0,
        run=_run_fisher,
        description="Golatkar Fisher scrubbing (+ optional SSD and retain fine-tune)",
        plan=FisherScrubbingPlan,
    ),
    "ssd": MethodSpec(
        "ssd",
        {
            **_TRAINING,
            **{k: v for k, v in _FISHER.items() if k != "ssd"},
            # Method-level default: SSD dampens and adds no Golatkar noise unless asked.
            "alpha": Param(0.0, "float", low=0),
        },
        needs_nonmembers=False,
        default_max_epochs=0,
        run=lambda run: _run_fisher(_with(run, ssd=True)),
        description="Selective Synaptic Dampening (Foster et al. 2024)",
        plan=FisherScrubbingPlan,
    ),
    "finetune": MethodSpec(
        "finetune",
        dict(_TRAINING),
        needs_nonmembers=False,
        default_max_epochs=20,
        run=_run_finetune,
        description="retain-only fine-tune",
        plan=RetainFinetunePlan,
    ),
    "gradient_ascent": MethodSpec(
        "gradient_ascent",
        {
            **_TRAINING,
            "ascent_steps": Param(kind="int", low=0),
            "ascent_batch_size": Param(kind="int", low=1),
        },
        needs_nonmembers=False,
        default_max_epochs=20,
        run=_run_gradient_ascent,
        description="gradient ascent on the forget cells, then retain fine-tune",
        plan=GradientAscentPlan,
    ),
    "scrub": MethodSpec(
        "scrub",
        {
            **_TRAINING,
            "n_max_epochs": Param(kind="int", low=0),
            "alpha": Param(kind="float", low=0),
            "gamma": Param(kind="float", low=0),
            "forget_batch_size": Param(kind="int", low=1),
        },
        needs_nonmembers=False,
        default_max_epochs=20,
        run=_run_scrub,
        description="SCRUB teacher-student (Kurmanji et al. 2023)",
        plan=SCRUBPlan,
    ),
    "contrastive": MethodSpec(
        "contrastive",
        {
            **_TRAINING,
            "anchor_weight": Param(kind="float", low=0, doc="weight of the retained anchor"),
            "forget_batch_size": Param(kind="int", low=1),
        },
        needs_nonmembers=False,
        default_max_epochs=10,
        run=_run_contrastive,
        description="encoder only: forget posteriors to the prior, retained ones anchored "
        "(the original study's contrastive-latent method; it over-unlearned there)",
        plan=ContrastiveLatentPlan,
    ),
    "reset_relearn": MethodSpec(
        "reset_relearn",
        {
            **_TRAINING,
            "reset_fraction": Param(kind="float", low=0, high=1, doc="top share by saliency"),
            "random_fraction": Param(kind="float", low=0, high=1, doc="random share"),
            "eps": Param(kind="float", low=0, low_open=True),
            "n_saliency_cells": Param(1024, "int", low=1, doc="retained cells for saliency"),
            "relearn_budget": Param(
                0.15, "float", low=0, high=1, low_open=True, doc="share of the recipe's epochs"
            ),
        },
        needs_nonmembers=False,
        default_max_epochs=0,
        run=_run_reset_relearn,
        description="saliency-guided partial reset, then relearning on retained cells",
        plan=ResetRelearnPlan,
    ),
    "retrain_fast": MethodSpec(
        "retrain_fast",
        {
            "budget": Param(
                0.1,
                "float",
                low=0,
                high=1,
                low_open=True,
                doc="share of the recipe's epochs in each round",
            ),
            "peak_lr": Param(
                None, "float", low=0, low_open=True, allow_none=True, doc="default: 3x recipe lr"
            ),
            "pct_start": Param(kind="float", low=0, high=1, low_open=True, high_open=True),
            "early_stopping": Param(True, "bool", doc="on the retained validation ELBO"),
            "max_budget": Param(
                0.5,
                "float",
                low=0,
                high=1,
                low_open=True,
                doc="most epochs of all rounds together, a share of the recipe's",
            ),
            "utility_tolerance": Param(
                0.02,
                "float",
                low=0,
                doc="another round while the held-out neg. ELBO is this much worse than the "
                "trained model's",
            ),
            "batch_size": Param(128, "int", low=1, doc="used when the recipe names none"),
            "init_from": Param(
                None,
                "str",
                allow_none=True,
                doc="saved model that never saw the forget cells: warm start (checked)",
            ),
        },
        needs_nonmembers=False,
        default_max_epochs=0,
        run=_run_retrain_fast,
        description="exact: fresh weights on the retained cells, a reduced one-cycle budget",
        plan=FastRetrainPlan,
        exact=True,
    ),
    "auto": MethodSpec(
        "auto",
        {
            "budget": Param(
                AUTO_BUDGET,
                "float",
                low=0,
                high=1,
                low_open=True,
                doc="share of the recipe's epochs for the exact fallback",
            ),
            "candidates": Param(
                ",".join(AUTO_CANDIDATES), "str", doc="approximate methods to try, in order"
            ),
            "max_utility_loss": Param(
                0.05, "float", low=0, doc="largest held-out neg. ELBO increase accepted"
            ),
            "val_fraction": Param(
                0.3,
                "float",
                low=0,
                high=1,
                low_open=True,
                high_open=True,
                doc="share of forget cells and non-members used as development cells",
            ),
            "n_bootstrap": Param(200, "int", low=10, doc="bootstrap draws of the gate's audit"),
            "relearn_epochs": Param(
                3,
                "int",
                low=0,
                doc="epochs of retain fine-tuning before the gate's second audit (0: none)",
            ),
            **_REFERENCES,
        },
        needs_nonmembers=True,
        default_max_epochs=0,
        run=lambda run: run_auto(run, METHODS),
        description="audit-gated: the first approximate method that passes an audit on "
        "development cells and keeps utility, else the exact retrain_fast",
    ),
    "retrain": MethodSpec(
        "retrain",
        {},
        needs_nonmembers=False,
        default_max_epochs=0,
        run=_run_retrain,
        description="exact: the original recipe on retained cells",
        exact=True,
    ),
}


def _with(run: UnlearningRun, **hyperparameters: Any) -> UnlearningRun:
    run.hyperparameters = {**run.hyperparameters, **hyperparameters}
    return run
