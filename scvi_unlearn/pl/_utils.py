"""Shared figure handling in scanpy style (``show=``, ``save=``)."""

from __future__ import annotations


def finish(ax, show: bool = False, save: str | None = None):
    """Save and/or show the figure of ``ax``; return ``ax``."""
    import matplotlib.pyplot as plt

    fig = ax.figure
    if save:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show:
        plt.show()
    return ax
