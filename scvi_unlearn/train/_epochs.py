"""How long a method runs, and the fewest cells on which a method may judge itself."""

from __future__ import annotations

import math

from scvi.model._utils import get_max_epochs_heuristic

from scvi_unlearn._recipe import Recipe

#: Fewest forget and fewest non-member validation cells on which an approximate method may
#: select its epoch: below that an AUC's 95% interval spans most of [0, 1] (20 + 20 cells:
#: about +-0.18 at AUC 0.5), so the method runs its fixed budget instead.
MIN_SELECTION_CELLS = 20


def resolve_epochs(model, spec, method: str, max_epochs: int | None, hyperparameters: dict) -> int:
    """Epochs of the run.

    Given, else the recipe's (retrain), a share of them (a method with a ``budget`` or
    ``relearn_budget``) or the method's default.
    """
    if max_epochs is not None and "finetune_epochs" not in hyperparameters:
        return max_epochs
    if method == "retrain" or "budget" in hyperparameters or "relearn_budget" in hyperparameters:
        recorded = Recipe.from_model(model).train_kwargs.get("max_epochs")
        full = int(recorded or get_max_epochs_heuristic(len(model.train_indices)))
        share = hyperparameters.get("budget", hyperparameters.get("relearn_budget", 1.0))
        return max(1, math.ceil(share * full))
    if "finetune_epochs" in hyperparameters:
        ft = hyperparameters["finetune_epochs"]
        if max_epochs is not None and ft not in (0, max_epochs):
            raise ValueError(
                f"`max_epochs`={max_epochs} and `finetune_epochs`={ft} disagree; for "
                f"'{method}' they are the same thing, pass one."
            )
        return max_epochs if max_epochs is not None else ft
    return spec.default_max_epochs if max_epochs is None else max_epochs
