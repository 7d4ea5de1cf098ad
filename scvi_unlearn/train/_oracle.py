"""Oracle matching (Georgiev et al., ICLR 2025): move the forget cells' outputs to an oracle's.

The oracle is the model that never saw the forget cells. Its outputs are estimated from a pool
of reference models trained on random halves of the cells (the method's own pool, never the
audit's shadows): for a forget cell, the target is the trained model's output plus the mean
output of the references that left the cell out minus the mean of those that trained on it.
The difference removes the cell's own contribution ("datamodel" estimate) while keeping the
trained model's idiosyncrasies, which the references do not share.

Which outputs: the decoder's log expected counts (gene space, the same coordinates in every
model) and the per-cell loss a membership attacker scores, in units of its spread under the
OUT references (the LiRA statistic). The posterior mean and variance are not matched: latent
coordinates of independently initialised references are not aligned (any rotation of z gives
the same likelihood), so a difference of their means has no meaning in the target's latent
space. Everything the encoder does to a forget cell still reaches both matched outputs.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from scvi_unlearn.module import per_cell_loss_terms
from scvi_unlearn.train._common import (
    Tensors,
    UnlearningTrainingPlan,
    eval_mode,
    gather_tensors,
    iter_chunks,
)
from scvi_unlearn.train._epochs import FixedEpochs
from scvi_unlearn.train._method import (
    RETAIN_FRACTION_PARAMS,
    TRAINING_PARAMS,
    PlanMethod,
    UnlearningRun,
    register_method,
    with_history,
)
from scvi_unlearn.train._params import Param
from scvi_unlearn.train._references import REFERENCE_PARAMS, run_reference_pool

#: Keys of the oracle targets in the forget cells' held tensors.
TARGET_LOG_MU = "oracle_log_mu"
TARGET_SCORE = "oracle_score"
_EPS = 1e-8


def _log_mu_and_score(module: torch.nn.Module, tensors: Tensors):
    """Log expected counts per gene and the attacker's loss score, per cell.

    The score is the audit's ``neg_elbo_per_count`` (``LOSS_FEATURE``), differentiable.
    """
    terms = per_cell_loss_terms(module, tensors)
    log_mu = torch.log(terms["px_mu"] + _EPS)
    score = terms["neg_elbo"] / terms["library"].clamp_min(1.0)
    return log_mu, score


@torch.no_grad()
def model_outputs(module: torch.nn.Module, tensors: Tensors, chunk_size: int = 512):
    """:func:`_log_mu_and_score` of every cell of ``tensors`` in eval mode, on CPU."""
    mus, scores = [], []
    with eval_mode(module):
        for chunk in iter_chunks(tensors, chunk_size):
            log_mu, score = _log_mu_and_score(module, chunk)
            mus.append(log_mu.cpu())
            scores.append(score.cpu())
    return torch.cat(mus), torch.cat(scores)


def oracle_targets(
    module: torch.nn.Module,
    reference_state_dicts: list[dict],
    in_mask: np.ndarray,
    tensors: Tensors,
) -> dict[str, Any]:
    """Oracle targets of the cells in ``tensors``, from the references' outputs.

    Parameters
    ----------
    module
        The trained model's module (not modified).
    reference_state_dicts
        Weights of each reference model (same architecture as ``module``).
    in_mask
        ``(n_references, n_cells)``: whether each reference trained on each cell.
    tensors
        The cells' tensors, in the order of ``in_mask``'s columns.

    Returns
    -------
    ``log_mu`` and ``score`` targets (tensors), the per-cell shift of the score, and the
    score's SD under OUT references (the unit of the score term).
    """
    in_mask = np.asarray(in_mask, dtype=bool)
    n_in, n_out = in_mask.sum(0), (~in_mask).sum(0)
    if (n_in == 0).any() or (n_out == 0).any():
        raise ValueError(
            "Every cell needs at least one reference that trained on it and one that left it "
            f"out; {int(((n_in == 0) | (n_out == 0)).sum())} cells lack one. Use more reference "
            "models (an even number, >= 4)."
        )
    base_mu, base_score = model_outputs(module, tensors)
    reference = copy.deepcopy(module)
    sum_in_mu = torch.zeros_like(base_mu)
    sum_out_mu = torch.zeros_like(base_mu)
    sum_in_s = torch.zeros_like(base_score)
    sum_out_s = torch.zeros_like(base_score)
    out_scores = []
    for k, state in enumerate(reference_state_dicts):
        try:
            reference.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"Reference model {k} does not have the trained model's architecture (a cached "
                f"pool from another recipe?): {err}"
            ) from err
        mu, score = model_outputs(reference, tensors)
        is_in = torch.as_tensor(in_mask[k])
        sum_in_mu += mu * is_in[:, None]
        sum_out_mu += mu * (~is_in)[:, None]
        sum_in_s += score * is_in
        sum_out_s += score * ~is_in
        out_scores.append(torch.where(~is_in, score, torch.nan))
    n_in_t, n_out_t = torch.as_tensor(n_in).float(), torch.as_tensor(n_out).float()
    shift_mu = sum_out_mu / n_out_t[:, None] - sum_in_mu / n_in_t[:, None]
    shift_score = sum_out_s / n_out_t - sum_in_s / n_in_t
    # Spread of a cell's score across OUT references, pooled over cells (offline LiRA's
    # fixed variance): the unit in which the attacker sees a score difference.
    stacked = torch.stack(out_scores)
    resid = stacked - torch.nanmean(stacked, 0, keepdim=True)
    dof = max(int(n_out.sum()) - in_mask.shape[1], 1)
    score_sd = float(torch.sqrt(torch.nansum(resid**2) / dof).clamp_min(1e-6))
    return {
        "log_mu": base_mu + shift_mu,
        "score": base_score + shift_score,
        "score_shift": shift_score.numpy(),
        "score_sd": score_sd,
    }


class OracleMatchingPlan(UnlearningTrainingPlan):
    """Fine-tune so that the forget cells' outputs match their oracle targets.

    Every training step adds, to ``retain_weight`` times scVI's loss on a retain minibatch, the
    matching loss on a minibatch of forget cells (eval mode, posterior mean)::

        mean_genes (log mu - target log mu)^2 + score_weight * ((score - target) / score_sd)^2

    averaged over the forget minibatch.

    Parameters
    ----------
    module
        The scVI ``VAE`` (a copy of the trained one).
    forget_tensors
        The forget cells, with the targets under ``"oracle_log_mu"`` and ``"oracle_score"``
        (see :func:`oracle_targets`).
    score_sd
        The score's spread under OUT references (unit of the score term).
    retain_weight
        Weight of the retain ELBO term (small: it only anchors the rest of the data).
    score_weight
        Weight of the attacker-score term relative to the gene-space term.
    forget_batch_size
        Forget cells per step (all of them when fewer).
    **kwargs
        Passed to :class:`~scvi_unlearn.train.UnlearningTrainingPlan`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        forget_tensors: Tensors,
        *,
        score_sd: float = 1.0,
        retain_weight: float = 0.1,
        score_weight: float = 1.0,
        forget_batch_size: int = 128,
        **kwargs: Any,
    ):
        for key in (TARGET_LOG_MU, TARGET_SCORE):
            if key not in forget_tensors:
                raise ValueError(f"`forget_tensors` lacks the oracle target {key!r}.")
        super().__init__(module, held={"forget": forget_tensors}, **kwargs)
        self.score_sd = float(score_sd)
        self.retain_weight = float(retain_weight)
        self.score_weight = float(score_weight)
        self.forget_batch_size = int(forget_batch_size)

    def matching_loss(self, tensors: Tensors) -> torch.Tensor:
        """Mean squared distance of the cells' outputs from their oracle targets."""
        with eval_mode(self.module):
            log_mu, score = _log_mu_and_score(self.module, tensors)
        gene_term = (log_mu - tensors[TARGET_LOG_MU]).pow(2).mean(-1)
        score_term = ((score - tensors[TARGET_SCORE]) / self.score_sd).pow(2)
        return (gene_term + self.score_weight * score_term).mean()

    def training_step(self, batch: Tensors, batch_idx: int) -> torch.Tensor:
        """Matching on forget cells plus the weighted retain ELBO."""
        match = self.matching_loss(self.sample_held("forget", self.forget_batch_size))
        retain = self.retain_loss(batch).loss
        self.log("oracle_matching_loss", match.detach(), prog_bar=True)
        return match + self.retain_weight * retain


