"""Every scVI configuration a lab brings works end to end, or is refused before any work.

The matrix is :data:`scvi_unlearn.model.SUPPORTED_CONFIGURATIONS` (gene likelihood x dispersion,
latent distribution, library size, batch / labels / covariates, encoder covariates, covariate
injection, norms, layers, batch embedding, size factors, ...). Each configuration trains one
tiny plain ``scvi.model.SCVI`` with scvi-tools itself, saved as a lab saves it; the package then
loads that directory, unlearns with ``retrain_fast``, audits, and (slow part) runs every
unlearning method. Other model classes (SCANVI, TOTALVI, a lab's own subclass) and arguments
that are Python objects are refused with a message that names them and says what to do,
quoting :data:`~scvi_unlearn.model.REFUSED_CONFIGURATIONS`.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scvi
import torch

import scvi_unlearn as su
from scvi_unlearn import cli
from scvi_unlearn._configurations import configurations_table
from scvi_unlearn.model import (
    REFUSED_CONFIGURATIONS,
    SUPPORTED_CONFIGURATIONS,
    UnsupportedModelError,
)
from scvi_unlearn.model import _scvi as scvi_module

EPOCHS = 2
#: Every method but the two that run full schedules (``auto`` and ``retrain`` train whole
#: models; ``retrain_fast`` stands for them here).
MATRIX_METHODS = [m for m in su.train.any_model_methods() if m not in ("auto", "retrain")]
QUIET = {"accelerator": "cpu", "enable_progress_bar": False}


def _train(cls, adata, setup=None, model_kwargs=None, **build):
    """A model of scvi-tools' ``cls`` trained as a lab would (default 90/10 split)."""
    cls.setup_anndata(adata, **(setup or {}))
    scvi.settings.seed = 0
    model = cls(adata, n_latent=3, **{"n_hidden": 16, **build}, **(model_kwargs or {}))
    model.train(max_epochs=EPOCHS, batch_size=64, **QUIET)
    return model


def _save(model, folder):
    model.save(str(folder), save_anndata=True)
    return folder


@pytest.fixture(scope="module", params=list(SUPPORTED_CONFIGURATIONS))
def lab_model(request, tmp_path_factory):
    """(configuration, plain scvi-tools model, its saved directory), one per configuration."""
    config = SUPPORTED_CONFIGURATIONS[request.param]
    plain = _train(
        scvi.model.SCVI, su.model.example_adata(), config.setup_kwargs, config.model_kwargs
    )
    path = _save(plain, tmp_path_factory.mktemp(config.name) / "model")
    return config, plain, path


def _assert_recipe_has(model, config):
    """The configuration survived: the recipe that shadows and retraining follow carries it."""
    recipe = su.Recipe.from_model(model)
    assert recipe.model_class == "SCVI"
    for key, value in config.model_kwargs.items():
        assert recipe.model_kwargs[key] == value, key
    for key, value in config.setup_kwargs.items():
        assert recipe.setup_kwargs[key] == value, key


# -- supported: the whole path ----------------------------------------------------------------
def test_a_lab_model_directory_loads_unlearns_and_audits(lab_model):
    config, plain, path = lab_model
    model = su.model.SCVI.load(str(path))
    _assert_recipe_has(model, config)
    for key, value in plain.module.state_dict().items():
        assert torch.equal(model.module.state_dict()[key].cpu(), value.cpu()), key
    train, val = np.asarray(model.train_indices), np.asarray(model.validation_indices)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two epochs may cost utility; not the point here
        out = model.unlearn(train[:5], method="retrain_fast", **QUIET)
    event = out.provenance["events"][-1]
    assert event["method"] == "retrain_fast" and event["n_forgotten"] == 5
    assert len(out.train_indices) == len(train) - 5
    assert out.adata.n_obs == model.adata.n_obs - 5
    _assert_recipe_has(out, config)

    features = su.attack_features(model)
    assert np.isfinite(features.to_numpy()).all()
    mi = su.MembershipInference(
        model.adata, recipe=model, n_shadows=2, cache_dir=False, accelerator="cpu", max_epochs=1
    ).fit(progress_bar=False)
    assert mi.recipe.model_kwargs.items() >= config.model_kwargs.items()
    report = mi.audit(model, members=train[:20], nonmembers=val[:15], n_bootstrap=50)
    assert report.results and all(np.isfinite(r.auc) for r in report.results.values())


