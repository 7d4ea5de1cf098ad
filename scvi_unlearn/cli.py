"""Command line: ``scvi-unlearn audit | unlearn | verify | train-deletion-ready | demo``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pickle
import sys
import traceback
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np

from scvi_unlearn._demo import run_demo
from scvi_unlearn._io import read_h5ad_checked
from scvi_unlearn._model_data import training_positions
from scvi_unlearn._utils import parse_key_value
from scvi_unlearn._validation import check_trained
from scvi_unlearn.audit import DEFAULT_N_SHADOWS, UNDERPOWERED, MembershipInference
from scvi_unlearn.data import parse_forget_spec, read_cell_list, structured_forget_set
from scvi_unlearn.model import SCVI, train_deletion_ready, verify_unlearning
from scvi_unlearn.pl._utils import save_figure
from scvi_unlearn.train import method_names

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Library loggers whose INFO lines ("Seed set to 0", "GPU available: False", ...) would
#: otherwise print once per shadow model between the progress bars.
_CHATTY_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "scvi",
)
#: Warnings that say nothing the user can act on in a command-line run.
_EXPECTED_WARNINGS = (
    r".*LeafSpec.*",  # torch pytree deprecation raised inside Lightning
    r".*log_every_n_steps.*",  # small data: fewer batches than Lightning's logging interval
    r".*does not have many workers.*",  # in-memory AnnData: workers would only add overhead
    r".*module\(s\) in eval mode.*",  # frozen parts of a plan (batch norm, a decoder) by design
)


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Library chatter off for the block, or (``verbose``) everything on.

    Quiet: the libraries' INFO lines and the warnings in :data:`_EXPECTED_WARNINGS` are
    dropped; progress bars and the command's own output stay. Verbose: the libraries log at
    INFO and ``scvi_unlearn`` at DEBUG (which also lifts its own per-shadow silencing).
    """
    loggers = [logging.getLogger(name) for name in (*_CHATTY_LOGGERS, "scvi_unlearn")]
    levels = [lg.level for lg in loggers]
    for lg in loggers[:-1]:
        lg.setLevel(logging.INFO if verbose else logging.WARNING)
    loggers[-1].setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        with warnings.catch_warnings():
            if not verbose:
                for pattern in _EXPECTED_WARNINGS:
                    warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _population_cells(adata, spec: str | None) -> np.ndarray:
    """Cells with ``obs[key] == value`` for a ``KEY=VALUE`` spec (all cells if None)."""
    if spec is None:
        return np.arange(adata.n_obs)
    key, value = parse_key_value(spec, "--population KEY=VALUE")
    return structured_forget_set(adata, key, value)


def resolve_audit_cells(model, adata, population=None, members_file=None, nonmembers_file=None):
    """Members and non-members for an audit of a stored model.

    Cell-list files win; otherwise members are the ``population`` cells the model trained on
    (see :func:`scvi_unlearn._model_data.training_positions`) and non-members the population
    cells it did not train on.
    """
    if members_file and nonmembers_file:
        return read_cell_list(adata, members_file), read_cell_list(adata, nonmembers_file)
    train = training_positions(model, adata)
    if train is None:
        raise ValueError(
            "The model stores no training indices: pass --members and --nonmembers files."
        )
    trained = np.zeros(adata.n_obs, bool)
    trained[train] = True
    population_idx = _population_cells(adata, population)
    members = (
        read_cell_list(adata, members_file)
        if members_file
        else population_idx[trained[population_idx]]
    )
    nonmembers = (
        read_cell_list(adata, nonmembers_file)
        if nonmembers_file
        else population_idx[~trained[population_idx]]
    )
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError(
            f"Found {members.size} members and {nonmembers.size} non-members in "
            f"{population or 'all cells'}; an audit needs both. Did the model train on every "
            "cell (train_size=1.0)? Then pass --nonmembers with held-out cells."
        )
    return members, nonmembers


def cmd_audit(args) -> int:
    """``scvi-unlearn audit``: shadows, attacks, report files."""
    model = SCVI.load(args.model_dir, read_h5ad_checked(args.data))
    check_trained(model)
    adata = model.adata  # genes in the model's order, cells matched by name (see SCVI.load)
    members, nonmembers = resolve_audit_cells(
        model, adata, args.population, args.members, args.nonmembers
    )
    overrides = {"max_epochs": args.shadow_epochs} if args.shadow_epochs else {}
    mi = MembershipInference(
        adata,
        recipe=model,
        n_shadows=args.n_shadows,
        seed=args.seed,
        cache_dir=args.cache_dir,
        accelerator=args.accelerator,
        group_key=args.group_key,
        **overrides,
    ).fit()
    report = mi.audit(model, members=members, nonmembers=nonmembers)
    print(_nonmember_note(report, from_file=bool(args.nonmembers)))
    code = _write_report(report, Path(args.out))
    if args.group_key:
        _write_group_report(mi.audit_groups(model), Path(args.out))
    return code


