"""DP-SGD training of scVI (scvi_unlearn.train._dp): accounting, clipping, aggregation, errors."""

from __future__ import annotations

import contextlib
import copy
import json
import sys

import numpy as np
import opacus  # noqa: F401  (in the test extra: a missing opacus fails, never skips)
import pytest
import scvi
import torch
from _vmap_reference import (
    VmapDPTrainingPlan,
    clipped_gradient_sum,
    per_cell_gradients,
    vmap_training,
)

import scvi_unlearn as su
from scvi_unlearn.module import per_cell_loss_terms
from scvi_unlearn.train import DPTrainingPlan, gather_tensors, train_dp
from scvi_unlearn.train._dp import (
    PRIVACY_FILE,
    PoissonDataSplitter,
    load_privacy,
    privacy_spent,
    save_privacy,
)

QUIET = {"accelerator": "cpu", "enable_progress_bar": False}
LAYER_NORM = {"use_batch_norm": "none", "use_layer_norm": "both"}

pytestmark = pytest.mark.dp  # DP-SGD (opacus for accounting): CI runs it


@pytest.fixture(scope="module")
def adata():
    data = su.data.synthetic_pbmc(n_cells=120, n_genes=50, seed=0)
    su.model.SCVI.setup_anndata(data)
    return data


def fresh_model(adata, seed: int = 0, **kwargs):
    """A freshly initialised layer-norm scVI (weights fixed by ``seed``)."""
    scvi.settings.seed = seed
    return su.model.SCVI(adata, n_hidden=16, n_latent=4, **{**LAYER_NORM, **kwargs})


# -- accounting -----------------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_recorded_epsilon_matches_an_independent_opacus_accountant(adata, accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    model = fresh_model(adata)
    summary = train_dp(
        model, noise_multiplier=1.1, max_epochs=2, batch_size=32, accountant=accountant, **QUIET
    )
    n_train = 108  # train_size=0.9 of 120 cells
    q = 32 / n_train
    assert summary["n_train"] == n_train == len(model.train_indices)
    assert summary["sample_rate"] == pytest.approx(q)
    assert summary["delta"] == pytest.approx(0.1 / n_train)  # the default: well below 1 / n
    assert summary["steps"] == 2 * int(1 / q) == 6
    reference = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    reference.history = [(1.1, q, 6)]
    expected = reference.get_epsilon(delta=0.1 / n_train)
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert privacy_spent(1.1, q, 6, 0.1 / n_train, accountant) == pytest.approx(expected)
    assert model.dp_privacy_ == summary
    assert model.is_trained and len(model.validation_indices) == 12
    assert "elbo_validation" in model.history
    assert not any("train" in key for key in model.history)  # nothing about training cells


def test_noise_for_a_target_epsilon_spends_at_most_the_target(adata):
    model = fresh_model(adata)
    summary = train_dp(model, target_epsilon=3.0, target_delta=1e-3, max_epochs=2, batch_size=32,
                       **QUIET)  # fmt: skip
    assert 3.0 - 0.05 <= summary["epsilon"] <= 3.0
    assert summary["target_epsilon"] == 3.0 and summary["delta"] == 1e-3
    # the noise is (nearly) the least that fits the budget: 5% less overspends it
    sigma, q = summary["noise_multiplier"], summary["sample_rate"]
    assert privacy_spent(0.95 * sigma, q, summary["steps"], 1e-3) > 3.0


# -- clipping and aggregation ---------------------------------------------------------------------
def test_per_cell_gradients_are_clipped(adata):
    model = fresh_model(adata)
    train_dp(model, noise_multiplier=1.0, max_grad_norm=0.5, max_epochs=1, batch_size=32,
             plan_kwargs={"record_norms": True}, **QUIET)  # fmt: skip
    plan = model.trainer.lightning_module
    assert len(plan.norms_) == plan.steps_ == 3
    raw = torch.cat([r for r, _ in plan.norms_])
    clipped = torch.cat([c for _, c in plan.norms_])
    assert raw.numel() == clipped.numel() == sum(plan.batch_sizes_) > 0
    assert bool((clipped <= 0.5 + 1e-5).all())
    assert bool((raw > 0.5).any())  # the clipping did something
    small = raw <= 0.5  # cells already within the norm are left alone
    assert torch.allclose(clipped[small], raw[small])


