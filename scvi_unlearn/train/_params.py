"""Hyper-parameter declarations of the unlearning methods, with type and range checks."""

from __future__ import annotations

import inspect
import numbers
import os
from dataclasses import dataclass, replace
from typing import Any


class _FromPlan:
    """Sentinel default: "the plan's own signature default" (one source of truth)."""

    def __repr__(self) -> str:
        return "FROM_PLAN"


#: Default of a :class:`Param` whose value comes from the plan's ``__init__`` signature.
FROM_PLAN: Any = _FromPlan()


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: default, type and allowed range.

    Parameters
    ----------
    default
        Default value; :data:`FROM_PLAN` (the default) reads it from the training plan's
        signature (see ``resolve_plan_defaults``), so no default is written twice.
    kind
        ``"int"``, ``"float"``, ``"bool"`` or ``"str"`` (a string or path).
    low, high
        Bounds (``None``: unbounded).
    low_open, high_open
        Whether the bound itself is excluded.
    allow_none
        Whether ``None`` is accepted (it means "derive a default").
    doc
        One line for error messages and docs.
    """

    default: Any = FROM_PLAN
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_none: bool = False
    doc: str = ""

    def range_text(self) -> str:
        """The allowed range in interval notation, e.g. ``[0, 1)``."""
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
        if self.kind == "str":
            if not isinstance(value, str | os.PathLike):
                raise TypeError(f"{where} must be a string or path, got {value!r}.")
            return str(value)
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
            raise ValueError(f"{where} must be in {self.range_text()}, got {value!r}.")
        return value


def plan_defaults(plan_cls: type) -> dict[str, Any]:
    """Keyword defaults of a plan's ``__init__``, following ``**kwargs`` up its bases.

    A subclass's default wins over its base's (e.g. the frozen critic's longer pre-training).
    """
    defaults: dict[str, Any] = {}
    for cls in plan_cls.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if param.default is not inspect.Parameter.empty:
                defaults.setdefault(name, param.default)
    return defaults


def resolve_plan_defaults(params: dict[str, Param], plan_cls: type | None) -> dict[str, Param]:
    """Fill every :data:`FROM_PLAN` default from ``plan_cls``'s signature.

    Raises
    ------
    TypeError
        If a :data:`FROM_PLAN` parameter is not a keyword of the plan (a declaration bug).
    """
    defaults = plan_defaults(plan_cls) if plan_cls is not None else {}
    resolved = {}
    for name, spec in params.items():
        if spec.default is FROM_PLAN:
            if name not in defaults:
                owner = plan_cls.__name__ if plan_cls is not None else "no plan"
                raise TypeError(
                    f"Hyper-parameter `{name}` takes its default from {owner}, "
                    "whose signature has no such keyword."
                )
            spec = replace(spec, default=defaults[name])
        resolved[name] = spec
    return resolved


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
