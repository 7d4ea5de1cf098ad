"""Reading the files a lab hands over, with an error that names the file when one is broken."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anndata

if TYPE_CHECKING:
    import os

    from anndata import AnnData


def read_h5ad_checked(path: str | os.PathLike, **kwargs) -> AnnData:
    """``anndata.read_h5ad``, or a ``ValueError`` naming a truncated or corrupt file.

    ``FileNotFoundError`` and ``PermissionError`` pass through unchanged: they say what is
    wrong already.
    """
    try:
        return anndata.read_h5ad(path, **kwargs)
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{path} is not a readable .h5ad file: it is truncated, corrupt or not AnnData "
            f"({type(exc).__name__}: {str(exc)[:120]})."
        ) from exc


def read_json_checked(path: str | os.PathLike) -> Any:
    """``json.load`` of ``path``, or a ``ValueError`` naming the file and the position."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); restore it from a copy or delete it."
        ) from exc
