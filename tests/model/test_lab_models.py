"""The models and files labs really have: plain scvi-tools models, reordered or damaged inputs.

Each case is one a lab meets: a plain ``scvi.model.SCVI`` trained with its own settings, saved
and reloaded, an AnnData whose genes or rows come in another order, a damaged cache or model
file. Each either works or is refused with a message that names the problem.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import scvi
import torch

import scvi_unlearn as su
from scvi_unlearn import cli
from scvi_unlearn.audit import _shadows
from scvi_unlearn.model import _auto as auto_module
from scvi_unlearn.model._unlearn import final_kl_weight

EPOCHS = 3


def _data(n_cells: int = 160, seed: int = 0):
    return su.model.example_adata(n_cells=n_cells, seed=seed)


def _plain(adata, setup=None, model_kwargs=None, **train_kwargs):
    """A plain scvi-tools SCVI, trained as a lab would (default 90/10 split)."""
    scvi.model.SCVI.setup_anndata(adata, **(setup or {}))
    scvi.settings.seed = 0
    model = scvi.model.SCVI(adata, n_hidden=16, n_latent=3, **(model_kwargs or {}))
    kwargs = {"max_epochs": EPOCHS, "batch_size": 64, **train_kwargs}
    model.train(accelerator="cpu", enable_progress_bar=False, **kwargs)
    return model


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A plain SCVI saved with its AnnData, and the AnnData itself."""
    adata = _data()
    model = _plain(adata)
    path = tmp_path_factory.mktemp("plain") / "model"
    model.save(str(path), save_anndata=True)
    return path, adata


# -- the default on a plain model ----------------------------------------------------------
def test_auto_on_a_plain_model_never_crashes_and_says_why_it_retrained(tmp_path, monkeypatch):
    # train_size=0.7: many cells sit in the validation split of the references that drew them
    # IN, so LiRA cannot score them (this used to end in "No attack could be run").
    adata = _data(n_cells=300)
    plain = _plain(adata, train_size=0.7)
    model = su.model.SCVI.from_scvi(plain)
    train, val = np.asarray(model.train_indices), np.asarray(model.validation_indices)

    def unlearn():
        return model.unlearn(
            train[:100], method="auto", nonmembers=val, seed=0, accelerator="cpu",
            enable_progress_bar=False, reference_cache_dir=str(tmp_path),
        )  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = unlearn()
    metrics = out.provenance["events"][-1]["metrics"]
    assert metrics["accepted_method"] == "retrain_fast"
    assert metrics["n_forget_gated"] <= metrics["n_forget_development"]
    assert metrics["skipped_approximate"]  # the reason is recorded, whatever it was

    def broken_gate(*args, **kwargs):
        raise ValueError("lira_online needs IN and OUT shadow models for every audited cell")

    monkeypatch.setattr(auto_module.Auto, "run", lambda self, run: auto_module.GatedSearch(
        gate=broken_gate).search(run))  # fmt: skip
    with pytest.warns(UserWarning, match="gate's audit could not run"):
        out = unlearn()
    metrics = out.provenance["events"][-1]["metrics"]
    assert metrics["accepted_method"] == "retrain_fast"
    assert "IN and OUT" in metrics["skipped_approximate"]


def test_the_recipe_of_a_plain_model_keeps_its_training_settings():
    adata = _data()
    plain = _plain(
        adata, max_epochs=8, batch_size=48, plan_kwargs={"lr": 3e-3, "n_epochs_kl_warmup": 5}
    )
    recipe = su.Recipe.from_model(plain)
    assert recipe.train_kwargs["batch_size"] == 48
    assert recipe.train_kwargs["plan_kwargs"] == {"lr": 3e-3, "n_epochs_kl_warmup": 5}
    # the warm-up ended at epoch 5: the last KL weight is 1, as the history logs
    assert final_kl_weight(su.model.SCVI.from_scvi(plain)) == pytest.approx(1.0)
    assert float(plain.history_["kl_weight"].iloc[-1, 0]) == pytest.approx(1.0)
    # the shadows follow the recipe
    mi = su.MembershipInference(adata, recipe=plain, n_shadows=2, cache_dir=False)
    assert mi.recipe.train_kwargs["plan_kwargs"]["lr"] == 3e-3


