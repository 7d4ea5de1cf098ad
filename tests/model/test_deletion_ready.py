"""Deletion-ready training: donors removed exactly by dropping their columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scvi_unlearn as su
from scvi_unlearn.model import train_deletion_ready

QUICK = {
    "model_kwargs": {"n_latent": 4, "n_hidden": 16},
    "train_kwargs": {"max_epochs": 3},
    "accelerator": "cpu",
    "enable_progress_bar": False,
}
PERMANENT = ["donor_0", "donor_3"]


@pytest.fixture(scope="module")
def adata():
    return su.data.synthetic_pbmc(n_cells=300, n_genes=40, seed=0)


@pytest.fixture(scope="module")
def ready(adata):
    return train_deletion_ready(adata, "donor", PERMANENT, **QUICK)


def donor_training_cells(model, donor: str) -> np.ndarray:
    cells = np.flatnonzero(model.adata.obs["donor"].astype(str).to_numpy() == donor)
    return np.intersect1d(cells, model.train_indices)


def same_weights(a, b) -> bool:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_removing_a_donor_is_bit_identical_to_training_without_it(adata, ready):
    removed = ready.unlearn(donor_training_cells(ready, "donor_1"))
    event = removed.provenance["events"][-1]
    assert event["method"] == "drop_donors"
    assert event["max_epochs"] == 0
    without = train_deletion_ready(adata[adata.obs["donor"] != "donor_1"].copy(), "donor",
                                   PERMANENT, **QUICK)  # fmt: skip
    assert same_weights(removed, without)
    assert removed.deletion_ready_["withdrawable"] == ["donor_2"]
    # Every cell of the donor left, validation cells included.
    assert "donor_1" not in set(removed.adata.obs["donor"].astype(str))
    assert removed.adata.n_obs == int((adata.obs["donor"] != "donor_1").sum())


def test_row_order_does_not_change_the_model(adata, ready):
    shuffled = adata[np.random.default_rng(1).permutation(adata.n_obs)].copy()
    assert same_weights(ready, train_deletion_ready(shuffled, "donor", PERMANENT, **QUICK))


def test_no_remaining_weight_depends_on_the_removed_donors_cells(adata, ready):
    """Perturb donor_1's counts, train, remove it: the same model as without perturbing."""
    perturbed = adata.copy()
    rows = np.flatnonzero((perturbed.obs["donor"] == "donor_1").to_numpy())
    rng = np.random.default_rng(0)
    perturbed.X[rows] = rng.poisson(5.0, size=(rows.size, perturbed.n_vars)).astype(np.float32)
    other = train_deletion_ready(perturbed, "donor", PERMANENT, **QUICK)
    assert not same_weights(other, ready)  # the donor's own columns did change
    a = ready.unlearn(donor_training_cells(ready, "donor_1"))
    b = other.unlearn(donor_training_cells(other, "donor_1"))
    assert same_weights(a, b)


def test_remaining_cells_keep_their_outputs(ready):
    removed = ready.unlearn(donor_training_cells(ready, "donor_2"))
    kept = ready.adata[ready.adata.obs["donor"] != "donor_2"]
    np.testing.assert_array_equal(
        removed.get_latent_representation(), ready.get_latent_representation(kept)
    )


def test_original_model_is_untouched_unless_inplace(ready):
    before = {k: v.clone() for k, v in ready.module.state_dict().items()}
    n_obs = ready.adata.n_obs
    ready.unlearn(donor_training_cells(ready, "donor_1"))
    assert ready.adata.n_obs == n_obs
    assert ready.deletion_ready_["withdrawable"] == ["donor_1", "donor_2"]
    assert all(torch.equal(before[k], v) for k, v in ready.module.state_dict().items())


def test_inplace_removal(adata):
    model = train_deletion_ready(adata, "donor", PERMANENT, **QUICK)
    out = model.unlearn(donor_training_cells(model, "donor_1"), inplace=True)
    assert out is model
    assert model.deletion_ready_["withdrawable"] == ["donor_2"]
    assert model.provenance["events"][-1]["method"] == "drop_donors"


def test_removal_verifies_and_round_trips(tmp_path, ready):
    removed = ready.unlearn(donor_training_cells(ready, "donor_1"), record_names=False)
    assert su.model.verify_unlearning(removed).verified
    removed.save(str(tmp_path / "m"), save_anndata=True)
    loaded = su.model.SCVI.load(str(tmp_path / "m"))
    assert loaded.deletion_ready_["withdrawable"] == ["donor_2"]
    assert same_weights(loaded, removed)
    result = su.model.verify_unlearning(str(tmp_path / "m"), loaded.adata.copy())
    assert result.verified, result
    # A tampered weight is caught.
    with torch.no_grad():
        next(loaded.module.parameters()).add_(1e-3)
    assert not su.model.verify_unlearning(loaded).verified


