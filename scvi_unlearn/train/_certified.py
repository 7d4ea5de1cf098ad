r"""Certified unlearning: noisy clipped fine-tuning with an (epsilon, delta) proof.

The method of Koloskova et al. (ICML 2025, "Certified Unlearning for Neural Networks"),
gradient-clipping variant, with its certificate derived here by privacy amplification by
iteration (Feldman et al. 2018) so that every constant is checkable:

1. Project the trained weights onto the ball of radius ``C0`` (``radius``):
   ``x_0 = x * min(1, C0 / ||x||)``, all trainable parameters as one flat vector.
2. For ``t = 0, ..., T - 1``, on a minibatch of retained cells (scVI's loss at a fixed KL
   weight, the forgotten cells never touched):
   ``x_{t+1} = (1 - lr * weight_decay) x_t - lr * clip(g_t, C1) + N(0, sigma^2 I)``,
   ``clip`` scaling the minibatch gradient to L2 norm at most ``C1`` (``grad_clip``).
3. Buffers from the retained cells only: scVI's library-size prior before the first step,
   batch-norm statistics at the final weights (post-processing).

**The certificate** (stated in the methods page). Let ``U`` be the procedure above applied to
the trained model ``A(D)`` and ``U'`` the same procedure applied to *any* model trained
without the forgotten cells, e.g. an exact retrain ``A(D \\ D_f)``, with the same retained
cells, radius, steps and noise. Both start in the ball, so ``||x_0 - x_0'|| <= 2 C0``; one step
maps two weights at distance ``z`` to at most ``c z + s`` with ``c = 1 - lr * weight_decay``
and ``s = 2 lr C1`` (for every minibatch, latent sample and dropout mask, shared by the two
runs; no convexity or smoothness is needed), and the Gaussian noise removes shift ``a_t`` at
Rényi cost ``alpha a_t^2 / (2 sigma^2)`` (the shift-reduction lemma). Spending the shift in
proportion to ``c^(T-1-t)`` gives, for every order ``alpha > 1``,

    D_alpha(U || U') <= alpha * rho,   rho = B^2 / (2 sigma^2 W),
    B = c^T 2 C0 + s sum_{k<T} c^k,   W = sum_{k<T} c^(2k),

in both directions, hence ``(epsilon, delta)``-unlearning with
``epsilon = rho + 2 sqrt(rho log(1/delta))`` (Mironov 2017, Prop. 3). :func:`certified_noise`
inverts it: the noise ``sigma`` for a requested ``(epsilon, delta)``.

Assumptions the proof needs (the method ensures them, and refuses a model that breaks one):

- the update is plain clipped SGD on every trainable parameter (no Adam: its moment
  estimates would carry the history), and every parameter is trainable (a frozen one would
  keep what it learned from the forgotten cells);
- ``C0`` does not depend on the forgotten cells beyond what is released: the default is the
  trained weights' own norm (the projection is then the identity), which the guarantee treats
  as a public number of the released model;
- buffers released with the model are recomputed from the retained cells (batch norm, the
  library-size prior);
- the step count is fixed before the run (the noise is calibrated for it) and the run takes
  exactly that many steps.

The guarantee is about the weights' distribution, not about utility: in the dimension of an
scVI model (10^5-10^6 parameters) the noise a useful epsilon needs is large against the
weights. When the accumulated noise (``sigma * sqrt(T)``) exceeds the weights' root-mean-square
the method refuses with :class:`NoiseDominatedError`, naming the epsilon at which it would
not (``allow_noise_dominated=True`` runs it anyway). ``benchmarks/certified_dp.py`` measures
it on real data.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scvi import REGISTRY_KEYS

from scvi_unlearn._compat import make_data_loader
from scvi_unlearn._utils import first_names
from scvi_unlearn.train._common import UnlearningTrainingPlan, seed_everything
from scvi_unlearn.train._epochs import FixedEpochs
from scvi_unlearn.train._method import TRAINING_PARAMS, PlanMethod, register_method, with_history
from scvi_unlearn.train._params import Param

if TYPE_CHECKING:
    from scvi_unlearn.train._common import Tensors
    from scvi_unlearn.train._method import UnlearningRun

#: Default delta of the certificate as a share of ``1 / n_retained`` (as DP-SGD's default).
CERTIFIED_DELTA_SHARE = 0.1


# -- the certificate -------------------------------------------------------------------------
def _check_unit_interval(name: str, value: float, *, closed_high: bool = False) -> float:
    value = float(value)
    ok = 0 < value <= 1 if closed_high else 0 < value < 1
    if not (math.isfinite(value) and ok):
        bracket = "]" if closed_high else ")"
        raise ValueError(f"`{name}` must lie in (0, 1{bracket}, got {value!r}.")
    return value


def _shift_terms(
    radius: float, lr: float, grad_clip: float, weight_decay: float, steps: int
) -> tuple[float, float]:
    """``(B, W)`` of the module docstring: the total shift to remove and its weights' energy."""
    contraction = 1.0 - lr * weight_decay
    if not 0 < contraction <= 1:
        raise ValueError(
            f"`lr * weight_decay` must lie in [0, 1), got {lr * weight_decay!r}: the step must "
            "shrink the weights, not flip them."
        )
    k = np.arange(int(steps), dtype=np.float64)
    shift = 2.0 * lr * grad_clip
    total = contraction**steps * 2.0 * radius + shift * float(np.sum(contraction**k))
    energy = float(np.sum(contraction ** (2 * k)))
    return float(total), energy


