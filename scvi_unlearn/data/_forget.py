"""Forget-set builders: which training cells an unlearning request removes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scvi_unlearn._utils import parse_key_value
from scvi_unlearn._validation import IndexLike, as_cell_indices

if TYPE_CHECKING:
    from anndata import AnnData

_MAX_LISTED = 20
_DONOR_KEY_GUESSES = ("donor", "donor_id", "sample_id", "sample", "patient", "individual", "batch")


def _available(values: pd.Series) -> str:
    """Comma-separated list of the distinct values of a column (with counts), truncated."""
    counts = values.astype(str).value_counts(dropna=True).sort_index()
    shown = [f"{v!r} ({n})" for v, n in counts.iloc[:_MAX_LISTED].items()]
    more = f", ... ({len(counts) - _MAX_LISTED} more)" if len(counts) > _MAX_LISTED else ""
    return ", ".join(shown) + more


def _check_key(adata: AnnData, key: str, what: str = "key") -> None:
    if key not in adata.obs.columns:
        cols = list(map(str, adata.obs.columns))
        raise KeyError(
            f"`{what}` {key!r} is not a column of `adata.obs`; available columns: "
            f"{cols if cols else 'none'}."
        )


def _within(adata: AnnData, within: IndexLike | None) -> np.ndarray | None:
    if within is None:
        return None
    return as_cell_indices(adata, within, name="within", allow_empty=False)


def _match(column: pd.Series, value: Any) -> np.ndarray:
    """Boolean mask of ``column == value``; falls back to comparing as strings.

    The fallback lets a value parsed from a command line ("1016") select an integer column.
    """
    mask = np.asarray(column == value, dtype=bool)
    if not mask.any():
        mask = np.asarray(column.astype(str) == str(value), dtype=bool)
    return mask


def structured_forget_set(
    adata: AnnData,
    key: str,
    value: Any,
    within: IndexLike | None = None,
) -> np.ndarray:
    """Cells whose ``adata.obs[key]`` equals ``value`` (a cell type, cluster, donor...).

    Parameters
    ----------
    adata
        The AnnData the cells belong to.
    key
        Column of ``adata.obs``.
    value
        The value to select. If no cell matches exactly, values are compared as strings
        (so ``"1016"`` selects the integer donor id 1016).
    within
        Optional cells (positions, mask or obs names) to restrict the selection to, e.g. the
        training cells of a :class:`~scvi_unlearn.data.MembershipSplit`.

    Returns
    -------
    Sorted ``np.int64`` positions of the selected cells.

    Raises
    ------
    KeyError
        If ``key`` is not an obs column.
    ValueError
        If no cell has the value (the message lists the available values) or none of the
        matching cells is in ``within``.

    Examples
    --------
    >>> import anndata, numpy as np, pandas as pd
    >>> a = anndata.AnnData(np.ones((5, 2), dtype=np.float32))
    >>> a.obs["cell_type"] = pd.Categorical(["T", "B", "T", "Mk", "T"])
    >>> structured_forget_set(a, "cell_type", "T").tolist()
    [0, 2, 4]
    >>> structured_forget_set(a, "cell_type", "T", within=[1, 2, 3, 4]).tolist()
    [2, 4]
    """
    _check_key(adata, key)
    column = adata.obs[key]
    mask = _match(column, value)
    if not mask.any():
        raise ValueError(
            f"No cell has obs[{key!r}] == {value!r}. Available values of {key!r} (cells): "
            f"{_available(column)}."
        )
    idx = np.flatnonzero(mask).astype(np.int64)
    pool = _within(adata, within)
    if pool is not None:
        idx = np.intersect1d(idx, pool).astype(np.int64)
        if idx.size == 0:
            raise ValueError(
                f"None of the {int(mask.sum())} cells with obs[{key!r}] == {value!r} is among "
                f"the {pool.size} cells of `within`; the forget set would be empty."
            )
    return idx


def scattered_forget_set(
    adata: AnnData,
    n: int,
    seed: int = 0,
    within: IndexLike | None = None,
    exclude: IndexLike | None = None,
) -> np.ndarray:
    """``n`` cells drawn uniformly at random without replacement (a scattered forget set).

    Parameters
    ----------
    adata
        The AnnData the cells belong to.
    n
        Number of cells to draw (positive).
    seed
        Seed of the :class:`numpy.random.Generator`; the same seed gives the same cells.
    within
        Optional pool of cells to draw from (default: all cells).
    exclude
        Optional cells never to draw.

    Returns
    -------
    Sorted ``np.int64`` positions of ``n`` distinct cells.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> a = anndata.AnnData(np.ones((10, 2), dtype=np.float32))
    >>> idx = scattered_forget_set(a, 3, seed=0, exclude=[0, 1, 2])
    >>> len(idx), bool(np.all(idx >= 3))
    (3, True)
    >>> bool(np.array_equal(idx, scattered_forget_set(a, 3, seed=0, exclude=[0, 1, 2])))
    True
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}.")
    n = int(n)
    pool = _within(adata, within)
    if pool is None:
        pool = np.arange(adata.n_obs, dtype=np.int64)
    n_pool = pool.size
    if exclude is not None:
        excluded = as_cell_indices(adata, exclude, name="exclude", allow_empty=True)
        pool = np.setdiff1d(pool, excluded)
    if n > pool.size:
        raise ValueError(
            f"Cannot draw {n} cells: only {pool.size} are available ({n_pool} in the pool"
            + (f", {n_pool - pool.size} excluded" if exclude is not None else "")
            + ")."
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=n, replace=False)).astype(np.int64)


