"""The scVI configurations the package is checked on, and the ones it refuses.

One registry serves the configuration test (each entry is loaded from a lab's model directory,
audited, unlearned by every method, saved and loaded), the documentation's table and the
checks that refuse everything else, so the three cannot drift apart. The checks run where a
model enters the package, before any work: :meth:`scvi_unlearn.model.SCVI.load` and
:meth:`~scvi_unlearn.model.SCVI.from_scvi`, ``unlearn()``,
:class:`~scvi_unlearn.MembershipInference`, :func:`~scvi_unlearn.attack_features` and the
command line (which loads through ``SCVI.load``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scvi
import scvi.external
from scvi.module import VAE

from scvi_unlearn._recipe import MODEL_CLASSES
from scvi_unlearn._utils import to_jsonable
from scvi_unlearn.data import synthetic_pbmc

if TYPE_CHECKING:
    from anndata import AnnData

    from scvi_unlearn._recipe import Recipe


@dataclass(frozen=True)
class Configuration:
    """One way a lab sets up and builds ``scvi.model.SCVI``.

    Parameters
    ----------
    name
        Short name.
    setup_kwargs
        Arguments of ``SCVI.setup_anndata`` (obs columns of :func:`example_adata`).
    model_kwargs
        Arguments of the ``SCVI`` constructor.
    description
        What a lab would call it.
    """

    name: str
    setup_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_BATCH = {"batch_key": "batch"}
_LABELS = {"labels_key": "cell_type"}
_COVARIATES = {
    "batch_key": "batch",
    "categorical_covariate_keys": ["site"],
    "continuous_covariate_keys": ["pct_mito"],
}
_LIKELIHOODS = {"zinb": "ZINB", "nb": "negative binomial", "poisson": "Poisson"}
#: Each dispersion with the set-up it needs (a batch or label key) and what it means.
_DISPERSIONS = {
    "gene": ({}, "gene dispersion"),
    "gene-batch": (_BATCH, "a dispersion per gene and batch"),
    "gene-label": (_LABELS, "a dispersion per gene and label"),
    "gene-cell": ({}, "a dispersion per gene and cell"),
}


_SCVI_DEFAULTS = {"gene_likelihood": "zinb", "dispersion": "gene"}


def _likelihood_dispersion_grid() -> list[Configuration]:
    """Every count likelihood with every dispersion (a Poisson ignores its dispersion)."""
    grid = []
    for likelihood, likelihood_text in _LIKELIHOODS.items():
        for dispersion, (setup, dispersion_text) in _DISPERSIONS.items():
            if (likelihood, dispersion) == ("zinb", "gene"):
                name = "default"
                text = "scvi-tools' defaults (ZINB, gene dispersion)"
            elif dispersion == "gene":
                name, text = likelihood, likelihood_text
            else:
                name = dispersion if likelihood == "zinb" else f"{likelihood}-{dispersion}"
                text = f"{likelihood_text}, {dispersion_text}"
            model_kwargs = {"gene_likelihood": likelihood, "dispersion": dispersion}
            model_kwargs = {
                k: v for k, v in model_kwargs.items() if (k, v) not in _SCVI_DEFAULTS.items()
            }
            grid.append(Configuration(name, dict(setup), model_kwargs, text))
    return grid


#: Configurations that go through loading from a lab's directory, the audit, every unlearning
#: method, save and load (``tests/model/test_configurations.py``).
SUPPORTED_CONFIGURATIONS: dict[str, Configuration] = {
    c.name: c
    for c in (
        *_likelihood_dispersion_grid(),
        Configuration(
            "normal",
            model_kwargs={"gene_likelihood": "normal"},
            description="a normal likelihood (on counts)",
        ),
        Configuration("batch", _BATCH, description="a batch key"),
        Configuration("labels", _LABELS, description="a labels key"),
        Configuration(
            "covariates", _COVARIATES, description="categorical and continuous covariates"
        ),
        Configuration(
            "encode-covariates",
            _COVARIATES,
            {"encode_covariates": True},
            "covariates fed to the encoder too",
        ),
        Configuration(
            "shallow-covariates",
            _COVARIATES,
            {"deeply_inject_covariates": False, "n_layers": 2},
            "covariates injected into the first layer only, 2 layers",
        ),
        Configuration(
            "two-layers",
            _COVARIATES,
            {"deeply_inject_covariates": True, "n_layers": 2},
            "covariates injected into every layer, 2 layers",
        ),
        Configuration(
            "batch-embedding",
            _BATCH,
            {"batch_representation": "embedding"},
            "a learned batch embedding instead of one-hot batches",
        ),
        Configuration(
            "layer-norm",
            model_kwargs={"use_layer_norm": "both", "use_batch_norm": "none"},
            description="layer norm instead of batch norm",
        ),
        Configuration(
            "encoder-batch-norm",
            model_kwargs={"use_batch_norm": "encoder", "use_layer_norm": "decoder"},
            description="batch norm in the encoder, layer norm in the decoder",
        ),
        Configuration(
            "no-norm",
            model_kwargs={"use_batch_norm": "none"},
            description="no batch or layer norm",
        ),
        Configuration(
            "rare-batch",
            {"batch_key": "rare_batch"},
            description="a batch of 2 cells (missing from some shadow and reference models)",
        ),
        Configuration(
            "rare-label",
            {"labels_key": "rare_label"},
            {"dispersion": "gene-label"},
            "a label of 2 cells with a dispersion per label",
        ),
        Configuration("layer", {"layer": "counts"}, description="counts in a layer, not `X`"),
        Configuration(
            "size-factor",
            {"size_factor_key": "size_factor"},
            description="a given size factor instead of the library size",
        ),
        Configuration(
            "ln", model_kwargs={"latent_distribution": "ln"}, description="logistic-normal latent"
        ),
        Configuration(
            "no-observed-library",
            model_kwargs={"use_observed_lib_size": False},
            description="a learned library size (features use its posterior mean)",
        ),
        Configuration(
            "no-log-input",
            model_kwargs={"log_variational": False},
            description="counts fed to the encoder without `log1p`",
        ),
        Configuration(
            "everything",
            _COVARIATES,
            {
                "gene_likelihood": "poisson",
                "latent_distribution": "ln",
                "use_observed_lib_size": False,
                "encode_covariates": True,
                "n_layers": 2,
            },
            "Poisson, logistic-normal, learned library, covariates in the encoder, 2 layers",
        ),
    )
}

_ONLY_SCVI = (
    "the audit's features and every unlearning method reproduce scVI's own loss, and shadow, "
    "reference and retrained models are trained as `scvi.model.SCVI`"
)

#: What is refused up front, and why; each error message quotes its entry, and each entry has
#: a test that checks the message.
REFUSED_CONFIGURATIONS: dict[str, str] = {
    "minified AnnData": "its counts are gone; unlearning retrains on counts, so load the model "
    "with the full AnnData",
    "normalised or log-transformed values": "scVI models raw counts; pass the count matrix",
    "SCANVI": "SCANVI adds a label classifier and a label-dependent prior to scVI's loss, "
    f"while {_ONLY_SCVI}. Audit and unlearn the SCVI model the SCANVI was initialised from "
    "(`SCANVI.from_scvi_model`), or train an `scvi.model.SCVI` with the same `setup_anndata` "
    "arguments, then build the SCANVI from it again",
    "TOTALVI": "TOTALVI models RNA and protein counts jointly, while "
    f"{_ONLY_SCVI}. Train an `scvi.model.SCVI` on the RNA counts",
    "other scvi-tools models": f"{_ONLY_SCVI}. Train an `scvi.model.SCVI` on the same counts",
    "a subclass of SCVI, by its class name": "shadow, reference and retrained models are "
    "built from the class name, and the package cannot build this class. Load (or build) the "
    "model with its own class and wrap it with `scvi_unlearn.model.SCVI.from_scvi(model)`",
    "model arguments that are Python objects": "shadow models, retraining and `verify` rebuild "
    "the model from its recorded arguments, which must be plain data (they are saved as JSON, "
    "and a model file that holds code is refused). Train the model with plain arguments (e.g. "
    "scvi-tools' default `var_activation` and activation functions)",
}


class UnsupportedModelError(TypeError, ValueError):
    """A model class or configuration the package refuses.

    See :data:`~scvi_unlearn.model.REFUSED_CONFIGURATIONS`.

    Both a ``TypeError`` (the wrong kind of model) and a ``ValueError`` (a saved directory with
    the wrong content), so either ``except`` catches it.
    """


def _refusal(subject: str, key: str) -> str:
    return f"{subject} not supported: {REFUSED_CONFIGURATIONS[key]}."


def _class_refusal(name: str, where: str = "") -> str:
    key = name if name in ("SCANVI", "TOTALVI") else "other scvi-tools models"
    return _refusal(f"{name} models{where} are", key)


def check_supported_class_name(name: str, where: str = "") -> None:
    """Raise :class:`UnsupportedModelError` unless ``name`` is a model class the package trains.

    ``"SCVI"`` and the classes registered with ``scvi_unlearn._recipe.register_model_class``
    that subclass ``scvi.model.SCVI`` pass.

    Parameters
    ----------
    name
        A model class name (a saved registry's ``model_name`` or a recipe's ``model_class``).
    where
        Where the name was read, for the message (e.g. ``" (saved in 'lab_model/')"``).
    """
    cls = MODEL_CLASSES.get(name) or (scvi.model.SCVI if name == "SCVI" else None)
    if cls is not None and issubclass(cls, scvi.model.SCVI):
        return
    if name in _scvi_tools_class_names():
        raise UnsupportedModelError(_class_refusal(name, where))
    raise UnsupportedModelError(
        _refusal(f"Models of class {name!r}{where} are", "a subclass of SCVI, by its class name")
    )


def _scvi_tools_class_names() -> set[str]:
    """The model classes scvi-tools exports (``scvi.model`` and ``scvi.external``)."""
    names = set(getattr(scvi.model, "__all__", ()))
    return names | set(getattr(scvi.external, "__all__", ())) | {"SCANVI", "TOTALVI"}


def check_supported_model(model) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is an scVI the package can handle.

    The entrance check of every public path that takes a model: it must be an instance of
    ``scvi.model.SCVI`` (or a subclass) with scVI's ``VAE`` module, and its constructor
    arguments must be plain data. Cheap: no data is read.
    """
    name = type(model).__name__
    if not isinstance(model, scvi.model.SCVI):
        raise UnsupportedModelError(_class_refusal(name))
    module = getattr(model, "module", None)
    if module is not None and not isinstance(module, VAE):
        raise UnsupportedModelError(
            _refusal(
                f"{name} models with a {type(module).__name__} module are",
                "other scvi-tools models",
            )
        )
    check_plain_arguments(getattr(model, "init_params_", None))


