"""Shadow scVI models: trained with the target's recipe on random halves of a cell pool.

Shadows are per dataset (and recipe), not per forget set: they are trained once, their
features on every cell are cached on disk, and any later audit of the same data reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import sparse

from scvi_unlearn._compat import SCVI_BASE_MODEL_LOGGER
from scvi_unlearn._executor import Executor, get_default_executor, writable_dir
from scvi_unlearn.audit._features import attack_features
from scvi_unlearn.module import SCALAR_FEATURES

if TYPE_CHECKING:
    from scvi_unlearn._recipe import Recipe

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$SCVI_UNLEARN_CACHE`` or ``~/.cache/scvi_unlearn/shadows``."""
    env = os.environ.get("SCVI_UNLEARN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "scvi_unlearn" / "shadows"


def adata_fingerprint(adata) -> str:
    """Hash of the cells, genes and counts, so a cache is never reused on other data."""
    h = hashlib.sha256()
    h.update("\n".join(map(str, adata.obs_names)).encode())
    h.update("\n".join(map(str, adata.var_names)).encode())
    x = adata.X
    if sparse.issparse(x):
        x = x.tocsr()
        for part in (x.indptr, x.indices, x.data):
            h.update(np.ascontiguousarray(part).tobytes())
    else:
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]


def balanced_membership(n_shadows: int, n_cells: int, seed: int) -> np.ndarray:
    """``(n_shadows, n_cells)`` mask in which every cell is IN for exactly half the shadows.

    Examples
    --------
    >>> m = balanced_membership(4, 6, seed=0)
    >>> m.sum(0).tolist()
    [2, 2, 2, 2, 2, 2]
    """
    if n_shadows < 2 or n_shadows % 2:
        raise ValueError(f"n_shadows must be an even number >= 2, got {n_shadows}.")
    rng = np.random.default_rng(seed)
    # Rank random keys within each cell: the lower half of shadows train on it (Carlini et al.).
    keys = rng.random((n_shadows, n_cells))
    return keys.argsort(0).argsort(0) < n_shadows // 2


