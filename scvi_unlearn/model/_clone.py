"""One way to copy a trained model: everything but the AnnData, and the recipe pinned."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING
from uuid import uuid4

from anndata import AnnData
from scvi.data import AnnDataManager

from scvi_unlearn._compat import instance_managers, register_manager
from scvi_unlearn._recipe import Recipe
from scvi_unlearn.train._common import last_kl_weight

if TYPE_CHECKING:
    import scvi


def clone_model(model: scvi.model.SCVI, cls: type | None = None) -> scvi.model.SCVI:
    """An independent copy of a trained model that shares only the AnnData and its managers.

    The module, history, training arguments and provenance are deep copies, so training the
    copy never changes ``model``. The Lightning ``trainer`` is not copied: it belongs to the
    original's last fit. The copy's recipe is pinned: a plain scvi-tools model's training
    arguments are inferred once, here, from its own history, so that later runs on the copy
    (whose history then holds unlearning epochs) still replay the original recipe.

    Parameters
    ----------
    model
        A plain ``scvi.model.SCVI`` or a :class:`~scvi_unlearn.model.SCVI`.
    cls
        Class of the copy (default: the model's own);
        :meth:`scvi_unlearn.model.SCVI.from_scvi` passes
        :class:`~scvi_unlearn.model.SCVI` to turn a plain model into one that can unlearn.
    """
    cls = cls or type(model)
    new = cls.__new__(cls)
    for key, value in model.__dict__.items():
        if key in ("module", "trainer"):
            continue
        shared = isinstance(value, AnnData | AnnDataManager)
        new.__dict__[key] = value if shared else copy.deepcopy(value)
    new.module = copy.deepcopy(model.module)
    new.id = str(uuid4())
    if getattr(model, "is_trained_", False) and getattr(model, "train_kwargs_", None) is None:
        new.train_kwargs_ = Recipe.from_model(model).train_kwargs
    plan = getattr(getattr(model, "trainer", None), "lightning_module", None)
    if getattr(model, "final_kl_weight_", None) is None and plan is not None:
        # The plan of the model's own fit knows its last KL weight exactly.
        new.final_kl_weight_ = last_kl_weight(plan)
    # scvi-tools keeps AnnData managers in per-class stores: register the original's managers
    # with the copy's class so the copy finds its data.
    for manager in instance_managers(model):
        register_manager(new, manager)
    return new