def donor_forget_set(
    adata: AnnData,
    donor: Any,
    donor_key: str = "donor",
    within: IndexLike | None = None,
) -> np.ndarray:
    """All cells of one donor (a consent-withdrawal request).

    Parameters
    ----------
    adata
        The AnnData the cells belong to.
    donor
        The donor's identifier in ``adata.obs[donor_key]``.
    donor_key
        Column of ``adata.obs`` holding donor identifiers (e.g. ``"sample_id"`` for Kang 2018).
    within
        Optional cells to restrict the selection to, e.g. the training cells.

    Returns
    -------
    Sorted ``np.int64`` positions of the donor's cells.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> a = anndata.AnnData(np.ones((4, 2), dtype=np.float32))
    >>> a.obs["donor"] = ["donor_0", "donor_1", "donor_0", "donor_1"]
    >>> donor_forget_set(a, "donor_1").tolist()
    [1, 3]
    """
    if donor_key not in adata.obs.columns:
        guesses = [k for k in _DONOR_KEY_GUESSES if k in adata.obs.columns]
        hint = f" Did you mean donor_key={guesses[0]!r}?" if guesses else ""
        raise KeyError(
            f"`donor_key` {donor_key!r} is not a column of `adata.obs` (columns: "
            f"{list(map(str, adata.obs.columns))}).{hint}"
        )
    return structured_forget_set(adata, donor_key, donor, within=within)


