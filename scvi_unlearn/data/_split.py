"""Train / held-out splits for membership audits with same-population non-members."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scvi_unlearn._validation import IndexLike, as_cell_indices
from scvi_unlearn.data._forget import structured_forget_set

if TYPE_CHECKING:
    from anndata import AnnData

_ARRAYS = ("train", "forget", "nonmember", "heldout")


def _round(x: float) -> int:
    """Round half up (numpy rounds half to even, which surprises for 0.5 * odd)."""
    return math.floor(x + 0.5)


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise TypeError(f"`{name}` must be a number in (0, 1), got {value!r}.")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"`{name}` must be strictly between 0 and 1, got {value!r}.")
    return float(value)


def _as_index_array(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values if values is not None else [], dtype=np.int64).ravel()
    if arr.size and (arr.min() < 0):
        raise ValueError(f"`{name}` holds negative positions.")
    if arr.size > 1 and not np.all(np.diff(arr) > 0):
        arr = np.unique(arr)
    arr = arr.copy()
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class MembershipSplit:
    """Which cells a model is trained on, and which serve as members / non-members in an audit.

    Attributes
    ----------
    train
        All cells to train on (sorted ``np.int64`` positions).
    forget
        The population's cells in ``train``: the members an unlearning request removes.
    nonmember
        The population's held-out cells (never trained on): the same-population non-members
        the forget set is compared with.
    heldout
        All cells not in ``train`` (``nonmember`` plus background held-out cells for utility).
    meta
        JSON-friendly description of how the split was made (population, fractions, seed).

    Examples
    --------
    >>> s = MembershipSplit(train=[0, 1, 2, 4], forget=[1, 2], nonmember=[3], heldout=[3, 5])
    >>> s
    MembershipSplit(n_obs=6, train=4 (forget=2, retain=2), heldout=2 (nonmember=1, other=1))
    >>> s.retain.tolist(), s.n_obs
    ([0, 4], 6)
    >>> MembershipSplit.from_dict(s.to_dict()) == s
    True
    """

    train: np.ndarray
    forget: np.ndarray
    nonmember: np.ndarray
    heldout: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _ARRAYS:
            object.__setattr__(self, name, _as_index_array(getattr(self, name), name))
        object.__setattr__(self, "meta", dict(self.meta or {}))
        overlap = np.intersect1d(self.train, self.heldout)
        if overlap.size:
            raise ValueError(
                f"`train` and `heldout` overlap in {overlap.size} cells (e.g. "
                f"{overlap[:5].tolist()}); a cell is either trained on or held out."
            )
        if np.setdiff1d(self.forget, self.train).size:
            raise ValueError("Every `forget` cell must be in `train`.")
        if np.setdiff1d(self.nonmember, self.heldout).size:
            raise ValueError("Every `nonmember` cell must be in `heldout`.")

    @property
    def retain(self) -> np.ndarray:
        """Training cells that are not in the forget set (what exact retraining uses)."""
        return np.setdiff1d(self.train, self.forget).astype(np.int64)

    @property
    def population(self) -> np.ndarray:
        """All population cells (``forget`` and ``nonmember``)."""
        return np.union1d(self.forget, self.nonmember).astype(np.int64)

    @property
    def n_obs(self) -> int:
        """Number of cells the split covers (``train`` plus ``heldout``)."""
        return int(self.train.size + self.heldout.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MembershipSplit):
            return NotImplemented
        return all(np.array_equal(getattr(self, k), getattr(other, k)) for k in _ARRAYS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"MembershipSplit(n_obs={self.n_obs}, train={self.train.size} "
            f"(forget={self.forget.size}, retain={self.train.size - self.forget.size}), "
            f"heldout={self.heldout.size} (nonmember={self.nonmember.size}, "
            f"other={self.heldout.size - self.nonmember.size}))"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: the four index lists (plain ints) and ``meta``."""
        out: dict[str, Any] = {k: getattr(self, k).tolist() for k in _ARRAYS}
        out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MembershipSplit:
        """Inverse of :meth:`to_dict`."""
        missing = [k for k in _ARRAYS if k not in d]
        if missing:
            raise KeyError(
                f"A MembershipSplit dict needs the keys {list(_ARRAYS)}; missing {missing}."
            )
        return cls(**{k: d[k] for k in _ARRAYS}, meta=d.get("meta") or {})

    def save(self, path: str | Path) -> Path:
        """Write the split as JSON to ``path`` (parent folders are created); return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> MembershipSplit:
        """Read a split written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def check(self, adata: AnnData) -> None:
        """Raise if the split does not cover exactly the cells of ``adata``."""
        if self.n_obs != adata.n_obs:
            raise ValueError(
                f"The split covers {self.n_obs} cells but the AnnData has {adata.n_obs}; it was "
                "made for different data."
            )


def _population_indices(adata: AnnData, population: Any) -> tuple[np.ndarray, str]:
    if (
        isinstance(population, tuple)
        and len(population) == 2
        and isinstance(population[0], str)
        and not (population[0] not in adata.obs.columns and population[0] in adata.obs_names)
    ):
        key, value = population
        return structured_forget_set(adata, key, value), f"{key}={value}"
    if isinstance(population, str):
        if "=" not in population:
            raise ValueError(
                f"A population string must be 'key=value' (e.g. 'cell_type=Megakaryocytes'), "
                f"got {population!r}."
            )
        key, value = (part.strip() for part in population.split("=", 1))
        return structured_forget_set(adata, key, value), f"{key}={value}"
    idx = as_cell_indices(adata, population, name="population", allow_empty=False)
    return idx, f"{idx.size} given cells"


