"""One executor for many independent fits: sequential, a local process pool, Ray."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import scvi_unlearn as su
from scvi_unlearn.audit import train_shadow_pool
from scvi_unlearn.audit._shadows import fit_shadow

N_SHADOWS = 2


@pytest.fixture(scope="module")
def tiny():
    adata = su.data.synthetic_pbmc(n_cells=120, n_genes=40, seed=4)
    recipe = su.Recipe(
        model_kwargs={"n_hidden": 8, "n_latent": 2},
        train_kwargs={"max_epochs": 2, "batch_size": 32, "train_size": 1.0},
    )
    return adata, recipe


def _pool(tiny, cache_dir, executor, keep_models=True):
    adata, recipe = tiny
    return train_shadow_pool(
        adata, recipe, N_SHADOWS, np.arange(adata.n_obs), seed=0, cache_dir=cache_dir,
        accelerator="cpu", progress_bar=False, keep_models=keep_models, executor=executor,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sequential_pool(tiny, tmp_path_factory):
    """The reference: one fit after another in this process, one torch thread."""
    folder = tmp_path_factory.mktemp("sequential")
    return _pool(tiny, folder, su.Executor(threads_per_worker=1, progress_bar=False)), folder


def _assert_identical(pool, reference):
    np.testing.assert_array_equal(pool.features, reference.features)
    np.testing.assert_array_equal(pool.in_mask, reference.in_mask)
    for mine, theirs in zip(pool.state_dicts, reference.state_dicts):
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), k


def _cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in next(folder.glob("shadows-*")).iterdir())


# -- tasks (module level, so workers can import or receive them) ------------------------------
def _square(shared, x):
    return shared + x * x


def _fails_once(shared, marker, x, how="raise"):
    """Fails on its first run (marker file absent), succeeds on the retry."""
    marker = Path(marker)
    if not marker.exists():
        marker.write_text("failed once")
        if how == "exit":
            os._exit(3)  # the worker process dies
        raise RuntimeError("transient failure")
    return shared + x


def _always_fails(shared, x):
    raise ValueError(f"bad task {x}")


def _flaky_shadow(shared, marker, **task):
    if not Path(marker).exists():
        Path(marker).write_text("failed once")
        raise RuntimeError("worker lost its data")
    return fit_shadow(shared, **task)


# -- the executor itself ----------------------------------------------------------------------
def test_sequential_map_keeps_order_and_reports_each_result():
    seen = []
    out = su.Executor(progress_bar=False).map(
        _square, [{"x": 1}, {"x": 2}, {"x": 3}], shared=1, on_result=lambda i, r: seen.append(i)
    )
    assert out == [2, 5, 10]
    assert seen == [0, 1, 2]


def test_sequential_retries_then_names_the_failed_task(tmp_path):
    ex = su.Executor(progress_bar=False, max_retries=1)
    assert ex.map(_fails_once, [{"marker": str(tmp_path / "m"), "x": 2}], shared=1) == [3]
    with pytest.raises(ValueError, match="bad task 7") as info:  # the task's own error
        ex.map(_always_fails, [{"x": 7}])
    assert "Task 0 {'x': 7} failed after 2 attempt(s)" in "".join(info.value.__notes__)
    pool = su.Executor(n_workers=2, threads_per_worker=1, progress_bar=False, max_retries=0)
    with pytest.raises(su.TaskFailedError, match=r"Task 0 \{'x': 5\} failed after 1 attempt"):
        pool.map(_always_fails, [{"x": 5}])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "dask"}, "Unknown backend"),
        ({"n_workers": 0}, "n_workers"),
        ({"threads_per_worker": 0}, "threads_per_worker"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        su.Executor(**kwargs)


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"scvi-unlearn\[ray\]"):
        su.Executor(backend="ray")


def test_unwritable_cache_is_refused_before_any_fit(tiny, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    with pytest.raises(PermissionError, match=r"not writable.*cache_dir"):
        _pool(tiny, blocked / "cache", su.Executor(progress_bar=False))


def test_default_executor_can_be_set_and_reset():
    parallel = su.Executor(n_workers=2, progress_bar=False)
    su.set_default_executor(parallel)
    try:
        assert su.get_default_executor() is parallel
    finally:
        su.set_default_executor(None)
    assert su.get_default_executor().n_workers == 1


# -- same models on every backend, same cache ---------------------------------------------------
def test_process_pool_gives_bit_identical_shadows_and_cache(tiny, sequential_pool, tmp_path):
    reference, reference_dir = sequential_pool
    ex = su.Executor(n_workers=2, threads_per_worker=1, progress_bar=False)
    pool = _pool(tiny, tmp_path, ex)
    _assert_identical(pool, reference)
    assert _cache_files(tmp_path) == _cache_files(reference_dir)
    assert not [p for p in tmp_path.rglob("*tmp*")]  # nothing half-written left behind


def test_process_pool_recovers_from_a_dead_worker(tmp_path):
    ex = su.Executor(n_workers=2, threads_per_worker=1, progress_bar=False, max_retries=1)
    (tmp_path / "ok").write_text("never fails")
    tasks = [
        {"marker": str(tmp_path / "dead"), "x": 1, "how": "exit"},
        {"marker": str(tmp_path / "ok"), "x": 2},
    ]
    assert ex.map(_fails_once, tasks, shared=10) == [11, 12]
    assert (tmp_path / "dead").exists()  # the first worker did die


def test_resume_trains_only_the_missing_shadows(tiny, sequential_pool, tmp_path):
    reference, _ = sequential_pool
    _pool(tiny, tmp_path, su.Executor(threads_per_worker=1, progress_bar=False))
    folder = next(tmp_path.glob("shadows-*"))
    (folder / "pool.npz").unlink()
    (folder / f"shadow_{N_SHADOWS - 1}.npz").unlink()  # as if the run died during the last
    calls = []
    ex = su.Executor(threads_per_worker=1, progress_bar=False)
    original = ex.map

    def spy(fn, tasks, **kwargs):
        calls.append(len(tasks))
        return original(fn, tasks, **kwargs)

    ex.map = spy
    _assert_identical(_pool(tiny, tmp_path, ex), reference)
    assert calls == [1]


# -- Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_executor():
    import ray  # in the test extra: never skipped

    # Ray workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ex = su.Executor(
        backend="ray", num_cpus_total=2, threads_per_worker=1, progress_bar=False, max_retries=1
    )
    yield ex
    ex.shutdown()
    assert not ray.is_initialized()


@pytest.mark.ray
def test_ray_gives_bit_identical_shadows_and_cache(tiny, sequential_pool, ray_executor, tmp_path):
    reference, reference_dir = sequential_pool
    pool = _pool(tiny, tmp_path, ray_executor)
    _assert_identical(pool, reference)
    assert _cache_files(tmp_path) == _cache_files(reference_dir)


@pytest.mark.ray
def test_ray_retries_a_task_that_raised(tiny, ray_executor, tmp_path):
    adata, recipe = tiny
    shared = {
        "adata": adata, "recipe": recipe, "accelerator": "cpu", "devices": "auto",
        "feature_batch_size": 64,
    }  # fmt: skip
    task = {"marker": str(tmp_path / "m"), "cells": np.arange(60), "seed": 3, "keep_model": False}
    (result,) = ray_executor.map(_flaky_shadow, [task], shared=shared)
    assert (tmp_path / "m").exists()  # it did fail once
    assert result["features"].shape == (adata.n_obs, len(su.module.SCALAR_FEATURES))


@pytest.mark.ray
def test_unreachable_ray_address_is_a_clear_error():
    ex = su.Executor(backend="ray", address="127.0.0.1:1", progress_bar=False)
    with pytest.raises(ConnectionError, match="ray start --head"):
        ex.map(_square, [{"x": 1}], shared=0)


# -- retrain seeds ------------------------------------------------------------------------------
def test_retrain_models_on_a_process_pool_equal_sequential_retrains(tiny):
    adata, recipe = tiny
    # Cells left out of training, as in a lab's model: unlearn() evaluates them in the worker,
    # which needs the model's AnnData manager registered there.
    model = recipe.fit_cells(
        adata.copy(), np.arange(100), accelerator="cpu", enable_progress_bar=False
    )
    forget = np.arange(10)
    quiet = {"accelerator": "cpu", "enable_progress_bar": False}
    seen = []
    sequential = su.model.retrain_models(
        model, forget, [0, 1], executor=su.Executor(threads_per_worker=1, progress_bar=False),
        on_model=lambda seed, m, s: seen.append((seed, s > 0)), **quiet,
    )  # fmt: skip
    pooled = su.model.retrain_models(
        model, forget, [0, 1], executor=su.Executor(n_workers=2, threads_per_worker=1,
                                                    progress_bar=False), **quiet,
    )  # fmt: skip
    assert sorted(seen) == [(0, True), (1, True)]
    for a, b in zip(sequential, pooled):
        assert isinstance(b, su.model.SCVI)
        # back from a worker process, yet usable in this one: on the caller's AnnData and on
        # its own, which holds no forgotten cell
        latent_b = b.get_latent_representation(model.adata, indices=forget)
        latent_a = a.get_latent_representation(model.adata, indices=forget)
        np.testing.assert_allclose(latent_b, latent_a)
        assert b.get_latent_representation().shape[0] == b.adata.n_obs == 110
        assert not set(model.adata.obs_names[forget]) & set(b.adata.obs_names)
        assert len(b.train_indices) == 90
        assert b.provenance["events"][-1]["method"] == "retrain"
        assert b.provenance["events"][-1]["utility"]["n_held_out_cells"] == 20
        sa, sb = a.module.state_dict(), b.module.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    first, second = (m.module.state_dict() for m in sequential)
    assert not all(torch.equal(first[k], second[k]) for k in first)  # seeds differ
    with pytest.raises(ValueError, match="exact retraining method"):
        su.model.retrain_models(model, forget, [0], method="fisher")
    with pytest.raises(ValueError, match="Seeds repeat"):
        su.model.retrain_models(model, forget, [0, 0])
