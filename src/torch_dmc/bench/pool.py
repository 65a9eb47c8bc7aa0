"""``dmc bench --jobs N``: evaluate units in N spawned CPU processes.

Each process is set up once (:func:`_init_worker`): its thread count, the model, the stats, and
its own :class:`~torch_dmc.bench.evaluate.OpenSets`. Data opened from specs is opened again in
the worker (a memory-mapped file is not copied through a pipe); data given as an object is sent.
The worker's state lives in this module's ``_WORKER`` dict, which only worker processes fill.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .evaluate import OpenSets, evaluate_unit
from .protocol import Unit

__all__ = ["run_parallel"]

_WORKER: dict[str, Any] = {}


def _init_worker(state: dict[str, Any], threads: int) -> None:
    """Set up a worker process: threads, model, stats and its own open sets."""
    torch.set_num_threads(threads)
    _WORKER.update(state)
    data = state["data"]
    if data is None:  # reopen from the specs
        from .datasets import open_bench_data

        data = open_bench_data(**state["data_args"], progress=False, need_fit=False)
    _WORKER["sets"] = OpenSets(data)


def _worker_unit(unit: Unit) -> list[tuple[int, int, float]]:
    w = _WORKER
    return evaluate_unit(unit, w["protocol"], w["net"], w["stats"], w["sets"], w["channels_last"])


def run_parallel(units: list[Unit], state: dict[str, Any], jobs: int, threads: int,
                 record: Callable[[Unit, list], None]) -> None:
    """Evaluate ``units`` in ``jobs`` spawned processes of ``threads`` threads each;
    ``record(unit, results)`` as each finishes (in the order they finish).

    ``state``: ``protocol``, ``net``, ``stats``, ``channels_last``, and either ``data`` (a
    :class:`~torch_dmc.bench.datasets.BenchData`, sent) or ``data=None`` with ``data_args`` (the
    keyword arguments of :func:`~torch_dmc.bench.datasets.open_bench_data`).
    """
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(
        jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(state, threads)
    )
    try:
        pending_futures = {pool.submit(_worker_unit, unit): unit for unit in units}
        while pending_futures:
            finished, _ = wait(pending_futures, return_when=FIRST_COMPLETED)
            for future in finished:
                record(pending_futures.pop(future), future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
