"""A model's training recipe: how to train another scVI exactly like it.

Shadow models (membership inference) and exact retraining both need "the target's recipe":
the same setup arguments, architecture and training arguments, on other cells.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scvi
from scvi.dataloaders._data_splitting import validate_data_split

from scvi_unlearn._utils import to_jsonable
from scvi_unlearn._validation import as_cell_indices

if TYPE_CHECKING:
    from anndata import AnnData

#: Model classes a recipe can train, by name; :func:`register_model_class` fills it.
MODEL_CLASSES: dict[str, type] = {}


def register_model_class(cls: type) -> type:
    """Class decorator: recipes naming ``cls.__name__`` train ``cls``.

    :class:`scvi_unlearn.model.SCVI` registers itself, so a recipe read from a plain
    ``scvi.model.SCVI`` trains models that can unlearn. The recipe never imports the model
    layer, which sits above it.
    """
    MODEL_CLASSES[cls.__name__] = cls
    return cls


def resolve_model_class(name: str) -> type:
    """The registered class called ``name``, else ``scvi.model.<name>``."""
    if name in MODEL_CLASSES:
        return MODEL_CLASSES[name]
    cls = getattr(scvi.model, name, None)
    if cls is None:
        raise ValueError(
            f"Unknown model class {name!r} in the recipe; registered: {sorted(MODEL_CLASSES)}."
        )
    return cls


# Arguments that steer the hardware or logging, not the statistical recipe.
_NON_RECIPE_TRAIN_KEYS = {
    "accelerator",
    "devices",
    "enable_progress_bar",
    "logger",
    "callbacks",
    "datamodule",
    "enable_checkpointing",
    "strategy",
    "trainer_config",
}


@dataclass
class Recipe:
    """Everything needed to train an scVI model like a given one.

    Parameters
    ----------
    setup_kwargs
        Arguments of ``SCVI.setup_anndata`` (``batch_key``, ``layer``, ...).
    model_kwargs
        Architecture arguments of the model constructor (``n_hidden``, ``n_latent``, ...).
    train_kwargs
        Arguments of ``model.train`` (``max_epochs``, ``batch_size``, ``train_size``,
        ``plan_kwargs``, ...).
    model_class
        Name of the model class to train: a class registered with
        :func:`register_model_class` (``"SCVI"`` is :class:`scvi_unlearn.model.SCVI`) or one of
        ``scvi.model``.

    Examples
    --------
    >>> r = Recipe(model_kwargs={"n_latent": 5}, train_kwargs={"max_epochs": 3})
    >>> r.train_kwargs["max_epochs"]
    3
    >>> r.fingerprint() == Recipe.from_dict(r.to_dict()).fingerprint()
    True
    """

    setup_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    train_kwargs: dict[str, Any] = field(default_factory=dict)
    model_class: str = "SCVI"

    @classmethod
    def from_model(cls, model, **train_overrides) -> Recipe:
        """Read the recipe of a trained (or set-up) scVI model.

        Training arguments are those recorded by :class:`scvi_unlearn.model.SCVI` when it was
        trained. For a plain ``scvi.model.SCVI`` they are reconstructed: ``max_epochs`` from the
        length of the training history, ``train_size`` from the stored train / validation
        indices; anything else takes scvi-tools' default. ``train_overrides`` replace fields.
        """
        registry = model.adata_manager.registry if model.adata is not None else model.registry_
        setup_kwargs = dict(registry.get("setup_args", {}))
        init = getattr(model, "init_params_", {}) or {}
        model_kwargs = dict(init.get("non_kwargs", {}))
        model_kwargs.update(init.get("kwargs", {}).get("kwargs", {}) or {})
        train_kwargs = dict(getattr(model, "train_kwargs_", None) or _infer_train_kwargs(model))
        train_kwargs = {k: v for k, v in train_kwargs.items() if k not in _NON_RECIPE_TRAIN_KEYS}
        splitter = train_kwargs.get("datasplitter_kwargs") or {}
        if "external_indexing" in splitter:
            raise ValueError(
                "The recorded training arguments fix which cells to train on "
                "(`external_indexing`); a recipe must not. Pass `datasplitter_kwargs` overrides."
            )
        train_kwargs.update(train_overrides)
        return cls(setup_kwargs, model_kwargs, train_kwargs, type(model).__name__)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def fingerprint(self) -> str:
        """A short hash of the recipe, used to key shadow-model caches."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def fit(
        self,
        adata: AnnData,
        seed: int = 0,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        enable_progress_bar: bool = True,
        model_cls: type | None = None,
        **trainer_kwargs,
    ):
        """Train a fresh model with this recipe on ``adata`` (which it registers).

        Parameters
        ----------
        adata
            The cells to train on; scvi-tools writes its registry columns into it, so pass a
            copy you own.
        seed
            Seed for ``scvi.settings.seed`` (weights, minibatches, train/validation split).
        accelerator, devices, enable_progress_bar, trainer_kwargs
            Passed to ``model.train``; they do not change the recipe.
        model_cls
            Class to instantiate; defaults to the recipe's ``model_class``.
        """
        model = self.build(adata, seed=seed, model_cls=model_cls)
        kwargs = _avoid_single_cell_batch({**self.train_kwargs, **trainer_kwargs}, adata.n_obs)
        model.train(
            accelerator=accelerator,
            devices=devices,
            enable_progress_bar=enable_progress_bar,
            **kwargs,
        )
        return model

    def build(self, adata: AnnData, seed: int = 0, model_cls: type | None = None):
        """An untrained model of this recipe, set up on ``adata`` (which it registers).

        The weights are initialised under ``scvi.settings.seed = seed``.
        """
        model_cls = model_cls or resolve_model_class(self.model_class)
        scvi.settings.seed = int(seed)
        model_cls.setup_anndata(adata, **self.setup_kwargs)
        return model_cls(adata, **self.model_kwargs)

    def fit_cells(
        self,
        adata: AnnData,
        train_idx,
        seed: int = 0,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        enable_progress_bar: bool = True,
        **trainer_kwargs,
    ):
        """Train on ``train_idx`` only, keeping every cell of ``adata`` in the model.

        Held-out cells stay in ``model.adata`` (as scvi-tools' test split), so audits and
        unlearning can refer to them; ``model.train_indices`` records exactly ``train_idx``.
        ``adata`` is copied, never modified. The model is of the recipe's ``model_class``.
        """
        model_cls = resolve_model_class(self.model_class)
        train_idx = as_cell_indices(adata, train_idx, "train_idx")
        rest = np.setdiff1d(np.arange(adata.n_obs), train_idx)
        adata = adata.copy()
        scvi.settings.seed = int(seed)
        model_cls.setup_anndata(adata, **self.setup_kwargs)
        model = model_cls(adata, **self.model_kwargs)
        kwargs = {k: v for k, v in self.train_kwargs.items() if k != "train_size"}
        splitter = dict(kwargs.pop("datasplitter_kwargs", None) or {})
        # scvi-tools wants every cell in a split: the others form its (unused) test set.
        splitter["external_indexing"] = [train_idx, np.array([], dtype=np.int64), rest]
        kwargs = _avoid_single_cell_batch(
            {**kwargs, **trainer_kwargs, "datasplitter_kwargs": splitter, "train_size": 1.0},
            train_idx.size,
        )
        kwargs.pop("train_size")
        model.train(
            accelerator=accelerator,
            devices=devices,
            enable_progress_bar=enable_progress_bar,
            **kwargs,
        )
        return model


