"""Plumbing shared by the benchmark scripts: data, recipes, timing, and writing results.

Modules whose name starts with an underscore (this one, ``_protocol.py``) are the benchmarks'
shared library; every other ``*.py`` here is an entry point, and no entry point imports another.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd

#: The repository root (``benchmarks/..``).
ROOT = Path(__file__).resolve().parents[1]
#: Environment variable naming the folder of the real data files (the loaders' cache folder).
DATA_ENV = "SCVI_UNLEARN_DATA_DIR"
#: File names of the real data sets in that folder.
KANG_FILE = "kang2018_pbmc12k.h5ad"
PBMC3K_FILE = "pbmc3k.h5ad"


def data_dir() -> Path:
    """The folder of the real data: ``$SCVI_UNLEARN_DATA_DIR``, else ``../shared/data``.

    The default is relative to the repository root (not to the working directory), so the
    scripts find it from anywhere in the checkout.
    """
    folder = os.environ.get(DATA_ENV)
    return Path(folder) if folder else ROOT.parent / "shared" / "data"


#: The folder of the real data (:func:`data_dir` at import time).
DATA = data_dir()


def data_file(name: str) -> Path:
    """A real data file, ``KANG_FILE`` or ``PBMC3K_FILE``, in :data:`DATA`."""
    return DATA / name


def require_data() -> None:
    """Stop with a clear message when the real data folder is missing."""
    assert DATA.exists(), f"real data expected in {DATA} (set ${DATA_ENV} to its folder)"


#: The memorising scVI of the benchmarks (the larger architecture: it measurably memorises
#: its training cells, so an audit has a leak to find and unlearning something to remove).
MEMORISING = {"n_hidden": 512, "n_layers": 2, "n_latent": 30}
#: The same, by the name the unlearning benchmarks give it.
TARGET = MEMORISING
#: scVI's default architecture, spelled out.
SCVI_DEFAULT = {"n_hidden": 128, "n_latent": 10, "n_layers": 1}
#: Per data set: target epochs at which the memorising scVI measurably memorises (its
#: baseline leak is in every table), shadow count, and pbmc3k's HVGs. Shadows are cached per
#: data set.
DATASET_SETTINGS = {
    "pbmc3k": {"epochs": 60, "n_shadows": 4, "n_hvg": 1000},
    "kang": {"epochs": 100, "n_shadows": 4, "n_hvg": None},
}
#: Training keywords that keep a benchmark's fits on the CPU and quiet.
QUIET = {"accelerator": "cpu", "enable_progress_bar": False}


def load(name: str, n_hvg: int | None):
    """Kang 2018 (all 1,287 genes), or pbmc3k with ``n_hvg`` ``seurat_v3`` HVGs on counts."""
    import scvi_unlearn as su

    if name == "kang":
        return su.data.kang2018(path=data_file(KANG_FILE))
    import scanpy as sc

    adata = su.data.pbmc3k(path=data_file(PBMC3K_FILE))
    hvg = sc.pp.highly_variable_genes(adata, n_top_genes=n_hvg, flavor="seurat_v3", inplace=False)
    return adata[:, hvg["highly_variable"].to_numpy()].copy()


def timed(fn: Callable):
    """``fn()``, and its wall time in seconds: ``(result, seconds)``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def repeat_timed(fn: Callable, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()  # warm-up
    return [timed(fn)[1] for _ in range(repeats)]


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the checkout, with ``-dirty`` when the tree is."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=False, cwd=ROOT
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def utc_date() -> str:
    """Today's date in UTC, ``YYYY-MM-DD``."""
    return f"{datetime.now(UTC):%Y-%m-%d}"


def write_page(out: Path, lines: list[str]) -> None:
    """``out/results.md``: ``lines``, then "What this says" from ``out/conclusion.md``.

    The conclusion is written after reading the tables, so it lives in its own file and a
    ``--report-only`` rebuild keeps it.
    """
    conclusion = out / "conclusion.md"
    text = conclusion.read_text().strip() if conclusion.exists() else "(see the tables above)"
    page = [*lines, "## What this says", "", text]
    (out / "results.md").write_text("\n".join(page) + "\n")
    print("\n".join(page))


def markdown_table(frame: pd.DataFrame, digits: int = 3, index: bool = False) -> str:
    """A GitHub markdown table (no extra dependency)."""
    frame = frame.reset_index() if index else frame

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_results(out: Path, name: str, title: str, command: str, table: pd.DataFrame,
                  notes: list[str] | None = None, commit: str | None = None) -> None:  # fmt: skip
    """``<out>/<name>.md`` (title, the command line, the table, notes) and ``<name>.json``.

    The page is printed as well. The JSON holds the title, the command line, the commit
    (:func:`git_commit` unless ``commit`` names the run's) and UTC date it was written at, the
    table's records (``"table"``) and the notes; ``benchmarks/report.py`` reads it.
    """
    text = [f"# {title}", "", command, "", markdown_table(table, digits=3), *(notes or [])]
    (out / f"{name}.md").write_text("\n".join(text) + "\n")
    record = {
        "title": title,
        "command": command,
        "commit": commit or git_commit(),
        "date": utc_date(),
        "table": json.loads(table.to_json(orient="records")),
        "notes": list(notes or []),
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n".join(text))
