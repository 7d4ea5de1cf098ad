"""Fisher scrubbing (Golatkar et al. 2020) and Selective Synaptic Dampening (Foster et al. 2024).

Both start from the diagonal Fisher information of the per-cell loss: the mean over cells of
each cell's squared gradient, never the square of a minibatch gradient (which mixes cells and
underestimates the Fisher by the batch size).

Two ways to get it, which agree to float tolerance (``tests/train/test_plans.py``):

- ``method="hooks"`` (default): no per-sample gradient is materialised. For a linear layer
  ``y = W a + b`` applied once per cell, cell ``i``'s weight gradient is the outer product
  ``g_i a_i^T`` (``g_i = d loss_i / d y_i``), so the sum of its squares over cells is
  ``(G^2)^T (A^2)``: one matrix product of the squared output gradients and squared inputs
  (the identity BackPACK uses for its "second moment" extension). Batch norm (eval mode) and
  layer norm affine parameters follow the same way with the normalised input. Parameters
  outside such layers (scVI's gene dispersion ``px_r``) get per-cell gradients from one
  backward vectorised over cells (``is_grads_batched``), which only reaches the likelihood.
- ``method="functional"``: ``torch.func.vmap(grad(...))`` over every parameter, the
  reference (memory: batch size x number of parameters; slower; cannot trace models with
  categorical covariates, whose one-hot encoding branches on the data).
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any

import torch
from scvi import REGISTRY_KEYS
from torch.func import functional_call, grad, vmap

from scvi_unlearn.module import per_cell_loss_terms
from scvi_unlearn.module._loss import per_cell_loss_terms_and_likelihood
from scvi_unlearn.train._common import (
    Tensors,
    UnlearningTrainingPlan,
    eval_mode,
    gather_tensors,
    iter_chunks,
    n_cells,
)
from scvi_unlearn.train._epochs import FineTuneEpochs
from scvi_unlearn.train._method import (
    TRAINING_PARAMS,
    PlanMethod,
    UnlearningRun,
    register_method,
    sample_retained,
)
from scvi_unlearn.train._params import Param

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


FISHER_METHODS = ("hooks", "functional")


def diagonal_fisher(
    module: torch.nn.Module, batches: Iterable[Tensors], method: str = "hooks"
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the per-cell negative ELBO.

    ``F_j = mean_i (d loss_i / d theta_j)^2`` over all cells ``i`` of ``batches``, where
    ``loss_i`` is cell ``i``'s negative ELBO at the posterior mean in eval mode (the
    deterministic loss of :func:`~scvi_unlearn.module.per_cell_loss_terms`).

    Parameters
    ----------
    module
        An scVI ``VAE``.
    batches
        Minibatches of cells (tensor dicts, on the module's device).
    method
        ``"hooks"``: squared per-cell gradients summed without materialising them (layer
        hooks, see the module docstring); ``"functional"``: per-cell gradients from
        ``torch.func.vmap(torch.func.grad(...))``, the reference.

    Returns
    -------
    dict[str, torch.Tensor]
        Each parameter's Fisher diagonal, by parameter name, in the parameter's shape.
    """
    if method not in FISHER_METHODS:
        raise ValueError(f"Unknown Fisher method {method!r}; choose from {FISHER_METHODS}.")
    total: dict[str, torch.Tensor] = {
        k: torch.zeros_like(v) for k, v in trainable_parameters(module).items()
    }
    count = 0
    with eval_mode(module):
        if method == "hooks":
            layers = _HookedLayers(module)
            for batch in batches:
                layers.add_squared_gradients(batch, total)
                count += n_cells(batch)
        else:
            # Only the vmap path needs validation off (a process-wide torch setting, restored).
            with _no_distribution_validation():
                for batch in batches:
                    _add_functional_squared_gradients(module, batch, total)
                    count += n_cells(batch)
    if count == 0:
        raise ValueError("diagonal_fisher got no cells.")
    return {k: v / count for k, v in total.items()}


