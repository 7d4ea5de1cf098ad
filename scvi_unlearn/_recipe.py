"""A model's training recipe: how to train another scVI exactly like it.

Shadow models (membership inference) and exact retraining both need "the target's recipe":
the same setup arguments, architecture and training arguments, on other cells.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scvi
from scvi.train import TrainingPlan

from scvi_unlearn._compat import validate_data_split
from scvi_unlearn._utils import to_jsonable
from scvi_unlearn._validation import as_cell_indices

if TYPE_CHECKING:
    from anndata import AnnData

#: Model classes a recipe can train, by name; ``register_model_class`` fills it.
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
        ``register_model_class`` (``"SCVI"`` is :class:`scvi_unlearn.model.SCVI`) or one of
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

    def categorical_keys(self) -> list[str]:
        """The obs columns the recipe registers as categories (batch, labels, covariates)."""
        keys = [self.setup_kwargs.get(k) for k in ("batch_key", "labels_key")]
        keys += list(self.setup_kwargs.get("categorical_covariate_keys") or [])
        return [k for k in keys if k is not None]

    def subset_keeping_categories(self, adata: AnnData, cells) -> AnnData:
        """A copy of ``adata[cells]`` whose categorical setup columns keep every category.

        A model trained on a subset that lacks a rare batch or label (2 cells of a batch, a
        rare cell type with ``dispersion="gene-label"``) could not featurise the full data:
        scvi-tools refuses categories its registry never saw. With the full data's categories
        registered, the subset's model knows them all (the missing ones simply never train).
        """
        subset = adata[cells].copy()
        for key in self.categorical_keys():
            if key in adata.obs:
                categories = pd.Index(adata.obs[key].astype("category").cat.categories)
                subset.obs[key] = pd.Categorical(subset.obs[key], categories=categories)
        return subset

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
    """Best reconstruction of ``model.train`` arguments for a plain scvi-tools model.

    ``max_epochs`` comes from the length of the training history and ``train_size`` from the
    stored train / validation indices. While the model still holds the Lightning trainer of its
    fit (a model trained in this session), the training plan's settings (``lr``,
    ``weight_decay``, KL warm-up, ...) and the batch size are read from it; a model loaded from
    disk has lost them, and only an epoch KL warm-up can be read back, from the logged
    ``kl_weight`` history. Anything else takes scvi-tools' default.
    """
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
    trainer = getattr(model, "trainer", None)
    plan = getattr(trainer, "lightning_module", None)
    if plan is not None:
        plan_kwargs = _plan_settings(plan)
        loader = getattr(getattr(trainer, "datamodule", None), "data_loader_kwargs", None) or {}
        batch_size = loader.get("batch_size")
        if batch_size is not None and int(batch_size) != scvi.settings.batch_size:
            kwargs["batch_size"] = int(batch_size)
    else:
        plan_kwargs = _warmup_from_history(history)
    if plan_kwargs:
        kwargs["plan_kwargs"] = plan_kwargs
    return kwargs


def _plan_settings(plan) -> dict[str, Any]:
    """The arguments of a fitted scvi-tools ``TrainingPlan`` that differ from its defaults."""
    defaults = inspect.signature(TrainingPlan.__init__).parameters
    settings = {}
    for name in _PLAN_SETTINGS:
        value = getattr(plan, "optimizer_name" if name == "optimizer" else name, None)
        if name in defaults and value is not None and value != defaults[name].default:
            settings[name] = to_jsonable(value)
    return settings


#: Training-plan arguments a fitted plan keeps as attributes of the same name.
_PLAN_SETTINGS = (
    "optimizer", "lr", "weight_decay", "eps", "n_steps_kl_warmup", "n_epochs_kl_warmup",
    "reduce_lr_on_plateau", "lr_factor", "lr_patience", "lr_threshold", "lr_scheduler_metric",
    "lr_min", "max_kl_weight", "min_kl_weight",
)  # fmt: skip


def _warmup_from_history(history: dict) -> dict[str, Any]:
    """``n_epochs_kl_warmup`` read back from the logged KL weights, where they show it.

    scvi-tools' epoch warm-up sets the weight ``min(1, epoch / n_epochs_kl_warmup)`` (with the
    default maximum of 1): a logged weight ``w`` strictly between 0 and 1 at epoch ``e`` gives
    ``e / w``; a weight already at 1 on the first logged epoch ``e`` means a warm-up of at most
    ``e`` epochs (``e`` is used). Nothing is returned when the log agrees with the default.
    """
    logged = history.get("kl_weight")
    if logged is None or len(logged) == 0:
        return {}
    weights = np.asarray(logged.iloc[:, 0], dtype=float)
    epochs = np.asarray(logged.index, dtype=float)
    rising = (weights > 0) & (weights < 1)
    if rising.any():
        warmup = round(float(epochs[rising][-1] / weights[rising][-1]))
    elif weights[0] >= 1:
        warmup = int(epochs[0])
    else:
        return {}
    return {} if warmup == TRAINING_PLAN_DEFAULT_WARMUP else {"n_epochs_kl_warmup": warmup}


#: scvi-tools' default epoch KL warm-up.
TRAINING_PLAN_DEFAULT_WARMUP = 400