def _check_certificate_inputs(radius, lr, grad_clip, weight_decay, steps) -> None:
    for name, value in (("radius", radius), ("lr", lr), ("grad_clip", grad_clip)):
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    if not (math.isfinite(float(weight_decay)) and float(weight_decay) >= 0):
        raise ValueError(f"`weight_decay` must be a finite number >= 0, got {weight_decay!r}.")
    if int(steps) < 1:
        raise ValueError(f"The certificate needs at least one noisy step, got {steps!r}.")


def certified_noise(
    epsilon: float,
    delta: float,
    *,
    radius: float,
    lr: float,
    grad_clip: float,
    steps: int,
    weight_decay: float = 0.0,
) -> float:
    """Noise standard deviation that makes noisy clipped fine-tuning (epsilon, delta)-unlearning.

    See the module docstring for the theorem: ``sigma = B / sqrt(2 rho W)`` with
    ``sqrt(rho) = sqrt(log(1/delta) + epsilon) - sqrt(log(1/delta))``.

    Parameters
    ----------
    epsilon, delta
        The unlearning guarantee asked for (``epsilon > 0``, ``0 < delta < 1``).
    radius
        ``C0``, the radius the starting weights are projected into.
    lr
        The SGD step size.
    grad_clip
        ``C1``, the L2 norm each minibatch gradient is clipped to.
    steps
        ``T``, the number of noisy steps.
    weight_decay
        ``lambda`` (``lr * weight_decay < 1``); above zero each step contracts and the start's
        distance fades geometrically.

    Returns
    -------
    float
        The per-coordinate standard deviation of the Gaussian noise added at every step.
    """
    if not (math.isfinite(float(epsilon)) and float(epsilon) > 0):
        raise ValueError(f"`epsilon` must be a finite number > 0, got {epsilon!r}.")
    delta = _check_unit_interval("delta", delta)
    _check_certificate_inputs(radius, lr, grad_clip, weight_decay, steps)
    total, energy = _shift_terms(radius, lr, grad_clip, weight_decay, steps)
    log_inv_delta = math.log(1.0 / delta)
    root_rho = math.sqrt(log_inv_delta + float(epsilon)) - math.sqrt(log_inv_delta)
    return total / math.sqrt(2.0 * root_rho**2 * energy)


def certified_epsilon(noise_std: float, delta: float, **schedule: float) -> float:
    """The epsilon that noisy clipped fine-tuning with ``noise_std`` certifies at ``delta``.

    The inverse of :func:`certified_noise` (``inf`` without noise); ``schedule`` holds its
    keywords (``radius``, ``lr``, ``grad_clip``, ``steps``, optionally ``weight_decay``).
    """
    delta = _check_unit_interval("delta", delta)
    schedule = {"weight_decay": 0.0, **schedule}
    _check_certificate_inputs(**schedule)
    if noise_std <= 0:
        return math.inf
    total, energy = _shift_terms(**schedule)
    rho = total**2 / (2.0 * float(noise_std) ** 2 * energy)
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def flat_norm(module: torch.nn.Module) -> float:
    """L2 norm of all trainable parameters of ``module`` as one vector."""
    squares = [p.detach().double().pow(2).sum() for p in module.parameters() if p.requires_grad]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def check_certifiable(module: torch.nn.Module) -> None:
    """Raise for a model the certificate does not cover.

    Raises
    ------
    ValueError
        For frozen parameters: they keep what they learned from the forgotten cells, and no
        noise reaches them.
    """
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(
            "method='certified' cannot certify a model with frozen parameters "
            f"({first_names(frozen)}): "
            "they keep what they learned from the forgotten cells and receive no noise. "
            "Unfreeze them (requires_grad_(True)) or use an exact method (method='retrain')."
        )


