"""Plots in scanpy style.

Every function takes its data positionally and its options keyword-only, among them ``ax=``
(or ``axes=``) and ``show=`` (default: show a figure the function created itself), and returns
the matplotlib axes; save with ``ax.figure.savefig(path)``.

- :func:`roc_curves`: ROC curves of every attack of an audit (log-log: the low-FPR regime).
- :func:`method_comparison`: a privacy metric per unlearning method with CIs, against the
  retrain band.
- :func:`utility_comparison`: utility metrics per model, grouped bars.
- :func:`latent_embedding`: UMAPs of several models' latent spaces side by side, with the
  forget set highlighted.
"""

from scvi_unlearn.pl._comparison import method_comparison, utility_comparison
from scvi_unlearn.pl._embedding import latent_embedding
from scvi_unlearn.pl._roc import roc_curves

__all__ = ["latent_embedding", "method_comparison", "roc_curves", "utility_comparison"]
