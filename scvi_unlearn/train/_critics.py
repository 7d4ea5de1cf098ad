"""Membership critics: small MLPs that tell forget-cell features from non-member features."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F


class CriticEnsemble(nn.Module):
    """``n_critics`` independent MLP critics evaluated together (batched matrix products).

    Each critic maps a standardised feature vector to one logit: "is this a training cell?".
    Their weights are stacked along a leading critic axis, so all critics run in one batched
    product instead of a Python loop.

    Parameters
    ----------
    n_features
        Input dimension (number of per-cell attack features).
    n_critics
        Number of critics.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    seed
        Seed of the weight initialisation (PyTorch's ``nn.Linear`` scheme), so that runs
        with the same seed start from the same critics.

    Examples
    --------
    >>> critics = CriticEnsemble(n_features=4, n_critics=3, seed=0)
    >>> critics(torch.zeros(5, 4)).shape
    torch.Size([3, 5])
    """

    def __init__(
        self,
        n_features: int,
        n_critics: int = 3,
        n_hidden: int = 32,
        n_layers: int = 2,
        seed: int = 0,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(int(seed))
        dims = [n_features] + [n_hidden] * n_layers + [1]
        self.n_critics = int(n_critics)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in itertools.pairwise(dims):
            bound = 1.0 / math.sqrt(d_in)
            w = (torch.rand(n_critics, d_in, d_out, generator=generator) * 2 - 1) * bound
            b = (torch.rand(n_critics, 1, d_out, generator=generator) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def forward(self, x: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Logits of every critic, shape ``(n_critics, n_cells)``.

        With ``detach_params`` the critics act as fixed functions: gradients flow to ``x``
        only (the VAE's view of the game), not to the critics' weights.
        """
        h = x.unsqueeze(0).expand(self.n_critics, -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if detach_params:
                w, b = w.detach(), b.detach()
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = F.leaky_relu(h, 0.2)
        return h.squeeze(-1)


def critic_losses(logits_members: torch.Tensor, logits_nonmembers: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy of each critic, shape ``(n_critics,)``.

    Members (forget cells) are label 1, non-members label 0; each class weighs one half, so
    a critic that knows nothing scores ``log 2`` whatever the class sizes.
    """
    loss_m = F.binary_cross_entropy_with_logits(
        logits_members, torch.ones_like(logits_members), reduction="none"
    ).mean(-1)
    loss_n = F.binary_cross_entropy_with_logits(
        logits_nonmembers, torch.zeros_like(logits_nonmembers), reduction="none"
    ).mean(-1)
    return 0.5 * (loss_m + loss_n)


def js_divergence_estimate(critic_loss: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence estimate ``log 2 - BCE`` (Goodfellow et al. 2014).

    For the Bayes-optimal critic, the class-balanced BCE equals ``log 2 - JSD(P_forget,
    P_nonmember)``; for any critic, ``log 2 - BCE`` is a lower bound of the JSD. Logged to
    monitor the game.
    """
    return math.log(2.0) - critic_loss


def indistinguishability_loss(logits_members: torch.Tensor) -> torch.Tensor:
    """Mean over critics and cells of ``KL(Bernoulli(1/2) || Bernoulli(sigmoid(logit)))``.

    Equals ``BCE(logit, 1/2) - log 2``: zero exactly when every critic is maximally unsure
    (probability 1/2) about every forget cell, positive otherwise. Its gradient with respect to
    a logit is ``sigmoid(logit) - 1/2``, which does not vanish when a critic is confident (the
    minimax term ``log 2 - BCE`` does, and stalls the VAE against strong critics) and which
    changes sign past 1/2, so, unlike "label the forget cells non-members", it does not reward
    making forget cells look *less* member-like than non-members. Against Bayes-optimal
    critics, ``D(x) = p_F(x) / (p_F(x) + p_N(x)) = 1/2`` on the forget cells' support means
    the two feature distributions are equal.

    Examples
    --------
    >>> float(indistinguishability_loss(torch.zeros(3, 4)))
    0.0
    """
    half = torch.full_like(logits_members, 0.5)
    bce = F.binary_cross_entropy_with_logits(logits_members, half, reduction="none")
    return (bce - math.log(2.0)).mean()


def balanced_accuracy(
    logits_members: torch.Tensor, logits_nonmembers: torch.Tensor
) -> torch.Tensor:
    """Mean over critics of the class-balanced accuracy (threshold at logit 0)."""
    acc_m = (logits_members > 0).float().mean(-1)
    acc_n = (logits_nonmembers <= 0).float().mean(-1)
    return (0.5 * (acc_m + acc_n)).mean()