def read_cell_list(adata: AnnData, path: str | Path, name: str | None = None) -> np.ndarray:
    r"""Cells listed in a text file, one per line: obs names or integer positions.

    Blank lines and lines starting with ``#`` are ignored. When every entry is an obs name of
    ``adata`` the entries are names (even if they look like numbers, as 10x barcodes never
    do but some exported indices do); otherwise, if every entry is a non-negative integer, they
    are positions.

    Parameters
    ----------
    adata
        The AnnData the cells belong to.
    path
        The text file.
    name
        What the cells are called in error messages (default: the file name).

    Returns
    -------
    Sorted, unique ``np.int64`` positions.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it lists no cells, or duplicates.
    KeyError
        If entries are neither obs names nor positions.

    Examples
    --------
    >>> import anndata, numpy as np, tempfile, os
    >>> a = anndata.AnnData(np.ones((3, 2), dtype=np.float32))
    >>> a.obs_names = ["AAC", "AAG", "ACT"]
    >>> f = os.path.join(tempfile.mkdtemp(), "cells.txt")
    >>> _ = open(f, "w").write("# forget these\nACT\n\nAAC\n")
    >>> read_cell_list(a, f).tolist()
    [0, 2]
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Cell-list file not found: {str(path)!r}.")
    label = name or f"cells in {path.name}"
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    entries = [ln for ln in lines if ln and not ln.startswith("#")]
    if not entries:
        raise ValueError(f"The cell-list file {str(path)!r} lists no cells.")
    names = pd.Index(entries)
    if names.isin(adata.obs_names).all():
        return as_cell_indices(adata, np.asarray(entries), name=label)
    if all(re.fullmatch(r"\d+", e) for e in entries):
        return as_cell_indices(adata, np.asarray(entries, dtype=np.int64), name=label)
    missing = names[~names.isin(adata.obs_names)]
    raise KeyError(
        f"The cell-list file {str(path)!r} must hold obs names or integer positions, one per "
        f"line; {len(missing)} of its {len(names)} entries are neither, e.g. "
        f"{missing[:5].tolist()}."
    )


def parse_forget_spec(
    adata: AnnData,
    spec: str,
    within: IndexLike | None = None,
    donor_key: str = "donor",
) -> np.ndarray:
    """Build a forget set from a command-line string.

    Accepted forms:

    - ``"key=value"``, e.g. ``"cell_type=Megakaryocytes"`` or ``"sample_id=1016"``: the cells
      with that obs value (:func:`structured_forget_set`);
    - ``"random:N"`` or ``"random:N:seed=S"``: ``N`` random cells
      (:func:`scattered_forget_set`);
    - ``"donor:ID"``: the cells of one donor in ``obs[donor_key]`` (:func:`donor_forget_set`);
    - a path to a text file of obs names or integer positions, one per line (blank lines and
      lines starting with ``#`` are ignored).

    Parameters
    ----------
    adata
        The AnnData the cells belong to.
    spec
        The specification string.
    within
        Optional cells to restrict the selection to (e.g. the training cells). For a file,
        every listed cell must be in ``within``.
    donor_key
        Obs column of donor identifiers for the ``"donor:ID"`` form.

    Returns
    -------
    Sorted ``np.int64`` positions.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> a = anndata.AnnData(np.ones((6, 2), dtype=np.float32))
    >>> a.obs["cell_type"] = ["T", "B", "T", "Mk", "T", "B"]
    >>> a.obs["donor"] = ["d0", "d1", "d0", "d1", "d0", "d1"]
    >>> parse_forget_spec(a, "cell_type=Mk").tolist()
    [3]
    >>> parse_forget_spec(a, "donor:d1").tolist()
    [1, 3, 5]
    >>> len(parse_forget_spec(a, "random:2:seed=1"))
    2
    """
    if not isinstance(spec, str | Path):
        raise TypeError(f"`spec` must be a string, got {type(spec).__name__}.")
    text = str(spec).strip()
    forms = (
        "'key=value' (e.g. 'cell_type=Megakaryocytes'), 'random:N', 'random:N:seed=S', "
        "'donor:ID', or a path to a text file of obs names / integer positions"
    )
    if not text:
        raise ValueError(f"Empty forget-set spec; use one of {forms}.")

    if text.lower().startswith("random:"):
        match = re.fullmatch(r"random:\s*(\d+)\s*(?::\s*seed\s*=\s*(-?\d+)\s*)?", text, re.I)
        if match is None:
            raise ValueError(
                f"Cannot parse {text!r}: use 'random:N' or 'random:N:seed=S' with integers, "
                "e.g. 'random:35:seed=1'."
            )
        seed = int(match.group(2)) if match.group(2) is not None else 0
        return scattered_forget_set(adata, int(match.group(1)), seed=seed, within=within)

    if text.lower().startswith("donor:"):
        donor = text[len("donor:") :].strip()
        if not donor:
            raise ValueError(f"Cannot parse {text!r}: give a donor id, e.g. 'donor:donor_3'.")
        return donor_forget_set(adata, donor, donor_key=donor_key, within=within)

    path = Path(text).expanduser()
    if path.is_file():
        idx = read_cell_list(adata, path)
        if within is not None:
            pool = _within(adata, within)
            outside = np.setdiff1d(idx, pool)
            if outside.size:
                raise ValueError(
                    f"{outside.size} of the {idx.size} cells listed in {str(path)!r} are not "
                    f"in `within` (e.g. positions {outside[:5].tolist()})."
                )
        return idx

    if "=" in text:
        key = text.split("=", 1)[0].strip()
        if key in adata.obs.columns:
            key, value = parse_key_value(text, "'key=value'")
            return structured_forget_set(adata, key, value, within=within)
        if "/" not in key and "\\" not in key:
            _check_key(adata, key)

    if any(sep in text for sep in ("/", "\\")) or path.suffix:
        raise FileNotFoundError(
            f"Forget-set file {text!r} does not exist (or spec not understood; use {forms})."
        )
    raise ValueError(f"Cannot parse forget-set spec {text!r}; use {forms}.")
