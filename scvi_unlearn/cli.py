"""Command line: ``scvi-unlearn audit | unlearn | demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _read_index_file(adata, path: str) -> np.ndarray:
    """Cells listed in a text file: obs names or integer positions, one per line."""
    from scvi_unlearn._validation import as_cell_indices

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"Index file not found: {path!r}.")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if all(line.lstrip("-").isdigit() for line in lines):
        return as_cell_indices(adata, np.array(lines, dtype=np.int64), path)
    return as_cell_indices(adata, np.array(lines), path)


def _select(adata, spec: str | None) -> np.ndarray:
    """Cells with ``obs[key] == value`` for a ``key=value`` spec (all cells if None)."""
    if spec is None:
        return np.arange(adata.n_obs)
    if "=" not in spec:
        raise ValueError(f"Expected KEY=VALUE, got {spec!r}.")
    key, value = spec.split("=", 1)
    if key not in adata.obs:
        raise KeyError(f"obs column {key!r} not found; available: {list(adata.obs.columns)}.")
    mask = adata.obs[key].astype(str).to_numpy() == value
    if not mask.any():
        values = sorted(adata.obs[key].astype(str).unique())[:20]
        raise ValueError(f"No cell has {key}={value!r}; values include {values}.")
    return np.flatnonzero(mask)


def resolve_audit_cells(model, adata, population=None, members_file=None, nonmembers_file=None):
    """Members and non-members for an audit of a stored model.

    Index files win; otherwise members are the ``population`` cells the model trained on
    (from the train indices stored with the model) and non-members the population cells it
    did not train on.
    """
    if members_file and nonmembers_file:
        return _read_index_file(adata, members_file), _read_index_file(adata, nonmembers_file)
    names = getattr(model, "train_obs_names_", None)
    if names is not None:
        trained = adata.obs_names.isin(names)
    else:
        train = getattr(model, "train_indices", None)
        if train is None:
            raise ValueError(
                "The model stores no training indices: pass --members and --nonmembers files."
            )
        n_setup = model.summary_stats.get("n_cells")
        if n_setup is not None and int(n_setup) != adata.n_obs:
            # Plain scvi-tools stores positions, not names: they only mean something in the
            # AnnData the model was set up with.
            raise ValueError(
                f"The model was set up on an AnnData of {int(n_setup)} cells but the data has "
                f"{adata.n_obs}; its stored training positions cannot be matched to these cells. "
                "Pass the AnnData it was trained on, or --members and --nonmembers files."
            )
        trained = np.zeros(adata.n_obs, bool)
        trained[np.asarray(train, dtype=int)] = True
    population_idx = _select(adata, population)
    members = (
        _read_index_file(adata, members_file)
        if members_file
        else population_idx[trained[population_idx]]
    )
    nonmembers = (
        _read_index_file(adata, nonmembers_file)
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
    import anndata

    import scvi_unlearn as su

    adata = anndata.read_h5ad(args.data)
    model = su.model.SCVI.load(args.model_dir, adata.copy())
    members, nonmembers = resolve_audit_cells(
        model, adata, args.population, args.members, args.nonmembers
    )
    overrides = {"max_epochs": args.shadow_epochs} if args.shadow_epochs else {}
    mi = su.MembershipInference(
        adata,
        recipe=model,
        n_shadows=args.n_shadows,
        seed=args.seed,
        cache_dir=args.cache_dir,
        accelerator=args.accelerator,
        **overrides,
    ).fit()
    report = mi.audit(model, members=members, nonmembers=nonmembers)
    return _write_report(report, Path(args.out))


def _write_report(report, out: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    print(repr(report))
    print()
    print(report.explain())
    report.to_json(str(out / "audit_report.json"))
    report.to_frame().to_csv(out / "audit_table.csv")
    report.plot_roc(save=str(out / "audit_roc.png"), show=False)
    print(
        f"\nWrote {out / 'audit_report.json'}, {out / 'audit_table.csv'}, {out / 'audit_roc.png'}"
    )
    return 0


def _parse_hyperparameters(pairs: list[str]) -> dict:
    """``["lambda_=5", "n_critics=3"]`` -> ``{"lambda_": 5.0, "n_critics": 3}`` (JSON values)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--param expects NAME=VALUE, got {pair!r}.")
        name, value = pair.split("=", 1)
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def cmd_unlearn(args) -> int:
    import anndata

    import scvi_unlearn as su

    adata = anndata.read_h5ad(args.data)
    model = su.model.SCVI.load(args.model_dir, adata)
    names = getattr(model, "train_obs_names_", None)
    train = (
        model.adata.obs_names.get_indexer(names)
        if names is not None
        else np.asarray(model.train_indices, dtype=int)
    )
    forget = su.data.parse_forget_spec(model.adata, args.forget, within=train)
    nonmembers = _read_index_file(model.adata, args.nonmembers) if args.nonmembers else None
    forgotten = model.unlearn(
        forget,
        method=args.method,
        nonmembers=nonmembers,
        seed=args.seed,
        audit=args.audit,
        accelerator=args.accelerator,
        max_epochs=args.max_epochs,
        **_parse_hyperparameters(args.param),
    )
    forgotten.save(args.out, overwrite=args.overwrite)
    event = forgotten.provenance["events"][-1]
    print(
        f"Forgot {event['n_forgotten']} cells with {event['method']} in "
        f"{event['wall_time_s']:.1f} s; saved to {args.out} (provenance: "
        f"{args.out}/unlearning_provenance.json)."
    )
    if args.audit:
        print(event["audit"]["explanation"])
    return 0


def cmd_demo(args) -> int:
    from scvi_unlearn._demo import run_demo

    result = run_demo(out_dir=args.out, quick=args.quick, seed=args.seed)
    print(json.dumps(result["summary"], indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scvi-unlearn",
        description="Machine unlearning and membership-inference audits for scVI models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    audit = sub.add_parser("audit", help="Audit a saved scVI model for membership leakage.")
    audit.add_argument("model_dir", help="Directory written by scvi.model.SCVI.save().")
    audit.add_argument("data", help="The .h5ad the model was trained on (raw counts).")
    audit.add_argument(
        "--population",
        help="KEY=VALUE: audit these cells, members = the ones the model trained on "
        "(from its stored train indices), non-members = the others.",
    )
    audit.add_argument("--members", help="Text file of member obs names or positions.")
    audit.add_argument("--nonmembers", help="Text file of non-member obs names or positions.")
    audit.add_argument("--n-shadows", type=int, default=16)
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

    unlearn = sub.add_parser("unlearn", help="Remove cells from a saved scVI model.")
    unlearn.add_argument("model_dir", help="Directory written by scvi.model.SCVI.save().")
    unlearn.add_argument("data", help="The .h5ad the model was trained on (raw counts).")
    unlearn.add_argument(
        "--forget",
        required=True,
        help="KEY=VALUE (e.g. cell_type=Megakaryocytes), donor:ID, random:N[:seed=S], or a "
        "file of obs names / positions; restricted to the model's training cells.",
    )
    unlearn.add_argument("--method", default="extragradient")
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
    unlearn.add_argument("--accelerator", default="auto")
    unlearn.add_argument("--out", required=True, help="Directory for the new model.")
    unlearn.add_argument("--overwrite", action="store_true")
    unlearn.set_defaults(func=cmd_unlearn)

    demo = sub.add_parser("demo", help="Run the end-to-end demo on embedded synthetic data.")
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
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, IndexError, RuntimeError, TypeError) as exc:
        print(f"scvi-unlearn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
