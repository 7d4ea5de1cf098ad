"""scVI with a recorded training recipe, safe loading, and unlearning."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import scvi

from scvi_unlearn._recipe import _jsonable
from scvi_unlearn.model._mixin import UnlearningMixin
from scvi_unlearn.model._safe_load import weights_only_loading

PROVENANCE_FILE = "unlearning_provenance.json"


class SCVI(UnlearningMixin, scvi.model.SCVI):
    """:class:`scvi.model.SCVI` that remembers how it was trained and can forget cells.

    It behaves exactly like ``scvi.model.SCVI`` (same module, same saved files, which plain
    scvi-tools can load again) and adds:

    - ``train_kwargs_``: the arguments of :meth:`train`, so shadow models and exact retraining
      can follow the same recipe;
    - :meth:`load` reads model files without executing arbitrary pickled code, including
      directories written by plain ``scvi.model.SCVI``;
    - :meth:`from_scvi` wraps an in-memory plain model;
    - :meth:`unlearn` (from :class:`~scvi_unlearn.model.UnlearningMixin`).
    """

    def train(self, max_epochs: int | None = None, **kwargs):
        """Train the model (see :meth:`scvi.model.SCVI.train`) and record the arguments."""
        if max_epochs is None:
            max_epochs = scvi.model.get_max_epochs_heuristic(self.adata.n_obs)
        result = super().train(max_epochs=max_epochs, **kwargs)
        recorded = {"max_epochs": int(max_epochs)}
        kwargs = _without_cell_choice(kwargs, len(self.train_indices), self.validation_indices)
        for key, value in kwargs.items():
            try:
                json.dumps(_jsonable(value))
            except TypeError:
                continue  # callbacks, loggers and other live objects are not part of a recipe
            recorded[key] = _jsonable(value)
        self.train_kwargs_ = recorded
        # Names survive re-ordering or subsetting of the AnnData later (positions do not).
        self.train_obs_names_ = self.adata.obs_names[np.asarray(self.train_indices)].tolist()
        return result

    @classmethod
    def load(cls, dir_path: str, adata=None, **kwargs):
        """Load a model saved by this class or by plain ``scvi.model.SCVI``.

        Model files are read with ``torch.load(weights_only=True)`` semantics (only plain data
        containers are unpickled). The unlearning provenance, if present, is restored.

        Raises
        ------
        FileNotFoundError
            If ``dir_path`` does not exist or holds no ``model.pt``.
        """
        prefix = kwargs.get("prefix") or ""
        if not os.path.isdir(dir_path):
            raise FileNotFoundError(f"Model directory not found: {dir_path!r}.")
        if not os.path.exists(os.path.join(dir_path, f"{prefix}model.pt")):
            raise FileNotFoundError(
                f"{dir_path!r} holds no '{prefix}model.pt'; is it a directory written by "
                "`model.save(...)`?"
            )
        with weights_only_loading():
            model = super().load(dir_path, adata=adata, **kwargs)
        provenance_path = os.path.join(dir_path, PROVENANCE_FILE)
        if os.path.exists(provenance_path):
            with open(provenance_path) as handle:
                model.unlearning_provenance_ = json.load(handle)
        return model

    def save(self, dir_path: str, overwrite: bool = False, **kwargs) -> None:
        """Save like :meth:`scvi.model.SCVI.save`, plus a readable provenance JSON file."""
        super().save(dir_path, overwrite=overwrite, **kwargs)
        provenance = getattr(self, "unlearning_provenance_", None)
        if provenance:
            with open(os.path.join(dir_path, PROVENANCE_FILE), "w") as handle:
                json.dump(_jsonable(provenance), handle, indent=2)

    @classmethod
    def from_scvi(cls, model: scvi.model.SCVI) -> SCVI:
        """Wrap an in-memory ``scvi.model.SCVI`` (shares its AnnData, copies its weights).

        The wrapped model is independent of the original: training or unlearning it never
        changes the original's parameters.
        """
        if isinstance(model, cls):
            return model
        import copy
        from uuid import uuid4

        new = cls.__new__(cls)
        # Share the AnnData and its managers; copy everything the new model may change.
        shared = {"adata", "adata_manager", "_adata", "_adata_manager", "module"}
        new.__dict__.update(
            {k: (v if k in shared else copy.deepcopy(v)) for k, v in model.__dict__.items()}
        )
        new.module = copy.deepcopy(model.module)
        new.id = str(uuid4())
        # scvi-tools keeps AnnData managers in per-class stores: register the original's
        # managers with this class so the wrapped model finds its data.
        for adata_id, manager in type(model)._per_instance_manager_store.get(model.id, {}).items():
            cls._setup_adata_manager_store.setdefault(adata_id, manager)
            new._register_manager_for_instance(manager)
        return new

    @property
    def provenance(self) -> dict[str, Any] | None:
        """The unlearning provenance record (``None`` for a model that forgot nothing)."""
        return getattr(self, "unlearning_provenance_", None)


def _without_cell_choice(kwargs: dict, n_train: int, validation_indices) -> dict:
    """Drop ``external_indexing`` (which cells, not how to train) from recorded arguments.

    A recipe replayed on other cells keeps the train / validation proportion instead.
    """
    splitter = dict(kwargs.get("datasplitter_kwargs") or {})
    if "external_indexing" not in splitter:
        return kwargs
    splitter.pop("external_indexing")
    kwargs = {k: v for k, v in kwargs.items() if k != "datasplitter_kwargs"}
    if splitter:
        kwargs["datasplitter_kwargs"] = splitter
    n_val = 0 if validation_indices is None else len(validation_indices)
    kwargs["train_size"] = 1.0 if n_val == 0 else round(n_train / (n_train + n_val), 4)
    return kwargs
