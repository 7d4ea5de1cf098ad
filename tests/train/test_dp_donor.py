"""Donor-level DP-SGD: donor sampling, per-donor clipping, accounting over donors, errors."""

from __future__ import annotations

import numpy as np
import opacus  # noqa: F401  (in the test extra: a missing opacus fails, never skips)
import pytest
import scvi
import torch
from test_dp import LAYER_NORM, QUIET  # the DP tests' settings, shared

import scvi_unlearn as su
from scvi_unlearn.module import per_cell_loss_terms
from scvi_unlearn.train import gather_tensors, train_dp
from scvi_unlearn.train._dp import (
    DONOR_CODE_KEY,
    DonorDPTrainingPlan,
    _DonorSampler,
    donor_codes,
    privacy_spent,
)

pytestmark = pytest.mark.dp


@pytest.fixture(scope="module")
def adata():
    data = su.data.synthetic_pbmc(n_cells=200, n_genes=40, seed=2)
    data.obs["donor"] = np.array([f"d{i % 5}" for i in range(data.n_obs)])
    su.model.SCVI.setup_anndata(data)
    return data


def fresh_model(adata, seed: int = 0, **kwargs):
    scvi.settings.seed = seed
    return su.model.SCVI(adata, n_hidden=16, n_latent=3, **{**LAYER_NORM, **kwargs})


def test_accounting_runs_over_donors_and_is_saved_per_donor(adata, tmp_path):
    model = fresh_model(adata)
    summary = model.train_private(
        target_epsilon=5.0, max_epochs=2, privacy_unit="donor", donor_key="donor",
        cells_per_donor=10, donors_per_batch=2, **QUIET,
    )  # fmt: skip
    assert summary["privacy_unit"] == "donor" and summary["n_donors"] == summary["n_units"] == 5
    q = 2 / 5
    assert summary["sample_rate"] == pytest.approx(q)
    assert summary["delta"] == pytest.approx(0.1 / 5)  # the default counts donors, not cells
    # an epoch: as many steps as make the expected cells seen the training cells (180)
    assert summary["steps_per_epoch"] == int(np.ceil(180 / (q * 5 * 10)))
    steps = summary["steps"]
    assert steps == 2 * summary["steps_per_epoch"]
    expected = privacy_spent(summary["noise_multiplier"], q, steps, summary["delta"])
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9) and expected <= 5.0
    assert set(summary["epsilon_per_donor"]) == {f"d{i}" for i in range(5)}
    assert set(summary["epsilon_per_donor"].values()) == {summary["epsilon"]}
    model.save(str(tmp_path), overwrite=True)
    loaded = su.model.SCVI.load(str(tmp_path), adata=adata)
    assert loaded.dp_privacy_["epsilon_per_donor"] == summary["epsilon_per_donor"]


def test_protecting_a_donor_costs_more_noise_than_protecting_a_cell(adata):
    # The same budget for a unit of 36 cells: donor sampling makes each step draw fewer,
    # larger units, so for the same epsilon the noise multiplier is larger.
    donor = train_dp(fresh_model(adata), target_epsilon=5.0, max_epochs=2, privacy_unit="donor",
                     donor_key="donor", cells_per_donor=10, **QUIET)  # fmt: skip
    cell = train_dp(fresh_model(adata), target_epsilon=5.0, max_epochs=2, **QUIET)
    assert donor["noise_multiplier"] > cell["noise_multiplier"]
    assert cell["privacy_unit"] == "cell" and "epsilon_per_donor" not in cell


def test_donor_sampler_draws_donors_at_the_rate_and_caps_their_cells():
    codes = np.repeat(np.arange(6), [3, 50, 50, 20, 9, 40])
    sampler = _DonorSampler(codes, 0.3, 8, steps=3000, generator=torch.Generator().manual_seed(0))
    joined = np.zeros(6)
    for positions in sampler:
        assert np.all(np.diff(positions) > 0)  # sorted, no cell twice
        per_donor = np.bincount(codes[positions], minlength=6)
        assert per_donor.max(initial=0) <= 8
        assert np.all(per_donor[per_donor > 0] == np.minimum(np.bincount(codes), 8)[per_donor > 0])
        joined += per_donor > 0
    rates = joined / 3000
    assert np.all(np.abs(rates - 0.3) < 0.04), rates


