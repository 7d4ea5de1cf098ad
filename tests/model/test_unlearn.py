"""End-to-end tests of ``model.unlearn`` on an over-fitted scVI model (synthetic PBMC data).

The model memorises its training cells (loss-attack AUC ~0.9 on same-population cells), so
forgetting is measurable: exact retraining must land in the null band and extragradient must
lower the out-of-sample attack AUC.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scipy import sparse

import scvi_unlearn as su
from scvi_unlearn.audit import MembershipInference, attack_features
from scvi_unlearn.model._unlearn import cells_fingerprint
from scvi_unlearn.train import (
    METHODS,
    ExtraGradientUnlearningPlan,
    FisherScrubbingPlan,
    FrozenCriticPlan,
    GradientAscentPlan,
    RetainFinetunePlan,
    SCRUBPlan,
)

POPULATION = ("cell_type", "CD14 Mono")


def _loss_auc(model, members, nonmembers, adata) -> float:
    """Loss-threshold attack AUC (members should score higher = lower loss per count).

    ``adata`` is the data the cells index (an unlearned model's own AnnData lacks the
    forgotten cells).
    """
    from sklearn.metrics import roc_auc_score

    scores = -attack_features(model, adata)["neg_elbo_per_count"].to_numpy()
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    return float(roc_auc_score(labels, np.r_[scores[members], scores[nonmembers]]))


def _null_halfwidth(n_members: int, n_nonmembers: int, z: float = 2.58) -> float:
    """99% half-width of the AUC when membership is irrelevant (Mann-Whitney null)."""
    return z * math.sqrt((n_members + n_nonmembers + 1) / (12 * n_members * n_nonmembers))


def _adata_state(adata) -> dict:
    x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    return {
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "uns": sorted(adata.uns.keys()),
        "layers": sorted(adata.layers.keys()),
        "obsm": sorted(adata.obsm.keys()),
        "X": x.copy(),
    }


def _assert_adata_unchanged(adata, state) -> None:
    pd.testing.assert_frame_equal(adata.obs, state["obs"])
    pd.testing.assert_frame_equal(adata.var, state["var"])
    assert sorted(adata.uns.keys()) == state["uns"]
    assert sorted(adata.layers.keys()) == state["layers"]
    assert sorted(adata.obsm.keys()) == state["obsm"]
    x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(x, state["X"])


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}


def _trained_names(model) -> set[str]:
    """The obs names of a model's training cells (positions differ between AnnDatas)."""
    return set(model.adata.obs_names[np.asarray(model.train_indices, dtype=np.int64)])


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def setting():
    """An over-fitted scVI model trained on a membership split of synthetic PBMCs."""
    adata = su.data.synthetic_pbmc(n_cells=300, n_genes=100, seed=0)
    split = su.data.membership_split(adata, POPULATION, seed=0)
    su.model.SCVI.setup_anndata(adata)
    scvi.settings.seed = 0
    model = su.model.SCVI(adata, n_hidden=256, n_latent=10)
    model.train(
        max_epochs=400,
        accelerator="cpu",
        batch_size=128,
        enable_progress_bar=False,
        plan_kwargs={"lr": 1e-2},
        datasplitter_kwargs={"external_indexing": [split.train, np.zeros(0, int), split.heldout]},
    )
    return {
        "adata": adata,
        "split": split,
        "model": model,
        "weights": _state(model),
        "adata_state": _adata_state(adata),
    }


@pytest.fixture(scope="module")
def retrains(setting):
    """Four exact-unlearning (retrain) models with different seeds (one audited, three refs)."""
    model, split = setting["model"], setting["split"]
    return [
        model.unlearn(split.forget, method="retrain", seed=s, accelerator="cpu") for s in range(4)
    ]


@pytest.fixture(scope="module")
def extragradient(setting):
    model, split = setting["model"], setting["split"]
    # The full-retain, 50-epoch budget this test was designed with; benchmarks/ reports the
    # cheaper default (20 epochs, a quarter of the retain batches per epoch).
    return model.unlearn(
        split.forget,
        method="extragradient",
        seed=0,
        accelerator="cpu",
        max_epochs=50,
        retain_fraction=1.0,
        # 61% of the ~33 forget / non-member cells: the 20 + 20 that selection needs
        val_fraction=0.61,
        # On this memorising model the game more than doubles the held-out neg. ELBO, which
        # unlearn() refuses by default; these tests are about the game, not that refusal.
        damage_limit=None,
        record_names=True,  # the tests read the development cells it selected on
    )


