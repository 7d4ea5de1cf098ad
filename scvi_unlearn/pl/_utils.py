"""Shared figure handling in scanpy style (``show=``; save with ``ax.figure.savefig``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

AxesLike = TypeVar("AxesLike")


def finish(ax: AxesLike, show: bool = False) -> AxesLike:
    """Show the figure of ``ax`` if asked; return ``ax``.

    ``ax`` may also be a sequence of axes of one figure (multi-panel plots).
    """
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return ax


def resolve_show(show: bool | None, owns_figure: bool) -> bool:
    """Scanpy's default: show a figure the function created itself."""
    if show is not None:
        return bool(show)
    return owns_figure


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Axes, bool]:
    """``(ax, owns_figure)``: the given axes, or the axes of a new figure."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax, False
    _, ax = plt.subplots(figsize=figsize)
    return ax, True


def save_figure(figure: Figure, path: str | Path) -> None:
    """Write ``figure`` to ``path`` (150 dpi, tight bounding box) and close it.

    The package's own writers (command line, demo) use it; users call
    ``ax.figure.savefig(path)`` on what a plot function returns.
    """
    import matplotlib.pyplot as plt

    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(figure)