def test_per_cell_gradients_match_autograd_one_cell_at_a_time():
    """The vmap reference, with batch covariates one-hot encoded inside the traced function."""
    data = su.data.synthetic_pbmc(n_cells=120, n_genes=50, seed=0)  # not a copy: own registry
    data.obs["batch"] = np.where(np.arange(data.n_obs) % 2, "a", "b")
    su.model.SCVI.setup_anndata(data, batch_key="batch")
    model = fresh_model(data, dropout_rate=0.0, dispersion="gene-batch")
    module = model.module.train()
    plan = DPTrainingPlan(
        module, noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=1.0, n_train=6,
        per_cell_loss="posterior_mean", n_epochs_kl_warmup=None,
    )  # fmt: skip
    tensors = gather_tensors(model, np.arange(6))
    grads, losses = per_cell_gradients(plan, tensors)
    params = dict(module.named_parameters())
    for i in range(6):
        cell = {k: v[i : i + 1] for k, v in tensors.items()}
        terms = per_cell_loss_terms(module, cell)
        loss = (terms["reconstruction_nll"] + terms["kl_z"]).sum()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        expected = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, p), g in zip(params.items(), expected):
            g = torch.zeros_like(p) if g is None else g
            scale = float(g.abs().max()) + 1e-6  # float32 rounding relative to the largest
            assert torch.allclose(grads[name][i], g, rtol=1e-4, atol=1e-5 * scale), name
    assert torch.nn.functional.one_hot(torch.tensor([1]), 2).tolist() == [[0, 1]]  # restored


def test_without_noise_or_clipping_a_step_is_the_mean_gradient_step(adata):
    """noise_multiplier=0, a huge clipping norm, every cell sampled: plain mean-gradient Adam."""
    model = fresh_model(adata, dropout_rate=0.0)
    initial = copy.deepcopy(model.module).train()
    cells = np.arange(100)
    lr = 1e-2
    summary = train_dp(model, noise_multiplier=0.0, max_grad_norm=1e9, max_epochs=1,
                       batch_size=200, lr=lr, indices=cells, per_cell_loss="posterior_mean",
                       plan_kwargs={"n_epochs_kl_warmup": None}, **QUIET)  # fmt: skip
    assert summary["sample_rate"] == 1.0 and summary["steps"] == 1
    assert summary["epsilon"] == float("inf")
    # the reference: scVI's optimizer, one step on the mean loss of all training cells
    tensors = gather_tensors(model, cells)
    optimizer = torch.optim.Adam(initial.parameters(), lr=lr, eps=0.01, weight_decay=1e-6)
    terms = per_cell_loss_terms(initial, tensors)
    (terms["reconstruction_nll"] + terms["kl_z"]).mean().backward()
    optimizer.step()
    trained = dict(model.module.named_parameters())
    for name, p in initial.named_parameters():
        assert torch.allclose(trained[name].cpu(), p, rtol=1e-4, atol=1e-6), name


def test_poisson_batches_vary_and_empty_batches_are_noise_only_steps(adata):
    model = fresh_model(adata)
    cells = np.arange(40)
    splitter = PoissonDataSplitter.from_model(
        model, cells, None, sample_rate=1 / 40, steps_per_epoch=40, seed=0
    )
    splitter.setup()
    sizes = [int(b["X"].shape[0]) for b in splitter.train_dataloader()]
    assert len(sizes) == 40 and 0 in sizes and max(sizes) >= 1
    # an empty batch: the update is pure noise of std sigma * C / expected batch size
    plan = DPTrainingPlan(model.module, noise_multiplier=2.0, max_grad_norm=0.5,
                          sample_rate=1 / 40, n_train=40, seed=1)  # fmt: skip
    empty = {k: v[:0] for k, v in gather_tensors(model, cells[:2]).items()}
    grads = plan.private_gradient(empty)
    noise = torch.cat([g.flatten() for g in grads.values()])
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 1.0, rel=0.05)
    # and a whole run with many empty batches trains and accounts every step
    summary = train_dp(model, noise_multiplier=1.0, max_epochs=1, batch_size=1, indices=cells,
                       **QUIET)  # fmt: skip
    plan = model.trainer.lightning_module
    assert summary["steps"] == 40 and 0 in plan.batch_sizes_


