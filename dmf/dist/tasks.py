"""Running many tasks on the cluster, with results in order and bounded memory.

Two runners, for the two shapes of work dmf has:

- :func:`run_tasks`: every task's arguments are small (paths, block numbers, futures of data
  broadcast once); all are submitted at once, or run on a local thread pool without a cluster.
  Ingest's passes use it.
- :func:`run_windowed`: each task carries data of its own (a block of users' factors), scattered
  just before the task is submitted, with a bounded number in flight. Recommend and evaluate
  use it.

Task keys read ``<name>-<k>-<token>``, so the dashboard's task stream shows what runs.

:func:`gather_watched` waits for futures already submitted, and says so when nothing finishes
(the training loop's solves, exports and routing).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from dmf.errors import ClusterError

log = logging.getLogger("dmf")

# Stall periods with every worker paused for memory before gather_watched gives up.
PAUSED_STALLS = 2


def progress_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a progress setting: None shows the bar only on a terminal."""
    return None if progress is None else not progress


def run_tasks(
    client,
    fn: Callable,
    args: list[tuple],
    label: str,
    progress: bool | None,
    kwargs: dict | None = None,
    on_result: Callable[[Any], Any] | None = None,
) -> list:
    """Run ``fn(*a, **kwargs)`` for every ``a``: one Dask task each, or on a thread pool.

    Parameters
    ----------
    client
        A ``distributed.Client``, or None for a local thread pool (one thread per core).
    fn
        The task function; its name, with ``_`` as ``-``, names the tasks on the dashboard.
    args
        One tuple of positional arguments per task.
    label
        Text of the progress bar.
    progress
        Show a progress bar: True, False, or None (only on a terminal).
    kwargs
        Keyword arguments shared by every task (e.g. a future of data broadcast once).
    on_result
        Applied to each result as it arrives (on this thread); its return value is kept instead,
        so large parts of results can be folded into a total without being held all at once.

    Returns
    -------
    list
        The results, in the order of ``args``.
    """
    from tqdm import tqdm

    kwargs = kwargs or {}
    keep = on_result or (lambda x: x)
    results: list = [None] * len(args)
    bar = tqdm(
        total=len(args),
        desc=label,
        unit="task",
        disable=progress_disabled(progress),
        leave=False,
    )
    try:
        if client is None:
            with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
                futs = {ex.submit(fn, *a, **kwargs): j for j, a in enumerate(args)}
                for f in as_completed(list(futs)):
                    results[futs.pop(f)] = keep(f.result())
                    bar.update()
        else:
            from distributed import as_completed as dask_completed

            token = uuid.uuid4().hex[:8]
            name = fn.__name__.replace("_", "-")
            index = {}
            pending = []
            for j, a in enumerate(args):
                f = client.submit(fn, *a, **kwargs, key=f"{name}-{j}-{token}", pure=False)
                index[f.key] = j
                pending.append(f)
            for f in dask_completed(pending):
                results[index[f.key]] = keep(f.result())
                f.release()
                bar.update()
    finally:
        bar.close()
    return results


def run_windowed(
    client, fn, n_tasks: int, make_args, name: str, window: int | None = None
) -> list[Any]:
    """``fn(*args_k)`` for k in range(n_tasks) on the cluster, results in task order.

    ``make_args(k)`` returns ``(own, rest)``: ``own`` is the task's own data (its users'
    factors), scattered just before the task is submitted; ``rest`` are passed as they are
    (small values, or futures of data broadcast once). At most ``window`` tasks (default twice
    the cluster's threads) are in flight, so workers and the driver hold a window's worth of
    task data at a time, whatever the number of users. Task keys read ``name-NNNNN-xxxxxx``
    on the dashboard.
    """
    from distributed import as_completed

    window = window or 2 * max(1, sum(client.nthreads().values()))
    results: list[Any] = [None] * n_tasks
    index: dict[str, int] = {}

    def submit(k: int):
        own, rest = make_args(k)
        [own_f] = client.scatter([own], hash=False)
        fut = client.submit(
            fn, own_f, *rest, key=f"{name}-{k:05d}-{uuid.uuid4().hex[:6]}", pure=False
        )
        index[fut.key] = k
        return fut

    first = min(window, n_tasks)
    done = as_completed([submit(k) for k in range(first)])
    nxt = first
    for fut in done:
        results[index.pop(fut.key)] = fut.result()
        if nxt < n_tasks:
            done.add(submit(nxt))
            nxt += 1
    return results


def gather_watched(
    client,
    futures: list,
    what: str,
    stall_seconds: float,
    on_result: Callable[[int, Any], Any] | None = None,
) -> list:
    """The results of ``futures``, in order, waited for under watch.

    When none finishes for ``stall_seconds``, log a warning naming ``what`` (e.g. "the user
    half-step of iteration 3") and how many workers Dask has paused for memory. A paused worker
    starts nothing until its memory drops, which may be never: when every worker stays paused,
    running nothing, for ``PAUSED_STALLS`` periods in a row, raise
    :class:`dmf.errors.ClusterError` rather than hang. ``on_result(k, result)`` is called as
    each finishes (then the future is released); its return value is kept as the result.
    """
    from distributed import wait

    from dmf.dist.cluster import scheduler_workers

    position = {f: k for k, f in enumerate(futures)}
    results: list = [None] * len(futures)
    pending = set(futures)
    paused_stalls = 0
    while pending:
        try:
            finished = wait(pending, timeout=stall_seconds, return_when="FIRST_COMPLETED").done
        except TimeoutError:
            workers = scheduler_workers(client)
            paused = sum(w.get("status") == "paused" for w in workers)
            # A paused worker still finishes the tasks it is running: stuck only when none is.
            running = sum(_executing(w) for w in workers)
            stuck = workers and paused == len(workers) and running == 0
            paused_stalls = paused_stalls + 1 if stuck else 0
            advice = " Raise cluster.memory_limit, or lower blocks.target_ratings (re-ingest)."
            if paused_stalls >= PAUSED_STALLS:
                raise ClusterError(
                    f"all {len(workers)} workers stayed paused for memory for "
                    f"{paused_stalls * stall_seconds:g} s while running {what}, with "
                    f"{len(pending)} of {len(futures)} tasks unfinished (Dask runs nothing on a "
                    f"paused worker).{advice}"
                ) from None
            log.warning(
                "dmf: nothing of %s finished in the last %g s (%d of %d still to run); "
                "%d of %d workers are paused for memory.%s",
                what,
                stall_seconds,
                len(pending),
                len(futures),
                paused,
                len(workers),
                advice if paused else "",
            )
            continue
        paused_stalls = 0
        for fut in finished:
            k = position[fut]
            res = fut.result()
            results[k] = on_result(k, res) if on_result is not None else res
            pending.discard(fut)
            fut.release()
    return results


def _executing(worker: dict) -> int:
    """Tasks a worker is running, from the scheduler's record of it (0 if not reported)."""
    counts = (worker.get("metrics") or {}).get("task_counts") or {}
    return int(counts.get("executing", 0))
