"""MembershipInference: audit whether a fitted scVI model reveals which cells it trained on."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scvi_unlearn._configurations import check_supported_model, check_supported_recipe
from scvi_unlearn._model_data import training_positions
from scvi_unlearn._recipe import Recipe
from scvi_unlearn._validation import (
    as_cell_indices,
    check_count_data,
    check_disjoint,
    check_genes_match,
    check_trained,
)
from scvi_unlearn._verdict import _check_references, reference_band
from scvi_unlearn.audit._attacks import (
    ATTACKS,
    SHADOW_ATTACKS,
    cv_classifier_scores,
    fit_shadow_classifier,
    lira_scores,
    loss_scores,
    rmia_scores,
)
from scvi_unlearn.audit._features import attack_features
from scvi_unlearn.audit._fingerprint import (
    cells_sha256,
    counts_sha256,
    package_versions,
    utc_now,
    weights_sha256,
)
from scvi_unlearn.audit._groups import (
    DEFAULT_MIN_GROUP_CELLS,
    GroupAuditReport,
    group_auc,
    group_codes,
    group_means,
    group_test,
)
from scvi_unlearn.audit._metrics import (
    auc_from_scores,
    pooled_reference_interval,
)
from scvi_unlearn.audit._report import AuditReport, score_attack
from scvi_unlearn.audit._shadows import ShadowPool, default_cache_dir, train_shadow_pool
from scvi_unlearn.module import LOSS_FEATURE, SCALAR_FEATURES

if TYPE_CHECKING:
    from scvi_unlearn._executor import Executor

logger = logging.getLogger(__name__)

#: Shadow models per audit, the one default of every entry point (library, CLI, ``unlearn``).
#: Chosen from ``benchmarks/results/audit_calibration``: on Kang and pbmc3k subsets, 8 shadows
#: gave LiRA online 99% of the 16-shadow AUC (0.923 vs 0.935) and TPR at 1% FPR 0.48 vs 0.49,
#: at half the cost; 4 gave 0.90 / 0.42; below 4 no reference band can be formed.
DEFAULT_N_SHADOWS = 8
#: Per-cell variance of each LiRA variant (:func:`~scvi_unlearn.audit.lira_scores`), chosen by
#: ``benchmarks/results/audit_power``: shrunk variances gave offline LiRA at least the pooled
#: variance's AUC and TPR at 1% FPR at every number of shadows on Kang and pbmc3k (TPR at 16
#: shadows up to 0.56 vs 0.22); online LiRA lost a little AUC on Kang with them, so it keeps
#: the pooled variance. The same curve did not let 4 shadows reach 8 shadows' power.
LIRA_VARIANCE = {"lira_online": "pooled", "lira_offline": "shrunk"}

_LOSS_COL = SCALAR_FEATURES.index(LOSS_FEATURE)


class MembershipInference:
    """Membership-inference audit of scVI models with shadow models and LiRA.

    Shadow models follow the audited model's recipe (architecture and training arguments) and
    are trained on random halves of a pool of cells, so each pool cell is IN for half of them
    and OUT for the rest. Attacks are fitted on shadows (or cross-validated on the audited
    model), so every AUC is out of sample, and each attack's AUC is compared with the same
    attack's AUC under models that never trained on the audited cells (the OUT shadows, or
    retrain models you pass), not with 0.5.

    Parameters
    ----------
    adata
        Cells x genes with raw counts, the genes of the models to audit. Never modified.
    recipe
        A trained scVI model whose recipe the shadows copy, or a :class:`~scvi_unlearn.Recipe`.
    n_shadows
        Number of shadow models (even); :data:`~scvi_unlearn.audit.DEFAULT_N_SHADOWS` by
        default. LiRA's power grows with more (Carlini et al. report gains up to ~64).
    pool
        Cells the shadows may train on (positions, mask or obs names); all cells by default.
        Audited cells outside the pool are OUT for every shadow (online LiRA skips them).
    seed
        Seed for the shadow halves and their training.
    cache_dir
        Where shadow features are cached (``$SCVI_UNLEARN_CACHE`` or
        ``~/.cache/scvi_unlearn/shadows`` by default); ``False`` disables caching.
    attacks
        Which attacks to run; all of :data:`~scvi_unlearn.audit.ATTACKS` by default.
    accelerator, devices
        Passed to shadow training (Lightning).
    group_key
        An ``obs`` column (e.g. ``"sample_id"`` for donors, ``"cell_type"``): shadows then train
        on random halves of its *groups* (whole donors IN or OUT), which
        :meth:`audit_groups` needs to ask "was this donor in the training set?", and which a
        structured (cell-type) audit needs for group-level OUT models. At least 4 groups.
    min_group_cells
        With ``group_key``: groups with fewer pool cells are refused.
    groups_out
        With ``group_key``: each shadow leaves out this many groups instead of half of them,
        to match an audited model that trained on all groups but that many (e.g. 1 for a model
        retrained without one withdrawn donor). The per-group test compares absolute losses,
        and a model trained on more groups than its shadows fits unseen groups better: with
        half-size shadows, a donor Kang's leave-one-out model never saw read as a leak
        (``benchmarks/results/audit_donors``). :meth:`audit_groups` trains such matched
        shadows itself when the audited model needs them; setting ``groups_out`` trains them
        up front. ``n_shadows * groups_out`` must be a multiple of the number of groups, at
        least twice it.
    executor
        Where the shadow fits run (:class:`~scvi_unlearn.Executor`: sequential, a local
        process pool or Ray); :func:`~scvi_unlearn.get_default_executor` by default. The same
        seeds give the same shadows on every backend.
    **recipe_overrides
        Replace recipe fields for the shadows (e.g. ``max_epochs``); recorded in the report,
        since shadows that differ from the target weaken the attack.

    Raises
    ------
    UnsupportedModelError
        If ``recipe`` (or an audited model) is not an scVI the package supports (SCANVI,
        TOTALVI, ...; see :data:`~scvi_unlearn.model.REFUSED_CONFIGURATIONS`), before any
        shadow model trains.

    Examples
    --------
    >>> import scvi_unlearn as su
    >>> adata = su.data.synthetic_pbmc(n_cells=300, n_genes=60, seed=0)
    >>> recipe = su.Recipe(model_kwargs={"n_latent": 4}, train_kwargs={"max_epochs": 2})
    >>> mi = su.MembershipInference(adata, recipe=recipe, n_shadows=2, cache_dir=False)
    >>> mi.n_shadows
    2
    """

    def __init__(
        self,
        adata,
        recipe,
        n_shadows: int = DEFAULT_N_SHADOWS,
        pool=None,
        seed: int = 0,
        cache_dir: str | Path | bool | None = None,
        attacks: tuple[str, ...] = ATTACKS,
        accelerator: str = "auto",
        devices="auto",
        group_key: str | None = None,
        min_group_cells: int = DEFAULT_MIN_GROUP_CELLS,
        groups_out: int | None = None,
        executor: Executor | None = None,
        **recipe_overrides,
    ):
        if adata.n_obs < 4:
            raise ValueError(f"The AnnData has {adata.n_obs} cells; an audit needs more.")
        if not isinstance(n_shadows, int | np.integer) or n_shadows < 2 or n_shadows % 2:
            raise ValueError(f"n_shadows must be an even integer >= 2, got {n_shadows!r}.")
        unknown = set(attacks) - set(ATTACKS)
        if unknown:
            raise ValueError(f"Unknown attacks {sorted(unknown)}; choose from {list(ATTACKS)}.")
        if isinstance(recipe, Recipe):
            check_supported_recipe(recipe)
            self.recipe = Recipe(**recipe.to_dict())
            self.recipe.train_kwargs.update(recipe_overrides)
        elif hasattr(recipe, "module") and hasattr(recipe, "adata_manager"):
            check_supported_model(recipe)
            check_trained(recipe)
            check_genes_match(recipe, adata)
            self.recipe = Recipe.from_model(recipe, **recipe_overrides)
            check_supported_recipe(self.recipe)
        else:
            raise TypeError(
                "`recipe` must be a trained scVI model or a scvi_unlearn.Recipe, got "
                f"{type(recipe).__name__}."
            )
        check_count_data(adata, self.recipe.setup_kwargs.get("layer"))
        self.adata = adata
        self.n_shadows = int(n_shadows)
        self.pool = (
            np.arange(adata.n_obs) if pool is None else as_cell_indices(adata, pool, "pool")
        )
        self.seed = int(seed)
        self.cache_dir = (
            None if cache_dir is False else Path(cache_dir) if cache_dir else default_cache_dir()
        )
        self.group_key = group_key
        self.groups_out = None if groups_out is None else int(groups_out)
        if groups_out is not None and group_key is None:
            raise ValueError("`groups_out` needs `group_key` (which groups to leave out).")
        self.group_codes_, self.group_names_ = (None, None)
        if group_key is not None:
            self.group_codes_, self.group_names_ = group_codes(
                adata, group_key, self.pool, int(min_group_cells)
            )
        self.attacks = tuple(attacks)
        self.recipe_overrides = dict(recipe_overrides)
        self.accelerator = accelerator
        self.devices = devices
        self.executor = executor
        self.shadows_: ShadowPool | None = None
        self._classifier = None
        #: Shadows matched to an audited model's number of groups, by groups left out.
        self._matched: dict[int, ShadowPool] = {}

    def __repr__(self) -> str:
        state = "fitted" if self.shadows_ is not None else "not fitted"
        by = "" if self.group_key is None else f" by {self.group_key!r} groups"
        return (
            f"MembershipInference({self.n_shadows} shadows on {self.pool.size} cells{by}, "
            f"attacks={list(self.attacks)}, {state})"
        )

    # -- shadows ---------------------------------------------------------------------------
    def fit(self, progress_bar: bool = True) -> MembershipInference:
        """Train the shadow models (or load them from the cache). Returns ``self``."""
        start = time.perf_counter()
        self.shadows_ = self._train_pool(self.n_shadows, self.groups_out, progress_bar)
        self.fit_seconds_ = time.perf_counter() - start
        self._classifier = None
        self._matched = {}
        return self

    def _train_pool(self, n_shadows: int, groups_out: int | None, progress_bar: bool):
        """Shadows of this audit's recipe, pool, seed and groups (trained or from the cache)."""
        return train_shadow_pool(
            self.adata,
            self.recipe,
            n_shadows,
            self.pool,
            self.seed,
            self.cache_dir,
            accelerator=self.accelerator,
            devices=self.devices,
            progress_bar=progress_bar,
            groups=self.group_codes_,
            groups_out=groups_out,
            executor=self.executor,
        )

    def _require_fit(self, attacks) -> ShadowPool | None:
        if not SHADOW_ATTACKS & set(attacks):
            return self.shadows_
        if self.shadows_ is None:
            raise RuntimeError("Call `MembershipInference.fit()` before a shadow-model attack.")
        return self.shadows_

    # -- audit -----------------------------------------------------------------------------
    def audit(
        self,
        model,
        members,
        nonmembers,
        reference_models: list | None = None,
        attacks: tuple[str, ...] | None = None,
        n_bootstrap: int = 1000,
    ) -> AuditReport:
        """Audit ``model``: can its training ``members`` be told from ``nonmembers``?

        Parameters
        ----------
        model
            The trained scVI model under audit (same genes as ``adata``).
        members
            Cells the model trained on (e.g. the forget set), as positions, mask or obs names
            of ``adata``.
        nonmembers
            Cells from the same population the model never trained on.
        reference_models
            At least three models that never trained on ``members`` or ``nonmembers`` (e.g.
            retrain seeds). They are scored on the same cells, and the audited AUC is judged
            against their prediction band (the paired rule,
            :func:`~scvi_unlearn.audit.reference_band`); without them the OUT shadow models
            supply a pooled interval.
        attacks
            Subset of the attacks given at construction.
        n_bootstrap
            Bootstrap replicates for the 95% CIs.

        Returns
        -------
        :class:`~scvi_unlearn.AuditReport`
        """
        start = time.perf_counter()
        attacks = self.attacks if attacks is None else tuple(attacks)
        members_idx, nonmembers_idx = self._check_cells(model, members, nonmembers)
        shadows = self._require_fit(attacks)
        cells = np.r_[members_idx, nonmembers_idx]
        is_member = np.r_[np.ones(members_idx.size, bool), np.zeros(nonmembers_idx.size, bool)]
        if reference_models:  # one or two cannot measure the spread the paired verdict needs
            _check_references(len(reference_models))
        feats = self._features(model, cells)
        refs = [
            self._features(m, cells, role=f"reference model {i}")
            for i, m in enumerate(reference_models or [])
        ]
        self._check_references(reference_models or [], members_idx, nonmembers_idx)
        scored = {}
        skipped = {}
        for attack in attacks:
            try:
                scores = self._scores(attack, feats, cells, is_member)
                scored[attack] = (
                    scores,
                    *self._reference(attack, refs, cells, is_member, n_bootstrap),
                )
            except ValueError as exc:
                skipped[attack] = str(exc)
        results = {
            attack: score_attack(
                attack,
                scores[is_member],
                scores[~is_member],
                ref_aucs,
                source,
                n_bootstrap=n_bootstrap,
                seed=self.seed,
                reference_interval=interval,
                n_attacks=len(scored),
            )
            for attack, (scores, ref_aucs, source, interval) in scored.items()
        }
        if not results:
            raise ValueError(f"No attack could be run: {skipped}")
        metadata = {
            "n_members": int(members_idx.size),
            "n_nonmembers": int(nonmembers_idx.size),
            "member_names": self.adata.obs_names[members_idx].tolist(),
            "nonmember_names": self.adata.obs_names[nonmembers_idx].tolist(),
            "n_shadows": self.n_shadows if shadows is not None else 0,
            "n_reference_models": len(refs),
            "recipe": self.recipe.to_dict(),
            "recipe_overrides": self.recipe_overrides,
            "seed": self.seed,
            "skipped_attacks": skipped,
            "shadow_train_seconds": float(sum(shadows.train_seconds)) if shadows else 0.0,
            "audit_seconds": time.perf_counter() - start,
            "created_at": utc_now(),
            "fingerprints": self._fingerprints(
                model, members_idx, nonmembers_idx, reference_models
            ),
            "versions": package_versions(),
        }
        return AuditReport(results=results, metadata=metadata)

    def _fingerprints(self, model, members_idx, nonmembers_idx, reference_models) -> dict:
        """SHA-256 of what was audited: weights, cell lists, counts, recipe (for certificates)."""
        names = self.adata.obs_names
        return {
            "model_weights": weights_sha256(model),
            "members": cells_sha256(names[members_idx]),
            "nonmembers": cells_sha256(names[nonmembers_idx]),
            "adata_counts": counts_sha256(self.adata, self.recipe.setup_kwargs.get("layer")),
            "recipe": self.recipe.fingerprint(),
            "reference_models": [weights_sha256(m) for m in reference_models or []],
        }

    def audit_groups(
        self,
        model,
        members=None,
        n_bootstrap: int = 1000,
        match_shadows: bool = True,
        progress_bar: bool = True,
    ) -> GroupAuditReport:
        """Donor-level (group-level) audit: was each group in ``model``'s training set?

        Needs ``group_key`` at construction (shadows trained on halves of the groups). Each
        group's score is the mean loss of its pool cells; under the audited model it is tested
        against the same score under the shadows that did not train on the group (one-sided
        Student t on the OUT shadows, a p-value and verdict per group, see
        :func:`~scvi_unlearn.audit.group_test`). Where the members are known, the groups'
        statistics also give a group-level ROC AUC with an exact Mann-Whitney p-value, whose
        power is stated: with 8 donors (4 vs 4) the smallest possible p-value is 1/70, so only a
        (near-)perfect separation counts, and the per-group p-values carry the audit.

        Parameters
        ----------
        model
            The trained scVI model under audit.
        members
            Names of the groups the model trained on; by default read from the model's
            recorded training cells (a group is a member when most of its cells were trained
            on), unknown otherwise.
        n_bootstrap
            Bootstrap replicates for the group-level AUC's CI.
        match_shadows
            The per-group test compares absolute losses, and a model trained on more groups
            than its shadows fits the groups it never saw better, so they would read as leaks
            (Kang, 7 of 8 donors against shadows on 4: p = 0.003). By default, when the model
            trained on a different number of groups than the shadows, shadows that each leave
            out as many groups as the model did (``groups_out``; at least one) are trained or
            read from the cache, and the test uses them (``metadata["shadows"]``). With
            ``False``, such a mismatch is an error instead.
        progress_bar
            Show progress while matched shadows train.

        Returns
        -------
        :class:`~scvi_unlearn.GroupAuditReport`

        Raises
        ------
        ValueError
            The model's training groups are unknown (pass ``members``), or they do not match
            the shadows and ``match_shadows`` is ``False``.
        """
        if self.group_key is None:
            raise ValueError(
                "audit_groups needs shadows trained on groups: construct MembershipInference "
                "with group_key= (e.g. group_key='sample_id')."
            )
        if self.shadows_ is None:
            raise RuntimeError("Call `MembershipInference.fit()` before `audit_groups`.")
        start = time.perf_counter()
        cells, codes, names = self.pool, self.group_codes_, self.group_names_
        n_groups = names.size
        loss = self._features(model, cells)[:, _LOSS_COL]
        member, source = self._group_members(model, members, cells, codes, names)
        shadows = self._matched_shadows(member, match_shadows, progress_bar)
        shadow_loss = shadows.features[:, cells, _LOSS_COL]
        in_share = group_means(shadows.in_mask[:, cells].astype(float), codes, n_groups)
        table = group_test(
            group_means(loss, codes, n_groups),
            group_means(shadow_loss, codes, n_groups),
            in_share > 0.5,
        )
        table.index = names
        table.insert(0, "n_cells", np.bincount(codes, minlength=n_groups))
        table.insert(1, "member", member)
        auc = group_auc(table, n_bootstrap, self.seed)
        metadata = {
            "group_key": self.group_key,
            "n_groups": int(n_groups),
            "members_from": source,
            "n_shadows": shadows.n_shadows,
            "shadows": {
                "n_shadows": shadows.n_shadows,
                "groups_in": float((in_share > 0.5).sum(1).mean()),
                "model_groups_in": int(np.sum(member.astype(bool))),
                "matched": shadows is not self.shadows_,
            },
            "seed": self.seed,
            "recipe": self.recipe.to_dict(),
            "auc_p_value": auc.get("auc_p_value"),
            "auc_min_p_value": auc.get("auc_min_p_value"),
            "auc_detectable": auc.get("auc_detectable"),
            "auc_verdict": auc["auc_verdict"],
            "audit_seconds": time.perf_counter() - start,
        }
        return GroupAuditReport(self.group_key, table, auc["auc"], auc["auc_ci"], metadata)

    def _matched_shadows(self, member: np.ndarray, match: bool, progress_bar: bool) -> ShadowPool:
        """Shadows that trained on as many groups as the audited model (or an error why not)."""
        if any(m is None for m in member):
            raise ValueError(
                f"Which {self.group_key!r} groups the model trained on is unknown (it does not "
                "record its training cells), so its shadows cannot be matched to it: pass "
                "`members=[...]`, the groups it trained on."
            )
        n_groups = member.size
        n_model = int(np.sum(member.astype(bool)))
        shadow_in = group_means(
            self.shadows_.in_mask[:, self.pool].astype(float), self.group_codes_, n_groups
        )
        if abs(n_model - float((shadow_in > 0.5).sum(1).mean())) < 1:
            return self.shadows_
        n_out = max(n_groups - n_model, 1)  # a model on every group: shadows on all but one
        if self.groups_out == n_out:
            return self.shadows_
        if not match:
            raise ValueError(
                f"The audited model trained on {n_model} of {n_groups} {self.group_key!r} "
                "groups, its shadows on a different number; groups it never saw would read as "
                "leaks. Match the shadows: MembershipInference(..., "
                f"group_key={self.group_key!r}, groups_out={n_out}), or match_shadows=True."
            )
        if n_out not in self._matched:
            step = n_groups // int(np.gcd(n_out, n_groups))
            least = max(self.n_shadows, -(-2 * n_groups // n_out))
            n_shadows = -(-least // step) * step
            self._matched[n_out] = self._train_pool(n_shadows, n_out, progress_bar)
        return self._matched[n_out]

    def _group_members(self, model, members, cells, codes, names):
        """Whether each group was a member of ``model``'s training set, and how we know."""
        if members is not None:
            members = [str(m) for m in ([members] if isinstance(members, str) else members)]
            unknown = sorted(set(members) - set(names))
            if unknown:
                raise ValueError(
                    f"`members` names groups not in {self.group_key!r}: {unknown} "
                    f"(groups: {names.tolist()})."
                )
            return np.asarray(names.isin(members), dtype=object), "given"
        trained = self._trained_positions(model)
        if trained is None:
            return np.full(names.size, None, dtype=object), "unknown"
        share = group_means(np.isin(cells, trained).astype(float), codes, names.size)
        return np.asarray(share > 0.5, dtype=object), "recorded training cells"

    def _check_cells(self, model, members, nonmembers):
        check_supported_model(model)
        check_trained(model)
        check_genes_match(model, self.adata)
        m = as_cell_indices(self.adata, members, "members")
        n = as_cell_indices(self.adata, nonmembers, "nonmembers")
        check_disjoint(m, n, "members", "nonmembers")
        trained = self._trained_positions(model)
        if trained is not None:
            seen = np.intersect1d(n, trained)
            if seen.size:
                raise ValueError(
                    f"{seen.size} of the `nonmembers` are in the audited model's training set "
                    f"(e.g. {self.adata.obs_names[seen[:3]].tolist()}); non-members must be "
                    "cells the model never trained on."
                )
            unseen = np.setdiff1d(m, trained)
            # Cells an unlearned model forgot are the point of its audit, not a mistake. Its
            # provenance names them only if asked to (``record_names``); otherwise up to as
            # many cells as it forgot are taken to be those.
            provenance = getattr(model, "unlearning_provenance_", None) or {}
            forgotten = provenance.get("forgotten_obs_names")
            if forgotten is not None:
                unseen = unseen[~self.adata.obs_names[unseen].isin(forgotten)]
            elif unseen.size <= int(provenance.get("n_forgotten", 0)):
                unseen = unseen[:0]
            if unseen.size:
                warnings.warn(
                    f"{unseen.size} of {m.size} `members` are not in the model's recorded "
                    "training set; the audit treats them as members anyway.",
                    UserWarning,
                    stacklevel=3,
                )
        return m, n

    def _check_references(self, reference_models, members_idx, nonmembers_idx) -> None:
        """Refuse a reference model that trained on an audited cell (where it records its cells).

        Reference models stand for models that never saw the audited cells (retrains without
        the forget cells): one that trained on a member or a non-member gives a band of the
        wrong question, and the audit would judge against it silently.
        """
        for i, ref in enumerate(reference_models):
            trained = self._trained_positions(ref)
            if trained is None:
                continue
            for what, cells in (("members", members_idx), ("nonmembers", nonmembers_idx)):
                seen = np.intersect1d(cells, trained)
                if seen.size:
                    raise ValueError(
                        f"Reference model {i} trained on {seen.size} of the {cells.size} audited "
                        f"`{what}` (e.g. {self.adata.obs_names[seen[:3]].tolist()}). Reference "
                        "models must never have trained on the audited cells: retrain them "
                        "without the forget cells (e.g. `su.model.retrain_models`)."
                    )

    def _trained_positions(self, model) -> np.ndarray | None:
        """Positions in ``self.adata`` of the cells the model trained on, if known."""
        return training_positions(model, self.adata)

    def _features(self, model, cells: np.ndarray, role: str = "audited model") -> np.ndarray:
        check_supported_model(model)
        try:
            check_trained(model)
            check_genes_match(model, self.adata)
        except ValueError as exc:
            raise ValueError(f"The {role}: {exc}") from exc
        same = (
            model.adata is not None
            and model.adata.n_obs == self.adata.n_obs
            and np.array_equal(model.adata.obs_names, self.adata.obs_names)
        )
        adata = None if same else self.adata
        feats = attack_features(model, adata, indices=cells).to_numpy()
        bad = ~np.isfinite(feats).all(axis=1)
        if bad.any():
            # Otherwise LiRA's per-cell fits fail later with a message about shadows.
            raise ValueError(
                f"The audited model gives non-finite attack features for {int(bad.sum())} of "
                f"{bad.size} cells (e.g. {self.adata.obs_names[cells[bad][:3]].tolist()}): its "
                "weights have probably diverged (too much noise or too large a learning rate). "
                "Such a model cannot be audited, and is not usable either."
            )
        return feats

    # -- attacks ---------------------------------------------------------------------------
    def _scores(self, attack, feats, cells, is_member, exclude: int | None = None) -> np.ndarray:
        """Scores of ``attack`` for ``cells`` whose audited-model features are ``feats``.

        Shadow ``exclude`` is left out of the calibration (used for references).
        """
        if attack == "loss":
            return loss_scores(feats[:, _LOSS_COL])
        if attack == "cv_classifier":
            m_scores, n_scores = cv_classifier_scores(
                feats[is_member], feats[~is_member], seed=self.seed
            )
            scores = np.empty(len(cells))
            scores[is_member], scores[~is_member] = m_scores, n_scores
            return scores
        shadows = self.shadows_
        keep = np.ones(shadows.n_shadows, bool)
        if exclude is not None:
            keep[exclude] = False
        shadow_feats = shadows.features[keep][:, cells]
        in_mask = shadows.in_mask[keep][:, cells]
        if attack == "rmia":
            scores = rmia_scores(
                feats[:, _LOSS_COL], shadow_feats[..., _LOSS_COL], in_mask, population=~is_member
            )
            if np.isnan(scores).any():
                raise ValueError(
                    f"rmia needs an OUT reference model for every audited cell; "
                    f"{int(np.isnan(scores).sum())} cells lack one (add shadows)."
                )
            return scores
        if attack in ("lira_online", "lira_offline"):
            scores = lira_scores(
                feats[:, _LOSS_COL],
                shadow_feats[..., _LOSS_COL],
                in_mask,
                online=attack == "lira_online",
                variance=LIRA_VARIANCE[attack],
            )
            if np.isnan(scores).any():
                raise ValueError(
                    f"{attack} needs IN and OUT shadow models for every audited cell; "
                    f"{int(np.isnan(scores).sum())} cells lack them (are they outside the pool?)."
                )
            return scores
        if attack == "shadow_classifier":
            clf = self._shadow_classifier(exclude)
            return clf.decision_function(feats)
        raise ValueError(f"Unknown attack {attack!r}.")

    def _shadow_classifier(self, exclude: int | None):
        if exclude is None and self._classifier is not None:
            return self._classifier
        shadows = self.shadows_
        keep = np.ones(shadows.n_shadows, bool)
        if exclude is not None:
            keep[exclude] = False
        pool = shadows.pool
        clf = fit_shadow_classifier(
            shadows.features[keep][:, pool], shadows.in_mask[keep][:, pool], seed=self.seed
        )
        if exclude is None:
            self._classifier = clf
        return clf

    def _reference(self, attack, refs, cells, is_member, n_bootstrap):
        """The attack on the same contrast under models that never trained on the cells.

        Returns the per-model AUCs, a description, and the OUT shadows' pooled interval (None
        for reference models: their band is the paired rule of
        :func:`~scvi_unlearn.audit.reference_band`, computed at each verdict's level).
        """
        if refs:
            aucs = []
            for ref_feats in refs:
                s = self._scores(attack, ref_feats, cells, is_member)
                aucs.append(float(auc_from_scores(s[is_member], s[~is_member])))
            return aucs, f"{len(refs)} reference models", None
        if self.shadows_ is None:
            return [], "", None
        pairs = self._shadow_reference_scores(attack, cells, is_member)
        if not pairs:
            return [], "", None
        aucs = [float(auc_from_scores(m, n)) for m, n in pairs]
        _, low, high = pooled_reference_interval(
            [m for m, _ in pairs], [n for _, n in pairs], n_bootstrap=n_bootstrap, seed=self.seed
        )
        return (
            aucs,
            f"{len(pairs)} OUT shadow models, pooled",
            reference_band([], pooled_interval=(low, high)),
        )

    def _shadow_reference_scores(self, attack, cells, is_member) -> list:
        """The attack's scores when membership is absent.

        Each shadow in turn plays the audited model, on the audited cells it did NOT train on,
        calibrated by the other shadows.
        """
        shadows = self.shadows_
        pairs = []
        for k in range(shadows.n_shadows):
            out = ~shadows.in_mask[k, cells]
            if (out & is_member).sum() < 2 or (out & ~is_member).sum() < 2:
                continue
            sub = np.flatnonzero(out)
            feats_k = shadows.features[k, cells[sub]]
            try:
                s = self._scores(attack, feats_k, cells[sub], is_member[sub], exclude=k)
            except ValueError:
                continue
            pairs.append((s[is_member[sub]], s[~is_member[sub]]))
        return pairs
