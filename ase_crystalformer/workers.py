"""Chunks of work spread over worker processes on one machine, results in input order.

``crystalformer predict`` and ``featurize`` use this for ``--workers N``. Each worker is a
fresh interpreter (the 'forkserver' start method where the platform has it, else 'spawn'):
a child forked from a process whose torch already ran OpenMP threads can hang at its first
parallel region. Each worker builds its state once (e.g. loads the models) and runs torch
on total threads // N threads, so N workers use the cores one process would.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")

_state: Any = None  # the worker's own state (set once per worker process by _start)


def _start(setup: Callable[..., Any], setup_args: Sequence[Any], threads: int) -> None:
    global _state
    torch.set_num_threads(threads)
    _state = setup(*setup_args)


def _call(task: Callable[[Any, Any], Any], item: Any) -> Any:
    return task(_state, item)


def ordered_map(
    task: Callable[[Any, Item], Result],
    items: Iterable[Item],
    workers: int,
    setup: Callable[..., Any],
    setup_args: Sequence[Any] = (),
) -> Iterator[Result]:
    """``task(state, item)`` for each item, yielded in the order of ``items``.

    ``state = setup(*setup_args)`` once per process. With ``workers == 1`` everything runs
    here (no process is started). ``task`` and ``setup`` must be module-level functions (they
    are pickled by name). An exception of a task is raised when its result is reached, as
    it would be in one process, and the tasks not yet started are cancelled.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        state = setup(*setup_args)
        for item in items:
            yield task(state, item)
        return
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # The server imports torch and this package once (before any thread of theirs
        # runs); each worker forks from it instead of importing them again.
        context.set_forkserver_preload([__name__])
    else:
        context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // workers)
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start, initargs=(setup, tuple(setup_args), threads)
    )
    try:
        futures = [pool.submit(_call, task, item) for item in items]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