def check_supported_saved(attr_dict: dict, path: str) -> None:
    """Raise :class:`UnsupportedModelError` unless a saved ``model.pt`` holds a supported scVI.

    Parameters
    ----------
    attr_dict
        The ``attr_dict`` of the saved file (its registry names the class that saved it).
    path
        The model directory, for the message.
    """
    registry = attr_dict.get("registry_") or {}
    name = registry.get("model_name")
    if name is not None:
        check_supported_class_name(name, f" (the class that saved {path!r})")
    check_plain_arguments(attr_dict.get("init_params_"))


def check_supported_recipe(recipe: Recipe) -> None:
    """Raise :class:`UnsupportedModelError` unless ``recipe`` trains a supported scVI."""
    check_supported_class_name(recipe.model_class, " (the recipe's `model_class`)")
    check_plain_arguments({"non_kwargs": recipe.model_kwargs, "setup": recipe.setup_kwargs})


def check_plain_arguments(init_params: dict | None) -> None:
    """Raise :class:`UnsupportedModelError` if a model's recorded arguments hold Python objects.

    ``init_params`` is scvi-tools' ``init_params_`` (``{"non_kwargs": ..., "kwargs": ...}``).
    """
    for name, value in _flat_arguments(init_params or {}):
        found = _first_object(name, value)
        if found is not None:
            where, obj = found
            raise UnsupportedModelError(
                _refusal(
                    f"Model arguments that are Python objects (`{where}={obj!r}`) are",
                    "model arguments that are Python objects",
                )
            )


