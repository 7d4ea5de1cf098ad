"""``retrain``: exact unlearning, the original recipe on the retained cells.

It also holds what every retraining method shares: the retained cells as their own AnnData (the
forget cells are not in it) and loading a freshly trained model into the run's copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scvi import REGISTRY_KEYS

from scvi_unlearn._recipe import Recipe
from scvi_unlearn.train._epochs import RecipeShare
from scvi_unlearn.train._method import UnlearningMethod, UnlearningRun, register_method


@register_method
class Retrain(UnlearningMethod):
    """Exact unlearning: the original recipe, trained from scratch on the retained cells."""

    name = "retrain"
    description = "the original recipe on the retained cells"
    epochs = RecipeShare()
    exact = True

    def run(self, run: UnlearningRun) -> dict[str, Any]:
        """The recipe on the retained cells, loaded into the run's model."""
        data, train_pos, val_pos = retained_data(run)
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
        load_fresh(run, fitted)
        return {"epochs_run": int(run.max_epochs), "n_train": int(run.retain.size)}


def keep_categories(data, model) -> None:
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


def retained_data(run: UnlearningRun):
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
    keep_categories(data, model)
    order = pd.Index(names[pool])
    train_pos = np.sort(order.get_indexer(names[run.retain]))
    val_pos = np.sort(order.get_indexer(names[run.validation]))
    return data, train_pos, val_pos


def load_fresh(run: UnlearningRun, fitted) -> None:
    """Put a freshly trained model's weights and history into the run's model."""
    run.model.module.load_state_dict(fitted.module.state_dict())
    run.model.module.eval()
    run.model.history_ = fitted.history_
    run.model.trainer = getattr(fitted, "trainer", None)