# -- the leak, exact unlearning, and extragradient -----------------------------------------------
def test_retrain_is_inside_the_null_band(setting, retrains):
    split, model = setting["split"], setting["model"]
    half = _null_halfwidth(split.forget.size, split.nonmember.size)
    base_auc = _loss_auc(model, split.forget, split.nonmember, setting["adata"])
    assert base_auc > 0.5 + half, "the test model must leak membership for the test to bite"
    aucs = [_loss_auc(m, split.forget, split.nonmember, setting["adata"]) for m in retrains]
    assert all(abs(a - 0.5) < half for a in aucs), aucs
    # the project's audit agrees: retrain seed 0 against the band of seeds 1-3
    mi = MembershipInference(setting["adata"], recipe=model, n_shadows=2, cache_dir=False)
    report = mi.audit(
        retrains[0],
        split.forget,
        split.nonmember,
        reference_models=retrains[1:],
        attacks=("loss",),
    )
    assert report.results["loss"].verdict != "leak"
    leak = mi.audit(
        model, split.forget, split.nonmember, reference_models=retrains[1:], attacks=("loss",)
    )
    assert leak.results["loss"].verdict == "leak"


def test_retain_fraction_draws_fewer_retain_batches(setting):
    model, forget = setting["model"], setting["split"].forget
    kwargs = {
        "method": "extragradient",
        "seed": 0,
        "accelerator": "cpu",
        "max_epochs": 1,
        "critic_pretrain_steps": 5,
        "batch_size": 16,
    }
    full = model.unlearn(forget, retain_fraction=1.0, **kwargs)
    part = model.unlearn(forget, retain_fraction=0.25, **kwargs)
    n_full = full.provenance["events"][-1]["metrics"]["retain_batches_per_epoch"]
    n_part = part.provenance["events"][-1]["metrics"]["retain_batches_per_epoch"]
    assert n_full >= 4
    assert n_part < n_full and n_part <= int(np.ceil(0.25 * n_full)) + 1
    with pytest.raises(ValueError, match="retain_fraction"):
        model.unlearn(forget, method="extragradient", retain_fraction=0.0, accelerator="cpu")


def test_retrain_trains_on_the_retained_cells_only(setting, retrains):
    split = setting["split"]
    adata = setting["adata"]
    for m in retrains:
        assert _trained_names(m) == set(adata.obs_names[split.retain])
        # a new AnnData over the original genes, without the forgotten cells
        assert m.adata is not adata and list(m.adata.var_names) == list(adata.var_names)
        assert m.adata.n_obs == adata.n_obs - split.forget.size
    assert not _states_equal(_state(retrains[0]), _state(retrains[1]))  # seeds differ


def test_extragradient_game_lowers_auc_but_selection_keeps_the_utility_budget(
    setting, extragradient
):
    """The game itself drives the validation AUC down; early stopping only accepts states
    within the 5% retain-ELBO budget. Here (scvi-tools 1.4.2, Lightning 2.6) every epoch that
    lowered the AUC by more than 0.2 broke that budget, so the selected state barely moved:
    extra-gradient does not unlearn this toy within budget, and the test says so rather than
    asserting success."""
    split, model, adata = setting["split"], setting["model"], setting["adata"]
    metrics = extragradient.provenance["events"][-1]["metrics"]
    epochs = metrics["epochs"]
    warm = metrics["val_auc_warm_start"]
    assert warm > 0.8
    # the mechanism: some epoch of the game is far less member-like than the warm start
    assert min(e["auc"] for e in epochs) < warm - 0.2
    # the guard: the selected state is admissible, and within 5% on retain-validation ELBO
    selected = next(e for e in epochs if e["epoch"] == metrics["selected_epoch"])
    assert selected["admissible"]
    assert metrics["retain_val_elbo_selected"] <= 1.05 * metrics["retain_val_elbo_warm_start"]
    # on the cells that played no part in selection, the result is what the audit reports
    forget_val = adata.obs_names.get_indexer(metrics["forget_val_names"])
    nonmember_val = adata.obs_names.get_indexer(metrics["nonmember_val_names"])
    forget_test = np.setdiff1d(split.forget, forget_val)
    nonmember_test = np.setdiff1d(split.nonmember, nonmember_val)
    before = _loss_auc(model, forget_test, nonmember_test, setting["adata"])
    after = _loss_auc(extragradient, forget_test, nonmember_test, setting["adata"])
    assert before > 0.8
    assert after <= before + 0.02, (before, after)  # never more member-like than before
    # utility on the retained cells stays close to the original's
    retain_before = attack_features(model, indices=split.retain)["neg_elbo"].mean()
    retain_after = attack_features(extragradient, setting["adata"], indices=split.retain)[
        "neg_elbo"
    ].mean()
    assert retain_after < 1.1 * retain_before


