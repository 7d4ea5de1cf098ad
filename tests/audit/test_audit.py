"""Tests of the membership-inference audit: controls, determinism, metrics, errors, I/O."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pytest
import scvi
import torch
from sklearn.metrics import roc_auc_score

import scvi_unlearn as su
from scvi_unlearn.audit import (
    auc_from_scores,
    balanced_membership,
    bootstrap_metrics,
    lira_scores,
    tpr_at_fpr,
)

# --- controls -------------------------------------------------------------------------------


def test_positive_control_detects_members(overfit_case):
    case = overfit_case
    report = case["mi"].audit(case["model"], members=case["train"], nonmembers=case["held"])
    lira = report.results["lira_online"]
    assert lira.auc >= 0.9
    assert lira.verdict == "leak"
    assert report.verdict == "leak"
    assert "LEAK" in report.explain()
    # Every attack was scored, out of sample, on all cells.
    assert set(report.results) == set(su.audit.ATTACKS)
    assert len(lira.member_scores) == case["train"].size


def test_null_control_never_trained_members(overfit_case):
    case = overfit_case
    held = case["held"]
    # "Members" that the model never trained on: membership is absent by construction.
    fake_members, nonmembers = held[::2], held[1::2]
    with pytest.warns(UserWarning, match="not in the model's recorded training set"):
        report = case["mi"].audit(case["model"], members=fake_members, nonmembers=nonmembers)
    lira = report.results["lira_online"]
    assert lira.auc_ci[0] <= 0.5 <= lira.auc_ci[1]
    assert report.verdict == "no evidence of leak"
    assert "NO EVIDENCE" in report.explain()


def test_reference_models_supply_the_band(overfit_case):
    case = overfit_case
    adata, held, train = case["adata"], case["held"], case["train"]
    from scvi_unlearn._demo import demo_recipe, train_target

    members, nonmembers = train[:40], held[:40]
    # A model trained on the other 60 held-out cells never saw the audited cells: a reference.
    rest = held[40:]
    split = su.data.MembershipSplit(train=rest, forget=rest, nonmember=train, heldout=train)
    references = [
        train_target(adata, split, demo_recipe(max_epochs=30), seed=s) for s in (1, 2, 3)
    ]
    with pytest.raises(ValueError, match="training set"):
        # the reference model trained on these `nonmembers`: an audit of it with them is refused
        case["mi"].audit(references[0], members=members, nonmembers=held[40:80])
    with pytest.raises(ValueError, match="at least 3 of them"):
        # one or two reference models cannot measure how much models differ
        case["mi"].audit(case["model"], members, nonmembers, reference_models=references[:2])
    report = case["mi"].audit(
        case["model"],
        members=members,
        nonmembers=nonmembers,
        reference_models=references,
        attacks=("loss", "lira_online"),
    )
    lira = report.results["lira_online"]
    assert report.results["loss"].reference_source == "3 reference models"
    assert lira.paired and len(lira.reference_aucs) == 3
    # The paired band: the references' prediction interval, judged with the point AUC.
    assert lira.reference_band == su.audit.reference_band(lira.reference_aucs, min_sd=1 / 1600)
    assert lira.verdict == "leak" and lira.auc > lira.reference_band[1]
    # References audited separately on the same cells give the same paired verdict...
    attacks = ("loss", "lira_online")
    alone = [case["mi"].audit(r, members, nonmembers, attacks=attacks) for r in references]
    own = case["mi"].audit(case["model"], members, nonmembers, attacks=attacks)
    paired = su.audit.judge_against(own, alone)
    for attack in attacks:
        assert paired.results[attack].reference_aucs == report.results[attack].reference_aucs
        assert paired.results[attack].family_verdict == report.results[attack].family_verdict
    assert paired.verdict == report.verdict and own.results["loss"].paired is False
    # ... and one audited on other cells is refused.
    other = case["mi"].audit(references[2], members[1:], nonmembers, attacks=attacks)
    with pytest.raises(ValueError, match="same members and non-members"):
        su.audit.judge_against(own, [*alone[:2], other])
    with pytest.raises(ValueError, match="at least 3 of them"):
        su.audit.judge_against(own, alone[:2])


@pytest.mark.parametrize("what", ["members", "nonmembers"])
def test_a_reference_model_that_trained_on_audited_cells_is_refused(overfit_case, what):
    case = overfit_case
    adata, held, train = case["adata"], case["held"], case["train"]
    from scvi_unlearn._demo import demo_recipe, train_target

    members, nonmembers = train[:40], held[:40]
    seen = members[:5] if what == "members" else nonmembers[:5]
    cells = np.r_[held[40:], seen]
    split = su.data.MembershipSplit(train=cells, forget=cells, nonmember=train[40:],
                                    heldout=train[40:])  # fmt: skip
    reference = train_target(adata, split, demo_recipe(max_epochs=2), seed=1)
    with pytest.raises(ValueError, match=rf"Reference model 0 trained on 5 of the 40 .*`{what}`"):
        case["mi"].audit(case["model"], members=members, nonmembers=nonmembers,
                         reference_models=[reference] * 3, attacks=("loss",))  # fmt: skip


# --- determinism ----------------------------------------------------------------------------


def test_features_are_deterministic_and_order_preserving(overfit_case):
    model, adata = overfit_case["model"], overfit_case["adata"]
    f1 = su.attack_features(model, adata, indices=[5, 3, 9])
    f2 = su.attack_features(model, adata, indices=[5, 3, 9])
    assert f1.equals(f2)
    assert f1.index.tolist() == adata.obs_names[[5, 3, 9]].tolist()
    full = su.attack_features(model, batch_size=7)  # batching must not change values
    np.testing.assert_allclose(full.loc[f1.index].to_numpy(), f1.to_numpy(), rtol=1e-5)
    assert list(f1.columns) == list(su.audit.SCALAR_FEATURES)
    assert np.isfinite(full.to_numpy()).all()


def test_audit_is_reproducible(overfit_case):
    case = overfit_case
    a = case["mi"].audit(case["model"], members=case["train"][:30], nonmembers=case["held"][:30])
    b = case["mi"].audit(case["model"], members=case["train"][:30], nonmembers=case["held"][:30])
    assert a.to_frame().equals(b.to_frame())


def test_shadow_training_is_seeded_and_cached(tmp_path, monkeypatch):
    adata = su.data.synthetic_pbmc(n_cells=80, n_genes=40, seed=3)
    recipe = su.Recipe(
        model_kwargs={"n_latent": 3, "n_hidden": 16},
        train_kwargs={"max_epochs": 3, "train_size": 1.0},
    )
    first = su.MembershipInference(adata, recipe=recipe, n_shadows=2, seed=1, cache_dir=tmp_path)
    first.fit(progress_bar=False)
    again = su.MembershipInference(adata, recipe=recipe, n_shadows=2, seed=1, cache_dir=False)
    again.fit(progress_bar=False)
    np.testing.assert_array_equal(first.shadows_.features, again.shadows_.features)
    np.testing.assert_array_equal(first.shadows_.in_mask, again.shadows_.in_mask)

    def no_training(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(su.Recipe, "fit", no_training)
    cached = su.MembershipInference(adata, recipe=recipe, n_shadows=2, seed=1, cache_dir=tmp_path)
    cached.fit(progress_bar=False)
    np.testing.assert_array_equal(cached.shadows_.features, first.shadows_.features)
    # Another seed is another set of shadows: it must not hit the cache.
    other = su.MembershipInference(adata, recipe=recipe, n_shadows=2, seed=2, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="cache"):
        other.fit(progress_bar=False)


# --- metrics and attacks --------------------------------------------------------------------


def test_auc_matches_sklearn_and_bootstrap_brackets_it():
    rng = np.random.default_rng(0)
    m, n = rng.normal(0.5, 1, 60), rng.normal(0, 1, 80)
    expected = roc_auc_score(np.r_[np.ones(60), np.zeros(80)], np.r_[m, n])
    assert auc_from_scores(m, n) == pytest.approx(expected)
    boot = bootstrap_metrics(m, n, n_bootstrap=500, seed=0)
    low, high = np.percentile(boot["auc"], [2.5, 97.5])
    assert low < expected < high
    assert boot["tpr@0.01"].shape == (500,)


def test_tpr_at_low_fpr_is_strict():
    nonmembers = np.arange(100.0)
    members = np.array([99.5, 150.0, 50.0, 98.5])
    # 1% FPR of 100 non-members: the threshold may flag exactly one of them (99.0).
    assert tpr_at_fpr(members, nonmembers, 0.01) == pytest.approx(0.75)
    # 0.1%: no non-member may be flagged, so the threshold sits at the top non-member.
    assert tpr_at_fpr(members, nonmembers, 0.001) == pytest.approx(0.5)


def test_lira_separates_in_from_out_and_offline_needs_only_out():
    rng = np.random.default_rng(1)
    n_shadows, n_cells = 8, 50
    cell_level = rng.normal(0, 3, n_cells)  # cells differ a lot; membership shifts by -1
    in_mask = balanced_membership(n_shadows, n_cells, seed=0)
    shadow = cell_level + rng.normal(0, 0.2, (n_shadows, n_cells)) - 1.0 * in_mask
    member = rng.random(n_cells) < 0.5
    target = cell_level + rng.normal(0, 0.2, n_cells) - 1.0 * member
    online = lira_scores(target, shadow, in_mask, online=True)
    offline = lira_scores(target, shadow, in_mask, online=False)
    assert auc_from_scores(online[member], online[~member]) > 0.95
    assert auc_from_scores(offline[member], offline[~member]) > 0.95
    # A global loss threshold cannot see through the cell-level differences.
    assert auc_from_scores(-target[member], -target[~member]) < 0.8
    none_out = np.ones_like(in_mask)
    assert np.isnan(lira_scores(target, shadow, none_out, online=False)).all()


def test_lira_variance_and_centre_variants():
    from scvi_unlearn.audit._attacks import SHRINK_PRIOR_DF, _masked_moments

    rng = np.random.default_rng(2)
    in_mask = balanced_membership(8, 30, seed=0)
    # Cells whose spread differs: shrinking pulls each cell's variance towards the pooled one.
    shadow = rng.normal(0, 1, (8, 30)) * np.linspace(0.2, 3, 30)
    _, pooled, _ = _masked_moments(shadow, ~in_mask, "pooled")
    _, cell, n = _masked_moments(shadow, ~in_mask, "per_cell")
    _, shrunk, _ = _masked_moments(shadow, ~in_mask, "shrunk")
    low, high = np.minimum(cell, pooled), np.maximum(cell, pooled)
    assert ((shrunk >= low - 1e-12) & (shrunk <= high + 1e-12)).all()
    df = n - 1
    expected = (df * cell**2 + SHRINK_PRIOR_DF * pooled**2) / (df + SHRINK_PRIOR_DF)
    np.testing.assert_allclose(shrunk, np.sqrt(expected))
    # A median centre is robust to one odd shadow; with two values it is the mean.
    odd = shadow.copy()
    odd[np.argmax(~in_mask[:, 0]), 0] += 100.0
    mean_c, _, _ = _masked_moments(odd, ~in_mask, "pooled", "mean")
    median_c, _, _ = _masked_moments(odd, ~in_mask, "pooled", "median")
    assert abs(median_c[0] - np.median(shadow[~in_mask[:, 0], 0])) < 5 < abs(mean_c[0])
    with pytest.raises(ValueError, match="variance must be one of"):
        lira_scores(shadow[0], shadow, in_mask, variance="fixed")
    with pytest.raises(ValueError, match="centre must be one of"):
        su.audit.rmia_scores(shadow[0], shadow, in_mask, np.arange(15), centre="mode")
    assert su.audit.LIRA_VARIANCE == {"lira_online": "pooled", "lira_offline": "shrunk"}


def test_balanced_membership_rejects_odd_counts():
    with pytest.raises(ValueError, match="even"):
        balanced_membership(3, 10, seed=0)


# --- report I/O -----------------------------------------------------------------------------


def test_report_round_trips_and_plots(overfit_case, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    case = overfit_case
    report = case["mi"].audit(
        case["model"], members=case["train"][:20], nonmembers=case["held"][:20]
    )
    path = tmp_path / "report.json"
    report.to_json(str(path))
    loaded = su.AuditReport.from_json(str(path))
    assert loaded.to_frame().equals(report.to_frame())
    assert loaded.verdict == report.verdict
    frame = report.to_frame()
    for column in (
        "auc",
        "auc_low",
        "auc_high",
        "advantage",
        "tpr@1%fpr",
        "tpr@0.1%fpr",
        "reference_low",
        "reference_high",
        "verdict",
    ):
        assert column in frame.columns
    assert (frame["advantage"] - 2 * (frame["auc"] - 0.5).abs()).abs().max() < 1e-12
    summary = report.summary()
    json.dumps(summary)  # plain JSON
    ax = report.plot_roc(show=False)
    assert len(ax.lines) == len(report.results) + 1  # one curve per attack + chance
    ax.figure.savefig(tmp_path / "roc.png")
    assert (tmp_path / "roc.png").stat().st_size > 0
    with pytest.raises(TypeError, match="save"):
        report.plot_roc(save=str(tmp_path / "again.png"), show=False)


# --- bad input ------------------------------------------------------------------------------


def test_bad_cell_sets_are_refused(overfit_case):
    case = overfit_case
    mi, model, train, held = case["mi"], case["model"], case["train"], case["held"]
    bad = [
        (np.r_[train[:3], 10_000], held[:3], IndexError, "out of range"),
        (np.r_[train[:3], train[0]], held[:3], ValueError, "duplicated"),
        (np.array([], dtype=int), held[:3], ValueError, "empty"),
        (train[:3], np.array([], dtype=int), ValueError, "empty"),
        (np.r_[train[:3], held[0]], held[:3], ValueError, "overlap"),
        (["not_a_cell"], held[:3], KeyError, "not in the AnnData"),
        (train[:3], train[3:6], ValueError, "training set"),  # non-members it trained on
    ]
    for members, nonmembers, error, match in bad:
        with pytest.raises(error, match=match):
            mi.audit(model, members=members, nonmembers=nonmembers)


def test_non_count_data_is_refused():
    adata = su.data.synthetic_pbmc(n_cells=60, n_genes=40, seed=0)
    adata.X = adata.X.astype(np.float32) / 3.7
    with pytest.raises(ValueError, match="non-integer"):
        su.MembershipInference(adata, recipe=su.Recipe(), n_shadows=2, cache_dir=False)
    adata.X = -adata.X
    with pytest.raises(ValueError, match="negative"):
        su.MembershipInference(adata, recipe=su.Recipe(), n_shadows=2, cache_dir=False)


def test_gene_mismatch_and_untrained_model_are_refused(overfit_case):
    case = overfit_case
    other = case["adata"][:, :-5].copy()
    with pytest.raises(ValueError, match="genes do not match"):
        su.MembershipInference(other, recipe=case["model"], n_shadows=2, cache_dir=False)
    with pytest.raises(ValueError, match="genes do not match"):
        su.attack_features(case["model"], other)
    untrained_data = case["adata"].copy()
    su.model.SCVI.setup_anndata(untrained_data)
    untrained = su.model.SCVI(untrained_data)
    with pytest.raises(RuntimeError, match="not trained"):
        case["mi"].audit(untrained, members=case["train"][:5], nonmembers=case["held"][:5])
    with pytest.raises(RuntimeError, match="not trained"):
        su.MembershipInference(case["adata"], recipe=untrained, cache_dir=False)


def test_diverged_model_is_refused_by_name(overfit_case):
    import copy

    case = overfit_case
    diverged = copy.deepcopy(case["model"])
    with torch.no_grad():
        for param in diverged.module.decoder.parameters():
            param.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite attack features"):
        case["mi"].audit(diverged, members=case["train"][:5], nonmembers=case["held"][:5])


def test_invalid_configuration_is_refused(overfit_case):
    adata = overfit_case["adata"]
    with pytest.raises(ValueError, match="even integer"):
        su.MembershipInference(adata, recipe=su.Recipe(), n_shadows=3, cache_dir=False)
    with pytest.raises(ValueError, match="Unknown attacks"):
        su.MembershipInference(adata, recipe=su.Recipe(), attacks=("magic",), cache_dir=False)
    with pytest.raises(TypeError, match="recipe"):
        su.MembershipInference(adata, recipe="scvi", cache_dir=False)
    unfitted = su.MembershipInference(adata, recipe=su.Recipe(), n_shadows=2, cache_dir=False)
    with pytest.raises(RuntimeError, match="fit"):
        unfitted.audit(
            overfit_case["model"],
            members=overfit_case["train"][:5],
            nonmembers=overfit_case["held"][:5],
        )


def test_user_adata_is_not_modified(overfit_case):
    adata = su.data.synthetic_pbmc(n_cells=200, n_genes=300, seed=0)
    before = (list(adata.obs.columns), dict(adata.uns).keys(), adata.X.sum())
    case = overfit_case
    su.attack_features(case["model"], adata, indices=[0, 1])
    case["mi"].audit(case["model"], members=case["train"][:5], nonmembers=case["held"][:5])
    assert (list(adata.obs.columns), dict(adata.uns).keys(), adata.X.sum()) == before


# --- recipes and model files ----------------------------------------------------------------


def test_recipe_from_plain_scvi_model(tmp_path):
    adata = su.data.synthetic_pbmc(n_cells=80, n_genes=40, seed=0)
    scvi.model.SCVI.setup_anndata(adata, batch_key="donor")
    plain = scvi.model.SCVI(adata, n_latent=4, n_hidden=32)
    plain.train(max_epochs=3, train_size=0.75, accelerator="cpu", enable_progress_bar=False)
    recipe = su.Recipe.from_model(plain)
    assert recipe.train_kwargs["max_epochs"] == 3
    assert recipe.train_kwargs["train_size"] == pytest.approx(0.75, abs=0.02)
    assert recipe.model_kwargs["n_latent"] == 4
    assert recipe.setup_kwargs["batch_key"] == "donor"

    plain.save(str(tmp_path / "lab_model"), overwrite=True)
    loaded = su.model.SCVI.load(str(tmp_path / "lab_model"), adata.copy())
    for key, value in plain.module.state_dict().items():
        assert np.array_equal(value.numpy(), loaded.module.state_dict()[key].numpy())
    assert su.Recipe.from_model(loaded).fingerprint() == recipe.fingerprint()


def test_missing_model_directory_and_malicious_file(tmp_path):
    import os

    import torch

    with pytest.raises(FileNotFoundError, match="not found"):
        su.model.SCVI.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model\.pt"):
        su.model.SCVI.load(str(tmp_path / "empty"))

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "evil").mkdir()
    torch.save({"attr_dict": Payload()}, tmp_path / "evil" / "model.pt")
    with pytest.raises(RuntimeError, match="Refusing to load"):
        su.model.SCVI.load(str(tmp_path / "evil"), anndata.AnnData(np.ones((2, 2))))
    assert not (tmp_path / "pwned").exists()


def test_cli_audits_a_saved_lab_model(tmp_path, capsys):
    from scvi_unlearn.cli import main

    adata = su.data.synthetic_pbmc(n_cells=120, n_genes=60, seed=0)
    lab = adata.copy()
    scvi.model.SCVI.setup_anndata(lab)
    plain = scvi.model.SCVI(lab, n_latent=4, n_hidden=32)
    plain.train(max_epochs=4, train_size=0.7, accelerator="cpu", enable_progress_bar=False)
    plain.save(str(tmp_path / "model"), overwrite=True)
    adata.write_h5ad(tmp_path / "data.h5ad")
    out = tmp_path / "out"
    code = main(
        [
            "audit",
            str(tmp_path / "model"),
            str(tmp_path / "data.h5ad"),
            "--n-shadows",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--accelerator",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = su.AuditReport.from_json(str(out / "audit_report.json"))
    # Members and non-members came from the train / validation indices stored in the model.
    assert report.metadata["n_members"] == len(plain.train_indices)
    assert report.metadata["n_nonmembers"] == len(plain.validation_indices)
    assert (out / "audit_roc.png").exists()

    code = main(["audit", str(tmp_path / "missing"), str(tmp_path / "data.h5ad")])
    assert code == 2
    assert "not found" in capsys.readouterr().err
