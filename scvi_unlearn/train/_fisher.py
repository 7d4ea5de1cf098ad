"""Fisher scrubbing (Golatkar et al. 2020) and Selective Synaptic Dampening (Foster et al. 2024).

Both start from the diagonal Fisher information of the per-cell loss, estimated from
per-sample gradients (``torch.func.vmap(grad(...))``), not from squared minibatch gradients
(whose square mixes cells and underestimates the Fisher by the batch size).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call, grad, vmap

from scvi_unlearn.module import per_cell_loss_terms
from scvi_unlearn.train._common import (
    Tensors,
    UnlearningTrainingPlan,
    eval_mode,
    iter_chunks,
    n_cells,
)

if TYPE_CHECKING:
    from collections.abc import Iterable


class _CellLoss(torch.nn.Module):
    """The per-cell negative ELBO (posterior mean) of a VAE, as a module for functional calls."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, tensors: Tensors) -> torch.Tensor:
        return per_cell_loss_terms(self.vae, tensors)["neg_elbo"]


@contextlib.contextmanager
def _no_distribution_validation():
    # Argument validation of torch distributions branches on data, which vmap cannot trace.
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the Fisher covers (those that require gradients), by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def diagonal_fisher(
    module: torch.nn.Module, batches: Iterable[Tensors]
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the per-cell negative ELBO, from per-sample gradients.

    ``F_j = mean_i (d loss_i / d theta_j)^2`` over all cells ``i`` of ``batches``, where
    ``loss_i`` is cell ``i``'s negative ELBO at the posterior mean in eval mode (the
    deterministic loss of :func:`~scvi_unlearn.audit.per_cell_loss_terms`). Per-cell gradients
    come from ``torch.func.vmap(torch.func.grad(...))`` over a functional call of the module,
    one batch at a time (memory: batch size x number of parameters).

    Parameters
    ----------
    module
        An scVI ``VAE``.
    batches
        Minibatches of cells (tensor dicts, on the module's device).

    Returns
    -------
    Dict parameter name -> Fisher diagonal (same shape as the parameter).
    """
    wrapper = _CellLoss(module)
    params = {f"vae.{k}": v.detach() for k, v in trainable_parameters(module).items()}

    def cell_loss(p: dict[str, torch.Tensor], cell: Tensors) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in cell.items()}
        return functional_call(wrapper, p, (one,)).sum()

    # randomness="same": the encoder draws a z sample that the posterior-mean loss ignores.
    per_cell_grad = vmap(grad(cell_loss), in_dims=(None, 0), randomness="same")
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    count = 0
    with eval_mode(module), _no_distribution_validation():
        for batch in batches:
            grads = per_cell_grad(params, batch)
            for k, g in grads.items():
                total[k] += g.pow(2).sum(0)
            count += next(iter(batch.values())).shape[0]
    if count == 0:
        raise ValueError("diagonal_fisher got no cells.")
    return {k[len("vae.") :]: v / count for k, v in total.items()}


def fisher_noise_std(
    fisher: torch.Tensor, alpha: float, eps: float = 1e-8, max_std: float = 1e3
) -> torch.Tensor:
    """Standard deviation of the Golatkar scrubbing noise for each parameter.

    ``std = alpha * min(1 / sqrt(F + eps), max_std)``: Gaussian noise with covariance
    proportional to the inverse Fisher, so parameters the retained cells pin down (large
    Fisher) barely move and parameters they do not constrain are scrubbed. ``max_std`` caps
    the inverse-Fisher standard deviation of parameters with (near) zero Fisher, which would
    otherwise receive unbounded noise (Golatkar et al. clip the variance the same way).

    Examples
    --------
    >>> std = fisher_noise_std(torch.tensor([100.0, 1.0, 0.0]), alpha=0.1, max_std=50.0)
    >>> [round(v, 4) for v in std.tolist()]
    [0.01, 0.1, 5.0]
    """
    if alpha < 0 or eps <= 0 or max_std <= 0:
        raise ValueError("alpha must be >= 0, eps and max_std > 0.")
    return alpha * torch.clamp(torch.rsqrt(fisher + eps), max=max_std)


def ssd_dampening_factor(
    fisher_forget: torch.Tensor,
    fisher_retain: torch.Tensor,
    selection_weight: float = 10.0,
    dampening: float = 1.0,
) -> torch.Tensor:
    """Multiplicative factor of Selective Synaptic Dampening for each parameter.

    Parameters far more important to the forget set than to the retained data
    (``F_forget > selection_weight * F_retain``) are multiplied by
    ``min(1, dampening * F_retain / F_forget)``; all others keep factor 1.

    Examples
    --------
    >>> ssd_dampening_factor(torch.tensor([100.0, 1.0]), torch.tensor([1.0, 1.0])).tolist()
    [0.009999999776482582, 1.0]
    """
    selected = fisher_forget > selection_weight * fisher_retain
    ratio = (
        dampening * fisher_retain / fisher_forget.clamp_min(torch.finfo(fisher_forget.dtype).tiny)
    )
    factor = torch.clamp(ratio, max=1.0)
    return torch.where(selected, factor, torch.ones_like(factor))


@torch.no_grad()
def scrub_parameters(
    module: torch.nn.Module,
    fisher_retain: dict[str, torch.Tensor],
    alpha: float,
    eps: float = 1e-8,
    max_std: float = 1e3,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Add Golatkar noise ``std * N(0, 1)`` to every parameter, in place.

    The noise is drawn on the CPU from ``generator`` (then moved), so a seed gives the same
    scrubbed model on any device. Returns the mean noise standard deviation per parameter.
    """
    stds = {}
    for name, p in trainable_parameters(module).items():
        std = fisher_noise_std(fisher_retain[name], alpha, eps, max_std)
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        p.add_(std * noise)
        stds[name] = float(std.mean())
    return stds


@torch.no_grad()
def dampen_parameters(
    module: torch.nn.Module,
    fisher_forget: dict[str, torch.Tensor],
    fisher_retain: dict[str, torch.Tensor],
    selection_weight: float = 10.0,
    dampening: float = 1.0,
) -> int:
    """Apply Selective Synaptic Dampening in place; return the number of dampened weights."""
    n_dampened = 0
    for name, p in trainable_parameters(module).items():
        factor = ssd_dampening_factor(
            fisher_forget[name], fisher_retain[name], selection_weight, dampening
        )
        p.mul_(factor)
        n_dampened += int((factor < 1).sum())
    return n_dampened


class FisherScrubbingPlan(UnlearningTrainingPlan):
    """Golatkar Fisher scrubbing (and optionally SSD), then an optional retain fine-tune.

    When the fit starts (on the training device, once):

    1. the diagonal Fisher ``F_r`` of the retain loss is estimated from per-sample gradients
       on ``fisher_tensors`` (a subsample of retained cells), see :func:`diagonal_fisher`;
    2. with ``ssd=True``, the forget-set Fisher ``F_f`` too, and parameters with
       ``F_f > selection_weight * F_r`` are multiplied by ``min(1, dampening * F_r / F_f)``;
    3. if ``alpha > 0``, Gaussian noise ``theta <- theta + alpha * min(1 / sqrt(F_r + eps),
       max_std) * N(0, 1)`` is added, seeded by ``seed``.

    The training epochs that follow (``max_epochs`` of the runner, possibly 0) fine-tune on
    the retained cells with scVI's loss.

    Parameters
    ----------
    module
        The scVI ``VAE`` (a copy of the trained one; modified in place).
    fisher_tensors
        Retained cells for the retain Fisher.
    forget_tensors
        Forget cells (needed for ``ssd=True``).
    alpha, eps, max_std
        Noise scale, Fisher floor and cap of the inverse-Fisher standard deviation.
    ssd, selection_weight, dampening
        Selective Synaptic Dampening and its two constants (Foster et al.'s alpha, lambda).
    fisher_batch_size
        Cells per vmap batch (memory: this many copies of the parameters' gradients).
    **kwargs
        Passed to :class:`~scvi_unlearn.train.UnlearningTrainingPlan`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        fisher_tensors: Tensors,
        forget_tensors: Tensors | None = None,
        *,
        alpha: float = 1e-3,
        eps: float = 1e-8,
        max_std: float = 1e3,
        ssd: bool = False,
        selection_weight: float = 10.0,
        dampening: float = 1.0,
        fisher_batch_size: int = 16,
        **kwargs: Any,
    ):
        if ssd and forget_tensors is None:
            raise ValueError("ssd=True needs the forget cells (`forget_tensors`).")
        super().__init__(
            module, held={"fisher": fisher_tensors, "forget": forget_tensors}, **kwargs
        )
        self.alpha, self.eps, self.max_std = float(alpha), float(eps), float(max_std)
        self.ssd = bool(ssd)
        self.selection_weight, self.dampening = float(selection_weight), float(dampening)
        self.fisher_batch_size = int(fisher_batch_size)

    def edit_weights(self) -> dict[str, Any]:
        """Scrub the module (once, before any fine-tuning epoch)."""
        return self.scrub()

    def scrub(self) -> dict[str, Any]:
        """Estimate the Fisher(s) and modify the parameters; return a summary."""
        fisher_r = diagonal_fisher(
            self.module, iter_chunks(self.held["fisher"], self.fisher_batch_size)
        )
        summary: dict[str, Any] = {"n_fisher_cells": n_cells(self.held["fisher"])}
        if self.ssd:
            fisher_f = diagonal_fisher(
                self.module, iter_chunks(self.held["forget"], self.fisher_batch_size)
            )
            summary["n_dampened"] = dampen_parameters(
                self.module, fisher_f, fisher_r, self.selection_weight, self.dampening
            )
        if self.alpha > 0:
            generator = torch.Generator().manual_seed(self.seed)
            stds = scrub_parameters(
                self.module, fisher_r, self.alpha, self.eps, self.max_std, generator
            )
            summary["mean_noise_std"] = float(sum(stds.values()) / max(len(stds), 1))
        summary["n_parameters"] = int(
            sum(p.numel() for p in trainable_parameters(self.module).values())
        )
        return summary
