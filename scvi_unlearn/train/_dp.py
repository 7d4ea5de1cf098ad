"""Differentially private training of scVI: DP-SGD (Abadi et al. 2016) with Opacus accounting.

A model trained with DP-SGD needs no unlearning to hide any one cell: whatever a single cell
changes in the weights is bounded by the privacy budget ``(epsilon, delta)``. Each step

1. draws a **Poisson** minibatch: every training cell joins independently with probability
   ``sample_rate`` (Opacus' :class:`~opacus.utils.uniform_sampler.UniformWithReplacementSampler`
   over scvi-tools' own AnnData dataset, see :class:`PoissonDataSplitter`); a batch may be
   empty, which is then a noise-only step;
2. computes every cell's gradient norm of its own negative ELBO without the gradients
   themselves ("ghost clipping": hooks and two backward passes of the batch,
   :mod:`scvi_unlearn.train._ghost`); the tests check it against every cell's own gradient
   from ``torch.func`` (``tests/train/_vmap_reference.py``, which patches torch to trace scVI
   and so stays out of the package);
3. clips each cell's gradient to L2 norm ``max_grad_norm`` (one flat norm over all trainable
   parameters), sums them, adds ``noise_multiplier * max_grad_norm * N(0, I)``, divides by the
   *expected* batch size ``sample_rate * n_train`` and takes scVI's Adam step;
4. steps an Opacus accountant (RDP by default, or PRV) with ``(noise_multiplier,
   sample_rate)``.

The privacy unit is **one cell** (one row of the AnnData) by default. A donor contributing
``k`` cells is then protected only at the group level, roughly ``k`` times the budget. With
``privacy_unit="donor"`` the unit is the donor (user-level DP-SGD): steps sample donors, clip
each donor's summed contribution and account over donors (:class:`DonorDPTrainingPlan`).

The plan runs under scvi-tools' :class:`~scvi.train.TrainRunner` like every plan of this
package (:func:`~scvi_unlearn.train._common.run_plan`); :func:`train_dp` is the entry point.
Batch norm mixes the cells of a minibatch (per-cell gradients stop being per cell, and its
running statistics are an unprotected release), so models must be built with
``use_batch_norm="none", use_layer_norm="both"``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scvi.dataloaders import DataSplitter
from scvi.train import TrainingPlan
from torch.utils.data import DataLoader

from scvi_unlearn._compat import max_epochs_heuristic, unregister_anndata, validate_anndata
from scvi_unlearn._utils import dump_json, first_names
from scvi_unlearn._validation import as_cell_indices
from scvi_unlearn.audit._one_run import (
    DEFAULT_CANARY_GENES,
    DEFAULT_CONFIDENCE,
    OneRunAudit,
    guess_and_count,
    make_canaries,
    one_run_epsilon,
    with_canaries,
)
from scvi_unlearn.module._loss import per_cell_loss_terms_and_likelihood
from scvi_unlearn.train._common import (
    gather_tensors,
    last_kl_weight,
    loss_scores,
    make_data_splitter,
    n_cells,
    run_plan,
    seed_everything,
)
from scvi_unlearn.train._ghost import GhostClipper

if TYPE_CHECKING:
    from scvi.model import SCVI

    from scvi_unlearn._validation import IndexLike
    from scvi_unlearn.train._common import Tensors

#: Accounting mechanisms of Opacus that :func:`train_dp` accepts.
ACCOUNTANTS = ("rdp", "prv")
#: Per-cell losses :class:`DPTrainingPlan` can privatise.
PER_CELL_LOSSES = ("elbo", "posterior_mean")
#: How :class:`DPTrainingPlan` gets per-cell gradient norms: hooks ("ghost clipping").
GRAD_SAMPLE_MODES = ("ghost",)
#: Default delta as a share of ``1 / n_train``: a delta of ``1 / n`` would certify a mechanism
#: that publishes one random cell outright, so the default is ten times smaller.
DEFAULT_DELTA_SHARE = 0.1
#: What one unit of privacy is: one cell (one row), or one donor (all of a donor's cells).
PRIVACY_UNITS = ("cell", "donor")
#: Default number of a sampled donor's cells that enter one donor-level DP-SGD step.
DEFAULT_CELLS_PER_DONOR = 32
#: Key under which the donor-level loader passes each row's donor code to the plan.
DONOR_CODE_KEY = "_dp_donor_code"
#: File that ``save_privacy`` writes beside a saved model.
PRIVACY_FILE = "dp_privacy.json"
_INSTALL_HINT = 'pip install "scvi-unlearn[dp]"'
_BATCH_NORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
)


# -- checks ---------------------------------------------------------------------------------------
def require_opacus():
    """Import Opacus, or raise an ImportError that says how to install it.

    Raises
    ------
    ImportError
        If Opacus is not installed.
    """
    try:
        import opacus
        import opacus.accountants
    except ImportError as err:
        raise ImportError(
            "Differentially private training needs Opacus, which is not installed: "
            f"{_INSTALL_HINT} (or pip install 'opacus>=1.5')."
        ) from err
    return opacus


def check_no_batch_norm(module: torch.nn.Module) -> None:
    """Raise if ``module`` has a batch-norm layer, which per-cell privacy cannot allow.

    Raises
    ------
    ValueError
        Naming the layers and the fix (``use_batch_norm="none", use_layer_norm="both"``).
    """
    names = [name for name, layer in module.named_modules() if isinstance(layer, _BATCH_NORMS)]
    if names:
        raise ValueError(
            f"The model has batch-norm layers ({first_names(names)}). Batch norm mixes the "
            "cells of a minibatch, so per-cell gradients (and their clipping) no longer bound "
            "any one cell's influence, and its running statistics are released unprotected. "
            'Build the model with `use_batch_norm="none", use_layer_norm="both"`, e.g. '
            '`SCVI(adata, use_batch_norm="none", use_layer_norm="both")`.'
        )


def check_grad_sample_mode(grad_sample_mode: str, kwargs: dict[str, Any] | None = None) -> None:
    """Raise for a per-cell gradient mode other than ``"ghost"``, or a ``chunk_size``.

    ``"vmap"`` (every cell's gradient by ``torch.func``) and its ``chunk_size`` are no longer
    part of the package: tracing scVI under ``vmap`` needed torch and scvi-tools patched at run
    time, which is not thread-safe. Ghost clipping gives the same clipped sums; the ``vmap``
    computation is kept as the tests' reference.

    Parameters
    ----------
    grad_sample_mode
        The mode asked for.
    kwargs
        Other keyword arguments of the call, checked for ``chunk_size`` (which would otherwise
        travel on to scvi-tools' plan or Lightning's trainer and fail far from here).

    Raises
    ------
    ValueError
        For ``"vmap"`` or any other unknown mode, and for a ``chunk_size``.
    """
    removed = (
        "per-cell gradients by torch.func were removed from scvi-unlearn (tracing scVI needed "
        "torch and scvi-tools patched at run time); ghost clipping (grad_sample_mode='ghost', "
        "the default) gives the same clipped sums"
    )
    if grad_sample_mode == "vmap":
        raise ValueError(f"grad_sample_mode='vmap' is no longer available: {removed}.")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"Unknown grad_sample_mode {grad_sample_mode!r}; choose from {GRAD_SAMPLE_MODES}."
        )
    if kwargs and "chunk_size" in kwargs:
        raise ValueError(
            f"`chunk_size` (cells per torch.func call) is no longer accepted: {removed}, "
            "without chunks. Drop the argument."
        )


def _check_positive(name: str, value: float | None, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number, got {value!r}.") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")
    return value


def check_privacy_arguments(
    *,
    target_epsilon: float | None,
    target_delta: float,
    noise_multiplier: float | None,
    max_grad_norm: float,
    sample_rate: float,
    accountant: str,
) -> None:
    """Validate DP-SGD settings; raise with a message naming the bad one.

    Parameters
    ----------
    target_epsilon, target_delta
        The budget (``target_epsilon > 0`` or ``None``; ``0 < target_delta < 1``).
    noise_multiplier
        The noise multiplier (``>= 0``) or ``None``; exactly one of it and ``target_epsilon``.
    max_grad_norm
        Per-cell clipping norm (``> 0``).
    sample_rate
        Poisson inclusion probability of each cell (``0 < sample_rate <= 1``).
    accountant
        One of :data:`ACCOUNTANTS`.

    Raises
    ------
    ValueError, TypeError
        For a missing, contradictory or out-of-range setting.
    """
    if target_epsilon is None and noise_multiplier is None:
        raise ValueError(
            "Give a privacy budget `target_epsilon` (the noise multiplier is then found for "
            "it) or a `noise_multiplier` (the spent epsilon is then reported)."
        )
    if target_epsilon is not None and noise_multiplier is not None:
        raise ValueError("Give `target_epsilon` or `noise_multiplier`, not both.")
    if target_epsilon is not None:
        _check_positive("target_epsilon", target_epsilon)
    if noise_multiplier is not None:
        _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    delta = _check_positive("target_delta", target_delta, allow_zero=True)
    if not 0 < delta < 1:
        raise ValueError(f"`target_delta` must lie in (0, 1), got {target_delta!r}.")
    _check_positive("max_grad_norm", max_grad_norm)
    rate = _check_positive("sample_rate", sample_rate, allow_zero=True)
    if not 0 < rate <= 1:
        raise ValueError(f"`sample_rate` must lie in (0, 1], got {sample_rate!r}.")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"Unknown accountant {accountant!r}; choose from {ACCOUNTANTS}.")


def privacy_spent(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of ``steps`` DP-SGD steps at ``(noise_multiplier, sample_rate)``, by Opacus.

    ``inf`` without noise (``noise_multiplier == 0``) and ``0`` before any step.

    Parameters
    ----------
    noise_multiplier, sample_rate, steps
        The mechanism and how often it ran.
    delta
        The delta at which epsilon is reported.
    accountant
        ``"rdp"`` or ``"prv"``.
    """
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    require_opacus()
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=float(delta)))