def _avoid_single_cell_batch(train_kwargs: dict[str, Any], n_cells: int) -> dict[str, Any]:
    """Drop a last minibatch of one cell, which BatchNorm cannot train on.

    scVI fails with "Expected more than 1 value per channel" when the number of training cells
    is 1 modulo the batch size; shadow halves and retained sets hit this by chance.
    """
    batch_size = int(train_kwargs.get("batch_size") or scvi.settings.batch_size)
    train_size = train_kwargs.get("train_size")
    validation_size = train_kwargs.get("validation_size")
    n_train, _ = validate_data_split(n_cells, train_size or 0.9, validation_size)
    if n_train % batch_size != 1:
        return train_kwargs
    splitter = dict(train_kwargs.get("datasplitter_kwargs") or {})
    splitter["drop_last"] = True
    return {**train_kwargs, "datasplitter_kwargs": splitter}


def _infer_train_kwargs(model) -> dict[str, Any]:
    """Best reconstruction of ``model.train`` arguments for a plain scvi-tools model."""
    kwargs: dict[str, Any] = {}
    history = getattr(model, "history_", None) or {}
    if "elbo_train" in history:
        kwargs["max_epochs"] = len(history["elbo_train"])
    train_idx = getattr(model, "train_indices_", None)
    val_idx = getattr(model, "validation_indices_", None)
    if train_idx is not None:
        n_train = len(train_idx)
        n_val = 0 if val_idx is None else len(val_idx)
        kwargs["train_size"] = 1.0 if n_val == 0 else round(n_train / (n_train + n_val), 4)
    return kwargs
