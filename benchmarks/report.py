"""Write ``docs/results.md``, the results page, from the benchmarks of record.

Every section is one benchmark of record (``RECORDS``; ``benchmarks/README.md`` lists them
with the superseded and shard folders this page leaves out). Tables are copied from the
record folder's ``results.json``, or, where the JSON holds only the raw rows and the script
built its summary table when it wrote ``results.md``, from that ``results.md``. Above each
table: the commit and UTC date of the run when the JSON records them (``write_results`` does),
otherwise the commit that last changed the record's ``results.json`` and that commit's date
("committed"). A record's ``notes.md`` (the reading of its results) follows its tables;
``results/overview.md`` opens the page.

The page depends only on committed files and git history, so rerunning gives the same bytes::

    python benchmarks/report.py            # rewrites docs/results.md
    python benchmarks/report.py --check    # exit 1 if docs/results.md is out of date
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"

Column = str | tuple[str, str | Callable[[dict], object]]


@dataclass(frozen=True)
class Json:
    """A table of records in a JSON file: ``key`` (``None``: the file is the list of records).

    ``columns``: keys, or ``(header, key or function of the record)``; all keys if empty.
    ``group``: keys whose values split the table into captioned sub-tables. ``drop``: keys
    left out when ``columns`` is empty.
    """

    key: str | None = None
    file: str = "results.json"
    columns: tuple[Column, ...] = ()
    group: tuple[str, ...] = ()
    caption: str | Callable[[list[dict]], str] = ""
    digits: int = 3
    drop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Markdown:
    """The body of ``results.md`` (everything below its title), headings moved down a level."""

    file: str = "results.md"
    skip: tuple[str, ...] = ()  # headings whose sections are left out


@dataclass(frozen=True)
class ProtocolMarkdown:
    """An ``unlearning_protocol.py`` page, per request: its band line and summary rows.

    The rows are those of the page's summary table ("All rows"), with ``columns`` only.
    """

    columns: tuple[str, ...] = (
        "method", "seeds", "LiRA AUC", "band", "forgotten seeds", "SUCCESS",
        "utility vs retrain", "x full retrain", "first request x retrain",
        "cells (forget/non)", "accepted", "relearn AUC",
    )  # fmt: skip


@dataclass(frozen=True)
class Record:
    """One benchmark of record: its folder, what it measures, how to reproduce it."""

    folder: str
    title: str
    measures: str
    command: str
    tables: tuple = ()
    notes: str = "notes.md"
    files: tuple[str, ...] = ("results.json",)


def _band(rows: list[dict]) -> str:
    low, high = rows[0]["retrain_band"]
    return f"Retrain band (LiRA AUC) {low:.3f}-{high:.3f}."


def _of(count: str) -> Callable[[dict], str]:
    return lambda r: f"{int(r[count])}/{int(r['seeds'])}"


RECORDS: dict[str, tuple[Record, ...]] = {
    "Audit": (
        Record(
            "audit_kang_default",
            "Audit of a default scVI on Kang 2018",
            "A default scVI (100 epochs) trained on 47 of Kang's Megakaryocytes, audited with 8 "
            "shadow models against its 48 held-out Megakaryocytes; and the original study's "
            "non-members (other cell types) beside same-population ones.",
            "python benchmarks/audit_kang.py --recipes default "
            "--out benchmarks/results/audit_kang_default",
            (
                Json(
                    "audit",
                    columns=(
                        "attack",
                        "auc",
                        "auc_low",
                        "auc_high",
                        "advantage",
                        ("never-trained reference low", "reference_low"),
                        ("never-trained reference high", "reference_high"),
                        "verdict",
                    ),
                    caption="Same-population non-members (the audit as the package runs it).",
                ),
                Json(
                    "artefact",
                    columns=(
                        "model",
                        "contrast",
                        "attack",
                        "auc",
                        "auc_low",
                        "auc_high",
                        "n_nonmembers",
                        "nonmember_share_same_type",
                    ),
                    caption="The original study's contrast (non-members of other cell types) "
                    "beside ours.",
                ),
            ),
        ),
        Record(
            "audit_calibration",
            "Audit calibration: false leaks and power",
            "False leaks on null audits (both sides never-trained cells) and power on real "
            "members against the number of shadow models; Kang and pbmc3k subsets of 2,000 "
            "cells, default and memorising scVI, 16 shadows, 28 target models (verdicts by "
            "the rules of its run: the sampling band, and RMIA with its self-comparison).",
            "python benchmarks/audit_calibration.py",
            (
                Json("calibration", caption="False leaks (null audits) beside power (k = 16)."),
                Json("per_combination", caption="Per data set and recipe."),
                Json("power_vs_k", caption="Power against the number of shadow models k."),
                Json("timings", digits=1, caption="Seconds per target model (1 thread)."),
            ),
        ),
        Record(
            "audit_verdicts",
            "Verdict calibration against retrain reference models",
            "False leaks on null audits (the audited model is one more retrain; members and "
            "non-members both never trained on) and power on real members, for the paired rule "
            "the audit uses, the earlier sampling band and the OUT-shadow interval; Kang and "
            "pbmc3k subsets of 2,000 cells, default and memorising scVI, 16 retrain seeds and 4 "
            "originals each, 60 + 60 and 200 + 200 cells, 3 or 8 references.",
            "python benchmarks/audit_verdicts.py --datasets kang; "
            "python benchmarks/audit_verdicts.py --datasets pbmc3k",
            (
                Json("pooled", caption="Both data sets and recipes, by audit size and rule."),
                Json("per_combination", caption="Per data set and recipe (60 + 60 cells)."),
                Json(
                    "protocol_rejudged",
                    caption="The unlearning protocol's saved LiRA rows judged by the paired "
                    "rule (their record used the sampling band).",
                ),
            ),
            notes="conclusion.md",
        ),
        Record(
            "audit_power",
            "Power per shadow model: LiRA's and RMIA's centre and variance",
            "AUC and TPR at 1% / 0.1% FPR against 1, 2, 4, 8 and 16 shadows for LiRA (online, "
            "offline) with a mean or median centre and pooled, per-cell or shrunk variances, and "
            "RMIA with a mean or median centre; Kang and pbmc3k subsets of 2,000 cells, default "
            "and memorising scVI, 16 shadows and 4 targets each.",
            "python benchmarks/audit_power.py --datasets kang; "
            "python benchmarks/audit_power.py --datasets pbmc3k",
            (
                Json(
                    "rows",
                    columns=(
                        "combo",
                        "k",
                        "variant",
                        "auc",
                        "tpr_1pct",
                        "tpr_01pct",
                        "n_nonmembers",
                    ),
                    group=("combo",),
                    caption="Pooled over targets and shadow subsets.",
                ),
            ),
            notes="conclusion.md",
        ),
        Record(
            "audit_donors",
            "Donor-level audit (Kang, 8 donors)",
            "`audit_groups` on Kang's 8 donors (150 cells each, default scVI, 100 epochs): "
            "models trained on all or 4 of the donors and one leave-one-out model per donor "
            "(never-seen-donor nulls), audited with the shadows `audit_groups` matches to them; "
            "each shadow audited against the others.",
            "python benchmarks/audit_donors.py --cells-per-donor 150",
            (Markdown(),),
        ),
        Record(
            "throughput",
            "Attack-feature throughput",
            "Cells per second of `attack_features` on all of Kang's cells, and where one pass "
            "spends its time.",
            "python benchmarks/throughput.py",
            (
                Json("throughput", digits=0),
                Json("profile", caption="Seconds and shares of one pass."),
            ),
        ),
    ),
    "Unlearning": (
        Record(
            "unlearning_protocol",
            "The unlearning protocol",
            "Does `unlearn()` unlearn? Each method, 3 seeds, against a band of 8 exact "
            "retrains on reporting cells, hyper-parameters chosen on development sets apart, "
            "and a relearning check; pbmc3k and Kang, memorising and lab-default targets.",
            "python benchmarks/unlearning_protocol.py (the per-request commands are in its "
            "docstring)",
            (ProtocolMarkdown(),),
        ),
        Record(
            "unlearning_protocol_auto",
            "The unlearning protocol: `auto` alone",
            "`auto` with its power check and its relearning gate, on the pbmc3k requests "
            "of the protocol (retrains and pools loaded from the protocol's cache).",
            "python benchmarks/unlearning_protocol.py --datasets pbmc3k --methods auto "
            "--out benchmarks/results/unlearning_protocol_auto",
            (ProtocolMarkdown(),),
        ),
        Record(
            "unlearning_protocol_fisher_hooks",
            "The unlearning protocol: Fisher with the hook Fisher",
            "Fisher scrubbing with the hook-based diagonal Fisher on the pbmc3k requests.",
            "python benchmarks/unlearning_protocol.py --datasets pbmc3k --methods fisher "
            "--out benchmarks/results/unlearning_protocol_fisher_hooks",
            (ProtocolMarkdown(),),
        ),
        Record(
            "unlearning_protocol_contrastive",
            "The unlearning protocol: `contrastive`",
            "The original study's encoder-only contrastive method on the pbmc3k requests.",
            "python benchmarks/unlearning_protocol.py --datasets pbmc3k --methods contrastive "
            "--out benchmarks/results/unlearning_protocol_contrastive",
            (ProtocolMarkdown(),),
        ),
        Record(
            "auto_candidates",
            "Which approximate methods `auto` tries",
            "Each approximate method alone as `auto`'s candidate on the protocol's development "
            "requests (pbmc3k), 3 seeds, the library's own gate.",
            "python benchmarks/auto_candidates.py",
            (Markdown(),),
        ),
        Record(
            "unlearning",
            "The original study's results table, reproduced",
            "Eight methods x 3 seeds against 3 retrain seeds on Kang and pbmc3k (structured, "
            "scattered and donor forget sets), the larger scVI, 4 shadows, reporting cells "
            "apart from selection cells.",
            "python benchmarks/unlearning.py",
            (
                Json(
                    "summary",
                    group=("dataset", "forget"),
                    caption=_band,
                    columns=(
                        "method",
                        "seeds",
                        ("LiRA AUC", "lira_auc"),
                        ("SD", "lira_sd"),
                        ("CI low", "lira_low"),
                        ("CI high", "lira_high"),
                        ("in band", _of("in_band")),
                        ("utility ok", _of("utility_ok")),
                        ("faster", _of("faster")),
                        ("held-out neg. ELBO", "neg_elbo"),
                        ("x retrain", "time_vs_retrain"),
                        "verdict",
                    ),
                ),
            ),
        ),
        Record(
            "retrain_budget",
            "Exact unlearning on a budget",
            "`retrain_fast` at 10, 25 and 50% of the epochs against the full retrain on Kang "
            "(memorising scVI, Dendritic cells forgotten): held-out utility and time.",
            "python benchmarks/retrain_budget.py --seeds 2 --forget structured",
            (Json(),),
        ),
        Record(
            "retrain_adaptive",
            "The default, `retrain_fast`, against a full retrain",
            "The adaptive default against one fixed round of a tenth of the epochs and the "
            "full retrain, on the demo's data and pbmc3k, 3 seeds.",
            "python benchmarks/retrain_adaptive.py --seeds 3 --datasets demo pbmc3k",
            (Json(),),
        ),
        Record(
            "retrain_adaptive_kang",
            "The default, `retrain_fast`, on Kang 2018",
            "The adaptive default against the full retrain on Kang's three protocol requests, "
            "one seed.",
            "python benchmarks/retrain_adaptive.py --datasets kang --seeds 1 --rows retrain "
            '"retrain_fast (default: adaptive)" --out benchmarks/results/retrain_adaptive_kang',
            (Json(),),
        ),
        Record(
            "deletion_ready",
            "Deletion-ready training",
            "Removing a donor from a deletion-ready model (Kang, two permanent donors, six "
            "fitted one by one) against a full retrain without it; and removing some cells of "
            "a donor (`refit_donors`).",
            "python benchmarks/deletion_ready.py --seeds 3 --epochs 100; "
            "python benchmarks/deletion_ready.py --partial 100 --seeds 3 --epochs 100",
            (
                Json(caption="Removing a whole donor."),
                Json(file="results_partial.json", caption="Removing 100 cells of a donor."),
            ),
            files=("results.json", "results_partial.json"),
        ),
    ),
    "Private training": (
        Record(
            "dp_sgd",
            "DP-SGD instead of unlearning",
            "Does a DP-SGD-trained scVI keep the forget cells inside the band of 8 exact "
            "retrains? pbmc3k, memorising architecture with layer norm, epsilon 1/10/50 at "
            "delta = 1 / n_train (the library's default is 0.1 / n_train), "
            "3 seeds each, structured and scattered requests.",
            "python benchmarks/dp_sgd.py --epochs 20 --threads 1",
            (Markdown(),),
        ),
        Record(
            "dp_sgd_kang_donor",
            "Donor-level DP-SGD and certified unlearning on a Kang donor request",
            "Kang's smallest donor (half its cells trained on, half never seen), scVI at its "
            "default sizes with layer norm, 20 epochs: cell-level and donor-level DP-SGD at "
            "epsilon 1/10/50 (2 seeds each) and `method='certified'` on the target, against "
            "the band of 4 exact retrains.",
            "python benchmarks/dp_sgd.py --dataset kang --forget donor --target default "
            "--epochs 20 --rows dp donor_dp certified --retrain-seeds 4 --dp-seeds 2 "
            "--n-shadows 4 --delta-share 0.1 --threads 1 --out "
            "benchmarks/results/dp_sgd_kang_donor",
            (Markdown(),),
        ),
        Record(
            "certified_pbmc3k",
            "Certified unlearning on a pbmc3k request",
            "`method='certified'` at epsilon 1/10/50 on the structured pbmc3k request (FCGR3A+ "
            "Mono), scVI at its default sizes with layer norm, 20 epochs, against the band of "
            "4 exact retrains.",
            "python benchmarks/dp_sgd.py --dataset pbmc3k --forget structured --target default "
            "--epochs 20 --rows certified --retrain-seeds 4 --n-shadows 4 --threads 1 --out "
            "benchmarks/results/certified_pbmc3k",
            (Markdown(),),
        ),
        Record(
            "dp_canaries",
            "One-run DP audit with canaries",
            "Is the accountant's epsilon contradicted by a one-run audit? 500 canaries on "
            "pbmc3k at epsilon 1/10/50 and without privacy.",
            "python benchmarks/dp_canaries.py --seeds 3 --threads 1",
            (Markdown(),),
        ),
        Record(
            "dp_speed",
            "DP-SGD clipping cost",
            "Ghost clipping (hooks) against `torch.func` per-cell gradients and no privacy, "
            "same model and data, 2 epochs, 1 thread.",
            "python benchmarks/dp_speed.py",
            (Json("rows"),),
        ),
    ),
    "Reproducibility": (
        Record(
            "method_fingerprints",
            "Same seeds, same weights",
            "The SHA-256 (first 16 hex digits) of every method's unlearned weights on a fixed "
            "tiny synthetic model; `--check` compares a later checkout with this record.",
            "python benchmarks/method_fingerprints.py",
            (Json("table", file="fingerprints.json"),),
            files=("fingerprints.json",),
        ),
    ),
    "Speed and scale": (
        Record(
            "fisher_speed",
            "Fisher scrubbing against a full retrain",
            "One Fisher unlearning (hook Fisher and `torch.func`) against a full retrain on "
            "pbmc3k and Kang.",
            "python benchmarks/fisher_speed.py",
            (Json(),),
        ),
        Record(
            "parallel_pools",
            "Shadow pools on three executor backends",
            "8 Kang shadows sequentially, on a 2-process pool and on local Ray.",
            "python benchmarks/parallel_pools.py --dataset kang --n-shadows 8 --max-epochs 10",
            (Json("rows", digits=2),),
        ),
        Record(
            "atlas_costs",
            "Unit costs and an atlas-scale audit plan",
            "Measured seconds per epoch and per featurised cell on Kang, extrapolated to a "
            "OneK1K-sized (1.26 M cells) audit.",
            "python benchmarks/atlas_costs.py",
            (
                Json("measured", digits=2, caption="Measured on Kang."),
                Json("plan", digits=2, caption="OneK1K, extrapolated linearly in cells."),
            ),
        ),
        Record(
            "profile",
            "Where Fisher and extra-gradient spend their time",
            "cProfile of one Fisher and one extra-gradient unlearning on pbmc3k.",
            "python benchmarks/profile_methods.py",
            files=("profile.md",),
        ),
        Record(
            "demo_time",
            "Wall time of the quick demo",
            "`scvi-unlearn demo --quick` end to end in a fresh process.",
            "python benchmarks/demo_time.py",
            (
                Json(
                    "runs",
                    digits=1,
                    columns=("seconds", "exit_code", "load_average_before"),
                ),
            ),
        ),
    ),
}


# -- provenance -------------------------------------------------------------------------------
def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=ROOT)
    return done.stdout.strip()


def provenance(path: Path, data: object) -> str:
    """When the numbers of ``path`` were made: recorded by the run, else as committed."""
    if isinstance(data, dict) and data.get("commit") and data.get("date"):
        return f"run at commit `{data['commit']}` on {data['date']}"
    found = _git("log", "-1", "--abbrev=7", "--format=%h %cs", "--", str(path.relative_to(ROOT)))
    if not found:
        return "not yet committed"
    commit, date = found.split()
    return f"committed in `{commit}` on {date} (its JSON records no run commit)"


def _mark(record: Record, file: str, data: object) -> str:
    path = RESULTS / record.folder / file
    return f"*`benchmarks/results/{record.folder}/{file}`: {provenance(path, data)}.*"


# -- tables -------------------------------------------------------------------------------------
def _cell(value: object, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_cell(v, digits) for v in value) + "]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], columns: tuple[Column, ...], digits: int) -> str:
    """A markdown table of ``rows``."""
    spec = [c if isinstance(c, tuple) else (c, c) for c in columns]
    header = "| " + " | ".join(name for name, _ in spec) + " |"
    rule = "|" + "|".join("---" for _ in spec) + "|"
    body = [
        "| "
        + " | ".join(_cell(get(r) if callable(get) else r.get(get), digits) for _, get in spec)
        + " |"
        for r in rows
    ]
    return "\n".join([header, rule, *body])


def json_tables(record: Record, spec: Json) -> list[str]:
    data = json.loads((RESULTS / record.folder / spec.file).read_text())
    rows = data if spec.key is None else data[spec.key]
    if isinstance(data, dict) and spec.key is None:  # write_results: {"table": [...], ...}
        rows = data["table"]
    columns = spec.columns or tuple(k for k in rows[0] if k not in spec.drop)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in spec.group), []).append(r)
    out = []
    for key, part in groups.items():
        if spec.group:
            out += [f"**{' / '.join(map(str, key))}**", ""]
        caption = spec.caption(part) if callable(spec.caption) else spec.caption
        if caption:
            out += [caption, ""]
        out += [_mark(record, spec.file, data), "", table(part, columns, spec.digits), ""]
    return out


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, lines) of a page below its title; the first heading is ``""``."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines()[1:]:
        if line.startswith("## "):
            sections.append((line[3:].strip(), []))
        else:
            sections[-1][1].append(line)
    return sections


def _with_marks(lines: list[str], mark: str) -> list[str]:
    """``lines`` with ``mark`` above each table; headings moved down two levels."""
    out, in_table = [], False
    for line in lines:
        is_row = line.startswith("|")
        if is_row and not in_table:
            out += [mark, ""]
        in_table = is_row
        out.append("##" + line if line.startswith("#") else line)
    return out


def markdown_tables(record: Record, spec: Markdown) -> list[str]:
    text = (RESULTS / record.folder / spec.file).read_text()
    data = json.loads((RESULTS / record.folder / "results.json").read_text())
    mark = _mark(record, "results.json", data)
    out: list[str] = []
    for heading, lines in _sections(text):
        if heading in spec.skip:
            continue
        if heading:
            out += [f"#### {heading}"]
        out += _with_marks(lines, mark)
    return _squeeze(out)


def _parse_table(lines: list[str]) -> list[dict]:
    rows = [line for line in lines if line.startswith("|")]
    split = [[c.strip() for c in row.strip().strip("|").split(" | ")] for row in rows]
    header, body = split[0], split[2:]
    for cells in body:
        if len(cells) != len(header):
            raise ValueError(f"a row of {len(cells)} cells under {len(header)} columns")
    return [dict(zip(header, cells)) for cells in body]


def protocol_tables(record: Record, spec: ProtocolMarkdown) -> list[str]:
    text = (RESULTS / record.folder / "results.md").read_text()
    data = json.loads((RESULTS / record.folder / "results.json").read_text())
    mark = _mark(record, "results.json", data)
    sections = dict(_sections(text))
    rows = _parse_table(sections["All rows"])
    out: list[str] = []
    for heading, lines in _sections(text):
        if not heading or heading == "All rows":
            continue
        part = [r for r in rows if r["data"] == heading.removesuffix(" (partial)")]
        columns = tuple(c for c in spec.columns if c in part[0])
        out += [f"**{heading}**", "", *[line for line in lines if line.strip()], ""]
        out += [mark, "", table(part, columns, 3), ""]
    return out


def _squeeze(lines: list[str]) -> list[str]:
    """No runs of blank lines."""
    out: list[str] = []
    for line in lines:
        if line.strip() or (out and out[-1].strip()):
            out.append(line.rstrip())
    return out


def section(record: Record) -> list[str]:
    folder = RESULTS / record.folder
    out = [f"### {record.title}", "", record.measures, "", f"Reproduce: `{record.command}`.", ""]
    for spec in record.tables:
        if isinstance(spec, Json):
            out += json_tables(record, spec)
        elif isinstance(spec, ProtocolMarkdown):
            out += protocol_tables(record, spec)
        else:
            out += markdown_tables(record, spec)
        out.append("")
    if not record.tables:
        file = record.files[0]
        out += [
            f"No table: the listing is `benchmarks/results/{record.folder}/{file}` "
            f"({provenance(folder / file, None)}).",
            "",
        ]
    notes = folder / record.notes
    if notes.exists():
        out += [notes.read_text().strip(), ""]
    return out


def render() -> str:
    lines = [
        "# Results",
        "",
        "<!-- Generated by `python benchmarks/report.py` from benchmarks/results/: edit the "
        "notes there, not this page. -->",
        "",
        "What the benchmarks of record measured. Each table names the file it is copied "
        "from and when its numbers were made: the commit and date of the run where the run "
        "recorded them, otherwise the commit that added the file to the repository "
        '("committed"). Times are from 2 CPU cores, often shared with other jobs, so they '
        "are upper bounds; ratios to a retrain are measured in the same run. How each run "
        "was set up is in its script's docstring (`benchmarks/README.md` lists them).",
        "",
    ]
    overview = RESULTS / "overview.md"
    if overview.exists():
        lines += [overview.read_text().strip(), ""]
    for group, records in RECORDS.items():
        lines += [f"## {group}", ""]
        for record in records:
            lines += section(record)
    return "\n".join(_squeeze(lines)).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(PAGE))
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args()
    text = render()
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is out of date: run python benchmarks/report.py", file=sys.stderr)
            raise SystemExit(1)
        return
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