# -- Poisson sampling -----------------------------------------------------------------------------
class PoissonDataSplitter(DataSplitter):
    """scvi-tools' :class:`~scvi.dataloaders.DataSplitter` with Poisson-sampled training batches.

    Validation and test loaders are scvi-tools' own. The training loader draws each batch with
    Opacus' ``UniformWithReplacementSampler``: every training cell joins independently with
    probability ``sample_rate`` (batches vary in size, may be empty), ``steps_per_epoch``
    batches an epoch, drawn from a generator seeded with ``seed``. Batches are fetched from
    scvi-tools' AnnData dataset in one indexing call, as its ``AnnDataLoader`` does.

    Parameters
    ----------
    adata_manager
        The model's AnnData manager.
    external_indexing
        ``[train, validation, test]`` positions (see :func:`from_model`).
    sample_rate
        Inclusion probability of each training cell in each batch.
    steps_per_epoch
        Batches per epoch.
    seed
        Seed of the sampler's generator.
    **kwargs
        Passed to :class:`~scvi.dataloaders.DataSplitter` (``batch_size`` of validation).
    """

    def __init__(
        self,
        adata_manager,
        external_indexing: list[np.ndarray],
        *,
        sample_rate: float,
        steps_per_epoch: int,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(adata_manager, external_indexing=external_indexing, **kwargs)
        self.sample_rate = float(sample_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.seed = int(seed)
        self._generator: torch.Generator | None = None

    @classmethod
    def from_model(
        cls,
        model: SCVI,
        train_idx: np.ndarray,
        val_idx: np.ndarray | None,
        *,
        sample_rate: float,
        steps_per_epoch: int,
        seed: int = 0,
        batch_size: int = 128,
    ) -> PoissonDataSplitter:
        """The splitter over ``model``'s AnnData with fixed cells (via ``make_data_splitter``)."""
        base = make_data_splitter(model, train_idx, val_idx, batch_size=batch_size)
        return cls(
            model.adata_manager,
            base.external_indexing,
            sample_rate=sample_rate,
            steps_per_epoch=steps_per_epoch,
            seed=seed,
            batch_size=batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        """Poisson batches of the training cells (one generator across epochs)."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        dataset = self.adata_manager.create_torch_dataset(
            indices=self.train_idx, load_sparse_tensor=self.load_sparse_tensor
        )
        sampler = UniformWithReplacementSampler(
            num_samples=len(self.train_idx),
            sample_rate=self.sample_rate,
            generator=self._generator,
            steps=self.steps_per_epoch,
        )
        # batch_size=None: the sampler yields whole batches, fetched with one __getitem__.
        return DataLoader(
            dataset, sampler=sampler, batch_size=None, pin_memory=self.pin_memory, num_workers=0
        )


# -- the plan -------------------------------------------------------------------------------------
class DPTrainingPlan(TrainingPlan):
    """scVI's :class:`~scvi.train.TrainingPlan` trained with DP-SGD (manual optimisation).

    Each training step privatises the gradient of the batch's per-cell losses (see the
    module docstring): per-cell gradient norms from hooks (ghost clipping), flat L2 clipping
    to ``max_grad_norm``, their sum plus ``noise_multiplier * max_grad_norm * N(0, I)``
    divided by the expected batch size ``sample_rate * n_train``, then scVI's optimizer (Adam)
    steps and the accountant records one step of ``(noise_multiplier, sample_rate)``.

    The per-cell loss (``per_cell_loss``):

    - ``"elbo"`` (default): scVI's own training loss for one cell, ``VAE.loss`` before its
      batch mean (reconstruction at a sampled ``z`` plus ``kl_weight`` times the KL, dropout
      on), each cell with its own latent sample and dropout mask. It is the loss scVI trains,
      so a DP model is an scVI model trained by a noisier optimiser: the encoder's variance
      keeps learning through the reconstruction term.
    - ``"posterior_mean"``: the deterministic loss of
      :func:`~scvi_unlearn.module.per_cell_loss_terms` (reconstruction at the posterior mean
      plus ``kl_weight`` times the KL), lower-variance but blind to the encoder's variance
      (which then only feels the KL); for checks and experiments.

    Nothing about the training cells is logged: a training loss in the history would be a
    release outside the privacy guarantee. Validation metrics are scVI's, on the validation
    cells, which the guarantee does not cover (they are not trained on; use ``train_size=1.0``
    when they must stay private too). ``kl_weight`` follows scVI's warm-up (data-independent).
    Only the training steps are private: what the model computes from the data outside them
    (with ``use_observed_lib_size=False``, scVI's library-size prior from all cells; the gene
    and category names of the registry) is not covered. One device only.

    Parameters
    ----------
    module
        An scVI ``VAE`` without batch norm (updated in place).
    noise_multiplier
        Standard deviation of the Gaussian noise in units of ``max_grad_norm``.
    max_grad_norm
        Per-cell clipping norm ``C``.
    sample_rate
        Poisson inclusion probability of each training cell.
    n_train
        Number of training cells (expected batch size ``sample_rate * n_train``).
    accountant
        Opacus accountant, ``"rdp"`` or ``"prv"``.
    seed
        Seed of the Gaussian noise (drawn on the training device).
    per_cell_loss
        ``"elbo"`` or ``"posterior_mean"``, see above.
    grad_sample_mode
        ``"ghost"``, the only mode: each cell's gradient norm from forward hooks and one
        backward of the batch, then one backward of the clip-weighted losses gives the clipped
        sum (``GhostClipper`` in ``scvi_unlearn/train/_ghost.py``); no per-cell gradient is
        stored. The tests check it against every cell's own gradient from ``torch.func``.
    record_norms
        Keep every step's per-cell gradient norms before and after clipping
        (``norms_``; for tests and diagnostics; these are not private).
    **plan_kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``lr``, ``weight_decay``,
        ``n_epochs_kl_warmup``, ...).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        n_train: int,
        accountant: str = "rdp",
        seed: int = 0,
        per_cell_loss: str = "elbo",
        grad_sample_mode: str = "ghost",
        record_norms: bool = False,
        **plan_kwargs: Any,
    ):
        check_grad_sample_mode(grad_sample_mode, plan_kwargs)
        require_opacus()
        from opacus.accountants import create_accountant

        check_no_batch_norm(module)
        check_privacy_arguments(
            target_epsilon=None,
            target_delta=0.5,  # checked where it is used (train_dp)
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            sample_rate=sample_rate,
            accountant=accountant,
        )
        if per_cell_loss not in PER_CELL_LOSSES:
            raise ValueError(
                f"Unknown per_cell_loss {per_cell_loss!r}; choose from {PER_CELL_LOSSES}."
            )
        if int(n_train) < 1:
            raise ValueError("`n_train` must be a positive integer.")
        super().__init__(module, **plan_kwargs)
        self.automatic_optimization = False
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.sample_rate = float(sample_rate)
        self.n_train = int(n_train)
        self.expected_batch_size = self.sample_rate * self.n_train
        self.accountant_name = accountant
        self.accountant = create_accountant(mechanism=accountant)
        self.seed = int(seed)
        self.per_cell_loss = per_cell_loss
        self.grad_sample_mode = grad_sample_mode
        # Built here so that an unsupported layer fails before training, not at its first step.
        self._ghost = GhostClipper(module)
        self.record_norms = bool(record_norms)
        #: Per step, ``(raw, clipped)`` per-cell gradient norms (with ``record_norms``).
        self.norms_: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: Optimizer steps taken (each one accounted).
        self.steps_ = 0
        #: Cells in each step's Poisson batch (not private; never logged).
        self.batch_sizes_: list[int] = []
        self._noise_generator: torch.Generator | None = None

    # -- privacy -------------------------------------------------------------------------------
    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (Opacus accountant; ``inf`` without noise)."""
        if self.steps_ == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return float(self.accountant.get_epsilon(delta=float(delta)))

    def on_fit_start(self) -> None:
        """Train mode, and the noise generator seeded on the training device.

        Raises
        ------
        RuntimeError
            On more than one device: every process would draw its own Poisson batches and
            noise, and the accounting would not hold.
        """
        if self.trainer.world_size > 1:
            raise RuntimeError(
                "DP-SGD training runs on one device (`devices=1`): several processes would each "
                "draw their own Poisson batches and noise, which the accounting does not cover."
            )
        self.module.train()
        if self._noise_generator is None:
            self._noise_generator = torch.Generator(device=self.device).manual_seed(self.seed)

    # -- per-cell gradients ----------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}

    def batch_losses(self, batch: Tensors) -> tuple[torch.Tensor, Any]:
        """Per-cell losses of a batch in one forward pass, and the count likelihood.

        ``"elbo"`` is scVI's ``VAE.loss`` before its batch mean (each cell its own latent sample
        and dropout mask), checked against that mean.
        """
        kl_weight = self.kl_weight if "kl_weight" in self.loss_kwargs else 1.0
        if self.per_cell_loss == "posterior_mean":
            terms, px = per_cell_loss_terms_and_likelihood(self.module, batch)
            return terms["reconstruction_nll"] + kl_weight * terms["kl_z"], px
        _, generative, loss_output = self.module(batch, loss_kwargs={"kl_weight": kl_weight})
        kl = loss_output.kl_local
        per_cell = (
            sum(loss_output.reconstruction_loss.values())
            + kl_weight * kl.get("kl_divergence_z", 0.0)
            + kl.get("kl_divergence_l", 0.0)
        )
        if not torch.allclose(per_cell.mean(), loss_output.loss, rtol=1e-4, atol=1e-4):
            raise RuntimeError(
                "This module's loss is not the mean of reconstruction + kl_weight * KL(z) + "
                "KL(l) per cell, which ghost clipping assumes; DP-SGD here trains scVI's VAE."
            )
        return per_cell, generative.get("px")

    def clipped_gradient_sum(
        self, batch: Tensors
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Sum over cells of the clipped per-cell gradients, and the norms before / after.

        Each cell's gradient ``g_i`` (all trainable parameters, one flat vector) is scaled by
        ``min(1, C / (||g_i|| + 1e-6))``, Opacus' clipping rule.
        """
        if n_cells(batch) == 0:  # an empty Poisson batch: a noise-only step
            empty = torch.zeros(0, device=self.device)
            zeros = {k: torch.zeros_like(p) for k, p in self._ghost.params.items()}
            return zeros, empty, empty
        return self._ghost.clipped_sum(batch, self.batch_losses, self.max_grad_norm)

    @torch.no_grad()
    def private_gradient(self, batch: Tensors) -> dict[str, torch.Tensor]:
        """The DP-SGD gradient of a Poisson batch: (clipped sum + noise) / expected batch size."""
        total, raw, clipped = self.clipped_gradient_sum(batch)
        if self._noise_generator is None:
            self._noise_generator = torch.Generator(device=self.device).manual_seed(self.seed)
        std = self.noise_multiplier * self.max_grad_norm
        out = {}
        for k, s in total.items():
            if std > 0:
                noise = torch.randn(
                    s.shape, generator=self._noise_generator, device=s.device, dtype=s.dtype
                )
                s = s + std * noise
            out[k] = s / self.expected_batch_size
        if self.record_norms:
            self.norms_.append((raw.cpu(), clipped.cpu()))
        self.batch_sizes_.append(int(raw.numel()))
        return out

    def training_step(self, batch: Tensors, batch_idx: int) -> None:
        """One DP-SGD step on a Poisson batch (possibly empty: noise only)."""
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs.update({"kl_weight": self.kl_weight})
            self.log("kl_weight", self.kl_weight, on_step=True, on_epoch=False)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        grads = self.private_gradient(batch)
        for name, p in self._trainable().items():
            p.grad = grads[name]
        optimizer.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps_ += 1


