"""Getting a Dask cluster: an embedded LocalCluster by default, or an existing one.

``connect(config)`` yields a :class:`distributed.Client`. A cluster it started (LocalCluster or a
dask-jobqueue cluster) is closed at the end; a cluster it attached to (``--address``,
``--scheduler-file``) is left running. The dashboard link is printed as soon as the client is up.

BLAS threads: distributed starts worker processes with OMP/MKL/OPENBLAS_NUM_THREADS=1, but workers
started by hand may not have it, so block tasks also run under :func:`blas_single_thread`.

This is Dask plumbing only: nothing here knows of ALS, the store or the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from dmf.config import ClusterConfig, Config
from dmf.errors import ConfigError

log = logging.getLogger("dmf")

BLAS_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """One BLAS thread for the enclosed work (a Dask task already runs on its own thread).

    threadpoolctl limits the BLAS libraries loaded so far: a task function's module loads the
    libraries it calls (e.g. the solver's kernel, and with it SciPy's BLAS) when it is imported,
    which is when a worker unpickles the task, before the task runs."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def scheduler_workers(client) -> list[dict]:
    """The scheduler's record of every worker (address, memory_limit, status, ...).

    Newer versions of distributed list only the first few workers unless asked for all."""
    import inspect

    kwargs = (
        {"n_workers": -1}
        if "n_workers" in inspect.signature(client.scheduler_info).parameters
        else {}
    )
    return list(client.scheduler_info(**kwargs)["workers"].values())


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def dashboard_link(client) -> str | None:
    try:
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard (bokeh missing or disabled)
        return None


def with_overrides(
    cfg: ClusterConfig, address: str | None, scheduler_file: str | None
) -> ClusterConfig:
    """Apply --address / --scheduler-file (they win over the config)."""
    if address and scheduler_file:
        raise ConfigError("give either --address or --scheduler-file, not both")
    if address:
        return cfg.model_copy(update={"kind": "address", "address": address})
    if scheduler_file:
        return cfg.model_copy(update={"kind": "scheduler_file", "scheduler_file": scheduler_file})
    return cfg


def _attach(target: str, key: str, **client_kwargs):
    """Connect to a running scheduler; an unreachable one is the user's config error."""
    from distributed import Client

    try:
        return Client(**client_kwargs)
    except OSError as exc:  # includes TimeoutError and distributed's CommClosedError
        raise ConfigError(
            f"{key}: cannot reach {target}: {exc}. Is the scheduler running and reachable?"
        ) from exc


@contextlib.contextmanager
def connect(
    config: Config | ClusterConfig,
    address: str | None = None,
    scheduler_file: str | None = None,
    quiet: bool = False,
):
    """Yield a Client for the configured cluster; close what we started, keep what we joined."""
    from distributed import Client, LocalCluster

    cc = config.cluster if isinstance(config, Config) else config
    if isinstance(config, Config) and cc.scheduler_file and not scheduler_file:
        # From the YAML: relative to the config file, like every path there.
        cc = cc.model_copy(update={"scheduler_file": str(config.resolve(cc.scheduler_file))})
    cc = with_overrides(cc, address, scheduler_file)
    cluster = None
    if cc.kind == "local":
        cluster = LocalCluster(
            n_workers=cc.n_workers,
            threads_per_worker=cc.threads_per_worker,
            memory_limit=cc.memory_limit,
            processes=cc.processes,
            dashboard_address=cc.dashboard_address,
            local_directory=cc.local_directory,
            # Worker processes get one BLAS thread from their environment; thread workers
            # (processes: false) take no ``env`` argument at all (TypeError), and rely on
            # blas_single_thread in each task.
            **({"env": BLAS_ENV} if cc.processes else {}),
        )
        client = Client(cluster)
        what = f"LocalCluster: {cc.n_workers} workers x {cc.threads_per_worker} threads"
    elif cc.kind == "address":
        client = _attach(cc.address, "cluster.address (--address)", address=cc.address)
        what = f"cluster at {cc.address}"
    elif cc.kind == "scheduler_file":
        if not os.path.isfile(cc.scheduler_file):
            raise ConfigError(f"cluster.scheduler_file: {cc.scheduler_file} does not exist")
        client = _attach(
            f"the scheduler of {cc.scheduler_file}",
            "cluster.scheduler_file (--scheduler-file)",
            scheduler_file=cc.scheduler_file,
        )
        what = f"cluster from {cc.scheduler_file}"
    else:  # jobqueue
        try:
            import dask_jobqueue
        except ImportError as exc:
            raise ConfigError(
                "cluster.kind 'jobqueue' needs dask-jobqueue: pip install 'dmf[jobqueue]'"
            ) from exc
        cls = getattr(dask_jobqueue, f"{cc.jobqueue.system.upper()}Cluster")
        cluster = cls(**cc.jobqueue.options)
        cluster.scale(jobs=cc.jobqueue.jobs)
        client = Client(cluster)
        what = f"{cc.jobqueue.system} cluster, {cc.jobqueue.jobs} jobs"
    link = dashboard_link(client)
    _say(f"dmf: {what}; dashboard: {link or 'not available'}", quiet)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def maybe_connect(config: Config, client=None, address=None, scheduler_file=None, quiet=False):
    """Use ``client`` if given (a notebook's), else :func:`connect`."""
    if client is not None:
        yield client
    else:
        with connect(config, address, scheduler_file, quiet=quiet) as c:
            yield c
