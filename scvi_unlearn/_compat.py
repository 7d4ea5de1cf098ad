"""Every private scvi-tools API the package uses, in one place.

scvi-tools keeps some things this package needs outside its public API: the default number of
epochs, the KL warm-up schedule, the train / validation split sizes, a model's data loader over
chosen cells, the transfer of an AnnData's setup, the per-class stores of AnnData managers, and
a module's inference and generative inputs. Private names can move or change in any release, so
no other module of the package touches them: each is wrapped here, with the package's own name
and signature, and ``tests/test_architecture.py`` fails if any other module imports a private
scvi-tools module or name, or calls one of these private methods. When a release moves one, the
fix (a version-dependent branch) goes here only. The one difference of the stack below it that
the package meets, anndata 0.13 listing ``X`` among the layers, is handled here too.

Tested with scvi-tools 1.4.2 (Python 3.11, anndata 0.12) and 1.5.1 (Python 3.12, anndata
0.13): every private name below is the same in both (``tests/test_compat.py`` runs each wrapper
on a trained model).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import scvi

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from anndata import AnnData
    from scvi.data import AnnDataManager

#: scvi-tools releases (major.minor) the wrappers are tested on.
TESTED_SCVI_TOOLS = ("1.4", "1.5")
#: Name of scvi-tools' logger of model set-up and loading messages (a private module's name).
SCVI_BASE_MODEL_LOGGER = "scvi.model.base._base_model"


def _private(module: str, name: str) -> Any:
    """``module.name`` from scvi-tools, or an ImportError that names the tested releases.

    Imported on first use rather than at import time, so that a release that moved one name
    breaks only the feature that needs it, with a message that says so.
    """
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"scvi-tools {scvi.__version__} has no {module}.{name}, which scvi-unlearn uses "
            f"(tested with scvi-tools {', '.join(TESTED_SCVI_TOOLS)}); install one of those."
        ) from err


# -- training defaults ----------------------------------------------------------------------------
def max_epochs_heuristic(n_obs: int) -> int:
    """scvi-tools' default number of epochs for ``n_obs`` cells (what ``model.train`` uses).

    Parameters
    ----------
    n_obs
        Number of cells.
    """
    return int(_private("scvi.model._utils", "get_max_epochs_heuristic")(n_obs))


def compute_kl_weight(
    epoch: int,
    step: int,
    n_epochs_kl_warmup: int | None,
    n_steps_kl_warmup: int | None,
    max_kl_weight: float = 1.0,
    min_kl_weight: float = 0.0,
) -> float | torch.Tensor:
    """scvi-tools' KL warm-up weight at ``epoch`` and ``step`` (epoch warm-up wins).

    The schedule of :attr:`scvi.train.TrainingPlan.kl_weight`, evaluated at any epoch and step.

    Parameters
    ----------
    epoch, step
        Zero-based epoch and global step.
    n_epochs_kl_warmup, n_steps_kl_warmup
        The plan's warm-up lengths (``None``: no warm-up of that kind).
    max_kl_weight, min_kl_weight
        The weight's end and start.
    """
    fn = _private("scvi.train._trainingplans", "_compute_kl_weight")
    return fn(epoch, step, n_epochs_kl_warmup, n_steps_kl_warmup, max_kl_weight, min_kl_weight)


def validate_data_split(
    n_samples: int, train_size: float, validation_size: float | None = None
) -> tuple[int, ...]:
    """``(n_train, n_validation)``: how many cells scvi-tools' data splitter trains on.

    Parameters
    ----------
    n_samples
        Number of cells.
    train_size, validation_size
        As given to ``model.train``; scvi-tools also checks them.
    """
    fn = _private("scvi.dataloaders._data_splitting", "validate_data_split")
    return fn(n_samples, train_size, validation_size)


# -- data -----------------------------------------------------------------------------------------
def make_data_loader(
    model: scvi.model.base.BaseModelClass,
    adata: AnnData,
    indices: Sequence[int] | None = None,
    batch_size: int | None = None,
):
    """The model's data loader over ``indices`` of ``adata``, in order (no shuffling).

    Parameters
    ----------
    model
        A set-up scvi-tools model.
    adata
        An AnnData registered with the model (see ``validate_anndata``).
    indices
        Cell positions (default: all cells).
    batch_size
        Cells per batch (default: scvi-tools' ``settings.batch_size``).
    """
    return model._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)


def validate_anndata(model: scvi.model.base.BaseModelClass, adata: AnnData) -> AnnData:
    """``adata`` checked and registered with the model (its setup transferred if needed).

    Parameters
    ----------
    model
        A set-up scvi-tools model.
    adata
        An AnnData with the model's genes.
    """
    return model._validate_anndata(adata)


def named_layers(adata: AnnData) -> dict[str, Any]:
    """``adata``'s layers by name, without ``X``.

    anndata 0.13 lists ``X`` among the layers, under the key ``None``; passed back to
    ``AnnData(X=..., layers=...)`` it is refused (a backed ``X`` never compares identical) or
    stored twice. Earlier releases have no such key, so this is their ``dict(adata.layers)``.

    Parameters
    ----------
    adata
        Any AnnData (or a view of one).
    """
    return {key: adata.layers[key] for key in adata.layers if key is not None}


# -- AnnData managers -----------------------------------------------------------------------------
def instance_managers(model: scvi.model.base.BaseModelClass) -> list[AnnDataManager]:
    """The AnnData managers scvi-tools registered for this model instance.

    Parameters
    ----------
    model
        An scvi-tools model.
    """
    return list(type(model)._per_instance_manager_store.get(model.id, {}).values())


def register_manager(model: scvi.model.base.BaseModelClass, manager: AnnDataManager) -> None:
    """Register ``manager`` for ``model`` in scvi-tools' per-class, per-process stores.

    scvi-tools keeps AnnData managers per model class and per process; a copied or unpickled
    model (another class, another process) finds its data only once they are registered again.

    Parameters
    ----------
    model
        An scvi-tools model.
    manager
        An AnnData manager of the same setup.
    """
    type(model)._setup_adata_manager_store.setdefault(manager.adata_uuid, manager)
    model._register_manager_for_instance(manager)


def unregister_anndata(model: scvi.model.base.BaseModelClass, adata: AnnData) -> None:
    """Drop the manager scvi-tools registered for ``adata`` on this model instance.

    A temporary AnnData (the training data with canaries appended) would otherwise stay
    referenced by the model for as long as it lives.

    Parameters
    ----------
    model
        An scvi-tools model.
    adata
        An AnnData validated against it earlier.
    """
    uuid = adata.uns.get(_private("scvi.data._constants", "_SCVI_UUID_KEY"))
    type(model)._per_instance_manager_store.get(model.id, {}).pop(uuid, None)


# -- module inputs --------------------------------------------------------------------------------
def inference_inputs(module: torch.nn.Module, tensors: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``module.inference`` for a minibatch ``tensors``.

    Parameters
    ----------
    module
        An scvi-tools module (a ``VAE``).
    tensors
        A minibatch, keyed by scvi-tools' registry keys.
    """
    return module._get_inference_input(tensors)


def generative_inputs(
    module: torch.nn.Module, tensors: dict[str, Any], inference_outputs: dict[str, Any]
) -> dict[str, Any]:
    """The keyword arguments of ``module.generative`` given the inference outputs.

    Parameters
    ----------
    module
        An scvi-tools module (a ``VAE``).
    tensors
        A minibatch, keyed by scvi-tools' registry keys.
    inference_outputs
        What ``module.inference`` returned for it.
    """
    return module._get_generative_input(tensors, inference_outputs)


__all__ = [
    "SCVI_BASE_MODEL_LOGGER",
    "TESTED_SCVI_TOOLS",
    "compute_kl_weight",
    "generative_inputs",
    "inference_inputs",
    "instance_managers",
    "make_data_loader",
    "max_epochs_heuristic",
    "named_layers",
    "register_manager",
    "validate_anndata",
    "validate_data_split",
]