# -- donor-level DP-SGD ---------------------------------------------------------------------------
def donor_codes(adata, donor_key: str | None, train_idx: np.ndarray) -> tuple[np.ndarray, list]:
    """Each training cell's donor as a code ``0..n_donors-1``, and the donors' names.

    Raises
    ------
    ValueError
        For a missing key, a column with missing values, a donor (category) with no cells, or
        fewer than two training donors.
    """
    if donor_key is None:
        raise ValueError(
            'privacy_unit="donor" needs `donor_key`, the `adata.obs` column naming each '
            "cell's donor."
        )
    if donor_key not in adata.obs:
        shown = ", ".join(map(str, list(adata.obs.columns)[:8]))
        raise ValueError(f"`donor_key` {donor_key!r} is not a column of adata.obs ({shown}).")
    column = adata.obs[donor_key]
    if column.isna().any():
        raise ValueError(
            f"adata.obs[{donor_key!r}] has {int(column.isna().sum())} cells without a donor; "
            "every cell needs one for donor-level privacy."
        )
    if hasattr(column, "cat"):
        counts = column.value_counts()
        empty = counts.index[counts.to_numpy() == 0].tolist()
        if empty:
            raise ValueError(
                f"Donors {empty[:5]} of adata.obs[{donor_key!r}] have no cells. Drop them: "
                f"obs[{donor_key!r}] = obs[{donor_key!r}].cat.remove_unused_categories()."
            )
    names, codes = np.unique(
        column.to_numpy()[np.asarray(train_idx)].astype(str), return_inverse=True
    )
    if names.size < 2:
        raise ValueError(
            f"The training cells come from {names.size} donor of adata.obs[{donor_key!r}]: "
            "donor-level privacy needs at least two donors (with one, there is nobody to hide "
            "among)."
        )
    return codes.astype(np.int64), names.tolist()