def test_a_reloaded_plain_model_reads_its_kl_warmup_from_the_history(tmp_path):
    adata = _data()
    plain = _plain(adata, max_epochs=8, plan_kwargs={"n_epochs_kl_warmup": 5})
    plain.save(str(tmp_path / "m"), save_anndata=True)
    loaded = su.model.SCVI.load(str(tmp_path / "m"))
    assert su.Recipe.from_model(loaded).train_kwargs["plan_kwargs"] == {"n_epochs_kl_warmup": 5}
    assert final_kl_weight(loaded) == pytest.approx(1.0)
    # default settings: the default warm-up, read back as such (nothing recorded)
    default = _plain(_data(), max_epochs=8)
    default.save(str(tmp_path / "d"), save_anndata=True)
    loaded = su.model.SCVI.load(str(tmp_path / "d"))
    assert "plan_kwargs" not in su.Recipe.from_model(loaded).train_kwargs
    assert final_kl_weight(loaded) == pytest.approx(7 / 400)


def test_a_method_that_destroys_the_model_raises_unless_asked(tmp_path):
    adata = _data()
    model = su.model.SCVI.from_scvi(_plain(adata))
    forget = np.asarray(model.train_indices)[:10]
    kwargs = {"method": "fisher", "alpha": 10.0, "finetune_epochs": 0, "accelerator": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="destroyed the model"):
            model.unlearn(forget, **kwargs)
        before = {k: v.clone() for k, v in model.module.state_dict().items()}
        with pytest.raises(RuntimeError, match="destroyed the model"):
            model.unlearn(forget, inplace=True, **kwargs)
        # in place: the weights and records are as they were
        for key, value in model.module.state_dict().items():
            assert torch.equal(value, before[key]), key
        assert model.provenance is None and len(model.train_indices) == len(before_train(model))
        kept = model.unlearn(forget, damage_limit=None, **kwargs)
    assert kept.provenance["events"][-1]["utility"]["warned"] is True
    with pytest.raises(ValueError, match="damage_limit"):
        model.unlearn(forget, damage_limit=-1, **kwargs)


def before_train(model):
    return np.asarray(model.train_indices)


def test_an_interrupted_inplace_run_restores_the_model(monkeypatch):
    model = su.model.SCVI.from_scvi(_plain(_data()))
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    n_train = len(model.train_indices)
    spec = su.train.METHODS["finetune"]

    class Interrupted(type(spec)):
        def run(self, run):
            super().run(run)  # the weights have changed by now
            raise KeyboardInterrupt

    monkeypatch.setitem(su.train.METHODS, "finetune", Interrupted())
    with pytest.raises(KeyboardInterrupt):
        model.unlearn([int(model.train_indices[0])], method="finetune", max_epochs=1,
                      inplace=True, accelerator="cpu", enable_progress_bar=False)  # fmt: skip
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert len(model.train_indices) == n_train and model.provenance is None


# -- genes and cells are matched by name ----------------------------------------------------
def test_genes_in_another_order_are_put_in_the_models_order(plain_dir):
    path, adata = plain_dir
    shuffled = adata[:, adata.var_names[::-1]].copy()
    with pytest.warns(UserWarning, match="another order"):
        model = su.model.SCVI.load(str(path), shuffled)
    assert list(model.adata.var_names) == list(adata.var_names)
    assert list(shuffled.var_names) == list(adata.var_names[::-1])  # the caller's is unchanged
    reference = su.model.SCVI.load(str(path), adata.copy())
    assert np.allclose(
        su.attack_features(model).to_numpy(), su.attack_features(reference).to_numpy()
    )
    renamed = adata.copy()
    renamed.var_names = [f"other_{i}" for i in range(adata.n_vars)]
    with pytest.raises(ValueError, match="genes do not match"):
        su.model.SCVI.load(str(path), renamed)