@pytest.mark.slow
def test_every_method_on_every_configuration_saves_and_loads(lab_model, tmp_path):
    config, plain, _ = lab_model
    model = su.model.SCVI.from_scvi(plain)
    train, val = np.asarray(model.train_indices), np.asarray(model.validation_indices)
    for method in MATRIX_METHODS:
        epochs = {} if method == "retrain_fast" else {"max_epochs": 1}
        if "epsilon" in su.train.METHODS[method].params:  # a loose certificate, usable weights
            epochs["epsilon"] = 1e12
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one epoch may cost utility; not the point here
            out = model.unlearn(
                train[:5], method=method, nonmembers=val[:10], damage_limit=None,
                **QUIET, **epochs,
            )  # fmt: skip
        out.save(str(tmp_path / method), save_anndata=True)
        back = su.model.SCVI.load(str(tmp_path / method))
        assert back.provenance["events"][-1]["method"] == method, (config.name, method)
        assert len(back.train_indices) == len(train) - 5, (config.name, method)
        _assert_recipe_has(back, config)


@pytest.fixture(scope="module")
def poisson_dir(tmp_path_factory):
    config = SUPPORTED_CONFIGURATIONS["poisson-gene-batch"]
    plain = _train(
        scvi.model.SCVI, su.model.example_adata(), config.setup_kwargs, config.model_kwargs
    )
    return _save(plain, tmp_path_factory.mktemp("poisson") / "model")


