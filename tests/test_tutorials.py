"""The tutorials: each runs end to end on small settings, and is stored with its outputs.

Every ``tutorials/*.ipynb`` found at collection time is executed (a temporary copy, never the
stored notebook) with ``SCVI_UNLEARN_TUTORIAL_QUICK=1`` and ``SCVI_UNLEARN_DATA_DIR`` pointing
at the shared real data, within a per-notebook time limit. New notebooks are picked up
automatically.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from nbclient.exceptions import CellExecutionError, CellTimeoutError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
#: Wall-clock limit for one notebook on quick settings (they take about a minute on one core).
NOTEBOOK_TIMEOUT_S = 900

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

params = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.slow
@params
def test_tutorial_executes_quick(path: Path, tmp_path: Path, monkeypatch):
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):  # CI has ../shared: a missing folder is a failure
            pytest.fail(f"the tutorials read real data from {SHARED_DATA}, which does not exist")
        pytest.skip(f"the tutorials read real data from {SHARED_DATA}, which does not exist")
    workdir = tmp_path / "tutorials"
    workdir.mkdir()
    copy = workdir / path.name
    shutil.copy2(path, copy)
    stored = path.read_bytes()
    # The kernel inherits this environment.
    monkeypatch.setenv("SCVI_UNLEARN_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("SCVI_UNLEARN_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("SCVI_UNLEARN_CACHE", str(tmp_path / "shadow_cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # models a notebook saves to a temp folder
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    for var in ("SCVI_UNLEARN_TUTORIAL_EPOCHS", "SCVI_UNLEARN_TUTORIAL_SHADOWS"):
        monkeypatch.delenv(var, raising=False)

    nb = nbformat.read(copy, as_version=4)
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
        # One deadline for the whole notebook: each cell gets the time that is left.
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
    )
    start = time.monotonic()
    failure = None
    try:
        client.execute()
    except CellTimeoutError as err:
        failure = f"did not finish within {NOTEBOOK_TIMEOUT_S} s on quick settings:\n{err}"
    except CellExecutionError as err:
        failure = f"a cell raised an error:\n{err}"
    if failure is not None:
        pytest.fail(f"{path.name}: {_ANSI.sub('', failure)}", pytrace=False)
    elapsed = time.monotonic() - start
    assert elapsed < NOTEBOOK_TIMEOUT_S
    errors = [
        out for c in _code_cells(nb) for out in c.get("outputs", []) if out.output_type == "error"
    ]
    assert not errors, f"{path.name}: error outputs {[e.ename for e in errors]}"
    assert path.read_bytes() == stored, "the stored notebook must not be overwritten"


@params
def test_tutorial_is_stored_with_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert cells, f"{path.name} has no code cells"
    counts = [c.get("execution_count") for c in cells]
    missing = [i for i, n in enumerate(counts) if n is None]
    assert not missing, f"{path.name}: code cells {missing} were not executed in the stored copy"
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: the stored outputs do not come from one top-to-bottom run "
        f"(execution counts {counts})"
    )
    outputs = [out for c in cells for out in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name}: stored errors"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} has no embedded figure (image/png output)"
