"""scVI with a recorded training recipe, safe loading, and unlearning."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np
import scvi

from scvi_unlearn._compat import max_epochs_heuristic
from scvi_unlearn._configurations import check_supported_model, check_supported_saved
from scvi_unlearn._io import read_h5ad_checked, read_json_checked
from scvi_unlearn._recipe import register_model_class
from scvi_unlearn._utils import to_jsonable
from scvi_unlearn.model._clone import clone_model
from scvi_unlearn.model._deletion_ready import cells_of_held_donors
from scvi_unlearn.model._matching import genes_in_model_order, match_rows_by_name
from scvi_unlearn.model._mixin import UnlearningMixin
from scvi_unlearn.model._safe_load import check_safe_model_file
from scvi_unlearn.train import train_dp
from scvi_unlearn.train._common import last_kl_weight
from scvi_unlearn.train._dp import load_privacy, save_privacy

if TYPE_CHECKING:
    from anndata import AnnData

PROVENANCE_FILE = "unlearning_provenance.json"


@register_model_class
class SCVI(UnlearningMixin, scvi.model.SCVI):
    """:class:`scvi.model.SCVI` that remembers how it was trained and can forget cells.

    It behaves exactly like ``scvi.model.SCVI`` (same module, same saved files, which plain
    scvi-tools can load again) and adds:

    - ``train_kwargs_``: the arguments of :meth:`train`, so shadow models and exact retraining
      can follow the same recipe;
    - :meth:`load` reads model files without executing arbitrary pickled code, including
      directories written by plain ``scvi.model.SCVI``;
    - :meth:`from_scvi` wraps an in-memory plain model;
    - :meth:`~scvi_unlearn.model.UnlearningMixin.unlearn` (from
      :class:`~scvi_unlearn.model.UnlearningMixin`).
    """

    def train(self, max_epochs: int | None = None, **kwargs):
        """Train the model (see :meth:`scvi.model.SCVI.train`) and record the arguments."""
        if max_epochs is None:
            max_epochs = max_epochs_heuristic(self.adata.n_obs)
        result = super().train(max_epochs=max_epochs, **kwargs)
        recorded = {"max_epochs": int(max_epochs)}
        kwargs = _without_cell_choice(kwargs, len(self.train_indices), self.validation_indices)
        for key, value in kwargs.items():
            try:
                json.dumps(to_jsonable(value))
            except TypeError:
                continue  # callbacks, loggers and other live objects are not part of a recipe
            recorded[key] = to_jsonable(value)
        self.train_kwargs_ = recorded
        self.final_kl_weight_ = last_kl_weight(self.trainer.lightning_module)
        # Names survive re-ordering or subsetting of the AnnData later (positions do not).
        self.train_obs_names_ = self.adata.obs_names[np.asarray(self.train_indices)].tolist()
        self.validation_obs_names_ = self.adata.obs_names[
            np.asarray(self.validation_indices, dtype=np.int64)
        ].tolist()
        return result

    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None, **kwargs):
        """Load a model saved by this class or by plain ``scvi.model.SCVI``.

        ``model.pt`` is copied into a private temporary folder and checked there first: it
        must unpickle with ``torch.load(weights_only=True)`` or with a restricted unpickler
        that resolves only the plain data containers scvi-tools writes. Only then does
        scvi-tools' own loader read that same private copy, so no pickled code can run and no
        global function is patched. The unlearning provenance, if present, is restored.

        An ``adata`` passed in is matched to the model by name: genes in another order are
        put in the model's order (a new AnnData; the one passed in is not modified), and the
        training and validation cells are found by obs name (recorded by this class, or read
        from the directory's ``adata.h5ad`` for a plain scvi-tools model), so a re-ordered or
        subset AnnData never shifts which cells count as trained. For a deletion-ready model,
        cells of donors it no longer holds (removed ones) are left out.

        Raises
        ------
        FileNotFoundError
            If ``dir_path`` does not exist or holds no ``model.pt``.
        RuntimeError
            If ``model.pt`` holds anything but plain data (the message names it).
        UnsupportedModelError
            If the directory holds another model class (SCANVI, TOTALVI, ...) or a
            configuration of :data:`~scvi_unlearn.model.REFUSED_CONFIGURATIONS`; raised before
            any data is read.
        ValueError
            If a file is empty, truncated or corrupt, or ``adata`` lacks genes of the model.
        """
        prefix = kwargs.get("prefix") or ""
        if not os.path.isdir(dir_path):
            raise FileNotFoundError(f"Model directory not found: {dir_path!r}.")
        model_file = os.path.join(dir_path, f"{prefix}model.pt")
        if not os.path.exists(model_file):
            raise FileNotFoundError(
                f"{dir_path!r} holds no '{prefix}model.pt'; is it a directory written by "
                "`model.save(...)`?"
            )
        saved_adata = os.path.join(dir_path, f"{prefix}adata.h5ad")
        given = adata is not None
        with tempfile.TemporaryDirectory(prefix="scvi_unlearn_load_") as private:
            # Check and load the same private copy: the file cannot change in between.
            copied = shutil.copy(model_file, os.path.join(private, f"{prefix}model.pt"))
            saved = check_safe_model_file(copied, shown_as=model_file)
            # Before any data is read: a SCANVI, TOTALVI, ... directory is refused by name.
            check_supported_saved(saved.get("attr_dict") or {}, dir_path)
            if not given and os.path.exists(saved_adata):
                adata = read_h5ad_checked(saved_adata)  # h5ad holds arrays, never pickles
            if given:
                adata = genes_in_model_order(adata, saved["var_names"])
                adata = cells_of_held_donors(adata, saved.get("attr_dict") or {})
            model = super().load(private, adata=adata, **kwargs)
        if given:
            match_rows_by_name(model, saved_adata)
        provenance_path = os.path.join(dir_path, PROVENANCE_FILE)
        if os.path.exists(provenance_path):
            model.unlearning_provenance_ = read_json_checked(provenance_path)
        load_privacy(model, dir_path)
        return model

    def save(self, dir_path: str, overwrite: bool = False, **kwargs) -> None:
        """Save like :meth:`scvi.model.SCVI.save`, plus readable provenance and privacy JSON."""
        super().save(dir_path, overwrite=overwrite, **kwargs)
        provenance = getattr(self, "unlearning_provenance_", None)
        if provenance:
            with open(os.path.join(dir_path, PROVENANCE_FILE), "w") as handle:
                json.dump(to_jsonable(provenance), handle, indent=2)
        save_privacy(self, dir_path)

    def train_private(self, **kwargs) -> dict[str, Any]:
        """Train with DP-SGD to a privacy budget; see :func:`scvi_unlearn.train.train_dp`.

        The model must be built without batch norm (``use_batch_norm="none",
        use_layer_norm="both"``). The spent ``(epsilon, delta)`` is kept in ``dp_privacy_``
        and saved with the model (``dp_privacy.json``).
        """
        return train_dp(self, **kwargs)

    @classmethod
    def from_scvi(cls, model: scvi.model.SCVI) -> SCVI:
        """Wrap an in-memory ``scvi.model.SCVI`` (shares its AnnData, copies its weights).

        The wrapped model is independent of the original: training or unlearning it never
        changes the original's parameters. See :func:`clone_model`.

        Raises
        ------
        UnsupportedModelError
            (a ``TypeError``) If ``model`` is not an ``scvi.model.SCVI`` (SCANVI, TOTALVI, ...)
            or is a configuration of :data:`~scvi_unlearn.model.REFUSED_CONFIGURATIONS`.
        """
        if isinstance(model, cls):
            return model
        check_supported_model(model)
        return clone_model(model, cls)

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