class NoiseDominatedError(ValueError):
    """The noise a requested certificate needs would outweigh the model's weights."""


def noise_dominated_message(
    epsilon: float, delta: float, noise: float, noise_ratio: float, weight_rms: float,
    inputs: dict[str, Any],
) -> str:  # fmt: skip
    """Why ``method='certified'`` refuses, with the epsilon at which the noise would fit."""
    steps = inputs["steps"]
    fitting = certified_epsilon(weight_rms / math.sqrt(steps), delta, **inputs)
    return (
        f"method='certified' at epsilon={epsilon:g}, delta={delta:.2g} needs Gaussian noise of "
        f"standard deviation {noise:.3g} on every weight at each of {steps} steps: "
        f"{noise_ratio:.3g} times the weights' root-mean-square ({weight_rms:.3g}) in total, "
        "so the model would be replaced by noise. Noise as large as the weights themselves "
        f"would certify only epsilon ~ {fitting:.3g}. Use an exact method (method='retrain' or "
        "'retrain_fast'), or pass allow_noise_dominated=True to run it anyway."
    )


def _finite_median(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else None


# -- the plan --------------------------------------------------------------------------------
class CertifiedFinetunePlan(UnlearningTrainingPlan):
    """Noisy clipped SGD on the retained cells from the projected trained weights.

    Each training step takes scVI's loss on a retained minibatch, clips its gradient (all
    trainable parameters, one flat vector) to L2 norm ``grad_clip``, and sets
    ``x <- (1 - lr * weight_decay) x - lr * clipped + noise_std * N(0, I)``. The weights are
    projected onto the ball of radius ``radius`` before the first step. Manual optimisation:
    scVI's Adam is never stepped.

    Parameters
    ----------
    module
        The scVI ``VAE`` (a copy of the trained one).
    noise_std
        Standard deviation of the Gaussian noise added to every parameter at every step.
    radius
        Radius of the ball the starting weights are projected into (``None``: their own
        norm, so the projection changes nothing).
    grad_clip
        L2 norm each minibatch gradient is clipped to.
    weight_decay
        Shrinkage of the weights at each step (``lr * weight_decay < 1``).
    **kwargs
        Passed to :class:`~scvi_unlearn.train.UnlearningTrainingPlan` (``lr``, ``kl_weight``,
        ``seed``).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        noise_std: float = 0.0,
        radius: float | None = None,
        grad_clip: float = 1.0,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(module, **kwargs)
        self.automatic_optimization = False
        self.noise_std = float(noise_std)
        self.radius = None if radius is None else float(radius)
        self.grad_clip = float(grad_clip)
        self.step_weight_decay = float(weight_decay)
        #: Noisy steps taken (the certificate holds only for the planned number).
        self.steps_ = 0
        #: Per step, the minibatch gradient's norm before clipping (not private; diagnostics).
        self.grad_norms_: list[float] = []
        #: Steps whose loss or gradient was not finite (taken as a zero gradient).
        self.nonfinite_steps_ = 0
        self._noise_generator: torch.Generator | None = None

    def edit_weights(self) -> dict[str, Any]:
        """Project the weights onto the ball of radius ``radius`` (step 1 of the method)."""
        before = flat_norm(self.module)
        radius = before if self.radius is None else self.radius
        scale = min(1.0, radius / max(before, 1e-12))
        if scale < 1.0:
            with torch.no_grad():
                for p in self.module.parameters():
                    p.mul_(scale)
        return {"weight_norm_before": before, "projection_scale": scale}

    def on_fit_start(self) -> None:
        """Train mode, the projection, and the noise generator seeded on the device."""
        super().on_fit_start()
        if self.trainer.world_size > 1:
            raise RuntimeError(
                "method='certified' runs on one device (devices=1): the certificate counts "
                "one sequence of noisy steps."
            )
        if self._noise_generator is None:
            self._noise_generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def training_step(self, batch: Tensors, batch_idx: int) -> None:
        """One noisy clipped SGD step on a retained minibatch."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        loss, grads = self._gradient(batch, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        if not torch.isfinite(norm):
            # Still a map of the weights and the shared randomness with norm <= grad_clip,
            # so the certificate holds; the step is then noise (and shrinkage) only.
            grads = [torch.zeros_like(p) for p in params]
            norm = torch.zeros((), device=self.device)
            self.nonfinite_steps_ += 1
        factor = torch.clamp(self.grad_clip / (norm + 1e-12), max=1.0)
        shrink = 1.0 - self.lr * self.step_weight_decay
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.mul_(shrink).sub_(self.lr * factor * g)
                if self.noise_std > 0:
                    noise = torch.randn(
                        p.shape, generator=self._noise_generator, device=p.device, dtype=p.dtype
                    )
                    p.add_(self.noise_std * noise)
        self.steps_ += 1
        self.grad_norms_.append(float(norm))
        if loss is not None:
            self.log("train_loss", loss.detach(), prog_bar=True)

    def _gradient(self, batch: Tensors, params: list[torch.Tensor]):
        """The scVI loss on ``batch`` and its gradient; ``(None, [nan])`` if it cannot be computed.

        Weights the noise has driven far enough overflow scVI's encoder, whose distributions
        then refuse non-finite parameters: that step's gradient counts as non-finite.
        """
        try:
            loss = self.retain_loss(batch).loss
        except ValueError:
            return None, [torch.full_like(p, math.nan) for p in params]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# -- post-processing on the retained cells ----------------------------------------------------
@torch.no_grad()
def refresh_batch_norm(module: torch.nn.Module, tensors_iter) -> int:
    """Recompute every batch-norm layer's running statistics at the current weights.

    The statistics become the cumulative average over the given retained minibatches (the
    momentum is set to ``None`` for the pass and restored after). Returns the number of
    layers refreshed.
    """
    layers = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    was_training = module.training
    module.train()
    try:
        for batch in tensors_iter:
            module(batch)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        module.train(was_training)
    return len(layers)


def retained_library_prior(model, retain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scVI library-size prior (per-batch mean, variance of log counts) of retained cells.

    Computed as scvi-tools computes it at set-up, but over ``retain`` only; a batch without
    retained cells gets the retained cells' overall values.
    """
    manager = model.adata_manager
    counts = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    batch = np.asarray(manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).ravel()
    retain = np.asarray(retain, dtype=np.int64)
    library = np.asarray(counts[retain].sum(axis=1)).ravel().astype(np.float64)
    log_library = np.log(np.where(library > 0, library, 1.0))
    n_batch = int(model.summary_stats.n_batch)
    means = np.full(n_batch, log_library.mean(), np.float32)
    variances = np.full(n_batch, log_library.var(), np.float32)
    codes = batch[retain]
    for b in np.unique(codes):
        values = log_library[codes == b]
        means[int(b)], variances[int(b)] = values.mean(), values.var()
    return means.reshape(1, -1), variances.reshape(1, -1)


# -- the method ------------------------------------------------------------------------------
def planned_steps(n_retain: int, batch_size: int, epochs: int) -> int:
    """Steps of a run: epochs x the minibatches ``make_data_splitter`` gives ``n_retain`` cells."""
    full, rest = divmod(int(n_retain), int(batch_size))
    per_epoch = full + (1 if rest > 1 else 0)  # a last minibatch of one cell is dropped
    return int(epochs) * per_epoch


@register_method
class Certified(PlanMethod):
    """Noisy clipped fine-tuning on the retained cells with an (epsilon, delta) certificate.

    Koloskova et al. (ICML 2025), gradient-clipping variant: the certificate (privacy
    amplification by iteration, no convexity needed) is derived in
    ``scvi_unlearn/train/_certified.py`` and on the methods page; it is recorded in the
    provenance (``metrics["certificate"]``) and the unlearning certificate. The noise a useful
    epsilon needs is large for a model of scVI's size; the results page measures utility.
    """

    name = "certified"
    description = "noisy clipped fine-tune with an (epsilon, delta) certificate (Koloskova 2025)"
    plan = CertifiedFinetunePlan
    params = {
        **TRAINING_PARAMS,
        "epsilon": Param(10.0, "float", low=0, low_open=True, doc="epsilon of the certificate"),
        "delta": Param(
            None,
            "float",
            low=0,
            high=1,
            low_open=True,
            high_open=True,
            allow_none=True,
            doc="delta of the certificate (default 0.1 / retained cells)",
        ),
        "radius": Param(
            None,
            "float",
            low=0,
            low_open=True,
            allow_none=True,
            doc="radius C0 the weights are projected into (default: their norm)",
        ),
        "grad_clip": Param(kind="float", low=0, low_open=True),
        "weight_decay": Param(kind="float", low=0),
        "allow_noise_dominated": Param(
            False,
            "bool",
            doc="run even when the noise the certificate needs outweighs the weights",
        ),
    }
    epochs = FixedEpochs(20)

    def run(self, run: UnlearningRun) -> dict[str, Any]:
        """Calibrate the noise, run the noisy steps, refresh buffers, record the certificate."""
        module = run.model.module
        check_certifiable(module)
        hp = run.hyperparameters
        started = time.perf_counter()
        n_retain = int(run.retain.size)
        delta = CERTIFIED_DELTA_SHARE / n_retain if hp["delta"] is None else float(hp["delta"])
        radius = flat_norm(module) if hp["radius"] is None else float(hp["radius"])
        arguments = {k: v for k, v in self.plan_arguments(run).items() if k != "radius"}
        lr, grad_clip = float(arguments["lr"]), float(arguments["grad_clip"])
        weight_decay = float(arguments["weight_decay"])
        steps = planned_steps(n_retain, hp["batch_size"], run.max_epochs)
        if steps < 1:
            raise ValueError(
                "method='certified' needs at least one noisy step: give max_epochs >= 1."
            )
        inputs = {"radius": radius, "lr": lr, "grad_clip": grad_clip, "steps": steps,
                  "weight_decay": weight_decay}  # fmt: skip
        noise = certified_noise(hp["epsilon"], delta, **inputs)
        n_parameters = int(sum(p.numel() for p in module.parameters()))
        weight_rms = radius / math.sqrt(n_parameters)
        noise_ratio = noise * math.sqrt(steps) / weight_rms
        if noise_ratio > 1 and not hp["allow_noise_dominated"]:
            message = noise_dominated_message(
                hp["epsilon"], delta, noise, noise_ratio, weight_rms, inputs
            )
            raise NoiseDominatedError(message)
        library_prior = self._refresh_library_prior(run)
        plan = self.plan(module, noise_std=noise, radius=radius, **arguments)
        runner = run.fit(plan, run.retain)
        if plan.steps_ != steps:
            raise RuntimeError(
                f"The certificate was calibrated for {steps} noisy steps but {plan.steps_} ran; "
                "the model is not certified."
            )
        seed_everything(run.seed)
        buffers = {
            "library_prior": library_prior,
            "batch_norm_layers": self._refresh_batch_norm(run),
        }
        certificate = {
            "epsilon": float(hp["epsilon"]),
            "delta": delta,
            "noise_std": noise,
            "steps": steps,
            "radius": radius,
            "radius_source": "weights' norm" if hp["radius"] is None else "given",
            "grad_clip": grad_clip,
            "lr": lr,
            "weight_decay": weight_decay,
            "epsilon_check": certified_epsilon(noise, delta, **inputs),
            "theorem": (
                "noisy clipped SGD on retained cells from weights projected into a ball of "
                "radius C0: (epsilon, delta)-unlearning against the same procedure run from "
                "any model trained without the forgotten cells (Koloskova et al. 2025; privacy "
                "amplification by iteration, Feldman et al. 2018)"
            ),
            "n_parameters": n_parameters,
            "noise_to_weights": noise_ratio,
        }
        summary = {
            "certificate": certificate,
            "projection": plan.edit_summary_,
            "weight_norm_after": flat_norm(module),
            "median_grad_norm": _finite_median(plan.grad_norms_),
            "nonfinite_steps": int(plan.nonfinite_steps_),
            "buffers_refreshed": buffers,
            "wall_seconds": float(time.perf_counter() - started),
        }
        return with_history(summary, runner)

    @staticmethod
    def _refresh_library_prior(run: UnlearningRun) -> bool:
        """The scVI library-size prior from the retained cells, before any step.

        scvi-tools computes it from every cell at set-up; with ``use_observed_lib_size=False``
        it enters each step's loss, and the proof needs steps that read retained cells only.
        """
        module = run.model.module
        if not hasattr(module, "library_log_means"):
            return False
        means, variances = retained_library_prior(run.model, run.retain)
        with torch.no_grad():
            module.library_log_means.copy_(torch.as_tensor(means))
            module.library_log_vars.copy_(torch.as_tensor(variances))
        return True

    @staticmethod
    def _refresh_batch_norm(run: UnlearningRun) -> int:
        """Batch-norm statistics at the final weights from the retained cells."""
        model, module = run.model, run.model.module
        device = next(module.parameters()).device
        loader = make_data_loader(
            model, model.adata, indices=run.retain, batch_size=run.hyperparameters["batch_size"]
        )
        batches = ({k: v.to(device) for k, v in b.items() if torch.is_tensor(v)} for b in loader)
        try:
            return refresh_batch_norm(module, batches)
        finally:
            module.eval()


__all__ = [
    "CERTIFIED_DELTA_SHARE",
    "Certified",
    "CertifiedFinetunePlan",
    "NoiseDominatedError",
    "certified_epsilon",
    "certified_noise",
    "check_certifiable",
    "flat_norm",
    "planned_steps",
    "refresh_batch_norm",
    "retained_library_prior",
]