def paired_membership(n_shadows: int, n_groups: int, seed: int) -> np.ndarray:
    """Complementary pairs: shadows ``2j`` and ``2j + 1`` split the groups into two halves.

    Every group is IN for exactly half of the shadows, and every shadow trains on half of the
    groups (a random draw per group, as :func:`balanced_membership` makes, could leave a shadow
    with no donor at all when there are only a few).

    Examples
    --------
    >>> m = paired_membership(4, 5, seed=0)
    >>> m.sum(0).tolist(), m.sum(1).tolist() in ([2, 3, 2, 3], [3, 2, 3, 2], [2, 3, 3, 2],
    ...                                          [3, 2, 2, 3])
    ([2, 2, 2, 2, 2], True)
    """
    if n_shadows < 2 or n_shadows % 2:
        raise ValueError(f"n_shadows must be an even number >= 2, got {n_shadows}.")
    rng = np.random.default_rng(seed)
    mask = np.zeros((n_shadows, n_groups), dtype=bool)
    for j in range(n_shadows // 2):
        order = rng.permutation(n_groups)
        first = order[: (n_groups + rng.integers(0, 2)) // 2]  # odd counts: either half larger
        mask[2 * j, first] = True
        mask[2 * j + 1] = ~mask[2 * j]
    return mask


def leave_out_membership(n_shadows: int, n_groups: int, n_out: int, seed: int) -> np.ndarray:
    """Each shadow leaves out ``n_out`` groups, and every group is left out equally often.

    Matches shadows to an audited model that trained on all but ``n_out`` groups (a model
    retrained without a withdrawn donor): the groups are cycled through in random orders, so
    each is OUT for exactly ``n_shadows * n_out / n_groups`` shadows (which must be a whole
    number >= 2, for a variance).

    Examples
    --------
    >>> m = leave_out_membership(16, 8, 1, seed=0)
    >>> (~m).sum(0).tolist(), (~m).sum(1).max()
    ([2, 2, 2, 2, 2, 2, 2, 2], np.int64(1))
    """
    total = n_shadows * n_out
    if not 1 <= n_out < n_groups or total % n_groups or total // n_groups < 2:
        step = n_groups // int(np.gcd(n_out, n_groups))
        least = -(-2 * n_groups // n_out)
        raise ValueError(
            f"{n_shadows} shadows that each leave out {n_out} of {n_groups} groups cannot leave "
            f"every group out equally often and at least twice: use a multiple of {step} "
            f"shadows, at least {least}."
        )
    rng = np.random.default_rng(seed)
    cycle = np.concatenate([rng.permutation(n_groups) for _ in range(total // n_groups)])
    mask = np.ones((n_shadows, n_groups), dtype=bool)
    for k in range(n_shadows):
        mask[k, cycle[k * n_out : (k + 1) * n_out]] = False
    if (mask.sum(1) != n_groups - n_out).any():  # a group drawn twice for one shadow: redraw
        return leave_out_membership(n_shadows, n_groups, n_out, seed + 1)
    return mask


@dataclass
class ShadowPool:
    """Shadow models trained with one recipe on random halves of ``pool`` cells.

    Attributes
    ----------
    features
        ``(n_shadows, n_obs, n_features)`` features of every cell under every shadow.
    in_mask
        ``(n_shadows, n_obs)`` whether the shadow actually trained on the cell (cells outside the
        pool, and cells a recipe put in scVI's validation split, are OUT).
    """

    features: np.ndarray
    in_mask: np.ndarray
    pool: np.ndarray
    feature_names: tuple[str, ...]
    train_seconds: list[float]
    #: Each model's weights (``state_dict``), only when the pool was trained with
    #: ``keep_models=True`` (methods that need a reference model's outputs, not only its
    #: features: ``oracle_matching``).
    state_dicts: list[dict] | None = None

    @property
    def n_shadows(self) -> int:
        return int(self.in_mask.shape[0])

    def save(self, path: Path) -> None:
        """Write all arrays to ``path`` (``.npz``), atomically (a killed run leaves no file)."""
        _atomic_savez(
            Path(path),
            features=self.features,
            in_mask=self.in_mask,
            pool=self.pool,
            feature_names=np.array(self.feature_names),
            train_seconds=np.array(self.train_seconds),
        )

    @classmethod
    def load(cls, path: Path, legacy: bool = False) -> ShadowPool | None:
        """The pool saved at ``path``; ``None`` if it is damaged (see ``_read_entry``)."""
        f = _read_entry(Path(path), _POOL_KEYS, legacy=legacy)
        if f is None:
            return None
        return cls(
            features=f["features"],
            in_mask=f["in_mask"],
            pool=f["pool"],
            feature_names=tuple(f["feature_names"].tolist()),
            train_seconds=f["train_seconds"].tolist(),
        )


#: The arrays of a saved pool and of one shadow's entry.
_POOL_KEYS = ("features", "in_mask", "pool", "feature_names", "train_seconds")
_SHADOW_KEYS = ("features", "in_mask", "seconds")


@contextlib.contextmanager
def _quiet_lightning():
    """Silence Lightning's per-fit banners while many shadow models train.

    Raise the ``scvi_unlearn`` logger to DEBUG (the CLI's ``--verbose`` does) to see them.
    """
    if logging.getLogger("scvi_unlearn").isEnabledFor(logging.DEBUG):
        yield
        return
    names = (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
        "lightning.fabric.utilities.seed",
        SCVI_BASE_MODEL_LOGGER,
    )
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def train_shadow_pool(
    adata,
    recipe: Recipe,
    n_shadows: int,
    pool: np.ndarray,
    seed: int,
    cache_dir: Path | None,
    accelerator: str = "auto",
    devices="auto",
    progress_bar: bool = True,
    feature_batch_size: int = 2048,
    groups: np.ndarray | None = None,
    groups_out: int | None = None,
    keep_models: bool = False,
    executor: Executor | None = None,
) -> ShadowPool:
    """Train (or load from cache) the shadow models and featurise every cell under each.

    With ``keep_models``, each model's weights are kept too (``ShadowPool.state_dicts``) and
    cached beside its features as a plain tensor file (``model_k.pt``, read back with
    ``torch.load(weights_only=True)``); a cached pool without them is completed by training
    the models again (same seeds, same cells, so the same features).

    Each shadow is cached as soon as it is done, so an interrupted run resumes. With
    ``groups`` (an integer code per pool cell, e.g. the donor), whole groups are IN or OUT:
    every group is IN for exactly half the shadows, and so are its cells, and every shadow
    trains on half of the groups (``paired_membership``); with ``groups_out``, every
    shadow trains on all groups but ``groups_out`` (``leave_out_membership``).

    The fits run on ``executor`` (default: :func:`~scvi_unlearn.get_default_executor`,
    sequential in this process): a local process pool or Ray give the same models for the same
    seeds (and torch threads per task), and the cache is written here, by this process.
    """
    if groups is None:
        membership = balanced_membership(n_shadows, pool.size, seed)
    else:
        groups = np.asarray(groups, dtype=np.int64)
        if groups.shape != pool.shape:
            raise ValueError(
                f"`groups` needs one code per pool cell ({pool.size}), got {groups.size}."
            )
        n_groups = int(groups.max()) + 1
        design = (
            paired_membership(n_shadows, n_groups, seed)
            if groups_out is None
            else leave_out_membership(n_shadows, n_groups, int(groups_out), seed)
        )
        membership = design[:, groups]
    key = _cache_key(adata, recipe, n_shadows, pool, seed, groups, groups_out)
    folder = None if cache_dir is None else Path(cache_dir) / key

    def model_file(k: int) -> Path | None:
        return None if folder is None else folder / f"model_{k}.pt"

    legacy = False
    if folder is not None:
        legacy = _written_before_checksums(folder)
        done = folder / "pool.npz"
        weights = [_load_weights(model_file(k)) for k in range(n_shadows)] if keep_models else []
        result = ShadowPool.load(done, legacy=legacy) if done.exists() else None
        if result is not None and all(w is not None for w in weights):
            logger.info("Loading cached shadow models from %s", folder)
            if keep_models:
                result.state_dicts = weights
            if legacy:  # every entry now carries its checksum
                meta = json.loads((folder / "meta.json").read_text())
                (folder / "meta.json").write_text(
                    json.dumps({**meta, "checksums": True}, indent=2)
                )
            return result
        writable_dir(folder)
        (folder / "meta.json").write_text(
            json.dumps(
                {
                    "recipe": recipe.to_dict(),
                    "n_shadows": n_shadows,
                    "seed": seed,
                    "n_pool": int(pool.size),
                    "by_group": groups is not None,
                    "version": _CACHE_VERSION,
                    "checksums": True,
                },
                indent=2,
            )
        )
    features = np.empty((n_shadows, adata.n_obs, len(SCALAR_FEATURES)))
    in_mask = np.zeros((n_shadows, adata.n_obs), dtype=bool)
    seconds = [0.0] * n_shadows
    state_dicts: list[dict | None] = [None] * n_shadows
    todo = []
    for k in range(n_shadows):
        entry = (
            None
            if folder is None
            else _read_entry(folder / f"shadow_{k}.npz", _SHADOW_KEYS, legacy)
        )
        weights = _load_weights(model_file(k)) if keep_models and entry is not None else None
        if entry is not None and (not keep_models or weights is not None):
            state_dicts[k] = weights
            features[k], in_mask[k] = entry["features"], entry["in_mask"]
            seconds[k] = float(entry["seconds"])
            continue
        todo.append(k)

    def store(i: int, fitted: dict) -> None:
        # Runs in this process as each fit finishes: the cache is written by one process,
        # atomically, whatever the backend.
        k = todo[i]
        features[k] = fitted["features"]
        in_mask[k, fitted["trained_cells"]] = True
        seconds[k] = fitted["seconds"]
        if keep_models:
            state_dicts[k] = fitted["state_dict"]
            if model_file(k) is not None:
                _atomic_torch_save(fitted["state_dict"], model_file(k))
        if folder is not None:
            _atomic_savez(
                folder / f"shadow_{k}.npz",
                features=features[k], in_mask=in_mask[k], seconds=seconds[k],
            )  # fmt: skip

    runner = executor or get_default_executor()
    shared = {
        "adata": adata, "recipe": recipe, "accelerator": accelerator, "devices": devices,
        "feature_batch_size": feature_batch_size,
    }  # fmt: skip
    tasks = [
        {"cells": pool[membership[k]], "seed": seed * 10_007 + k, "keep_model": keep_models}
        for k in todo
    ]
    with _quiet_lightning():
        runner.map(
            fit_shadow, tasks, shared=shared, on_result=store,
            description="Training shadow models", progress_bar=None if progress_bar else False,
        )  # fmt: skip
    result = ShadowPool(
        features, in_mask, pool, SCALAR_FEATURES, seconds, state_dicts if keep_models else None
    )
    if folder is not None:
        result.save(folder / "pool.npz")
    return result


def fit_shadow(shared: dict, cells: np.ndarray, seed: int, keep_model: bool) -> dict:
    """One shadow fit (an :class:`~scvi_unlearn.Executor` task): train, featurise every cell.

    ``shared`` holds the AnnData, the recipe, the hardware arguments and the feature batch
    size; returns the features, the positions it trained on (scVI may hold some of ``cells``
    out for validation: only trained cells are IN), the wall time and, with ``keep_model``,
    the weights.
    """
    adata, recipe = shared["adata"], shared["recipe"]
    start = time.perf_counter()
    with _quiet_lightning():
        shadow = recipe.fit(
            recipe.subset_keeping_categories(adata, cells),
            seed=seed,
            accelerator=shared["accelerator"],
            devices=shared["devices"],
            enable_progress_bar=False,
        )
        features = attack_features(
            shadow, adata, batch_size=shared["feature_batch_size"]
        ).to_numpy()
    state = None
    if keep_model:
        state = {n: v.detach().cpu().clone() for n, v in shadow.module.state_dict().items()}
    return {
        "features": features,
        "trained_cells": cells[np.asarray(shadow.train_indices, dtype=int)],
        "seconds": time.perf_counter() - start,
        "state_dict": state,
    }


def _atomic_savez(path: Path, **arrays) -> None:
    """``np.savez_compressed`` to a temporary name, then rename (never half a file).

    The file carries a SHA-256 of its arrays (``checksum``), which ``_read_entry`` checks.
    """
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez_compressed(tmp, **arrays, checksum=np.array(_checksum(arrays)))
    tmp.replace(path)


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _read_entry(path: Path, keys: tuple[str, ...], legacy: bool = False) -> dict | None:
    """The arrays of a cache file, or ``None`` (with a warning, file removed) if it is damaged.

    Damaged: unreadable (truncated, not a zip), a missing array, a checksum that does not
    match its arrays, or features that are not finite. ``legacy`` accepts a file written before
    checksums were recorded (and records one now).
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in keys}
            stored = str(f["checksum"]) if "checksum" in f.files else None
        if stored is None and not legacy:
            raise ValueError("it carries no checksum")
        if stored is not None and stored != _checksum(arrays):
            raise ValueError("its checksum does not match its contents")
        if "features" in arrays and not np.isfinite(arrays["features"]).all():
            raise ValueError("its features are not all finite")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(
            f"The shadow cache entry {path} is damaged ({exc}); it is removed and its models "
            "are trained again.",
            UserWarning,
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
        return None
    if stored is None:
        _atomic_savez(path, **arrays)
    return arrays


def _load_weights(path: Path | None) -> dict | None:
    """A cached model's weights; ``None`` if absent or unreadable (then it is trained again)."""
    if path is None or not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        warnings.warn(
            f"The cached model {path} is damaged ({type(exc).__name__}); it is removed and "
            "trained again.",
            UserWarning,
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
        return None


def _written_before_checksums(folder: Path) -> bool:
    """Whether a cache folder predates checksums (its entries are accepted once, then sealed)."""
    meta = folder / "meta.json"
    if not meta.exists():
        return False
    try:
        return not json.loads(meta.read_text()).get("checksums", False)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _atomic_torch_save(state: dict, path: Path) -> None:
    """Write to a temporary name, then rename: a killed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _cache_key(
    adata,
    recipe: Recipe,
    n_shadows: int,
    pool: np.ndarray,
    seed: int,
    groups=None,
    groups_out=None,
) -> str:
    h = hashlib.sha256()
    h.update(adata_fingerprint(adata).encode())
    h.update(recipe.fingerprint().encode())
    h.update(np.ascontiguousarray(pool, dtype=np.int64).tobytes())
    h.update(f"{n_shadows}-{seed}-v{_CACHE_VERSION}".encode())
    if groups is not None:  # per-cell pools keep their old keys
        h.update(b"paired-groups" + np.ascontiguousarray(groups, dtype=np.int64).tobytes())
    if groups_out is not None:
        h.update(f"leave-out-{int(groups_out)}".encode())
    return f"shadows-{h.hexdigest()[:20]}"
