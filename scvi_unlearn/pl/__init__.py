"""Plots in scanpy style: every function takes ``ax=``, ``show=`` and ``save=``."""

from scvi_unlearn.pl._roc import roc_curves

__all__ = ["roc_curves"]
