"""retrain_fast and reset_relearn: exact-on-a-budget and damage-then-relearn unlearning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scvi
import torch
from torch.distributions import Normal, kl_divergence

import scvi_unlearn as su
import scvi_unlearn.train._fast_retrain as methods_module
from scvi_unlearn.train._reset import reset_parameters_


def _lira_auc(case, model) -> float:
    """Online LiRA AUC of the forget cells against never-seen cells (the case's shadows)."""
    report = case["mi"].audit(
        model,
        members=case["forget"],
        nonmembers=case["nonmembers"],
        attacks=("lira_online",),
        n_bootstrap=20,
    )
    return report.results["lira_online"].auc


@pytest.fixture(scope="module")
def forget_case(overfit_case):
    """30 of the over-fitted model's training cells to forget, 30 never-seen cells."""
    train, held = overfit_case["train"], overfit_case["held"]
    return {**overfit_case, "forget": train[:30], "nonmembers": held[:30]}


def test_retrain_fast_never_sees_a_forget_cell_and_forgets(forget_case, monkeypatch):
    model, forget = forget_case["model"], forget_case["forget"]
    seen = {}
    original_run_plan = methods_module.run_plan

    def spy(fresh, plan, splitter, *args, **kwargs):
        seen["cells"] = fresh.adata.obs_names.copy()
        seen["train"] = fresh.adata.obs_names[np.asarray(splitter.external_indexing[0])].copy()
        return original_run_plan(fresh, plan, splitter, *args, **kwargs)

    monkeypatch.setattr(methods_module, "run_plan", spy)
    out = model.unlearn(forget, method="retrain_fast", accelerator="cpu", seed=1)
    forgotten = model.adata.obs_names[forget]
    assert not seen["cells"].isin(forgotten).any()  # not even in the data it was given
    retained = model.adata.obs_names[np.setdiff1d(forget_case["train"], forget)]
    assert set(seen["train"]) == set(retained)
    event = out.provenance["events"][-1]
    full = model.train_kwargs_["max_epochs"]
    budget = su.train.METHODS["retrain_fast"].params["budget"].default
    assert event["max_epochs"] == int(np.ceil(budget * full))
    assert event["metrics"]["budget"] == pytest.approx(event["max_epochs"] / full)
    # scVI's 400-epoch default warm-up scaled with the budget
    assert event["metrics"]["n_epochs_kl_warmup"] == round(400 * event["max_epochs"] / full)
    before, after = _lira_auc(forget_case, model), _lira_auc(forget_case, out)
    assert before > 0.75
    assert abs(after - 0.5) < abs(before - 0.5) - 0.15, (before, after)


def test_retrain_fast_budget_and_max_epochs(forget_case):
    model, forget = forget_case["model"], forget_case["forget"]
    out = model.unlearn(
        forget, method="retrain_fast", budget=0.1, accelerator="cpu", enable_progress_bar=False
    )
    assert out.provenance["events"][-1]["max_epochs"] == 30  # 10% of 300
    with pytest.raises(ValueError, match="budget"):
        model.unlearn(forget, method="retrain_fast", budget=0.0)


def test_retrain_fast_warm_start_from_a_model_that_never_saw_the_forget_cells(
    forget_case, tmp_path, monkeypatch
):
    model, forget, adata = forget_case["model"], forget_case["forget"], forget_case["adata"]
    retained = np.setdiff1d(forget_case["train"], forget)
    recipe = su.Recipe.from_model(model)
    recipe.train_kwargs["max_epochs"] = 3
    quiet = {"accelerator": "cpu", "enable_progress_bar": False}
    never_saw = recipe.fit_cells(adata, retained[:40], seed=2, **quiet)
    never_saw.save(str(tmp_path / "never_saw"))
    start = {}
    original_run_plan = methods_module.run_plan

    def spy(fresh, plan, splitter, *args, **kwargs):
        if not start:  # the first round starts from the warm-start weights
            start.update({k: v.clone() for k, v in fresh.module.state_dict().items()})
        return original_run_plan(fresh, plan, splitter, *args, **kwargs)

    monkeypatch.setattr(methods_module, "run_plan", spy)
    out = model.unlearn(forget, method="retrain_fast", budget=0.05, seed=1,
                        init_from=str(tmp_path / "never_saw"), **quiet)  # fmt: skip
    for name, weight in never_saw.module.state_dict().items():
        assert torch.equal(start[name], weight), name  # training started from its weights
    metrics = out.provenance["events"][-1]["metrics"]
    assert metrics["init_from"] == str(tmp_path / "never_saw")
    assert metrics["init_checked_disjoint"] and metrics["init_n_cells_seen"] == 40
    assert out.provenance["events"][-1]["method"] == "retrain_fast"

    # The original model saw the forget cells: refused, with the count.
    model.save(str(tmp_path / "original"))
    with pytest.raises(ValueError, match="saw 30 cells that must be forgotten"):
        model.unlearn(forget, method="retrain_fast", init_from=str(tmp_path / "original"))
    # A model that does not say which cells it trained on proves nothing.
    del never_saw.train_obs_names_
    never_saw.save(str(tmp_path / "unknown"))
    with pytest.raises(ValueError, match="does not record every cell it saw"):
        model.unlearn(forget, method="retrain_fast", init_from=str(tmp_path / "unknown"))
    with pytest.raises(FileNotFoundError, match="not found"):
        model.unlearn(forget, method="retrain_fast", init_from=str(tmp_path / "missing"))


def test_reset_masks_reset_the_intended_share_of_each_tensor(small_model):
    module = su.model.clone_model(small_model).module
    gen = torch.Generator().manual_seed(0)
    saliency = {n: torch.rand(p.shape, generator=gen) for n, p in module.named_parameters()}
    masks = su.train.reset_masks(saliency, 0.3, 0.05, torch.Generator().manual_seed(1))
    for name, mask in masks.items():
        n = mask.numel()
        n_top = round(0.3 * n)
        assert int(mask.sum()) == n_top + min(round(0.05 * n), n - n_top), name
        if n_top:  # the top share by saliency is inside the mask
            assert mask.flatten()[torch.topk(saliency[name].flatten(), n_top).indices].all()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    reset_parameters_(module, masks, seed=0)
    for name, param in module.named_parameters():
        changed = param.detach() != before[name]
        assert not (changed & ~masks[name]).any(), name  # nothing outside the mask moves
        if param.dim() == 2:  # randomly initialised weights: the reset entries get new values
            assert changed.sum() >= 0.9 * masks[name].sum(), name


def test_reset_relearn_forgets_and_draws_anew_per_request(forget_case):
    model, forget = forget_case["model"], forget_case["forget"]
    out = model.unlearn(forget, method="reset_relearn", accelerator="cpu", seed=0)
    event = out.provenance["events"][-1]
    assert event["max_epochs"] == int(np.ceil(0.15 * model.train_kwargs_["max_epochs"]))
    assert event["metrics"]["share_reset"] == pytest.approx(0.35, abs=0.01)
    before, after = _lira_auc(forget_case, model), _lira_auc(forget_case, out)
    assert after < before - 0.1, (before, after)
    other = model.unlearn(
        forget_case["train"][30:60], method="reset_relearn", accelerator="cpu", max_epochs=1
    )
    assert (
        other.provenance["events"][-1]["metrics"]["reset_seed"] != event["metrics"]["reset_seed"]
    )


@pytest.mark.parametrize("method", ["retrain_fast", "finetune"])
def test_a_single_cell_last_minibatch_is_dropped_not_fatal(method):
    """131 trained cells minus 2 forgotten = 2 x 64 + 1: batch norm cannot train on 1 cell."""
    adata = su.data.synthetic_pbmc(n_cells=200, n_genes=40, seed=1)
    recipe = su.Recipe(
        model_kwargs={"n_latent": 3, "n_hidden": 16},
        train_kwargs={"max_epochs": 3, "train_size": 1.0, "batch_size": 64},
    )
    model = recipe.fit_cells(adata, np.arange(131), accelerator="cpu", enable_progress_bar=False)
    extra = {} if method == "retrain_fast" else {"batch_size": 64}
    out = model.unlearn(
        [0, 1], method=method, max_epochs=2, accelerator="cpu", enable_progress_bar=False, **extra
    )
    assert len(out.train_indices) == 129


def test_a_forgotten_donor_loses_its_batch_columns():
    """A donor that is a batch category: the weights reading its one-hot column are reset."""
    adata = su.data.synthetic_pbmc(n_cells=160, n_genes=40, n_donors=4, seed=2)
    recipe = su.Recipe(
        setup_kwargs={"batch_key": "donor"},
        model_kwargs={"n_latent": 3, "n_hidden": 16},
        train_kwargs={"max_epochs": 3, "train_size": 1.0, "batch_size": 64},
    )
    model = su.model.SCVI.from_scvi(
        recipe.fit(adata, accelerator="cpu", enable_progress_bar=False)
    )
    codes = model.adata_manager.get_state_registry("batch").categorical_mapping.tolist()
    donor = codes.index("donor_1")
    forget = np.flatnonzero(model.adata.obs["donor"].to_numpy() == "donor_1")

    masks = su.train.covariate_masks(model.module, [donor])
    name = "decoder.px_decoder.fc_layers.Layer 0.0.weight"
    assert set(masks) == {name}  # scVI injects the batch into the decoder's first layer only
    weight = dict(model.module.named_parameters())[name]
    column = weight.shape[1] - 4 + donor  # the one-hot block closes the layer's input
    assert masks[name][:, column].all() and masks[name].sum() == weight.shape[0]

    # With no saliency or random share, the reset touches exactly the donor's column.
    module = copy.deepcopy(model.module)
    tensors = su.train.gather_tensors(model, forget)
    plan = su.train.ResetRelearnPlan(
        module, tensors, tensors, reset_fraction=0.0, random_fraction=0.0, reset_batches=[donor]
    )
    summary = plan.reset()
    assert summary["n_batch_weights_reset"] == weight.shape[0] == summary["n_reset"]
    after = dict(module.named_parameters())[name].detach()
    changed = (after != weight.detach()).any(0)
    assert changed[column] and changed.sum() == 1

    out = model.unlearn(forget, method="reset_relearn", max_epochs=1, accelerator="cpu")
    metrics = out.provenance["events"][-1]["metrics"]
    assert metrics["reset_batch_names"] == ["donor_1"]
    # Forgetting some, not all, of a donor's cells leaves its column to the saliency rule.
    partial = model.unlearn(forget[:5], method="reset_relearn", max_epochs=1, accelerator="cpu")
    assert partial.provenance["events"][-1]["metrics"]["reset_batches"] == []


# -- oracle matching ---------------------------------------------------------------------------
def test_oracle_targets_are_the_model_plus_out_minus_in_reference_means(small_model):
    module = small_model.module
    tensors = su.train.gather_tensors(small_model, np.arange(6))
    refs = []
    for k in range(4):  # four distinct "reference" models: the trained one, perturbed
        state = copy.deepcopy(module.state_dict())
        for name, value in state.items():
            if value.dtype.is_floating_point and "running" not in name:
                gen = torch.Generator().manual_seed(k)
                state[name] = value + 0.05 * torch.randn(value.shape, generator=gen)
        refs.append(state)
    in_mask = np.array(
        [[1, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 1], [1, 1, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0]], bool
    )
    targets = su.train.oracle_targets(module, refs, in_mask, tensors)

    from scvi_unlearn.train._oracle import model_outputs

    base_mu, base_score = model_outputs(module, tensors)
    probe = copy.deepcopy(module)
    outputs = []
    for state in refs:
        probe.load_state_dict(state)
        outputs.append(model_outputs(probe, tensors))
    for cell in range(6):
        ins = [outputs[k] for k in range(4) if in_mask[k, cell]]
        outs = [outputs[k] for k in range(4) if not in_mask[k, cell]]
        for j, base in ((0, base_mu), (1, base_score)):
            expected = (
                base[cell]
                + torch.stack([o[j][cell] for o in outs]).mean(0)
                - torch.stack([o[j][cell] for o in ins]).mean(0)
            )
            got = targets["log_mu" if j == 0 else "score"][cell]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the trained model's own weights are untouched
    torch.testing.assert_close(model_outputs(module, tensors)[1], base_score)


def test_oracle_targets_need_an_in_and_an_out_reference_per_cell(small_model):
    tensors = su.train.gather_tensors(small_model, np.arange(3))
    state = small_model.module.state_dict()
    in_mask = np.array([[1, 0, 1], [1, 1, 0]], bool)  # cell 0 is IN for both
    with pytest.raises(ValueError, match="one that left it out"):
        su.train.oracle_targets(small_model.module, [state, state], in_mask, tensors)


def test_oracle_matching_forgets_with_its_own_reference_pool(forget_case, overfit_reference_dir):
    model, forget = forget_case["model"], forget_case["forget"]
    tmp_path = overfit_reference_dir
    out = model.unlearn(
        forget, method="oracle_matching", accelerator="cpu", seed=0, max_epochs=20,
        reference_cache_dir=str(tmp_path), enable_progress_bar=False,
    )  # fmt: skip
    metrics = out.provenance["events"][-1]["metrics"]
    assert metrics["n_references"] == su.train.DEFAULT_N_REFERENCES
    assert metrics["reference_seed"] == su.train.REFERENCE_SEED_OFFSET
    # weights cached beside the features, as plain tensors
    assert len(list(tmp_path.rglob("model_*.pt"))) == su.train.DEFAULT_N_REFERENCES
    before, after = _lira_auc(forget_case, model), _lira_auc(forget_case, out)
    assert before > 0.75
    assert after < before - 0.2, (before, after)


def test_oracle_matching_grouped_references_leave_whole_groups_out(small_model, tmp_path):
    """For a request that forgets a group, each reference has the whole group IN or OUT."""
    adata = small_model.adata
    group = adata.obs["cell_type"].to_numpy()
    forget = np.flatnonzero(group == group[0])[:10]
    out = small_model.unlearn(
        forget, method="oracle_matching", group_key="cell_type", accelerator="cpu", seed=0,
        max_epochs=2, reference_cache_dir=str(tmp_path), enable_progress_bar=False,
    )  # fmt: skip
    assert out.provenance["events"][-1]["metrics"]["reference_group_key"] == "cell_type"
    grouped = su.train.method_reference_pool(
        small_model, cache_dir=str(tmp_path), keep_models=True, group_key="cell_type"
    )
    per_cell = su.train.method_reference_pool(small_model, cache_dir=str(tmp_path))
    for k in range(grouped.n_shadows):
        for g in np.unique(group):  # one membership per group and reference
            assert np.unique(grouped.in_mask[k, group == g]).size == 1
    # a separate pool from the per-cell one (its own cache entry), each cell OUT for half
    assert not np.array_equal(grouped.in_mask, per_cell.in_mask)
    assert (grouped.in_mask.sum(0) == grouped.n_shadows // 2).all()
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(small_model.module.state_dict().values(), out.module.state_dict().values())
    )
    assert changed


# -- contrastive latent ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def structured_case():
    """An over-fitted scVI; the forget set is a whole population (its trained half)."""
    adata = su.data.synthetic_pbmc(n_cells=300, n_genes=100, seed=0)
    split = su.data.membership_split(adata, ("cell_type", "CD14 Mono"), seed=0)
    su.model.SCVI.setup_anndata(adata)
    scvi.settings.seed = 0
    model = su.model.SCVI(adata, n_hidden=256, n_latent=10)
    model.train(
        max_epochs=400, accelerator="cpu", batch_size=128, enable_progress_bar=False,
        plan_kwargs={"lr": 1e-2},
        datasplitter_kwargs={"external_indexing": [split.train, np.zeros(0, int), split.heldout]},
    )  # fmt: skip
    return model, split


def _posteriors(model, cells, data_model=None):
    """q(z | x) of ``model`` on ``cells`` of ``data_model``'s AnnData (default: its own)."""
    tensors = su.train.gather_tensors(data_model or model, cells)
    model.module.eval()
    with torch.no_grad():
        return model.module.inference(**model.module._get_inference_input(tensors))["qz"]


def _kl_to_prior(qz) -> float:
    prior = Normal(torch.zeros_like(qz.loc), torch.ones_like(qz.scale))
    return float(kl_divergence(qz, prior).sum(-1).mean())


def test_contrastive_moves_forget_posteriors_to_the_prior_and_keeps_retained_ones(
    structured_case,
):
    model, split = structured_case
    retained = np.setdiff1d(split.train, split.forget)
    out = model.unlearn(
        split.forget, method="contrastive", accelerator="cpu", seed=0, max_epochs=10,
        enable_progress_bar=False,
    )  # fmt: skip
    # the unlearned model's AnnData lacks the forget cells: they come from the original's
    before, after = _posteriors(model, split.forget), _posteriors(out, split.forget, model)
    assert _kl_to_prior(after) < 0.5 * _kl_to_prior(before)
    moved = float(kl_divergence(before, after).sum(-1).mean())
    kept = float(
        kl_divergence(_posteriors(model, retained), _posteriors(out, retained, model))
        .sum(-1)
        .mean()
    )
    assert kept < 0.25 * moved, (kept, moved)
    # encoder only: the decoder is the trained one
    for name, value in model.module.decoder.state_dict().items():
        assert torch.equal(value, out.module.decoder.state_dict()[name]), name