def _add_functional_squared_gradients(
    module: torch.nn.Module, batch: Tensors, total: dict[str, torch.Tensor]
) -> None:
    """``total[k] += sum_i (d loss_i / d theta_k)^2`` from per-cell gradients (torch.func)."""
    wrapper = _CellLoss(module)
    params = {f"vae.{k}": v.detach() for k, v in trainable_parameters(module).items()}

    def cell_loss(p: dict[str, torch.Tensor], cell: Tensors) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in cell.items()}
        return functional_call(wrapper, p, (one,)).sum()

    # randomness="same": the encoder draws a z sample that the posterior-mean loss ignores.
    per_cell_grad = vmap(grad(cell_loss), in_dims=(None, 0), randomness="same")
    try:
        grads = per_cell_grad(params, batch)
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
        raise RuntimeError(
            "diagonal_fisher(method='functional') cannot trace this model under vmap (scVI's "
            "one-hot encoding of categorical covariates branches on the data); use "
            "method='hooks'."
        ) from err
    for k, g in grads.items():
        total[k[len("vae.") :]] += g.pow(2).sum(0)


class _HookedLayers:
    """Sums of squared per-cell gradients of linear and normalisation layers, from hooks.

    Forward hooks record each layer's input and output; one backward of the summed loss gives
    every output's gradient ``G`` (row ``i`` is cell ``i``'s, since in eval mode no layer mixes
    cells); the squared per-cell weight gradients then sum to ``(G^2)^T (A^2)``.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.layers: dict[torch.nn.Module, str] = {}
        self.parameter_names: set[str] = set()
        for prefix, layer in module.named_modules():
            own = [n for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
            if not own or not _supported(layer):
                continue
            self.layers[layer] = f"{prefix}." if prefix else ""
            self.parameter_names.update(self.layers[layer] + n for n in own)
        self.others = {
            name: p
            for name, p in trainable_parameters(module).items()
            if name not in self.parameter_names
        }

    def add_squared_gradients(self, batch: Tensors, total: dict[str, torch.Tensor]) -> None:
        """One forward pass of ``batch``; add its cells' squared gradients to ``total``."""
        records: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []

        def record(layer, inputs, output):
            records.append((layer, inputs[0].detach(), output))

        handles = [layer.register_forward_hook(record) for layer in self.layers]
        try:
            with torch.enable_grad():
                terms, px = per_cell_loss_terms_and_likelihood(self.module, batch)
        finally:
            for handle in handles:
                handle.remove()
        per_cell = terms["neg_elbo"]
        with torch.enable_grad():
            outputs = [out for _, _, out in records]
            grads = torch.autograd.grad(
                per_cell.sum(), outputs, retain_graph=bool(self.others), allow_unused=True
            )
            if self.others:
                x = batch[REGISTRY_KEYS.X_KEY]
                if not self._add_dispersion_squares(px, x, per_cell, total):
                    self._add_other_squares(per_cell, total)
        seen: set[torch.nn.Module] = set()
        for (layer, a, _), g in zip(records, grads):
            # The squares of a sum of two uses are not the sum of their squares.
            refuse_reuse(layer, seen, self.layers[layer], "Use method='functional'.")
            if g is None:  # the layer's output does not reach the loss
                continue
            _add_layer_squares(layer, self.layers[layer], a, g.detach(), total)

    def _add_dispersion_squares(
        self, px, x: torch.Tensor, per_cell: torch.Tensor, total: dict, chunk: int = 64
    ) -> bool:
        """Per-cell gradients of parameters reached only through the dispersion ``theta``.

        scVI's ``px_r`` enters a cell's loss only through the likelihood's ``theta``. One
        backward of the likelihood with ``theta`` copied to one row per cell gives every cell's
        ``d loss_i / d theta_i``; the chain rule back to ``px_r`` is a batched backward through
        ``exp`` (and the covariate one-hot), cheap next to the likelihood. Checked on the fly:
        the per-cell gradients must sum to the batch gradient, else (a parameter reached
        another way) returns False and the general path runs.
        """
        found = likelihood_theta_gradient(px, x)
        if found is None:
            return False
        theta, theta_cells, d_theta = found
        names = list(self.others)
        params = [self.others[k] for k in names]
        squares = [torch.zeros_like(p) for p in params]
        sums = [torch.zeros_like(p) for p in params]
        for grads in _per_cell_chain(theta, theta_cells, params, d_theta, chunk):
            for k, g in enumerate(grads):
                if g is not None:
                    squares[k] += g.pow(2).sum(0)
                    sums[k] += g.sum(0)
        batch_grads = torch.autograd.grad(
            per_cell.sum(), params, retain_graph=True, allow_unused=True
        )
        for s, g in zip(sums, batch_grads):
            reference = torch.zeros_like(s) if g is None else g
            if not torch.allclose(
                s, reference, rtol=1e-3, atol=1e-5 * float(reference.abs().max())
            ):
                return False
        for name, square in zip(names, squares):
            total[name] += square.detach()
        return True

    def _add_other_squares(self, per_cell: torch.Tensor, total: dict, chunk: int = 32) -> None:
        """Parameters outside hooked layers: per-cell gradients from a batched backward.

        General but slow (the backward of every cell's loss, vectorised over rows of an
        identity matrix); scVI's dispersion takes :meth:`_add_dispersion_squares` instead.
        """
        params = [self.others[k] for k in self.others]
        eye = torch.eye(per_cell.shape[0], dtype=per_cell.dtype, device=per_cell.device)
        for rows in eye.split(chunk):
            grads = torch.autograd.grad(
                per_cell, params, grad_outputs=rows, is_grads_batched=True,
                retain_graph=True, allow_unused=True,
            )  # fmt: skip
            for name, g in zip(self.others, grads):
                if g is not None:
                    total[name] += g.detach().pow(2).sum(0)


