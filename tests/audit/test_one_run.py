"""The one-run DP audit: a valid bound with power; canaries never reach the model's data."""

from __future__ import annotations

import math

import numpy as np
import opacus  # noqa: F401  (in the test extra: a missing opacus fails, never skips)
import pytest
import scvi
from scipy import stats

import scvi_unlearn as su
from scvi_unlearn._compat import instance_managers
from scvi_unlearn.audit._one_run import (
    CANARY_PREFIX,
    guess_and_count,
    make_canaries,
    one_run_epsilon,
    one_run_p_value,
)
from scvi_unlearn.train import train_dp

QUIET = {"accelerator": "cpu", "enable_progress_bar": False}
LAYER_NORM = {"use_batch_norm": "none", "use_layer_norm": "both"}

pytestmark = pytest.mark.dp


@pytest.fixture(scope="module")
def adata():
    data = su.data.synthetic_pbmc(n_cells=300, n_genes=100, seed=4)
    su.model.SCVI.setup_anndata(data)
    return data


def fresh_model(adata, seed=0):
    scvi.settings.seed = seed
    return su.model.SCVI(adata, n_latent=4, **LAYER_NORM)


def test_without_delta_the_bound_is_the_binomial_tail_at_the_confidence():
    eps = one_run_epsilon(1000, 100, 80, delta=0.0)
    q = 1 / (1 + math.exp(-eps))
    assert stats.binom.sf(79, 100, q) == pytest.approx(0.05, rel=1e-4)
    assert one_run_epsilon(1000, 100, 50, delta=0.0) == 0.0  # chance rules nothing out
    # more correct guesses rule out more; a delta only weakens the bound
    assert one_run_epsilon(1000, 100, 90, 0.0) > eps > one_run_epsilon(1000, 100, 70, 0.0)
    assert one_run_epsilon(1000, 100, 80, delta=1e-4) < eps
    assert one_run_p_value(1000, 100, 80, eps, 1e-4) >= one_run_p_value(1000, 100, 80, eps, 0)


def test_the_bound_stays_below_a_known_epsilon_at_its_confidence_and_has_power():
    # randomized response at epsilon = 1: each guess right with probability e / (1 + e), the
    # most any (1, 0)-DP mechanism allows
    rng = np.random.default_rng(0)
    eps, m = 1.0, 1000
    p_right = math.exp(eps) / (1 + math.exp(eps))
    estimates = np.array([
        one_run_epsilon(m, m, int(rng.binomial(m, p_right)), delta=0.0) for _ in range(400)
    ])  # fmt: skip
    assert np.mean(estimates > eps) <= 0.08  # 5% expected; 400 draws
    assert np.median(estimates) > 0.75  # and it is not vacuous


def test_guesses_take_the_highest_scores_as_in_and_the_lowest_as_out():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, True, False, True, False, False])
    assert guess_and_count(scores, included, 4) == (4, 4)
    assert guess_and_count(-scores, included, 4) == (4, 0)
    assert guess_and_count(scores, included, 6) == (6, 4)


def test_canaries_are_unlike_cells_and_borrow_real_covariates(adata):
    model = fresh_model(adata)
    canaries = make_canaries(model, np.arange(200), 30, seed=1, canary_genes=5)
    x = canaries.X.toarray()
    assert canaries.n_obs == 30 and canaries.n_vars == adata.n_vars
    assert np.all((x > 0).sum(1) <= 5) and np.all(x.sum(1) > 0)
    assert all(name.startswith(CANARY_PREFIX) for name in canaries.obs_names)
    assert set(canaries.obs["cell_type"]) <= set(adata.obs["cell_type"])
    again = make_canaries(model, np.arange(200), 30, seed=1, canary_genes=5)
    np.testing.assert_array_equal(x, again.X.toarray())  # same seed, same canaries


def test_a_dp_run_with_canaries_reports_an_epsilon_hat_and_keeps_only_real_cells(adata, tmp_path):
    model = fresh_model(adata)
    managers_before = len(instance_managers(model))
    summary = model.train_private(target_epsilon=2.0, max_epochs=3, canaries=100, **QUIET)
    audit = summary["one_run_audit"]
    assert audit["n_canaries"] == 100 and 30 < audit["n_included"] < 70
    assert audit["n_guesses"] == 20 and 0 <= audit["n_correct"] <= 20
    assert audit["epsilon"] == summary["epsilon"] <= 2.0
    assert audit["consistent"] and audit["epsilon_hat"] <= audit["epsilon"]
    assert summary["n_train"] == 270  # the real training cells
    assert summary["n_units"] == 270 + audit["n_included"]  # canaries are accounted for
    assert model.adata is adata and adata.n_obs == 300
    assert np.asarray(model.train_indices).max() < 300
    assert not any(n.startswith(CANARY_PREFIX) for n in model.train_obs_names_)
    assert len(instance_managers(model)) == managers_before  # the copy with canaries is gone
    model.save(str(tmp_path), overwrite=True)
    assert su.model.SCVI.load(str(tmp_path), adata=adata).dp_privacy_["one_run_audit"] == audit


def test_the_audit_detects_canaries_in_training_without_noise(adata):
    # No noise, no clipping: an epsilon of infinity, and canaries the model has memorised.
    model = fresh_model(adata)
    summary = train_dp(model, noise_multiplier=0.0, max_grad_norm=1e6, max_epochs=150, lr=1e-2,
                       canaries=100, canary_guesses=40, canary_genes=5, **QUIET)  # fmt: skip
    audit = summary["one_run_audit"]
    assert audit["n_correct"] >= 34, audit
    assert audit["epsilon_hat"] > 1.0 and summary["epsilon"] == math.inf


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"canaries": 1}, "integer >= 2"),
        ({"canaries": 1000}, "more than the 270 training cells"),
        ({"canaries": 20, "canary_guesses": 30}, "exceeds canaries"),
        ({"canaries": 20, "canary_genes": 0}, "canary_genes"),
        ({"canaries": 20, "privacy_unit": "donor", "donor_key": "donor"}, "cell-level"),
    ],
)
def test_bad_canary_settings_are_refused(adata, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_dp(fresh_model(adata), target_epsilon=1.0, max_epochs=1, **kwargs, **QUIET)