def test_same_seed_gives_identical_weights(adata):
    def run(seed):
        model = fresh_model(adata, seed=0)
        train_dp(model, noise_multiplier=1.0, max_epochs=1, batch_size=32, seed=seed, **QUIET)
        return {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# -- errors ---------------------------------------------------------------------------------------
def test_batch_norm_is_refused_with_the_fix(adata):
    scvi.settings.seed = 0
    model = su.model.SCVI(adata, n_hidden=16, n_latent=4)  # scVI's default: batch norm
    with pytest.raises(ValueError, match='use_batch_norm="none", use_layer_norm="both"'):
        train_dp(model, target_epsilon=1.0, max_epochs=1, **QUIET)
    with pytest.raises(ValueError, match="use_batch_norm"):
        DPTrainingPlan(model.module, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1,
                       n_train=100)  # fmt: skip
    assert not model.is_trained


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "target_epsilon"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": 1.0, "noise_multiplier": 1.0}, "not both"),
        ({"target_epsilon": 1.0, "target_delta": 0.0}, "target_delta"),
        ({"target_epsilon": 1.0, "target_delta": 1.0}, "target_delta"),
        ({"target_epsilon": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"target_epsilon": 1.0, "accountant": "gdp2"}, "accountant"),
    ],
)
def test_invalid_privacy_settings_are_refused(adata, kwargs, match):
    model = fresh_model(adata)
    with pytest.raises(ValueError, match=match):
        train_dp(model, max_epochs=1, **kwargs, **QUIET)
    assert not model.is_trained


def test_a_delta_of_one_over_n_or_more_is_warned_about(adata):
    model = fresh_model(adata)
    with pytest.warns(UserWarning, match="publishes a random training cell"):
        summary = train_dp(model, noise_multiplier=1.0, target_delta=1 / 100, max_epochs=1,
                           batch_size=32, **QUIET)  # fmt: skip
    assert summary["delta"] == 1 / 100  # 108 training cells: 1/100 > 1/108


@pytest.mark.parametrize("rate", [0.0, 1.5])
def test_sample_rate_outside_unit_interval_is_refused(adata, rate):
    with pytest.raises(ValueError, match="sample_rate"):
        DPTrainingPlan(fresh_model(adata).module, noise_multiplier=1.0, max_grad_norm=1.0,
                       sample_rate=rate, n_train=100)  # fmt: skip