def likelihood_theta_gradient(px, x: torch.Tensor):
    """``(theta, theta per cell, d loss_i / d theta_i)`` of a count likelihood, or None.

    One backward of the likelihood with ``theta`` copied to one row per cell (``mu`` and the
    zero-inflation logits detached) gives every cell's gradient with respect to its own
    dispersion; ``theta_cells`` stays in the graph, for chaining back to the parameters.
    """
    theta = getattr(px, "theta", None)
    if theta is None or not theta.requires_grad:
        return None
    theta_cells = theta.expand_as(x)  # in the graph: row i is cell i's dispersion
    leaf = theta_cells.detach().clone().requires_grad_(True)
    rows = copy.copy(px)
    rows.mu, rows.theta = px.mu.detach(), leaf
    if getattr(rows, "zi_logits", None) is not None:
        rows.zi_logits = px.zi_logits.detach()
    (d_theta,) = torch.autograd.grad(-rows.log_prob(x).sum(), leaf)
    return theta, theta_cells, d_theta


def refuse_reuse(layer: torch.nn.Module, seen: set, name: str, remedy: str) -> None:
    """Raise if ``layer`` already ran in this forward pass (its per-cell terms would mix)."""
    if layer in seen:
        raise RuntimeError(
            f"Layer {name or type(layer).__name__} ran twice in one forward pass; its per-cell "
            f"gradients cannot be split from hooks. {remedy}"
        )
    seen.add(layer)


