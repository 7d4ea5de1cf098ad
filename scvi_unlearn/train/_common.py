"""Shared machinery of the unlearning training plans.

Every plan is a :class:`scvi.train.TrainingPlan` run by scvi-tools'
:class:`~scvi.train.TrainRunner` over a :class:`~scvi.dataloaders.DataSplitter` whose
training cells are the retained cells, so Lightning handles devices, accelerators, progress
bars and distributed training. Forget and non-member cells are few: a plan holds them as
tensors (gathered once through the model's own data loader) and moves them to its device
when the fit starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scvi import settings
from scvi.dataloaders import DataSplitter
from scvi.train import TrainingPlan, TrainRunner

from scvi_unlearn._compat import compute_kl_weight, make_data_loader
from scvi_unlearn.audit._metrics import auc_from_scores
from scvi_unlearn.module import per_cell_loss_terms

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anndata import AnnData
    from scvi.model import SCVI

Tensors = dict[str, torch.Tensor]


# -- tensors ---------------------------------------------------------------------------------
def gather_tensors(
    model: SCVI,
    indices: np.ndarray,
    adata: AnnData | None = None,
    batch_size: int = 4096,
) -> Tensors:
    """Load the registered tensors of some cells into memory (CPU), in the order given.

    Parameters
    ----------
    model
        A set-up scVI model.
    indices
        Integer positions in ``adata`` (default: the model's AnnData).
    adata
        An AnnData already registered with the model (see
        ``scvi_unlearn._compat.validate_anndata``).
    batch_size
        Cells per loader batch; the result does not depend on it.
    """
    adata = model.adata if adata is None else adata
    indices = np.asarray(indices, dtype=np.int64)
    loader = make_data_loader(model, adata, indices=indices, batch_size=batch_size)
    chunks: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        for key, value in batch.items():
            if torch.is_tensor(value):
                chunks.setdefault(key, []).append(value.detach().cpu())
    return {key: torch.cat(values) for key, values in chunks.items()}


def n_cells(tensors: Tensors) -> int:
    """Number of cells in a tensor dict."""
    return int(next(iter(tensors.values())).shape[0]) if tensors else 0


def take(tensors: Tensors, idx: torch.Tensor | slice) -> Tensors:
    """Rows ``idx`` of every tensor."""
    return {key: value[idx] for key, value in tensors.items()}


def to_device(tensors: Tensors | None, device: torch.device) -> Tensors | None:
    """Move a tensor dict to ``device`` (``None`` passes through)."""
    if tensors is None:
        return None
    return {key: value.to(device) for key, value in tensors.items()}


def iter_chunks(tensors: Tensors, chunk_size: int) -> Iterator[Tensors]:
    """Consecutive chunks of at most ``chunk_size`` cells."""
    total = n_cells(tensors)
    for start in range(0, total, chunk_size):
        yield take(tensors, slice(start, start + chunk_size))


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Run ``module`` in eval mode inside the block (gradients still flow).

    Forget and non-member cells are passed through the VAE in eval mode: batch norm then uses
    its running statistics (which a batch made only of forget cells would otherwise update,
    leaking them back into the model) and dropout is off, so the features are exactly those
    an attacker computes.
    """
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def loss_scores(module: torch.nn.Module, tensors: Tensors, chunk_size: int = 1024) -> np.ndarray:
    """Loss-threshold attack scores, ``-neg_elbo / library`` (higher = more member-like)."""
    scores = []
    with eval_mode(module):
        for chunk in iter_chunks(tensors, chunk_size):
            terms = per_cell_loss_terms(module, chunk)
            scores.append(-(terms["neg_elbo"] / terms["library"].clamp_min(1.0)).double().cpu())
    return torch.cat(scores).numpy() if scores else np.zeros(0)


def loss_auc(module: torch.nn.Module, members: Tensors, nonmembers: Tensors) -> float:
    """ROC AUC of the loss-threshold attack, ``members`` (label 1) against ``nonmembers``."""
    return float(auc_from_scores(loss_scores(module, members), loss_scores(module, nonmembers)))


# -- the plan base class ---------------------------------------------------------------------
class UnlearningTrainingPlan(TrainingPlan):
    """A warm-started :class:`~scvi.train.TrainingPlan` at a fixed KL weight.

    The module is already trained: KL warm-up would restart from a KL weight of 0 and undo
    the model's regularisation, so the KL weight stays at ``kl_weight`` throughout (by
    default that of the end of the original training). Plain training on the data splitter's
    cells (the retained cells) is a retain fine-tune; subclasses add forgetting.

    Parameters
    ----------
    module
        The scVI ``VAE`` to update in place (a copy of the trained one).
    held
        Named tensor dicts (forget cells, non-members, ...) kept by the plan and moved to its
        device when the fit starts.
    kl_weight
        Fixed weight of the KL term of the retain ELBO.
    lr
        Learning rate of the VAE's optimizer.
    seed
        Seed of the plan's own random draws (minibatches of held cells, critics, noise).
    **plan_kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``weight_decay``, ``eps``, ...).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        held: dict[str, Tensors | None] | None = None,
        kl_weight: float = 1.0,
        lr: float = 1e-3,
        seed: int = 0,
        **plan_kwargs: Any,
    ):
        plan_kwargs.update(
            n_epochs_kl_warmup=None,
            n_steps_kl_warmup=None,
            max_kl_weight=float(kl_weight),
            min_kl_weight=float(kl_weight),
        )
        super().__init__(module, lr=lr, **plan_kwargs)
        self.held: dict[str, Tensors | None] = dict(held or {})
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        #: Summary of :meth:`edit_weights` once it has run (at the first fit start).
        self.edit_summary_: dict[str, Any] | None = None

    def on_fit_start(self) -> None:
        """Train mode, held tensors on the device, the generator seeded, weights edited once."""
        # A trained scvi-tools module is left in eval mode and Lightning keeps each
        # submodule's mode: without this, dropout and batch-norm statistics would be off.
        self.module.train()
        self.held = {k: to_device(v, self.device) for k, v in self.held.items()}
        self._generator = torch.Generator().manual_seed(self.seed)
        if self.edit_summary_ is None:
            self.edit_summary_ = self.edit_weights()

    def edit_weights(self) -> dict[str, Any]:
        """Change the weights once before the first epoch (scrub, reset, ...); a summary.

        Runs on the training device with the held tensors in place. The base plan edits
        nothing; plans that do override this.
        """
        return {}

    def on_fit_end(self) -> None:
        """Release the held tensors (the trainer, kept by the model, references the plan)."""
        self.held = {}

    def sample_held(self, name: str, batch_size: int) -> Tensors:
        """A minibatch of a held set (all of it when it is small), drawn with the plan's seed."""
        tensors = self.held[name]
        total = n_cells(tensors)
        if total <= batch_size:
            return tensors
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(total, generator=self._generator)[:batch_size]
        return take(tensors, idx.to(self.device))

    def retain_loss(self, batch: Tensors):
        """ScVI's own loss on a retain minibatch (``LossOutput``), logged like scVI's."""
        _, _, loss_output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self.compute_and_log_metrics(loss_output, self.train_metrics, "train")
        return loss_output

    def forget_neg_elbo(self, tensors: Tensors) -> torch.Tensor:
        """Mean negative ELBO (posterior mean, eval mode) of held cells, differentiable."""
        with eval_mode(self.module):
            return per_cell_loss_terms(self.module, tensors)["neg_elbo"].mean()


# -- running -----------------------------------------------------------------------------------
def make_data_splitter(
    model: SCVI,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None = None,
    batch_size: int = 128,
) -> DataSplitter:
    """A :class:`~scvi.dataloaders.DataSplitter` over the model's AnnData with fixed indices.

    All remaining cells go to the (unused) test set, because scvi-tools requires the three
    sets to cover every cell.
    """
    n_obs = model.adata.n_obs
    train_idx = np.asarray(train_idx, dtype=np.int64)
    val_idx = np.zeros(0, np.int64) if val_idx is None else np.asarray(val_idx, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n_obs), np.union1d(train_idx, val_idx)).astype(np.int64)
    return DataSplitter(
        model.adata_manager,
        external_indexing=[train_idx, val_idx, rest],
        batch_size=batch_size,
        # A last minibatch of one cell cannot pass batch norm in train mode (the same guard
        # as Recipe.fit's): drop it, a different cell each epoch as batches are shuffled.
        drop_last=bool(train_idx.size % batch_size == 1),
    )