def test_missing_opacus_says_how_to_install(adata, monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "scvi-unlearn\[dp\]"'):
        train_dp(fresh_model(adata), target_epsilon=1.0, max_epochs=1, **QUIET)


# -- persistence ----------------------------------------------------------------------------------
def test_privacy_summary_survives_save_and_load(adata, tmp_path):
    model = fresh_model(adata)
    summary = model.train_private(noise_multiplier=1.0, max_epochs=1, batch_size=32, **QUIET)
    model.save(str(tmp_path), overwrite=True)
    assert json.loads((tmp_path / PRIVACY_FILE).read_text())["noise_multiplier"] == 1.0
    assert save_privacy(model, str(tmp_path)) == str(tmp_path / PRIVACY_FILE)
    loaded = su.model.SCVI.load(str(tmp_path), adata=adata)
    assert loaded.dp_privacy_ == summary  # model.pt keeps the ``*_`` attributes
    del loaded.dp_privacy_
    assert load_privacy(loaded, str(tmp_path)) == pytest.approx(summary)
    assert save_privacy(fresh_model(adata), str(tmp_path / "none")) is None
    loaded.dp_privacy_ = {**summary, "noise_multiplier": 0.0, "epsilon": float("inf")}
    save_privacy(loaded, str(tmp_path))
    assert load_privacy(loaded, str(tmp_path))["epsilon"] == float("inf")


# -- ghost clipping -------------------------------------------------------------------------------
def _covariate_model(dispersion: str, dropout_rate: float = 0.0):
    data = su.data.synthetic_pbmc(n_cells=120, n_genes=50, seed=0)  # not a copy: own registry
    data.obs["batch"] = np.where(np.arange(data.n_obs) % 2, "a", "b")
    su.model.SCVI.setup_anndata(data, batch_key="batch")
    return fresh_model(data, dropout_rate=dropout_rate, dispersion=dispersion)


def _plan(module, per_cell_loss: str, max_grad_norm: float = 1.0, **kwargs):
    return DPTrainingPlan(
        module, noise_multiplier=0.0, max_grad_norm=max_grad_norm, sample_rate=1.0, n_train=24,
        per_cell_loss=per_cell_loss, n_epochs_kl_warmup=None, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
def test_ghost_clipping_equals_vmap_clipping(dispersion):
    """Same norms and clipped sum from hooks as from torch.func per-cell gradients."""
    model = _covariate_model(dispersion)
    module = model.module.train()
    tensors = gather_tensors(model, np.arange(24))
    norm = 100.0  # about the median raw norm here: some cells clipped, some not
    plan = _plan(module, "posterior_mean", norm)
    ghost, raw_g, clip_g = plan.clipped_gradient_sum(tensors)
    ref, raw_v, clip_v = clipped_gradient_sum(plan, tensors, chunk_size=10)  # 3 chunks
    assert torch.allclose(raw_g, raw_v, rtol=1e-4)
    assert bool((raw_v > norm).any()) and bool((raw_v < norm).any())
    assert torch.allclose(clip_g, clip_v, rtol=1e-4)
    assert set(ghost) == set(ref)
    for name, g in ref.items():
        scale = float(g.abs().max()) + 1e-6
        assert torch.allclose(ghost[name], g, rtol=1e-4, atol=1e-5 * scale), name


def test_ghost_clipping_of_the_sampled_elbo_matches_one_backward_per_cell():
    """scVI's own loss (sampled z, dropout on): the same forward differentiated cell by cell."""
    model = _covariate_model("gene", dropout_rate=0.2)
    module = model.module.train()
    plan = _plan(module, "elbo", max_grad_norm=100.0)
    tensors = gather_tensors(model, np.arange(24))
    params = dict(module.named_parameters())
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    norms = []

    def loss_and_reference(batch):
        """The plan's forward, differentiated cell by cell before the clipper sees it."""
        losses, px = plan.batch_losses(batch)
        for i in range(losses.shape[0]):
            grads = torch.autograd.grad(
                losses[i], list(params.values()), retain_graph=True, allow_unused=True
            )
            grads = [
                torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)
            ]
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            norms.append(norm)
            for name, g in zip(params, grads):
                expected[name] += min(1.0, 100.0 / (float(norm) + 1e-6)) * g
        return losses, px

    total, raw, _ = plan._ghost.clipped_sum(tensors, loss_and_reference, 100.0)
    assert torch.allclose(raw, torch.stack(norms), rtol=1e-4)
    assert bool((raw > 100.0).any()) and bool((raw < 100.0).any())
    for name, g in expected.items():
        scale = float(g.abs().max()) + 1e-6
        assert torch.allclose(total[name], g, rtol=1e-4, atol=1e-5 * scale), name


def test_ghost_clipping_refuses_layers_it_cannot_split(adata):
    from scvi_unlearn.train._ghost import GhostClipper

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Conv1d(1, 1, 2))
    with pytest.raises(ValueError, match=r"Conv1d.*linear or 1-d layer norm"):
        GhostClipper(module)
    with pytest.raises(ValueError, match="Unknown grad_sample_mode"):
        _plan(fresh_model(adata).module, "elbo", grad_sample_mode="per-sample")


def test_the_removed_vmap_mode_and_its_chunk_size_are_clear_errors(adata):
    """The torch.func path lives in the tests only (it patches torch); asking for it says so."""
    model = fresh_model(adata)
    for call in (
        lambda: _plan(model.module, "elbo", grad_sample_mode="vmap"),
        lambda: train_dp(model, noise_multiplier=1.0, grad_sample_mode="vmap", **QUIET),
    ):
        with pytest.raises(ValueError, match=r"'vmap' is no longer available.*ghost"):
            call()
    for call in (
        lambda: _plan(model.module, "elbo", chunk_size=8),
        lambda: train_dp(model, noise_multiplier=1.0, chunk_size=8, **QUIET),
    ):
        with pytest.raises(ValueError, match=r"`chunk_size`.*no longer accepted"):
            call()
    assert not model.is_trained


def test_ghost_and_vmap_training_agree_without_randomness(adata):
    """A whole DP run (noise, Poisson batches) gives the same weights by either path."""
    weights = []
    for reference in (False, True):
        model = fresh_model(adata, dropout_rate=0.0)
        with vmap_training() if reference else contextlib.nullcontext():
            train_dp(model, noise_multiplier=0.5, max_grad_norm=1.0, max_epochs=2,
                     batch_size=32, per_cell_loss="posterior_mean", seed=3,
                     **QUIET)  # fmt: skip
        plan = model.trainer.lightning_module
        assert isinstance(plan, VmapDPTrainingPlan) == reference
        assert model.dp_privacy_["grad_sample_mode"] == "ghost"
        weights.append({k: v.clone() for k, v in model.module.state_dict().items()})
    for name, w in weights[0].items():
        assert torch.allclose(w, weights[1][name], rtol=1e-3, atol=1e-5), name