def _write_group_report(report, out: Path) -> None:
    """The donor-level (group-level) audit: one p-value and verdict per group."""
    print()
    print(repr(report))
    report.to_json(str(out / "group_audit.json"))
    report.to_frame().to_csv(out / "group_audit.csv")
    print(f"Wrote {out / 'group_audit.json'}, {out / 'group_audit.csv'}")


#: Fewer non-members than this cannot measure a TPR at 1% FPR.
_ENOUGH_NONMEMBERS = 100


def _nonmember_note(report, from_file: bool) -> str:
    """How many non-members the audit used, and how to supply more when that is too few."""
    n = report.metadata["n_nonmembers"]
    source = "from --nonmembers" if from_file else "cells of the population the model never saw"
    note = f"Non-members: {n} ({source}); members: {report.metadata['n_members']}."
    reasons = []
    if n < _ENOUGH_NONMEMBERS:
        reasons.append("measure a TPR at 1% FPR")
    if report.verdict == UNDERPOWERED:
        reasons.append("reach a verdict")
    if reasons:
        note += (
            f" That is too few to {' or to '.join(reasons)}: pass --nonmembers FILE, a list of "
            "obs names (one per line) of cells from the same population that the model never "
            "trained on (e.g. held out before training)."
        )
    return note


def _write_report(report, out: Path) -> int:
    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    print(repr(report))
    print()
    print(report.explain())
    files = {
        "report": out / "audit_report.json",
        "table": out / "audit_table.csv",
        "roc": out / "audit_roc.png",
        "certificate": out / "certificate.html",
    }
    report.to_json(str(files["report"]))
    report.to_frame().to_csv(files["table"])
    save_figure(report.plot_roc(show=False).figure, files["roc"])
    report.save_html(files["certificate"])
    print("\nWrote " + ", ".join(str(f) for f in files.values()))
    return 0


def _parse_hyperparameters(pairs: list[str]) -> dict:
    """``["lambda_=5", "n_critics=3"]`` -> ``{"lambda_": 5.0, "n_critics": 3}`` (JSON values)."""
    out = {}
    for pair in pairs or []:
        name, value = parse_key_value(pair, "--param NAME=VALUE")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def cmd_unlearn(args) -> int:
    """``scvi-unlearn unlearn``: forget cells of a saved model and save the result."""
    adata = read_h5ad_checked(args.data)
    model = SCVI.load(args.model_dir, adata)
    check_trained(model)
    train = training_positions(model)
    if train is None:
        raise ValueError("The model stores no training cells, so none can be unlearned.")
    forget = parse_forget_spec(model.adata, args.forget, within=train)
    nonmembers = read_cell_list(model.adata, args.nonmembers) if args.nonmembers else None
    forgotten = model.unlearn(
        forget,
        method=args.method,
        nonmembers=nonmembers,
        seed=args.seed,
        audit=args.audit,
        accelerator=args.accelerator,
        max_epochs=args.max_epochs,
        record_names=args.record_names,
        **_parse_hyperparameters(args.param),
    )
    forgotten.save(args.out, overwrite=args.overwrite)
    event = forgotten.provenance["events"][-1]
    print(
        f"Forgot {event['n_forgotten']} cells with {event['method']} in "
        f"{event['wall_time_s']:.1f} s; saved to {args.out} (provenance: "
        f"{args.out}/unlearning_provenance.json)."
    )
    utility = event.get("utility", {})
    if utility.get("n_held_out_cells"):
        print(
            f"Held-out neg. ELBO {utility['neg_elbo_before']:.1f} -> "
            f"{utility['neg_elbo_after']:.1f} ({100 * utility['change']:+.1f}%) on "
            f"{utility['n_held_out_cells']} cells the model never trained on."
        )
    if event["method"] == "auto":
        for line in auto_attempt_lines(event["metrics"]):
            print(line)
    if args.audit:
        print(event["audit"]["explanation"])
    return 0