def run_plan(
    model: SCVI,
    plan: TrainingPlan,
    data_splitter: DataSplitter,
    max_epochs: int,
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    enable_progress_bar: bool = True,
    **trainer_kwargs: Any,
) -> TrainRunner:
    """Fit ``plan`` with scvi-tools' :class:`~scvi.train.TrainRunner` and return the runner.

    Validation runs every epoch when the splitter has validation cells (plans select their
    best state there). The runner sets the model's ``train_indices`` to the splitter's; callers
    overwrite them with the cells the model has actually been trained on.
    """
    if getattr(data_splitter, "n_val", 0):
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
    trainer_kwargs.setdefault("early_stopping", False)
    runner = TrainRunner(
        model,
        training_plan=plan,
        data_splitter=data_splitter,
        max_epochs=int(max_epochs),
        accelerator=accelerator,
        devices=devices,
        enable_progress_bar=enable_progress_bar,
        **trainer_kwargs,
    )
    runner()
    return runner


def last_kl_weight(plan: TrainingPlan) -> float:
    """KL weight of a finished plan's last step (scvi-tools' own schedule).

    Lightning has advanced past the last epoch and step when ``fit`` returns, hence the -1s.
    """
    return float(
        compute_kl_weight(
            plan.current_epoch - 1,
            plan.global_step - 1,
            plan.n_epochs_kl_warmup,
            plan.n_steps_kl_warmup,
            plan.max_kl_weight,
            plan.min_kl_weight,
        )
    )


def logged_history(runner: TrainRunner) -> dict[str, list[float]]:
    """Every metric the plan logged, as plain lists (the model's history keeps only scVI's)."""
    history = getattr(runner.trainer.logger, "history", None) or {}
    out = {}
    for key, frame in history.items():
        values = np.asarray(frame).ravel().astype(float)
        out[key] = [None if not np.isfinite(v) else float(v) for v in values]
    return out


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict (to restore a best state later)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch through scvi-tools' settings (Lightning's seed_everything)."""
    settings.seed = int(seed)


@contextlib.contextmanager
def isolated_randomness() -> Iterator[None]:
    """Leave the random state as it was before the block, whatever the block seeds or draws.

    A method's reference pool is either trained (each model seeding scvi-tools' settings) or
    loaded from the cache. Without this the method's own draws after it would depend on which
    happened, and the same seed would give different weights on a first and a second run.
    """
    seed = settings.seed
    # The global states are what seeding sets and what scvi-tools and Lightning draw from.
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        if seed is not None:
            settings.seed = seed  # scvi-tools' recorded seed (setting it re-seeds; undone below)
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (bitwise: any change shows)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
