"""Unit tests of the unlearning plans' building blocks (scvi_unlearn.train)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import scvi_unlearn as su
from scvi_unlearn.audit import per_cell_loss_terms
from scvi_unlearn.train import (
    BestStateSelector,
    CriticEnsemble,
    ExtraGradientUnlearningPlan,
    FisherScrubbingPlan,
    diagonal_fisher,
    fisher_noise_std,
    gather_tensors,
    ssd_dampening_factor,
)
from scvi_unlearn.train._adversarial import _restore, _snapshot, extragradient_step
from scvi_unlearn.train._common import eval_mode, iter_chunks, make_data_splitter, run_plan
from scvi_unlearn.train._critics import critic_losses, indistinguishability_loss


# -- Fisher math -------------------------------------------------------------------------------
def test_fisher_noise_is_larger_where_retain_fisher_is_smaller():
    fisher = torch.tensor([1e4, 1e2, 1.0, 1e-2, 0.0])
    std = fisher_noise_std(fisher, alpha=0.1, eps=1e-8, max_std=30.0)
    # strictly decreasing in the Fisher, scaled by alpha, capped for zero Fisher
    assert torch.all(std[1:] > std[:-1])
    assert std[2].item() == pytest.approx(0.1)
    assert std[4].item() == pytest.approx(0.1 * 30.0)
    assert torch.allclose(fisher_noise_std(fisher, alpha=0.2, max_std=30.0), 2 * std)
    assert torch.all(fisher_noise_std(fisher, alpha=0.0) == 0)
    with pytest.raises(ValueError):
        fisher_noise_std(fisher, alpha=-1.0)


def test_ssd_dampens_only_forget_dominated_parameters():
    f_forget = torch.tensor([100.0, 5.0, 50.0, 0.0])
    f_retain = torch.tensor([1.0, 1.0, 10.0, 0.0])
    factor = ssd_dampening_factor(f_forget, f_retain, selection_weight=10.0, dampening=1.0)
    assert factor[0].item() == pytest.approx(0.01)  # 100 > 10 * 1: dampened to F_r / F_f
    assert factor[1:].tolist() == [1.0, 1.0, 1.0]  # not selected
    assert ssd_dampening_factor(f_forget, f_retain, dampening=200.0)[0].item() == 1.0


@pytest.mark.parametrize("method", ["hooks", "functional"])
def test_diagonal_fisher_matches_per_cell_autograd(small_model, method):
    module = small_model.module
    tensors = gather_tensors(small_model, np.arange(6))
    fisher = diagonal_fisher(module, iter_chunks(tensors, 4), method)  # two batches
    params = dict(module.named_parameters())
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    with eval_mode(module):
        for i in range(6):  # the reference: one autograd call per cell
            cell = {k: v[i : i + 1] for k, v in tensors.items()}
            loss = per_cell_loss_terms(module, cell)["neg_elbo"].sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (k, _), g in zip(params.items(), grads):
                if g is not None:
                    expected[k] += g.pow(2) / 6
    assert set(fisher) == set(params)
    for k in params:
        assert torch.allclose(fisher[k], expected[k], rtol=1e-3, atol=1e-6), k
    # the mean of squared per-cell gradients exceeds the square of the mean gradient
    assert sum(float(v.sum()) for v in fisher.values()) > 0


@pytest.fixture(scope="module")
def covariate_model():
    """Batch covariates injected into every layer, layer norm and batch norm, gene-batch
    dispersion: every layer kind the hook Fisher handles, and a dispersion outside layers."""
    adata = su.data.synthetic_pbmc(n_cells=120, n_genes=40, seed=5)
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "a", "b")
    su.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = su.model.SCVI(
        adata, n_hidden=16, n_latent=3, n_layers=2, use_layer_norm="both",
        dispersion="gene-batch", encode_covariates=True,
    )  # fmt: skip
    model.train(max_epochs=3, accelerator="cpu", train_size=1.0, enable_progress_bar=False)
    return model


def _per_cell_loop_fisher(module, tensors):
    """The reference: one autograd call per cell."""
    params = dict(module.named_parameters())
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    n = next(iter(tensors.values())).shape[0]
    with eval_mode(module):
        for i in range(n):
            cell = {k: v[i : i + 1] for k, v in tensors.items()}
            loss = per_cell_loss_terms(module, cell)["neg_elbo"].sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (k, _), g in zip(params.items(), grads):
                if g is not None:
                    expected[k] += g.pow(2) / n
    return expected


def test_hook_fisher_matches_per_cell_autograd_on_every_layer_kind(covariate_model):
    module = covariate_model.module
    tensors = gather_tensors(covariate_model, np.arange(40))
    hooks = diagonal_fisher(module, iter_chunks(tensors, 32), "hooks")
    expected = _per_cell_loop_fisher(module, tensors)
    kinds = {type(m).__name__ for m in module.modules()}
    assert {"Linear", "BatchNorm1d", "LayerNorm"} <= kinds
    assert set(hooks) == set(expected)
    for k in expected:
        scale = float(expected[k].abs().max()) + 1e-12
        assert torch.allclose(hooks[k], expected[k], rtol=1e-4, atol=1e-6 * scale), k
    assert float(hooks["px_r"].sum()) > 0  # the dispersion (outside any layer) is counted
    # torch.func cannot trace scVI's one-hot covariates: a clear error, not a wrong answer
    with pytest.raises(RuntimeError, match="method='hooks'"):
        diagonal_fisher(module, iter_chunks(tensors, 8), "functional")


def test_hook_fisher_general_path_for_parameters_outside_layers(small_model, monkeypatch):
    """Parameters the dispersion shortcut cannot place take the batched-backward path."""
    from scvi_unlearn.train._fisher import _HookedLayers

    module = small_model.module
    tensors = gather_tensors(small_model, np.arange(12))
    monkeypatch.setattr(_HookedLayers, "_add_dispersion_squares", lambda *a, **k: False)
    general = diagonal_fisher(module, iter_chunks(tensors, 8), "hooks")
    expected = _per_cell_loop_fisher(module, tensors)
    assert torch.allclose(general["px_r"], expected["px_r"], rtol=1e-4, atol=1e-8)


def test_hook_fisher_refuses_a_layer_used_twice(small_model):
    module = copy.deepcopy(small_model.module)
    square = torch.nn.Linear(4, 4)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.square = square

        def forward(self, x):
            return self.square(self.square(x))  # one layer, two uses per cell

    module.z_encoder.mean_encoder = torch.nn.Sequential(module.z_encoder.mean_encoder, Twice())
    tensors = gather_tensors(small_model, np.arange(4))
    with pytest.raises(RuntimeError, match="ran twice"):
        diagonal_fisher(module, [tensors], "hooks")


def test_diagonal_fisher_rejects_unknown_method(small_model):
    with pytest.raises(ValueError, match="hooks"):
        diagonal_fisher(small_model.module, [], "backpack")


def test_fisher_plan_noise_follows_inverse_fisher(small_model):
    model = su.model.clone_model(small_model)
    before = {k: v.clone() for k, v in model.module.named_parameters()}
    cells = np.arange(64)
    plan = FisherScrubbingPlan(
        model.module, gather_tensors(model, cells), alpha=1e-3, max_std=100.0, seed=1
    )
    splitter = make_data_splitter(model, np.arange(model.adata.n_obs), batch_size=128)
    runner = run_plan(model, plan, splitter, max_epochs=0, accelerator="cpu")
    assert runner.trainer.progress_bar_callback is not None
    fisher = diagonal_fisher(
        small_model.module, iter_chunks(gather_tensors(small_model, cells), 64)
    )
    z = torch.cat(
        [
            ((p.detach() - before[k]) / fisher_noise_std(fisher[k], 1e-3, max_std=100.0)).ravel()
            for k, p in model.module.named_parameters()
        ]
    )
    # the realised noise, divided by its predicted std, is standard normal
    assert abs(z.mean().item()) < 0.05
    assert z.std().item() == pytest.approx(1.0, abs=0.05)
    assert plan.edit_summary_["n_fisher_cells"] == 64


# -- critics and the game ------------------------------------------------------------------
def test_critic_ensemble_is_seeded_and_independent():
    x = torch.randn(7, 5)
    a, b = CriticEnsemble(5, 3, seed=0), CriticEnsemble(5, 3, seed=0)
    assert torch.equal(a(x), b(x))
    out = a(x)
    assert out.shape == (3, 7)
    assert not torch.allclose(out[0], out[1])  # different critics
    x.requires_grad_(True)
    a(x, detach_params=True).sum().backward()
    assert x.grad is not None  # the VAE's view: gradients to the features only
    assert all(p.grad is None for p in a.parameters())


def test_privacy_loss_is_zero_only_at_indifference_and_not_saturating():
    assert indistinguishability_loss(torch.zeros(3, 5)).item() == pytest.approx(0.0, abs=1e-7)
    confident = torch.full((3, 5), 8.0, requires_grad=True)
    loss = indistinguishability_loss(confident)
    loss.backward()
    assert loss.item() > 1.0
    # gradient pushes the logits down with (almost) full strength: sigmoid(8) - 1/2 ~ 0.5
    assert torch.allclose(
        confident.grad * 15, torch.full((3, 5), torch.sigmoid(torch.tensor(8.0)) - 0.5)
    )
    # a critic at chance has balanced BCE log 2
    assert critic_losses(torch.zeros(2, 4), torch.zeros(2, 6)).tolist() == pytest.approx(
        [math.log(2)] * 2
    )


def _bilinear(step_fn, n_steps=200):
    x, y = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(1.0))
    opts = [torch.optim.SGD([x], lr=0.1), torch.optim.SGD([y], lr=0.1)]

    def grads():  # x minimises x * y, y maximises it
        x.grad, y.grad = y.detach().clone(), -x.detach().clone()

    for _ in range(n_steps):
        step_fn(opts, grads)
    return math.hypot(x.item(), y.item())


def test_extragradient_converges_where_simultaneous_steps_diverge():
    def simultaneous(opts, grads):
        grads()
        for opt in opts:
            opt.step()

    # On min_x max_y xy with step eta, gradient descent-ascent multiplies the radius by
    # sqrt(1 + eta^2) per step (spirals out); extragradient by sqrt(1 - eta^2 + eta^4) (in).
    eta, n, r0 = 0.1, 200, math.sqrt(2.0)
    assert _bilinear(simultaneous, n) == pytest.approx(r0 * (1 + eta**2) ** (n / 2), rel=1e-4)
    expected = r0 * (1 - eta**2 + eta**4) ** (n / 2)
    assert _bilinear(extragradient_step, n) == pytest.approx(expected, rel=1e-4)
    assert expected < 0.6 < r0


def test_extragradient_uses_lookahead_gradients_with_adam():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.Adam([w], lr=0.1)

    def grads():  # loss = sum(w^3) / 3, gradient w^2
        opt.zero_grad()
        w.grad = w.detach().pow(2)

    extragradient_step([opt], grads)
    # reference: Adam's first step is w - lr * sign(g); look-ahead then real step from w
    lookahead = torch.tensor([1.0, -2.0]) - 0.1 * torch.sign(torch.tensor([1.0, 4.0]))
    expected = torch.tensor([1.0, -2.0]) - 0.1 * torch.sign(lookahead.pow(2))
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert int(opt.state[w]["step"]) == 1  # the look-ahead step was undone in the state too


def test_snapshot_restore_undoes_a_step():
    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(4)
    opt.step()
    saved_w, saved_state = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
    snap = _snapshot(opt)
    w.grad = torch.randn(4)
    opt.step()
    _restore(opt, snap)
    assert torch.equal(w.detach(), saved_w)
    assert all(torch.equal(opt.state[w][k], v) for k, v in saved_state.items())


def test_selector_keeps_best_admissible_state_and_stops():
    module = torch.nn.Linear(1, 1)
    sel = BestStateSelector(target_auc=0.5, max_utility_loss=0.05, patience=2)
    assert not sel.update(module, -1, auc=0.9, retain_elbo=100.0)
    with torch.no_grad():
        module.weight.fill_(3.0)
    assert not sel.update(module, 0, auc=0.55, retain_elbo=101.0)
    with torch.no_grad():
        module.weight.fill_(7.0)
    assert not sel.update(module, 1, auc=0.5, retain_elbo=200.0)  # too costly: not admissible
    assert sel.update(module, 2, auc=0.8, retain_elbo=100.0)  # patience exhausted
    sel.restore(module)
    assert module.weight.item() == 3.0
    summary = sel.summary()
    assert summary["selected_epoch"] == 0
    assert summary["val_auc_warm_start"] == 0.9
    assert [e["admissible"] for e in summary["epochs"]] == [True, True, False, True]


def test_extragradient_plan_runs_under_lightning(small_model):
    model = su.model.clone_model(small_model)
    cells = np.arange(model.adata.n_obs)
    forget, nonmember, retain = cells[:12], cells[12:24], cells[24:]
    plan = ExtraGradientUnlearningPlan(
        model.module,
        gather_tensors(model, forget),
        gather_tensors(model, nonmember),
        forget_val_tensors=gather_tensors(model, forget[:4]),
        nonmember_val_tensors=gather_tensors(model, nonmember[:4]),
        critic_pretrain_steps=5,
        seed=0,
    )
    splitter = make_data_splitter(model, retain[:150], retain[150:], batch_size=64)
    runner = run_plan(model, plan, splitter, max_epochs=2, accelerator="cpu")
    trainer = runner.trainer
    assert trainer.progress_bar_callback is not None
    assert trainer.lightning_module is plan and not plan.automatic_optimization
    assert {"unlearn_auc_validation", "retain_elbo_validation"} <= set(trainer.logged_metrics)
    assert [r.epoch for r in plan.selector.records] == [-1, 0, 1]
    assert plan.critic_lr == pytest.approx(10 * plan.lr)
    # the small model is untouched: the plan trained the clone's module
    assert (
        not torch.equal(model.module.px_r.detach(), small_model.module.px_r.detach())
        or plan.selector.best_epoch == -1
    )
