"""Adversarial unlearning: the VAE against membership critics (:ref:`methods-extragradient`).

Both plans share the game. ``K`` critics see standardised per-cell attack features
(:func:`~scvi_unlearn.module.feature_matrix`: losses, per-count losses, posterior statistics)
and classify forget cells (label 1) against non-members of the same population (label 0),
minimising the class-balanced binary cross-entropy ``BCE_phi``. The VAE minimises

    L_vae(theta, phi) = mean retain negative ELBO (scVI's own loss and scale)
                        + lambda * mean_k KL(Bernoulli(1/2) || Bernoulli(D_k(f_theta(F))))

i.e. it makes every critic maximally unsure (probability 1/2) about the forget cells. This is
the non-saturating form of the game (see :func:`~scvi_unlearn.train._critics.
indistinguishability_loss`): its gradient does not vanish against confident critics, as the
minimax term ``log 2 - BCE`` does, and it does not reward overshooting (forget cells fitting
*worse* than non-members, which an attacker also detects: the "Streisand" artefact, see
:ref:`methods-metrics`), as "label the forget cells non-members" does. With Bayes-optimal
critics its zero set is exactly "forget and non-member features are identically distributed". The
critics' ``log 2 - BCE`` (a Jensen-Shannon lower bound) is logged as ``privacy_js``.

Two details keep the game honest: the VAE's privacy gradient flows through the forget cells'
features only (non-member features are the reference, computed without gradient, so the VAE
cannot win by memorising the non-members), and forget / non-member cells pass through the VAE
in eval mode (batch-norm statistics are not updated from them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scvi_unlearn.audit import auc_from_scores
from scvi_unlearn.module import LOSS_FEATURE, SCALAR_FEATURES, feature_matrix, per_cell_loss_terms
from scvi_unlearn.train._common import (
    Tensors,
    UnlearningTrainingPlan,
    eval_mode,
    gather_tensors,
    iter_chunks,
    loss_auc,
    n_cells,
)
from scvi_unlearn.train._critics import (
    CriticEnsemble,
    balanced_accuracy,
    critic_losses,
    indistinguishability_loss,
    js_divergence_estimate,
)
from scvi_unlearn.train._epochs import MIN_SELECTION_CELLS, FixedEpochs
from scvi_unlearn.train._method import (
    RETAIN_FRACTION_PARAMS,
    TRAINING_PARAMS,
    MethodResult,
    UnlearningMethod,
    UnlearningRun,
    register_method,
    retain_validation,
    split_validation,
    warn_underpowered,
    with_history,
)
from scvi_unlearn.train._params import Param
from scvi_unlearn.train._references import REFERENCE_PARAMS, out_calibration, run_reference_pool
from scvi_unlearn.train._selection import BestStateSelector

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: Key of the per-cell reference means in a calibrated plan's held tensors.
CALIBRATION_KEY = "reference_out_mean"
_LOSS_COLUMN = SCALAR_FEATURES.index(LOSS_FEATURE)


class _AdversarialUnlearningPlan(UnlearningTrainingPlan):
    """Critics, feature standardisation, critic pre-training and validation-based selection.

    Parameters
    ----------
    module
        The scVI ``VAE`` to unlearn (a copy of the trained one; updated in place).
    forget_tensors, nonmember_tensors
        Forget cells and same-population non-members used by the game.
    forget_val_tensors, nonmember_val_tensors
        Held-out forget / non-member cells for early stopping (the loss-threshold AUC).
    lambda_
        Weight of the privacy term (in nats per forget cell and critic).
    n_critics, critic_hidden
        Number of critics and their hidden width (two hidden layers).
    critic_pretrain_steps, critic_pretrain_lr
        Full-batch Adam steps that fit the critics on the warm-start model's features before
        the game starts, so the first VAE gradients come from informed critics.
    adv_batch_size
        Forget / non-member cells per step (all of them when fewer).
    target_auc, max_utility_loss, patience, select_state
        Early stopping, see :class:`~scvi_unlearn.train.BestStateSelector` (``select_state``
        is its ``select``: False keeps the final state of the fixed budget).
    calibration_std
        Per-cell calibrated critics (``extragradient_calibrated``): every held tensor dict then
        carries, under :data:`CALIBRATION_KEY`, each cell's mean features under the reference
        models that never trained on it, and the critics see ``(features - that mean) /
        calibration_std`` (per feature, pooled over cells): the offline LiRA statistic, what a
        per-cell attacker sees. Early stopping then uses that statistic's AUC too.
    **kwargs
        Passed to :class:`~scvi_unlearn.train.UnlearningTrainingPlan` (``lr``, ``kl_weight``,
        ``seed``, scVI plan arguments).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        forget_tensors: Tensors,
        nonmember_tensors: Tensors,
        *,
        forget_val_tensors: Tensors | None = None,
        nonmember_val_tensors: Tensors | None = None,
        lambda_: float = 10.0,
        n_critics: int = 3,
        critic_hidden: int = 32,
        critic_pretrain_steps: int = 200,
        critic_pretrain_lr: float = 1e-2,
        adv_batch_size: int = 256,
        target_auc: float = 0.5,
        max_utility_loss: float = 0.05,
        patience: int | None = None,
        select_state: bool = True,
        calibration_std: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        held = {
            "forget": forget_tensors,
            "nonmember": nonmember_tensors,
            "forget_val": forget_val_tensors,
            "nonmember_val": nonmember_val_tensors,
        }
        super().__init__(module, held=held, **kwargs)
        n_features = len(SCALAR_FEATURES)
        self.lambda_ = float(lambda_)
        self.critics = CriticEnsemble(n_features, n_critics, critic_hidden, seed=self.seed)
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        # Per-cell calibration (the LiRA statistic): held tensors then carry each cell's mean
        # features under the reference models that never saw it (CALIBRATION_KEY).
        self.calibrated = calibration_std is not None
        if self.calibrated:
            self._check_calibration(held, n_features)
            std = torch.as_tensor(calibration_std, dtype=torch.float32).reshape(n_features)
            self.register_buffer("calibration_std", std)
        self.critic_pretrain_steps = int(critic_pretrain_steps)
        self.critic_pretrain_lr = float(critic_pretrain_lr)
        self.adv_batch_size = int(adv_batch_size)
        self.selector = BestStateSelector(target_auc, max_utility_loss, patience, select_state)
        self._val_sum = 0.0
        self._val_n = 0

    # -- features and losses ---------------------------------------------------------------
    def features(self, tensors: Tensors) -> torch.Tensor:
        """Standardised attack features of held cells (eval mode, differentiable)."""
        with eval_mode(self.module):
            raw = feature_matrix(per_cell_loss_terms(self.module, tensors))
        if self.calibrated:
            raw = (raw - tensors[CALIBRATION_KEY]) / self.calibration_std
        return (raw - self.feature_mean) / self.feature_std

    @staticmethod
    def _check_calibration(held: dict, n_features: int) -> None:
        for name, tensors in held.items():
            if tensors is None:
                continue
            if CALIBRATION_KEY not in tensors:
                raise ValueError(
                    f"Calibrated critics need {CALIBRATION_KEY!r} in the {name} tensors: each "
                    "cell's mean features under the reference models that left it out."
                )
            shape = tuple(tensors[CALIBRATION_KEY].shape)
            if shape != (n_cells(tensors), n_features):
                raise ValueError(
                    f"{name}[{CALIBRATION_KEY!r}] has shape {shape}, expected "
                    f"({n_cells(tensors)}, {n_features})."
                )

    @torch.no_grad()
    def _all_features(self, tensors: Tensors) -> torch.Tensor:
        chunks = [self.features(c) for c in iter_chunks(tensors, self.adv_batch_size)]
        return torch.cat(chunks)

    def game_losses(self, forget: Tensors, nonmember: Tensors) -> dict[str, torch.Tensor]:
        """The privacy term (VAE's view) and the critics' loss (critics' view) on a minibatch.

        ``privacy`` has gradients for the VAE only, ``critic`` for the critics only, so one
        backward pass of their sum gives each player its own gradient.
        """
        feats_f = self.features(forget)
        with torch.no_grad():
            feats_n = self.features(nonmember)
        # VAE's view: the critics are fixed functions of the forget features.
        privacy = indistinguishability_loss(self.critics(feats_f, detach_params=True))
        # Critics' view: the features are fixed inputs.
        logits_f = self.critics(feats_f.detach())
        logits_n = self.critics(feats_n)
        critic = critic_losses(logits_f, logits_n)
        return {
            "privacy": privacy,
            "critic": critic.mean(),
            "js": js_divergence_estimate(critic.detach()).mean(),
            "critic_accuracy": balanced_accuracy(logits_f.detach(), logits_n.detach()),
        }

    # -- fit start: standardisation, critic pre-training, warm-start validation ------------
    def on_fit_start(self) -> None:
        """Standardise features, pre-train the critics and score the warm start."""
        super().on_fit_start()
        with torch.no_grad():
            self.feature_mean.zero_()
            self.feature_std.fill_(1.0)
            both = torch.cat(
                [
                    self._all_features(self.held["forget"]),
                    self._all_features(self.held["nonmember"]),
                ]
            )
            self.feature_mean.copy_(both.mean(0))
            std = both.std(0) if both.shape[0] > 1 else torch.ones_like(both[0])
            self.feature_std.copy_(std.clamp_min(1e-6))
        self._pretrain_critics()
        self._select(epoch=-1, retain_elbo=self._warm_retain_elbo())

    @torch.enable_grad()
    def _pretrain_critics(self) -> None:
        if self.critic_pretrain_steps <= 0:
            return
        feats_f = self._all_features(self.held["forget"])
        feats_n = self._all_features(self.held["nonmember"])
        optimizer = torch.optim.Adam(self.critics.parameters(), lr=self.critic_pretrain_lr)
        for _ in range(self.critic_pretrain_steps):
            optimizer.zero_grad()
            loss = critic_losses(self.critics(feats_f), self.critics(feats_n)).sum()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def _warm_retain_elbo(self) -> float | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        loader = datamodule.val_dataloader() if datamodule is not None else None
        if loader is None:
            return None
        total, count = 0.0, 0
        with eval_mode(self.module):
            for batch in loader:
                batch = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
                nelbo = per_cell_loss_terms(self.module, batch)["neg_elbo"]
                total += float(nelbo.sum())
                count += nelbo.numel()
        return total / count if count else None

    # -- validation and selection ----------------------------------------------------------
    def validation_step(self, batch: Tensors, batch_idx: int) -> None:
        """Accumulate the retain-validation negative ELBO (posterior mean, per cell)."""
        nelbo = per_cell_loss_terms(self.module, batch)["neg_elbo"]
        self._val_sum += float(nelbo.sum())
        self._val_n += nelbo.numel()

    def on_validation_epoch_start(self) -> None:
        """Reset the retain-validation accumulators."""
        self._val_sum, self._val_n = 0.0, 0

    def _validation_auc(self) -> float:
        forget_val, nonmember_val = self.held.get("forget_val"), self.held.get("nonmember_val")
        if not n_cells(forget_val or {}) or not n_cells(nonmember_val or {}):
            return math.nan
        if self.calibrated:  # what a per-cell (LiRA offline) attacker sees, not the raw loss
            with torch.no_grad():
                loss_f = self._all_features(forget_val)[:, _LOSS_COLUMN]
                loss_n = self._all_features(nonmember_val)[:, _LOSS_COLUMN]
            return float(auc_from_scores(-loss_f.cpu().numpy(), -loss_n.cpu().numpy()))
        return loss_auc(self.module, forget_val, nonmember_val)

    def _select(self, epoch: int, retain_elbo: float | None) -> None:
        auc = self._validation_auc()
        if math.isnan(auc):
            return
        if self.trainer.world_size > 1 and retain_elbo is not None:
            retain_elbo = float(self.trainer.strategy.reduce(torch.tensor(retain_elbo)))
        stop = self.selector.update(self.module, epoch, auc, retain_elbo)
        if epoch >= 0:
            self.log("unlearn_auc_validation", auc, prog_bar=True, on_epoch=True)
            if retain_elbo is not None:
                self.log("retain_elbo_validation", retain_elbo, on_epoch=True)
        if stop:
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        """Score the epoch on the validation cells and keep the best state."""
        retain_elbo = self._val_sum / self._val_n if self._val_n else None
        self._select(self.current_epoch, retain_elbo)
        self._val_sum, self._val_n = 0.0, 0

    def on_train_end(self) -> None:
        """Restore the best validation state."""
        self.selector.restore(self.module)

    def log_game(self, losses: dict[str, torch.Tensor], retain_loss: torch.Tensor) -> None:
        """Log the game's quantities (epoch means, privacy term in the progress bar)."""
        n = n_cells(self.held["forget"])
        self.log("privacy_loss", losses["privacy"].detach(), prog_bar=True, batch_size=n)
        self.log("privacy_js", losses["js"], batch_size=n)
        self.log("critic_loss", losses["critic"].detach(), batch_size=n)
        self.log("critic_accuracy", losses["critic_accuracy"], batch_size=n)
        self.log("train_loss", retain_loss.detach(), prog_bar=True)