# -- the method --------------------------------------------------------------------------------
@register_method
class OracleMatching(PlanMethod):
    """Match the forget cells' outputs to targets from reference models that left them out."""

    name = "oracle_matching"
    description = (
        "match the forget cells' outputs to oracle targets from reference models "
        "that left them out (Georgiev et al. 2025)"
    )
    plan = OracleMatchingPlan
    params = {
        **TRAINING_PARAMS,
        **RETAIN_FRACTION_PARAMS,
        **REFERENCE_PARAMS,
        "retain_weight": Param(kind="float", low=0, doc="weight of the retain ELBO term"),
        "score_weight": Param(kind="float", low=0, doc="weight of the attacker-score term"),
        "forget_batch_size": Param(kind="int", low=1),
        "group_key": Param(
            None,
            "str",
            allow_none=True,
            doc="obs column whose groups the references leave out whole (donor requests)",
        ),
    }
    epochs = FixedEpochs(10)

    def run(self, run: UnlearningRun) -> dict[str, Any]:
        """Train (or load) the reference pool, compute the targets, fit the plan."""
        hp = run.hyperparameters
        pool, record = run_reference_pool(run, keep_models=True, group_key=hp["group_key"])
        forget = gather_tensors(run.model, run.forget)
        targets = oracle_targets(
            run.model.module, pool.state_dicts, pool.in_mask[:, run.forget], forget
        )
        forget[TARGET_LOG_MU] = targets["log_mu"]
        forget[TARGET_SCORE] = targets["score"]
        plan = OracleMatchingPlan(
            run.model.module, forget, score_sd=targets["score_sd"], **self.plan_arguments(run)
        )
        summary = {
            **record,
            "reference_group_key": hp["group_key"],
            "oracle_score_shift_mean": float(np.mean(targets["score_shift"])),
            "oracle_score_sd": targets["score_sd"],
        }
        return with_history(summary, run.fit(plan, run.retain))
