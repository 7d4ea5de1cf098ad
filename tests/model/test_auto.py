"""method='auto': audit-gated approximate unlearning with an exact fallback."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scvi

import scvi_unlearn as su
from scvi_unlearn._verdict import LEAK, NO_EVIDENCE


@pytest.fixture(scope="module")
def case():
    """A small scVI on 240 of 320 synthetic cells; 60 forget cells, 80 never-seen cells."""
    adata = su.data.synthetic_pbmc(n_cells=320, n_genes=60, seed=4)
    su.model.SCVI.setup_anndata(adata)
    scvi.settings.seed = 0
    model = su.model.SCVI(adata, n_hidden=32, n_latent=4)
    rng = np.random.default_rng(0)
    order = rng.permutation(adata.n_obs)
    train, held = np.sort(order[:240]), np.sort(order[240:])
    model.train(
        max_epochs=15, accelerator="cpu", batch_size=64, enable_progress_bar=False,
        datasplitter_kwargs={"external_indexing": [train, np.zeros(0, int), held]},
    )  # fmt: skip
    return {"model": model, "forget": train[:60], "nonmembers": held}


def _auto(gate, **search):
    """``method="auto"`` whose search uses the fake ``gate`` (and ``search``'s other parts)."""
    return su.model.Auto(search=su.model.GatedSearch(gate=gate, **search))


def _gates(*after: str):
    """A fake gate: the trained model leaks (first call), then ``after`` in turn (the last
    one repeats)."""
    calls = iter([LEAK, *after])
    return lambda *a, **k: _FakeGate(next(calls, after[-1]))


class _FakeUtility:
    """Held-out neg. ELBO: ``reference`` for the trained model, then ``values`` in turn."""

    n_cells = 80

    def __init__(self, reference, values):
        self.reference, self._values = reference, values

    def of(self, module):
        return next(self._values)


class _FakeGate:
    def __init__(self, verdict, detectable=0.7):
        self.verdict = verdict
        self.auc, self.auc_ci = 0.5, (0.4, 0.6)
        self.reference_band, self.detectable_auc = (0.4, 0.6), detectable


def _run(case, tmp_path, method, **kwargs):
    kwargs.setdefault("val_fraction", 0.5)  # 30 + 40 development cells
    return case["model"].unlearn(
        case["forget"], method=method, nonmembers=case["nonmembers"], accelerator="cpu",
        enable_progress_bar=False, reference_cache_dir=str(tmp_path), seed=0, **kwargs,
    )  # fmt: skip


def test_auto_falls_back_to_exact_retraining_and_records_every_attempt(case, tmp_path):
    method = _auto(_gates(LEAK))
    out = _run(case, tmp_path, method, candidates="ssd,reset_relearn")
    metrics = out.provenance["events"][-1]["metrics"]
    attempts = metrics["attempts"]
    assert [a["method"] for a in attempts] == ["ssd", "reset_relearn", "retrain_fast"]
    assert [a["accepted"] for a in attempts] == [False, False, True]
    assert all("leak" in a["reason"] for a in attempts[:2])
    assert metrics["accepted_method"] == "retrain_fast"
    assert metrics["n_forget_development"] == 30 and metrics["n_nonmember_development"] == 40
    assert out.provenance["events"][-1]["method"] == "auto"
    assert len(out.train_indices) == 180
    # the original model is untouched
    assert len(case["model"].train_indices) == 240


def test_auto_accepts_the_first_method_that_passes_and_keeps_its_weights(case, tmp_path):
    method = _auto(_gates(NO_EVIDENCE))
    out = _run(case, tmp_path, method, candidates="finetune,ssd", max_utility_loss=1.0)
    metrics = out.provenance["events"][-1]["metrics"]
    assert metrics["accepted_method"] == "finetune"
    assert [a["method"] for a in metrics["attempts"]] == ["finetune"]
    same = case["model"].unlearn(
        case["forget"], method="finetune", accelerator="cpu", enable_progress_bar=False, seed=0
    )
    for key, value in same.module.state_dict().items():
        assert np.array_equal(value.numpy(), out.module.state_dict()[key].numpy()), key


def test_auto_rejects_a_method_that_damages_utility(case, tmp_path):
    # the trained model, the candidate (+6%), then the fallback's rounds
    values = itertools.chain([106.0], itertools.repeat(101.0))
    method = _auto(_gates(NO_EVIDENCE), utility=lambda run: _FakeUtility(100.0, values))
    out = _run(case, tmp_path, method, candidates="finetune")
    metrics = out.provenance["events"][-1]["metrics"]
    attempt = metrics["attempts"][0]
    assert attempt["utility_loss"] == pytest.approx(0.06)
    assert not attempt["accepted"] and "neg. ELBO +6.0%" in attempt["reason"]
    assert metrics["accepted_method"] == "retrain_fast"
    assert metrics["attempts"][1]["utility_loss"] == pytest.approx(0.01)


def test_auto_with_too_few_development_cells_retrains_without_a_gate(case, tmp_path):
    with pytest.warns(UserWarning, match="no approximate method is tried"):
        out = case["model"].unlearn(
            case["forget"], method="auto", nonmembers=case["nonmembers"][:10],
            accelerator="cpu", enable_progress_bar=False, reference_cache_dir=str(tmp_path),
        )  # fmt: skip
    metrics = out.provenance["events"][-1]["metrics"]
    assert [a["method"] for a in metrics["attempts"]] == ["retrain_fast"]
    assert "non-member development cells" in metrics["skipped_approximate"]
    assert not list(tmp_path.rglob("*.npz"))  # no reference pool was paid for


def test_auto_gate_uses_the_method_pool_and_the_audit_leaves_development_cells_out(
    overfit_case, overfit_reference_dir, tmp_path
):
    model, train, held = overfit_case["model"], overfit_case["train"], overfit_case["held"]
    forget = train[:90]  # 54 development + 36 reporting forget cells (60 + 40 non-members)
    out = model.unlearn(
        forget, method="auto", nonmembers=held, candidates="ssd", accelerator="cpu",
        val_fraction=0.6,
        enable_progress_bar=False, reference_cache_dir=str(overfit_reference_dir), audit=True,
        audit_kwargs={"n_shadows": 2, "cache_dir": str(tmp_path / "shadows"), "n_bootstrap": 20},
    )  # fmt: skip
    event = out.provenance["events"][-1]
    metrics = event["metrics"]
    # the over-fitted model leaks on the development cells, and they are enough to judge
    assert metrics["before"]["verdict"] == LEAK
    assert metrics["before"]["detectable_auc"] <= su.audit.MAX_DETECTABLE_AUC
    assert metrics["attempts"][0]["method"] == "ssd"
    assert metrics["attempts"][0]["audit"]["verdict"] in su.audit.VERDICTS
    assert metrics["attempts"][-1]["accepted"]
    # the reference pool lives in its own folder, never among the audit's shadows
    assert list(overfit_reference_dir.glob("shadows-*/pool.npz"))
    assert not set(overfit_reference_dir.glob("*")) & set((tmp_path / "shadows").glob("*"))
    # reporting audit: forget cells and non-members minus the development ones
    assert event["audit"]["n_members"] == 90 - metrics["n_forget_development"]
    assert event["audit"]["n_nonmembers"] == 100 - metrics["n_nonmember_development"]


def test_auto_rejects_unknown_candidates(case):
    with pytest.raises(ValueError, match="not approximate unlearning methods"):
        case["model"].unlearn(
            case["forget"], method="auto", nonmembers=case["nonmembers"], candidates="retrain"
        )


def test_auto_retrains_when_the_gate_cannot_see_the_trained_model_leak(case, tmp_path):
    method = _auto(lambda *a, **k: _FakeGate(NO_EVIDENCE))
    with pytest.warns(UserWarning, match="cannot tell an approximate method that forgot"):
        out = _run(case, tmp_path, method, candidates="finetune")
    metrics = out.provenance["events"][-1]["metrics"]
    assert metrics["before"]["verdict"] == NO_EVIDENCE
    assert [a["method"] for a in metrics["attempts"]] == ["retrain_fast"]


def test_auto_skips_the_candidates_when_its_gate_is_underpowered(case, tmp_path):
    method = _auto(lambda *a, **k: _FakeGate(LEAK, 0.8))
    with pytest.warns(UserWarning, match="could only detect an AUC above 0.80"):
        out = _run(case, tmp_path, method, candidates="finetune")
    metrics = out.provenance["events"][-1]["metrics"]
    assert [a["method"] for a in metrics["attempts"]] == ["retrain_fast"]


def test_auto_rejects_a_method_whose_forget_cells_come_back_after_relearning(case, tmp_path):
    # before: leak; finetune passes the gate; after 2 relearning epochs: leak again
    method = _auto(_gates(NO_EVIDENCE, LEAK))
    out = _run(
        case, tmp_path, method, candidates="finetune", relearn_epochs=2, max_utility_loss=1.0
    )
    metrics = out.provenance["events"][-1]["metrics"]
    first = metrics["attempts"][0]
    assert first["audit"]["verdict"] == NO_EVIDENCE and first["relearn"]["verdict"] == LEAK
    assert not first["accepted"] and "came back" in first["reason"]
    assert metrics["accepted_method"] == "retrain_fast"


def test_auto_relearning_check_keeps_the_candidates_own_weights(case, tmp_path):
    method = _auto(_gates(NO_EVIDENCE))
    out = _run(
        case, tmp_path, method, candidates="finetune", relearn_epochs=2, max_utility_loss=1.0
    )
    metrics = out.provenance["events"][-1]["metrics"]
    assert metrics["accepted_method"] == "finetune"
    assert metrics["attempts"][0]["relearn"]["epochs"] == 2
    alone = case["model"].unlearn(
        case["forget"], method="finetune", accelerator="cpu", enable_progress_bar=False, seed=0
    )
    for key, value in alone.module.state_dict().items():
        assert np.array_equal(value.numpy(), out.module.state_dict()[key].numpy()), key


def test_auto_refuses_max_epochs(case):
    with pytest.raises(ValueError, match="does not apply to method='auto'"):
        case["model"].unlearn(case["forget"], method="auto", max_epochs=3)
