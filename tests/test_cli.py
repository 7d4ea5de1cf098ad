"""The command line and the demo (the main job), end to end on tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import scvi_unlearn as su
from scvi_unlearn import _demo
from scvi_unlearn.cli import main
from scvi_unlearn.model._unlearn import cells_fingerprint


def test_cli_unlearn_saves_a_model_with_provenance(saved_lab_model, tmp_path):
    lab, adata, model = saved_lab_model
    out = tmp_path / "forgotten"
    code = main(
        [
            "unlearn",
            str(lab / "model"),
            str(lab / "data.h5ad"),
            "--forget",
            "cell_type=Megakaryocyte",
            "--method",
            "finetune",
            "--max-epochs",
            "2",
            "--accelerator",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    trained = np.zeros(adata.n_obs, bool)
    trained[model.train_indices] = True
    expected = adata.obs_names[trained & (adata.obs["cell_type"] == "Megakaryocyte").to_numpy()]
    provenance = json.loads((out / "unlearning_provenance.json").read_text())
    event = provenance["events"][-1]
    assert event["method"] == "finetune"
    assert event["forgotten"] == cells_fingerprint(expected)  # count and hash, no names
    assert "forgotten_obs_names" not in provenance
    reloaded = su.model.SCVI.load(str(out), adata.copy())
    assert reloaded.provenance["events"][-1]["n_forgotten"] == expected.size


def test_cli_unlearn_default_is_exact_and_verifiable(saved_lab_model, tmp_path, capsys):
    lab, adata, plain = saved_lab_model
    out = tmp_path / "default"
    args = ["--forget", "cell_type=Megakaryocyte", "--accelerator", "cpu"]
    code = main(["unlearn", str(lab / "model"), str(lab / "data.h5ad"), *args, "--out", str(out)])
    assert code == 0
    assert "cells the model never trained on" in capsys.readouterr().out  # held-out utility
    event = json.loads((out / "unlearning_provenance.json").read_text())["events"][-1]
    assert event["method"] == "retrain_fast" and event["reproduce"]["weights_sha256"]
    # anyone with the data re-runs it and gets the same weights, bit for bit
    withdrawn = tmp_path / "withdrawn.txt"
    forgotten = adata.obs_names[(adata.obs["cell_type"] == "Megakaryocyte").to_numpy()]
    trained = set(adata.obs_names[plain.train_indices])
    withdrawn.write_text("\n".join(n for n in forgotten if n in trained))
    code = main(["verify", str(out), str(lab / "data.h5ad"), "--forgotten", str(withdrawn)])
    printed = capsys.readouterr().out
    assert code == 0 and "VERIFIED" in printed and "NOT VERIFIED" not in printed
    # a list that is not the recorded one: not verified, exit 1
    withdrawn.write_text("\n".join(list(trained)[:3]))
    code = main(["verify", str(out), str(lab / "data.h5ad"), "--forgotten", str(withdrawn)])
    assert code == 1 and "withdrawal list" in capsys.readouterr().out


def test_cli_unlearn_auto_lists_its_attempts(saved_lab_model, tmp_path, capsys):
    lab, _, _ = saved_lab_model
    out = tmp_path / "auto"
    code = main(
        ["unlearn", str(lab / "model"), str(lab / "data.h5ad"), "--forget",
         "cell_type=Megakaryocyte", "--method", "auto", "--accelerator", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    # 30 held-out cells in all: too few development cells, so the exact fallback, said so
    assert "method='auto' tried 1 method(s)" in printed
    assert "no approximate method tried" in printed
    assert "retrain_fast: ACCEPTED: exact" in printed
    provenance = json.loads((out / "unlearning_provenance.json").read_text())
    assert provenance["events"][-1]["metrics"]["accepted_method"] == "retrain_fast"


def test_cli_unlearn_reports_bad_input(saved_lab_model, capsys, tmp_path):
    lab, _, _ = saved_lab_model
    base = [
        "unlearn",
        str(lab / "model"),
        str(lab / "data.h5ad"),
        "--out",
        str(tmp_path / "x"),
    ]
    assert main([*base, "--forget", "cell_type=NoSuchType"]) == 2
    assert "NoSuchType" in capsys.readouterr().err
    assert main([*base, "--forget", "cell_type=B", "--method", "magic"]) == 2
    assert "magic" in capsys.readouterr().err
    assert (
        main([*base, "--forget", "cell_type=B", "--method", "finetune", "--param", "lr=-1"]) == 2
    )
    assert "lr" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    tiny = {"n_cells": 300, "n_genes": 80, "max_epochs": 20, "n_shadows": 2, "rare": 0.1}
    monkeypatch.setitem(_demo.DEMO_SETTINGS, "quick", tiny)
    result = _demo.run_demo(out_dir=tmp_path, quick=True, seed=0)
    names = [row["model"] for row in result["summary"]]
    assert names == ["before unlearning", "retrain_fast (default)", "retrain", "fisher"]
    audited = [row for row in result["summary"] if "lira_auc" in row]
    assert [r["model"] for r in audited[:3]] == names[:3]  # a destroyed model may not be
    for row in audited:
        assert 0.0 <= row["lira_auc"] <= 1.0
        assert row["verdict"] in su.audit.VERDICTS
    for row in audited[1:]:  # privacy and utility in one result per method
        assert row["overall"] in su.audit.OVERALL_RESULTS
        assert row["utility_vs_retrain"].endswith("%")
    retrain = next(r for r in result["summary"] if r["model"] == "retrain")
    assert retrain["utility_vs_retrain"] == "+0.0%"  # retrain against itself
    # the default is exact, re-run from its record bit for bit, and certified
    assert result["verification"].verified
    assert (tmp_path / "unlearning_certificate.html").exists()
    # one table on screen; the rows go to a file, not to the screen again
    printed = capsys.readouterr().out
    assert printed.count("retrain_fast (default)") == 1 and '"lira_auc"' not in printed
    saved = json.loads((tmp_path / "demo_summary.json").read_text())
    assert [r["model"] for r in saved["rows"]] == names and saved["verify"]["verified"]
    retrained = su.model.SCVI.load(str(tmp_path / "model_retrain"), result["model"].adata.copy())
    assert retrained.provenance["events"][-1]["method"] == "retrain"


def test_cli_audit_is_quiet_unless_verbose(saved_lab_model, tmp_path):
    """What a user sees in a terminal: run the command in its own process."""
    lab, _, _ = saved_lab_model

    def run(*extra: str) -> str:
        args = [
            sys.executable,
            "-m",
            "scvi_unlearn.cli",
            "audit",
            str(lab / "model"),
            str(lab / "data.h5ad"),
            "--n-shadows",
            "2",
            "--shadow-epochs",
            "1",
            "--accelerator",
            "cpu",
            "--out",
            str(tmp_path / "out"),
            *extra,
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    quiet = run("--cache-dir", str(tmp_path / "cache"))
    assert "AuditReport(" in quiet  # the result is printed
    for chatter in ("Seed set to", "LeafSpec", "log_every_n_steps", "GPU available"):
        assert chatter not in quiet, chatter
    loud = run("--cache-dir", str(tmp_path / "cache2"), "--verbose")
    assert "Seed set to" in loud