class _DonorSampler(torch.utils.data.Sampler):
    """Donor-level Poisson batches: each donor joins with probability ``sample_rate``.

    A joining donor brings at most ``cells_per_donor`` of its cells, drawn without replacement;
    every draw comes from one generator, independent of the data's values.
    """

    def __init__(self, codes, sample_rate, cells_per_donor, steps, generator):
        self.codes = np.asarray(codes)
        self.members = [np.flatnonzero(self.codes == d) for d in range(int(self.codes.max()) + 1)]
        self.sample_rate = float(sample_rate)
        self.cells_per_donor = int(cells_per_donor)
        self.steps = int(steps)
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            joins = torch.rand(len(self.members), generator=self.generator) < self.sample_rate
            picked = []
            for donor in np.flatnonzero(joins.numpy()):
                cells = self.members[donor]
                order = torch.randperm(cells.size, generator=self.generator).numpy()
                picked.append(cells[order[: self.cells_per_donor]])
            positions = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
            yield positions


class _WithDonorCodes(torch.utils.data.Dataset):
    """scvi-tools' AnnData dataset, each batch also carrying its rows' donor codes."""

    def __init__(self, dataset, codes: np.ndarray):
        self.dataset, self.codes = dataset, np.asarray(codes, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, positions: np.ndarray):
        if positions.size == 0:  # a step no donor joined: a noise-only step
            return {DONOR_CODE_KEY: np.zeros(0, np.int64)}
        batch = self.dataset[positions.tolist()]  # sorted, as backed AnnData needs
        batch[DONOR_CODE_KEY] = self.codes[positions]
        return batch