def test_original_weights_are_bit_identical(setting, retrains, extragradient):
    assert _states_equal(_state(setting["model"]), setting["weights"])
    assert not _states_equal(_state(extragradient), setting["weights"])
    np.testing.assert_array_equal(np.sort(setting["model"].train_indices), setting["split"].train)
    assert getattr(setting["model"], "unlearning_provenance_", None) is None


def test_provenance_and_train_indices(setting, extragradient):
    split, adata = setting["split"], setting["adata"]
    prov = extragradient.provenance
    event = prov["events"][-1]
    assert event["method"] == "extragradient"
    assert event["forgotten"] == cells_fingerprint(adata.obs_names[split.forget])
    # the fixture asked for the names (record_names=True); by default only the fingerprint
    assert prov["forgotten_obs_names"] == adata.obs_names[split.forget].tolist()
    assert event["n_forgotten"] == split.forget.size
    assert event["n_train_before"] == split.train.size
    assert event["hyperparameters"]["lambda_"] == 10.0
    assert event["hyperparameters"]["n_critics"] == 3
    assert event["seed"] == 0 and event["wall_time_s"] > 0
    assert event["nonmembers"]["source"] == "auto"
    assert event["nonmembers"]["population"] == "CD14 Mono"
    assert event["nonmembers"]["n"] == split.nonmember.size  # auto = held-out CD14 Mono
    assert {"started_at", "scvi_unlearn_version"} <= set(event)
    assert prov["original_n_train"] == split.train.size
    assert _trained_names(extragradient) == set(adata.obs_names[split.retain])
    assert sorted(extragradient.train_obs_names_) == sorted(adata.obs_names[split.retain])
    assert len(setting["model"].train_obs_names_) == split.train.size  # original unchanged


def test_save_load_roundtrip(setting, extragradient, tmp_path):
    extragradient.save(tmp_path / "m", overwrite=True)
    loaded = su.model.SCVI.load(str(tmp_path / "m"), setting["adata"])
    assert _states_equal(_state(loaded), _state(extragradient))
    assert loaded.provenance == extragradient.provenance
    assert _trained_names(loaded) == _trained_names(extragradient)


def test_save_load_rejects_mismatched_genes(setting, extragradient, tmp_path):
    extragradient.save(tmp_path / "m", overwrite=True)
    other = su.data.synthetic_pbmc(n_cells=50, n_genes=80, seed=1)
    with pytest.raises(ValueError):
        su.model.SCVI.load(str(tmp_path / "m"), other)


def test_same_seed_same_weights(setting):
    model, forget = setting["model"], setting["split"].forget
    kwargs = {"accelerator": "cpu", "max_epochs": 3, "critic_pretrain_steps": 10}
    a = model.unlearn(forget, method="extragradient", seed=5, **kwargs)
    b = model.unlearn(forget, method="extragradient", seed=5, **kwargs)
    c = model.unlearn(forget, method="extragradient", seed=6, **kwargs)
    assert _states_equal(_state(a), _state(b))
    assert not _states_equal(_state(a), _state(c))
    f1 = model.unlearn(forget, method="fisher", seed=1, accelerator="cpu")
    f2 = model.unlearn(forget, method="fisher", seed=1, accelerator="cpu")
    assert _states_equal(_state(f1), _state(f2))


_PLANS = {
    "extragradient": ExtraGradientUnlearningPlan,
    "extragradient_calibrated": ExtraGradientUnlearningPlan,
    "frozen_critic": FrozenCriticPlan,
    "fisher": FisherScrubbingPlan,
    "ssd": FisherScrubbingPlan,
    "finetune": RetainFinetunePlan,
    "gradient_ascent": GradientAscentPlan,
    "scrub": SCRUBPlan,
    "reset_relearn": su.train.ResetRelearnPlan,
    "oracle_matching": su.train.OracleMatchingPlan,
    "contrastive": su.train.ContrastiveLatentPlan,
    "retrain_fast": su.train.FastRetrainPlan,
    "retrain": scvi.train.TrainingPlan,
    "certified": su.train.CertifiedFinetunePlan,
}


