"""A one-run DP audit: canary cells, one training run, an empirical lower bound on epsilon.

Steinke, Nasr & Jagielski (NeurIPS 2023, "Privacy auditing with one (1) training run"):
``m`` canaries are each included in the training data with probability 1/2, independently;
after one training run an attacker scores every canary, guesses "in" for the ``k`` highest
scores and "out" for the ``k`` lowest, and abstains on the rest. If training is
``(epsilon, delta)``-DP, the number ``W`` of correct guesses among the ``r = 2k`` made is
stochastically dominated by ``Binomial(r, e^epsilon / (1 + e^epsilon))`` up to a ``delta`` term
(their Theorem 3.1 / Proposition 5.2):

    P[W >= v] <= beta + 2 m delta alpha,
    beta = P[Binom(r, q) >= v],   alpha = max_{1<=i<=v} (P[Binom(r, q) >= v - i] - beta) / i,

with ``q = e^epsilon / (1 + e^epsilon)``. :func:`one_run_epsilon` reports the largest epsilon
this rejects at the given confidence: an epsilon-hat that the accountant's epsilon must not
be below (or the training, the accounting or the code is wrong).

**Canary cells** (:func:`make_canaries`): each takes the covariates (``obs`` row) and the
library size of a random training cell and spreads that many counts, multinomially and
uniformly, over ``canary_genes`` genes drawn at random for it. No real cell looks like that,
so each canary's gradient reaches the clipping norm and it is as memorable as a cell can be
under DP-SGD: the strongest input-space canary one can build without seeing the weights. The
score is a canary's gain in the loss attack's score (``-neg. ELBO / library``) from the
starting weights to the trained ones (higher = more member-like): the difference removes most
of what its random genes make easy or hard for any model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import optimize, sparse, stats
from scvi import REGISTRY_KEYS

if TYPE_CHECKING:
    from anndata import AnnData

#: Confidence of the one-run epsilon lower bound.
DEFAULT_CONFIDENCE = 0.95
#: Genes each canary's counts are spread over.
DEFAULT_CANARY_GENES = 20
#: Prefix of the canaries' obs names (they never enter the user's AnnData).
CANARY_PREFIX = "scvi-unlearn-canary-"


# -- the bound -------------------------------------------------------------------------------
def one_run_p_value(
    n_canaries: int, n_guesses: int, n_correct: int, epsilon: float, delta: float
) -> float:
    """Chance of ``n_correct`` or more correct guesses under ``(epsilon, delta)``-DP (a bound).

    See the module docstring (Steinke et al. 2023, Proposition 5.2).
    """
    q = 1.0 / (1.0 + math.exp(-float(epsilon)))
    beta = float(stats.binom.sf(n_correct - 1, n_guesses, q))
    if delta == 0 or n_correct == 0:
        return beta
    shifts = np.arange(1, n_correct + 1)
    alpha = np.max((stats.binom.sf(n_correct - shifts - 1, n_guesses, q) - beta) / shifts)
    return float(min(1.0, beta + 2 * n_canaries * float(delta) * max(alpha, 0.0)))


def one_run_epsilon(
    n_canaries: int,
    n_guesses: int,
    n_correct: int,
    delta: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> float:
    """The largest epsilon that ``n_correct`` of ``n_guesses`` correct guesses rule out.

    Parameters
    ----------
    n_canaries
        Canaries inserted (each with probability 1/2).
    n_guesses, n_correct
        Guesses made and how many were right.
    delta
        The delta of the guarantee under test.
    confidence
        With this probability (over the canaries' coin flips and the training) the true
        epsilon is at least the value returned.

    Returns
    -------
    float
        Epsilon-hat (0 when the guesses rule nothing out).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence!r}.")
    if not 0 <= n_correct <= n_guesses <= n_canaries:
        raise ValueError(
            "Need 0 <= n_correct <= n_guesses <= n_canaries, got "
            f"{n_correct}, {n_guesses}, {n_canaries}."
        )
    significance = 1.0 - confidence

    def excess(eps: float) -> float:  # > 0 while (eps, delta) is rejected
        return significance - one_run_p_value(n_canaries, n_guesses, n_correct, eps, delta)

    if n_guesses == 0 or excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2.0
        if high > 1e4:  # every guess right with enormous r: report the bracket's end
            return high
    return float(optimize.brentq(excess, 0.0, high, xtol=1e-6))


