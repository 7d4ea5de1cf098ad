"""Shared figure handling in scanpy style (``show=``, ``save=``)."""

from __future__ import annotations

from pathlib import Path


def finish(ax, show: bool = False, save: str | Path | None = None):
    """Save and/or show the figure of ``ax``; return ``ax``.

    ``ax`` may also be a sequence of axes of one figure (multi-panel plots).
    """
    import matplotlib.pyplot as plt

    first = ax[0] if isinstance(ax, list | tuple) else ax
    fig = first.figure
    if save:
        Path(save).expanduser().parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show:
        plt.show()
    return ax


def resolve_show(show: bool | None, owns_figure: bool, save) -> bool:
    """Scanpy's default: show a figure the function created itself, unless it is saved."""
    if show is not None:
        return bool(show)
    return owns_figure and not save


def new_axes(ax, figsize: tuple[float, float]):
    """``(ax, owns_figure)``: the given axes, or the axes of a new figure."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax, False
    _, ax = plt.subplots(figsize=figsize)
    return ax, True
