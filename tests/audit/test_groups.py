"""Donor-level (group-level) membership: shadows on halves of the donors, a test per donor."""

from __future__ import annotations

import numpy as np
import pytest

import scvi_unlearn as su
from scvi_unlearn._demo import demo_recipe
from scvi_unlearn.audit import group_test


@pytest.fixture(scope="module")
def donor_case():
    """An over-fitted scVI trained on 5 of 6 synthetic donors, and donor-level shadows."""
    adata = su.data.synthetic_pbmc(n_cells=240, n_genes=200, n_donors=6, seed=0)
    recipe = demo_recipe(max_epochs=200)
    left_out = "donor_5"
    keep = np.flatnonzero(adata.obs["donor"].to_numpy() != left_out)
    target = recipe.fit_cells(adata, keep, seed=5, accelerator="cpu", enable_progress_bar=False)
    mi = su.MembershipInference(
        adata, recipe=recipe, n_shadows=6, seed=0, cache_dir=False, group_key="donor",
        accelerator="cpu",
    )  # fmt: skip
    mi.fit(progress_bar=False)
    return {"adata": adata, "target": target, "mi": mi, "left_out": left_out}


def test_shadows_train_on_whole_donors(donor_case):
    mi, adata = donor_case["mi"], donor_case["adata"]
    donors = adata.obs["donor"].to_numpy()
    for k in range(mi.n_shadows):
        in_share = {d: mi.shadows_.in_mask[k, donors == d].mean() for d in np.unique(donors)}
        # train_size=1.0: a donor is all IN or all OUT of each shadow, which trains on 3 of 6.
        assert set(in_share.values()) <= {0.0, 1.0}
        assert sum(in_share.values()) == 3
    # Every donor is IN for exactly half of the shadows.
    per_donor = [mi.shadows_.in_mask[:, donors == d].mean(1) for d in np.unique(donors)]
    assert all(share.sum() == mi.n_shadows // 2 for share in per_donor)


def test_left_out_donor_is_told_from_trained_donors(donor_case):
    # 5 of 6 donors vs shadows on 3: a mismatch is refused when matching is turned off...
    with pytest.raises(ValueError, match=r"groups_out=1"):
        donor_case["mi"].audit_groups(donor_case["target"], match_shadows=False)
    # ... and by default the audit trains shadows on 5 of 6 donors too (each donor out twice).
    report = donor_case["mi"].audit_groups(donor_case["target"], progress_bar=False)
    shadows = report.metadata["shadows"]
    assert shadows == {"n_shadows": 12, "groups_in": 5.0, "model_groups_in": 5, "matched": True}
    table, left_out = report.table, donor_case["left_out"]
    assert report.metadata["members_from"] == "recorded training cells"
    assert table.loc[left_out, "member"] == False  # noqa: E712 (object column)
    assert table.drop(index=left_out)["member"].all()
    # The donor the model never saw sits below every trained donor, and is not called a leak.
    assert table.loc[left_out, "t"] < table.drop(index=left_out)["t"].min()
    # Closer to its OUT shadows than to its IN ones; every trained donor the other way round.
    assert table.loc[left_out, "lira_online"] < 0 < table.drop(index=left_out)["lira_online"].min()
    assert report.verdict(left_out) != "leak"
    assert (table.drop(index=left_out)["verdict"] == "leak").any()
    assert "NO EVIDENCE" in report.explain(left_out) or "UNDERPOWERED" in report.explain(left_out)
    assert ((table["p_value"] >= 0) & (table["p_value"] <= 1)).all()
    # 5 members vs 1 non-member: no group-level AUC is measurable.
    assert np.isnan(report.auc)
    # A model that records no training cells cannot be matched: the audit asks for them.
    blind = su.model.clone_model(donor_case["target"])
    blind.train_obs_names_, blind.train_indices = None, None
    with pytest.raises(ValueError, match=r"pass `members=\[\.\.\.\]`"):
        donor_case["mi"].audit_groups(blind)


def test_group_report_round_trips(donor_case, tmp_path):
    # 2 of 6 given as members vs shadows on 3: shadows that leave out 4 donors are matched.
    report = donor_case["mi"].audit_groups(
        donor_case["target"], members=["donor_0", "donor_1"], progress_bar=False
    )
    assert report.metadata["shadows"]["groups_in"] == 2.0
    assert report.table["member"].sum() == 2 and report.metadata["members_from"] == "given"
    # 2 vs 4 groups: an AUC with a stated (here: hopeless) power.
    assert np.isfinite(report.auc) and report.metadata["auc_verdict"] in su.audit.VERDICTS
    path = tmp_path / "groups.json"
    report.to_json(str(path))
    again = su.GroupAuditReport.from_json(str(path))
    assert again.table.index.tolist() == report.table.index.tolist()
    np.testing.assert_allclose(again.table["p_value"], report.table["p_value"])
    assert again.verdicts.tolist() == report.verdicts.tolist()
    with pytest.raises(KeyError, match="not one of the audited groups"):
        report.verdict("donor_99")
    with pytest.raises(ValueError, match="not in 'donor'"):
        donor_case["mi"].audit_groups(donor_case["target"], members=["donor_99"])


def test_shadows_can_leave_out_as_many_groups_as_the_model():
    from scvi_unlearn.audit._shadows import leave_out_membership

    design = leave_out_membership(12, 6, 1, seed=3)
    assert (~design).sum(1).tolist() == [1] * 12  # each shadow misses one donor
    assert (~design).sum(0).tolist() == [2] * 6  # each donor is missed by two shadows
    adata = su.data.synthetic_pbmc(n_cells=120, n_genes=40, n_donors=4, seed=1)
    recipe = su.Recipe(model_kwargs={"n_latent": 2}, train_kwargs={"max_epochs": 1})
    with pytest.raises(ValueError, match="use a multiple of 4 shadows, at least 8"):
        su.MembershipInference(
            adata, recipe, n_shadows=6, cache_dir=False, group_key="donor", groups_out=1
        ).fit(progress_bar=False)
    with pytest.raises(ValueError, match="`groups_out` needs `group_key`"):
        su.MembershipInference(adata, recipe, n_shadows=2, cache_dir=False, groups_out=1)


def test_group_test_statistics_by_hand():
    # Group 0: the target's loss is far below its OUT shadows; group 1: right among them.
    shadows = np.array([[1.0, 2.0], [1.1, 2.1], [0.5, 1.5], [0.6, 1.6], [1.05, 1.9], [0.55, 1.55]])
    group_in = np.array([[0, 0], [0, 0], [1, 1], [1, 1], [0, 0], [1, 1]], bool)
    table = group_test(np.array([0.5, 2.0]), shadows, group_in)
    out_mean = shadows[~group_in[:, 0], 0].mean()
    sd = shadows[~group_in[:, 0], 0].std(ddof=1)
    assert table.loc[0, "t"] == pytest.approx((out_mean - 0.5) / (sd * np.sqrt(1 + 1 / 3)))
    assert table.loc[0, "verdict"] == "leak" and table.loc[1, "verdict"] != "leak"
    assert table.loc[0, "member_effect"] == pytest.approx(
        out_mean - shadows[group_in[:, 0], 0].mean()
    )


def test_bad_group_requests_are_refused():
    adata = su.data.synthetic_pbmc(n_cells=120, n_genes=40, n_donors=4, seed=1)
    recipe = su.Recipe(model_kwargs={"n_latent": 2}, train_kwargs={"max_epochs": 1})
    kw = {"recipe": recipe, "n_shadows": 2, "cache_dir": False}
    with pytest.raises(ValueError, match=r"not a column of adata\.obs"):
        su.MembershipInference(adata, group_key="patient", **kw)
    one = adata.copy()
    one.obs["site"] = "A"
    with pytest.raises(ValueError, match="at least 4 groups, found 1"):
        su.MembershipInference(one, group_key="site", **kw)
    three = adata[adata.obs["donor"] != "donor_0"].copy()
    with pytest.raises(ValueError, match="at least 4 groups, found 3"):
        su.MembershipInference(three, group_key="donor", **kw)
    with pytest.raises(ValueError, match="fewer than 200 cells"):
        su.MembershipInference(adata, group_key="donor", min_group_cells=200, **kw)
    gaps = adata.copy()
    gaps.obs["donor"] = gaps.obs["donor"].astype(object)
    gaps.obs.iloc[:3, gaps.obs.columns.get_loc("donor")] = None
    with pytest.raises(ValueError, match="3 pool cells have no 'donor'"):
        su.MembershipInference(gaps, group_key="donor", **kw)
    plain = su.MembershipInference(adata, **kw)
    with pytest.raises(ValueError, match="construct MembershipInference with group_key"):
        plain.audit_groups(None)


def test_cli_writes_a_donor_level_audit(tmp_path, capsys):
    import scvi

    from scvi_unlearn.cli import main

    adata = su.data.synthetic_pbmc(n_cells=160, n_genes=60, n_donors=4, seed=4)
    lab = adata.copy()
    scvi.model.SCVI.setup_anndata(lab)
    plain = scvi.model.SCVI(lab, n_latent=4, n_hidden=32)
    plain.train(max_epochs=3, train_size=0.8, accelerator="cpu", enable_progress_bar=False)
    plain.save(str(tmp_path / "model"), overwrite=True)
    adata.write_h5ad(tmp_path / "data.h5ad")
    out = tmp_path / "out"
    code = main(["audit", str(tmp_path / "model"), str(tmp_path / "data.h5ad"),
                 "--n-shadows", "2", "--group-key", "donor", "--cache-dir",
                 str(tmp_path / "cache"), "--accelerator", "cpu", "--out", str(out)])  # fmt: skip
    assert code == 0
    report = su.GroupAuditReport.from_json(str(out / "group_audit.json"))
    assert sorted(report.table.index) == sorted(adata.obs["donor"].unique())
    assert "GroupAuditReport(4 groups by 'donor')" in capsys.readouterr().out