def _raw(optimizer):
    """The torch optimizer behind a Lightning optimizer wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _snapshot(optimizer: torch.optim.Optimizer) -> tuple[list, dict]:
    """Copies of an optimizer's parameters and state, to undo a look-ahead step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    values = [p.detach().clone() for p in params]
    state = {
        p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
        for p in params
        if p in optimizer.state
    }
    return list(zip(params, values)), state


@torch.no_grad()
def _restore(optimizer: torch.optim.Optimizer, snapshot: tuple[list, dict]) -> None:
    """Put back parameters and state saved by :func:`_snapshot` (gradients are kept)."""
    pairs, state = snapshot
    for p, value in pairs:
        p.copy_(value)
        if p in state:
            optimizer.state[p] = state[p]
        else:
            optimizer.state.pop(p, None)


def extragradient_step(optimizers: Sequence, set_gradients: Callable[[], Any]) -> Any:
    """One extragradient step (Korpelevich 1976) of several players, each with its optimizer.

    ``set_gradients()`` must zero and then set every player's ``.grad`` at the current
    parameters (each player's gradient of its own loss). The step:

    1. gradients at ``w``; every optimizer steps to the look-ahead point ``w'``;
    2. gradients at ``w'``;
    3. parameters and optimizer states are restored to ``w``;
    4. every optimizer steps from ``w`` with the gradients of step 2.

    With SGD this is ``w <- w - eta * g(w - eta * g(w))``; with Adam it is Extra-Adam
    (Gidel et al. 2019), whose moment estimates see only look-ahead gradients.

    Parameters
    ----------
    optimizers
        Torch optimizers or Lightning's wrappers of them.
    set_gradients
        Closure computing the gradients; its return value (from step 2) is returned.

    Examples
    --------
    The bilinear game ``min_x max_y x * y``, where simultaneous gradient steps spiral out:

    >>> x, y = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(1.0))
    >>> opts = [torch.optim.SGD([x], lr=0.1), torch.optim.SGD([y], lr=0.1)]
    >>> def grads():
    ...     x.grad, y.grad = y.detach().clone(), -x.detach().clone()
    >>> for _ in range(100):
    ...     extragradient_step(opts, grads)
    >>> bool(torch.hypot(x, y) < 1.0)
    True
    """
    snapshots = [_snapshot(_raw(opt)) for opt in optimizers]
    set_gradients()
    for opt in optimizers:  # look-ahead step of every player
        opt.step()
    out = set_gradients()
    for opt, snapshot in zip(optimizers, snapshots):
        _restore(_raw(opt), snapshot)
    for opt in optimizers:  # the real step, with the look-ahead gradients
        opt.step()
    return out


