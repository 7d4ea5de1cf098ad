"""Reference per-cell gradients for DP-SGD: ``torch.func.vmap`` over cells (tests only).

The package clips by ghost clipping (:class:`scvi_unlearn.train._ghost.GhostClipper`: per-cell
gradient norms from hooks, no per-cell gradient formed). This module computes what it must
agree with, every cell's own gradient, by ``vmap(grad(functional_call(...)))`` over the cells
of a batch, and :class:`VmapDPTrainingPlan` trains with it. scVI's ``VAE`` is traced by
``vmap`` only after patching torch and scvi-tools at run time (:func:`vmap_compatible`), which
is not thread-safe; that is why this lives in the test tree and not in the package. The
benchmark ``benchmarks/dp_speed.py`` imports it too, to time the reference.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
from torch.func import functional_call, grad_and_value, vmap

from scvi_unlearn.module import per_cell_loss_terms
from scvi_unlearn.train import _dp
from scvi_unlearn.train._common import iter_chunks

if TYPE_CHECKING:
    from collections.abc import Iterator

    from scvi_unlearn.train._common import Tensors


def _rsample_out_of_place(self, sample_shape=torch.Size()):  # noqa: B008 (torch's signature)
    shape = self._extended_shape(sample_shape)
    eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
    return self.loc + eps * self.scale


@contextlib.contextmanager
def vmap_compatible(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Make an scVI ``VAE`` traceable by ``torch.func.vmap`` with per-cell randomness.

    Inside the block: torch distributions skip their (data-dependent) argument checks; a
    :class:`torch.distributions.Normal` draws its reparameterisation noise out of place
    (``torch.randn``), so ``randomness="different"`` gives every cell its own latent sample
    (torch's in-place ``normal_`` on an unbatched tensor cannot); ``one_hot`` with a known
    number of classes becomes a comparison with ``arange`` (scvi-tools' batch and label
    covariates), because ``torch.nn.functional.one_hot`` checks its input's range on the data.
    Everything is restored on exit. Not thread-safe: it patches module-level names.
    """
    original_one_hot = torch.nn.functional.one_hot

    def one_hot(tensor: torch.Tensor, num_classes: int = -1) -> torch.Tensor:
        if num_classes < 0:
            return original_one_hot(tensor, num_classes)
        classes = torch.arange(num_classes, device=tensor.device)
        return (tensor.unsqueeze(-1) == classes).to(torch.int64)

    names = {type(module).__module__, "scvi.module._vae", "scvi.nn._base_components"}
    patched = [
        sys.modules[name]
        for name in names
        if name in sys.modules and getattr(sys.modules[name], "one_hot", None) is original_one_hot
    ]
    validate = torch.distributions.Distribution._validate_args
    rsample = torch.distributions.Normal.rsample
    torch.distributions.Distribution.set_default_validate_args(False)
    torch.distributions.Normal.rsample = _rsample_out_of_place
    torch.nn.functional.one_hot = one_hot
    for mod in patched:
        mod.one_hot = one_hot
    try:
        yield module
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate)
        torch.distributions.Normal.rsample = rsample
        torch.nn.functional.one_hot = original_one_hot
        for mod in patched:
            mod.one_hot = original_one_hot


class _CellLoss(torch.nn.Module):
    """A batch's loss (one cell under ``vmap``) as a module for ``functional_call``."""

    def __init__(self, vae: torch.nn.Module, posterior_mean: bool):
        super().__init__()
        self.vae = vae
        self.posterior_mean = posterior_mean

    def forward(self, tensors: Tensors, kl_weight) -> torch.Tensor:
        if self.posterior_mean:
            terms = per_cell_loss_terms(self.vae, tensors)
            return (terms["reconstruction_nll"] + kl_weight * terms["kl_z"]).mean()
        # scVI's own training loss: sampled z, dropout, ``VAE.loss`` (the batch mean).
        _, _, loss_output = self.vae(tensors, loss_kwargs={"kl_weight": kl_weight})
        return loss_output.loss


def per_cell_gradients(
    plan: _dp.DPTrainingPlan, tensors: Tensors
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every cell's gradient of its loss (``[n_cells, *shape]`` per parameter) and losses.

    The plan's per-cell loss (``plan.per_cell_loss``) at its current KL weight, one ``vmap``
    call over all of ``tensors`` (each cell its own latent sample and dropout mask).
    """
    trainable = {n: p for n, p in plan.module.named_parameters() if p.requires_grad}
    wrapper = _CellLoss(plan.module, plan.per_cell_loss == "posterior_mean")
    params = {f"vae.{k}": v.detach() for k, v in trainable.items()}
    kl_weight = plan.kl_weight if "kl_weight" in plan.loss_kwargs else 1.0

    def cell_loss(p: dict[str, torch.Tensor], cell: Tensors) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in cell.items()}
        return functional_call(wrapper, p, (one, kl_weight))

    fn = vmap(grad_and_value(cell_loss), in_dims=(None, 0), randomness="different")
    with vmap_compatible(plan.module):
        grads, losses = fn(params, tensors)
    return {k[len("vae.") :]: g for k, g in grads.items()}, losses


def clipped_gradient_sum(
    plan: _dp.DPTrainingPlan, batch: Tensors, chunk_size: int = 64
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """What :meth:`DPTrainingPlan.clipped_gradient_sum` returns, from per-cell gradients.

    Each cell's gradient ``g_i`` (all trainable parameters, one flat vector) is scaled by
    ``min(1, C / (||g_i|| + 1e-6))``, Opacus' clipping rule; ``chunk_size`` cells a ``vmap``.
    """
    params = {n: p for n, p in plan.module.named_parameters() if p.requires_grad}
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    raw, clipped = [], []
    for chunk in iter_chunks(batch, chunk_size):
        grads, _ = per_cell_gradients(plan, chunk)
        norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))
        factor = (plan.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for k, g in grads.items():
            total[k] += torch.einsum("i,i...->...", factor, g)
        raw.append(norms.detach())
        clipped.append((norms * factor).detach())
    empty = torch.zeros(0, device=plan.device)
    raw_norms = torch.cat(raw) if raw else empty
    clipped_norms = torch.cat(clipped) if clipped else empty
    return total, raw_norms, clipped_norms


class VmapDPTrainingPlan(_dp.DPTrainingPlan):
    """:class:`~scvi_unlearn.train.DPTrainingPlan` that clips per-cell gradients from ``vmap``.

    Parameters
    ----------
    *args, **kwargs
        As :class:`~scvi_unlearn.train.DPTrainingPlan`.
    chunk_size
        Cells per ``vmap`` call (memory: ``chunk_size`` copies of the gradient).
    """

    def __init__(self, *args: Any, chunk_size: int = 64, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.chunk_size = int(chunk_size)

    def clipped_gradient_sum(
        self, batch: Tensors
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The clipped sum and norms from every cell's own gradient, chunk by chunk."""
        return clipped_gradient_sum(self, batch, self.chunk_size)


@contextlib.contextmanager
def vmap_training() -> Iterator[None]:
    """Inside the block, :func:`~scvi_unlearn.train.train_dp` trains a :class:`VmapDPTrainingPlan`.

    For tests and the speed benchmark: everything else of ``train_dp`` (split, Poisson batches,
    noise, accounting) is unchanged, so both paths give the same model where the clipped sums
    agree.
    """
    with mock.patch.object(_dp, "DPTrainingPlan", VmapDPTrainingPlan):
        yield