def auto_attempt_lines(metrics: dict) -> list[str]:
    """One line per attempt of ``method='auto'``: what ran, the gate's audit, the decision."""
    lines = [
        f"method='auto' tried {len(metrics['attempts'])} method(s) on "
        f"{metrics['n_forget_development']} forget + {metrics['n_nonmember_development']} "
        "non-member development cells (the audit's reporting cells are the others):"
    ]
    if metrics.get("skipped_approximate"):
        lines.append(f"  no approximate method tried: {metrics['skipped_approximate']}")
    for attempt in metrics["attempts"]:
        decision = "ACCEPTED" if attempt.get("accepted") else "rejected"
        detail = []
        gate = attempt.get("audit")
        if gate:
            band = gate["band"]
            band_text = "" if band is None else f", band {band[0]:.2f}-{band[1]:.2f}"
            detail.append(f"LiRA AUC {gate['auc']:.2f}{band_text} ({gate['verdict']})")
        if attempt.get("utility_loss") is not None:
            detail.append(f"held-out neg. ELBO {100 * attempt['utility_loss']:+.1f}%")
        detail.append(f"{attempt['wall_time_s']:.1f} s")
        lines.append(
            f"  {attempt['method']}: {decision}: {attempt.get('reason', '')} [{'; '.join(detail)}]"
        )
    return lines


def cmd_verify(args) -> int:
    """``scvi-unlearn verify``: re-run a recorded exact unlearning; exit 0 only if bit-equal."""
    forgotten = None
    if args.forgotten:
        forgotten = [line.strip() for line in Path(args.forgotten).read_text().splitlines()]
        forgotten = [name for name in forgotten if name]
    result = verify_unlearning(
        args.model_dir, read_h5ad_checked(args.data), forgotten=forgotten, accelerator="cpu"
    )
    print(repr(result))
    if result.versions_differ:
        print(f"Versions differ from the record: {result.versions_differ}")
    return 0 if result.verified else 1


def cmd_train_deletion_ready(args) -> int:
    """``scvi-unlearn train-deletion-ready``: a model whose donors can be removed at no cost."""
    adata = read_h5ad_checked(args.data)
    train_kwargs = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    model = train_deletion_ready(
        adata,
        args.donor_key,
        args.permanent,
        train_kwargs=train_kwargs,
        query_epochs=args.query_epochs,
        seed=args.seed,
        accelerator=args.accelerator,
    )
    model.save(args.out, overwrite=args.overwrite)
    design = model.deletion_ready_
    print(
        f"Trained a deletion-ready model in {design['preparation_seconds']:.1f} s: shared "
        f"weights on {len(design['permanent'])} permanent donor(s) "
        f"({design['base']['n_cells']} cells), {len(design['withdrawable'])} withdrawable "
        f"donor(s) fitted one by one; saved to {args.out}. Remove a donor with "
        f"`scvi-unlearn unlearn {args.out} {args.data} --forget donor:ID --out DIR`."
    )
    return 0