# Every method that acts on any trained model (the donor removals act on a deletion-ready
# design and have their own tests in test_deletion_ready.py).
@pytest.mark.parametrize("method", su.train.any_model_methods())
def test_every_method_trains_under_lightning_without_touching_adata(
    setting, method, reference_dir
):
    adata, split = setting["adata"], setting["split"]
    layers_before = dict(adata.layers)
    uses_references = "n_references" in METHODS[method].params
    extra = {"reference_cache_dir": str(reference_dir)} if uses_references else {}
    # auto sizes its attempts itself (budget=, each method's default), no max_epochs
    extra.update({"candidates": "finetune"} if method == "auto" else {"max_epochs": 2})
    if "epsilon" in METHODS[method].params:  # a certificate loose enough to leave weights usable
        extra["epsilon"] = 1e12
    new = setting["model"].unlearn(
        adata.obs_names[split.forget], method=method, seed=0, accelerator="cpu",
        damage_limit=None,  # two epochs may wreck this memorising model; not the point here
        **extra,
    )  # fmt: skip
    trainer = new.trainer
    assert isinstance(trainer, scvi.train.Trainer)
    assert trainer.progress_bar_callback is not None
    ran = method
    if method == "auto":
        ran = new.provenance["events"][-1]["metrics"]["accepted_method"]
    assert isinstance(trainer.lightning_module, _PLANS[ran])
    assert trainer.lightning_module.module is not setting["model"].module
    _assert_adata_unchanged(adata, setting["adata_state"])
    assert dict(adata.layers).keys() == layers_before.keys()
    assert isinstance(new, su.model.SCVI) and new.is_trained
    assert new.provenance["events"][-1]["method"] == method
    assert np.isfinite(attack_features(new, adata, indices=split.retain[:20]).to_numpy()).all()


def test_forget_idx_forms_agree_and_chaining_appends(setting):
    model, split, adata = setting["model"], setting["split"], setting["adata"]
    first, second = split.forget[:10], split.forget[10:20]
    mask = np.zeros(adata.n_obs, bool)
    mask[first] = True
    by_mask = model.unlearn(mask, method="fisher", accelerator="cpu")
    by_names = model.unlearn(list(adata.obs_names[first]), method="fisher", accelerator="cpu")
    assert _states_equal(_state(by_mask), _state(by_names))
    assert by_mask.provenance["events"][0]["forgotten"] == cells_fingerprint(
        adata.obs_names[first]
    )
    # positions of the original AnnData mean nothing in the unlearned model's: names do
    chained = by_mask.unlearn(
        adata.obs_names[second], method="finetune", max_epochs=1, accelerator="cpu"
    )
    events = chained.provenance["events"]
    assert [e["method"] for e in events] == ["fisher", "finetune"]
    assert chained.provenance["n_forgotten"] == 20
    assert not _trained_names(chained) & set(adata.obs_names[split.forget[:20]])
    assert len(chained.train_indices) == split.train.size - 20
    assert len(by_mask.provenance["events"]) == 1  # the parent's record is unchanged


def test_inplace_modifies_the_model(setting):
    copy = su.model.clone_model(setting["model"])
    before = _state(copy)
    out = copy.unlearn(
        setting["split"].forget, method="finetune", inplace=True, max_epochs=1, accelerator="cpu"
    )
    assert out is copy
    assert not _states_equal(_state(copy), before)
    assert len(copy.train_indices) == setting["split"].retain.size
    assert _states_equal(_state(setting["model"]), setting["weights"])


def test_from_scvi_wraps_a_plain_scvi_model():
    adata = su.data.synthetic_pbmc(n_cells=120, n_genes=50, seed=2)
    scvi.model.SCVI.setup_anndata(adata)
    plain = scvi.model.SCVI(adata, n_latent=4)
    plain.train(max_epochs=2, train_size=0.9, accelerator="cpu", enable_progress_bar=False)
    weights = _state(plain)
    train = np.sort(plain.train_indices)
    wrapped = su.model.SCVI.from_scvi(plain)
    out = wrapped.unlearn(train[:5], method="finetune", max_epochs=1, accelerator="cpu")
    assert type(out) is su.model.SCVI
    assert _states_equal(_state(plain), weights)
    assert not _states_equal(_state(out), weights)
    assert _trained_names(out) == set(adata.obs_names[train[5:]])
    np.testing.assert_array_equal(np.sort(plain.train_indices), train)
    # a validation cell was never trained on: it cannot be forgotten
    with pytest.raises(ValueError, match="validation cells"):
        wrapped.unlearn(np.sort(plain.validation_indices)[:1], method="finetune")


