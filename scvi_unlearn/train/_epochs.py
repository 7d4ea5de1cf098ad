"""How long a method runs (its epoch rule), and the fewest cells a method may judge itself on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from scvi_unlearn._compat import max_epochs_heuristic
from scvi_unlearn._recipe import Recipe

#: Fewest forget and fewest non-member validation cells on which an approximate method may
#: select its epoch: below that an AUC's 95% interval spans most of [0, 1] (20 + 20 cells:
#: about +-0.18 at AUC 0.5), so the method runs its fixed budget instead.
MIN_SELECTION_CELLS = 20


class EpochRule(Protocol):
    """How a method turns ``unlearn(max_epochs=...)`` and its hyper-parameters into epochs."""

    def resolve(self, model, max_epochs: int | None, hyperparameters: dict, method: str) -> int:
        """Epochs of the run."""

    def describe(self) -> str:
        """A few words for the method table."""


@dataclass(frozen=True)
class FixedEpochs:
    """``max_epochs`` if given, else ``default``."""

    default: int

    def resolve(self, model, max_epochs: int | None, hyperparameters: dict, method: str) -> int:
        """Epochs of the run."""
        return self.default if max_epochs is None else max_epochs

    def describe(self) -> str:
        """A few words for the method table."""
        return f"{self.default}" if self.default else "none"


@dataclass(frozen=True)
class RecipeShare:
    """``max_epochs`` if given, else a share of the recipe's epochs.

    The share is the hyper-parameter ``share_param`` (``None``: the whole recipe).
    """

    share_param: str | None = None

    def resolve(self, model, max_epochs: int | None, hyperparameters: dict, method: str) -> int:
        """Epochs of the run."""
        if max_epochs is not None:
            return max_epochs
        share = 1.0 if self.share_param is None else hyperparameters[self.share_param]
        return max(1, math.ceil(share * recipe_epochs(model)))

    def describe(self) -> str:
        """A few words for the method table."""
        if self.share_param is None:
            return "the recipe's"
        return f"``{self.share_param}`` x the recipe's"


@dataclass(frozen=True)
class FineTuneEpochs:
    """The fine-tune epochs: ``max_epochs`` and the hyper-parameter ``param`` are one setting."""

    param: str = "finetune_epochs"

    def resolve(self, model, max_epochs: int | None, hyperparameters: dict, method: str) -> int:
        """Epochs of the run; an error if both are given and disagree."""
        tune = hyperparameters[self.param]
        if max_epochs is not None and tune not in (0, max_epochs):
            raise ValueError(
                f"`max_epochs`={max_epochs} and `{self.param}`={tune} disagree; for "
                f"'{method}' they are the same thing, pass one."
            )
        return max_epochs if max_epochs is not None else tune

    def describe(self) -> str:
        """A few words for the method table."""
        return f"``{self.param}`` (default 0)"


def recipe_epochs(model: Any) -> int:
    """The epochs the model was trained for (recorded), else scvi-tools' heuristic."""
    recorded = Recipe.from_model(model).train_kwargs.get("max_epochs")
    return int(recorded or max_epochs_heuristic(len(model.train_indices)))