def cmd_demo(args) -> int:
    """``scvi-unlearn demo``: the end-to-end run on embedded synthetic data."""
    result = run_demo(out_dir=args.out, quick=args.quick, seed=args.seed)
    return 0 if result["verification"].verified else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``scvi-unlearn`` argument parser (subcommands audit, unlearn, demo)."""
    parser = argparse.ArgumentParser(
        prog="scvi-unlearn",
        description="Machine unlearning and membership-inference audits for scVI models.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Show the libraries' log lines and warnings (Lightning, scvi-tools), and the "
        "traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    audit = sub.add_parser(
        "audit", parents=[common], help="Audit a saved scVI model for membership leakage."
    )
    audit.add_argument("model_dir", help="Directory written by scvi.model.SCVI.save().")
    audit.add_argument("data", help="The .h5ad the model was trained on (raw counts).")
    audit.add_argument(
        "--population",
        help="KEY=VALUE: audit these cells, members = the ones the model trained on "
        "(from its stored train indices), non-members = the others.",
    )
    audit.add_argument("--members", help="Text file of member obs names or positions.")
    audit.add_argument("--nonmembers", help="Text file of non-member obs names or positions.")
    audit.add_argument("--n-shadows", type=int, default=DEFAULT_N_SHADOWS)
    audit.add_argument(
        "--group-key",
        default=None,
        help="obs column of donors (e.g. sample_id): shadows train on halves of the donors and "
        "a donor-level audit (a p-value and verdict per donor) is written as well.",
    )
    audit.add_argument(
        "--shadow-epochs",
        type=int,
        default=None,
        help="Override the shadows' max_epochs (weakens the attack; recorded).",
    )
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--cache-dir", default=None)
    audit.add_argument("--accelerator", default="auto")
    audit.add_argument("--out", default="audit_output")
    audit.set_defaults(func=cmd_audit)

    unlearn = sub.add_parser(
        "unlearn", parents=[common], help="Remove cells from a saved scVI model."
    )
    unlearn.add_argument("model_dir", help="Directory written by scvi.model.SCVI.save().")
    unlearn.add_argument("data", help="The .h5ad the model was trained on (raw counts).")
    unlearn.add_argument(
        "--forget",
        required=True,
        help="KEY=VALUE (e.g. cell_type=Megakaryocytes), donor:ID, random:N[:seed=S], or a "
        "file of obs names / positions; restricted to the model's training cells.",
    )
    unlearn.add_argument(
        "--method",
        default=None,
        help="Unlearning method (default: on a deletion-ready model drop_donors for whole "
        "withdrawable donors and refit_donors for some of their cells, else retrain_fast; all "
        "exact and verifiable); one of " + ", ".join(method_names()) + ".",
    )
    unlearn.add_argument("--nonmembers", help="File of same-population non-member cells.")
    unlearn.add_argument(
        "--param",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="Method hyper-parameters, e.g. lambda_=5 n_critics=3.",
    )
    unlearn.add_argument("--max-epochs", type=int, default=None)
    unlearn.add_argument("--seed", type=int, default=0)
    unlearn.add_argument("--audit", action="store_true", help="Audit the result afterwards.")
    unlearn.add_argument(
        "--record-names",
        action="store_true",
        help="Keep the forgotten cells' names in the provenance (default: count and SHA-256).",
    )
    unlearn.add_argument("--accelerator", default="auto")
    unlearn.add_argument("--out", required=True, help="Directory for the new model.")
    unlearn.add_argument("--overwrite", action="store_true")
    unlearn.set_defaults(func=cmd_unlearn)

    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="Re-run a recorded exact unlearning and check the weights bit for bit.",
    )
    verify.add_argument("model_dir", help="Directory of a model unlearned by an exact method.")
    verify.add_argument("data", help="The lab's .h5ad with the retained cells' raw counts.")
    verify.add_argument(
        "--forgotten",
        help="File of the withdrawn cells' obs names (one per line): checked against the "
        "recorded count and fingerprint, and that none is a training cell.",
    )
    verify.set_defaults(func=cmd_verify)

    ready = sub.add_parser(
        "train-deletion-ready",
        parents=[common],
        help="Train a model from which every non-permanent donor can be removed exactly, "
        "without training.",
    )
    ready.add_argument("data", help="The .h5ad of every donor's cells (raw counts).")
    ready.add_argument("--donor-key", required=True, help="obs column of donors.")
    ready.add_argument(
        "--permanent",
        nargs="+",
        required=True,
        metavar="DONOR",
        help="Donors never withdrawn: their cells train the shared weights.",
    )
    ready.add_argument("--max-epochs", type=int, default=None, help="Epochs of the base.")
    ready.add_argument(
        "--query-epochs", type=int, default=None, help="Epochs of each donor's fit."
    )
    ready.add_argument("--seed", type=int, default=0)
    ready.add_argument("--accelerator", default="auto")
    ready.add_argument("--out", required=True, help="Directory for the model.")
    ready.add_argument("--overwrite", action="store_true")
    ready.set_defaults(func=cmd_train_deletion_ready)

    demo = sub.add_parser(
        "demo", parents=[common], help="Run the end-to-end demo on embedded synthetic data."
    )
    demo.add_argument("--out", default="demo_output")
    demo.add_argument("--quick", action="store_true", help="Smaller data and fewer epochs.")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scvi-unlearn`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with quiet_libraries(args.verbose):
            return args.func(args)
    except _EXPECTED_ERRORS as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"scvi-unlearn {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scvi-unlearn {args.command}: interrupted; nothing was saved.", file=sys.stderr)
        return 130


#: Errors a command reports in one line (``--verbose`` adds the traceback): bad input, files
#: that are missing, unreadable or corrupt, permissions, an untrained or destroyed model.
_EXPECTED_ERRORS = (
    OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, json.JSONDecodeError,
    ValueError, KeyError, IndexError, RuntimeError, TypeError,
)  # fmt: skip


def _one_line(exc: BaseException) -> str:
    """The error's message on one line, named by its type where the message alone is bare."""
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text if isinstance(exc, ValueError | RuntimeError) else f"{type(exc).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