def test_chained_unlearn_on_a_plain_scvi_descendant_replays_the_original_recipe():
    """The recipe is pinned when the plain model is wrapped: the second run's retrain uses
    the original 3 epochs, not 3 + the first run's fine-tune epochs from the history."""
    adata = su.data.synthetic_pbmc(n_cells=120, n_genes=50, seed=3)
    scvi.model.SCVI.setup_anndata(adata)
    plain = scvi.model.SCVI(adata, n_latent=4)
    plain.train(max_epochs=3, train_size=0.9, accelerator="cpu", enable_progress_bar=False)
    kl_final = 2 / 400  # scvi-tools' default epoch warm-up at the last of 3 epochs
    train = np.sort(plain.train_indices)
    first = su.model.SCVI.from_scvi(plain).unlearn(
        train[:4], method="finetune", max_epochs=2, accelerator="cpu", enable_progress_bar=False
    )
    assert first.train_kwargs_["max_epochs"] == 3
    assert first.provenance["events"][0]["max_epochs"] == 2
    second = first.unlearn(
        adata.obs_names[train[4:8]], method="retrain", accelerator="cpu", enable_progress_bar=False
    )
    assert second.provenance["events"][-1]["max_epochs"] == 3
    assert [e["method"] for e in second.provenance["events"]] == ["finetune", "retrain"]
    # the KL weight the warm-started runs continued at is that of the original's last step
    assert su.model._unlearn.final_kl_weight(plain) == pytest.approx(kl_final)
    assert first.final_kl_weight_ == pytest.approx(kl_final)
    assert second.final_kl_weight_ == pytest.approx(kl_final)


def test_final_kl_weight_follows_scvi_tools_schedule():
    """Recorded from the training plan's last step, equal to the plain-model reconstruction;
    an epoch warm-up overrides a step warm-up, as in scvi-tools."""
    from scvi_unlearn.model._unlearn import final_kl_weight, kl_weight_at

    adata = su.data.synthetic_pbmc(n_cells=100, n_genes=40, seed=4)
    su.model.SCVI.setup_anndata(adata)
    plans = [
        {"n_epochs_kl_warmup": 4},  # 3 epochs: the last step is at 2/4
        {"n_epochs_kl_warmup": None, "n_steps_kl_warmup": 5},  # 3 x 1 batch: at 2/5
        {"n_epochs_kl_warmup": 2, "n_steps_kl_warmup": 1000},  # epochs win: warm at epoch 2
    ]
    for plan, expected in zip(plans, [0.5, 0.4, 1.0]):
        model = su.model.SCVI(adata, n_latent=3, n_hidden=16)
        model.train(
            max_epochs=3,
            train_size=1.0,
            batch_size=128,
            plan_kwargs=plan,
            accelerator="cpu",
            enable_progress_bar=False,
        )
        assert model.final_kl_weight_ == pytest.approx(expected), plan
        del model.final_kl_weight_  # the plain-model path reconstructs the same value
        assert final_kl_weight(model) == pytest.approx(expected), plan
    assert kl_weight_at(None, 399, 10_000) == pytest.approx(399 / 400)