# -- canaries -------------------------------------------------------------------------------
def make_canaries(
    model,
    train_idx: np.ndarray,
    n_canaries: int,
    seed: int = 0,
    canary_genes: int = DEFAULT_CANARY_GENES,
) -> AnnData:
    """``n_canaries`` canary cells for ``model``'s AnnData (a new AnnData; see the module doc).

    Parameters
    ----------
    model
        A set-up scVI model; its AnnData is read, never changed.
    train_idx
        Training cells whose covariates and library sizes the canaries borrow.
    n_canaries
        How many.
    seed
        Seed of every draw.
    canary_genes
        Genes each canary's counts are spread over.
    """
    adata = model.adata
    rng = np.random.default_rng(seed)
    n_genes = adata.n_vars
    canary_genes = min(int(canary_genes), n_genes)
    donors = rng.choice(np.asarray(train_idx), size=int(n_canaries), replace=True)
    counts = _registered_counts(model)
    library = np.asarray(counts[donors].sum(axis=1)).ravel().astype(np.int64)
    rows = np.repeat(np.arange(n_canaries), canary_genes)
    genes = np.concatenate([rng.choice(n_genes, canary_genes, replace=False)
                            for _ in range(n_canaries)])  # fmt: skip
    uniform = np.full(canary_genes, 1 / canary_genes)
    values = np.concatenate([rng.multinomial(max(int(n), 1), uniform) for n in library])
    x = sparse.csr_matrix((values.astype(np.float32), (rows, genes)), shape=(n_canaries, n_genes))
    x.sum_duplicates()
    obs = adata.obs.iloc[donors].copy()
    obs.index = pd.Index([f"{CANARY_PREFIX}{i}" for i in range(n_canaries)])
    canary = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
    layer = _counts_layer(model)
    if layer is not None:
        canary.layers[layer] = x.copy()
    for key in adata.obsm:  # registered continuous / extra fields borrow the donor's rows
        canary.obsm[key] = np.asarray(adata.obsm[key])[donors]
    return canary


def _counts_layer(model) -> str | None:
    field = model.adata_manager.data_registry[REGISTRY_KEYS.X_KEY]
    return field.attr_key if field.attr_name == "layers" else None


def _registered_counts(model):
    return model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)


def with_canaries(model, canaries: AnnData) -> AnnData:
    """The model's AnnData with the canaries appended (a new object; the original untouched)."""
    adata = model.adata
    if adata.isbacked:
        raise ValueError(
            "Canaries need the training data in memory (a backed AnnData cannot take new "
            "rows without writing to its file); load it with adata.to_memory()."
        )
    joined = ad.concat([adata, canaries], join="outer", merge="first", uns_merge="first")
    joined.var = adata.var.copy()
    for column in adata.obs.columns:  # keep the categories the registry knows
        if isinstance(adata.obs[column].dtype, pd.CategoricalDtype):
            joined.obs[column] = pd.Categorical(
                joined.obs[column], categories=adata.obs[column].cat.categories
            )
    return joined


# -- the result -----------------------------------------------------------------------------
@dataclass(frozen=True)
class OneRunAudit:
    """The one-run audit of a DP-SGD training run.

    Attributes
    ----------
    epsilon_hat
        Empirical lower bound on epsilon at ``confidence``.
    epsilon, delta
        The accountant's guarantee the audit tests.
    confidence
        Probability with which the true epsilon is at least ``epsilon_hat``.
    n_canaries, n_included
        Canaries built and how many the coin flips put into training.
    n_guesses, n_correct
        Guesses made (the highest and lowest scores, half each) and how many were right.
    canary_genes
        Genes each canary's counts were spread over.
    """

    epsilon_hat: float
    epsilon: float
    delta: float
    confidence: float
    n_canaries: int
    n_included: int
    n_guesses: int
    n_correct: int
    canary_genes: int

    @property
    def consistent(self) -> bool:
        """Whether the empirical bound stays at or below the accountant's epsilon."""
        return self.epsilon_hat <= self.epsilon + 1e-9

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (with ``consistent``)."""
        return {**asdict(self), "consistent": self.consistent}


def guess_and_count(scores: np.ndarray, included: np.ndarray, n_guesses: int) -> tuple[int, int]:
    """Guess "in" for the top half of ``n_guesses`` scores, "out" for the bottom; count hits.

    Returns ``(guesses made, correct)``; ties in the scores are broken by position (the canary
    order is random), so no information beyond the scores is used.
    """
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    per_side = min(int(n_guesses) // 2, scores.size // 2)
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:per_side], order[scores.size - per_side :]
    correct = int(included[top].sum() + (~included[bottom]).sum())
    return 2 * per_side, correct


__all__ = [
    "CANARY_PREFIX",
    "DEFAULT_CANARY_GENES",
    "DEFAULT_CONFIDENCE",
    "OneRunAudit",
    "guess_and_count",
    "make_canaries",
    "one_run_epsilon",
    "one_run_p_value",
    "with_canaries",
]