class DonorPoissonDataSplitter(PoissonDataSplitter):
    """A :class:`PoissonDataSplitter` whose training batches sample donors, not cells.

    Parameters
    ----------
    donor_codes
        The donor code of each training cell (in the order of the training cells).
    cells_per_donor
        Most cells of one joining donor in a batch.
    **kwargs
        Passed to :class:`PoissonDataSplitter` (``sample_rate`` is the donors' rate).
    """

    def __init__(self, *args, donor_codes: np.ndarray, cells_per_donor: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.donor_codes = np.asarray(donor_codes, dtype=np.int64)
        self.cells_per_donor = int(cells_per_donor)

    def train_dataloader(self) -> DataLoader:
        """Donor-level Poisson batches of the training cells (one generator across epochs)."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        dataset = self.adata_manager.create_torch_dataset(
            indices=self.train_idx, load_sparse_tensor=self.load_sparse_tensor
        )
        sampler = _DonorSampler(
            self.donor_codes, self.sample_rate, self.cells_per_donor, self.steps_per_epoch,
            self._generator,
        )  # fmt: skip
        return DataLoader(
            _WithDonorCodes(dataset, self.donor_codes), sampler=sampler, batch_size=None,
            pin_memory=self.pin_memory, num_workers=0,
        )  # fmt: skip


class DonorDPTrainingPlan(DPTrainingPlan):
    """DP-SGD whose privacy unit is the donor: per-donor clipping of the summed gradient.

    Each step the batch holds the sampled cells of the donors that joined (at most
    ``cells_per_donor`` each, see ``DonorPoissonDataSplitter``). Donor ``d``'s
    contribution is the gradient of the mean per-cell loss of its cells, clipped to L2 norm
    ``max_grad_norm`` (one backward pass per joining donor); the clipped contributions are
    summed, Gaussian noise ``noise_multiplier * max_grad_norm`` is added and the sum is divided
    by the expected number of donors ``sample_rate * n_train`` (``n_train`` counts donors).
    The accountant then runs over donors: adding or removing one donor's cells changes at most
    one clipped term, whatever their number. Other settings as :class:`DPTrainingPlan`.
    """

    def clipped_gradient_sum(
        self, batch: Tensors
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Sum over joining donors of their clipped gradients, and the norms before / after."""
        batch = dict(batch)
        codes = torch.as_tensor(batch.pop(DONOR_CODE_KEY), device=self.device)
        params = self._trainable()
        names = list(params)
        if codes.numel() == 0:
            empty = torch.zeros(0, device=self.device)
            return {k: torch.zeros_like(p) for k, p in params.items()}, empty, empty
        with torch.enable_grad():
            per_cell, _ = self.batch_losses(batch)
            donors = torch.unique(codes)
            losses = torch.stack([per_cell[codes == d].mean() for d in donors])
            norms = []
            for loss in losses:
                grads = torch.autograd.grad(
                    loss, [params[n] for n in names], retain_graph=True, allow_unused=True
                )
                squares = [g.pow(2).sum() for g in grads if g is not None]
                norms.append(torch.stack(squares).sum().sqrt().detach())
            norms = torch.stack(norms)
            factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            grads = torch.autograd.grad(
                (factor * losses).sum(), [params[n] for n in names], allow_unused=True
            )
        total = {
            n: torch.zeros_like(params[n]) if g is None else g.detach()
            for n, g in zip(names, grads)
        }
        return total, norms, norms * factor


# -- the one-run audit's canaries -----------------------------------------------------------------
@dataclass
class CanaryRun:
    """Canary cells of one DP-SGD run: built, half put into training, scored at the end.

    See :mod:`scvi_unlearn.audit._one_run` for how canaries are built and the bound.
    """

    joined: Any
    manager: Any
    n_obs: int
    fit_idx: np.ndarray
    included: np.ndarray
    n_guesses: int
    canary_genes: int
    initial_scores: np.ndarray

    @classmethod
    def prepare(cls, model, train_idx, n_canaries, seed, canary_genes, n_guesses) -> CanaryRun:
        """Canaries appended to a copy of the data; training cells plus the included ones."""
        n_canaries = _check_count("canaries", n_canaries, low=2)
        if n_canaries > train_idx.size:
            raise ValueError(
                f"canaries={n_canaries} is more than the {train_idx.size} training cells allow: "
                "the canaries would outnumber the data the model is meant to learn."
            )
        _check_count("canary_genes", canary_genes, low=1)
        n_guesses = max(2, n_canaries // 5) if n_guesses is None else n_guesses
        n_guesses = _check_count("canary_guesses", n_guesses, low=2)
        if n_guesses > n_canaries:
            raise ValueError(f"canary_guesses={n_guesses} exceeds canaries={n_canaries}.")
        canaries = make_canaries(model, train_idx, n_canaries, seed=seed,
                                 canary_genes=canary_genes)  # fmt: skip
        joined = validate_anndata(model, with_canaries(model, canaries))
        included = np.random.default_rng([seed, 1]).random(n_canaries) < 0.5
        n_obs = model.adata.n_obs
        fit_idx = np.concatenate([train_idx, n_obs + np.flatnonzero(included)]).astype(np.int64)
        manager = model.get_anndata_manager(joined, required=True)
        positions = n_obs + np.arange(n_canaries)
        # Scored before training too: a canary's gain over the starting weights removes most
        # of what its random genes make easy or hard for any model.
        initial = loss_scores(model.module, gather_tensors(model, positions, adata=joined))
        return cls(joined, manager, n_obs, fit_idx, included, n_guesses, int(canary_genes),
                   initial)  # fmt: skip

    def splitter(self, val_idx, **kwargs) -> PoissonDataSplitter:
        """Poisson batches over the data with canaries (validation on real cells only)."""
        manager = self.manager
        rest = np.setdiff1d(np.arange(self.joined.n_obs), np.union1d(self.fit_idx, val_idx))
        return PoissonDataSplitter(
            manager, [self.fit_idx, np.asarray(val_idx, np.int64), rest.astype(np.int64)],
            **kwargs,
        )  # fmt: skip

    def finish(self, model, train_idx, val_idx, summary) -> dict[str, Any]:
        """Score the canaries, audit, and leave the model with its real cells only."""
        canaries = self.n_obs + np.arange(self.included.size)
        final = loss_scores(model.module, gather_tensors(model, canaries, adata=self.joined))
        scores = final - self.initial_scores
        model.train_indices = np.asarray(train_idx)
        model.validation_indices = np.asarray(val_idx)
        model.test_indices = np.setdiff1d(np.arange(self.n_obs), np.union1d(train_idx, val_idx))
        unregister_anndata(model, self.joined)
        self.joined = self.manager = None  # the copy with canaries goes
        n_guesses, n_correct = guess_and_count(scores, self.included, self.n_guesses)
        audit = OneRunAudit(
            epsilon_hat=one_run_epsilon(self.included.size, n_guesses, n_correct,
                                        summary["delta"]),
            epsilon=float(summary["epsilon"]), delta=float(summary["delta"]),
            confidence=DEFAULT_CONFIDENCE, n_canaries=int(self.included.size),
            n_included=int(self.included.sum()), n_guesses=n_guesses, n_correct=n_correct,
            canary_genes=self.canary_genes,
        )  # fmt: skip
        return audit.to_dict()


def _check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return int(value)


# -- entry point ----------------------------------------------------------------------------------
def train_dp(
    model: SCVI,
    *,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    max_grad_norm: float = 1.0,
    noise_multiplier: float | None = None,
    accountant: str = "rdp",
    max_epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    train_size: float = 0.9,
    indices: IndexLike | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | list[int] | str = 1,
    enable_progress_bar: bool = True,
    per_cell_loss: str = "elbo",
    grad_sample_mode: str = "ghost",
    privacy_unit: str = "cell",
    donor_key: str | None = None,
    cells_per_donor: int = DEFAULT_CELLS_PER_DONOR,
    donors_per_batch: int | None = None,
    canaries: int = 0,
    canary_guesses: int | None = None,
    canary_genes: int = DEFAULT_CANARY_GENES,
    plan_kwargs: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Train an scVI model with DP-SGD to a privacy budget; return the privacy summary.

    The model is trained in place from its current weights (normally freshly initialised),
    with scvi-tools' :class:`~scvi.train.TrainRunner`, which sets ``is_trained_``,
    ``train_indices``, ``validation_indices``, ``test_indices``, ``history`` and ``trainer``
    as ``model.train`` does. The summary is also stored as ``model.dp_privacy_`` (saved in
    ``model.pt`` with the other ``*_`` attributes; ``save_privacy`` writes it as JSON).

    Parameters
    ----------
    model
        A set-up scVI model built with ``use_batch_norm="none", use_layer_norm="both"``.
    target_epsilon
        Privacy budget: the noise multiplier is the smallest Opacus finds for
        ``(target_epsilon, target_delta)`` over all planned steps. Give this or
        ``noise_multiplier``.
    target_delta
        The delta of the guarantee; default ``0.1 / n_train``
        (:data:`~scvi_unlearn.train.DEFAULT_DELTA_SHARE` over the number of training cells).
        A delta of ``1 / n_train`` or more would allow a mechanism that publishes a random cell
        outright; it is accepted with a warning.
    max_grad_norm
        Per-cell clipping norm.
    noise_multiplier
        Noise standard deviation in units of ``max_grad_norm`` (instead of a target epsilon);
        ``0`` trains without privacy (epsilon ``inf``), for comparisons.
    accountant
        ``"rdp"`` (Rényi DP, default) or ``"prv"`` (privacy random variables, tighter).
    max_epochs
        Epochs; default scvi-tools' heuristic for the number of cells, as ``model.train``.
        An epoch is ``int(1 / sample_rate)`` Poisson batches.
    batch_size
        Expected batch size; ``sample_rate = min(1, batch_size / n_train)``.
    lr
        Adam's learning rate (scVI's optimizer and its other defaults).
    train_size
        Share of the cells to train on (the rest are validation cells), split with ``seed``.
    indices
        The cells to train on (positions, mask or obs names); overrides ``train_size``, no
        validation cells, every other cell is a test cell.
    seed
        Seed of everything random: the split, the Poisson batches, the latent samples and
        dropout, the noise. The same seed and weights give the same model on a device.
    accelerator, devices, enable_progress_bar
        Lightning's; one device only (see :class:`DPTrainingPlan`).
    per_cell_loss
        ``"elbo"`` (scVI's training loss, default) or ``"posterior_mean"``, see
        :class:`DPTrainingPlan`.
    grad_sample_mode
        ``"ghost"``, the only mode (hooks: per-cell norms without per-cell gradients), see
        :class:`DPTrainingPlan`; ``"vmap"`` is no longer available.
    privacy_unit
        ``"cell"`` (default): the guarantee covers one cell (row). ``"donor"``: it covers all
        of one donor's cells together, the unit that gives and withdraws consent. Each step
        then samples donors (Poisson, rate ``donors_per_batch / n_donors``), takes at most
        ``cells_per_donor`` cells of each joining donor, clips each donor's gradient (of the
        mean loss of its cells) to ``max_grad_norm`` and adds the noise once per step
        (:class:`DonorDPTrainingPlan`); the accountant counts donors, and ``delta`` defaults
        to ``0.1 / n_donors``. An epoch is as many steps as make the expected cells seen equal
        the training cells.
    donor_key
        With ``privacy_unit="donor"``: the ``adata.obs`` column naming each cell's donor.
    cells_per_donor
        With ``privacy_unit="donor"``: most cells of one donor in a step.
    donors_per_batch
        With ``privacy_unit="donor"``: expected donors per step (default
        ``round(batch_size / cells_per_donor)``, at least one).
    canaries
        Run the one-run DP audit (Steinke et al. 2023; see
        :func:`~scvi_unlearn.audit.one_run_epsilon`):
        build this many canary cells (each the covariates and library size of a random
        training cell, its counts spread uniformly over ``canary_genes`` random genes), put
        each into training with probability 1/2, and after training guess which went in from
        their loss. The summary's ``one_run_audit`` holds the empirical lower bound
        ``epsilon_hat`` (95% confidence) beside the accountant's epsilon. The canaries train
        on an in-memory copy of the AnnData with them appended; the model keeps the
        original, its training cells are the real ones, and no canary is saved. Included
        canaries count as training cells for the sampling rate and the accounting (they are
        protected like any cell). Cell-level privacy only; at most as many canaries as
        training cells.
    canary_guesses
        Guesses of the audit, half "in" (highest scores) and half "out" (lowest), fixed
        before training; default a fifth of the canaries.
    canary_genes
        Genes each canary's counts are spread over.
    plan_kwargs
        Further :class:`DPTrainingPlan` / :class:`scvi.train.TrainingPlan` arguments
        (``weight_decay``, ``n_epochs_kl_warmup``, ``record_norms``, ...).
    **trainer_kwargs
        Passed to the Lightning trainer through :class:`~scvi.train.TrainRunner`.

    Returns
    -------
    Dict with ``epsilon`` (spent, at ``delta``), ``delta``, ``noise_multiplier``,
    ``sample_rate``, ``expected_batch_size``, ``steps``, ``steps_per_epoch``, ``epochs``,
    ``accountant``, ``max_grad_norm``, ``target_epsilon``, ``n_train`` (cells),
    ``per_cell_loss``, ``privacy_unit``, ``n_units`` (cells or donors protected),
    ``opacus_version``, ``wall_seconds``; for donors also ``donor_key``, ``n_donors``,
    ``cells_per_donor``, ``donors_per_batch`` and ``epsilon_per_donor`` (every training
    donor's epsilon; all equal, the guarantee is worst-case).

    Raises
    ------
    ImportError
        Without Opacus (``pip install "scvi-unlearn[dp]"``).
    ValueError
        For batch norm in the model, a missing or out-of-range privacy setting, or, for
        donor-level privacy, a missing donor key, cells without a donor, a donor without cells
        or fewer than two donors.

    Examples
    --------
    >>> import scvi_unlearn as su
    >>> adata = su.data.synthetic_pbmc(n_cells=120, n_genes=50, seed=0)
    >>> su.model.SCVI.setup_anndata(adata)
    >>> model = su.model.SCVI(adata, n_latent=4, use_batch_norm="none", use_layer_norm="both")
    >>> summary = su.train.train_dp(model, target_epsilon=8.0, max_epochs=2, batch_size=32,
    ...                             accelerator="cpu", enable_progress_bar=False)
    >>> summary["epsilon"] <= 8.0, summary["steps"], model.is_trained
    (True, 6, True)
    """
    check_grad_sample_mode(grad_sample_mode, {**(plan_kwargs or {}), **trainer_kwargs})
    opacus = require_opacus()
    check_no_batch_norm(model.module)
    started = time.perf_counter()
    seed = int(seed)
    seed_everything(seed)
    if indices is not None:
        train_idx = as_cell_indices(model.adata, indices, "indices")
        val_idx = np.zeros(0, np.int64)
    else:
        split = DataSplitter(model.adata_manager, train_size=train_size)
        split.setup()  # a permutation seeded by scvi.settings.seed (= seed)
        train_idx, val_idx = np.asarray(split.train_idx), np.asarray(split.val_idx)
    n_train = int(train_idx.size)
    if n_train < 1:
        raise ValueError("No training cells.")
    canary_run = None
    if canaries:
        if privacy_unit != "cell":
            raise ValueError(
                "Canaries audit cell-level DP-SGD (each canary is one cell); train with "
                'privacy_unit="cell" to audit, or without canaries.'
            )
        canary_run = CanaryRun.prepare(model, train_idx, canaries, seed, canary_genes,
                                       canary_guesses)  # fmt: skip
    fit_idx = train_idx if canary_run is None else canary_run.fit_idx
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if max_epochs is None:
        max_epochs = max_epochs_heuristic(model.adata.n_obs)
    if int(max_epochs) < 1:
        raise ValueError(f"`max_epochs` must be a positive integer, got {max_epochs!r}.")
    max_epochs = int(max_epochs)
    if privacy_unit not in PRIVACY_UNITS:
        raise ValueError(f"Unknown privacy_unit {privacy_unit!r}; choose from {PRIVACY_UNITS}.")
    donor = privacy_unit == "donor"
    if donor:
        codes, donor_names = donor_codes(model.adata, donor_key, train_idx)
        units = _donor_sampling(codes, n_train, int(batch_size), cells_per_donor,
                                donors_per_batch)  # fmt: skip
    else:
        codes, donor_names = None, []
        rate = min(1.0, int(batch_size) / fit_idx.size)
        units = {"n_units": int(fit_idx.size), "sample_rate": rate,
                 "steps_per_epoch": max(1, int(1 / rate))}  # Opacus' epoch  # fmt: skip
    n_units, sample_rate = units["n_units"], units["sample_rate"]
    steps_per_epoch = units["steps_per_epoch"]
    delta = DEFAULT_DELTA_SHARE / n_units if target_delta is None else target_delta
    check_privacy_arguments(
        target_epsilon=target_epsilon,
        target_delta=delta,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        accountant=accountant,
    )
    delta = float(delta)
    if delta >= 1.0 / n_units:
        unit = "donor" if donor else "cell"
        warnings.warn(
            f"target_delta={delta:g} is at least 1 / n (1/{n_units} {unit}s): such a guarantee "
            f"allows a mechanism that publishes a random training {unit} outright. Use a delta "
            f"well below it, e.g. {DEFAULT_DELTA_SHARE / n_units:.2g} (the default).",
            UserWarning,
            stacklevel=2,
        )
    planned_steps = max_epochs * steps_per_epoch
    if noise_multiplier is None:
        from opacus.accountants.utils import get_noise_multiplier

        noise_multiplier = get_noise_multiplier(
            target_epsilon=float(target_epsilon),
            target_delta=delta,
            sample_rate=sample_rate,
            steps=planned_steps,
            accountant=accountant,
        )
    kwargs = dict(plan_kwargs or {})
    kwargs.setdefault("lr", lr)
    plan = (DonorDPTrainingPlan if donor else DPTrainingPlan)(
        model.module,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=sample_rate,
        n_train=n_units,
        accountant=accountant,
        seed=seed,
        per_cell_loss=per_cell_loss,
        grad_sample_mode=grad_sample_mode,
        **kwargs,
    )
    splitter = PoissonDataSplitter.from_model(
        model,
        train_idx,
        val_idx,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        batch_size=int(batch_size),
    )
    if canary_run is not None:
        splitter = canary_run.splitter(
            val_idx, sample_rate=sample_rate, steps_per_epoch=steps_per_epoch, seed=seed,
            batch_size=int(batch_size),
        )  # fmt: skip
    if donor:
        splitter = DonorPoissonDataSplitter(
            model.adata_manager, splitter.external_indexing, sample_rate=sample_rate,
            steps_per_epoch=steps_per_epoch, seed=seed, batch_size=int(batch_size),
            donor_codes=codes, cells_per_donor=units["cells_per_donor"],
        )  # fmt: skip
    run_plan(
        model,
        plan,
        splitter,
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        enable_progress_bar=enable_progress_bar,
        **trainer_kwargs,
    )
    summary = {
        "epsilon": plan.epsilon(delta),
        "delta": delta,
        "noise_multiplier": float(noise_multiplier),
        "sample_rate": float(sample_rate),
        "expected_batch_size": float(plan.expected_batch_size),
        "steps": int(plan.steps_),
        "steps_per_epoch": int(steps_per_epoch),
        "epochs": int(plan.current_epoch),
        "accountant": accountant,
        "max_grad_norm": float(max_grad_norm),
        "target_epsilon": None if target_epsilon is None else float(target_epsilon),
        "n_train": n_train,
        "per_cell_loss": per_cell_loss,
        "grad_sample_mode": grad_sample_mode,
        "privacy_unit": privacy_unit,
        "n_units": int(n_units),
        "mechanism": (
            "DP-SGD: Poisson sampling of donors, per-donor L2 clipping, Gaussian noise"
            if donor
            else "DP-SGD: Poisson sampling, per-cell L2 clipping, Gaussian noise"
        ),
        "opacus_version": str(opacus.__version__),
        "wall_seconds": float(time.perf_counter() - started),
    }
    if canary_run is not None:
        summary["one_run_audit"] = canary_run.finish(model, train_idx, val_idx, summary)
    if donor:
        summary.update(
            donor_key=donor_key,
            n_donors=int(n_units),
            cells_per_donor=int(units["cells_per_donor"]),
            donors_per_batch=float(units["donors_per_batch"]),
            epsilon_per_donor=dict.fromkeys(donor_names, summary["epsilon"]),
        )
    _record_training(model, plan, summary, max_epochs, batch_size, train_size, indices, lr)
    return summary


def _donor_sampling(codes, n_train, batch_size, cells_per_donor, donors_per_batch) -> dict:
    """Donor-level sampling: the donors' rate and an epoch's steps (expected cells = n_train)."""
    if int(cells_per_donor) < 1:
        raise ValueError(f"`cells_per_donor` must be a positive integer, got {cells_per_donor!r}.")
    n_donors = int(codes.max()) + 1
    per_batch = (
        max(1, round(batch_size / int(cells_per_donor)))
        if donors_per_batch is None
        else donors_per_batch
    )
    if not (isinstance(per_batch, int | float) and 0 < per_batch):
        raise ValueError(f"`donors_per_batch` must be a number > 0, got {donors_per_batch!r}.")
    rate = min(1.0, float(per_batch) / n_donors)
    expected_cells = rate * np.minimum(np.bincount(codes), int(cells_per_donor)).sum()
    return {
        "n_units": n_donors,
        "sample_rate": rate,
        "steps_per_epoch": max(1, math.ceil(n_train / expected_cells)),
        "cells_per_donor": int(cells_per_donor),
        "donors_per_batch": rate * n_donors,
    }


def _record_training(model, plan, summary, max_epochs, batch_size, train_size, indices, lr):
    """What :meth:`scvi_unlearn.model.SCVI.train` records, plus the privacy summary."""
    model.dp_privacy_ = summary
    # The non-private equivalent recipe (shadow models and exact retraining follow it).
    model.train_kwargs_ = {
        "max_epochs": int(max_epochs),
        "batch_size": int(batch_size),
        "train_size": 1.0 if indices is not None else float(train_size),
        "plan_kwargs": {"lr": float(lr)},
    }
    model.final_kl_weight_ = last_kl_weight(plan)
    model.train_obs_names_ = model.adata.obs_names[np.asarray(model.train_indices)].tolist()


# -- persistence ----------------------------------------------------------------------------------
def save_privacy(model, dir_path: str) -> str | None:
    """Write ``model.dp_privacy_`` to ``dir_path/dp_privacy.json``; its path (None if none).

    An infinite epsilon (no noise) is written as ``null``; :func:`load_privacy` restores it.

    Parameters
    ----------
    model
        A model trained by :func:`train_dp` (others have nothing to write).
    dir_path
        The folder the model was saved to.
    """
    summary = getattr(model, "dp_privacy_", None)
    if not summary:
        return None
    path = os.path.join(dir_path, PRIVACY_FILE)
    dump_json(summary, path)
    return path


def load_privacy(model, dir_path: str) -> dict[str, Any] | None:
    """Read ``dir_path/dp_privacy.json`` into ``model.dp_privacy_`` (if the file exists).

    Parameters
    ----------
    model
        The model just loaded from ``dir_path``.
    dir_path
        Its folder.
    """
    path = os.path.join(dir_path, PRIVACY_FILE)
    if not os.path.exists(path):
        return getattr(model, "dp_privacy_", None)
    with open(path) as handle:
        summary = json.load(handle)
    if summary.get("epsilon") is None and summary.get("noise_multiplier") == 0:
        summary["epsilon"] = math.inf  # JSON has no infinity (to_jsonable wrote null)
    model.dp_privacy_ = summary
    return summary


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_CELLS_PER_DONOR",
    "GRAD_SAMPLE_MODES",
    "PER_CELL_LOSSES",
    "PRIVACY_FILE",
    "PRIVACY_UNITS",
    "DPTrainingPlan",
    "DonorDPTrainingPlan",
    "DonorPoissonDataSplitter",
    "PoissonDataSplitter",
    "check_grad_sample_mode",
    "check_no_batch_norm",
    "donor_codes",
    "load_privacy",
    "privacy_spent",
    "require_opacus",
    "save_privacy",
    "train_dp",
]
