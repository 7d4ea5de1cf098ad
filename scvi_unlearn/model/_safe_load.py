"""Loading scvi-tools model files without executing arbitrary pickled code.

scvi-tools saves ``model.pt`` with ``torch.save`` and loads it with ``weights_only=False``,
which runs whatever a (possibly tampered) pickle asks for. We load with
``weights_only=True`` and allow only the plain data containers scvi-tools writes there
(numpy arrays, pandas frames and indices of its training history, builtins).
"""

from __future__ import annotations

import collections
import importlib
import pickle
import types
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from pandas._libs import arrays as pandas_arrays
from pandas._libs.internals import _unpickle_block
from pandas.core.indexes.base import _new_Index
from pandas.core.internals.managers import BlockManager
from torch import _weights_only_unpickler

if TYPE_CHECKING:
    import os


def _allowed_globals() -> list:
    numpy_core = getattr(np, "_core", None) or np.core
    allowed = [
        numpy_core.multiarray._reconstruct,
        numpy_core.multiarray.scalar,
        np.ndarray,
        np.dtype,
        pd.DataFrame,
        pd.Series,
        pd.Index,
        pd.RangeIndex,
        pd.Categorical,
        pd.CategoricalDtype,
        BlockManager,
        _unpickle_block,
        _new_Index,
        collections.OrderedDict,
        collections.defaultdict,
        bytes,
        slice,
        dict,
        set,
        frozenset,
    ]
    # numpy >= 1.25 pickles dtypes through numpy.dtypes.<Name>DType classes.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def _allowed_by_name() -> dict[str, object]:
    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    for obj in _allowed_globals():
        allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    # numpy pickles its private core module under either name, depending on the version.
    for key in list(allowed):
        if key.startswith("numpy._core."):
            allowed["numpy.core." + key[len("numpy._core.") :]] = allowed[key]
        if key.startswith("builtins."):  # pickle protocol 2 spells it the Python 2 way
            allowed["__builtin__." + key[len("builtins.") :]] = allowed[key]
    allowed.update(_pandas_string_containers())
    # pandas 2 pickles classes under their defining modules, pandas 3 under ``pandas``: a file
    # written with either must load with both. An alias is kept only if it resolves to an
    # object that is allowed anyway, so aliases cannot widen what may be built.
    allowed_ids = {id(obj) for obj in allowed.values()}
    for alias in _PANDAS_ALIASES:
        module, _, name = alias.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if id(obj) in allowed_ids:
            allowed[alias] = obj
    return allowed


_PANDAS_ALIASES = (
    "pandas.DataFrame",
    "pandas.Series",
    "pandas.Index",
    "pandas.RangeIndex",
    "pandas.Categorical",
    "pandas.CategoricalDtype",
    "pandas.StringDtype",
    "pandas.arrays.StringArray",
    "pandas.core.frame.DataFrame",
    "pandas.core.series.Series",
    "pandas.core.indexes.base.Index",
    "pandas.core.indexes.range.RangeIndex",
    "pandas.core.arrays.categorical.Categorical",
    "pandas.core.dtypes.dtypes.CategoricalDtype",
    "pandas.core.arrays.string_.StringDtype",
    "pandas.core.arrays.string_.StringArray",
)


def _pandas_string_containers() -> dict[str, object]:
    """Pandas >= 3 stores string indices (training-history columns) as ``StringArray``.

    They pickle through ``pandas._libs.arrays.__pyx_unpickle_NDArrayBacked(cls, ...)``, which
    only rebuilds an instance of ``cls`` (resolved through this same allow-list) from its
    state: no other callable runs. Names are the ones pickle writes; absent on older pandas.
    """
    candidates = {
        "pandas.StringDtype": getattr(pd, "StringDtype", None),
        "pandas.arrays.StringArray": getattr(getattr(pd, "arrays", None), "StringArray", None),
        "pandas._libs.arrays.__pyx_unpickle_NDArrayBacked": getattr(
            pandas_arrays, "__pyx_unpickle_NDArrayBacked", None
        ),
    }
    return {name: obj for name, obj in candidates.items() if obj is not None}


#: How the restricted unpickler says no (told apart from bytes that are not a pickle at all).
_REFUSAL = "is not an allowed data container"


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals (no arbitrary callables).

    ``torch.load(weights_only=True)`` cannot rebuild the ``collections.defaultdict`` that
    scvi-tools stores in every ``model.pt``; this unpickler applies the same idea (only known
    data constructors may run) with that container allowed.
    """

    _allowed: dict[str, object] | None = None

    def find_class(self, module: str, name: str):
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_by_name()
        key = f"{module}.{name}"
        if key in _RestrictedUnpickler._allowed:
            return _RestrictedUnpickler._allowed[key]
        raise pickle.UnpicklingError(f"global '{key}' {_REFUSAL}; refusing to load it")


_restricted_pickle = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
    __name__="scvi_unlearn_restricted_pickle",
)


def safe_torch_load(
    path: str | os.PathLike, map_location=None, shown_as: str | os.PathLike | None = None
):
    """Load a ``torch.save`` file without executing arbitrary pickled code.

    Tries ``torch.load(weights_only=True)`` with scvi-tools' data containers allowed; files
    written by scvi-tools (which include a ``defaultdict`` the weights-only loader cannot
    rebuild) are read with a restricted unpickler that resolves only allow-listed globals.

    Parameters
    ----------
    path
        The file to read.
    map_location
        Passed to ``torch.load``.
    shown_as
        The path error messages name (the user's file when ``path`` is a private copy).

    Raises
    ------
    RuntimeError
        If the file holds any other pickled object; the message names it.
    """
    shown = path if shown_as is None else shown_as
    try:
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            pass
        return torch.load(
            path, map_location=map_location, weights_only=False, pickle_module=_restricted_pickle
        )
    except pickle.UnpicklingError as exc:
        if _REFUSAL not in str(exc):  # not a forbidden object: bytes that are no pickle
            raise CorruptModelFileError(shown, exc) from exc
        raise RuntimeError(
            f"Refusing to load {shown}: {exc}. Loading it could execute arbitrary code. If you "
            "trust the file, load it with `scvi.model.SCVI.load` and wrap the result with "
            "`scvi_unlearn.model.SCVI.from_scvi(model)`."
        ) from exc
    except (EOFError, RuntimeError, ValueError, OSError) as exc:
        if isinstance(exc, PermissionError):
            raise
        raise CorruptModelFileError(shown, exc) from exc


class CorruptModelFileError(ValueError):
    """A model file that is empty, truncated or not a ``torch.save`` file at all."""

    def __init__(self, path, cause: BaseException):
        reason = "it ends before any data" if isinstance(cause, EOFError) else str(cause)
        super().__init__(
            f"{path} is not a readable model file: it is empty, truncated or corrupt "
            f"({reason[:120]}). Save the model again, or restore the file from a copy."
        )


def check_safe_model_file(
    path: str | os.PathLike, shown_as: str | os.PathLike | None = None
) -> dict:
    """Raise unless ``path`` unpickles with only allow-listed data containers.

    Unpickling resolves the same globals whichever unpickler reads a file, so once this check
    passes, scvi-tools' own ``torch.load`` of the *same* file can only rebuild plain data.
    ``shown_as`` is the path error messages name (the user's file when ``path`` is a copy).

    Raises
    ------
    RuntimeError
        If the file holds any other pickled object; the message names it.
    CorruptModelFileError
        If the file is empty, truncated or not a model file.

    Returns
    -------
    The file's content (``model_state_dict``, ``var_names``, ``attr_dict``).
    """
    return safe_torch_load(path, map_location="cpu", shown_as=shown_as)
