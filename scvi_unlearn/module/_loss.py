"""scVI's per-cell loss at the posterior mean: the kernel of the audit and of every plan.

The attack features (:func:`scvi_unlearn.audit.attack_features`), the unlearning plans'
privacy terms and the utility metrics all compute the same per-cell negative ELBO, so it
lives here, below both :mod:`scvi_unlearn.audit` and :mod:`scvi_unlearn.train`. Everything is
batched and deterministic: the latent code is the posterior mean (see :ref:`methods-features`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from torch.distributions import Distribution, kl_divergence

from scvi_unlearn import _compat as compat

#: Scalar per-cell features, in the order the attacks use them.
SCALAR_FEATURES: tuple[str, ...] = (
    "reconstruction_nll",
    "kl_z",
    "neg_elbo",
    "reconstruction_per_count",
    "kl_per_count",
    "neg_elbo_per_count",
    "log_library",
    "z_mean_norm",
    "z_var_mean",
    "z_logvar_mean",
)

#: The score the loss-threshold attack and LiRA use (lower = more member-like).
LOSS_FEATURE = "neg_elbo_per_count"


def sparse_nll(px: Distribution, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-cell negative log-likelihood of counts under scVI's (ZI)NB, computed sparsely.

    Same formula as scvi-tools' ``log_zinb_positive`` / ``log_nb_positive``, but the
    ``lgamma`` terms, which dominate the cost, are evaluated only at the non-zero counts
    (single-cell matrices are ~90% zeros). Other likelihoods fall back to ``px.log_prob``.
    """
    if not isinstance(px, NegativeBinomial):
        return -px.log_prob(x).sum(-1)
    mu = px.mu
    theta = px.theta.expand_as(mu) if px.theta.shape != mu.shape else px.theta
    log_theta_mu = torch.log(theta + mu + eps)
    nb_zero = theta * (torch.log(theta + eps) - log_theta_mu)  # log NB(0 | mu, theta)
    if isinstance(px, ZeroInflatedNegativeBinomial):
        pi = px.zi_logits.expand_as(mu)
        softplus_pi = F.softplus(-pi)
        nonzero_base = -softplus_pi - pi + nb_zero
        zero_ll = F.softplus(-pi + nb_zero) - softplus_pi
    else:
        nonzero_base = nb_zero
        zero_ll = nb_zero
    rows, cols = torch.nonzero(x > eps, as_tuple=True)
    xv, muv, thv = x[rows, cols], mu[rows, cols], theta[rows, cols]
    nonzero_ll = (
        nonzero_base[rows, cols]
        + xv * (torch.log(muv + eps) - log_theta_mu[rows, cols])
        + torch.lgamma(xv + thv)
        - torch.lgamma(thv)
        - torch.lgamma(xv + 1)
    )
    ll = torch.where(x > eps, torch.zeros_like(zero_ll), zero_ll).sum(-1)
    ll = ll.index_add(0, rows, nonzero_ll)
    return -ll


def per_cell_loss_terms(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], sparse_likelihood: bool = False
) -> dict:
    """Per-cell loss terms of an scVI ``VAE`` at the posterior mean, differentiable.

    Usable inside a training step (gradients flow to the module's parameters) and, under
    ``torch.no_grad``, for attack features.

    Parameters
    ----------
    module
        An scvi-tools ``VAE`` (the ``model.module`` of :class:`scvi.model.SCVI`).
    tensors
        A minibatch as yielded by scvi-tools' ``AnnDataLoader``.
    sparse_likelihood
        Evaluate the likelihood's expensive terms only at non-zero counts (same values, faster
        for feature extraction; keep False inside training steps).

    Returns
    -------
    Dict of 1-d tensors (one value per cell): ``reconstruction_nll`` (negative log-likelihood
    of the counts), ``kl_z`` (KL of q(z|x) from the prior), ``neg_elbo`` (their sum, scVI's
    own per-cell scale), ``library`` (total counts), plus 2-d ``qz_mean``, ``qz_var`` and
    ``px_mu`` (the decoder's expected counts per gene).
    """
    return per_cell_loss_terms_and_likelihood(module, tensors, sparse_likelihood)[0]


def per_cell_loss_terms_and_likelihood(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], sparse_likelihood: bool = False
) -> tuple[dict, Distribution]:
    """:func:`per_cell_loss_terms` and the count likelihood ``p(x | z)`` it evaluated."""
    inference_inputs = compat.inference_inputs(module, tensors)
    inference_outputs = dict(module.inference(**inference_inputs))
    qz = inference_outputs["qz"]
    # Posterior mean instead of a sample: deterministic features and lower-variance gradients.
    inference_outputs["z"] = module.z_encoder.z_transformation(qz.loc)
    ql = inference_outputs.get("ql")
    if ql is not None:
        # Without the observed library size scVI samples the log library from q(l | x); its
        # posterior mean keeps the features deterministic for every library-size setting.
        inference_outputs["library"] = ql.loc
    generative_inputs = compat.generative_inputs(module, tensors, inference_outputs)
    generative_outputs = module.generative(**generative_inputs)
    x = tensors[REGISTRY_KEYS.X_KEY]
    px = generative_outputs["px"]
    reconstruction = sparse_nll(px, x) if sparse_likelihood else -px.log_prob(x).sum(-1)
    kl_z = kl_divergence(qz, generative_outputs["pz"]).sum(-1)
    kl_l = torch.zeros_like(kl_z)
    if inference_outputs.get("ql") is not None and generative_outputs.get("pl") is not None:
        kl_l = kl_divergence(inference_outputs["ql"], generative_outputs["pl"]).sum(-1)
    terms = {
        "reconstruction_nll": reconstruction,
        "kl_z": kl_z + kl_l,
        "neg_elbo": reconstruction + kl_z + kl_l,
        "library": x.sum(-1),
        "qz_mean": qz.loc,
        "qz_var": qz.scale.pow(2),
        # NB and ZINB carry ``mu``; scvi-tools' Poisson is torch's, whose mean is its rate.
        "px_mu": px.mu if hasattr(px, "mu") else px.mean,
    }
    return terms, px


def feature_matrix(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Stack :func:`per_cell_loss_terms` output into the scalar features, differentiably.

    Returns a ``(n_cells, len(SCALAR_FEATURES))`` tensor whose columns follow
    :data:`~scvi_unlearn.module.SCALAR_FEATURES`. Critics inside unlearning plans consume this.
    """
    library = terms["library"].clamp_min(1.0)
    qz_var = terms["qz_var"].clamp_min(1e-12)
    columns = [
        terms["reconstruction_nll"],
        terms["kl_z"],
        terms["neg_elbo"],
        terms["reconstruction_nll"] / library,
        terms["kl_z"] / library,
        terms["neg_elbo"] / library,
        torch.log(library),
        terms["qz_mean"].norm(dim=-1),
        qz_var.mean(-1),
        torch.log(qz_var).mean(-1),
    ]
    return torch.stack(columns, dim=-1)