def membership_split(
    adata: AnnData,
    population: tuple[str, Any] | str | IndexLike,
    holdout_fraction: float = 0.5,
    background_holdout: float = 0.15,
    seed: int = 0,
) -> MembershipSplit:
    """Split cells into training and held-out sets with same-population non-members.

    A fraction ``holdout_fraction`` of the population (e.g. one cell type) is held out as
    non-members; the rest is trained on and forms the forget set. A fraction
    ``background_holdout`` of all other cells is also held out, for held-out utility.
    Both draws are reproducible from ``seed``.

    Parameters
    ----------
    adata
        The AnnData to split.
    population
        A ``(key, value)`` tuple or ``"key=value"`` string selecting cells by an obs column,
        or cell positions / boolean mask / obs names.
    holdout_fraction
        Fraction of the population held out as non-members, in (0, 1). At least 2 cells must
        end up on each side.
    background_holdout
        Fraction of the non-population cells held out, in (0, 1).
    seed
        Seed of the :class:`numpy.random.Generator`.

    Returns
    -------
    A :class:`MembershipSplit`.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> a = anndata.AnnData(np.ones((100, 3), dtype=np.float32))
    >>> a.obs["cell_type"] = ["Mk"] * 10 + ["T"] * 90
    >>> s = membership_split(a, ("cell_type", "Mk"), seed=0)
    >>> s
    MembershipSplit(n_obs=100, train=81 (forget=5, retain=76), heldout=19 (nonmember=5, other=14))
    >>> bool(np.all(s.forget < 10)), s == membership_split(a, "cell_type=Mk", seed=0)
    (True, True)
    """
    holdout_fraction = _check_fraction("holdout_fraction", holdout_fraction)
    background_holdout = _check_fraction("background_holdout", background_holdout)
    pop, description = _population_indices(adata, population)
    n_pop = pop.size
    n_non = _round(holdout_fraction * n_pop)
    n_forget = n_pop - n_non
    if n_non < 2 or n_forget < 2:
        if n_pop < 4:
            need = "at least 4 population cells are needed"
        else:
            need = f"use a holdout_fraction between {1.5 / n_pop:.3g} and {1 - 1.5 / n_pop:.3g}"
        raise ValueError(
            f"The population ({description}) has {n_pop} cells; holdout_fraction="
            f"{holdout_fraction} would hold out {n_non} and train on {n_forget}, but each side "
            f"needs at least 2 cells: {need}."
        )
    rng = np.random.default_rng(seed)
    nonmember = np.sort(rng.permutation(pop)[:n_non])
    others = np.setdiff1d(np.arange(adata.n_obs, dtype=np.int64), pop)
    n_bg = _round(background_holdout * others.size)
    background = np.sort(rng.permutation(others)[:n_bg])
    heldout = np.union1d(nonmember, background)
    train = np.setdiff1d(np.arange(adata.n_obs, dtype=np.int64), heldout)
    forget = np.setdiff1d(pop, nonmember)
    meta = {
        "population": description,
        "holdout_fraction": holdout_fraction,
        "background_holdout": background_holdout,
        "seed": int(seed),
        "n_obs": int(adata.n_obs),
    }
    return MembershipSplit(
        train=train, forget=forget, nonmember=nonmember, heldout=heldout, meta=meta
    )


def validation_split(
    indices: IndexLike,
    fraction: float = 0.3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split cell positions into a fit part and a validation part (e.g. for early stopping).

    Parameters
    ----------
    indices
        Integer cell positions (e.g. ``split.forget`` or ``split.nonmember``).
    fraction
        Fraction in (0, 1) that goes to validation; both parts get at least one cell.
    seed
        Seed of the :class:`numpy.random.Generator`.

    Returns
    -------
    ``(fit_idx, val_idx)``, disjoint sorted ``np.int64`` arrays whose union is ``indices``.

    Examples
    --------
    >>> fit, val = validation_split(list(range(10)), fraction=0.3, seed=0)
    >>> len(fit), len(val), sorted(fit.tolist() + val.tolist()) == list(range(10))
    (7, 3, True)
    """
    fraction = _check_fraction("fraction", fraction)
    arr = np.asarray(indices)
    if arr.ndim != 1:
        raise ValueError(f"`indices` must be one-dimensional, got shape {arr.shape}.")
    if arr.dtype == bool:
        raise TypeError("`indices` must be integer positions, not a boolean mask.")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"`indices` must be integer positions, got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    uniq = np.unique(arr)
    if uniq.size != arr.size:
        raise ValueError("`indices` contains duplicated positions.")
    if uniq.size < 2:
        raise ValueError(
            f"Cannot split {uniq.size} cell(s) into a fit and a validation part; need >= 2."
        )
    n_val = min(max(_round(fraction * uniq.size), 1), uniq.size - 1)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(uniq)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