def _first_object(name: str, value) -> tuple[str, Any] | None:
    """``(where, object)`` of the first value inside ``value`` that is not plain data."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _first_object(f"{name}[{key!r}]", item)
            if found is not None:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _first_object(f"{name}[{i}]", item)
            if found is not None:
                return found
        return None
    try:
        json.dumps(to_jsonable(value))
    except (TypeError, ValueError):
        return name, value
    return None


def _flat_arguments(init_params: dict):
    """``(name, value)`` of every argument in scvi-tools' nested ``init_params_``."""
    for group in init_params.values():
        if not isinstance(group, dict):
            continue
        for name, value in group.items():
            if name == "kwargs" and isinstance(value, dict):  # SCVI(**kwargs), one level down
                yield from value.items()
            else:
                yield name, value


def example_adata(n_cells: int = 160, seed: int = 0) -> AnnData:
    """Synthetic counts with every obs column and layer the configurations name.

    :func:`scvi_unlearn.data.synthetic_pbmc` plus ``batch`` (its donors), ``site`` (a random
    category), ``pct_mito`` (a random number), ``size_factor`` (library size / 100),
    ``rare_batch`` and ``rare_label`` (two cells in a level of their own) and a ``counts``
    layer.
    """
    adata = synthetic_pbmc(n_cells=n_cells, n_genes=40, seed=seed)
    rng = np.random.default_rng(seed)
    adata.layers["counts"] = adata.X.copy()
    adata.obs["batch"] = adata.obs["donor"].astype(str)
    adata.obs["site"] = rng.choice(["site_a", "site_b"], adata.n_obs)
    adata.obs["pct_mito"] = rng.uniform(0, 10, adata.n_obs)
    adata.obs["size_factor"] = np.asarray(adata.X.sum(1), dtype=np.float64).ravel() / 100.0
    for column, source in (("rare_batch", None), ("rare_label", "cell_type")):
        values = np.full(adata.n_obs, "common", dtype=object)
        if source is not None:
            values = adata.obs[source].astype(str).to_numpy(dtype=object)
        values[[3, 7]] = "rare"
        adata.obs[column] = values
    return adata


def configurations_table() -> str:
    """The registries as a Markdown table (the documentation includes it)."""
    lines = ["| configuration | set up with | status |", "|---|---|---|"]
    for c in SUPPORTED_CONFIGURATIONS.values():
        args = {**c.setup_kwargs, **c.model_kwargs}
        shown = ", ".join(f"`{k}={v!r}`" for k, v in args.items()) or "defaults"
        lines.append(f"| {c.description} | {shown} | supported |")
    for name, why in REFUSED_CONFIGURATIONS.items():
        lines.append(f"| {name} | | refused: {why} |")
    return "\n".join(lines) + "\n"