def test_audit_summary_is_recorded(setting, tmp_path):
    import warnings

    split = setting["split"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = setting["model"].unlearn(
            split.forget,
            method="fisher",
            accelerator="cpu",
            audit=True,
            audit_kwargs={
                "n_shadows": 2,
                "max_epochs": 5,
                "n_bootstrap": 50,
                "nonmembers": split.nonmember[1:],
            },
        )
    # forgotten members are what the audit is about: no "not in the training set" warning
    assert not [w for w in caught if "recorded training set" in str(w.message)]
    audit = out.provenance["events"][-1]["audit"]
    assert audit["n_members"] == split.forget.size
    assert audit["n_nonmembers"] == split.nonmember.size - 1  # the audit's own non-members
    assert "loss" in audit["attacks"] and audit["verdict"]
    out.save(tmp_path / "a")
    assert su.model.SCVI.load(str(tmp_path / "a"), setting["adata"]).provenance == out.provenance


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("forget", "error", "match"),
    [
        ("heldout", ValueError, "not in the model's training set"),
        ("train", ValueError, "all .* training cells"),
        ("empty", ValueError, "empty"),
        ("duplicate", ValueError, "duplicated"),
        ("out_of_range", IndexError, "out of range"),
        ("unknown_name", KeyError, "not in the AnnData"),
    ],
)
def test_bad_forget_cells(setting, forget, error, match):
    split, adata = setting["split"], setting["adata"]
    cells = {
        "heldout": split.heldout[:3],
        "train": split.train,
        "empty": np.zeros(0, int),
        "duplicate": np.r_[split.forget[:3], split.forget[:1]],
        "out_of_range": np.array([adata.n_obs + 5]),
        "unknown_name": ["no_such_cell"],
    }[forget]
    with pytest.raises(error, match=match):
        setting["model"].unlearn(cells, method="finetune")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "forget_everything"}, ValueError, "choose one of 'extragradient'"),
        ({"lambda_": "10"}, TypeError, "lambda_"),
        ({"lambda_": -1.0}, ValueError, "lambda_"),
        ({"n_critics": 2.5}, TypeError, "n_critics"),
        ({"n_critics": True}, TypeError, "n_critics"),
        ({"n_critics": 0}, ValueError, "n_critics"),
        ({"critic_lrr": 1e-3}, TypeError, "Valid ones: .*critic_lr"),
        ({"method": "fisher", "lambda_": 1.0}, TypeError, "Unknown hyper-parameter"),
        ({"method": "fisher", "alpha": None}, TypeError, "alpha"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"max_epochs": -1}, ValueError, "max_epochs"),
    ],
)
def test_bad_method_or_hyperparameters(setting, kwargs, error, match):
    kwargs = {"method": "extragradient", **kwargs}
    with pytest.raises(error, match=match):
        setting["model"].unlearn(setting["split"].forget, **kwargs)


def test_bad_nonmembers(setting):
    model, split = setting["model"], setting["split"]
    with pytest.raises(ValueError, match="training cells of the model"):
        model.unlearn(split.forget, nonmembers=split.retain[:5])
    with pytest.raises(KeyError, match="population_key"):
        model.unlearn(split.forget, method="extragradient", population_key="no_such_column")


def test_untrained_model_and_missing_nonmembers():
    adata = su.data.synthetic_pbmc(n_cells=100, n_genes=40, seed=4)
    su.model.SCVI.setup_anndata(adata)
    model = su.model.SCVI(adata, n_latent=4)
    with pytest.raises(RuntimeError, match="not trained"):
        model.unlearn([0, 1])
    model.train(max_epochs=1, train_size=1.0, accelerator="cpu", enable_progress_bar=False)
    mono = np.flatnonzero(adata.obs["cell_type"] == "CD14 Mono")
    # every CD14 Mono was trained on: there are no same-population non-members
    with pytest.raises(ValueError, match="No non-members found"):
        model.unlearn(mono[:5], method="extragradient")
    with pytest.raises(ValueError, match="No non-members found"):
        model.unlearn(mono[:5], method="fisher", audit=True)


def test_retrain_after_forgetting_a_whole_donor_keeps_the_batch_layout():
    adata = su.data.synthetic_pbmc(n_cells=150, n_genes=40, n_donors=3, seed=5)
    su.model.SCVI.setup_anndata(adata, batch_key="donor")
    model = su.model.SCVI(adata, n_latent=4)
    model.train(max_epochs=2, train_size=1.0, accelerator="cpu", enable_progress_bar=False)
    donor = np.flatnonzero(adata.obs["donor"] == "donor_0")
    out = model.unlearn(donor, method="retrain", max_epochs=1, accelerator="cpu")
    assert out.module.n_batch == model.module.n_batch == 3
    assert not _trained_names(out) & set(adata.obs_names[donor])
    # the forgotten donor's cells can still be featurised (and audited) by the new model
    assert np.isfinite(attack_features(out, adata, indices=donor).to_numpy()).all()


