"""Small helpers shared by every layer: JSON-safe values, ``KEY=VALUE`` text, the version."""

from __future__ import annotations

import json
import math
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np


def to_jsonable(obj: Any) -> Any:
    """A JSON-safe copy of ``obj``: numpy to Python, tuples to lists, NaN / inf to ``None``.

    JSON has no NaN that compares equal to itself, and ``json.dump`` would write the
    non-standard token ``NaN``; ``None`` (``null``) is what other tools read.

    Examples
    --------
    >>> to_jsonable({"a": np.float32(0.5), 1: (np.int64(2), float("nan"))})
    {'a': 0.5, '1': [2, None]}
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dump_json(data: Any, path: str | None = None) -> str:
    """``data`` as indented JSON (NaN as null, :func:`to_jsonable`), written to ``path`` too."""
    text = json.dumps(to_jsonable(data), indent=2)
    if path is not None:
        with open(path, "w") as handle:
            handle.write(text)
    return text


def load_json(text_or_path: str) -> Any:
    """Parse a JSON object given as a string, or read it from a file path."""
    text = text_or_path
    if not text_or_path.lstrip().startswith("{"):
        with open(text_or_path) as handle:
            text = handle.read()
    return json.loads(text)


def parse_key_value(text: str, what: str = "KEY=VALUE") -> tuple[str, str]:
    """Split ``"key=value"`` at the first ``=`` (both sides stripped, neither empty).

    Parameters
    ----------
    text
        The text to split.
    what
        How the expected form is named in the error message (e.g. ``"--param NAME=VALUE"``).

    Raises
    ------
    ValueError
        If there is no ``=`` or either side is empty.

    Examples
    --------
    >>> parse_key_value("cell_type = Megakaryocytes")
    ('cell_type', 'Megakaryocytes')
    """
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"Expected {what}, got {text!r}.")
    key, value = (part.strip() for part in text.split("=", 1))
    if not key or not value:
        raise ValueError(f"Expected {what} with both sides non-empty, got {text!r}.")
    return key, value


def first_names(names: list[str], limit: int = 3) -> str:
    """The first ``limit`` names, comma-separated, with ``...`` when there are more (errors)."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def package_version() -> str:
    """The installed version of scvi-unlearn (``"0.0.0"`` when run from a source tree)."""
    try:
        return version("scvi-unlearn")
    except PackageNotFoundError:
        return "0.0.0"