def test_cells_in_another_order_are_matched_by_name(plain_dir):
    path, adata = plain_dir
    trained = set(adata.obs_names[su.model.SCVI.load(str(path)).train_indices])
    rng = np.random.default_rng(1)
    permuted = adata[rng.permutation(adata.n_obs)].copy()
    model = su.model.SCVI.load(str(path), permuted)
    assert set(model.adata.obs_names[model.train_indices]) == trained
    validation = set(model.adata.obs_names[model.validation_indices])
    assert not validation & trained and len(validation) == adata.n_obs - len(trained)
    # a never-trained cell cannot be forgotten, whatever its new position
    never = sorted(validation)[:1]
    with pytest.raises(ValueError, match="not in the model's training set"):
        model.unlearn(never, method="finetune", accelerator="cpu")
    # a subset of the cells: the trained ones it holds, found by name
    subset = permuted[: adata.n_obs // 2].copy()
    model = su.model.SCVI.load(str(path), subset)
    assert set(model.adata.obs_names[model.train_indices]) == trained & set(subset.obs_names)


def test_a_plain_model_without_saved_cells_warns_that_positions_are_unchecked(plain_dir, tmp_path):
    path, adata = plain_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(path / "model.pt", bare / "model.pt")
    with pytest.warns(UserWarning, match="cannot be checked"):
        su.model.SCVI.load(str(bare), adata.copy())


def test_log_normalised_data_is_refused_for_unlearning(plain_dir):
    path, adata = plain_dir
    logged = adata.copy()
    counts = logged.X.toarray() if hasattr(logged.X, "toarray") else np.asarray(logged.X)
    logged.X = np.log1p(counts / 3.0).astype(np.float32)
    model = su.model.SCVI.load(str(path), logged)
    with pytest.raises(ValueError, match="raw"):
        model.unlearn([int(model.train_indices[0])], method="finetune", accelerator="cpu")


# -- features are deterministic for every library-size setting --------------------------------
def test_features_without_observed_library_size_are_deterministic():
    model = _plain(_data(), model_kwargs={"use_observed_lib_size": False})
    first = su.attack_features(model)
    torch.manual_seed(123)
    assert first.equals(su.attack_features(model))


# -- a damaged shadow cache is trained again -------------------------------------------------
def _fit_pool(adata, cache):
    recipe = su.Recipe(model_kwargs={"n_hidden": 16, "n_latent": 3},
                       train_kwargs={"max_epochs": 2, "train_size": 1.0})  # fmt: skip
    return _shadows.train_shadow_pool(
        adata, recipe, 2, np.arange(adata.n_obs), 0, cache, accelerator="cpu", progress_bar=False
    )


@pytest.mark.parametrize("damage", ["replaced", "nan", "truncated"])
def test_a_damaged_shadow_cache_entry_is_trained_again(tmp_path, damage):
    adata = _data(n_cells=100)
    first = _fit_pool(adata, tmp_path)
    folder = next(tmp_path.glob("shadows-*"))
    pool_file, shadow_file = folder / "pool.npz", folder / "shadow_0.npz"
    if damage == "truncated":
        data = pool_file.read_bytes()
        pool_file.write_bytes(data[: len(data) // 2])
        shadow_file.write_bytes(shadow_file.read_bytes()[:100])
    else:
        for file in (pool_file, shadow_file):
            with np.load(file) as f:
                arrays = dict(f)
            arrays["features"] = (
                arrays["features"] * 0 + np.nan if damage == "nan" else arrays["features"] + 1.0
            )
            np.savez_compressed(file, **arrays)
    with pytest.warns(UserWarning, match="damaged"):
        again = _fit_pool(adata, tmp_path)
    assert np.array_equal(again.features, first.features)
    assert np.array_equal(again.in_mask, first.in_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sound again: read without a warning
        assert np.array_equal(_fit_pool(adata, tmp_path).features, first.features)


# -- configurations (the matrix is tests/model/test_configurations.py) ------------------------
def test_a_minified_model_is_refused_for_unlearning_and_audits():
    adata = _data()
    model = su.model.SCVI.from_scvi(_plain(adata))
    qzm, qzv = model.get_latent_representation(return_dist=True)
    model.adata.obsm["X_latent_qzm"], model.adata.obsm["X_latent_qzv"] = qzm, qzv
    model.minify_adata()
    with pytest.raises(ValueError, match="minified"):
        model.unlearn([int(model.train_indices[0])], method="fisher", accelerator="cpu")
    with pytest.raises(ValueError, match="minified"):
        su.attack_features(model)


# -- files and the command line ----------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 64, "truncated"])
def test_a_broken_model_file_is_a_clear_error(plain_dir, tmp_path, content, capsys):
    path, _ = plain_dir
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    data = (path / "model.pt").read_bytes()
    (broken / "model.pt").write_bytes(
        data[: len(data) // 2] if content == "truncated" else content
    )
    with pytest.raises(ValueError, match="not a readable model file"):
        su.model.SCVI.load(str(broken))
    code = cli.main(["audit", str(broken), str(broken / "adata.h5ad"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "not a readable model file" in err and "Traceback" not in err


def test_the_cli_turns_expected_errors_into_one_line(plain_dir, tmp_path, capsys):
    path, _ = plain_dir
    # a truncated .h5ad
    data = (path / "adata.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 3])
    code = cli.main(["unlearn", str(path), str(tmp_path / "cut.h5ad"), "--forget", "random:3",
                     "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "not a readable .h5ad" in err and "Traceback" not in err
    # corrupt provenance JSON
    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    (corrupt / "unlearning_provenance.json").write_text("{not json")
    code = cli.main(["unlearn", str(corrupt), str(path / "adata.h5ad"), "--forget", "random:3",
                     "--out", str(tmp_path / "o2")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "not valid JSON" in err
    # an untrained model
    untrained = _data()
    su.model.SCVI.setup_anndata(untrained)
    su.model.SCVI(untrained, n_hidden=16, n_latent=3).save(str(tmp_path / "u"), save_anndata=True)
    code = cli.main(["audit", str(tmp_path / "u"), str(tmp_path / "u" / "adata.h5ad"),
                     "--out", str(tmp_path / "a")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "not trained" in err
    # --verbose shows the traceback as well
    code = cli.main(["unlearn", str(corrupt), str(path / "adata.h5ad"), "--forget", "random:3",
                     "--out", str(tmp_path / "o3"), "--verbose"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "not valid JSON" in err


def test_an_unwritable_output_is_one_line(plain_dir, tmp_path, capsys, monkeypatch):
    path, _ = plain_dir

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "o"))

    monkeypatch.setattr(su.model.SCVI, "save", refuse)
    code = cli.main(["unlearn", str(path), str(path / "adata.h5ad"), "--forget", "random:3",
                     "--method", "finetune", "--max-epochs", "1", "--accelerator", "cpu",
                     "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "permission denied" in err and "Traceback" not in err


def test_provenance_json_is_plain_data(plain_dir, tmp_path):
    path, adata = plain_dir
    model = su.model.SCVI.load(str(path), adata.copy())
    out = model.unlearn(model.adata.obs_names[model.train_indices[:3]], method="finetune",
                        max_epochs=1, accelerator="cpu", enable_progress_bar=False)  # fmt: skip
    out.save(str(tmp_path / "o"))
    assert json.loads((tmp_path / "o" / "unlearning_provenance.json").read_text())["events"]


def test_the_cli_audit_reads_genes_in_another_order_as_the_model_does(plain_dir, tmp_path):
    path, adata = plain_dir
    adata[:, adata.var_names[::-1]].copy().write_h5ad(tmp_path / "shuffled.h5ad")
    args = ["--n-shadows", "2", "--cache-dir", str(tmp_path / "cache"), "--accelerator", "cpu"]
    with pytest.warns(UserWarning, match="another order"):
        code = cli.main(["audit", str(path), str(tmp_path / "shuffled.h5ad"),
                         "--out", str(tmp_path / "a"), *args])  # fmt: skip
    assert code == 0
    assert cli.main(["audit", str(path), str(path / "adata.h5ad"),
                     "--out", str(tmp_path / "b"), *args]) == 0  # fmt: skip
    shuffled = json.loads((tmp_path / "a" / "audit_report.json").read_text())
    ordered = json.loads((tmp_path / "b" / "audit_report.json").read_text())
    assert shuffled["results"] == ordered["results"]