def test_from_scvi_copies_what_the_new_model_may_change():
    adata = su.data.synthetic_pbmc(n_cells=120, n_genes=50, seed=1)
    scvi.model.SCVI.setup_anndata(adata)
    plain = scvi.model.SCVI(adata, n_latent=3, n_hidden=16)
    plain.train(max_epochs=2, accelerator="cpu", enable_progress_bar=False)
    wrapped = su.model.SCVI.from_scvi(plain)
    assert wrapped.adata is plain.adata
    assert wrapped.module is not plain.module
    assert wrapped.history_ is not plain.history_
    with torch.no_grad():
        next(wrapped.module.parameters()).add_(1.0)
    assert not torch.equal(next(wrapped.module.parameters()), next(plain.module.parameters()))
    assert wrapped.get_latent_representation().shape == (adata.n_obs, 3)


# -- no silent no-ops ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_population():
    """A plain-sized scVI with a rare type of which only 2 cells were held out."""
    adata = su.data.synthetic_pbmc(n_cells=300, n_genes=60, rare_fraction=0.06, seed=5)
    rare = np.flatnonzero(adata.obs["cell_type"] == "Megakaryocyte")
    held = rare[:2]
    train = np.setdiff1d(np.arange(adata.n_obs), held)
    recipe = su.Recipe(
        model_kwargs={"n_latent": 4, "n_hidden": 32}, train_kwargs={"max_epochs": 5}
    )
    model = recipe.fit_cells(adata, train, accelerator="cpu", enable_progress_bar=False)
    return {"model": model, "forget": rare[2:16], "nonmembers": held}


def test_too_few_selection_cells_run_a_fixed_budget_and_say_so(small_population):
    case = small_population
    before = _state(case["model"])
    with pytest.warns(UserWarning, match=r"fixed budget of 2 epochs.*nonmembers="):
        out = case["model"].unlearn(
            case["forget"],
            method="extragradient",
            nonmembers=case["nonmembers"],
            max_epochs=2,
            accelerator="cpu",
            enable_progress_bar=False,
        )
    assert not _states_equal(_state(out), before)  # never the warm start
    metrics = out.provenance["events"][-1]["metrics"]
    assert metrics["selection_underpowered"] is True
    assert metrics["selection"] == "fixed budget (final state)"
    assert metrics["selected_epoch"] is None
    assert metrics["epochs_run"] == 2
    assert (metrics["n_forget_val"], metrics["n_nonmember_val"]) == (4, 1)
    assert metrics["min_selection_cells"] == su.train.MIN_SELECTION_CELLS


def test_a_method_that_changes_nothing_is_an_error(small_population):
    case = small_population
    before = _state(case["model"])
    with pytest.raises(RuntimeError, match="original weights"):
        case["model"].unlearn(
            case["forget"], method="fisher", alpha=0.0, finetune_epochs=0, accelerator="cpu"
        )
    assert _states_equal(_state(case["model"]), before)
    assert case["model"].provenance is None


def test_selection_never_keeps_the_warm_start():
    selector = su.train.BestStateSelector(target_auc=0.5, max_utility_loss=0.05)
    module = torch.nn.Linear(2, 1)
    selector.update(module, -1, auc=0.5, retain_elbo=100.0)  # already at the target
    selector.update(module, 0, auc=0.9, retain_elbo=101.0)
    selector.update(module, 1, auc=0.8, retain_elbo=200.0)  # closer, but breaks utility
    assert selector.kept_epoch == 0 and selector.utility_budget_met is True
    broken = su.train.BestStateSelector(target_auc=0.5, max_utility_loss=0.05)
    broken.update(module, -1, auc=0.9, retain_elbo=100.0)
    broken.update(module, 0, auc=0.5, retain_elbo=300.0)
    broken.update(module, 1, auc=0.6, retain_elbo=200.0)
    assert broken.kept_epoch == 1  # the least damaging epoch, flagged
    assert broken.utility_budget_met is False
    assert broken.summary()["utility_budget_met"] is False


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """One method reference pool for the module's tests (shared through its cache)."""
    return tmp_path_factory.mktemp("method_references")