def test_provenance_names_no_donor_or_cell_by_default(ready):
    forget = donor_training_cells(ready, "donor_1")
    names = set(ready.adata.obs_names[forget])
    removed = ready.unlearn(forget)
    text = str(removed.provenance)
    assert "donor_1" not in text
    assert not any(name in text for name in names)
    assert removed.provenance["events"][-1]["forgotten"]["n"] == forget.size
    named = ready.unlearn(forget, record_names=True)
    assert named.provenance["events"][-1]["hyperparameters"]["donor_names"] == ["donor_1"]


def test_saved_deletion_ready_model_removes_after_load(tmp_path, adata, ready):
    ready.save(str(tmp_path / "ready"))
    loaded = su.model.SCVI.load(str(tmp_path / "ready"), adata)
    assert su.model.is_deletion_ready(loaded)
    removed = loaded.unlearn(donor_training_cells(loaded, "donor_2"))
    direct = ready.unlearn(donor_training_cells(ready, "donor_2"))
    assert same_weights(removed, direct)


def test_partial_donor_request_refits_that_donor_exactly(adata, ready):
    cells = donor_training_cells(ready, "donor_1")[:5]
    out = ready.unlearn(cells)
    event = out.provenance["events"][-1]
    assert event["method"] == "refit_donors"
    assert event["n_donors_refitted"] == 1 and event["n_donors_removed"] == 0
    assert su.model.is_deletion_ready(out)
    names = set(ready.adata.obs_names[cells])
    without = train_deletion_ready(adata[~adata.obs_names.isin(names)].copy(), "donor",
                                   PERMANENT, **QUICK)  # fmt: skip
    assert same_weights(out, without)
    assert names.isdisjoint(out.adata.obs_names)
    assert su.model.verify_unlearning(out).verified
    # The other donors' cells keep their outputs.
    other = ready.adata[ready.adata.obs["donor"].astype(str) == "donor_2"]
    np.testing.assert_array_equal(
        out.get_latent_representation(other), ready.get_latent_representation(other)
    )
    with pytest.raises(ValueError, match=r"removes whole donors.*5 of.*refit_donors"):
        ready.unlearn(cells, method="drop_donors")


def test_a_request_of_whole_and_partial_donors(adata, ready):
    whole = donor_training_cells(ready, "donor_1")
    part = donor_training_cells(ready, "donor_2")[:4]
    out = ready.unlearn(np.concatenate([whole, part]))
    event = out.provenance["events"][-1]
    assert (event["method"], event["n_donors_removed"], event["n_donors_refitted"]) == (
        "refit_donors", 1, 1,
    )  # fmt: skip
    assert out.deletion_ready_["withdrawable"] == ["donor_2"]
    drop = set(ready.adata.obs_names[part]) | set(
        ready.adata.obs_names[ready.adata.obs["donor"].astype(str) == "donor_1"]
    )
    without = train_deletion_ready(adata[~adata.obs_names.isin(drop)].copy(), "donor",
                                   PERMANENT, **QUICK)  # fmt: skip
    assert same_weights(out, without)


def test_a_normal_method_loses_deletion_readiness(ready):
    cells = donor_training_cells(ready, "donor_1")[:5]
    out = ready.unlearn(cells, method="retrain_fast", accelerator="cpu",
                        enable_progress_bar=False)  # fmt: skip
    event = out.provenance["events"][-1]
    assert event["method"] == "retrain_fast"
    assert not su.model.is_deletion_ready(out)
    assert "lost" in event["deletion_ready"]


def test_explicit_method_wins_over_the_donor_route(ready):
    out = ready.unlearn(donor_training_cells(ready, "donor_1"), method="retrain_fast",
                        accelerator="cpu", enable_progress_bar=False)  # fmt: skip
    assert out.provenance["events"][-1]["method"] == "retrain_fast"


def test_permanent_donor_request_is_refused(ready):
    cells = donor_training_cells(ready, "donor_0")
    for method in ("drop_donors", "refit_donors"):
        with pytest.raises(ValueError, match=r"permanent.*retrain_fast"):
            ready.unlearn(cells, method=method)
    # The default takes the exact retrain instead (it cannot drop a permanent donor).
    out = ready.unlearn(cells, accelerator="cpu", enable_progress_bar=False)
    assert out.provenance["events"][-1]["method"] == "retrain_fast"


def test_drop_donors_on_a_normal_model_says_what_to_do(adata):
    recipe = su.Recipe(model_kwargs={"n_latent": 4}, train_kwargs={"max_epochs": 2})
    model = recipe.fit_cells(adata, np.arange(200), accelerator="cpu", enable_progress_bar=False)
    for method in ("drop_donors", "refit_donors"):
        with pytest.raises(ValueError, match="deletion-ready model: train it with"):
            model.unlearn([0, 1], method=method)


