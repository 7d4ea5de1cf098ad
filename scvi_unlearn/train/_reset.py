"""Damage, then relearn: saliency-guided partial reset followed by retain fine-tuning.

The family that won the NeurIPS 2023 unlearning competition (see :ref:`methods-unlearning`):
re-initialise the weights that matter most to the forget cells relative to the retained ones,
plus a random share, then relearn on retained cells only. Whatever the forget cells wrote into
the reset weights is gone; relearning from retained cells cannot write it back.
"""

from __future__ import annotations

import copy
import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scvi import REGISTRY_KEYS

from scvi_unlearn.module import per_cell_loss_terms
from scvi_unlearn.train._common import (
    UnlearningTrainingPlan,
    eval_mode,
    gather_tensors,
    iter_chunks,
    n_cells,
)
from scvi_unlearn.train._epochs import RecipeShare
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

    from scvi_unlearn.train._common import Tensors


def mean_loss_gradients(module: torch.nn.Module, chunks: Iterable[Tensors]) -> dict:
    """Gradient of the mean per-cell negative ELBO (posterior mean, eval mode) over chunks."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    with eval_mode(module), torch.enable_grad():
        for chunk in chunks:
            loss = per_cell_loss_terms(module, chunk)["neg_elbo"].sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    total[name] += g.detach()
            count += n_cells(chunk)
    return {n: g / max(count, 1) for n, g in total.items()}


def saliency_scores(forget_grads: dict, retain_grads: dict, eps: float = 1e-8) -> dict:
    """Per weight ``|grad forget| / (|grad retain| + eps)``: forget-specific importance."""
    return {n: g.abs() / (retain_grads[n].abs() + eps) for n, g in forget_grads.items()}


def reset_masks(
    saliency: dict, fraction: float, random_fraction: float, generator: torch.Generator
) -> dict:
    """Per tensor: its top ``fraction`` by saliency plus ``random_fraction`` drawn from the rest.

    Counts are ``round(fraction * n)`` and ``round(random_fraction * n)`` (capped by what is
    left), so every tensor loses the same share.
    """
    masks = {}
    for name, score in saliency.items():
        flat = score.flatten()
        n = flat.numel()
        n_top = min(round(fraction * n), n)
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        if n_top:
            mask[torch.topk(flat, n_top).indices] = True
        rest = torch.nonzero(~mask).flatten().cpu()
        n_random = min(round(random_fraction * n), rest.numel())
        if n_random:
            pick = rest[torch.randperm(rest.numel(), generator=generator)[:n_random]]
            mask[pick.to(flat.device)] = True
        masks[name] = mask.view_as(score)
    return masks


def covariate_masks(module: torch.nn.Module, batches: Iterable[int]) -> dict:
    """Masks of the weights that read the given batch categories (e.g. a forgotten donor).

    scVI feeds the batch to its layers as a one-hot block appended to each injected layer's
    input (after any continuous covariates), so category ``b`` owns input column
    ``in_features - sum(n_cat_list) + b`` of every covariate-injected linear layer (the batch is
    the first categorical of every ``FCLayers`` the VAE builds). With
    ``dispersion="gene-batch"`` it also owns column ``b`` of ``px_r``. Relearning on retained
    cells never sends a gradient into these weights, so whatever the forgotten batch wrote
    there would survive every other step: they must be reset.
    """
    batches = sorted({int(b) for b in batches})
    if not batches:
        return {}
    names = {id(p): n for n, p in module.named_parameters()}
    masks = {}
    for layer in module.modules():
        n_cat_list = getattr(layer, "n_cat_list", None)
        blocks = getattr(layer, "fc_layers", None)
        if not n_cat_list or blocks is None or n_cat_list[0] <= max(batches):
            continue
        for i, block in enumerate(blocks):
            if not layer.inject_into_layer(i):
                continue
            linear = block[0]
            first = linear.in_features - sum(n_cat_list)
            mask = torch.zeros_like(linear.weight, dtype=torch.bool)
            mask[:, [first + b for b in batches]] = True
            masks[names[id(linear.weight)]] = mask
    if getattr(module, "dispersion", None) == "gene-batch" and hasattr(module, "px_r"):
        mask = torch.zeros_like(module.px_r, dtype=torch.bool)
        mask[:, batches] = True
        masks[names[id(module.px_r)]] = mask
    return masks


def reset_parameters_(module: torch.nn.Module, masks: dict, seed: int) -> int:
    """Re-initialise the masked entries and reset batch-norm statistics.

    Each entry gets a fresh draw from its layer's own initialiser (``reset_parameters``);
    parameters no layer initialises, such as scVI's gene dispersions ``px_r``, get a standard
    normal draw, as scVI initialises them. Returns the number of reset weights.
    """
    fresh = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        owned = set()
        for prefix, layer in fresh.named_modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
                owned |= {f"{prefix}.{n}" if prefix else n for n, _ in layer.named_parameters()}
        with torch.no_grad():
            for name, param in fresh.named_parameters():
                if name not in owned:
                    param.normal_()
    new = dict(fresh.named_parameters())
    n_reset = 0
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in masks:
                mask = masks[name]
                param[mask] = new[name][mask]
                n_reset += int(mask.sum())
        for layer in module.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.reset_running_stats()
    return n_reset


def request_seed(seed: int, forget_names: list[str]) -> int:
    """A seed for this request: the run's seed and which cells are forgotten.

    The same request with the same seed resets the same weights; another request draws anew.
    """
    digest = hashlib.sha256(("\n".join(forget_names) + f"\n{seed}").encode()).hexdigest()
    return int(digest[:8], 16)


class ResetRelearnPlan(UnlearningTrainingPlan):
    """Saliency-guided partial reset of the VAE, then retain fine-tuning at a pinned KL weight.

    When the fit starts: gradients of the mean forget and retain-sample negative ELBO give the
    saliency ``|g_f| / (|g_r| + eps)`` of every weight; in each tensor the top
    ``reset_fraction`` plus ``random_fraction`` of the rest are re-initialised with the
    layer's own initialiser, and batch-norm running statistics are reset. The epochs that
    follow train on retained cells only (a fresh optimizer: no state carries over).

    Parameters
    ----------
    module
        The scVI ``VAE`` (a copy of the trained one; modified in place).
    forget_tensors, retain_tensors
        Forget cells and a sample of retained cells for the saliency.
    reset_fraction, random_fraction
        Shares of each tensor reset by saliency and at random.
    eps
        Floor of the retain gradient in the saliency ratio.
    reset_seed
        Seed of the random share and of the re-initialisation.
    reset_batches
        Batch codes whose every cell is forgotten (a donor or batch request): the weights
        that read them are reset too (:func:`covariate_masks`).
    chunk_size
        Cells per gradient pass.
    **kwargs
        Passed to :class:`~scvi_unlearn.train.UnlearningTrainingPlan`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        forget_tensors: Tensors,
        retain_tensors: Tensors,
        *,
        reset_fraction: float = 0.3,
        random_fraction: float = 0.05,
        eps: float = 1e-8,
        reset_seed: int = 0,
        reset_batches: Iterable[int] = (),
        chunk_size: int = 512,
        **kwargs: Any,
    ):
        super().__init__(
            module, held={"forget": forget_tensors, "retain": retain_tensors}, **kwargs
        )
        self.reset_fraction = float(reset_fraction)
        self.random_fraction = float(random_fraction)
        self.eps = float(eps)
        self.reset_seed = int(reset_seed)
        self.reset_batches = sorted({int(b) for b in reset_batches})
        self.chunk_size = int(chunk_size)

    def edit_weights(self) -> dict[str, Any]:
        """Reset the chosen weights (once, before relearning)."""
        return self.reset()

    def reset(self) -> dict[str, Any]:
        """Compute the saliency, reset the chosen weights; return a summary."""
        g_f = mean_loss_gradients(self.module, iter_chunks(self.held["forget"], self.chunk_size))
        g_r = mean_loss_gradients(self.module, iter_chunks(self.held["retain"], self.chunk_size))
        generator = torch.Generator().manual_seed(self.reset_seed)
        masks = reset_masks(
            saliency_scores(g_f, g_r, self.eps),
            self.reset_fraction,
            self.random_fraction,
            generator,
        )
        covariates = covariate_masks(self.module, self.reset_batches)
        n_covariate = sum(int(m.sum()) for m in covariates.values())
        for name, mask in covariates.items():
            masks[name] = masks[name] | mask
        n_reset = reset_parameters_(self.module, masks, self.reset_seed)
        n_total = sum(int(m.numel()) for m in masks.values())
        return {
            "n_reset": n_reset,
            "n_parameters": n_total,
            "share_reset": n_reset / max(n_total, 1),
            "reset_seed": self.reset_seed,
            "reset_batches": self.reset_batches,
            "n_batch_weights_reset": n_covariate,
        }


