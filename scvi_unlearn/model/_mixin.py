"""``UnlearningMixin``: ``model.unlearn(forget_idx)`` for scvi-tools models."""

from __future__ import annotations

from typing import Any

from scvi_unlearn._validation import IndexLike


class UnlearningMixin:
    """Adds :meth:`unlearn` to an scvi-tools model (see :func:`scvi_unlearn.train.unlearn`)."""

    def unlearn(
        self,
        forget_idx: IndexLike,
        method: str = "extragradient",
        nonmembers: IndexLike | None = None,
        inplace: bool = False,
        seed: int = 0,
        audit: bool = False,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        max_epochs: int | None = None,
        **method_kwargs: Any,
    ):
        """Forget cells the model was trained on; return the model that forgot them.

        Parameters
        ----------
        forget_idx
            Cells to forget: integer positions, a boolean mask or obs names of ``self.adata``;
            all must be training cells of the model.
        method
            ``"extragradient"`` (default), ``"frozen_critic"``, ``"fisher"``, ``"ssd"``,
            ``"finetune"``, ``"gradient_ascent"``, ``"scrub"`` or ``"retrain"`` (exact).
        nonmembers
            Same-population cells the model never trained on (for the adversarial methods and
            the audit); found automatically from ``population_key`` (default ``"cell_type"``)
            when ``None``.
        inplace
            Modify this model instead of returning a new one.
        seed
            Seed of the run; the same seed gives the same weights.
        audit
            Run a membership-inference audit afterwards; its summary goes into the provenance.
        accelerator, devices
            Lightning's accelerator and devices.
        max_epochs
            Training epochs (method default if ``None``).
        **method_kwargs
            The method's hyper-parameters (e.g. ``lambda_=10.0, n_critics=3``), and
            ``population_key``, ``enable_progress_bar``, ``audit_kwargs``.

        Returns
        -------
        :class:`scvi_unlearn.model.SCVI` with ``unlearning_provenance_`` set; ``self`` is
        unchanged unless ``inplace=True``.

        Examples
        --------
        >>> import scvi_unlearn as su
        >>> adata = su.data.synthetic_pbmc(n_cells=120, n_genes=50, seed=0)
        >>> recipe = su.Recipe(model_kwargs={"n_latent": 4}, train_kwargs={"max_epochs": 3})
        >>> model = recipe.fit_cells(adata, list(range(100)), accelerator="cpu",
        ...                          enable_progress_bar=False)
        >>> forgotten = model.unlearn([0, 1, 2], method="fisher", accelerator="cpu",
        ...                           enable_progress_bar=False)
        >>> forgotten.provenance["events"][-1]["method"], len(forgotten.train_indices)
        ('fisher', 97)
        >>> len(model.train_indices)  # the original is untouched
        100
        """
        from scvi_unlearn.train import unlearn

        return unlearn(
            self,
            forget_idx,
            method=method,
            nonmembers=nonmembers,
            inplace=inplace,
            seed=seed,
            audit=audit,
            accelerator=accelerator,
            devices=devices,
            max_epochs=max_epochs,
            **method_kwargs,
        )