def test_drop_donors_refuses_settings_and_audit(ready):
    cells = donor_training_cells(ready, "donor_1")
    with pytest.raises(ValueError, match="no hyper-parameters"):
        ready.unlearn(cells, method="drop_donors", budget=0.2)
    with pytest.raises(ValueError, match="audit=True does not apply"):
        ready.unlearn(cells, audit=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"donor_key": "nope", "permanent": ["a"]}, KeyError, "not an obs column"),
        ({"donor_key": "donor", "permanent": []}, ValueError, "`permanent` is empty"),
        ({"donor_key": "donor", "permanent": ["x"]}, ValueError, "not in obs"),
        (
            {"donor_key": "donor", "permanent": ["donor_0", "donor_1", "donor_2", "donor_3"]},
            ValueError,
            "Every donor is permanent",
        ),
        (
            {
                "donor_key": "donor",
                "permanent": ["donor_0"],
                "model_kwargs": {"use_observed_lib_size": False},
            },
            ValueError,
            "library encoder",
        ),
        (
            {
                "donor_key": "donor",
                "permanent": ["donor_0"],
                "model_kwargs": {"dispersion": "gene-batch"},
            },
            ValueError,
            "per-donor dispersions",
        ),
        (
            {
                "donor_key": "donor",
                "permanent": ["donor_0"],
                "setup_kwargs": {"categorical_covariate_keys": ["cell_type"]},
            },
            ValueError,
            "categorical covariates",
        ),
    ],
)
def test_bad_designs_are_refused(adata, kwargs, error, match):
    with pytest.raises(error, match=match):
        train_deletion_ready(adata, **kwargs, accelerator="cpu", enable_progress_bar=False)


def test_a_single_donor_is_refused(adata):
    one = adata[adata.obs["donor"] == "donor_0"].copy()
    with pytest.raises(ValueError, match="at least 2"):
        train_deletion_ready(one, "donor", ["donor_0"], accelerator="cpu")


def test_non_count_data_is_refused(adata):
    logged = adata.copy()
    logged.X = np.log1p(logged.X)
    with pytest.raises(ValueError, match="count"):
        train_deletion_ready(logged, "donor", PERMANENT, **QUICK)


def test_one_permanent_donor_and_batch_norm_keep_isolation(adata):
    """One permanent donor (no batch columns in the base) and batch norm: still exact."""
    kwargs = {**QUICK, "model_kwargs": {**QUICK["model_kwargs"], "use_batch_norm": "both",
                                        "use_layer_norm": "none"}}  # fmt: skip
    model = train_deletion_ready(adata, "donor", ["donor_0"], **kwargs)
    removed = model.unlearn(donor_training_cells(model, "donor_3"))
    without = train_deletion_ready(adata[adata.obs["donor"] != "donor_3"].copy(), "donor",
                                   ["donor_0"], **kwargs)  # fmt: skip
    assert same_weights(removed, without)
    # The permanent donor's own cells are scored as the base scores them.
    kept = model.adata[model.adata.obs["donor"] == "donor_0"]
    np.testing.assert_allclose(
        removed.get_latent_representation(kept), model.get_latent_representation(kept),
        rtol=0, atol=1e-6,
    )  # fmt: skip


def test_adata_is_not_modified(adata):
    before_obs = adata.obs.copy()
    before_uns = set(adata.uns)
    train_deletion_ready(adata, "donor", PERMANENT, **QUICK)
    assert adata.obs.equals(before_obs)
    assert set(adata.uns) == before_uns


def test_cli_trains_a_deletion_ready_model_and_removes_a_donor(tmp_path, adata, capsys):
    from scvi_unlearn.cli import main

    data = tmp_path / "data.h5ad"
    adata.write_h5ad(data)
    ready_dir, out = tmp_path / "ready", tmp_path / "removed"
    base = ["train-deletion-ready", str(data), "--donor-key", "donor", "--accelerator", "cpu"]
    assert main([*base, "--permanent", "donor_0", "donor_3", "--max-epochs", "2",
                 "--out", str(ready_dir)]) == 0  # fmt: skip
    assert "2 withdrawable donor(s)" in capsys.readouterr().out
    code = main(["unlearn", str(ready_dir), str(data), "--forget", "donor:donor_1",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    assert "with drop_donors" in capsys.readouterr().out
    assert main(["verify", str(out), str(data)]) == 0
    # A permanent donor named for the fast route: one line, non-zero exit.
    code = main(["unlearn", str(ready_dir), str(data), "--forget", "donor:donor_0",
                 "--method", "drop_donors", "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2
    assert "permanent" in capsys.readouterr().err
    assert main([*base, "--permanent", "nobody", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()
