"""The one verdict rule: reference band, stated power, underpowered audits, RMIA, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import t as t_dist

import scvi_unlearn as su
from scvi_unlearn._verdict import sampling_band
from scvi_unlearn.audit import (
    auc_null_se,
    combine_verdicts,
    detectable_auc,
    judge,
    reference_band,
    rmia_scores,
)
from scvi_unlearn.audit._report import AuditReport, score_attack


def _null_scores(n_members, n_nonmembers, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=n_members), rng.normal(size=n_nonmembers)


def test_detectable_auc_shrinks_with_cells_and_grows_with_the_band():
    sizes = [(5, 5), (20, 20), (60, 60), (500, 500)]
    values = [detectable_auc(m, n) for m, n in sizes]
    assert values == sorted(values, reverse=True)
    assert values[0] > 0.9 and values[-1] < 0.56
    assert detectable_auc(60, 60, reference=0.6) > detectable_auc(60, 60)
    # Under the null, the AUC's SD matches the formula (checked by simulation).
    sims = [su.audit.auc_from_scores(*_null_scores(30, 40, seed=s)) for s in range(2000)]
    assert np.std(sims) == pytest.approx(auc_null_se(30, 40), rel=0.1)


def test_a_tiny_audit_is_underpowered_never_no_evidence():
    m, n = _null_scores(5, 5)
    r = score_attack("loss", m, n, [], "", n_bootstrap=200)
    assert r.verdict == "underpowered"
    report = AuditReport({"loss": r}, {"n_members": 5, "n_nonmembers": 5})
    assert report.verdict == "underpowered"
    assert "UNDERPOWERED" in report.explain() and "--nonmembers" in report.explain()
    # With enough cells the same kind of null contrast is "no evidence of leak".
    m, n = _null_scores(300, 300)
    big = score_attack("loss", m, n, [], "", n_bootstrap=200)
    assert big.verdict == "no evidence of leak" and big.detectable_auc < 0.6


def test_a_seen_leak_is_a_leak_however_small_the_audit():
    r = score_attack("loss", np.arange(10.0, 18.0), np.arange(8.0), [], "", n_bootstrap=200)
    assert r.auc == 1.0 and r.verdict == "leak"


def test_tpr_below_one_over_n_nonmembers_is_not_measurable():
    m, n = _null_scores(50, 50)
    r = score_attack("loss", m + 1, n, [], "", n_bootstrap=100)
    assert np.isnan(r.tpr_at_1pct_fpr) and np.isnan(r.tpr_at_1pct_fpr_ci[0])
    assert np.isnan(r.tpr_at_01pct_fpr) and r.min_measurable_fpr == pytest.approx(0.02)
    m, n = _null_scores(50, 150)
    r = score_attack("loss", m + 1, n, [], "", n_bootstrap=100)
    assert np.isfinite(r.tpr_at_1pct_fpr) and np.isnan(r.tpr_at_01pct_fpr)


def test_family_verdict_is_stricter_than_each_attack():
    # An AUC whose 95% CI clears the band but whose Bonferroni CI (5 attacks) does not.
    rng = np.random.default_rng(3)
    for shift in np.linspace(0.2, 0.8, 25):
        r = score_attack("loss", rng.normal(shift, 1, 150), rng.normal(0, 1, 150), [], "",
                         n_bootstrap=2000, n_attacks=5)  # fmt: skip
        if r.verdict == "leak" and r.family_verdict != "leak":
            break
    else:
        pytest.fail("no shift separated the per-attack and the family verdict")
    assert r.auc_ci_family[0] < r.auc_ci[0] and r.auc_ci_family[1] > r.auc_ci[1]
    assert AuditReport({"loss": r}).verdict == r.family_verdict


def test_reference_band_is_the_prediction_interval_of_one_more_model():
    aucs = [0.5, 0.52, 0.48, 0.51]
    low, high = reference_band(aucs)
    half = t_dist.ppf(0.975, 3) * np.std(aucs, ddof=1) * np.sqrt(1 + 1 / 4)
    assert (low, high) == pytest.approx((np.mean(aucs) - half, np.mean(aucs) + half))
    assert reference_band(aucs, level=0.99)[1] > high  # the family level widens it
    assert reference_band([0.9, 1.0, 1.0]) [1] == 1.0  # fmt: skip
    assert reference_band([0.5, 0.6], pooled_interval=(0.45, 0.55)) == (0.45, 0.55)
    assert all(np.isnan(reference_band([])))
    # Tied references: the floor keeps a band of non-zero width.
    assert reference_band([0.5] * 3, min_sd=0.01)[1] > 0.5
    with pytest.raises(ValueError, match="at least 3 of them"):
        reference_band([0.5, 0.6])


def _paired_audits(n_audits, shift, n=60, k=8, model_sd=0.5, seed=0):
    """Simulated audits: per-cell scores = the cell's own score (shared by every model) plus
    each model's noise; the audited model adds ``shift`` to its members' scores."""
    rng = np.random.default_rng(seed)
    cells = rng.normal(size=(n_audits, 1, 2 * n))
    scores = cells + model_sd * rng.normal(size=(n_audits, k + 1, 2 * n))
    scores[:, 0, :n] += shift
    wins = scores[..., :n, None] > scores[..., None, n:]
    aucs = wins.mean(axis=(-2, -1))  # (audits, models): model 0 is audited
    out = [su.audit.paired_verdict(a[0], a[1:], n, n) for a in aucs]
    gaps = aucs[:, 0] - aucs[:, 1:].mean(1)
    needed = np.array([o[4] for o in out]) - aucs[:, 1:].mean(1)
    return np.array([o[0] for o in out]), gaps, needed


def test_paired_rule_holds_its_level_and_its_stated_power():
    # Null: the audited model is one more model like the references. Two-sided 95%: a false
    # "leak" in 2.5% of audits (the old sampling band: far fewer, as it counted the cells'
    # sampling error three times).
    verdicts, _, _ = _paired_audits(1500, shift=0.0)
    assert 0.013 < np.mean(verdicts == "leak") < 0.04, np.mean(verdicts == "leak")
    # detectable_auc: at the shift whose mean AUC gap equals the stated detectable gap, the
    # rule calls a leak in about 80% of audits.
    for shift in np.linspace(0.05, 0.6, 12):
        verdicts, gaps, needed = _paired_audits(300, shift=shift, seed=1)
        if gaps.mean() >= needed.mean():
            break
    assert 0.68 < np.mean(verdicts == "leak") < 0.95, (shift, np.mean(verdicts == "leak"))


def test_paired_rule_decides_at_60_plus_60_with_8_retrains():
    # Worst case for the paired rule: references as different from one another as the cells'
    # sampling error allows (uncorrelated scores). The old rule needed about 0.78.
    assert detectable_auc(60, 60, n_references=8) <= 0.70
    assert detectable_auc(60, 60, n_references=8, reference_sd=0.02) < 0.6
    assert detectable_auc(60, 60, n_references=3) > detectable_auc(60, 60, n_references=8)
    with pytest.raises(ValueError, match="at least 3"):
        detectable_auc(60, 60, n_references=2)


def test_score_attack_uses_the_paired_rule_with_reference_models():
    m, n = _null_scores(60, 60)
    refs = [0.5, 0.51, 0.49, 0.5, 0.52, 0.48, 0.5, 0.5]
    # The point AUC is compared with the prediction band, not its CI.
    r = score_attack("loss", m + 0.5, n, refs, "8 reference models", n_bootstrap=200, n_attacks=6)
    assert r.paired and r.verdict == "leak" and r.reference_band[1] < 0.56
    # The earlier rule (the audited CI against mean +- 2 sqrt(SD^2 + SE^2)) would not have.
    old = sampling_band(
        refs, [(a - 1.96 * auc_null_se(60, 60), a + 1.96 * auc_null_se(60, 60)) for a in refs]
    )
    assert r.auc_ci[0] < old[1]
    assert r.reference_interval_family[1] > r.reference_band[1]
    report = AuditReport({"loss": r}, {"n_members": 60, "n_nonmembers": 60})
    assert report.verdict == r.family_verdict
    again = AuditReport.from_json(report.to_json())
    assert again.results["loss"].paired and again.verdict == report.verdict == "leak"


def test_judge_and_combine():
    assert judge((0.2, 0.35), (0.4, 0.6), 0.7) == "below reference"
    assert judge((0.45, 0.62), (float("nan"), float("nan")), 0.7) == "no evidence of leak"
    assert judge((0.45, 0.62), (0.4, 0.6), float("inf")) == "underpowered"
    assert combine_verdicts(["underpowered", "below reference"]) == "below reference"
    assert combine_verdicts(["underpowered"] * 3) == "underpowered"
    with pytest.raises(ValueError, match="Unknown verdicts"):
        combine_verdicts(["maybe"])


def test_rmia_ranks_by_likelihood_ratio_against_population():
    rng = np.random.default_rng(0)
    shadow = rng.normal(10, 1, size=(8, 200))
    in_mask = su.audit.balanced_membership(8, 200, seed=0)
    shadow[in_mask] -= 2  # shadows that trained on a cell fit it better
    target = shadow.mean(0) + 1
    members = np.arange(100)
    target[members] -= 2.5
    population = np.zeros(200, bool)
    population[100:] = True
    s = rmia_scores(target, shadow, in_mask, population)
    assert su.audit.auc_from_scores(s[members], s[100:]) > 0.9
    assert ((s >= 0) & (s <= 1)).all()
    # A cell with no OUT reference model has no score.
    in_mask[:, 0] = True
    assert np.isnan(rmia_scores(target, shadow, in_mask, population)[0])


def test_rmia_never_compares_a_population_cell_with_itself():
    # Zero reference losses: each cell's log LR is minus its target loss.
    log_lr = np.array([5.0, 1.0, 2.0, 3.0, 4.0])
    shadow, out = np.zeros((2, 5)), np.zeros((2, 5), bool)
    s = rmia_scores(-log_lr, shadow, out, population=np.array([1, 2, 3, 4]))
    # A member beats 4 of 4 population cells; a population cell is ranked among the other 3.
    assert s.tolist() == [1.0, 0.0, 1 / 3, 2 / 3, 1.0]


def test_rmia_auc_is_unbiased_on_null_audits():
    # Members and non-members drawn alike: the mean AUC must be 0.5. Comparing each non-member
    # with itself would add about 0.5 / n_nonmembers (+0.05 here).
    rng = np.random.default_rng(1)
    n, aucs = 10, []
    for _ in range(400):
        shadow = rng.normal(0, 1, size=(4, 2 * n))
        in_mask = np.zeros((4, 2 * n), bool)
        target = rng.normal(0, 1, size=2 * n)
        population = np.r_[np.zeros(n, bool), np.ones(n, bool)]
        s = rmia_scores(target, shadow, in_mask, population)
        aucs.append(su.audit.auc_from_scores(s[:n], s[n:]))
    assert abs(np.mean(aucs) - 0.5) < 0.02, np.mean(aucs)


def test_rmia_runs_in_the_audit(overfit_case):
    case = overfit_case
    report = case["mi"].audit(case["model"], members=case["train"], nonmembers=case["held"])
    rmia = report.results["rmia"]
    assert rmia.auc > 0.8 and rmia.verdict == "leak"
    assert report.results["lira_online"].family_verdict == "leak"


def test_reference_model_on_other_genes_is_refused_by_role(overfit_case, small_model):
    case = overfit_case
    with pytest.raises(ValueError, match=r"reference model 0: .*genes do not match"):
        case["mi"].audit(
            case["model"], members=case["train"][:20], nonmembers=case["held"][:20],
            reference_models=[small_model] * 3, attacks=("loss",),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("verdict", "loss", "exact", "expected"),
    [
        ("no evidence of leak", 0.01, False, "forgotten"),
        ("no evidence of leak", 0.29, False, "forgotten, utility lost"),  # the demo's Fisher
        ("no evidence of leak", None, False, "forgotten, utility lost"),
        ("leak", -0.1, False, "not forgotten"),
        ("below reference", 0.0, False, "over-forgotten"),
        ("underpowered", 0.0, False, "not judged (underpowered)"),
        ("below reference", 0.0, True, "forgotten"),  # an exact retrain's audit noise
        ("leak", 0.2, True, "forgotten, utility lost"),
    ],
)
def test_overall_result_needs_privacy_and_utility(verdict, loss, exact, expected):
    assert su.audit.overall_result(verdict, loss, exact=exact) == expected


def test_overall_result_rejects_unknown_verdicts():
    with pytest.raises(ValueError, match="Unknown verdict"):
        su.audit.overall_result("fine", 0.0)