def _per_cell_chain(theta, theta_cells, params, d_theta, chunk: int):
    """Per-cell gradients of ``params`` given each cell's ``d loss_i / d theta_i``.

    A gene-wise ``theta`` (scVI's default ``dispersion="gene"``) is shared by all cells: cell
    ``i``'s gradient with respect to it is row ``i`` of ``d_theta``, so one backward batched
    over the rows suffices. A per-cell ``theta`` (``"gene-batch"``, ``"gene-label"``) needs
    row ``i`` seeded alone, a chunk of cells at a time.
    """
    n_genes = d_theta.shape[-1]
    # scVI's distributions broadcast theta to (cells, genes): a stride-0 view of the gene row.
    shared = theta._base if theta._base is not None and theta.stride(0) == 0 else theta
    if shared.numel() == n_genes:
        yield torch.autograd.grad(
            shared, params, grad_outputs=d_theta.reshape(-1, *shared.shape),
            is_grads_batched=True, retain_graph=True, allow_unused=True,
        )  # fmt: skip
        return
    n = d_theta.shape[0]
    for start in range(0, n, chunk):
        cells = torch.arange(start, min(start + chunk, n), device=d_theta.device)
        seeds = torch.zeros((cells.numel(), *d_theta.shape), dtype=d_theta.dtype,
                            device=d_theta.device)  # fmt: skip
        seeds[torch.arange(cells.numel()), cells] = d_theta[cells]
        yield torch.autograd.grad(
            theta_cells, params, grad_outputs=seeds, is_grads_batched=True,
            retain_graph=True, allow_unused=True,
        )  # fmt: skip


def _supported(layer: torch.nn.Module) -> bool:
    if isinstance(layer, torch.nn.Linear):
        return True
    if isinstance(layer, torch.nn.BatchNorm1d):
        return layer.track_running_stats  # eval mode then uses running statistics only
    if isinstance(layer, torch.nn.LayerNorm):
        return len(layer.normalized_shape) == 1
    return False