class ExtraGradientUnlearningPlan(_AdversarialUnlearningPlan):
    """Extragradient co-training of the VAE against forget-vs-non-member critics.

    Each training step on a retain minibatch ``x_r`` (with forget / non-member minibatches
    ``F``, ``N``) is one extragradient step (Korpelevich 1976; Chavdarova et al. 2019) on the
    game ``min_theta L_vae(theta, phi)``, ``min_phi BCE(theta, phi)`` (module docstring):

    1. gradients at the current point ``(theta, phi)``;
    2. look-ahead: one optimizer step of both players from there, to ``(theta', phi')``;
    3. gradients ``g_theta', g_phi'`` at the look-ahead point;
    4. parameters *and optimizer states* restored to ``(theta, phi)``;
    5. the real optimizer step of both players, with the look-ahead gradients.

    Both players use Adam (the VAE with scVI's settings), so steps 2 and 5 are Adam steps:
    the Extra-Adam form of extragradient (Gidel et al. 2019). The two time scales are ``lr``
    for the VAE and ``critic_lr`` for the critics, by default ``10 * lr``: the critics must
    keep up with the VAE (as in Heusel et al.'s two time-scale rule, where the discriminator
    is the faster player). With the original study's slower critics (``lr / 10``) the VAE
    outruns them and learns to fool them without removing the membership signal, just as
    against frozen critics (measured on the test data: loss-attack AUC 0.90 -> 0.80 with
    ``lr / 10``, 0.90 -> 0.50 with ``10 * lr``).

    Each epoch the loss-threshold AUC on validation forget / non-member cells and the
    retain-validation ELBO are measured; the state closest to ``target_auc`` within the
    utility budget is restored at the end.

    Parameters
    ----------
    critic_lr
        Learning rate of the critics' Adam optimizer (default ``10 * lr``).
    **kwargs
        See ``_AdversarialUnlearningPlan`` and
        :class:`~scvi_unlearn.train.UnlearningTrainingPlan`.

    Notes
    -----
    Batch-norm running statistics are updated by both retain forward passes of a step and
    are not rolled back: they only ever see retain cells.
    """

    def __init__(self, *args: Any, critic_lr: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.critic_lr = float(critic_lr) if critic_lr is not None else 10.0 * self.lr
        self.automatic_optimization = False

    def configure_optimizers(self):
        """Adam for the VAE (scVI's settings) and Adam for the critics at ``critic_lr``."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        vae_opt = self.get_optimizer_creator()(params)
        critic_opt = torch.optim.Adam(self.critics.parameters(), lr=self.critic_lr)
        return [vae_opt, critic_opt]

    def _game_backward(self, batch: Tensors, forget: Tensors, nonmember: Tensors):
        """Set both players' gradients at the current parameters; return the losses."""
        for opt in self.optimizers():
            opt.zero_grad()
        _, _, retain = self.forward(batch, loss_kwargs=self.loss_kwargs)
        losses = self.game_losses(forget, nonmember)
        self.manual_backward(retain.loss + self.lambda_ * losses["privacy"] + losses["critic"])
        return retain, losses

    def training_step(self, batch: Tensors, batch_idx: int) -> torch.Tensor:
        """One extragradient step of both players."""
        forget = self.sample_held("forget", self.adv_batch_size)
        nonmember = self.sample_held("nonmember", self.adv_batch_size)
        retain, losses = extragradient_step(
            self.optimizers(), lambda: self._game_backward(batch, forget, nonmember)
        )
        self.compute_and_log_metrics(retain, self.train_metrics, "train")
        self.log_game(losses, retain.loss)
        return retain.loss.detach()


class FrozenCriticPlan(_AdversarialUnlearningPlan):
    """The original study's failing baseline: critics trained once, then frozen.

    The critics are fitted on the warm-start model's features (``critic_pretrain_steps``
    full-batch steps) and never updated again; the VAE then minimises the retain ELBO plus
    ``lambda_`` times the privacy term against those fixed critics, by plain gradient
    descent. The VAE soon finds the critics' blind spots, so they stop measuring membership:
    the baseline the extragradient game is meant to fix.
    """

    def __init__(self, *args: Any, critic_pretrain_steps: int = 300, **kwargs: Any):
        super().__init__(*args, critic_pretrain_steps=critic_pretrain_steps, **kwargs)

    def on_fit_start(self) -> None:
        """Pre-train the critics, then freeze them."""
        super().on_fit_start()
        self.critics.requires_grad_(False)

    def training_step(self, batch: Tensors, batch_idx: int) -> torch.Tensor:
        """Retain ELBO plus ``lambda_`` times the frozen critics' privacy term."""
        retain = self.retain_loss(batch)
        forget = self.sample_held("forget", self.adv_batch_size)
        nonmember = self.sample_held("nonmember", self.adv_batch_size)
        losses = self.game_losses(forget, nonmember)
        self.log_game(losses, retain.loss)
        return retain.loss + self.lambda_ * losses["privacy"]


# -- the methods -------------------------------------------------------------------------------
_SELECTION_PARAMS = {
    "val_fraction": Param(0.3, "float", low=0, high=1, low_open=True, high_open=True),
    "retain_val_fraction": Param(0.1, "float", low=0, high=1, high_open=True),
    "target_auc": Param(kind="float", low=0, high=1),
    "max_utility_loss": Param(kind="float", low=0),
    "patience": Param(kind="int", low=1, allow_none=True),
}
_GAME_PARAMS = {
    "lambda_": Param(kind="float", low=0, doc="weight of the privacy term"),
    "n_critics": Param(kind="int", low=1),
    "critic_hidden": Param(kind="int", low=1),
    "critic_pretrain_steps": Param(kind="int", low=0),
    "critic_pretrain_lr": Param(kind="float", low=0, low_open=True),
    "adv_batch_size": Param(kind="int", low=1),
}
_ADVERSARIAL_PARAMS = {
    **TRAINING_PARAMS,
    **_SELECTION_PARAMS,
    **_GAME_PARAMS,
    **RETAIN_FRACTION_PARAMS,
}


class AdversarialMethod(UnlearningMethod):
    """The VAE trained against critics that tell forget cells from non-members.

    Every forget cell takes part in the game (all must be forgotten); a share of the forget
    cells and of the non-members (``val_fraction``) is held back to select the epoch, and the
    non-members used for that are never shown to the critics.
    """

    needs_nonmembers = True
    epochs = FixedEpochs(20)
    calibrated: bool = False

    def run(self, run: UnlearningRun) -> MethodResult:
        """Play the game on the retained cells; keep the selected state."""
        hp = run.hyperparameters
        f_fit, f_val = split_validation(run.forget, hp["val_fraction"], run.seed, "forget cells")
        n_fit, n_val = split_validation(
            run.nonmembers, hp["val_fraction"], run.seed, "non-members"
        )
        r_train, r_val = retain_validation(run, hp["retain_val_fraction"])
        underpowered = warn_underpowered(run, f_val.size, n_val.size)
        # Selection uses (f_val, n_val), so the cells to report on, (f_fit, n_fit), play no
        # part in choosing the epoch.
        sets = {
            "forget": run.forget,
            "nonmember": n_fit,
            "forget_val": f_val,
            "nonmember_val": n_val,
        }
        tensors = {name: gather_tensors(run.model, cells) for name, cells in sets.items()}
        calibration = _calibrate(run, sets, tensors) if self.calibrated else {}
        plan = self.plan(
            run.model.module,
            tensors["forget"],
            tensors["nonmember"],
            forget_val_tensors=tensors["forget_val"],
            nonmember_val_tensors=tensors["nonmember_val"],
            calibration_std=calibration.get("std"),
            select_state=not underpowered,
            **self.plan_arguments(run),
        )
        runner = run.fit(plan, r_train, r_val)
        summary = plan.selector.summary()
        names = run.model.adata.obs_names
        summary.update(
            selection_underpowered=bool(underpowered),
            min_selection_cells=MIN_SELECTION_CELLS,
            n_forget_fit=int(f_fit.size),
            n_forget_val=int(f_val.size),
            n_nonmember_fit=int(n_fit.size),
            n_nonmember_val=int(n_val.size),
            n_retain_val=int(r_val.size),
            forget_val_names=names[f_val].tolist(),
            nonmember_val_names=names[n_val].tolist(),
        )
        summary.update({k: v for k, v in calibration.items() if k != "std"})
        return MethodResult(
            metrics=with_history(summary, runner),
            produced_by=self.name,
            exact=False,
            selection_forget=np.asarray(f_val, np.int64),
            selection_nonmembers=np.asarray(n_val, np.int64),
        )


def _calibrate(run: UnlearningRun, sets: dict, tensors: dict) -> dict[str, Any]:
    """Add each cell's OUT-reference mean features to its tensors; return the pooled SD.

    The reference pool is the method's own (:func:`method_reference_pool`), never the audit's
    shadows.
    """
    pool, record = run_reference_pool(run)
    everything = np.concatenate(list(sets.values())).astype(np.int64)
    _, std = out_calibration(pool, everything)
    for name, cells in sets.items():
        mean, _ = out_calibration(pool, np.asarray(cells, dtype=np.int64))
        tensors[name][CALIBRATION_KEY] = torch.as_tensor(mean, dtype=torch.float32)
    return {"std": torch.as_tensor(std, dtype=torch.float32), **record}


_CRITIC_LR = {"critic_lr": Param(kind="float", low=0, low_open=True, allow_none=True)}


@register_method
class Extragradient(AdversarialMethod):
    """Extragradient co-training of the VAE and forget-vs-non-member critics."""

    name = "extragradient"
    description = "extragradient co-training against forget-vs-non-member critics"
    plan = ExtraGradientUnlearningPlan
    params = {**_ADVERSARIAL_PARAMS, **_CRITIC_LR}


@register_method
class ExtragradientCalibrated(AdversarialMethod):
    """Extragradient against critics that see each cell calibrated by its OUT references."""

    name = "extragradient_calibrated"
    description = (
        "extragradient against critics that see each cell calibrated by its own "
        "OUT reference models (the LiRA statistic)"
    )
    plan = ExtraGradientUnlearningPlan
    params = {**_ADVERSARIAL_PARAMS, **_CRITIC_LR, **REFERENCE_PARAMS}
    calibrated = True


@register_method
class FrozenCritic(AdversarialMethod):
    """The VAE trained to fool pre-trained, frozen critics (a failing baseline)."""

    name = "frozen_critic"
    description = "VAE trained to fool pre-trained, frozen critics (failing baseline)"
    plan = FrozenCriticPlan
    params = dict(_ADVERSARIAL_PARAMS)
