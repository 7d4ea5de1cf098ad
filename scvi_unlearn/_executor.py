"""One way to run many independent model fits: in this process, a local process pool, or Ray.

Shadow pools, method reference pools and retrain seeds are embarrassingly parallel: K fits
that share the data and differ by seed and cells. :class:`Executor` runs such a list of tasks
and hands each result back to the caller (in the driver process) as soon as it is done, so the
caller writes its cache entry there: the cache is the same whatever the backend, needs no
shared file system on a cluster, and is written atomically by one process.

Backends:

- ``"local"`` with ``n_workers=1`` (default): one task after another, in this process.
- ``"local"`` with ``n_workers > 1``: a pool of fresh (spawned) processes, each with
  ``threads_per_worker`` torch threads.
- ``"ray"`` (optional extra ``scvi-unlearn[ray]``): tasks on an existing Ray cluster
  (``address="auto"`` or ``"ray://host:10001"``) or on a local Ray instance it starts, with
  ``num_cpus`` / ``num_gpus`` per task. scvi-tools' own ``autotune`` runs on Ray too.

Determinism: a task's result depends only on its arguments (seeds included) and on its number
of torch threads, so the same seeds and ``threads_per_worker`` give bit-identical models on
every backend (``tests/test_executor.py``). A task that raises, or whose worker dies, is
retried up to ``max_retries`` times; after that the run stops with an error naming the task,
and the results already handed back (cached) stay: in this process the task's own exception
is raised again (with a note naming the task), from a pool or Ray a :class:`TaskFailedError`.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import torch
from scvi.utils import track

BACKENDS = ("local", "ray")

#: A task function: ``fn(shared, **task)``, defined at module level (workers import it).
TaskFunction = Callable[..., Any]


class TaskFailedError(RuntimeError):
    """A task still failed after its retries."""


@dataclass
class Executor:
    """Run independent tasks sequentially, on a local process pool, or on Ray.

    Parameters
    ----------
    backend
        ``"local"`` or ``"ray"``.
    n_workers
        ``"local"``: processes (1: in this process, no pickling). ``"ray"``: ignored (Ray
        schedules by ``num_cpus`` / ``num_gpus``).
    threads_per_worker
        Torch threads inside each task; ``None`` leaves this process's setting for the
        in-process backend and uses 1 for pools and Ray (workers share the machine's cores).
        Results are bit-identical across backends for the same value.
    address
        ``"ray"``: the cluster to connect to (as ``ray.init(address=...)``); ``None`` starts
        a local Ray instance (with ``num_cpus_total`` CPUs) unless Ray is already initialised.
    num_cpus, num_gpus
        ``"ray"``: resources of each task.
    num_cpus_total
        ``"ray"`` with a local instance: CPUs it may use (default: all).
    max_retries
        How often a task that raised, or whose worker died, is run again.
    progress_bar
        Show a progress bar of finished tasks.

    Examples
    --------
    >>> ex = Executor(progress_bar=False)  # in this process, one task after another
    >>> ex.map(_square, [{"x": 2}, {"x": 3}], shared=10)
    [14, 19]
    """

    backend: str = "local"
    n_workers: int = 1
    threads_per_worker: int | None = None
    address: str | None = None
    num_cpus: float = 1
    num_gpus: float = 0
    num_cpus_total: int | None = None
    max_retries: int = 1
    progress_bar: bool = True
    _ray_started: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown backend {self.backend!r}; choose from {BACKENDS}.")
        if int(self.n_workers) < 1:
            raise ValueError(f"n_workers must be >= 1, got {self.n_workers}.")
        if self.threads_per_worker is not None and int(self.threads_per_worker) < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}.")
        if int(self.max_retries) < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}.")
        if self.backend == "ray":
            _import_ray()  # fail now, with the fix, not after the first fits

    def describe(self) -> dict[str, Any]:
        """The settings, for provenance and benchmark tables."""
        return {
            "backend": self.backend,
            "n_workers": int(self.n_workers),
            "threads_per_worker": self.threads_per_worker,
            "address": self.address,
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
        }

    def map(
        self,
        fn: TaskFunction,
        tasks: Sequence[dict[str, Any]],
        shared: Any = None,
        on_result: Callable[[int, Any], None] | None = None,
        description: str = "Running tasks",
        progress_bar: bool | None = None,
    ) -> list[Any]:
        """Run ``fn(shared, **task)`` for every task; return the results in task order.

        ``shared`` (e.g. the AnnData and the recipe) is sent once per worker, not once per
        task. ``on_result(i, result)`` runs in this process as soon as task ``i`` is done (in
        completion order): write cache entries there. ``progress_bar=False`` hides the bar
        for this call (``None``: the executor's setting).
        """
        tasks = list(tasks)
        if not tasks:
            return []
        if self.backend == "ray":
            runner = self._map_ray
        elif self.n_workers == 1:
            runner = self._map_here
        else:
            runner = self._map_pool
        results: list[Any] = [None] * len(tasks)

        def deliver(i: int, result: Any) -> None:
            results[i] = result
            if on_result is not None:
                on_result(i, result)

        done = runner(fn, tasks, shared, deliver)
        for _ in track(
            done,
            description=description,
            disable=not (self.progress_bar if progress_bar is None else progress_bar),
            total=len(tasks),
        ):
            pass
        return results

    # -- backends ------------------------------------------------------------------------
    def _map_here(self, fn, tasks, shared, deliver):
        previous = torch.get_num_threads()
        for i, task in enumerate(tasks):
            for attempt in range(self.max_retries + 1):
                try:
                    result = _call(fn, shared, task, self.threads_per_worker)
                    break
                except Exception as err:
                    if attempt == self.max_retries:
                        # In this process the task's own exception is the clearest error.
                        if hasattr(err, "add_note"):  # Python >= 3.11
                            err.add_note(str(_failed(i, task, attempt + 1, err)))
                        raise
                finally:
                    torch.set_num_threads(previous)
            deliver(i, result)
            yield i

    def _map_pool(self, fn, tasks, shared, deliver):
        threads = self.threads_per_worker or 1
        attempts = [0] * len(tasks)
        pending = list(range(len(tasks)))
        while pending:
            pool = ProcessPoolExecutor(
                max_workers=min(int(self.n_workers), len(pending)),
                # spawn: a fork of a process that already ran torch threads can deadlock
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(shared, threads),
            )
            futures = {pool.submit(_call_in_worker, fn, tasks[i]): i for i in pending}
            pending = []
            broken = False
            try:
                while futures:
                    finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for future in finished:
                        i = futures.pop(future)
                        try:
                            result = future.result()
                        except Exception as err:
                            attempts[i] += 1
                            if attempts[i] > self.max_retries:
                                raise _failed(i, tasks[i], attempts[i], err) from err
                            pending.append(i)
                            broken = broken or isinstance(err, BrokenProcessPool)
                            continue
                        deliver(i, result)
                        yield i
                    if broken:  # a dead worker takes the pool down: retry in a new one
                        pending.extend(futures.values())
                        for i in futures.values():
                            attempts[i] += 1
                        break
            finally:
                pool.shutdown(wait=not broken, cancel_futures=True)

    def _map_ray(self, fn, tasks, shared, deliver):
        ray = _import_ray()
        self._ensure_ray(ray)
        remote = ray.remote(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_retries=int(self.max_retries),  # a dead worker
            retry_exceptions=int(self.max_retries) > 0,  # a task that raised
        )(_call)
        shared_ref = ray.put(shared)
        threads = self.threads_per_worker or max(1, int(self.num_cpus))
        refs = {remote.remote(fn, shared_ref, task, threads): i for i, task in enumerate(tasks)}
        try:
            while refs:
                finished, _ = ray.wait(list(refs), num_returns=1)
                for ref in finished:
                    i = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as err:
                        raise _failed(i, tasks[i], int(self.max_retries) + 1, err) from err
                    deliver(i, result)
                    yield i
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)

    def _ensure_ray(self, ray) -> None:
        if self.address not in (None, "auto", "local"):
            _check_reachable(self.address)  # ray.init itself retries for minutes
        if ray.is_initialized():
            return
        try:
            if self.address is None:
                ray.init(num_cpus=self.num_cpus_total, include_dashboard=False,
                         log_to_driver=False)  # fmt: skip
            else:
                ray.init(address=self.address, log_to_driver=False)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            where = self.address or "a new local instance"
            raise ConnectionError(
                f"Could not start or reach Ray at {where}: {err}. Start a cluster with "
                "`ray start --head` and pass its address (or address=None for a local one)."
            ) from err
        self._ray_started = True

    def shutdown(self) -> None:
        """Stop the local Ray instance this executor started (clusters are left alone)."""
        if self._ray_started:
            _import_ray().shutdown()
            self._ray_started = False


_DEFAULT = Executor()


def get_default_executor() -> Executor:
    """The executor used when a function is given none (sequential, in this process)."""
    return _DEFAULT


def set_default_executor(executor: Executor | None) -> None:
    """Make ``executor`` the default for shadow and reference pools (``None``: sequential).

    Useful when the pools are trained deep inside another call, e.g. the method reference
    pool of ``model.unlearn(..., method="auto")``.
    """
    global _DEFAULT
    _DEFAULT = Executor() if executor is None else executor


# -- worker side -------------------------------------------------------------------------------
_WORKER_SHARED: dict[str, Any] = {}


def _init_worker(shared: Any, threads: int) -> None:
    _WORKER_SHARED["shared"] = shared
    torch.set_num_threads(threads)


def _call_in_worker(fn: TaskFunction, task: dict[str, Any]) -> Any:
    return fn(_WORKER_SHARED["shared"], **task)


def _call(fn: TaskFunction, shared: Any, task: dict[str, Any], threads: int | None) -> Any:
    if threads is not None:
        torch.set_num_threads(int(threads))
    return fn(shared, **task)


def _failed(i: int, task: dict[str, Any], attempts: int, err: BaseException) -> TaskFailedError:
    shown = {k: v for k, v in task.items() if isinstance(v, int | float | str | bool)}
    return TaskFailedError(
        f"Task {i} {shown} failed after {attempts} attempt(s): {type(err).__name__}: {err}"
    )


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError unless ``[ray://]host:port`` accepts a TCP connection."""
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise ConnectionError(
            f"Could not reach Ray at {address!r} ({err}). Start a cluster with "
            "`ray start --head` and pass its address (or address=None for a local one)."
        ) from err


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            'backend="ray" needs Ray: pip install "scvi-unlearn[ray]" (or pip install ray).'
        ) from err
    return ray


def _square(shared: int, x: int) -> int:
    """A task for the docstring example."""
    return shared + x * x


def writable_dir(path: os.PathLike | str) -> None:
    """Raise a clear error unless ``path`` can be created and written to."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as err:
        raise PermissionError(
            f"The cache directory {str(path)!r} is not writable ({err.strerror}); pass another "
            "`cache_dir` or set $SCVI_UNLEARN_CACHE."
        ) from err