def _add_layer_squares(
    layer: torch.nn.Module, prefix: str, a: torch.Tensor, g: torch.Tensor, total: dict
) -> None:
    if a.dim() != 2:
        # A 3-d input sums several positions' outer products per cell: no longer factorises.
        raise RuntimeError(
            f"Layer {prefix or type(layer).__name__} got a {a.dim()}-d input; the hook "
            "Fisher needs one row per cell. Use diagonal_fisher(..., method='functional')."
        )
    g2 = g.pow(2)
    if isinstance(layer, torch.nn.Linear):
        weight_term = g2.T @ a.pow(2)
    elif isinstance(layer, torch.nn.BatchNorm1d):
        normalised = (a - layer.running_mean) * torch.rsqrt(layer.running_var + layer.eps)
        weight_term = (g2 * normalised.pow(2)).sum(0)
    else:  # LayerNorm over the last dimension
        normalised = torch.nn.functional.layer_norm(a, layer.normalized_shape, eps=layer.eps)
        weight_term = (g2 * normalised.pow(2)).sum(0)
    for name, term in (("weight", weight_term), ("bias", g2.sum(0))):
        key = prefix + name
        if key in total and getattr(layer, name) is not None:
            total[key] += term


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

    1. the diagonal Fisher ``F_r`` of the retain loss is estimated from squared per-cell
       gradients on ``fisher_tensors`` (a subsample of retained cells), see
       :func:`diagonal_fisher`;
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
    fisher_method
        ``"hooks"`` (no per-cell gradients materialised) or ``"functional"`` (``torch.func``
        reference), see :func:`diagonal_fisher`.
    fisher_batch_size
        Cells per Fisher batch; by default 256 with hooks (memory: activations) and 16 with
        ``"functional"`` (memory: this many copies of the parameters' gradients).
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
        fisher_method: str = "hooks",
        fisher_batch_size: int | None = None,
        **kwargs: Any,
    ):
        if ssd and forget_tensors is None:
            raise ValueError("ssd=True needs the forget cells (`forget_tensors`).")
        if fisher_method not in FISHER_METHODS:
            raise ValueError(
                f"Unknown fisher_method {fisher_method!r}; choose from {FISHER_METHODS}."
            )
        super().__init__(
            module, held={"fisher": fisher_tensors, "forget": forget_tensors}, **kwargs
        )
        self.alpha, self.eps, self.max_std = float(alpha), float(eps), float(max_std)
        self.ssd = bool(ssd)
        self.selection_weight, self.dampening = float(selection_weight), float(dampening)
        self.fisher_method = fisher_method
        if fisher_batch_size is None:
            fisher_batch_size = 256 if fisher_method == "hooks" else 16
        self.fisher_batch_size = int(fisher_batch_size)

    def edit_weights(self) -> dict[str, Any]:
        """Scrub the module (once, before any fine-tuning epoch)."""
        return self.scrub()

    def scrub(self) -> dict[str, Any]:
        """Estimate the Fisher(s) and modify the parameters; return a summary."""
        fisher_r = diagonal_fisher(
            self.module,
            iter_chunks(self.held["fisher"], self.fisher_batch_size),
            self.fisher_method,
        )
        summary: dict[str, Any] = {
            "n_fisher_cells": n_cells(self.held["fisher"]),
            "fisher_method": self.fisher_method,
        }
        if self.ssd:
            fisher_f = diagonal_fisher(
                self.module,
                iter_chunks(self.held["forget"], self.fisher_batch_size),
                self.fisher_method,
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


# -- the methods -------------------------------------------------------------------------------
_FISHER_PARAMS = {
    "alpha": Param(kind="float", low=0, doc="scale of the Golatkar noise"),
    "eps": Param(kind="float", low=0, low_open=True),
    "max_std": Param(kind="float", low=0, low_open=True),
    "n_fisher_cells": Param(1024, "int", low=1),
    "fisher_method": Param(kind="str", doc="'hooks' (default) or 'functional' (reference)"),
    "fisher_batch_size": Param(kind="int", low=1, allow_none=True),
    "finetune_epochs": Param(0, "int", low=0),
    "ssd": Param(kind="bool"),
    "selection_weight": Param(kind="float", low=0, low_open=True),
    "dampening": Param(kind="float", low=0, low_open=True),
}


@register_method
class Fisher(PlanMethod):
    """Golatkar et al.'s Fisher scrubbing on retained cells, optionally with SSD dampening."""

    name = "fisher"
    description = "Golatkar Fisher scrubbing (+ optional SSD and retain fine-tune)"
    plan = FisherScrubbingPlan
    params = {**TRAINING_PARAMS, **_FISHER_PARAMS}
    epochs = FineTuneEpochs()

    def plan_inputs(self, run: UnlearningRun) -> dict[str, Any]:
        """The Fisher cells (a sample of retained cells) and, for SSD, the forget cells."""
        hp = run.hyperparameters
        fisher_cells = sample_retained(run, hp["n_fisher_cells"])
        forget = gather_tensors(run.model, run.forget) if self.dampens(hp) else None
        return {
            "fisher_tensors": gather_tensors(run.model, fisher_cells),
            "forget_tensors": forget,
            "ssd": self.dampens(hp),
        }

    def dampens(self, hyperparameters: dict[str, Any]) -> bool:
        """Whether the run applies Selective Synaptic Dampening."""
        return bool(hyperparameters["ssd"])

    def summary(self, plan) -> dict[str, Any]:
        """The plan's edit summary (noise scale, dampened share)."""
        return dict(plan.edit_summary_ or {})


@register_method
class SSD(Fisher):
    """Selective Synaptic Dampening: Fisher-selected weights dampened, no noise by default."""

    name = "ssd"
    description = "Selective Synaptic Dampening (Foster et al. 2024)"
    params = {
        **TRAINING_PARAMS,
        **{k: v for k, v in _FISHER_PARAMS.items() if k != "ssd"},
        # Method-level default: SSD dampens and adds no Golatkar noise unless asked.
        "alpha": Param(0.0, "float", low=0),
    }

    def dampens(self, hyperparameters: dict[str, Any]) -> bool:
        """Always."""
        return True