def test_the_cli_audits_and_unlearns_a_poisson_lab_model(poisson_dir, tmp_path, capsys):
    data = str(poisson_dir / "adata.h5ad")
    code = cli.main(["audit", str(poisson_dir), data, "--n-shadows", "2", "--shadow-epochs",
                     "1", "--cache-dir", str(tmp_path / "cache"), "--accelerator", "cpu",
                     "--out", str(tmp_path / "audit")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    report = json.loads((tmp_path / "audit" / "audit_report.json").read_text())
    assert report["metadata"]["recipe"]["model_kwargs"]["gene_likelihood"] == "poisson"
    assert (tmp_path / "audit" / "audit_roc.png").stat().st_size > 0
    code = cli.main(["unlearn", str(poisson_dir), data, "--forget", "random:3",
                     "--accelerator", "cpu", "--out", str(tmp_path / "forgot")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    back = su.model.SCVI.load(str(tmp_path / "forgot"))
    assert back.module.gene_likelihood == "poisson"
    assert back.provenance["events"][-1]["n_forgotten"] == 3


def test_the_docs_table_lists_every_configuration():
    table = configurations_table()
    for config in SUPPORTED_CONFIGURATIONS.values():
        assert f"| {config.description} |" in table
    for name, why in REFUSED_CONFIGURATIONS.items():
        assert f"| {name} | | refused: {why} |" in table
    # the grid covers every count likelihood with every dispersion
    pairs = {
        (c.model_kwargs.get("gene_likelihood", "zinb"), c.model_kwargs.get("dispersion", "gene"))
        for c in SUPPORTED_CONFIGURATIONS.values()
    }
    for likelihood in ("zinb", "nb", "poisson"):
        for dispersion in ("gene", "gene-batch", "gene-label", "gene-cell"):
            assert (likelihood, dispersion) in pairs


# -- refused: other model classes ------------------------------------------------------------
def _scanvi(adata):
    scvi.model.SCANVI.setup_anndata(adata, labels_key="cell_type", unlabeled_category="none")
    scvi.settings.seed = 0
    model = scvi.model.SCANVI(adata, n_hidden=16, n_latent=3)
    model.train(max_epochs=1, **QUIET)
    return model


def _totalvi(adata):
    rng = np.random.default_rng(0)
    adata.obsm["protein"] = rng.poisson(20, (adata.n_obs, 5)).astype(np.float32)
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein")
    scvi.settings.seed = 0
    model = scvi.model.TOTALVI(adata, n_latent=3)
    model.train(max_epochs=1, **QUIET)
    return model


OTHER_CLASSES = {"SCANVI": _scanvi, "TOTALVI": _totalvi}
#: What each class's message must say: the class, and the way round.
ADVICE = {"SCANVI": "SCANVI.from_scvi_model", "TOTALVI": "on the RNA counts"}


@pytest.fixture(scope="module", params=list(OTHER_CLASSES))
def other_model(request, tmp_path_factory):
    """(class name, trained model, saved directory) of a model class the package refuses."""
    model = OTHER_CLASSES[request.param](su.model.example_adata())
    return request.param, model, _save(model, tmp_path_factory.mktemp(request.param) / "m")


def _refused(name: str) -> str:
    return f"{name} models.* not supported"


def test_another_model_class_is_refused_at_every_entrance(other_model):
    name, model, _ = other_model
    message = _refused(name) + f".*{ADVICE[name]}"
    assert REFUSED_CONFIGURATIONS[name].split(".")[0] in _message(su.model.SCVI.from_scvi, model)
    with pytest.raises(TypeError, match=message):
        su.model.SCVI.from_scvi(model)
    with pytest.raises(UnsupportedModelError, match=message):
        su.attack_features(model)
    with pytest.raises(UnsupportedModelError, match=message):
        su.MembershipInference(model.adata, recipe=model, n_shadows=2, cache_dir=False)
    with pytest.raises(UnsupportedModelError, match=message):
        su.MembershipInference(model.adata, recipe=su.Recipe(model_class=name), cache_dir=False)
    # the audit of such a model, with shadows of a supported recipe
    mi = su.MembershipInference(model.adata, recipe=su.Recipe(), n_shadows=2, cache_dir=False)
    with pytest.raises(UnsupportedModelError, match=message):
        mi.audit(model, members=[0, 1], nonmembers=[2, 3])


def _message(function, *args) -> str:
    try:
        function(*args)
    except Exception as exc:
        return str(exc)
    raise AssertionError(f"{function.__name__} did not refuse")


def test_a_saved_directory_of_another_class_is_refused_before_any_work(
    other_model, monkeypatch, tmp_path, capsys
):
    name, _, path = other_model

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(scvi_module, "read_h5ad_checked", no_work)
    monkeypatch.setattr(scvi.model.SCVI, "load", no_work)
    message = rf"{name} models \(the class that saved '{path}'\) are not supported.*{ADVICE[name]}"
    with pytest.raises(UnsupportedModelError, match=message):
        su.model.SCVI.load(str(path))
    monkeypatch.undo()
    data = str(path / "adata.h5ad")
    for command in (
        ["audit", str(path), data, "--out", str(tmp_path / "a")],
        ["unlearn", str(path), data, "--forget", "random:3", "--out", str(tmp_path / "u")],
    ):
        code = cli.main(command)
        err = capsys.readouterr().err
        assert code == 2 and f"{name} models" in err and ADVICE[name] in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "u").exists()


class LabSCVI(scvi.model.SCVI):
    """A lab's own subclass of SCVI (same module and loss)."""


def test_a_lab_subclass_is_wrapped_and_its_directory_says_how(tmp_path):
    lab = _train(LabSCVI, su.model.example_adata())
    path = _save(lab, tmp_path / "lab")
    with pytest.raises(UnsupportedModelError, match=r"'LabSCVI'.*not supported.*from_scvi"):
        su.model.SCVI.load(str(path))
    # the way round the message gives: load with its own class, then wrap
    wrapped = su.model.SCVI.from_scvi(LabSCVI.load(str(path)))
    assert type(wrapped) is su.model.SCVI
    out = wrapped.unlearn(wrapped.train_indices[:3], method="retrain_fast", **QUIET)
    assert out.provenance["events"][-1]["method"] == "retrain_fast"
    # shadows are built from the class name: the subclass itself is refused, its wrap is not
    with pytest.raises(UnsupportedModelError, match=r"'LabSCVI'.*from_scvi"):
        su.MembershipInference(lab.adata, recipe=lab, n_shadows=2, cache_dir=False)
    mi = su.MembershipInference(wrapped.adata, recipe=wrapped, n_shadows=2, cache_dir=False)
    assert mi.recipe.model_class == "SCVI"


# -- refused: arguments that are Python objects -------------------------------------------------
@pytest.mark.parametrize(
    ("argument", "model_kwargs"),
    [
        ("var_activation", {"var_activation": torch.nn.functional.softplus}),
        (
            r"extra_encoder_kwargs\['activation_fn'\]",
            {"extra_encoder_kwargs": {"activation_fn": torch.nn.LeakyReLU}},
        ),
    ],
)
def test_model_arguments_that_are_python_objects_are_refused(argument, model_kwargs, tmp_path):
    why = REFUSED_CONFIGURATIONS["model arguments that are Python objects"][:40]
    message = rf"Python objects \(`{argument}=.*not supported: {why}"
    plain = _train(scvi.model.SCVI, su.model.example_adata(), model_kwargs=model_kwargs)
    with pytest.raises(UnsupportedModelError, match=message):
        su.model.SCVI.from_scvi(plain)
    with pytest.raises(UnsupportedModelError, match=message):
        su.MembershipInference(plain.adata, recipe=plain, n_shadows=2, cache_dir=False)
    with pytest.raises(UnsupportedModelError, match=message):
        su.attack_features(plain)
    own = _train(su.model.SCVI, su.model.example_adata(), model_kwargs=model_kwargs)
    with pytest.raises(UnsupportedModelError, match=message):
        own.unlearn(own.train_indices[:3], method="retrain_fast", **QUIET)
    # saved, the file holds code: the safe loader refuses it and names the lab's own file
    path = _save(plain, tmp_path / "m")
    with pytest.raises(RuntimeError, match=f"Refusing to load {path / 'model.pt'}"):
        su.model.SCVI.load(str(path))
