"""The HTML audit certificate, rendered in headless Chromium, and the audit's fingerprints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import scvi_unlearn as su
from scvi_unlearn.audit import cells_sha256, counts_sha256, weights_sha256
from scvi_unlearn.audit._report import AuditReport, score_attack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _require_chromium():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's `chromium`.")
        pytest.skip("chromium is not installed (apt-get install chromium); CI requires it")


def render(path) -> str:
    """The DOM of an HTML file after Chromium has loaded it (scripts run, images decoded)."""
    _require_chromium()
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=5000", "--dump-dom", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return done.stdout


def _report(
    shift: float, n_members: int, n_nonmembers: int, refs=(0.5, 0.52, 0.47)
) -> AuditReport:
    rng = np.random.default_rng(0)
    results = {}
    for attack in ("loss", "lira_online"):
        m, n = rng.normal(shift, 1, n_members), rng.normal(0, 1, n_nonmembers)
        source = f"{len(refs)} reference models" if refs else ""
        results[attack] = score_attack(attack, m, n, list(refs), source,
                                       n_bootstrap=300, n_attacks=2)  # fmt: skip
    meta = {
        "n_members": n_members,
        "n_nonmembers": n_nonmembers,
        "n_shadows": 8,
        "seed": 0,
        "created_at": "2026-11-29T00:00:00+00:00",
        "fingerprints": {"model_weights": "a" * 64, "members": "b" * 64},
        "versions": {"scvi_unlearn": "test"},
        "recipe": {"model_kwargs": {"n_latent": 10, "note": "<script>alert(1)</script>"}},
    }
    return AuditReport(results, meta)


@pytest.mark.chromium
def test_certificate_renders_verdict_numbers_and_figures(tmp_path):
    report = _report(shift=1.5, n_members=150, n_nonmembers=150)
    path = report.save_html(tmp_path / "cert" / "certificate.html")
    text = path.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    assert "<script>alert(1)</script>" not in text  # escaped
    dom = render(path)
    assert "Verdict: LEAK" in dom
    lira = report.results["lira_online"]
    assert f"{lira.auc:.3f}" in dom and f"[{lira.auc_ci[0]:.3f}, {lira.auc_ci[1]:.3f}]" in dom
    assert "a" * 64 in dom  # the model's fingerprint
    loaded = re.search(r'data-figures-loaded="(\d+)"', dom)
    total = re.search(r'data-figures-total="(\d+)"', dom)
    assert loaded and total, "the page's load script did not run"
    assert int(total.group(1)) == 2 and loaded.group(1) == total.group(1)


@pytest.mark.chromium
def test_certificate_of_a_small_audit_says_underpowered_and_tpr_not_measurable(tmp_path):
    # Against chance (no references): 12 + 12 cells cannot see an AUC below 0.75.
    report = _report(shift=0.0, n_members=12, n_nonmembers=12, refs=())
    assert report.verdict == "underpowered"
    dom = render(su.audit.write_certificate(report, tmp_path / "small.html", title="Donor 7"))
    assert "Verdict: UNDERPOWERED" in dom and "Donor 7" in dom
    assert "not measurable (12 non-members" in dom


def test_fingerprints_change_with_one_weight_one_count_one_name(small_model):
    model = small_model
    before = weights_sha256(model)
    assert weights_sha256(model) == before
    param = next(model.module.parameters())
    with torch.no_grad():
        kept = param.view(-1)[0].clone()
        param.view(-1)[0] += 1e-3
        try:
            assert weights_sha256(model) != before
        finally:
            param.view(-1)[0] = kept  # the model is shared with other tests
    assert weights_sha256(model) == before
    adata = model.adata.copy()
    counts = counts_sha256(adata)
    assert counts_sha256(adata) == counts
    x = adata.X.copy()
    x[0, 0] = x[0, 0] + 1
    changed = adata.copy()
    changed.X = x
    assert counts_sha256(changed) != counts
    renamed = adata.copy()
    renamed.obs_names = ["x", *renamed.obs_names[1:]]
    assert counts_sha256(renamed) != counts
    assert cells_sha256(["a", "b"]) != cells_sha256(["b", "a"])


def test_audit_records_fingerprints(overfit_case):
    case = overfit_case
    report = case["mi"].audit(case["model"], members=case["train"][:20],
                              nonmembers=case["held"][:20], attacks=("loss",))  # fmt: skip
    prints = report.metadata["fingerprints"]
    assert prints["model_weights"] == weights_sha256(case["model"])
    names = case["adata"].obs_names
    assert prints["members"] == cells_sha256(names[case["train"][:20]])
    assert prints["nonmembers"] == cells_sha256(names[case["held"][:20]])
    assert prints["adata_counts"] == counts_sha256(case["adata"])
    assert report.metadata["versions"]["scvi-tools"] and report.metadata["created_at"]
    again = su.AuditReport.from_json(report.to_json())
    assert again.metadata["fingerprints"] == prints


@pytest.mark.chromium
def test_cli_writes_the_certificate(saved_lab_model, tmp_path, capsys):
    from scvi_unlearn.cli import main

    folder = saved_lab_model[0]
    out = tmp_path / "audit"
    code = main(["audit", str(folder / "model"), str(folder / "data.h5ad"), "--n-shadows", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--accelerator", "cpu",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"Non-members: \d+ \(cells of the population the model never saw\)", printed)
    assert "--nonmembers FILE" in printed  # a small lab audit: fewer than 100 non-members
    dom = render(out / "certificate.html")
    report = su.AuditReport.from_json(str(out / "audit_report.json"))
    assert f"Verdict: {report.verdict.upper()}" in dom
