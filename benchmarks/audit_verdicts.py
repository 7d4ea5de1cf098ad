r"""Calibration of the audit's verdict against retrain reference models, on real null audits.

The question: when an audit judges a model against retrained reference models, how often does
it call "leak" when the model never trained on the audited cells (false leaks), and how often
when it did (power)? Two verdict rules are compared on the same audits:

- ``sampling band`` (the rule before this benchmark): the band is
  ``mean +- 2 sqrt(SD^2 + mean SE^2)`` of the reference AUCs, and a leak is called when the
  audited AUC's confidence interval lies above it. The cells' sampling error enters twice (in the
  references' SD, as they are scored on the same cells, and in the SE) and a third time through
  the audited CI.
- ``paired``: the references and the audited model are scored on the *same* cells, so the cells'
  sampling error is shared and cancels; what is left is the model-to-model spread. The band is
  the prediction interval of one more exchangeable model, ``mean +- t(K - 1) SD sqrt(1 + 1/K)``
  (:func:`scvi_unlearn.audit.reference_band`), and the audited *point* AUC is compared with it.

Protocol (written before running):

- Data sets and recipes as ``audit_calibration.py``: 2,000-cell random subsets of Kang 2018
  and of pbmc3k (1,000 seurat_v3 HVGs), scVI's default architecture (50 epochs) and the
  memorising one (512 hidden, 2 layers, 30 latent; 30 epochs), ``train_size=1.0``,
  ``batch_size=128``; the package's default shadow pool (``DEFAULT_N_SHADOWS`` shadows, seed 0)
  on the whole subset.
- Per data set x recipe: a retained set R (1,000 random cells), a forget pool F (300 of the
  other cells) and never-seen cells N (the remaining 700). ``--retrains`` retrain seeds train
  on R only (they never see F or N) and ``--originals`` seeds on R + F (F are members).
- Null audit: one retrain seed is the audited model and ``K`` of the others are the reference
  models; "members" = m random cells of F, non-members = m random cells of N. Nothing was
  trained on either, so any "leak" is false. Power audit: an original is the audited model, K
  retrains the references, the same kind of draw (now the members are real).
- Sizes: m = 60 and m = 200 per side; K = 8 (and K = 3, the first three of the same draw).
- All six attacks; each rule's per-attack verdict (two-sided 95%) and family verdict
  (Bonferroni over the attacks that ran, as ``report.verdict`` combines them).
- Null audits share models (every retrain is audited several times, and a reference of
  others), so they are not independent: the Wilson intervals are optimistic. Recorded per audit:
  which models, which cells (positions in the subset), every model's AUC per attack, and the
  verdicts; the per-model per-cell attack features stay in ``--cache-dir``.

Run (one torch thread per process; the two data sets can run side by side)::

    python benchmarks/audit_verdicts.py --datasets kang
    python benchmarks/audit_verdicts.py --datasets pbmc3k
    python benchmarks/audit_verdicts.py --report-only

Writes ``benchmarks/results/audit_verdicts/{results.json,results.md,*.png,units/}``.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from _common import markdown_table, write_page
from audit_calibration import (
    ALL_ATTACKS,
    add_subset_arguments,
    load,
    quiet,
    recipe_for,
    wilson,
)

import scvi_unlearn as su
from scvi_unlearn._verdict import sampling_band
from scvi_unlearn.audit._metrics import percentile_ci

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "audit_verdicts"
LEAK = su.audit.LEAK
#: The rules compared: name -> how a row's verdicts are keyed.
RULES = {
    "shadow interval (no references)": "shadow",
    "sampling band, 3 references": "sampling3",
    "sampling band, 8 references": "sampling8",
    "paired, 3 references": "paired3",
    "paired, 8 references": "paired8",
}


def split(n: int, combo: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Retained (1/2), forget pool (300) and never-seen cells of a subset of ``n`` cells."""
    rng = np.random.default_rng([seed, zlib.crc32(combo.encode())])
    order = rng.permutation(n)
    retain = np.sort(order[: n // 2])
    forget = np.sort(order[n // 2 : n // 2 + 300])
    unseen = np.sort(order[n // 2 + 300 :])
    return retain, forget, unseen


def train_models(mi, adata, recipe, combo: str, args) -> dict[str, np.ndarray]:
    """Attack features of every cell under each retrain and original (cached per model)."""
    retain, forget, _ = split(adata.n_obs, combo, args.seed)
    folder = Path(args.cache_dir) / "features" / combo.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    plan = [(f"retrain{s}", retain, 100 + s) for s in range(args.retrains)]
    plan += [(f"original{s}", np.union1d(retain, forget), 200 + s) for s in range(args.originals)]
    feats = {}
    for name, cells, seed in plan:
        path = folder / f"{name}.npy"
        if not path.exists():
            start = time.perf_counter()
            model = recipe.fit_cells(
                adata, cells, seed=seed, accelerator="cpu", enable_progress_bar=False
            )
            values = su.audit.attack_features(model, adata).to_numpy()
            np.save(path, values)
            print(f"{combo} {name}: {time.perf_counter() - start:.0f} s", flush=True)
        feats[name] = np.load(path)
    return feats


def draw(combo: str, kind: str, m: int, i: int, n_retrains: int, n_originals: int, args):
    """Audited model, 8 reference retrains and the audited cells of one audit (reproducible)."""
    rng = np.random.default_rng([args.seed, zlib.crc32(combo.encode()), kind == "power", m, i])
    if kind == "null":
        audited = int(rng.integers(n_retrains))
        others = np.setdiff1d(np.arange(n_retrains), [audited])
        name = f"retrain{audited}"
    else:
        others = np.arange(n_retrains)
        name = f"original{i % n_originals}"
    refs = [f"retrain{j}" for j in rng.permutation(others)[:8]]
    return rng, name, refs


def one_audit(mi, feats, cells_of, combo, kind, m, i, args) -> dict:
    """All attacks and all rules on one audit."""
    _, forget, unseen = cells_of
    rng, name, refs = draw(combo, kind, m, i, args.retrains, args.originals, args)
    members = np.sort(rng.choice(forget, m, replace=False))
    nonmembers = np.sort(rng.choice(unseen, m, replace=False))
    cells = np.r_[members, nonmembers]
    is_member = np.r_[np.ones(m, bool), np.zeros(m, bool)]
    attacks, verdicts = {}, {rule: {} for rule in RULES.values()}
    for attack in ALL_ATTACKS:
        try:
            scores = {
                model: mi._scores(attack, feats[model][cells], cells, is_member)
                for model in [name, *refs]
            }
            _, _, shadow_interval = mi._reference(attack, [], cells, is_member, args.n_bootstrap)
        except ValueError as exc:  # an attack that cannot run on these cells
            attacks[attack] = {"skipped": str(exc)}
            continue
        aucs = {
            k: float(su.audit.auc_from_scores(v[is_member], v[~is_member]))
            for k, v in scores.items()
        }
        boots = {
            k: su.audit.bootstrap_metrics(
                v[is_member], v[~is_member], args.n_bootstrap, 0, fprs=()
            )["auc"]
            for k, v in scores.items()
        }
        attacks[attack] = {
            "auc": aucs[name],
            "reference_aucs": [aucs[r] for r in refs],
            "reference_cis": [percentile_ci(boots[r]) for r in refs],
            "boot": boots[name],
            "shadow_interval": shadow_interval,
        }
    ran = [a for a, v in attacks.items() if "skipped" not in v]
    level = su.audit.family_level(len(ran))
    for attack in ran:
        a = attacks[attack]
        ci = percentile_ci(a["boot"])
        ci_family = percentile_ci(a["boot"], level=level)
        a["auc_ci"], a["auc_ci_family"] = ci, ci_family
        band = a["shadow_interval"]
        detect = su.audit.detectable_auc(m, m, reference=max(band[1], 0.5))
        verdicts["shadow"][attack] = (
            su.audit.judge(ci, band, detect),
            su.audit.judge(ci_family, band, detect),
            band,
            detect,
        )
        for k in (3, 8):
            band = sampling_band(a["reference_aucs"][:k], a["reference_cis"][:k])
            detect = su.audit.detectable_auc(m, m, reference=max(band[1], 0.5))
            verdicts[f"sampling{k}"][attack] = (
                su.audit.judge(ci, band, detect),
                su.audit.judge(ci_family, band, detect),
                band,
                detect,
            )
            v, fam, band, _, detect = su.audit.paired_verdict(
                a["auc"], a["reference_aucs"][:k], m, m, n_attacks=len(ran)
            )
            verdicts[f"paired{k}"][attack] = (v, fam, band, detect)
        del a["boot"]
    return {
        "combo": combo,
        "kind": kind,
        "m": m,
        "draw": i,
        "audited": name,
        "references": refs,
        "attacks": attacks,
        "verdicts": {
            rule: {
                "attacks": {
                    attack: {"verdict": v, "family_verdict": f, "band": b, "detectable_auc": d}
                    for attack, (v, f, b, d) in per.items()
                },
                "overall": su.audit.combine_verdicts([f for _, f, _, _ in per.values()]),
            }
            for rule, per in verdicts.items()
        },
    }


def _compact(value):
    """Floats to 5 decimals (the record's size), numpy scalars to Python."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), 5)
    if isinstance(value, np.integer):
        return int(value)
    return value


def run_audits(mi, feats, adata, combo: str, args) -> None:
    """Every audit of one data set x recipe, saved as one unit per (kind, m) (resumable)."""
    cells_of = split(adata.n_obs, combo, args.seed)
    units = OUT / "units"
    units.mkdir(parents=True, exist_ok=True)
    for kind, m, count in (
        ("null", 60, args.null_60),
        ("power", 60, args.power_60),
        ("null", 200, args.null_200),
        ("power", 200, args.power_200),
    ):
        path = units / f"{combo.replace('/', '_')}_{kind}_m{m}.json"
        done = json.loads(path.read_text()) if path.exists() else []
        start = time.perf_counter()
        for i in range(len(done), count):
            done.append(one_audit(mi, feats, cells_of, combo, kind, m, i, args))
            if (i + 1) % 10 == 0 or i + 1 == count:
                path.write_text(json.dumps(_compact(done), separators=(",", ":")))
        print(
            f"{combo} {kind} m={m}: {count} audits ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


# -- report ------------------------------------------------------------------------------------
def rows(units: list[dict]) -> pd.DataFrame:
    out = []
    for u in units:
        dataset, recipe = u["combo"].split("/")
        for label, rule in RULES.items():
            v = u["verdicts"][rule]
            lira = v["attacks"].get("lira_online", {})
            out.append(
                {
                    "dataset": dataset,
                    "recipe": recipe,
                    "kind": u["kind"],
                    "m": u["m"],
                    "rule": label,
                    "overall": v["overall"],
                    "lira_online": lira.get("verdict"),
                    "lira_online_detectable": lira.get("detectable_auc", np.nan),
                    "lira_online_auc": u["attacks"].get("lira_online", {}).get("auc", np.nan),
                    "loss": v["attacks"].get("loss", {}).get("verdict"),
                    "any_attack_95": any(a["verdict"] == LEAK for a in v["attacks"].values()),
                    "min_detectable": min(
                        (a["detectable_auc"] for a in v["attacks"].values()), default=np.nan
                    ),
                }
            )
    return pd.DataFrame(out)


def rate(flags: pd.Series) -> str:
    k, n = int(flags.sum()), int(flags.size)
    if n == 0:
        return "-"
    low, high = wilson(k, n)
    return f"{k}/{n} = {k / n:.3f} [{low:.3f}, {high:.3f}]"


def summary(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    out = []
    for key, g in table.groupby(by, sort=False):
        null, power = g[g["kind"] == "null"], g[g["kind"] == "power"]
        key = key if isinstance(key, tuple) else (key,)
        out.append(
            {
                **dict(zip(by, key)),
                "false leaks (overall verdict)": rate(null["overall"] == LEAK),
                "false leaks (lira_online, 95%)": rate(null["lira_online"] == LEAK),
                "power (overall verdict)": rate(power["overall"] == LEAK),
                "power (lira_online, 95%)": rate(power["lira_online"] == LEAK),
                "false leaks (loss, 95%)": rate(null["loss"] == LEAK),
                "power (loss, 95%)": rate(power["loss"] == LEAK),
                "null 'underpowered'": rate(null["overall"] == su.audit.UNDERPOWERED),
                "median detectable AUC (lira_online)": float(
                    null["lira_online_detectable"].median()
                ),
            }
        )
    return pd.DataFrame(out)


def plot(table: pd.DataFrame, path: Path) -> None:
    """False leaks (overall verdict), a weak attack's power, and the detectable AUC, per rule."""
    labels = list(RULES)
    panels = (
        ("null", lambda g: g["overall"] == LEAK, "false leaks, overall verdict", (0, 0.15)),
        ("power", lambda g: g["loss"] == LEAK, "power of the loss attack (95%)", (0, 1.02)),
    )
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    x = np.arange(len(labels))
    for ax, (kind, flag, title, ylim) in zip(axes, panels):
        for shift, m, colour in ((-0.2, 60, "tab:orange"), (0.2, 200, "tab:blue")):
            rates, errs = [], []
            for label in labels:
                g = table[(table["rule"] == label) & (table["kind"] == kind) & (table["m"] == m)]
                k, n = int(flag(g).sum()), len(g)
                p = k / max(n, 1)
                low, high = wilson(k, n)
                rates.append(p)
                errs.append((max(p - low, 0), max(high - p, 0)))
            ax.bar(x + shift, rates, 0.4, yerr=np.array(errs).T, capsize=3, color=colour,
                   label=f"{m} + {m} cells")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_ylim(*ylim)
    axes[0].axhspan(0.02, 0.05, color="grey", alpha=0.25, label="target range")
    axes[0].set_ylabel("share of audits called 'leak'")
    for shift, m, colour in ((-0.2, 60, "tab:orange"), (0.2, 200, "tab:blue")):
        null = table[(table["kind"] == "null") & (table["m"] == m)]
        med = [
            null.loc[null["rule"] == label, "lira_online_detectable"].median() for label in labels
        ]
        axes[2].bar(x + shift, med, 0.4, color=colour, label=f"{m} + {m} cells")
    axes[2].axhline(su.audit.MAX_DETECTABLE_AUC, color="red", lw=0.8, ls="--",
                    label="'underpowered' above")  # fmt: skip
    axes[2].set_ylim(0.5, 0.85)
    axes[2].set_title("median detectable AUC (lira_online, null audits)", fontsize=10)
    for ax in axes:
        ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _counts(verdicts) -> str:
    counts = pd.Series(list(verdicts)).value_counts()
    return ", ".join(f"{n} {v}" for v, n in counts.items())


def protocol_rejudged(path: Path) -> pd.DataFrame:
    """The unlearning protocol's saved LiRA rows judged again by the paired rule.

    Every row audited on the request's reporting cells (the cells of its retrain rows) is judged
    against the retrain seeds' AUCs on them (a retrain seed against the *other* seeds); rows on
    other cells (``auto``'s, audited on the reporting cells minus its development cells) are left
    out. Only LiRA's verdict is recorded there, so this is the one-attack, 95% verdict.
    """
    if not path.exists():
        return pd.DataFrame()
    out = []
    for cell in json.loads(path.read_text()):
        rows = [r for r in cell["rows"] if "error" not in r]
        retrains = [r for r in rows if r["method"] == "retrain"]
        if len(retrains) < su.audit.MIN_REFERENCE_MODELS + 1:
            continue
        size = (retrains[0]["n_forget"], retrains[0]["n_nonmembers"])
        for method in dict.fromkeys(r["method"] for r in rows):
            part = [r for r in rows if r["method"] == method]
            part = [r for r in part if (r["n_forget"], r["n_nonmembers"]) == size]
            if not part:
                continue
            new = []
            for r in part:
                refs = [q["lira_auc"] for q in retrains if q is not r]
                new.append(su.audit.paired_verdict(r["lira_auc"], refs, *size)[0])
            band = su.audit.reference_band([q["lira_auc"] for q in retrains])
            saved = cell["retrain_band"]
            out.append(
                {
                    "request": f"{cell['dataset']} / {cell['forget']}",
                    "method": method,
                    "rows": len(part),
                    "LiRA AUC": float(np.mean([r["lira_auc"] for r in part])),
                    "sampling band (record)": f"{saved[0]:.3f}-{saved[1]:.3f}",
                    "paired band": f"{band[0]:.3f}-{band[1]:.3f}",
                    "verdicts (record)": _counts(r["verdict"] for r in part),
                    "verdicts (paired)": _counts(new),
                    "changed": sum(v != r["verdict"] for v, r in zip(new, part)),
                }
            )
    return pd.DataFrame(out)


def report(args) -> None:
    units = [u for p in sorted((OUT / "units").glob("*.json")) for u in json.loads(p.read_text())]
    if not units:
        raise SystemExit(f"No audits in {OUT / 'units'}.")
    table = rows(units)
    pooled = summary(table, ["m", "rule"])
    per = summary(table[table["m"] == 60], ["dataset", "recipe", "rule"])
    plot(table, OUT / "rules.png")
    protocol = protocol_rejudged(RESULTS / "unlearning_protocol" / "results.json")
    settings = {k: v for k, v in vars(args).items() if k != "report_only"}
    (OUT / "results.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "pooled": pooled.to_dict(orient="records"),
                "per_combination": per.to_dict(orient="records"),
                "protocol_rejudged": protocol.to_dict(orient="records"),
            },
            indent=1,
            default=str,
        )
    )
    n_null = int(((table["kind"] == "null") & (table["rule"] == next(iter(RULES)))).sum())
    md = [
        "# Verdict calibration against retrain reference models",
        "",
        "Command: `python benchmarks/audit_verdicts.py --datasets kang` and `... --datasets "
        "pbmc3k` side by side, then `--report-only` (protocol in its docstring); 1 torch "
        "thread per process, 2 shared CPU cores.",
        "",
        f"Settings: {args.n_cells} random cells per data set; retained set 1,000 cells, forget "
        f"pool 300, never-seen 700; {args.retrains} retrain seeds and {args.originals} "
        f"originals per data set x recipe; default scVI {args.epochs_default} epochs, "
        f"memorising scVI {args.epochs_memorising} epochs; {su.audit.DEFAULT_N_SHADOWS} shadows; "
        f"{args.n_bootstrap} bootstrap replicates; {n_null} null audits in all. Rates are "
        "`leaks/audits = rate [Wilson 95% CI]` (optimistic: audits share models). The overall "
        "verdict combines all six attacks, each at the Bonferroni family level, as "
        "`report.verdict` does.",
        "",
        "## Both data sets and recipes",
        "",
        markdown_table(pooled),
        "",
        "![rules](rules.png)",
        "",
        "## Per data set and recipe (60 + 60 cells)",
        "",
        markdown_table(per),
        "",
        "## The unlearning protocol's record judged by the paired rule",
        "",
        "The saved LiRA rows of `benchmarks/results/unlearning_protocol/` (judged there by the "
        "sampling band of their run) judged again against the retrain seeds' AUCs on the same "
        "reporting cells (a retrain seed against the other seeds); LiRA alone, 95% level. Rows "
        "audited on other cells (`auto`'s) are left out.",
        "",
        markdown_table(protocol) if len(protocol) else "(no protocol record)",
        "",
    ]
    write_page(OUT, md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_subset_arguments(parser)
    parser.add_argument("--retrains", type=int, default=16)
    parser.add_argument("--originals", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="/tmp/audit_verdicts_cache")
    parser.add_argument("--null-60", type=int, default=60)
    parser.add_argument("--power-60", type=int, default=20)
    parser.add_argument("--null-200", type=int, default=15)
    parser.add_argument("--power-200", type=int, default=8)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", default=None, help="results folder (default: the record's)")
    args = parser.parse_args()
    global OUT
    OUT = Path(args.out) if args.out else OUT
    torch.set_num_threads(1)
    quiet()
    if args.report_only:
        report(args)
        return
    for dataset in args.datasets:
        adata = load(dataset, args)
        for name in args.recipes:
            combo = f"{dataset}/{name}"
            recipe = recipe_for(name, args)
            mi = su.MembershipInference(
                adata, recipe, seed=0, cache_dir=f"{args.cache_dir}/shadows", accelerator="cpu"
            )
            mi.fit(progress_bar=False)
            print(f"{combo}: shadows ready", flush=True)
            feats = train_models(mi, adata, recipe, combo, args)
            if not args.train_only:
                run_audits(mi, feats, adata, combo, args)


if __name__ == "__main__":
    main()
