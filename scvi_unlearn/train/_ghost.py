"""Per-cell gradient norms and clipped gradient sums without per-cell gradients ("ghost clipping").

DP-SGD needs every cell's gradient norm (to clip it) and the sum of the clipped gradients, not
the gradients themselves. For a linear layer ``y = W a + b`` applied once per cell, cell ``i``'s
weight gradient is the outer product ``g_i a_i^T`` (``g_i = d loss_i / d y_i``), whose squared
Frobenius norm is ``||g_i||^2 ||a_i||^2``: one forward with hooks and one backward of the summed
loss give every cell's norm (Goodfellow 2015; Li et al. 2022 call it ghost clipping). Layer norm
affine parameters follow with the normalised input; scVI's gene dispersion ``px_r`` (outside any
layer) gets its per-cell gradients from the likelihood's ``theta``, as the hook Fisher does
(:mod:`scvi_unlearn.train._fisher`). A second backward of ``sum_i c_i loss_i`` with the clipping
factors ``c_i`` then gives the clipped sum ``sum_i c_i grad loss_i`` exactly.

This replaces ``torch.func.vmap`` over cells (one gradient copy per cell) by two backward passes
of the batch; both agree to float tolerance (``tests/train/test_dp.py`` against the ``vmap``
reference of ``tests/train/_vmap_reference.py``).

The identity needs each cell's row to depend on that cell only (no batch norm in training mode,
which DP-SGD forbids anyway) and each hooked layer to run once per forward pass; both are
checked.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from scvi import REGISTRY_KEYS

from scvi_unlearn.train._fisher import _per_cell_chain, likelihood_theta_gradient, refuse_reuse

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from torch.distributions import Distribution

    from scvi_unlearn.train._common import Tensors

#: What DP-SGD supports, for the errors that refuse a model.
_SUPPORTED = (
    "DP-SGD trains models whose trainable layers are linear or 1-d layer norm, each run once "
    "per forward pass: scVI with one-hot covariates (not batch_representation='embedding') "
    "and use_batch_norm='none', use_layer_norm='both'."
)


class GhostClipper:
    """Per-cell gradient norms and clipped gradient sums of a module, from hooks.

    Parameters
    ----------
    module
        The model (an scVI ``VAE``); its trainable parameters are clipped together, as one
        flat vector per cell.

    Raises
    ------
    ValueError
        For a trainable parameter in a layer the identity does not cover (batch norm,
        convolutions, embeddings, ...): DP-SGD trains models whose trainable layers are
        linear or layer norm (scVI with one-hot covariates and layer norm).
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.layers: dict[torch.nn.Module, str] = {}
        covered: set[str] = set()
        for prefix, layer in module.named_modules():
            own = [n for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            name = f"{prefix}." if prefix else ""
            if isinstance(layer, torch.nn.Linear) or (
                isinstance(layer, torch.nn.LayerNorm) and len(layer.normalized_shape) == 1
            ):
                self.layers[layer] = name
                covered.update(name + n for n in own)
            elif prefix:  # the root's own parameters (px_r) are handled below
                # A parameterised layer whose per-cell norm has no hook identity here.
                raise ValueError(
                    f"Ghost clipping does not cover layer {prefix} ({type(layer).__name__}); "
                    f"{_SUPPORTED}"
                )
        #: Trainable parameters outside hooked layers (scVI: ``px_r``).
        self.others = {n: p for n, p in self.params.items() if n not in covered}

    @contextlib.contextmanager
    def _recording(self) -> Iterator[list]:
        records: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []

        def record(layer, inputs, output):
            records.append((layer, inputs[0].detach(), output))

        handles = [layer.register_forward_hook(record) for layer in self.layers]
        try:
            yield records
        finally:
            for handle in handles:
                handle.remove()

    def clipped_sum(
        self,
        batch: Tensors,
        loss_fn: Callable[[Tensors], tuple[torch.Tensor, Distribution | None]],
        max_norm: float,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Sum over cells of the clipped per-cell gradients, and the norms before / after.

        Parameters
        ----------
        batch
            A minibatch (one row per cell).
        loss_fn
            Returns the per-cell losses of ``batch`` (one forward pass, randomness included)
            and the count likelihood whose ``theta`` carries the dispersion, or ``None``.
        max_norm
            Clipping norm ``C``; cell ``i`` is scaled by ``min(1, C / (||g_i|| + 1e-6))``
            (Opacus' rule).
        """
        with torch.enable_grad(), self._recording() as records:
            per_cell, px = loss_fn(batch)
        if per_cell.dim() != 1:
            raise RuntimeError(f"Expected one loss per cell, got shape {tuple(per_cell.shape)}.")
        squared = self.squared_norms(per_cell, records, px, batch[REGISTRY_KEYS.X_KEY])
        norms = squared.clamp_min(0).sqrt().detach()
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        names = list(self.params)
        with torch.enable_grad():
            grads = torch.autograd.grad(
                (factor * per_cell).sum(), [self.params[n] for n in names], allow_unused=True
            )
        total = {
            n: torch.zeros_like(self.params[n]) if g is None else g.detach()
            for n, g in zip(names, grads)
        }
        return total, norms, norms * factor

    def squared_norms(
        self,
        per_cell: torch.Tensor,
        records: list,
        px: Distribution | None,
        x: torch.Tensor,
    ) -> torch.Tensor:
        """Every cell's squared gradient norm over all trainable parameters (graph kept)."""
        outputs = [out for _, _, out in records]
        with torch.enable_grad():
            grads = torch.autograd.grad(
                per_cell.sum(), outputs, retain_graph=True, allow_unused=True
            )
        squared = torch.zeros_like(per_cell).detach()
        seen: set[torch.nn.Module] = set()
        for (layer, a, _), g in zip(records, grads):
            refuse_reuse(layer, seen, self.layers[layer], _SUPPORTED)
            if g is not None:
                squared += self._layer_squares(layer, a, g.detach())
        if self.others:
            squared += self._other_squares(per_cell, px, x)
        return squared

    def _layer_squares(self, layer: torch.nn.Module, a: torch.Tensor, g: torch.Tensor):
        if a.dim() != 2:
            raise RuntimeError(
                f"Layer {self.layers[layer] or type(layer).__name__} got a {a.dim()}-d input; "
                f"ghost clipping needs one row per cell. {_SUPPORTED}"
            )
        prefix = self.layers[layer]
        g2 = g.pow(2).sum(1)
        out = torch.zeros_like(g2)
        if prefix + "weight" in self.params:
            if isinstance(layer, torch.nn.Linear):
                out += g2 * a.pow(2).sum(1)
            else:
                normalised = torch.nn.functional.layer_norm(
                    a, layer.normalized_shape, eps=layer.eps
                )
                out += (g * normalised).pow(2).sum(1)
        if prefix + "bias" in self.params:
            out += g2
        return out

    def _other_squares(self, per_cell, px, x: torch.Tensor) -> torch.Tensor:
        """Squared per-cell gradient norms of parameters outside hooked layers.

        Through the dispersion ``theta`` when the per-cell gradients that path gives sum to the
        batch gradient (scVI's ``px_r``); otherwise one backward per cell, batched.
        """
        names = list(self.others)
        params = [self.others[n] for n in names]
        with torch.enable_grad():
            via_theta = _dispersion_gradients(px, x, params)
            if via_theta is not None:
                batch = torch.autograd.grad(
                    per_cell.sum(), params, retain_graph=True, allow_unused=True
                )
                if all(_sums_to(g, b) for g, b in zip(via_theta, batch)):
                    return sum(g.flatten(1).pow(2).sum(1) for g in via_theta)
            squared = torch.zeros_like(per_cell).detach()
            eye = torch.eye(per_cell.shape[0], dtype=per_cell.dtype, device=per_cell.device)
            for rows, start in zip(eye.split(32), range(0, per_cell.shape[0], 32)):
                grads = torch.autograd.grad(
                    per_cell, params, grad_outputs=rows, is_grads_batched=True,
                    retain_graph=True, allow_unused=True,
                )  # fmt: skip
                for g in grads:
                    if g is not None:
                        squared[start : start + rows.shape[0]] += g.flatten(1).pow(2).sum(1)
        return squared


def _dispersion_gradients(px, x: torch.Tensor, params: list) -> list[torch.Tensor] | None:
    """Per-cell gradients (``[n_cells, *shape]``) of ``params`` through ``px.theta``, or None."""
    found = likelihood_theta_gradient(px, x)
    if found is None:
        return None
    theta, theta_cells, d_theta = found
    per_cell = [[] for _ in params]
    for grads in _per_cell_chain(theta, theta_cells, params, d_theta, chunk=64):
        for k, g in enumerate(grads):
            shape = (d_theta.shape[0] if g is None else g.shape[0], *params[k].shape)
            per_cell[k].append(torch.zeros(shape, device=x.device) if g is None else g)
    return [torch.cat(parts).detach() for parts in per_cell]


def _sums_to(per_cell: torch.Tensor, batch: torch.Tensor | None) -> bool:
    reference = torch.zeros_like(per_cell[0]) if batch is None else batch
    total = per_cell.sum(0)
    return bool(
        torch.allclose(total, reference, rtol=1e-3, atol=1e-5 * float(reference.abs().max()))
    )


__all__ = ["GhostClipper"]
