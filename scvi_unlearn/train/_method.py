"""The unlearning method as a unit: its base class, its registry and the run it receives.

A method is one class in one file, beside its training plan, decorated with
:func:`register_method`. It declares its typed configuration (:attr:`UnlearningMethod.params`,
whose plan keywords take their defaults from the plan's signature), its epoch rule, whether it
is exact and whether it needs non-members; :meth:`UnlearningMethod.run` holds what only it
does. The base class does what every method shares: check its hyper-parameters, seed, pass the
hyper-parameters that are plan keywords to the plan, fit, keep the history, and refuse a
result whose weights did not change. The method table of ``unlearn``'s docstring, the API page,
the CLI help and the tests' parametrisation all read :data:`METHODS`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from scvi_unlearn.data import validation_split
from scvi_unlearn.train._common import (
    gather_tensors,
    logged_history,
    make_data_splitter,
    run_plan,
    seed_everything,
    weights_fingerprint,
)
from scvi_unlearn.train._epochs import MIN_SELECTION_CELLS, EpochRule, FixedEpochs
from scvi_unlearn.train._params import Param, check_hyperparameters, resolve_plan_defaults

#: Hyper-parameters every run reads itself (:meth:`UnlearningRun.plan_kwargs`, the data
#: loader), never forwarded to the plan by name.
RUN_LEVEL = ("lr", "kl_weight", "batch_size", "retain_fraction")


@dataclass
class UnlearningRun:
    """Everything a method needs to run.

    Attributes
    ----------
    model
        The model to modify (a copy of the user's unless ``inplace=True``).
    forget, retain, nonmembers
        Cell positions in ``model.adata``; ``retain`` = training cells minus ``forget``;
        ``nonmembers`` is ``None`` for methods that do not use them.
    validation
        The original model's validation cells (never trained on).
    hyperparameters
        Validated hyper-parameters, defaults filled in.
    seed, max_epochs, accelerator, devices, enable_progress_bar
        Run settings (``max_epochs`` already resolved by the method's epoch rule).
    kl_weight
        KL weight to continue training at (that of the end of the original training).
    method
        Name of the method the run is for.
    held_out
        A :class:`~scvi_unlearn.train.HeldOutUtility`: held-out cells and the trained model's
        neg. ELBO on them, measured before the method runs (``unlearn()`` sets it;
        ``method="auto"`` gates on it).
    replay_rounds
        For ``retrain_fast``: run exactly this many rounds instead of deciding on held-out
        cells (how :func:`~scvi_unlearn.model.verify_unlearning` re-runs a recorded result).
    """

    model: Any
    forget: np.ndarray
    retain: np.ndarray
    nonmembers: np.ndarray | None
    validation: np.ndarray
    hyperparameters: dict[str, Any]
    seed: int
    max_epochs: int
    accelerator: str = "auto"
    devices: int | list[int] | str = "auto"
    enable_progress_bar: bool = True
    kl_weight: float = 1.0
    method: str = ""
    held_out: Any = None
    replay_rounds: int | None = None

    @property
    def rng(self) -> np.random.Generator:
        """A numpy generator seeded by the run's seed (fresh on every access)."""
        return np.random.default_rng(self.seed)

    def plan_kwargs(self) -> dict[str, Any]:
        """Arguments shared by every plan."""
        hp = self.hyperparameters
        kl = hp.get("kl_weight")
        return {
            "lr": hp["lr"],
            "seed": self.seed,
            "kl_weight": self.kl_weight if kl is None else kl,
        }

    def fit(
        self,
        plan,
        train_idx: np.ndarray,
        val_idx: np.ndarray | None = None,
        max_epochs: int | None = None,
    ):
        """Run ``plan`` under scvi-tools' TrainRunner on the model's retained cells."""
        batch_size = self.hyperparameters["batch_size"]
        splitter = make_data_splitter(self.model, train_idx, val_idx, batch_size=batch_size)
        extra = {}
        fraction = self.hyperparameters.get("retain_fraction", 1.0)
        if fraction < 1.0:
            # Lightning draws a fresh random subset of the (shuffled) retain minibatches each
            # epoch; an integer count, at least one, because a float that rounds to zero
            # batches is an error in Lightning.
            n_batches = int(np.ceil(np.asarray(train_idx).size / batch_size))
            extra["limit_train_batches"] = max(1, int(np.ceil(fraction * n_batches)))
        return run_plan(
            self.model,
            plan,
            splitter,
            self.max_epochs if max_epochs is None else max_epochs,
            accelerator=self.accelerator,
            devices=self.devices,
            enable_progress_bar=self.enable_progress_bar,
            **extra,
        )


@dataclass
class MethodResult:
    """What a method returns.

    Attributes
    ----------
    metrics
        JSON-able summary of the run (recorded in the provenance).
    produced_by
        The method whose update the weights are (``auto``: the one it accepted).
    exact
        Whether the weights are independent of the forget cells by construction.
    selection_forget, selection_nonmembers
        Cell positions the method judged its own result on; an audit of the result leaves
        them out, so its verdict is not the selection rule's own.
    """

    metrics: dict[str, Any]
    produced_by: str
    exact: bool
    selection_forget: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    selection_nonmembers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class WeightsUnchangedError(RuntimeError):
    """An approximate method returned the weights it was given: nothing was unlearned."""


class UnlearningMethod:
    """Base class of an unlearning method (subclass it and decorate with :func:`register_method`).

    Class attributes
    ----------------
    name
        The name ``unlearn(method=...)`` takes.
    description
        One line for the method table.
    plan
        The :class:`~scvi.train.TrainingPlan` it trains with (``None``: none).
    params
        Its hyper-parameters; a :class:`~scvi_unlearn.train.Param` whose default is
        :data:`~scvi_unlearn.train.FROM_PLAN` takes it from ``plan``'s signature.
    epochs
        Its epoch rule (:class:`~scvi_unlearn.train.FixedEpochs`,
        :class:`~scvi_unlearn.train.RecipeShare` or :class:`~scvi_unlearn.train.FineTuneEpochs`).
    exact
        Whether its result never depends on the forget cells (a retrain).
    needs_nonmembers
        Whether it needs same-population cells the model never saw.
    needs_deletion_ready
        Whether it acts only on a deletion-ready model (one trained with withdrawable donors).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    plan: ClassVar[type | None] = None
    params: ClassVar[dict[str, Param]] = {}
    epochs: ClassVar[EpochRule] = FixedEpochs(0)
    exact: ClassVar[bool] = False
    needs_nonmembers: ClassVar[bool] = False
    needs_deletion_ready: ClassVar[bool] = False

    def __init__(self) -> None:
        # Resolved once, at registration: a declaration bug fails on import, not in a run.
        self.params = resolve_plan_defaults(type(self).params, self.plan)

    # -- configuration ----------------------------------------------------------------------
    def configure(self, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` checked against ``params``, defaults filled in."""
        return check_hyperparameters(self.name, self.params, given)

    def resolve_epochs(self, model, max_epochs: int | None, hyperparameters: dict) -> int:
        """Epochs of a run of this method on ``model`` (see ``epochs``)."""
        return self.epochs.resolve(model, max_epochs, hyperparameters, self.name)

    def plan_arguments(self, run: UnlearningRun) -> dict[str, Any]:
        """The run's hyper-parameters that are keywords of ``plan``, and the shared ones."""
        keywords = _plan_keywords(self.plan)
        hp = run.hyperparameters
        given = {k: v for k, v in hp.items() if k in keywords and k not in RUN_LEVEL}
        return {**given, **run.plan_kwargs()}

    # -- running ----------------------------------------------------------------------------
    def run(self, run: UnlearningRun) -> dict[str, Any] | MethodResult:
        """Modify ``run.model``; return a JSON-able summary (or a full :class:`MethodResult`)."""
        raise NotImplementedError

    def __call__(self, run: UnlearningRun) -> MethodResult:
        """Seed, run, and refuse an approximate result whose weights did not change."""
        before = None if self.exact else weights_fingerprint(run.model.module)
        seed_everything(run.seed)
        result = self.run(run)
        if not isinstance(result, MethodResult):
            result = MethodResult(metrics=result, produced_by=self.name, exact=self.exact)
        unchanged = before is not None and weights_fingerprint(run.model.module) == before
        if unchanged and not result.exact:
            raise WeightsUnchangedError(
                f"Method '{self.name}' returned the original weights: nothing was unlearned, "
                "so no unlearned model is returned and no record is written. Check its "
                "hyper-parameters (e.g. alpha=0 with no fine-tune epochs) or use "
                "method='retrain'."
            )
        return result

    def fit(self, run: UnlearningRun, plan, summary: dict[str, Any], train_idx=None, val_idx=None,
            max_epochs: int | None = None) -> dict[str, Any]:  # fmt: skip
        """Fit ``plan`` on the retained cells (default) and add the history to ``summary``."""
        train = run.retain if train_idx is None else train_idx
        runner = run.fit(plan, train, val_idx, max_epochs=max_epochs)
        return with_history(summary, runner)


#: Every registered method, by name, in registration order.
METHODS: dict[str, UnlearningMethod] = {}


def register_method(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    """Class decorator: add an :class:`UnlearningMethod` subclass to :data:`METHODS`.

    Its hyper-parameters are rendered into the class docstring, so the API pages list them.
    """
    if not (isinstance(cls, type) and issubclass(cls, UnlearningMethod)):
        raise TypeError(f"register_method decorates UnlearningMethod subclasses, got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__} needs a `name` that is a Python identifier.")
    if name in METHODS and type(METHODS[name]) is not cls:
        raise TypeError(f"Two unlearning methods are named {name!r}.")
    method = cls()
    METHODS[name] = method
    cls.__doc__ = (inspect.cleandoc(cls.__doc__ or cls.description)) + _params_doc(method)
    return cls


def get_method(name: Any) -> UnlearningMethod:
    """The registered method ``name`` (an instance is returned as is), or a clear error."""
    if isinstance(name, UnlearningMethod):
        return name
    if not isinstance(name, str) or name not in METHODS:
        valid = ", ".join(f"'{m}'" for m in METHODS)
        raise ValueError(f"Unknown unlearning method {name!r}; choose one of {valid}.")
    return METHODS[name]


def exact_methods() -> tuple[str, ...]:
    """Names of the registered exact methods."""
    return tuple(name for name, m in METHODS.items() if m.exact)


def method_names() -> list[str]:
    """The registered methods' names, exact ones first (the order of every listing)."""
    return sorted(METHODS, key=lambda name: not METHODS[name].exact)


def any_model_methods() -> list[str]:
    """Names of the methods that act on any trained model (not only deletion-ready ones)."""
    return [name for name in method_names() if not METHODS[name].needs_deletion_ready]


def method_table(style: str = "markdown", indent: str = "") -> str:
    """The registered methods as a Markdown table or an reST list (docs and help read it)."""
    rows = []
    for name in method_names():
        m = METHODS[name]
        kind = "exact" if m.exact else "approximate"
        if m.needs_nonmembers:
            kind += ", needs non-members"
        if m.needs_deletion_ready:
            kind += ", deletion-ready models only"
        if style == "rst":
            rows.append(f"{indent}- ``{name}`` ({kind}; epochs: {m.epochs.describe()}): "
                        f"{m.description}.")  # fmt: skip
        else:
            rows.append(f"| `{name}` | {kind} | {m.epochs.describe()} | {m.description} |")
    if style == "rst":
        return "\n".join(rows)
    return "\n".join(
        ["| method | kind | epochs | description |", "| --- | --- | --- | --- |", *rows]
    )


def _params_doc(method: UnlearningMethod) -> str:
    if not method.params:
        return "\n\nIt takes no hyper-parameters."
    lines = ["", "", "Hyper-parameters", "----------------"]
    from_plan = plan_parameter_docs(method.plan)
    for name, param in method.params.items():
        lines.append(f"{name} : {param.kind}")
        text = param.doc or from_plan.get(name) or "see the plan"
        lines.append(f"    {text}; default ``{param.default!r}``, range {param.range_text()}.")
    return "\n".join(lines)


def plan_parameter_docs(plan_cls: type | None) -> dict[str, str]:
    """First sentence of each parameter's description in the plan's numpydoc docstrings.

    The plan documents its keywords once; a method that forwards them shows the same words.
    """
    docs: dict[str, str] = {}
    for cls in reversed(plan_cls.__mro__ if plan_cls is not None else ()):
        if not cls.__module__.startswith("scvi_unlearn") or not cls.__doc__:
            continue
        docs.update(_numpydoc_parameters(inspect.cleandoc(cls.__doc__)))
    return docs


def _numpydoc_parameters(doc: str) -> dict[str, str]:
    lines = doc.splitlines()
    out: dict[str, str] = {}
    try:
        start = next(
            i for i, ln in enumerate(lines[:-1]) if _is_heading(ln, lines[i + 1], "Parameters")
        )
    except StopIteration:
        return out
    names: list[str] = []
    for i in range(start + 2, len(lines)):
        line = lines[i]
        if i + 1 < len(lines) and _is_heading(line, lines[i + 1]):
            break  # the next section
        if line and not line[0].isspace():
            names = [n.strip() for n in line.split(":")[0].split(",") if n.strip()]
            for n in names:
                out[n] = ""
        elif line.strip():
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
    return {n: _first_sentence(text) for n, text in out.items() if text and n.isidentifier()}


def _is_heading(line: str, underline: str, title: str | None = None) -> bool:
    """Whether ``line`` over ``underline`` is a numpydoc section heading (``title`` if given)."""
    text = line.strip()
    return bool(text) and set(underline.strip()) == {"-"} and title in (None, text)


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    sentence = text if end < 0 else text[: end + 1]
    return sentence.rstrip(".")


def _plan_keywords(plan_cls: type | None) -> set[str]:
    """Keyword names of ``plan_cls.__init__`` and of its bases (through ``**kwargs``)."""
    if plan_cls is None:
        return set()
    names: set[str] = set()
    for cls in plan_cls.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names - {"self", "module", "kwargs", "args"}


# -- pieces several methods share --------------------------------------------------------------
#: History keys a method's record keeps (Lightning logs many more).
HISTORY_KEYS = (
    "privacy_loss",
    "privacy_js",
    "critic_accuracy",
    "unlearn_auc_validation",
    "retain_elbo_validation",
    "forget_neg_elbo",
    "forget_divergence",
    "elbo_train",
)


def with_history(summary: dict[str, Any], runner) -> dict[str, Any]:
    """``summary`` with the fit's epochs, batches per epoch and logged history added."""
    history = logged_history(runner)
    summary["epochs_run"] = int(runner.trainer.current_epoch)
    summary["retain_batches_per_epoch"] = int(runner.trainer.num_training_batches)
    summary["history"] = {k: v for k, v in history.items() if k in HISTORY_KEYS}
    return summary


def split_validation(idx: np.ndarray, fraction: float, seed: int, what: str):
    """(fit, validation) parts of ``idx``; an error below the 2 cells early stopping needs."""
    if idx.size < 2:
        raise ValueError(
            f"Early stopping needs at least 2 {what} (one to unlearn with, one to validate on); "
            f"got {idx.size}."
        )
    return validation_split(idx, fraction=fraction, seed=seed)


def retain_validation(run: UnlearningRun, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) parts of the retained cells, drawn with the run's seed."""
    n_val = round(fraction * run.retain.size)
    n_val = min(n_val, run.retain.size - 1)
    if n_val <= 0:
        return run.retain, np.zeros(0, np.int64)
    val = np.sort(run.rng.permutation(run.retain)[:n_val])
    return np.setdiff1d(run.retain, val), val


def sample_retained(run: UnlearningRun, n: int) -> np.ndarray:
    """At most ``n`` retained cells, drawn with the run's seed, sorted."""
    return np.sort(run.rng.permutation(run.retain)[: min(n, run.retain.size)])


def warn_underpowered(run: UnlearningRun, n_forget: int, n_nonmembers: int) -> bool:
    """Warn (and return True) when too few cells are left for a method to judge its epochs."""
    if min(n_forget, n_nonmembers) >= MIN_SELECTION_CELLS:
        return False
    warnings.warn(
        f"Only {n_forget} forget and {n_nonmembers} non-member cells are left to judge "
        f"the unlearning epochs (at least {MIN_SELECTION_CELLS} of each are needed for an "
        f"AUC to mean anything), so '{run.method}' runs its fixed budget of "
        f"{run.max_epochs} epochs and keeps the final state, without selection. Pass more "
        "same-population cells the model never saw with `nonmembers=`, or use an exact "
        "method (method='retrain').",
        UserWarning,
        stacklevel=4,
    )
    return True


# -- hyper-parameter groups several methods declare --------------------------------------------
#: Every plan-based method's training settings (plan arguments default to the plan's signature).
TRAINING_PARAMS = {
    "lr": Param(kind="float", low=0, low_open=True, doc="learning rate of the VAE"),
    "batch_size": Param(128, "int", low=1, doc="retain minibatch size"),
    # Run-level meaning: None = the original training's final KL weight.
    "kl_weight": Param(
        None, "float", low=0, allow_none=True, doc="KL weight (default: the original's final)"
    ),
}
#: A share of the retain minibatches per epoch, for the methods whose steps cost several passes.
RETAIN_FRACTION_PARAMS = {
    # The game's cost per retain cell is ~2.7x a plain training step (look-ahead + update,
    # each with forget / non-member passes); a quarter of the retain minibatches per epoch
    # over 20 epochs keeps it near 0.15x of a 100-epoch retrain (benchmarks/unlearning.py).
    "retain_fraction": Param(
        0.25,
        "float",
        low=0,
        high=1,
        low_open=True,
        doc="share of the retain minibatches drawn (afresh) in each epoch",
    ),
}


class PlanMethod(UnlearningMethod):
    """A method that builds its ``plan`` from the run and fits it on the retained cells.

    Subclasses give :meth:`plan_inputs` (the tensors and values that are not hyper-parameters)
    and, when the plan reports one, :meth:`summary`.
    """

    def plan_inputs(self, run: UnlearningRun) -> dict[str, Any]:
        """Plan arguments besides the hyper-parameters (e.g. the forget cells' tensors)."""
        return {}

    def summary(self, plan) -> dict[str, Any]:
        """What the fitted plan reports for the record."""
        return {}

    def run(self, run: UnlearningRun) -> dict[str, Any]:
        """Build the plan, fit it on the retained cells, record its summary and history."""
        # Inputs win over a same-named hyper-parameter (SSD's `ssd`, always on).
        arguments = {**self.plan_arguments(run), **self.plan_inputs(run)}
        plan = self.plan(run.model.module, **arguments)
        runner = run.fit(plan, run.retain)
        return with_history(self.summary(plan), runner)


class ForgetPlanMethod(PlanMethod):
    """A :class:`PlanMethod` whose plan takes the forget cells' tensors (and nothing else)."""

    def plan_inputs(self, run: UnlearningRun) -> dict[str, Any]:
        """The forget cells' tensors."""
        return {"forget_tensors": gather_tensors(run.model, run.forget)}