# -- the method --------------------------------------------------------------------------------
@register_method
class ResetRelearn(PlanMethod):
    """Reset the weights most salient to the forget cells, then relearn on the retained cells."""

    name = "reset_relearn"
    description = "saliency-guided partial reset, then relearning on retained cells"
    plan = ResetRelearnPlan
    params = {
        **TRAINING_PARAMS,
        "reset_fraction": Param(kind="float", low=0, high=1, doc="top share by saliency"),
        "random_fraction": Param(kind="float", low=0, high=1, doc="random share"),
        "eps": Param(kind="float", low=0, low_open=True),
        "n_saliency_cells": Param(1024, "int", low=1, doc="retained cells for saliency"),
        "relearn_budget": Param(
            0.15, "float", low=0, high=1, low_open=True, doc="share of the recipe's epochs"
        ),
    }
    epochs = RecipeShare("relearn_budget")

    def plan_inputs(self, run: UnlearningRun) -> dict[str, Any]:
        """Forget cells, a retained sample, the request's reset seed and forgotten batches."""
        retain_sample = sample_retained(run, run.hyperparameters["n_saliency_cells"])
        forget_names = run.model.adata.obs_names[run.forget].tolist()
        return {
            "forget_tensors": gather_tensors(run.model, run.forget),
            "retain_tensors": gather_tensors(run.model, retain_sample),
            "reset_seed": request_seed(run.seed, forget_names),
            "reset_batches": forgotten_batches(run),
        }

    def run(self, run: UnlearningRun) -> dict[str, Any]:
        """The plan's run, with the names of the batches whose columns were reset."""
        summary = super().run(run)
        if summary.get("reset_batches"):
            mapping = run.model.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY)
            names = list(mapping.categorical_mapping)
            summary["reset_batch_names"] = [str(names[b]) for b in summary["reset_batches"]]
        return summary

    def summary(self, plan) -> dict[str, Any]:
        """The plan's edit summary (reset shares, reset batches)."""
        return dict(plan.edit_summary_ or {})


def forgotten_batches(run: UnlearningRun) -> list[int]:
    """Batch codes none of whose cells the model keeps (a whole donor or batch forgotten)."""
    if REGISTRY_KEYS.BATCH_KEY not in run.model.adata_manager.data_registry:
        return []
    codes = np.asarray(run.model.adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY))
    codes = codes.reshape(-1)
    kept = np.union1d(run.retain, run.validation).astype(np.int64)
    return sorted(set(codes[run.forget].tolist()) - set(codes[kept].tolist()))