def test_each_donor_gradient_is_clipped_and_the_clipped_gradients_summed(adata):
    model = fresh_model(adata, dropout_rate=0.0)
    module = model.module
    plan = DonorDPTrainingPlan(
        module, noise_multiplier=0.0, max_grad_norm=0.5, sample_rate=1.0, n_train=5,
        per_cell_loss="posterior_mean", n_epochs_kl_warmup=None,
    )  # fmt: skip
    cells = np.arange(0, 30)
    tensors = gather_tensors(model, cells)
    codes, _ = donor_codes(adata, "donor", cells)
    total, raw, clipped = plan.clipped_gradient_sum({**tensors, DONOR_CODE_KEY: codes})
    assert raw.numel() == 5 and bool((clipped <= 0.5 + 1e-5).all()) and bool((raw > 0.5).any())
    # reference: one donor at a time, its mean loss's gradient clipped by hand
    params = dict(module.named_parameters())
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for d in range(5):
        rows = torch.as_tensor(codes == d)
        chunk = {k: v[rows] for k, v in tensors.items()}
        terms = per_cell_loss_terms(module, chunk)
        loss = (terms["reconstruction_nll"] + terms["kl_z"]).mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert float(norm) == pytest.approx(float(raw[d]), rel=1e-4)
        scale = min(1.0, 0.5 / (float(norm) + 1e-6))
        for k, g in zip(params, grads):
            expected[k] += scale * g
    for k in params:
        torch.testing.assert_close(total[k], expected[k], rtol=1e-4, atol=1e-6)


def test_same_seed_same_donor_level_model(adata):
    runs = []
    for _ in range(2):
        model = fresh_model(adata)
        train_dp(model, noise_multiplier=1.0, max_epochs=1, privacy_unit="donor",
                 donor_key="donor", **QUIET)  # fmt: skip
        runs.append(su.train.weights_fingerprint(model.module))
    assert runs[0] == runs[1]


def test_donor_level_bad_input_is_refused(adata):
    model = fresh_model(adata)
    with pytest.raises(ValueError, match="needs `donor_key`"):
        train_dp(model, target_epsilon=1.0, privacy_unit="donor", **QUIET)
    with pytest.raises(ValueError, match=r"not a column of adata\.obs"):
        train_dp(model, target_epsilon=1.0, privacy_unit="donor", donor_key="patient", **QUIET)
    with pytest.raises(ValueError, match="Unknown privacy_unit"):
        train_dp(model, target_epsilon=1.0, privacy_unit="sample", **QUIET)
    with pytest.raises(ValueError, match="cells_per_donor"):
        train_dp(model, target_epsilon=1.0, privacy_unit="donor", donor_key="donor",
                 cells_per_donor=0, **QUIET)  # fmt: skip
    with pytest.raises(ValueError, match="target_epsilon"):
        train_dp(model, target_epsilon=-1.0, privacy_unit="donor", donor_key="donor", **QUIET)
    data = adata.copy()
    data.obs["one"] = "only"
    with pytest.raises(ValueError, match="at least two donors"):
        donor_codes(data, "one", np.arange(data.n_obs))
    data.obs["gap"] = data.obs["donor"].astype(object)
    data.obs.loc[data.obs_names[:3], "gap"] = np.nan
    with pytest.raises(ValueError, match="3 cells without a donor"):
        donor_codes(data, "gap", np.arange(data.n_obs))
    data.obs["cat"] = data.obs["donor"].astype("category").cat.add_categories(["ghost"])
    with pytest.raises(ValueError, match="have no cells"):
        donor_codes(data, "cat", np.arange(data.n_obs))