def test_calibrated_extragradient_plays_on_the_lira_statistic_of_its_own_pool(
    setting, reference_dir
):
    model, split = setting["model"], setting["split"]
    out = model.unlearn(
        split.forget, method="extragradient_calibrated", seed=0, accelerator="cpu",
        max_epochs=10, val_fraction=0.61, reference_cache_dir=str(reference_dir),
        record_names=True,
    )  # fmt: skip
    metrics = out.provenance["events"][-1]["metrics"]
    assert metrics["n_references"] == 4
    assert metrics["reference_seed"] == su.train.REFERENCE_SEED_OFFSET
    # Its own pool, cached in its own folder under its own seed: never an audit's shadows.
    (folder,) = [p for p in reference_dir.iterdir() if p.is_dir()]
    assert json.loads((folder / "meta.json").read_text())["seed"] == su.train.REFERENCE_SEED_OFFSET
    pool = su.train.method_reference_pool(model, 4, seed=0, cache_dir=str(reference_dir))
    assert pool.in_mask.sum(0).tolist() == [2] * model.adata.n_obs  # half of 4, every cell
    # Selection judged the warm start on the calibrated (offline LiRA) statistic of the
    # validation cells, computed here independently from the pool and the model's features.
    names = model.adata.obs_names
    f_val = names.get_indexer(metrics["forget_val_names"])
    n_val = names.get_indexer(metrics["nonmember_val_names"])
    col = list(su.audit.SCALAR_FEATURES).index(su.audit.LOSS_FEATURE)
    _, std = su.train.out_calibration(pool, np.r_[split.forget, split.nonmember])

    def calibrated(cells):
        mean, _ = su.train.out_calibration(pool, cells)
        loss = attack_features(model, indices=cells).to_numpy()[:, col]
        return -(loss - mean[:, col]) / std[col]

    expected = su.audit.auc_from_scores(calibrated(f_val), calibrated(n_val))
    assert metrics["val_auc_warm_start"] == pytest.approx(float(expected), abs=1e-4)
    assert metrics["val_auc_warm_start"] > 0.8  # the over-fitted model leaks on that statistic
    with pytest.raises(ValueError, match="n_references` must be even"):
        model.unlearn(split.forget, method="extragradient_calibrated", n_references=5)


def test_train_without_max_epochs_uses_scvi_heuristic_and_records_it():
    # scvi-tools 1.4 keeps the heuristic in scvi.model._utils (not scvi.model): this broke once.
    from scvi.model._utils import get_max_epochs_heuristic

    adata = su.data.synthetic_pbmc(n_cells=60, n_genes=40, seed=0)
    su.model.SCVI.setup_anndata(adata)
    model = su.model.SCVI(adata, n_hidden=8, n_latent=2)
    model.train(accelerator="cpu", enable_progress_bar=False, batch_size=60, train_size=1.0)
    assert model.train_kwargs_["max_epochs"] == get_max_epochs_heuristic(60)


def test_every_run_records_held_out_utility_and_warns_when_it_is_lost(setting):
    from scvi_unlearn.train import mean_neg_elbo

    model, forget = setting["model"], setting["split"].forget
    untrained = np.setdiff1d(np.arange(setting["adata"].n_obs), model.train_indices)
    expected_before = mean_neg_elbo(model.module, su.train.gather_tensors(model, untrained))

    gentle = model.unlearn(
        forget, method="fisher", alpha=1e-8, finetune_epochs=0, accelerator="cpu"
    )
    utility = gentle.provenance["events"][-1]["utility"]
    assert utility["n_held_out_cells"] == untrained.size
    assert utility["neg_elbo_before"] == pytest.approx(expected_before, rel=1e-6)
    assert abs(utility["change"]) < 0.05 and utility["warned"] is False

    with pytest.warns(UserWarning, match="utility was lost"):
        damaged = model.unlearn(
            forget, method="fisher", alpha=1e-2, finetune_epochs=0, accelerator="cpu",
            damage_limit=None,
        )  # fmt: skip
    utility = damaged.provenance["events"][-1]["utility"]
    assert utility["change"] > 0.05 and utility["warned"] is True
    assert utility["neg_elbo_after"] == pytest.approx(
        mean_neg_elbo(damaged.module, su.train.gather_tensors(model, untrained)), rel=1e-6
    )
    # Noise so large that the ELBO is no longer finite: the worst damage, never "no change".
    with pytest.warns(UserWarning, match="utility was lost"):
        diverged = model.unlearn(
            forget, method="fisher", alpha=10.0, finetune_epochs=0, accelerator="cpu",
            damage_limit=None,
        )  # fmt: skip
    utility = diverged.provenance["events"][-1]["utility"]
    assert utility["warned"] is True and utility["neg_elbo_after"] is None
    assert _states_equal(_state(model), setting["weights"])  # the check trains nothing


def test_utility_record_without_held_out_cells(small_model):
    out = small_model.unlearn([0, 1, 2], method="fisher", accelerator="cpu")
    assert out.provenance["events"][-1]["utility"]["n_held_out_cells"] == 0
