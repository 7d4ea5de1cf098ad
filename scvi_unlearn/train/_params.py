"""Hyper-parameter declarations of the unlearning methods, with type and range checks."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: default, type and allowed range.

    Parameters
    ----------
    default
        Default value.
    kind
        ``"int"``, ``"float"`` or ``"bool"``.
    low, high
        Bounds (``None``: unbounded).
    low_open, high_open
        Whether the bound itself is excluded.
    allow_none
        Whether ``None`` is accepted (it means "derive a default").
    doc
        One line for error messages and docs.
    """

    default: Any
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_none: bool = False
    doc: str = ""

    def _range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def check(self, method: str, name: str, value: Any) -> Any:
        """Return ``value`` normalised to the declared type, or raise a clear error."""
        where = f"{method}: hyper-parameter `{name}`"
        if value is None:
            if self.allow_none:
                return None
            raise TypeError(f"{where} must be a {self.kind}, got None.")
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{where} must be True or False, got {value!r}.")
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"{where} must be a {self.kind}, got {type(value).__name__} {value!r}."
            )
        if self.kind == "int":
            if not isinstance(value, numbers.Integral):
                raise TypeError(f"{where} must be an integer, got {value!r}.")
            value = int(value)
        else:
            value = float(value)
        too_low = self.low is not None and (
            value < self.low or (self.low_open and value == self.low)
        )
        too_high = self.high is not None and (
            value > self.high or (self.high_open and value == self.high)
        )
        if too_low or too_high or value != value:
            raise ValueError(f"{where} must be in {self._range_text()}, got {value!r}.")
        return value


def check_hyperparameters(
    method: str, declared: dict[str, Param], given: dict[str, Any]
) -> dict[str, Any]:
    """Validate ``given`` against ``declared`` and fill in defaults.

    Raises
    ------
    TypeError
        For unknown names (listing the valid ones) or values of the wrong type.
    ValueError
        For values out of range.
    """
    unknown = sorted(set(given) - set(declared))
    if unknown:
        valid = ", ".join(sorted(declared)) or "(none)"
        raise TypeError(
            f"Unknown hyper-parameter(s) {unknown} for method '{method}'. Valid ones: {valid}."
        )
    return {
        name: spec.check(method, name, given[name]) if name in given else spec.default
        for name, spec in declared.items()
    }
